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
        if cert is not None:
            self.use_cert(cert)
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def use_cert(self, cert: CertFiles) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert.cert, cert.key)
        with self.lock:
            self.context = context

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
        _pump(client, upstream)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(BUFSIZE):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
