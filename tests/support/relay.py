"""A TCP relay in front of a server, optionally speaking TLS to its clients with a certificate
that can be swapped while it runs (an expired one, one for another host, a good one), and
listening on any address (::1 for an IPv6 endpoint)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from types import TracebackType

from tlsca import CertFiles

BUFSIZE = 65536


class Relay:
    """Accepts on listen_host (a random port), relays every connection to backend. With
    `cert`, the client side is TLS with that certificate; use_cert() swaps it for new
    connections, and drop_all() cuts the ones open (kept-alive clients reconnect)."""

    def __init__(
        self,
        backend: tuple[str, int],
        listen_host: str = "127.0.0.1",
        cert: CertFiles | None = None,
    ) -> None:
        self.backend = backend
        family = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((listen_host, 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.context: ssl.SSLContext | None = None
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.stopping = False
        self.handshakes_failed = 0
        self.flip: bytes | None = None  # flip one body byte of the next request holding this
        self.flipped = 0
        self.sent = 0  # bytes relayed from clients to the server
        if cert is not None:
            self.use_cert(cert)
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def use_cert(self, cert: CertFiles) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert.cert, cert.key)
        with self.lock:
            self.context = context

    def flip_once(self, marker: bytes) -> None:
        """Flip one byte in the body of the next request whose head holds `marker` (say
        b"partNumber=1&"), as a link that corrupts one bit in flight would."""
        with self.lock:
            self.flip = marker

    def drop_all(self) -> None:
        with self.lock:
            doomed, self.open = self.open, set()
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def start(self) -> Relay:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.drop_all()
        self.thread.join(5)

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self.lock:
            context = self.context
        try:
            if context is not None:
                client.settimeout(10)
                client = context.wrap_socket(client, server_side=True)
                client.settimeout(None)
            upstream = socket.create_connection(self.backend, timeout=10)
            upstream.settimeout(None)
        except (OSError, ssl.SSLError):
            self.handshakes_failed += 1
            client.close()
            return
        with self.lock:
            self.open.update((client, upstream))
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream, self)


def _pump(src: socket.socket, dst: socket.socket, relay: Relay | None = None) -> None:
    seen = b""  # the stream so far, kept while a flip waits for its request's body
    try:
        while chunk := src.recv(BUFSIZE):
            if relay is not None:
                if relay.flip is not None:
                    seen += chunk
                    chunk, seen = _flipped(relay, seen, len(chunk))
                with relay.lock:
                    relay.sent += len(chunk)
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _flipped(relay: Relay, seen: bytes, fresh: int) -> tuple[bytes, bytes]:
    """The fresh bytes to send (one of them flipped once the marked request's body is in), and
    what to keep of the stream for the next chunk."""
    marker = relay.flip
    assert marker is not None
    start = seen.find(marker)
    if start < 0:
        return seen[-fresh:], seen[-len(marker) :]
    body = seen.find(b"\r\n\r\n", start)
    target = body + 4 + 100 if body >= 0 else -1
    if target < 0 or target >= len(seen):
        return seen[-fresh:], seen  # the body's 101st byte has not come yet
    with relay.lock:
        relay.flip = None
        relay.flipped += 1
    changed = seen[:target] + bytes([seen[target] ^ 0x01]) + seen[target + 1 :]
    return changed[-fresh:], b""
