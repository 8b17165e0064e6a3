"""The AWS-style credentials file: which file, and its profiles as validated `Profile`s."""

from __future__ import annotations

import configparser
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flood.errors import ConfigError, InvalidName
from flood.layout import check_profile

PROVIDERS = ("amazon", "backblaze", "cloudflare")
_REQUIRED = ("aws_access_key_id", "aws_secret_access_key", "aws_region")
_ENDPOINT_REQUIRED = ("backblaze", "cloudflare")


@dataclass(frozen=True)
class Profile:
    """One profile's provider, region, endpoint and keys; its repr never shows the secret."""

    name: str
    provider: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str
    endpoint: str | None


@dataclass(frozen=True)
class CredentialsFile:
    """The file that was used, why it was chosen, and its profiles by name."""

    path: Path
    source: str
    profiles: Mapping[str, Profile]
    mode: int

    def loose_permissions(self) -> bool:
        """True when group or others may read or write the file (OpenSSH refuses such keys)."""
        return bool(self.mode & (stat.S_IRWXG | stat.S_IRWXO))

    def secrets(self) -> list[str]:
        return [p.secret_access_key for p in self.profiles.values()]


def locate(option: str | None, environ: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """The AWS CLI's search first ($AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials), then
    the --credentials file: the first that exists wins, with the reason it was chosen."""
    env = os.environ if environ is None else environ
    tried: list[str] = []
    candidates: list[tuple[str | None, str]] = [
        (env.get("AWS_SHARED_CREDENTIALS_FILE"), "$AWS_SHARED_CREDENTIALS_FILE"),
        (
            os.path.join(env.get("HOME", os.path.expanduser("~")), ".aws", "credentials"),
            "~/.aws/credentials",
        ),
        (option, "--credentials"),
    ]
    for candidate, source in candidates:
        if not candidate:
            tried.append(f"{source} (not set)")
            continue
        path = Path(os.path.abspath(Path(candidate).expanduser()))
        if path.exists():
            return path, source
        tried.append(f"{source} ({path}: absent)")
    raise ConfigError("no credentials file found; looked at " + ", ".join(tried))


def load(option: str | None, environ: Mapping[str, str] | None = None) -> CredentialsFile:
    """Locate and parse the credentials file; raise ConfigError naming every problem found."""
    path, source = locate(option, environ)
    parser = configparser.ConfigParser(default_section="\0no-default", interpolation=None)
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle)
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError(
            f"credentials file {path} ({source}) cannot be read: {_describe(exc)}"
        ) from None
    if not parser.sections():
        raise ConfigError(f"credentials file {path} ({source}) has no profiles")
    profiles: dict[str, Profile] = {}
    problems: list[str] = []
    for name in parser.sections():
        try:
            profiles[name] = _profile(name, parser[name])
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"credentials file {path} ({source}): " + "; ".join(problems))
    return CredentialsFile(path=path, source=source, profiles=profiles, mode=mode)


def _profile(name: str, section: Mapping[str, str]) -> Profile:
    try:
        check_profile(name)
    except InvalidName as exc:
        raise ConfigError(f"profile {name!r}: {exc}") from None
    values = {k.lower(): v.strip() for k, v in section.items()}
    provider = values.get("provider", "")
    if not provider:
        raise ConfigError(f"profile {name!r} has no 'provider' key (one of {', '.join(PROVIDERS)})")
    if provider not in PROVIDERS:
        raise ConfigError(
            f"profile {name!r} has unknown provider {provider!r} (known: {', '.join(PROVIDERS)})"
        )
    required = _REQUIRED + (("aws_endpoint",) if provider in _ENDPOINT_REQUIRED else ())
    missing = [key for key in required if not values.get(key)]
    if missing:
        raise ConfigError(f"profile {name!r} ({provider}) is missing {', '.join(missing)}")
    return Profile(
        name=name,
        provider=provider,
        access_key_id=values["aws_access_key_id"],
        secret_access_key=values["aws_secret_access_key"],
        region=values["aws_region"],
        endpoint=values.get("aws_endpoint") or None,
    )


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
