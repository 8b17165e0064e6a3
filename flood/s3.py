"""boto3 clients for a profile (endpoint, region, provider quirks) and the bucket checks."""

from __future__ import annotations

import contextlib
import http.client
import os
import ssl
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree

import boto3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from botocore.httpsession import get_cert_path

from flood import __version__
from flood.credentials import Profile
from flood.retry import classify

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0

# Bucket verdicts of a check.
OK = "ok"
MISSING = "missing"
# Profile verdicts of a check.
REJECTED = "rejected"
UNREACHABLE = "unreachable"


def make_client(profile: Profile, *, pool: int = 10) -> Any:
    """A client for one profile. Call it in the process that uses it: clients are not fork-safe."""
    extra: dict[str, Any] = {}
    if profile.provider != "amazon":
        # boto3 >= 1.36 sends CRC checksum headers by default: B2 answers 400, R2 has answered
        # 501, and some servers store the trailer inside the object.
        extra["request_checksum_calculation"] = "when_required"
        extra["response_checksum_validation"] = "when_required"
    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        # Flood's own policy does the long waits (flood.retry); botocore may only retry a blip.
        retries={"mode": "standard", "total_max_attempts": 2},
        s3={"addressing_style": "path" if profile.endpoint else "auto"},
        max_pool_connections=pool,
        tcp_keepalive=True,
        user_agent_extra=f"flood/{__version__}",
        **extra,
    )
    session = boto3.session.Session(
        aws_access_key_id=profile.access_key_id,
        aws_secret_access_key=profile.secret_access_key,
        region_name=profile.region,
    )
    return session.client("s3", endpoint_url=profile.endpoint, config=config)


@dataclass
class ProfileCheck:
    """The outcome of checking a profile: its own verdict, and one per bucket when it is OK."""

    status: str
    detail: str = ""
    buckets: dict[str, str] = field(default_factory=dict)


def check_profile(client: Any, buckets: Iterable[str]) -> ProfileCheck:
    """ListBuckets, or HeadBucket per bucket where listing is denied (bucket-scoped keys)."""
    wanted = sorted(set(buckets))
    try:
        listed = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    except (ClientError, BotoCoreError) as exc:
        verdict = classify(exc)
        if verdict.transient:
            return ProfileCheck(UNREACHABLE, _describe(exc))
        if verdict.scope == "profile":
            return ProfileCheck(REJECTED, verdict.reason)
        listed = set()
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
        verdict = classify(exc)
        if verdict.transient:
            return ProfileCheck(UNREACHABLE, _describe(exc))
        if verdict.scope == "profile":
            return ProfileCheck(REJECTED, verdict.reason)
        if verdict.reason in ("NotFound", "NoSuchBucket"):
            return ProfileCheck(OK, MISSING)
        # 403 on HEAD: a write-only key may still PUT. Let the upload itself decide.
    return ProfileCheck(OK, OK)


def _describe(exc: BaseException) -> str:
    """An error's text for logs: botocore's messages name the endpoint, never a credential."""
    return f"{type(exc).__name__}: {exc}"


class LeanPut:
    """Single-request PUTs over one kept-alive http.client connection, signed by botocore's
    own S3SigV4Auth. It skips boto3's per-request layers (endpoint rules, event hooks,
    user-agent building, checksum handlers): about a fifth of put_object's CPU per small file.

    Errors come out as botocore's exceptions (ClientError with the server's code and status,
    EndpointConnectionError, ConnectionClosedError, timeouts), so flood.retry classifies them
    like any other. Only for profiles with an endpoint (path-style addressing)."""

    def __init__(self, profile: Profile, connections: int = 1) -> None:
        assert profile.endpoint
        url = urllib.parse.urlsplit(profile.endpoint)
        self.endpoint = profile.endpoint.rstrip("/")
        self.origin = f"{url.scheme}://{url.netloc}"
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.https else 80)
        self.base = url.path.rstrip("/")
        self.auth = S3SigV4Auth(Credentials(profile.access_key_id, profile.secret_access_key),
                                "s3", profile.region)
        self.pool: list[http.client.HTTPConnection | None] = [None] * connections

    def put(self, bucket: str, key: str, body: bytes, content_md5: str) -> str:
        """PUT body as bucket/key; the ETag."""
        return self.start(0, bucket, key, body, content_md5).result()

    def start(self, slot: int, bucket: str, key: str, body: bytes,
              content_md5: str) -> PendingPut:
        """Send a PUT on connection `slot` without waiting for the answer: several started on
        different slots are in flight at once. Errors wait for result()."""
        path = f"{self.base}/{bucket}/{urllib.parse.quote(key, safe='/~')}"
        pending = PendingPut(self, slot, path, body, self.sign(path, body, content_md5),
                             reused=self.pool[slot] is not None)
        try:
            self.send(pending)
        except BotoCoreError as exc:
            pending.error = exc
        return pending

    def finish(self, pending: PendingPut) -> str:
        """The answer to a started PUT. A kept-alive connection that the server had closed
        meanwhile is retried once at once on a new one (the only blip handled here)."""
        try:
            if pending.error is not None:
                raise pending.error
            return self.receive(pending.slot)
        except (ConnectionClosedError, EndpointConnectionError):
            if not pending.reused:
                raise
            pending.reused = False
            self.send(pending)
            return self.receive(pending.slot)

    def sign(self, path: str, body: bytes, content_md5: str) -> dict[str, str]:
        request = AWSRequest(method="PUT", url=self.origin + path, data=body,
                             headers={"Content-MD5": content_md5})
        self.auth.add_auth(request)
        headers = dict(request.headers.items())
        headers["Host"] = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        headers["Content-Length"] = str(len(body))
        headers["User-Agent"] = f"flood/{__version__}"
        return headers

    def send(self, pending: PendingPut) -> None:
        conn = self.connection(pending.slot)
        try:
            conn.request("PUT", pending.path, body=pending.body, headers=pending.headers)
        except TimeoutError:
            self.close(pending.slot)
            raise ReadTimeoutError(endpoint_url=self.endpoint) from None
        except (OSError, http.client.HTTPException) as exc:
            self.close(pending.slot)
            raise ConnectionClosedError(endpoint_url=self.endpoint) from exc

    def receive(self, slot: int) -> str:
        conn = self.connection(slot)
        try:
            response = conn.getresponse()
            payload = response.read()
        except TimeoutError:
            self.close(slot)
            raise ReadTimeoutError(endpoint_url=self.endpoint) from None
        except (OSError, http.client.HTTPException) as exc:
            self.close(slot)
            raise ConnectionClosedError(endpoint_url=self.endpoint) from exc
        if response.getheader("Connection", "").lower() == "close":
            self.close(slot)
        if response.status == 200:
            return str(response.getheader("ETag", ""))
        raise _client_error(response, payload)

    def connection(self, slot: int) -> http.client.HTTPConnection:
        conn = self.pool[slot]
        if conn is not None:
            return conn
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        kwargs: dict[str, Any] = {"timeout": CONNECT_TIMEOUT}
        if self.https:
            kwargs["context"] = ssl.create_default_context(
                cafile=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))
        conn = cls(self.host, self.port, **kwargs)
        try:
            conn.connect()
        except TimeoutError:
            raise ConnectTimeoutError(endpoint_url=self.endpoint) from None
        except OSError as exc:
            raise EndpointConnectionError(endpoint_url=self.endpoint) from exc
        assert conn.sock is not None
        conn.sock.settimeout(READ_TIMEOUT)
        self.pool[slot] = conn
        return conn

    def close(self, slot: int) -> None:
        conn = self.pool[slot]
        if conn is not None:
            conn.close()
            self.pool[slot] = None


@dataclass
class PendingPut:
    """A PUT sent on one of LeanPut's connections, its answer not read yet."""

    lean: LeanPut
    slot: int
    path: str
    body: bytes
    headers: dict[str, str]
    reused: bool
    error: BaseException | None = None

    def result(self) -> str:
        return self.lean.finish(self)


def _client_error(response: http.client.HTTPResponse, payload: bytes) -> ClientError:
    """The server's error answer as botocore would raise it."""
    code, message = "", ""
    with contextlib.suppress(ElementTree.ParseError):
        root = ElementTree.fromstring(payload) if payload else None
        if root is not None:
            code = root.findtext("Code") or ""
            message = root.findtext("Message") or ""
    return ClientError({
        "Error": {"Code": code or str(response.status), "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": response.status,
                             "HTTPHeaders": {k.lower(): v for k, v in response.getheaders()}},
    }, "PutObject")
