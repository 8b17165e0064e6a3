"""A threaded TCP proxy that injects connection faults between a client and the local S3 server,
and can record the request heads it forwards."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType

from httpwire import RequestHead, RequestTap

MODES = ("pass", "refuse", "reset", "503")
HOST = "127.0.0.1"
BUFSIZE = 65536
READ_TIMEOUT = 5.0  # how long a faulting handler waits for the client's request bytes
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


class FaultProxy:
    """Forwards TCP to an upstream, or refuses, resets or answers 503, as `mode` says.

    With `record=True` it also keeps the head of every request it forwards (`received`): what
    the server was sent, for headers a server accepts without storing.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, record: bool = False) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.record = record
        self._received: list[RequestHead] = []
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
        """How many requests were reset or answered 503."""
        with self._lock:
            return self._requests_faulted

    @property
    def received(self) -> list[RequestHead]:
        """With `record`, the heads of the requests forwarded so far, oldest first.

        A head is recorded before its bytes are sent on, so once a response has come back
        its request is here.
        """
        with self._lock:
            return list(self._received)

    def clear_received(self) -> None:
        """Forget the recorded heads."""
        with self._lock:
            self._received.clear()

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
        if handler is None:  # accepted just before a switch to "refuse" or a stop
            _close(client, reset=True)
            return
        self._spawn(handler, client)

    def _spawn(self, target: Callable[..., None], *args: socket.socket) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(target, *args), daemon=True)
        with self._lock:  # started under the lock: stop() never sees a thread it cannot join
            self._threads.add(thread)
            thread.start()
        return thread

    def _run(self, target: Callable[..., None], *args: socket.socket) -> None:
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
            self._pump(client, upstream, RequestTap() if self.record else None)
            back.join()
        with self._lock:
            self._live.difference_update((client, upstream))
        _close(client)
        _close(upstream)

    def _pump(self, src: socket.socket, dst: socket.socket, tap: RequestTap | None = None) -> None:
        try:
            while data := src.recv(BUFSIZE):
                if tap is not None and (heads := tap.feed(data)):
                    with self._lock:
                        self._received.extend(heads)
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
