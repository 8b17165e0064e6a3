"""The lean PUT: Flood's one HTTP/1.1 client on raw sockets, for single-request uploads of
small files. It keeps its own kept-alive connections and hands a free one to each request."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import ssl
import urllib.parse
from typing import NamedTuple
from xml.etree import ElementTree

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
from flood.sigv4 import SigV4

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_HEAD = 64 * 1024  # an answer's status line and headers; more is not an S3 server


class LeanClient:
    """Single-request PUTs over kept-alive connections, signed by flood.sigv4. It skips
    boto3's per-request layers (endpoint rules, event hooks, user-agent building, checksum
    handlers): about a fifth of put_object's CPU per small file. A request goes out as one
    write; read_response below reads its answer.

    Each started PUT takes a free connection (or opens one) and gives it back once its answer
    is read, so any number may be in flight and an answer is only ever read by its own PUT.
    Errors come out as botocore's exceptions (ClientError with the server's code and status,
    EndpointConnectionError, ConnectionClosedError, timeouts), so flood.verdict classifies them
    like any other. Only for profiles with an endpoint (path-style addressing)."""

    def __init__(self, profile: Profile) -> None:
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
        self.free: list[socket.socket] = []

    def put(self, bucket: str, key: str, body: bytes, content_md5: str) -> str:
        """PUT body as bucket/key and wait for the ETag."""
        return self.start(bucket, key, body, content_md5).result()

    def start(self, bucket: str, key: str, body: bytes, content_md5: str) -> PendingPut:
        """Send a PUT without waiting for its answer; errors wait for result()."""
        path = f"{self.base}/{bucket}/{urllib.parse.quote(key, safe='/~')}"
        pending = PendingPut(self, self.request(path, body, content_md5))
        try:
            pending.send()
        except BotoCoreError as exc:
            pending.error = exc
        return pending

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

    def acquire(self) -> tuple[socket.socket, bool]:
        """A free kept-alive connection (reused: True), else a new one."""
        if self.free:
            return self.free.pop(), True
        return self.connect(), False

    def release(self, sock: socket.socket) -> None:
        self.free.append(sock)

    def connect(self) -> socket.socket:
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
        return sock

    def close(self) -> None:
        """Close every kept-alive connection."""
        while self.free:
            self.free.pop().close()


class PendingPut:
    """A PUT sent on a connection of its own, its answer not read yet."""

    def __init__(self, client: LeanClient, data: bytes) -> None:
        self.client = client
        self.data = data
        self.sock: socket.socket | None = None
        self.reused = False
        self.error: BaseException | None = None

    def send(self) -> None:
        self.sock, self.reused = self.client.acquire()
        try:
            self.sock.sendall(self.data)
        except TimeoutError:
            self.drop()
            raise ReadTimeoutError(endpoint_url=self.client.endpoint) from None
        except OSError as exc:
            self.drop()
            raise ConnectionClosedError(endpoint_url=self.client.endpoint) from exc

    def result(self) -> str:
        """The ETag the server answered. A kept-alive connection that the server had closed
        meanwhile is retried once at once on a new one (the only blip handled here)."""
        try:
            if self.error is not None:
                raise self.error
            return self.receive()
        except (ConnectionClosedError, EndpointConnectionError):
            if not self.reused:
                raise
            self.error = None
            self.send()  # a fresh connection: reused is False now
            return self.receive()

    def receive(self) -> str:
        assert self.sock is not None
        try:
            answer = read_response(self.sock)
        except TimeoutError:
            self.drop()
            raise ReadTimeoutError(endpoint_url=self.client.endpoint) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.drop()
            raise ConnectionClosedError(endpoint_url=self.client.endpoint) from exc
        if answer.keep_alive:
            self.client.release(self.sock)
            self.sock = None
        else:
            self.drop()
        if answer.status == 200:
            return answer.headers.get("etag", "")
        raise client_error(answer, "PutObject")

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def client_error(answer: Answer, operation: str) -> ClientError:
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
        operation,
    )


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
