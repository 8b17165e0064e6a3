"""A real HTTP/1.1 forward proxy on 127.0.0.1 for the tests, run on an event loop in a thread.

CONNECT tunnels (https) and absolute-form requests (http); optional Basic proxy authentication;
a `hosts` map of names that resolve only inside the proxy (other names it does not look up,
so nothing it carries leaves this machine); a log of what it carried; tinyproxy's way with
`Expect: 100-continue`; a mode that refuses CONNECT; and TLS terminated by the proxy itself
for the names in `terminate`, relayed as plain HTTP to a mapped backend.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import re
import ssl
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from urllib.parse import quote, urlsplit

from httpwire import RequestHead, ResponseHead, parse_request_head, parse_response_head
from tlsca import CertAuthority

HOST = "127.0.0.1"
BUFSIZE = 65536
MAX_HEAD = 64 * 1024
CONNECT_TIMEOUT = 5.0
START_TIMEOUT = 10.0
JOIN_TIMEOUT = 5.0
REALM = "flood-test-proxy"
PROXY_ONLY = frozenset({"proxy-authorization", "proxy-connection"})  # never sent upstream
NO_BODY = frozenset({204, 304})
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
# What ends one client connection without taking the proxy down: a peer went away or sent
# something that is not HTTP, or a client refused the certificate of a terminated tunnel.
DROPPED = (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)

Address = tuple[str, int]


class Carry(StrEnum):
    """How a request reached the proxy."""

    CONNECT = "connect"  # a CONNECT request for a tunnel
    HTTP = "http"  # an absolute-form request (`PUT http://host:port/path HTTP/1.1`)
    TLS = "tls"  # a request read inside a tunnel whose TLS the proxy terminated


@dataclass(frozen=True)
class Carried:
    """One request the proxy was asked to carry, and what became of it."""

    kind: Carry
    request: RequestHead  # as the client sent it; a TLS request's target is its https:// URL
    status: int  # the proxy's answer to a CONNECT, or the final status relayed for a request
    upstream: Address | None  # where it went; None when it went nowhere
    continued: bool = False  # whether a 100 Continue reached the client

    @property
    def method(self) -> str:
        """The request's method."""
        return self.request.method

    @property
    def target(self) -> str:
        """host:port for a CONNECT, the full URL for a request."""
        return self.request.target

    def header(self, name: str) -> str | None:
        """The first value of request header `name` (case-insensitive), or None."""
        return self.request.header(name)


def _lookup(table: Mapping[str, Address], host: str) -> Address | None:
    """The address `host` maps to: an exact name, or `*.suffix` for any name under suffix."""
    name = host.lower().rstrip(".")
    if name in table:
        return table[name]
    return next(
        (addr for pat, addr in table.items() if pat.startswith("*.") and name.endswith(pat[1:])),
        None,
    )


def _authority(target: str) -> Address:
    """host and port of a CONNECT target (`host:port`, `[::1]:port`)."""
    parts = urlsplit(f"//{target}")
    if not parts.hostname or parts.port is None:
        raise ValueError(f"CONNECT target is not host:port: {target!r}")
    return parts.hostname, parts.port


async def _read_request(reader: asyncio.StreamReader) -> RequestHead | None:
    """The next request head, or None at a clean end of the stream."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise
    return parse_request_head(data[:-4].lstrip(b"\r\n"))


async def _read_response(reader: asyncio.StreamReader) -> ResponseHead:
    return parse_response_head((await reader.readuntil(b"\r\n\r\n"))[:-4])


async def _copy_length(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    length: int,
    done: Callable[[], None] | None = None,
) -> None:
    """Copy `length` bytes; `done` is called once the last of them is handed on."""
    while length:
        data = await src.read(min(length, BUFSIZE))
        if not data:
            raise asyncio.IncompleteReadError(b"", length)
        length -= len(data)
        dst.write(data)
        if not length and done is not None:
            done()
        await dst.drain()
    if done is not None:
        done()


async def _copy_chunked(
    src: asyncio.StreamReader, dst: asyncio.StreamWriter, done: Callable[[], None] | None = None
) -> None:
    """Copy a chunked body up to its last chunk and trailers, as they are."""
    while True:
        line = await src.readuntil(b"\r\n")
        dst.write(line)
        size = int(line.split(b";")[0].strip(), 16)
        if not size:
            break
        await _copy_length(src, dst, size + 2)
    while (line := await src.readuntil(b"\r\n")) != b"\r\n":
        dst.write(line)
    dst.write(line)
    if done is not None:
        done()
    await dst.drain()


async def _copy_until_eof(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    while data := await src.read(BUFSIZE):
        dst.write(data)
        await dst.drain()
    if dst.can_write_eof():
        with contextlib.suppress(OSError):
            dst.write_eof()


async def _both(*jobs: Awaitable[None]) -> None:
    """Run the jobs together; when one fails or the caller is cancelled, cancel the others."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _closed(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection and wait (briefly) until its socket is closed."""
    if writer is None:
        return
    writer.close()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(writer.wait_closed(), JOIN_TIMEOUT)


def _settle(task: asyncio.Task[None]) -> None:
    """Cancel a task still running, or collect the exception of one that failed."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


class _RequestBody:
    """Copies one request body from the client to the upstream, by the request's framing."""

    def __init__(
        self, head: RequestHead, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        self._head, self._src, self._dst = head, src, dst
        self.complete = False  # every byte of the body was read and handed on

    async def run(self) -> None:
        if self._head.chunked:
            await _copy_chunked(self._src, self._dst, self._done)
        else:
            await _copy_length(self._src, self._dst, self._head.content_length or 0, self._done)

    def _done(self) -> None:
        self.complete = True


class _Upstream:
    """The one kept-alive upstream connection of a client connection."""

    def __init__(self) -> None:
        self.address: Address | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self, address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.writer is not None and (
            self.address != address or self.writer.is_closing() or self._at_eof()
        ):
            self.drop()
        if self.reader is None or self.writer is None:
            connecting = asyncio.open_connection(*address, limit=MAX_HEAD)
            self.reader, self.writer = await asyncio.wait_for(connecting, CONNECT_TIMEOUT)
            self.address = address
        return self.reader, self.writer

    def _at_eof(self) -> bool:
        return self.reader is not None and self.reader.at_eof()

    def drop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.address = self.reader = self.writer = None


class ForwardProxy:
    """An HTTP/1.1 forward proxy on 127.0.0.1 (a random port), owned by this process.

    hosts: names (or `*.suffix`) that resolve inside the proxy only, to an address and port;
        other names are not looked up (502), loopback IPs and `localhost` are reached as given.
    auth: (user, password) for Basic proxy authentication; without it, 407.
    relay_continue: False to behave like tinyproxy: `Expect: 100-continue` goes upstream but
        the server's 100 Continue does not come back, so the client waits out its own timeout.
    refuse_connect: answer every CONNECT with 403.
    terminate: names (or `*.suffix`) whose CONNECT tunnels the proxy ends itself: it answers
        200, takes the TLS handshake with a certificate from `ca` for the SNI name, and relays
        the plain HTTP to the mapped plain-HTTP backend.
    regions: bucket -> the AWS region it lives in; a terminated request for it addressed to
        another region's host is answered as S3 answers it: 301 PermanentRedirect with the
        bucket's region in x-amz-bucket-region.
    faults: a path's end (`/bucket/key`), or `METHOD text` (requests of that method whose target
        holds the text) -> an HTTP status the proxy answers instead of the server (503 as
        SlowDown; 200 with an error body, as S3 answers a Complete that failed), as a server
        failing one key while others succeed would.
    `relay_continue`, `refuse_connect` and `faults` may be changed while the proxy runs.
    """

    def __init__(
        self,
        *,
        hosts: Mapping[str, Address] | None = None,
        auth: tuple[str, str] | None = None,
        relay_continue: bool = True,
        refuse_connect: bool = False,
        terminate: Mapping[str, Address] | None = None,
        ca: CertAuthority | None = None,
        regions: Mapping[str, str] | None = None,
        faults: Mapping[str, int] | None = None,
    ) -> None:
        if terminate and ca is None:
            raise ValueError("terminate= needs ca= to issue the certificates")
        self.hosts = {name.lower(): addr for name, addr in (hosts or {}).items()}
        self.terminate = {name.lower(): addr for name, addr in (terminate or {}).items()}
        self.regions = dict(regions or {})
        self.faults = dict(faults or {})
        self.auth = auth
        self.relay_continue = relay_continue
        self.refuse_connect = refuse_connect
        self.port = 0
        self._ca = ca
        self._lock = threading.Lock()
        self._log: list[Carried] = []
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # -- public state -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The proxy URL for clients, with the credentials in it when auth is on."""
        userinfo = ""
        if self.auth is not None:
            userinfo = f"{quote(self.auth[0], safe='')}:{quote(self.auth[1], safe='')}@"
        return f"http://{userinfo}{HOST}:{self.port}"

    def proxies(self) -> dict[str, str]:
        """The proxy for both schemes, as botocore's `Config(proxies=...)` takes it."""
        return {"http": self.url, "https": self.url}

    @property
    def log(self) -> list[Carried]:
        """What the proxy was asked to carry, oldest first; an entry is written before the
        answer it describes is sent, so once a client has its answer the entry is here."""
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        """Forget what was logged so far."""
        with self._lock:
            self._log.clear()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on a free port of 127.0.0.1 and serve from a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="forward-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("forward proxy did not start in time")
        if self._failed is not None:
            raise RuntimeError("forward proxy failed to start") from self._failed

    def stop(self) -> None:
        """Close the listener and every connection, and join the thread (within 5 s)."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)

    def __enter__(self) -> ForwardProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start(); nothing else would see it
            self._failed = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, HOST, 0, limit=MAX_HEAD)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        # Stop accepting, let accepts under way finish, then close: Python 3.11's Server.close()
        # strands a connection whose accept is still under way, open and without a handler.
        for sock in server.sockets:
            self._loop.remove_reader(sock.fileno())
        await self._wind_down()
        server.close()
        await server.wait_closed()

    async def _wind_down(self) -> None:
        """Cancel every connection's handler, including those of connections whose accepting
        was still under way (asyncio's own tasks, which finish by themselves)."""
        loop, me = asyncio.get_running_loop(), asyncio.current_task()
        deadline = loop.time() + JOIN_TIMEOUT
        while (others := asyncio.all_tasks() - {me}) and loop.time() < deadline:
            for task in others & self._tasks:
                task.cancel()
            await asyncio.wait(others, timeout=0.05)

    # -- one client connection ----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream = _Upstream()
        try:
            await self._serve(reader, writer, upstream)
        except DROPPED:
            pass
        except asyncio.CancelledError:
            pass  # the proxy is stopping
        finally:
            await _closed(upstream.writer)
            upstream.drop()
            await _closed(writer)
            self._tasks.discard(task)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: _Upstream
    ) -> None:
        while (head := await _read_request(reader)) is not None:
            if not self._authorized(head):
                kind = Carry.CONNECT if head.method == "CONNECT" else Carry.HTTP
                self._record(Carried(kind, head, 407, None))
                challenge = ("Proxy-Authenticate", f'Basic realm="{REALM}"')
                await _answer(writer, 407, "Proxy Authentication Required", challenge)
                return
            if head.method == "CONNECT":
                await self._connect(head, reader, writer)
                return
            if not await self._absolute(head, reader, writer, upstream):
                return

    def _authorized(self, head: RequestHead) -> bool:
        if self.auth is None:
            return True
        scheme, _, token = (head.header("proxy-authorization") or "").partition(" ")
        expected = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        return scheme.lower() == "basic" and token.strip() == expected

    def _route(self, host: str, port: int) -> Address | None:
        mapped = _lookup(self.hosts, host)
        if mapped is not None:
            return mapped
        if host.lower() == "localhost":
            return HOST, port
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None  # a name the proxy does not map is never looked up
        return (host, port) if address.is_loopback else None

    def _record(self, entry: Carried) -> None:
        with self._lock:
            self._log.append(entry)

    # -- CONNECT ------------------------------------------------------------------------------

    async def _connect(
        self, head: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, port = _authority(head.target)
        if self.refuse_connect:
            self._record(Carried(Carry.CONNECT, head, 403, None))
            await _answer(writer, 403, "Forbidden")
            return
        backend = _lookup(self.terminate, host)
        if backend is not None:
            self._record(Carried(Carry.CONNECT, head, 200, backend))
            writer.write(ESTABLISHED)
            await writer.start_tls(self._context_for(host))
            authority = host if port == 443 else f"{host}:{port}"
            await self._serve_terminated(reader, writer, backend, authority)
            return
        route = self._route(host, port)
        if route is None:
            self._record(Carried(Carry.CONNECT, head, 502, None))
            await _answer(writer, 502, "Bad Gateway", body=f"{host} is not mapped here")
            return
        try:
            connecting = asyncio.open_connection(*route)
            up_reader, up_writer = await asyncio.wait_for(connecting, CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            self._record(Carried(Carry.CONNECT, head, 502, route))
            await _answer(writer, 502, "Bad Gateway", body=f"cannot connect to {route}")
            return
        self._record(Carried(Carry.CONNECT, head, 200, route))
        try:
            writer.write(ESTABLISHED)
            await _both(_copy_until_eof(reader, up_writer), _copy_until_eof(up_reader, writer))
        finally:
            up_writer.close()

    async def _serve_terminated(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        backend: Address,
        authority: str,
    ) -> None:
        upstream = _Upstream()
        try:
            while (head := await _read_request(reader)) is not None:
                url = f"https://{authority}{head.target}"
                logged = dataclasses.replace(head, target=url)
                region = self._elsewhere(authority, head.target)
                if region is not None:
                    await self._redirect(head, reader, writer, logged, region)
                    return
                exchange = _Exchange(self, head, reader, writer, upstream)
                if not await exchange.run(backend, head.target, Carry.TLS, logged):
                    return
        finally:
            upstream.drop()

    def _fault(self, method: str, target: str) -> int | None:
        """The status a fault asks for this request: a key is a path's end (`/bucket/key`), or
        `METHOD text` for requests of that method whose target holds the text."""
        for key, status in list(self.faults.items()):
            wanted, space, text = key.partition(" ")
            if space and method == wanted and text in target:
                return status
            if not space and target.split("?")[0].endswith(key):
                return status
        return None

    def _elsewhere(self, authority: str, target: str) -> str | None:
        """The bucket's own region when this request went to another region's host."""
        host = authority.split(":")[0].lower()
        match = re.match(
            r"^(?:(?P<vhost>[^.]+)\.)?s3\.(?P<region>[a-z0-9-]+)\.amazonaws\.com$", host
        )
        if match is None:
            return None
        bucket = match.group("vhost") or target.lstrip("/").split("/")[0].split("?")[0]
        wanted = self.regions.get(bucket)
        return wanted if wanted is not None and wanted != match.group("region") else None

    async def _redirect(
        self,
        head: RequestHead,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        logged: RequestHead,
        region: str,
    ) -> None:
        length = int(head.header("content-length") or 0)
        if length and head.header("expect") is None:
            await reader.readexactly(length)  # read it: closing on unread bytes would reset
        self._record(Carried(Carry.TLS, logged, 301, None))
        body = (
            "<?xml version='1.0' encoding='UTF-8'?><Error><Code>PermanentRedirect</Code>"
            "<Message>The bucket you are attempting to access must be addressed using the "
            "specified endpoint.</Message></Error>"
        )
        await _answer(
            writer,
            301,
            "Moved Permanently",
            ("x-amz-bucket-region", region),
            body=body,
        )

    def _context_for(self, name: str) -> ssl.SSLContext:
        """A server context with a certificate for `name`, switching by SNI to other names."""
        with self._lock:
            context = self._contexts.get(name)
        if context is None:
            assert self._ca is not None
            context = self._ca.server_context(self._ca.issue(name))
            context.sni_callback = self._by_sni
            with self._lock:
                context = self._contexts.setdefault(name, context)
        return context

    def _by_sni(self, conn: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        if name and _lookup(self.terminate, name) is not None:
            conn.context = self._context_for(name)

    # -- absolute-form requests ---------------------------------------------------------------

    async def _absolute(
        self,
        head: RequestHead,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: _Upstream,
    ) -> bool:
        url = urlsplit(head.target)
        if url.scheme != "http" or not url.hostname:
            self._record(Carried(Carry.HTTP, head, 400, None))
            await _answer(writer, 400, "Bad Request", body="expected an absolute http:// URL")
            return False
        route = self._route(url.hostname, url.port or 80)
        if route is None:
            self._record(Carried(Carry.HTTP, head, 502, None))
            await _answer(writer, 502, "Bad Gateway", body=f"{url.hostname} is not mapped here")
            return False
        origin = (url.path or "/") + (f"?{url.query}" if url.query else "")
        status = self._fault(head.method, origin)
        if status is not None:
            length = int(head.header("content-length") or 0)
            if length:
                await reader.readexactly(length)
            self._record(Carried(Carry.HTTP, head, status, None))
            code = "SlowDown" if status == 503 else "InternalError"  # 200: S3's error in a 200
            await _answer(
                writer,
                status,
                "Fault",
                body=f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>fault</Message>"
                "</Error>",
            )
            return False
        return await _Exchange(self, head, reader, writer, upstream).run(
            route, origin, Carry.HTTP, head
        )


class _Exchange:
    """One request relayed upstream and its answer relayed back, 100-continue included."""

    def __init__(
        self,
        proxy: ForwardProxy,
        head: RequestHead,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: _Upstream,
    ) -> None:
        self.proxy, self.head, self.reader, self.writer = proxy, head, reader, writer
        self.upstream = upstream

    async def run(self, route: Address, origin: str, kind: Carry, logged: RequestHead) -> bool:
        """Relay the exchange; whether the client connection may carry another request."""
        try:
            up_reader, up_writer = await self.upstream.connect(route)
        except (OSError, TimeoutError):
            self.proxy._record(Carried(kind, logged, 502, route))
            await _answer(self.writer, 502, "Bad Gateway", body=f"cannot connect to {route}")
            return False
        headers = tuple((k, v) for k, v in self.head.headers if k.lower() not in PROXY_ONLY)
        up_writer.write(dataclasses.replace(self.head, target=origin, headers=headers).encode())
        body = _RequestBody(self.head, self.reader, up_writer)
        sending = asyncio.ensure_future(body.run())
        try:
            response, continued = await self._final_response(up_reader)
            self.proxy._record(Carried(kind, logged, response.status, route, continued))
            self.writer.write(response.encode())
            until_eof = await self._response_body(response, up_reader)
        finally:
            if not body.complete:
                _settle(sending)
        if not body.complete:  # a final answer came before the client sent its body
            self.upstream.drop()
            return False
        await sending
        if until_eof or response.has_token("connection", "close"):
            self.upstream.drop()
            return False
        return self.head.version == "HTTP/1.1" and not self.head.has_token("connection", "close")

    async def _final_response(self, up_reader: asyncio.StreamReader) -> tuple[ResponseHead, bool]:
        continued = False
        while (response := await _read_response(up_reader)).status < 200:
            if self.proxy.relay_continue:  # tinyproxy drops the server's 100 Continue
                self.writer.write(response.encode())
                await self.writer.drain()
                continued = continued or response.status == 100
        return response, continued

    async def _response_body(self, response: ResponseHead, up_reader: asyncio.StreamReader) -> bool:
        """Relay the response body; True when it ran to the end of the connection."""
        if self.head.method == "HEAD" or response.status in NO_BODY:
            await self.writer.drain()
            return False
        if response.chunked:
            await _copy_chunked(up_reader, self.writer)
            return False
        length = response.content_length
        if length is not None:
            await _copy_length(up_reader, self.writer, length)
            return False
        await _copy_until_eof(up_reader, self.writer)
        return True


async def _answer(
    writer: asyncio.StreamWriter,
    status: int,
    reason: str,
    *headers: tuple[str, str],
    body: str = "",
) -> None:
    """The proxy's own answer, after which it closes the connection."""
    payload = (body or f"{status} {reason}").encode() + b"\n"
    head = ResponseHead(
        version="HTTP/1.1",
        status=status,
        reason=reason,
        headers=(
            *headers,
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(payload))),
            ("Connection", "close"),
        ),
    )
    writer.write(head.encode() + payload)
    await writer.drain()
