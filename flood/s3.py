"""boto3 clients for a profile (endpoint, region, provider quirks) and the bucket checks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import add_expect_header

from flood import __version__
from flood.checks import CREDENTIALS as CREDENTIALS
from flood.checks import MISSING as MISSING
from flood.checks import OK as OK
from flood.checks import REJECTED as REJECTED
from flood.checks import TLS as TLS
from flood.checks import UNREACHABLE as UNREACHABLE
from flood.checks import ProfileCheck as ProfileCheck
from flood.connection import Connection
from flood.credentials import Profile
from flood.lean import CONNECT_TIMEOUT, READ_TIMEOUT
from flood.verdict import Kind, Scope, classify, describe

# What a profile's check answers for the environment's faults that hold it, by their kind.
_HELD_KINDS = {Kind.TLS: TLS, Kind.CREDENTIALS: CREDENTIALS}


def make_client(
    profile: Profile, profiles: Mapping[str, Profile] | None = None, *, pool: int = 10
) -> Any:
    """A client for one profile (its role's source among `profiles`). Call it in the process
    that uses it: clients are not fork-safe."""
    return client_for(Connection(profile, profiles), pool=pool)


def client_for(connection: Connection, *, pool: int = 10) -> Any:
    """A boto3 S3 client on a profile's connection: its CA, its proxy, its credentials."""
    profile = connection.profile
    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        # Flood's own policy does the long waits (flood.retry); botocore may only retry a blip.
        retries={"mode": "standard", "total_max_attempts": 2},
        # Amazon's regional host, as the lean client addresses it (us-east-1 too: botocore
        # would go to s3.amazonaws.com there).
        s3={
            "addressing_style": "path" if profile.endpoint else "auto",
            "us_east_1_regional_endpoint": "regional",
            # Bodies go unsigned, over plain HTTP too (botocore would SHA-256 every part
            # there): their Content-MD5, which is signed and which the server checks, guards
            # the bytes, as on the lean path.
            "payload_signing_enabled": False,
        },
        max_pool_connections=pool,
        tcp_keepalive=True,
        user_agent_extra=f"flood/{__version__}",
        # The proxy is connection's choice, the same as the lean client's; an empty dict keeps
        # botocore from reading the environment again. The endpoint is the credentials file's
        # alone: $AWS_ENDPOINT_URL_S3 would send boto3 somewhere the lean client does not go.
        proxies=connection.proxies(),
        ignore_configured_endpoint_urls=True,
        # Flood sends the integrity checks itself (Content-MD5, and the profile's checksum on
        # parts): boto3 >= 1.36 would add CRC32 by default, which B2 answers with 400 and R2
        # with 501 (as an aws-chunked trailer), on top of them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    client = connection.boto3_session().client(
        "s3", endpoint_url=profile.endpoint, verify=connection.verify, config=config
    )
    # botocore waits up to a second for "100 Continue" before each PUT body; a proxy that does
    # not relay it (tinyproxy) turns that into a second per file. S3 needs no such wait.
    client.meta.events.unregister("before-call.s3", add_expect_header)
    return client


class LazyClient:
    """A boto3 client made when it is first used (parts, a verifying HEAD, a bucket's check):
    an uploader whose files all go by the lean client never builds one (4 MiB a process,
    most of it copies of the forkserver's shared pages)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._client: Any = None
        self._lock = threading.Lock()  # a multipart upload's parts go from several threads

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make()
        return getattr(self._client, name)


def check_profile(client: Any, buckets: Iterable[str]) -> ProfileCheck:
    """ListBuckets, or HeadBucket per bucket where listing is denied (bucket-scoped keys)."""
    wanted = sorted(set(buckets))
    try:
        listed = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    except (ClientError, BotoCoreError) as exc:
        verdict = classify(exc, "ListBuckets")
        if verdict.kind in _HELD_KINDS:
            return ProfileCheck(_HELD_KINDS[verdict.kind], describe(exc))
        if verdict.transient:
            return ProfileCheck(UNREACHABLE, describe(exc))
        if verdict.scope == Scope.PROFILE:
            return ProfileCheck(REJECTED, verdict.reason)
        listed = set()  # a bucket-scoped key may not list: each bucket is HEADed
    result = ProfileCheck(OK)
    for bucket in wanted:
        if bucket in listed:
            result.buckets[bucket] = OK
            continue
        head = check_bucket(client, bucket)
        if head.status != OK:
            return head
        result.buckets[bucket] = head.detail
    return result


def check_bucket(client: Any, bucket: str) -> ProfileCheck:
    """HeadBucket one bucket: ProfileCheck(OK, detail=OK|MISSING) or the profile's failure."""
    try:
        client.head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as exc:
        verdict = classify(exc, "HeadBucket")
        if verdict.kind in _HELD_KINDS:
            return ProfileCheck(_HELD_KINDS[verdict.kind], describe(exc))
        if verdict.transient:
            return ProfileCheck(UNREACHABLE, describe(exc))
        if verdict.scope == Scope.PROFILE:
            return ProfileCheck(REJECTED, verdict.reason)
        if verdict.kind == Kind.MISSING_BUCKET:
            return ProfileCheck(OK, MISSING)
        # 403 on HEAD: a write-only key may still PUT. Let the upload itself decide.
    return ProfileCheck(OK, OK)
