"""The AWS-style credentials file: which file, and its profiles as validated `Profile`s."""

from __future__ import annotations

import configparser
import contextlib
import difflib
import ipaddress
import os
import re
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flood import checksums, units
from flood.errors import ConfigError, InvalidName
from flood.layout import check_profile

PROVIDERS = ("amazon", "backblaze", "cloudflare")
_ENDPOINT_REQUIRED = ("backblaze", "cloudflare")
CREDENTIAL_SOURCES = ("Ec2InstanceMetadata", "EcsContainer", "Environment")
INSECURE = "insecure"
# Every key a Flood profile may hold; the AWS CLI's spellings on the right are accepted too.
KEYS = (
    "provider",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "aws_region",
    "aws_endpoint",
    "ca_bundle",
    "proxy",
    "role_arn",
    "source_profile",
    "credential_source",
    "role_session_name",
    "external_id",
    "duration_seconds",
    "checksum",
    "part_size",
    "parts_in_flight",
    "max_bandwidth",
)
MIN_PART = 5 * 1024 * 1024  # S3's smallest part but the last
MAX_PART = 5 * 1024 * 1024 * 1024
ALIASES = {"region": "aws_region", "endpoint_url": "aws_endpoint"}
AWS_ENV_SOURCE = "$AWS_SHARED_CREDENTIALS_FILE"
AWS_HOME_SOURCE = "~/.aws/credentials"
OPTION_SOURCE = "--credentials"


@dataclass(frozen=True)
class Profile:
    """One profile: its provider, region, endpoint, how it is reached (CA, proxy) and where
    its keys come from. Its repr never shows a secret, a token or a proxy password."""

    name: str
    provider: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str
    endpoint: str | None
    session_token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None  # a PEM file, "insecure", or None (the default store)
    proxy: str | None = field(default=None, repr=False)  # may carry user:password
    role_arn: str | None = None
    source_profile: str | None = None
    credential_source: str | None = None
    role_session_name: str | None = None
    external_id: str | None = field(default=None, repr=False)
    duration_seconds: int | None = None
    checksum: str = "md5"  # what each part carries for the server to verify
    part_size: int | None = None  # bytes; None: the supervisor's --part-size
    parts_in_flight: int | None = None  # None: the supervisor's --parts-in-flight
    max_bandwidth: float | None = None  # bytes per second for all the profile's uploads

    @property
    def static_keys(self) -> bool:
        """Whether the keys are in the file (not a role or another credential source)."""
        return not (self.role_arn or self.credential_source)

    def secrets(self) -> list[str]:
        """What must never appear in a log line: the secret, the token, the proxy password."""
        found = [self.secret_access_key, self.session_token or "", self.external_id or ""]
        if self.proxy:
            found.append(urllib.parse.urlsplit(self.proxy).password or "")
        return [s for s in found if s]


@dataclass(frozen=True)
class CredentialsFile:
    """The file that was used, why it was chosen, and its profiles by name."""

    path: Path
    source: str
    profiles: Mapping[str, Profile]
    mode: int
    skipped: tuple[str, ...] = ()  # files of the AWS CLI's search passed over: not Flood's

    def chosen(self) -> str:
        """Why this file: the first that exists, or the first that is Flood's."""
        if not self.skipped:
            return f"first that exists: {self.source}"
        return f"first that is Flood's: {self.source}; skipped {', '.join(self.skipped)}"

    def loose_permissions(self) -> bool:
        """True when group or others may read or write the file (OpenSSH refuses such keys)."""
        return bool(self.mode & (stat.S_IRWXG | stat.S_IRWXO))

    def secrets(self) -> list[str]:
        return [secret for p in self.profiles.values() for secret in p.secrets()]


def candidates(
    option: str | None, environ: Mapping[str, str] | None = None
) -> list[tuple[str | None, str]]:
    """Where a credentials file is looked for, in order, each with its name in messages: the
    AWS CLI's search ($AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials), then --credentials."""
    env = os.environ if environ is None else environ
    home = env.get("HOME", os.path.expanduser("~"))
    return [
        (env.get("AWS_SHARED_CREDENTIALS_FILE"), AWS_ENV_SOURCE),
        (os.path.join(home, ".aws", "credentials"), AWS_HOME_SOURCE),
        (option, OPTION_SOURCE),
    ]


def locate(option: str | None, environ: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """The first candidate that exists, with the reason it was chosen (not read: load() also
    skips a file of the AWS CLI's search that is not Flood's)."""
    tried: list[str] = []
    for candidate, source in candidates(option, environ):
        path = _existing(candidate, source, tried)
        if path is not None:
            return path, source
    raise ConfigError("no credentials file found; looked at " + ", ".join(tried))


def load(option: str | None, environ: Mapping[str, str] | None = None) -> CredentialsFile:
    """Find and parse the credentials file; raise ConfigError naming every problem found.
    A file found by the AWS CLI's search that holds no profile with a `provider` key is the
    AWS CLI's own, not Flood's: it is skipped (and named in `skipped`), and the search goes
    on. A file with some Flood profiles and some without is refused, naming them."""
    tried: list[str] = []
    skipped: list[str] = []
    for candidate, source in candidates(option, environ):
        path = _existing(candidate, source, tried)
        if path is None:
            continue
        parser, mode = _read(path, source)
        if source != OPTION_SOURCE and not _any_provider(parser):
            note = f"{source} ({path}: no profile has a provider key, not Flood's)"
            skipped.append(note)
            tried.append(note)
            continue
        profiles = _profiles(path, source, parser)
        return CredentialsFile(path, source, profiles, mode, tuple(skipped))
    raise ConfigError("no credentials file found; looked at " + ", ".join(tried))


def _existing(candidate: str | None, source: str, tried: list[str]) -> Path | None:
    if not candidate:
        tried.append(f"{source} (not set)")
        return None
    path = Path(os.path.abspath(Path(candidate).expanduser()))
    if path.exists():
        return path
    tried.append(f"{source} ({path}: absent)")
    return None


def _read(path: Path, source: str) -> tuple[configparser.ConfigParser, int]:
    parser = configparser.ConfigParser(default_section="\0no-default", interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError(
            f"credentials file {path} ({source}) cannot be read: {_describe(exc)}"
        ) from None
    return parser, mode


def _any_provider(parser: configparser.ConfigParser) -> bool:
    """Whether any profile has a provider key (in any case): the mark of a Flood file."""
    return any(key.lower() == "provider" for name in parser.sections() for key in parser[name])


def _profiles(path: Path, source: str, parser: configparser.ConfigParser) -> dict[str, Profile]:
    if not parser.sections():
        raise ConfigError(f"credentials file {path} ({source}) has no profiles")
    profiles: dict[str, Profile] = {}
    problems: list[str] = []
    for name in parser.sections():
        try:
            profiles[name] = _profile(name, parser[name])
        except ConfigError as exc:
            problems.append(str(exc))
    problems += _sources(profiles)
    if problems:
        raise ConfigError(f"credentials file {path} ({source}): " + "; ".join(problems))
    return profiles


def _profile(name: str, section: Mapping[str, str]) -> Profile:
    try:
        check_profile(name)
    except InvalidName as exc:
        raise ConfigError(f"profile {name!r}: {exc}") from None
    values = _values(name, section)
    provider = values.get("provider", "").lower()
    if not provider:
        raise ConfigError(f"profile {name!r} has no 'provider' key (one of {', '.join(PROVIDERS)})")
    if provider not in PROVIDERS:
        raise ConfigError(
            f"profile {name!r} has unknown provider {provider!r} (known: {', '.join(PROVIDERS)})"
        )
    keys_from_elsewhere = _credential_source(name, provider, values)
    required = ["aws_region"]
    if not keys_from_elsewhere:
        required[:0] = ["aws_access_key_id", "aws_secret_access_key"]
    if provider in _ENDPOINT_REQUIRED:
        required.append("aws_endpoint")
    missing = [key for key in required if not values.get(key)]
    if missing:
        raise ConfigError(f"profile {name!r} ({provider}) is missing {', '.join(missing)}")
    return Profile(
        name=name,
        provider=provider,
        access_key_id=values.get("aws_access_key_id", ""),
        secret_access_key=values.get("aws_secret_access_key", ""),
        region=_region(name, values["aws_region"]),
        endpoint=_endpoint(name, values.get("aws_endpoint")),
        session_token=values.get("aws_session_token") or None,
        ca_bundle=_ca_bundle(name, values.get("ca_bundle")),
        proxy=proxy_url(values.get("proxy"), f"profile {name!r}: proxy"),
        role_arn=values.get("role_arn") or None,
        source_profile=values.get("source_profile") or None,
        credential_source=values.get("credential_source") or None,
        role_session_name=values.get("role_session_name") or None,
        external_id=values.get("external_id") or None,
        duration_seconds=_duration(name, values.get("duration_seconds")),
        checksum=_checksum(name, provider, values.get("checksum")),
        part_size=_part_size(name, values.get("part_size")),
        parts_in_flight=_count(name, "parts_in_flight", values.get("parts_in_flight"), 64),
        max_bandwidth=_rate(name, values.get("max_bandwidth")),
    )


def _values(name: str, section: Mapping[str, str]) -> dict[str, str]:
    """The profile's keys in lower case, the AWS CLI's spellings mapped to Flood's; a key
    Flood does not know is an error (a typo must not be a silent default)."""
    values: dict[str, str] = {}
    for key, value in section.items():
        key = ALIASES.get(key.lower(), key.lower())
        if key in values:
            raise ConfigError(f"profile {name!r} gives {key} twice (under two spellings)")
        values[key] = value.strip()
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        close = [difflib.get_close_matches(k, KEYS, n=1) for k in unknown]
        hints = "".join(f" (did you mean {c[0]}?)" for c in close if c)
        raise ConfigError(f"profile {name!r} has unknown key {', '.join(unknown)}{hints}")
    return values


def _credential_source(name: str, provider: str, values: Mapping[str, str]) -> bool:
    """Whether the profile names where its keys come from (a role, or a credential source);
    the combinations the AWS CLI refuses are refused here too."""
    role, source = values.get("role_arn"), values.get("source_profile")
    origin = values.get("credential_source")
    if not (role or source or origin):
        return False
    if provider != "amazon":
        raise ConfigError(
            f"profile {name!r}: role_arn, source_profile and credential_source need "
            f"provider = amazon (STS and instance roles are AWS's), not {provider}"
        )
    if origin and origin not in CREDENTIAL_SOURCES:
        raise ConfigError(
            f"profile {name!r}: credential_source {origin!r} is not one of "
            f"{', '.join(CREDENTIAL_SOURCES)}"
        )
    if source and not role:
        raise ConfigError(f"profile {name!r}: source_profile needs role_arn")
    if role and bool(source) == bool(origin):
        raise ConfigError(
            f"profile {name!r}: role_arn needs exactly one of source_profile and credential_source"
        )
    if values.get("aws_access_key_id") or values.get("aws_secret_access_key"):
        raise ConfigError(
            f"profile {name!r}: keys in the file and a role or credential_source exclude each other"
        )
    return True


def _sources(profiles: Mapping[str, Profile]) -> list[str]:
    """A role's source_profile must be an ordinary profile of this file with its keys."""
    problems = []
    for profile in profiles.values():
        if not profile.source_profile:
            continue
        source = profiles.get(profile.source_profile)
        if source is None:
            problems.append(
                f"profile {profile.name!r}: source_profile {profile.source_profile!r} is not a "
                "profile of this file"
            )
        elif not source.static_keys or not source.access_key_id:
            problems.append(
                f"profile {profile.name!r}: source_profile {source.name!r} must hold "
                "aws_access_key_id and aws_secret_access_key itself"
            )
    return problems


# A region name as botocore accepts one ("eu-west-1", "auto", "us-west-004").
_REGION = re.compile(r"[a-z\d](?:[a-z\d-]{0,61}[a-z\d])?", re.IGNORECASE)


def _region(name: str, value: str) -> str:
    if not _REGION.fullmatch(value):
        raise ConfigError(
            f"profile {name!r}: aws_region {value!r} is not a region name "
            "(letters, digits and inner hyphens, such as eu-west-1 or auto)"
        )
    return value


def _endpoint(name: str, value: str | None) -> str | None:
    if not value:
        return None
    url = urllib.parse.urlsplit(value)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"profile {name!r}: aws_endpoint {value!r} is not an http:// or https:// URL "
            "with a host"
        )
    try:
        url.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        raise ConfigError(f"profile {name!r}: aws_endpoint {value!r} has a bad port") from None
    if not _host_ok(url.hostname):
        raise ConfigError(
            f"profile {name!r}: aws_endpoint {value!r}: {url.hostname!r} is not a host name "
            "or IP address (letters, digits and hyphens between dots)"
        )
    return value.rstrip("/")


# A DNS name as botocore checks an endpoint's (labels of letters, digits and inner hyphens).
_LABEL = re.compile(r"(?!-)[a-z\d-]{1,63}(?<!-)", re.IGNORECASE)


def _host_ok(host: str) -> bool:
    """A name botocore will take as an endpoint's host, or an IP address."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    return len(host) <= 255 and all(_LABEL.fullmatch(p) for p in host.rstrip(".").split("."))


def _ca_bundle(name: str, value: str | None) -> str | None:
    """A readable PEM file of CA certificates, or 'insecure' (no verification at all)."""
    if not value:
        return None
    if value.lower() == INSECURE:
        return INSECURE
    path = os.path.abspath(os.path.expanduser(value))
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 20)
    except OSError as exc:
        raise ConfigError(
            f"profile {name!r}: ca_bundle {path} cannot be read: {exc.strerror}"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise ConfigError(f"profile {name!r}: ca_bundle {path} holds no PEM certificate")
    return path


def proxy_url(value: str | None, what: str) -> str | None:
    """A proxy URL: http://[user:password@]host[:port]; no scheme means http:// (as for curl).
    ConfigError naming `what` (never the password) for anything else."""
    if not value:
        return None
    text = value if "://" in value else f"http://{value}"
    url = urllib.parse.urlsplit(text)
    shown = urllib.parse.urlunsplit(url._replace(netloc=url.hostname or "")) if url.hostname else ""
    if url.scheme != "http":
        raise ConfigError(
            f"{what}: scheme {url.scheme!r} is not supported (an http:// proxy, which tunnels "
            "https with CONNECT)"
        )
    try:
        port = url.port
    except ValueError:
        raise ConfigError(f"{what}: {shown or 'the URL'} has a bad port") from None
    if not url.hostname or (url.path not in ("", "/")) or url.query:
        raise ConfigError(f"{what}: {shown or 'the value'} is not http://[user:password@]host:port")
    del port
    return text.rstrip("/")


def _checksum(name: str, provider: str, value: str | None) -> str:
    """The per-part checksum: one the provider verifies, and this machine can compute."""
    algorithm = (value or "md5").lower()
    if algorithm not in checksums.ALGORITHMS:
        raise ConfigError(
            f"profile {name!r}: checksum {value!r} is not one of {', '.join(checksums.ALGORITHMS)}"
        )
    if algorithm not in checksums.SUPPORTED[provider]:
        known = ", ".join(checksums.SUPPORTED[provider])
        raise ConfigError(
            f"profile {name!r}: checksum {algorithm} is not supported by {provider} (it "
            f"verifies {known}; see the README's checksum table)"
        )
    why = checksums.unavailable(algorithm)
    if why is not None:
        raise ConfigError(f"profile {name!r}: {why}")
    return algorithm


def _part_size(name: str, value: str | None) -> int | None:
    if not value:
        return None
    try:
        found = units.size(value if not value.isdigit() else f"{value}MiB")
    except ValueError as exc:
        raise ConfigError(f"profile {name!r}: part_size: {exc}") from None
    if not MIN_PART <= found <= MAX_PART:
        raise ConfigError(f"profile {name!r}: part_size {value!r} is outside S3's 5 MiB to 5 GiB")
    return found


def _count(name: str, key: str, value: str | None, most: int) -> int | None:
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise ConfigError(f"profile {name!r}: {key} {value!r} is not a number from 1 to {most}")
    return int(value)


def _rate(name: str, value: str | None) -> float | None:
    if not value:
        return None
    try:
        return units.rate(value)
    except ValueError as exc:
        raise ConfigError(f"profile {name!r}: max_bandwidth: {exc}") from None


def _duration(name: str, value: str | None) -> int | None:
    if not value:
        return None
    if not value.isdigit() or not 900 <= int(value) <= 43200:
        raise ConfigError(
            f"profile {name!r}: duration_seconds {value!r} is not a number of seconds from "
            "900 to 43200 (STS's range)"
        )
    return int(value)


def _describe(exc: BaseException) -> str:
    """Say what is wrong without quoting the file: a malformed line may hold a secret."""
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"line {exc.lineno} comes before any [profile] header"
    if isinstance(exc, configparser.ParsingError):
        lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
        return f"line {lines} is not 'key = value'"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"profile [{exc.section}] appears twice (line {exc.lineno})"
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"a key appears twice in profile [{exc.section}] (line {exc.lineno})"
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__
