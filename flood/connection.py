"""How a profile reaches its server, decided here once for every path (the lean client,
boto3's calls, the bucket checks, flood-doctor): the CA that verifies its TLS, the proxy it
goes through, and where its keys come from (the file, a session token, an instance or
container role, or a role assumed with STS)."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import ssl
from collections.abc import Mapping
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.configloader import load_config
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CanonicalNameCredentialSourcer,
    ContainerProvider,
    CredentialProvider,
    CredentialResolver,
    Credentials,
    DeferredRefreshableCredentials,
    EnvProvider,
    InstanceMetadataFetcher,
    InstanceMetadataProvider,
    ReadOnlyCredentials,
    RefreshableCredentials,
)
from botocore.exceptions import CredentialRetrievalError
from botocore.httpsession import get_cert_path
from botocore.loaders import JSONFileLoader

from flood.credentials import INSECURE, Profile
from flood.endpoints import amazon_host as amazon_host
from flood.endpoints import bypassed as bypassed
from flood.endpoints import endpoint_of as endpoint_of
from flood.endpoints import proxy_for as proxy_for
from flood.endpoints import shown_url as shown_url
from flood.errors import ConfigError

# Refreshing credentials are renewed when a quarter of their life is left, at most this long
# before they expire, and at the latest (blocking the requests that need them) when an
# eighth is left, never later than a minute before. botocore's own 15 and 10 minutes would
# make a 15-minute STS session (the shortest there is) call STS before every request.
ADVISORY_REFRESH = 300.0
MANDATORY_REFRESH = 60.0
DEFAULT_ROLE_SESSION = "flood"


# -- TLS -------------------------------------------------------------------------------------
def verify_for(profile: Profile, environ: Mapping[str, str] | None = None) -> str | bool:
    """The CA bundle that verifies the profile's TLS, in the order botocore reads them: the
    profile's ca_bundle, $AWS_CA_BUNDLE, ca_bundle in the AWS config file, $REQUESTS_CA_BUNDLE,
    else the system's store. False only for `ca_bundle = insecure`."""
    env = os.environ if environ is None else environ
    if profile.ca_bundle == INSECURE:
        return False
    if profile.ca_bundle:
        return profile.ca_bundle
    if env.get("AWS_CA_BUNDLE"):
        return env["AWS_CA_BUNDLE"]
    configured = _aws_config_value("ca_bundle")
    if configured:
        return str(configured)
    if env.get("REQUESTS_CA_BUNDLE"):
        return env["REQUESTS_CA_BUNDLE"]
    return system_store()


def system_store() -> str:
    """The system's CA bundle (Debian: /etc/ssl/certs/ca-certificates.crt), else botocore's."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            return candidate
    return str(get_cert_path(True))


def _aws_config_value(name: str) -> Any:
    """A setting of the AWS config file (~/.aws/config, $AWS_CONFIG_FILE) for the profile
    boto3 would use ($AWS_DEFAULT_PROFILE, $AWS_PROFILE, else default), read by botocore's
    own parser. Not through a botocore Session: making one registers its hundreds of handlers,
    which copies 2 MiB of the forkserver's shared pages into an uploader that needs none."""
    env = os.environ
    path = os.path.expanduser(env.get("AWS_CONFIG_FILE") or "~/.aws/config")
    profile = env.get("AWS_DEFAULT_PROFILE") or env.get("AWS_PROFILE") or "default"
    try:
        if not os.path.isfile(path):
            return None
        return load_config(path).get("profiles", {}).get(profile, {}).get(name)
    except Exception:  # a broken AWS config file is boto3's business, not a reason to stop
        return None


def ssl_context(verify: str | bool) -> ssl.SSLContext:
    """A client context that verifies against `verify` (a CA file), or not at all (False)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=str(verify))


# -- credentials -------------------------------------------------------------------------------
class _Rotating(DeferredRefreshableCredentials):  # type: ignore[misc]  # botocore is untyped
    """A role's credentials, fetched on first use and renewed ahead of their expiry by their
    own lifetime (see ADVISORY_REFRESH)."""

    # botocore's hooks after each fetch: it stages the new expiry, then publishes it (older
    # releases set it at once); the timeouts follow whichever holds it.
    def _set_from_data(self, data: Any) -> None:
        super()._set_from_data(data)
        self._tune()

    def _publish_refresh(self) -> None:
        parent = getattr(super(), "_publish_refresh", None)
        if parent is not None:
            parent()
        self._tune()

    def _tune(self) -> None:
        if getattr(self, "_expiry_time", None) is None:
            return
        left = max(self._seconds_remaining(), 1.0)
        self._advisory_refresh_timeout = min(ADVISORY_REFRESH, left / 4)
        self._mandatory_refresh_timeout = min(MANDATORY_REFRESH, left / 8)


class _Fixed(CredentialProvider):  # type: ignore[misc]  # botocore is untyped
    """The one credential provider of Flood's botocore sessions: what connection decided."""

    METHOD = "flood"

    def __init__(self, credentials: Any) -> None:
        super().__init__()
        self.credentials = credentials

    def load(self) -> Any:
        return self.credentials


class Connection:
    """A profile's way to its server. Build it in the process that uses it: its botocore
    session and credentials (which may refresh over the network) are not fork-safe."""

    def __init__(
        self,
        profile: Profile,
        profiles: Mapping[str, Profile] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.profile = profile
        self.url = endpoint_of(profile)
        self.verify = verify_for(profile, environ)
        self.proxy = proxy_for(profile, self.url, environ)
        self.credentials = _shared_credentials(profile, profiles or {}, environ)

    @functools.cached_property
    def session(self) -> botocore.session.Session:
        """The botocore session of boto3's clients, made when the first is (an uploader whose
        files all go by the lean client never makes one: 2 MiB of pages copied after the
        fork)."""
        session = _session()
        session.register_component(
            "credential_provider", CredentialResolver([_Fixed(self.credentials)])
        )
        return session

    def frozen(self) -> ReadOnlyCredentials:
        """The keys to sign the next request with (refreshed first when they are due)."""
        return self.credentials.get_frozen_credentials()

    def boto3_session(self) -> boto3.session.Session:
        return boto3.session.Session(botocore_session=self.session, region_name=self.profile.region)

    def proxies(self) -> dict[str, str]:
        """boto3's proxies setting: exactly the lean client's choice, never its own lookup."""
        return {"http": self.proxy, "https": self.proxy} if self.proxy else {}


# botocore parses a service's model (S3's, with its endpoint rules: about 13 MiB once parsed)
# into its session's loader, again for every session. One loader per process parses it once
# for all of the process's sessions; filled in the forkserver (flood.workers.preload), it is
# shared by every child forked from there.
_LOADER: list[Any] = []


def _session() -> botocore.session.Session:
    """A botocore session on the process's one data loader (its first session's, so set up as
    botocore would: $AWS_DATA_PATH and the config file's data_path)."""
    session = botocore.session.Session()
    if not _LOADER:
        loader = session.get_component("data_loader")
        loader.file_loader = _Undocumented()
        _LOADER.append(loader)
    session.register_component("data_loader", _LOADER[0])
    return session


class _Undocumented(JSONFileLoader):  # type: ignore[misc]  # botocore is untyped
    """botocore's model files without their API documentation, which nothing of Flood shows,
    in plain dicts (botocore's are OrderedDicts): S3's parsed model holds 9 MiB, not 14."""

    def _load_file(self, full_path: str, open_method: Any) -> Any:  # botocore's, minus docs
        if not os.path.isfile(full_path):
            return None
        with open_method(full_path, "rb") as fp:
            payload = fp.read().decode("utf-8")
        return json.loads(payload, object_pairs_hook=_undocumented)


def _undocumented(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Emptied, not dropped: botocore reads some (clientContextParams') with [].
    return {key: "" if key == "documentation" else value for key, value in pairs}


# One credentials object per profile and process: the uploader's clients, the hold checker's
# and the janitor's share keys fetched once, and renew them once (botocore's refresh takes a
# lock, so threads may share it; a session they may not, so each Connection has its own).
_BY_PROFILE: dict[tuple[int, Profile, Profile | None], Any] = {}


def _shared_credentials(
    profile: Profile, profiles: Mapping[str, Profile], environ: Mapping[str, str] | None
) -> Any:
    if environ is not None:  # an environment of the caller's own: not the process's keys
        return credentials_for(profile, profiles, _session(), environ)
    source = profiles.get(profile.source_profile) if profile.source_profile else None
    key = (os.getpid(), profile, source)
    found = _BY_PROFILE.get(key)
    if found is None and profile.static_keys:  # keys in the file: no session needed
        found = _BY_PROFILE[key] = Credentials(
            profile.access_key_id, profile.secret_access_key, profile.session_token
        )
    elif found is None:
        # A session of the credentials' own: STS clients are made from it under their lock.
        own = _session()
        found = _BY_PROFILE[key] = credentials_for(profile, profiles, own)
    return found


def credentials_for(
    profile: Profile,
    profiles: Mapping[str, Profile],
    session: botocore.session.Session,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """botocore credentials for a profile: its keys (and token), the credential_source named,
    or a role assumed with the source profile's keys or the credential source's."""
    if profile.credential_source and not profile.role_arn:
        return _sourced(profile, session, environ)
    if not profile.role_arn:
        return Credentials(profile.access_key_id, profile.secret_access_key, profile.session_token)
    if profile.source_profile:
        source_profile = profiles.get(profile.source_profile)
        if source_profile is None:
            raise ConfigError(
                f"profile {profile.name!r}: source_profile {profile.source_profile!r} is not "
                "a profile of the credentials file"
            )
        source = credentials_for(source_profile, profiles, session, environ)
    else:
        source = _sourced(profile, session, environ)
    return _assumed(profile, source, session)


def _sourced(
    profile: Profile, session: botocore.session.Session, environ: Mapping[str, str] | None = None
) -> Any:
    """The credentials of credential_source: the environment's keys, read now; a container's
    or instance's role, fetched on first use (when the first request is signed, not when a
    client is made) and again ahead of each expiry, as a role's are. An endpoint that does not
    answer raises CredentialRetrievalError then: the profile waits (flood.verdict)."""
    env = os.environ if environ is None else environ
    name = profile.credential_source
    found = check_source(profile, env)
    if found is not None:
        return found
    sourcer = CanonicalNameCredentialSourcer(
        [
            ContainerProvider(environ=dict(env)),
            InstanceMetadataProvider(
                iam_role_fetcher=InstanceMetadataFetcher(
                    timeout=session.get_config_variable("metadata_service_timeout"),
                    num_attempts=session.get_config_variable("metadata_service_num_attempts"),
                    user_agent=session.user_agent(),
                    config={
                        "ec2_metadata_service_endpoint": session.get_config_variable(
                            "ec2_metadata_service_endpoint"
                        ),
                        "ec2_metadata_v1_disabled": session.get_config_variable(
                            "ec2_metadata_v1_disabled"
                        ),
                    },
                )
            ),
        ]
    )

    def fetch() -> dict[str, Any]:
        found = sourcer.source_credentials(name)
        if found is None:
            raise CredentialRetrievalError(provider=name, error_msg="it gave no credentials")
        if isinstance(found, RefreshableCredentials):
            # As fetched: its own accessors would fetch again at once, by botocore's
            # 15-minute window, keys that live less than that.
            keys = ReadOnlyCredentials(found._access_key, found._secret_key, found._token)
        else:
            keys = found.get_frozen_credentials()
        expiry = getattr(found, "_expiry_time", None)
        if expiry is None:  # keys without an expiry: asked for again within the hour
            expiry = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=UNDATED_KEYS)
        return {
            "access_key": keys.access_key,
            "secret_key": keys.secret_key,
            "token": keys.token,
            "expiry_time": expiry.isoformat(),
        }

    return _Rotating(refresh_using=fetch, method=f"flood:{name}")


def check_source(profile: Profile, environ: Mapping[str, str] | None = None) -> Any:
    """What can be known of a credential_source without the network: the environment's keys
    (returned), or a container endpoint's variable being set. ConfigError when not."""
    env = os.environ if environ is None else environ
    name = profile.credential_source
    if name == "Environment":
        found = EnvProvider(environ=dict(env)).load()
        if found is None:
            raise ConfigError(
                f"profile {profile.name!r}: credential_source Environment, but "
                "$AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY are not both set"
            )
        return found
    if name == "EcsContainer" and not any(k in env for k in _CONTAINER_VARIABLES):
        raise ConfigError(
            f"profile {profile.name!r}: credential_source EcsContainer, but neither "
            f"{' nor '.join('$' + k for k in _CONTAINER_VARIABLES)} is set"
        )
    return None


_CONTAINER_VARIABLES = (
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)
UNDATED_KEYS = 3600.0


def _assumed(profile: Profile, source: Any, session: botocore.session.Session) -> Any:
    """The role's credentials from STS AssumeRole, reached where the AWS configuration says
    ($AWS_ENDPOINT_URL_STS, the config file's services), never at the profile's endpoint."""
    extra: dict[str, Any] = {"RoleSessionName": profile.role_session_name or DEFAULT_ROLE_SESSION}
    if profile.duration_seconds:
        extra["DurationSeconds"] = profile.duration_seconds
    if profile.external_id:
        extra["ExternalId"] = profile.external_id

    def sts_client(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("region_name", profile.region)
        kwargs.setdefault("verify", verify_for(profile))
        if profile.proxy:
            kwargs.setdefault("config", Config(proxies=_both(profile.proxy)))
        return session.create_client(*args, **kwargs)

    fetcher = AssumeRoleCredentialFetcher(
        client_creator=sts_client,
        source_credentials=source,
        role_arn=profile.role_arn,
        extra_args=extra,
        cache={},
        expiry_window_seconds=MANDATORY_REFRESH,
    )
    return _Rotating(refresh_using=fetcher.fetch_credentials, method="assume-role")


def _both(proxy: str) -> dict[str, str]:
    return {"http": proxy, "https": proxy}
