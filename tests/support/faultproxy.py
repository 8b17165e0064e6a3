"""A threaded TCP proxy that injects connection faults between a client and the local S3 server,
or relays HTTP as a provider with its quirks would answer (Backblaze B2, Cloudflare R2, opaque
ETags), and can record the request heads it receives."""

from __future__ import annotations

import contextlib
import hashlib
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any
from xml.sax.saxutils import escape

from httpwire import RequestHead, RequestTap, ResponseHead, parse_request_head, parse_response_head

# The provider modes relay HTTP request by request and answer some requests themselves.
PROVIDER_MODES = ("b2", "r2", "opaque-etag")
MODES = ("pass", "refuse", "reset", "503", *PROVIDER_MODES)
HOST = "127.0.0.1"
BUFSIZE = 65536
READ_TIMEOUT = 5.0  # how long a faulting handler waits for the client's request bytes
CONTINUE_WAIT = 1.0  # how long a relayed Expect: 100-continue waits for the server (as botocore)
MAX_HEADER = 64 * 1024
JOIN_TIMEOUT = 5.0
SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId></Error>"
)


def _close(sock: socket.socket, *, reset: bool = False) -> None:
    """Close a socket, waking any thread blocked on it; with `reset`, send RST instead of FIN."""
    with contextlib.suppress(OSError):
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _read_headers(sock: socket.socket) -> tuple[bytes, bytes]:
    """The request head up to the blank line, and whatever body bytes came with it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(BUFSIZE)
        if not chunk or len(data) > MAX_HEADER:
            raise ConnectionError("request head incomplete")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _read_exactly(sock: socket.socket, have: bytes, length: int) -> bytes:
    """Read until `length` body bytes (counting `have`) arrived; return any surplus."""
    while len(have) < length:
        chunk = sock.recv(BUFSIZE)
        if not chunk:
            raise ConnectionError("request body incomplete")
        have += chunk
    return have[length:]


def _read_chunked(sock: socket.socket, have: bytes) -> None:
    """Consume a chunked body up to the final zero-size chunk and its trailers."""
    while True:
        while b"\r\n" not in have:
            have += _recv_some(sock)
        size_line, _, have = have.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while not (have.startswith(b"\r\n") or b"\r\n\r\n" in have):
                have += _recv_some(sock)
            return
        while len(have) < size + 2:
            have += _recv_some(sock)
        have = have[size + 2 :]


def _recv_some(sock: socket.socket) -> bytes:
    chunk = sock.recv(BUFSIZE)
    if not chunk:
        raise ConnectionError("request body incomplete")
    return chunk


def _slow_down_response() -> bytes:
    head = (
        "HTTP/1.1 503 Slow Down\r\n"
        "Content-Type: application/xml\r\n"
        f"Content-Length: {len(SLOW_DOWN_BODY)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + SLOW_DOWN_BODY


# -- provider quirks -----------------------------------------------------------------------------
# What Backblaze B2 and Cloudflare R2 refuse where Amazon S3 accepts, from their documentation and
# the answers their users quote (each rule names its sources).


@dataclass(frozen=True)
class Refusal:
    """An S3 error answer the relay gives itself, the request never reaching the server."""

    status: int
    phrase: str
    code: str
    message: str

    def response(self, method: str) -> bytes:
        """The answer on the wire: an S3 error document (none after a HEAD), kept alive."""
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(self.code)}</Code><Message>{escape(self.message)}</Message>"
            "<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {self.status} {self.phrase}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("ascii") + (b"" if method == "HEAD" else body)


def _aws_chunked(head: RequestHead) -> bool:
    return head.has_token("content-encoding", "aws-chunked")


def b2_refusal(head: RequestHead) -> Refusal | None:
    """Backblaze B2's S3 API: no flexible checksums and no aws-chunked uploads, and the
    STANDARD storage class only.

    B2's "Unsupported Features" (https://www.backblaze.com/docs/cloud-storage-s3-compatible-api)
    and the answers quoted in pingvin-share#798, nocobase#6872 (x-amz-checksum-crc32),
    cyberduck#16107 (x-amz-checksum-sha256), home-assistant#143995 and synapse-s3#128
    (x-amz-sdk-checksum-algorithm on PutObject and UploadPart), xen-orchestra#8358
    (x-amz-checksum-mode): `400 InvalidArgument: Unsupported header '...' received for this API
    call.`"""
    for name, _ in head.headers:
        lower = name.lower()
        if lower.startswith("x-amz-checksum-") or lower in (
            "x-amz-sdk-checksum-algorithm",
            "x-amz-trailer",
        ):
            return _b2_unsupported(lower)
    if _aws_chunked(head):
        return _b2_unsupported("content-encoding")
    storage = head.header("x-amz-storage-class")
    if storage is not None and storage != "STANDARD":
        # The code and message as quoted in gobackup#155; the status is not quoted there: 400
        # as B2's other refusals of a request header (UNVERIFIED).
        return Refusal(
            400,
            "Bad Request",
            "NotImplemented",
            f"Backblaze only supports the 'STANDARD' storage class, and not {storage}",
        )
    return None


def _b2_unsupported(name: str) -> Refusal:
    return Refusal(
        400,
        "Bad Request",
        "InvalidArgument",
        f"Unsupported header '{name}' received for this API call.",
    )


def r2_refusal(head: RequestHead) -> Refusal | None:
    """Cloudflare R2: no object tagging, no SSE-S3/SSE-KMS headers, no aws-chunked or streaming
    SigV4 payloads; each answered `501 NotImplemented: Header '...' with value '...' not
    implemented`.

    R2's S3 API compatibility table (https://developers.cloudflare.com/r2/api/s3/api/) marks
    x-amz-tagging and x-amz-server-side-encryption as unimplemented on PutObject, CreateMultipart-
    Upload, UploadPart and CopyObject; the answers are quoted in yopass#3657 and open-webui#13547
    (x-amz-tagging), soto#643 (STREAMING-AWS4-HMAC-SHA256-PAYLOAD) and bitplatform#13362
    (STREAMING-UNSIGNED-PAYLOAD-TRAILER). SSE-C (x-amz-server-side-encryption-customer-*) is
    supported since 2024-12-03 and passes; so do x-amz-checksum-* headers, which the same table
    lists (SHA-1 and SHA-256 since 2023-06-16, CRC32 since about April 2025: R2 answered 501
    for it before, aws-sdk-js-v3#6810)."""
    for name, value in head.headers:
        lower = name.lower()
        sse = lower.startswith("x-amz-server-side-encryption") and "-customer-" not in lower
        streaming = lower == "x-amz-content-sha256" and value.startswith("STREAMING-")
        if lower == "x-amz-tagging" or sse or streaming:
            return _r2_not_implemented(lower, value)
    if _aws_chunked(head):
        return _r2_not_implemented("content-encoding", head.header("content-encoding") or "")
    return None


def _r2_not_implemented(name: str, value: str) -> Refusal:
    return Refusal(
        501,
        "Not Implemented",
        "NotImplemented",
        f"Header '{name}' with value '{value}' not implemented",
    )


QUIRKS: dict[str, Callable[[RequestHead], Refusal | None]] = {
    "b2": b2_refusal,
    "r2": r2_refusal,
    "opaque-etag": lambda head: None,
}


def opaque_etag(etag: str) -> str:
    """The opaque ETag the "opaque-etag" mode gives an object in place of `etag`: the same one
    every time (as a provider keeps one per object), never an MD5 of the bytes."""
    digest = hashlib.sha256(b"faultproxy:" + etag.strip('"').encode("latin-1")).hexdigest()
    return f'"opaque-{digest[:32]}"'


_ETAG_ELEMENT = re.compile(rb"<ETag>([^<]*)</ETag>")


def _query(target: str) -> set[str]:
    """The names of a request target's query parameters."""
    _, _, query = target.partition("?")
    return {part.partition("=")[0] for part in query.split("&") if part}


def _upload_part(head: RequestHead) -> bool:
    return head.method == "PUT" and {"partNumber", "uploadId"} <= _query(head.target)


def _complete_multipart(head: RequestHead) -> bool:
    return head.method == "POST" and "uploadId" in _query(head.target)


def _opaque_head(request: RequestHead, response: ResponseHead) -> ResponseHead:
    """The response head with every ETag made opaque (SeaweedFS's Seaweed-X-Amz-Etag too), but
    for UploadPart: the client hands part ETags back in CompleteMultipartUpload's signed body,
    which a relay cannot rewrite, so they stay as the server gave them."""
    if _upload_part(request):
        return response
    headers = tuple(
        (name, opaque_etag(value) if name.lower().endswith("etag") else value)
        for name, value in response.headers
    )
    return replace(response, headers=headers)


def opaque_body(body: bytes) -> bytes:
    """CompleteMultipartUpload's answer with its <ETag> made opaque."""

    def swap(match: re.Match[bytes]) -> bytes:
        real = match.group(1).decode("latin-1").replace("&quot;", '"').replace("&#34;", '"')
        return b"<ETag>" + escape(opaque_etag(real), {'"': "&quot;"}).encode("latin-1") + b"</ETag>"

    return _ETAG_ELEMENT.sub(swap, body)


class _Stream:
    """Buffered reads of HTTP framing from one side of a relayed connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(BUFSIZE)
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-message")
        self.buffer += chunk

    def head(self) -> bytes | None:
        """The next message head without its blank line; None if the peer closed between
        messages."""
        while True:
            while self.buffer.startswith(b"\r\n"):  # a stray empty line before a request
                del self.buffer[:2]
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end])
                del self.buffer[: end + 4]
                return head
            if len(self.buffer) > MAX_HEADER:
                raise ValueError("message head too long")
            chunk = self.sock.recv(BUFSIZE)
            if not chunk:
                if self.buffer:
                    raise ConnectionError("the peer closed the connection mid-head")
                return None
            self.buffer += chunk

    def line(self) -> bytes:
        """The next line with its CRLF."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            self._fill()
        found = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        return found

    def some(self, most: int) -> bytes:
        """Up to `most` bytes, at least one (ConnectionError at the end of the stream)."""
        if not self.buffer:
            self._fill()
        found = bytes(self.buffer[:most])
        del self.buffer[:most]
        return found

    def rest(self) -> bytes:
        """Everything up to the close."""
        with contextlib.suppress(ConnectionError):
            while True:
                self._fill()
        found = bytes(self.buffer)
        self.buffer.clear()
        return found


Sink = Callable[[bytes], Any]


def _copy_body(stream: _Stream, framing: int | str, sink: Sink) -> None:
    """Pass a message body on to `sink` as it comes, its framing kept: `framing` is its length,
    "chunked", or "close" (up to the end of the stream)."""
    if framing == "close":
        with contextlib.suppress(ConnectionError):
            while True:
                sink(stream.some(BUFSIZE))
        return
    if framing == "chunked":
        while True:
            size_line = stream.line()
            sink(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (trailer := stream.line()) != b"\r\n":
                    sink(trailer)
                sink(trailer)
                return
            _copy_length(stream, size + 2, sink)
    else:
        _copy_length(stream, int(framing), sink)


def _copy_length(stream: _Stream, length: int, sink: Sink) -> None:
    while length > 0:
        data = stream.some(min(length, BUFSIZE))
        sink(data)
        length -= len(data)


def _dechunk(raw: bytes) -> bytes:
    """The payload of a chunked body (trailers dropped)."""
    payload, rest = bytearray(), raw
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            return bytes(payload)
        payload += rest[:size]
        rest = rest[size + 2 :]


def _request_framing(head: RequestHead) -> int | str:
    return "chunked" if head.chunked else head.content_length or 0


def _response_framing(request: RequestHead, response: ResponseHead) -> int | str:
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    if response.chunked:
        return "chunked"
    length = response.content_length
    return "close" if length is None else length


def _send_opaque_complete(
    outbound: _Stream, client: socket.socket, response: ResponseHead, framing: int | str
) -> ResponseHead:
    """Relay CompleteMultipartUpload's answer with its <ETag> made opaque: read whole, sent
    with its new length."""
    parts: list[bytes] = []
    _copy_body(outbound, framing, parts.append)
    body = b"".join(parts)
    body = opaque_body(_dechunk(body) if framing == "chunked" else body)
    kept = tuple(
        (name, value)
        for name, value in response.headers
        if name.lower() not in ("content-length", "transfer-encoding")
    )
    response = replace(response, headers=(*kept, ("Content-Length", str(len(body)))))
    client.sendall(response.encode() + body)
    return response


def _closes(head: RequestHead | ResponseHead) -> bool:
    return head.has_token("connection", "close") or head.version == "HTTP/1.0"


class FaultProxy:
    """Forwards TCP to an upstream, or refuses, resets or answers 503, as `mode` says; or
    relays HTTP request by request as a provider would answer:

    - "b2": Backblaze B2 refuses flexible checksums, aws-chunked bodies and storage classes
      other than STANDARD with 400 (b2_refusal);
    - "r2": Cloudflare R2 refuses x-amz-tagging, SSE-S3/KMS headers and streaming payloads with
      501 NotImplemented (r2_refusal);
    - "opaque-etag": every answer's ETag (but UploadPart's) and CompleteMultipartUpload's
      <ETag> are an opaque value, never the MD5 of the bytes (as SSE-KMS and some providers),
      so the client cannot prove an object by its ETag (opaque_etag).

    A refused request's body is read and dropped, nothing is forwarded, and the connection
    stays open. With `record=True` the proxy keeps the head of every request it forwards
    (`received`), and in the provider modes of those it refused too: what the client sent,
    for headers a server accepts without storing. `refused` holds the refused ones always.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, record: bool = False) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.record = record
        self._received: list[RequestHead] = []
        self._by_connection: list[list[RequestHead]] = []  # pass mode: per client connection
        self._refused: list[RequestHead] = []
        self.port = 0
        self._mode = "pass"
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._live: set[socket.socket] = set()  # sockets of pass-through connections
        self._faulting: set[socket.socket] = set()  # clients being reset or answered 503
        self._threads: set[threading.Thread] = set()
        self._stopping = False
        self._connections = 0
        self._requests_faulted = 0
        self._acceptor: threading.Thread | None = None

    # -- public state -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The proxy's URL; the port stays the same for the proxy's whole life."""
        return f"http://{HOST}:{self.port}"

    @property
    def mode(self) -> str:
        """The current fault mode."""
        return self._mode

    @property
    def connections(self) -> int:
        """How many client connections were accepted."""
        with self._lock:
            return self._connections

    @property
    def requests_faulted(self) -> int:
        """How many requests were reset, answered 503 or refused by a provider mode."""
        with self._lock:
            return self._requests_faulted

    @property
    def received(self) -> list[RequestHead]:
        """With `record`, the heads of the requests forwarded so far (in the provider modes,
        refused ones too), oldest first.

        A head is recorded before its bytes are sent on, so once a response has come back
        its request is here.
        """
        with self._lock:
            return list(self._received)

    @property
    def received_by_connection(self) -> list[list[RequestHead]]:
        """With `record`, in pass mode: the heads forwarded so far, one list per client
        connection (in the order they were accepted)."""
        with self._lock:
            return [list(heads) for heads in self._by_connection]

    @property
    def refused(self) -> list[RequestHead]:
        """The heads of the requests a provider mode answered itself, oldest first."""
        with self._lock:
            return list(self._refused)

    def clear_received(self) -> None:
        """Forget the recorded and the refused heads."""
        with self._lock:
            self._received.clear()
            self._by_connection.clear()
            self._refused.clear()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind a port on loopback and start accepting."""
        with self._lock:
            self._listener = self._bind(0)
            self.port = self._listener.getsockname()[1]
            if self._mode == "refuse":
                self._close_listener()
        self._acceptor = self._spawn(self._accept_loop)

    def stop(self) -> None:
        """Close every socket and join the threads (within 5 s in all)."""
        with self._lock:
            self._stopping = True
            self._close_listener()
            self._cut_live()
            for sock in self._faulting:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._wake()
        deadline = time.monotonic() + JOIN_TIMEOUT
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def set_mode(self, mode: str) -> None:
        """Switch the fault mode; established pass-through connections are cut."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        with self._lock:
            self._mode = mode
            self._cut_live()
            if mode == "refuse":
                self._close_listener()
            elif self._listener is None and self.port and not self._stopping:
                self._listener = self._bind(self.port)
        self._wake()

    # -- listener -----------------------------------------------------------------------------

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(64)
        return sock

    def _close_listener(self) -> None:
        if self._listener is not None:
            _close(self._listener)  # shutdown() wakes a select() on it
            self._listener = None

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _accept_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                listener = self._listener
            watched = [self._wake_r] if listener is None else [self._wake_r, listener]
            try:
                ready, _, _ = select.select(watched, [], [])
            except (OSError, ValueError):
                continue  # the listener was closed under us: look again
            if self._wake_r in ready:
                self._wake_r.recv(BUFSIZE)
            if listener is not None and listener in ready:
                self._accept(listener)

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        with self._lock:
            self._connections += 1
            mode = "refuse" if self._stopping else self._mode
        handler = {"pass": self._pass, "reset": self._reset, "503": self._slow_down}.get(mode)
        if mode in QUIRKS:
            self._spawn(self._relay, client, QUIRKS[mode], mode == "opaque-etag")
            return
        if handler is None:  # accepted just before a switch to "refuse" or a stop
            _close(client, reset=True)
            return
        self._spawn(handler, client)

    def _spawn(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(target, *args), daemon=True)
        with self._lock:  # started under the lock: stop() never sees a thread it cannot join
            self._threads.add(thread)
            thread.start()
        return thread

    def _run(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _track(self, client: socket.socket, faulting: bool) -> None:
        with self._lock:
            if faulting:
                self._faulting.add(client)
            else:
                self._faulting.discard(client)

    # -- modes --------------------------------------------------------------------------------

    def _pass(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=READ_TIMEOUT)
        except OSError:
            _close(client, reset=True)
            return
        upstream.settimeout(None)
        with self._lock:
            self._live.update((client, upstream))
            stopping = self._stopping
        if not stopping:
            back = self._spawn(self._pump, upstream, client)
            if self.record:
                sink: list[RequestHead] = []
                with self._lock:
                    self._by_connection.append(sink)
                self._pump(client, upstream, RequestTap(), sink)
            else:
                self._pump(client, upstream)
            back.join()
        with self._lock:
            self._live.difference_update((client, upstream))
        _close(client)
        _close(upstream)

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        tap: RequestTap | None = None,
        sink: list[RequestHead] | None = None,
    ) -> None:
        try:
            while data := src.recv(BUFSIZE):
                if tap is not None and (heads := tap.feed(data)):
                    with self._lock:
                        self._received.extend(heads)
                        if sink is not None:
                            sink.extend(heads)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # one side broke: stop the other direction too
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _cut_live(self) -> None:
        for sock in self._live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _reset(self, client: socket.socket) -> None:
        self._track(client, True)
        client.settimeout(READ_TIMEOUT)
        with contextlib.suppress(OSError):
            client.recv(BUFSIZE)  # the start of the request
        self._count_fault()
        self._track(client, False)
        _close(client, reset=True)

    def _slow_down(self, client: socket.socket) -> None:
        self._track(client, True)
        client.settimeout(READ_TIMEOUT)
        try:
            self._read_request(client)
            self._count_fault()  # before the answer: a client that has it sees the count
            client.sendall(_slow_down_response())
            client.shutdown(socket.SHUT_WR)
            while client.recv(BUFSIZE):  # let the client close first, so no RST eats the answer
                pass
        except (OSError, ValueError):
            pass
        finally:
            self._track(client, False)
            client.close()

    def _read_request(self, client: socket.socket) -> None:
        head, rest = _read_headers(client)
        if (_header(head, b"expect") or b"").lower() == b"100-continue":
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = _header(head, b"content-length")
        if length is not None:
            _read_exactly(client, rest, int(length))
        elif b"chunked" in (_header(head, b"transfer-encoding") or b"").lower():
            _read_chunked(client, rest)

    def _count_fault(self) -> None:
        with self._lock:
            self._requests_faulted += 1

    # -- provider modes: HTTP relayed request by request ----------------------------------------

    def _relay(
        self,
        client: socket.socket,
        refusal: Callable[[RequestHead], Refusal | None],
        opaque: bool,
    ) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=READ_TIMEOUT)
        except OSError:
            _close(client, reset=True)
            return
        upstream.settimeout(None)
        with self._lock:
            self._live.update((client, upstream))
            stopping = self._stopping
        try:
            inbound, outbound = _Stream(client), _Stream(upstream)
            while not stopping and self._exchange(inbound, outbound, refusal, opaque):
                pass
        except (OSError, ValueError):  # either side broke or spoke something else: hang up
            pass
        finally:
            with self._lock:
                self._live.difference_update((client, upstream))
            _close(client)
            _close(upstream)

    def _exchange(
        self,
        inbound: _Stream,
        outbound: _Stream,
        refusal: Callable[[RequestHead], Refusal | None],
        opaque: bool,
    ) -> bool:
        """Relay one request and its answer, or refuse it; False when the connection ends."""
        raw = inbound.head()
        if raw is None:
            return False
        request = parse_request_head(raw)
        refused = refusal(request)
        with self._lock:
            if self.record:
                self._received.append(request)
            if refused is not None:
                self._refused.append(request)
                self._requests_faulted += 1
        client, upstream = inbound.sock, outbound.sock
        if refused is not None:
            if request.has_token("expect", "100-continue"):
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            _copy_body(inbound, _request_framing(request), lambda data: None)
            client.sendall(refused.response(request.method))
            return not _closes(request)
        upstream.sendall(raw + b"\r\n\r\n")
        if request.has_token("expect", "100-continue") and not self._continue(
            request, outbound, client, opaque
        ):
            return False  # the server answered before the body: whether it follows is unsure
        _copy_body(inbound, _request_framing(request), upstream.sendall)
        response = self._answer(request, outbound, client, opaque)
        ended = _response_framing(request, response) == "close"  # its body ended at the close
        return not (ended or _closes(request) or _closes(response))

    def _continue(
        self, request: RequestHead, outbound: _Stream, client: socket.socket, opaque: bool
    ) -> bool:
        """After an Expect: 100-continue head: relay the server's 100 and say the body may
        follow (also when the server says nothing within a second, as clients do); or relay
        its final answer and say so (False)."""
        if not outbound.buffer:
            ready, _, _ = select.select([outbound.sock], [], [], CONTINUE_WAIT)
            if not ready:
                return True
        raw = outbound.head()
        if raw is None:
            raise ConnectionError("the server closed the connection")
        response = parse_response_head(raw)
        if 100 <= response.status < 200:
            client.sendall(raw + b"\r\n\r\n")
            return True
        self._answer(request, outbound, client, opaque, response)
        return False

    def _answer(
        self,
        request: RequestHead,
        outbound: _Stream,
        client: socket.socket,
        opaque: bool,
        response: ResponseHead | None = None,
    ) -> ResponseHead:
        """Relay the server's answer to `request` (interim 1xx answers first), its ETags made
        opaque with `opaque`; the final head."""
        while response is None:
            raw = outbound.head()
            if raw is None:
                raise ConnectionError("the server closed the connection")
            head = parse_response_head(raw)
            if 100 <= head.status < 200:
                client.sendall(raw + b"\r\n\r\n")
            else:
                response = head
        framing = _response_framing(request, response)
        if opaque:
            response = _opaque_head(request, response)
            if _complete_multipart(request) and framing != 0:
                return _send_opaque_complete(outbound, client, response, framing)
        client.sendall(response.encode())
        _copy_body(outbound, framing, client.sendall)
        return response
