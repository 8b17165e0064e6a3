"""boto3 clients for a profile (endpoint, region, provider quirks) and the bucket checks."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from xml.etree import ElementTree

import boto3
from botocore.config import Config
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
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
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


class SigV4:
    """AWS Signature Version 4 of one PUT: the headers botocore's S3SigV4Auth would add,
    computed directly. The signing key is derived once a day instead of four HMACs per
    request, and nothing parses URLs: botocore's signer cost more CPU per small file than
    the rest of the request (tests/benchmarks/hotpath.py). Checked byte for byte against
    S3SigV4Auth in tests/unit/test_s3.py and by every upload against the real server."""

    def __init__(self, access_key_id: str, secret_access_key: str, region: str) -> None:
        self._access_key_id = access_key_id
        self._secret = secret_access_key
        self._region = region
        self._day = ""
        self._key = b""

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        payload_hash: str,
        headers: dict[str, str],
        when: float | None = None,
    ) -> dict[str, str]:
        """The headers to add to the request: X-Amz-Date, X-Amz-Content-SHA256 and
        Authorization, which signs `host`, `path` (already URI-encoded, as sent), `headers`
        and the payload's SHA-256. `when`: seconds since the epoch (now if None)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
        day = stamp[:8]
        if day != self._day:
            key = ("AWS4" + self._secret).encode("utf-8")
            for part in (day, self._region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
            self._day, self._key = day, key
        signed = {name.lower(): " ".join(value.split()) for name, value in headers.items()}
        signed.update({"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": stamp})
        names = sorted(signed)
        canonical = "\n".join(
            [
                method,
                path,
                "",
                *(f"{n}:{signed[n]}" for n in names),
                "",
                ";".join(names),
                payload_hash,
            ]
        )
        scope = f"{day}/{self._region}/s3/aws4_request"
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        signature = hmac.new(
            self._key, f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{digest}".encode(), hashlib.sha256
        ).hexdigest()
        return {
            "X-Amz-Date": stamp,
            "X-Amz-Content-SHA256": payload_hash,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={self._access_key_id}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}",
        }


class LeanPut:
    """Single-request PUTs over kept-alive connections, signed by SigV4 above. It skips
    boto3's per-request layers (endpoint rules, event hooks, user-agent building, checksum
    handlers): about a fifth of put_object's CPU per small file. The request goes out as
    one write; read_response below reads the answer.

    Errors come out as botocore's exceptions (ClientError with the server's code and status,
    EndpointConnectionError, ConnectionClosedError, timeouts), so flood.retry classifies them
    like any other. Only for profiles with an endpoint (path-style addressing)."""

    def __init__(self, profile: Profile, connections: int = 1) -> None:
        assert profile.endpoint
        url = urllib.parse.urlsplit(profile.endpoint)
        self.endpoint = profile.endpoint.rstrip("/")
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.https else 80)
        self.host_header = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        self.base = url.path.rstrip("/")
        self.signer = SigV4(profile.access_key_id, profile.secret_access_key, profile.region)
        self.user_agent = f"flood/{__version__}"
        self.pool: list[socket.socket | None] = [None] * connections

    def put(self, bucket: str, key: str, body: bytes, content_md5: str) -> str:
        """PUT body as bucket/key and wait for the ETag. It goes on the last connection,
        which start() callers leave free: an answer read here is always this PUT's own,
        even while started PUTs on the other connections wait for theirs."""
        return self.start(len(self.pool) - 1, bucket, key, body, content_md5).result()

    def start(self, slot: int, bucket: str, key: str, body: bytes, content_md5: str) -> PendingPut:
        """Send a PUT on connection `slot` without waiting for the answer: several started on
        different slots are in flight at once. Errors wait for result()."""
        path = f"{self.base}/{bucket}/{urllib.parse.quote(key, safe='/~')}"
        pending = PendingPut(
            self, slot, self.request(path, body, content_md5), reused=self.pool[slot] is not None
        )
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

    def request(self, path: str, body: bytes, content_md5: str) -> bytes:
        """The whole request, head and body, as it goes on the wire.

        The body's integrity rests on Content-MD5, which is signed and which the server
        checks (BadDigest otherwise), so the payload itself is sent unsigned, as botocore
        sends streamed uploads: no SHA-256 of every body on either side."""
        headers = {"Content-MD5": content_md5}
        headers.update(self.signer.sign("PUT", self.host_header, path, UNSIGNED_PAYLOAD, headers))
        lines = [
            f"PUT {path} HTTP/1.1",
            f"Host: {self.host_header}",
            f"User-Agent: {self.user_agent}",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
            "",
            "",
        ]
        return "\r\n".join(lines).encode("ascii") + body

    def send(self, pending: PendingPut) -> None:
        sock = self.connection(pending.slot)
        try:
            sock.sendall(pending.data)
        except TimeoutError:
            self.close(pending.slot)
            raise ReadTimeoutError(endpoint_url=self.endpoint) from None
        except OSError as exc:
            self.close(pending.slot)
            raise ConnectionClosedError(endpoint_url=self.endpoint) from exc

    def receive(self, slot: int) -> str:
        sock = self.connection(slot)
        try:
            answer = read_response(sock)
        except TimeoutError:
            self.close(slot)
            raise ReadTimeoutError(endpoint_url=self.endpoint) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.close(slot)
            raise ConnectionClosedError(endpoint_url=self.endpoint) from exc
        if not answer.keep_alive:
            self.close(slot)
        if answer.status == 200:
            return answer.headers.get("etag", "")
        raise _client_error(answer)

    def connection(self, slot: int) -> socket.socket:
        sock = self.pool[slot]
        if sock is not None:
            return sock
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        except TimeoutError:
            raise ConnectTimeoutError(endpoint_url=self.endpoint) from None
        except OSError as exc:
            raise EndpointConnectionError(endpoint_url=self.endpoint) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.https:
            context = ssl.create_default_context(
                cafile=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
            )
            try:
                sock = context.wrap_socket(sock, server_hostname=self.host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise EndpointConnectionError(endpoint_url=self.endpoint) from exc
        sock.settimeout(READ_TIMEOUT)
        self.pool[slot] = sock
        return sock

    def close(self, slot: int) -> None:
        sock = self.pool[slot]
        if sock is not None:
            sock.close()
            self.pool[slot] = None


@dataclass
class PendingPut:
    """A PUT sent on one of LeanPut's connections, its answer not read yet."""

    lean: LeanPut
    slot: int
    data: bytes
    reused: bool
    error: BaseException | None = None

    def result(self) -> str:
        return self.lean.finish(self)


def _client_error(answer: Answer) -> ClientError:
    """The server's error answer as botocore would raise it."""
    code, message = "", ""
    with contextlib.suppress(ElementTree.ParseError):
        root = ElementTree.fromstring(answer.body) if answer.body else None
        if root is not None:
            code = root.findtext("Code") or ""
            message = root.findtext("Message") or ""
    return ClientError(
        {
            "Error": {"Code": code or str(answer.status), "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": answer.status, "HTTPHeaders": answer.headers},
        },
        "PutObject",
    )


MAX_HEAD = 64 * 1024  # an answer's status line and headers; more is not an S3 server


class Answer(NamedTuple):
    """One HTTP response: header names in lower case, the body whole."""

    status: int
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _Reader:
    """Buffered reads from a socket for one response."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise http.client.RemoteDisconnected("the server closed the connection")
        self.buffer += chunk

    def until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            if len(self.buffer) > MAX_HEAD:
                raise http.client.LineTooLong("response head")
            self.fill()
        found, self.buffer = self.buffer[:end], self.buffer[end + len(marker) :]
        return found

    def exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.fill()
        found, self.buffer = self.buffer[:size], self.buffer[size:]
        return found

    def rest(self) -> bytes:
        with contextlib.suppress(http.client.RemoteDisconnected):
            while True:
                self.fill()
        found, self.buffer = self.buffer, b""
        return found


def read_response(sock: socket.socket) -> Answer:
    """Read one HTTP/1.1 response (interim 1xx answers skipped; a body by Content-Length,
    chunked, or up to the close). A few lines instead of http.client's HTTPResponse, whose
    header parsing through the email package cost a sixth of the uploader's CPU per small
    file. Raises http.client.HTTPException (or ValueError) for anything malformed."""
    reader = _Reader(sock)
    while True:
        status_line, *lines = reader.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise http.client.BadStatusLine(status_line)
        status = int(rest[:3])
        if not 100 <= status < 200:
            break
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise http.client.HTTPException(f"malformed header line {line!r}")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while size := int(reader.until(b"\r\n").split(b";")[0], 16):
            parts.append(reader.exact(size))
            reader.exact(2)
        while reader.until(b"\r\n"):
            pass  # trailers, up to the empty line
        body = b"".join(parts)
    elif "content-length" in headers:
        body = reader.exact(int(headers["content-length"]))
    elif status in (204, 304):
        body = b""
    else:
        body, keep_alive = reader.rest(), False
    if reader.buffer:
        keep_alive = False  # bytes after the answer: not ours, so not this connection either
    return Answer(status, headers, body, keep_alive)
