"""HTTP/1.1 message heads as the test proxies see them: parsing, framing, and a tap that finds
each request head in a relayed byte stream."""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD = 64 * 1024


class _Headers:
    """Header look-ups shared by request and response heads."""

    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    def has_token(self, name: str, token: str) -> bool:
        """Whether header `name` lists `token` (case-insensitive, comma-separated)."""
        values = (value for key, value in self.headers if key.lower() == name.lower())
        return any(token.lower() == t.strip().lower() for v in values for t in v.split(","))

    @property
    def chunked(self) -> bool:
        """Whether the body comes in chunks (Transfer-Encoding: chunked)."""
        return self.has_token("transfer-encoding", "chunked")

    @property
    def content_length(self) -> int | None:
        """The Content-Length, or None when there is none."""
        value = self.header("content-length")
        if value is None:
            return None
        length = int(value)
        if length < 0:
            raise ValueError(f"negative Content-Length {value!r}")
        return length

    def _encode(self, first_line: str) -> bytes:
        lines = [first_line, *(f"{key}: {value}" for key, value in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class RequestHead(_Headers):
    """A request line and its headers, as they came (names keep their case, order is kept)."""

    method: str
    target: str  # origin-form path, absolute-form URL, or CONNECT's host:port
    version: str
    headers: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        """The head as bytes on the wire, with the blank line that ends it."""
        return self._encode(f"{self.method} {self.target} {self.version}")


@dataclass(frozen=True)
class ResponseHead(_Headers):
    """A status line and its headers."""

    version: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def encode(self) -> bytes:
        """The head as bytes on the wire, with the blank line that ends it."""
        return self._encode(f"{self.version} {self.status} {self.reason}")


def _parse_headers(lines: list[str]) -> tuple[tuple[str, str], ...]:
    headers = []
    for line in lines:
        key, sep, value = line.partition(":")
        if not sep or not key or key != key.strip():
            raise ValueError(f"not a header line: {line[:80]!r}")
        headers.append((key, value.strip()))
    return tuple(headers)


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request head (without the blank line after it); ValueError if it is malformed."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"not a request line: {request_line[:80]!r}")
    return RequestHead(
        method=parts[0], target=parts[1], version=parts[2], headers=_parse_headers(lines)
    )


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a response head (without the blank line after it); ValueError if it is malformed."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"not a status line: {status_line[:80]!r}")
    return ResponseHead(
        version=version, status=int(code), reason=reason, headers=_parse_headers(lines)
    )


class RequestTap:
    """Follows the bytes a client sends to a server and returns each request head in them.

    Bodies are skipped by Content-Length or chunked framing; heads that arrive pipelined or a
    byte at a time are found alike. On bytes that are not HTTP the tap goes quiet for good.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._state = "head"  # head | body | chunk-size | chunk-data | trailers
        self._remaining = 0
        self.broken = False

    def feed(self, data: bytes) -> list[RequestHead]:
        """Take the next bytes of the stream; return the request heads they completed."""
        if self.broken:
            return []
        self._buffer += data
        heads: list[RequestHead] = []
        try:
            while self._step(heads):
                pass
        except ValueError:
            self.broken = True
            self._buffer.clear()
        return heads

    def _step(self, heads: list[RequestHead]) -> bool:
        """Advance one state; False when more bytes are needed."""
        buf = self._buffer
        if self._state in ("body", "chunk-data"):
            taken = min(self._remaining, len(buf))
            del buf[:taken]
            self._remaining -= taken
            if self._remaining:
                return False
            self._state = "head" if self._state == "body" else "chunk-size"
            return True
        if self._state == "trailers":
            if buf.startswith(b"\r\n"):
                del buf[:2]
            else:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return False
                del buf[: end + 4]
            self._state = "head"
            return True
        if self._state == "chunk-size":
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(buf[:end]).split(b";")[0].strip(), 16)
            del buf[: end + 2]
            self._state, self._remaining = ("chunk-data", size + 2) if size else ("trailers", 0)
            return True
        while buf.startswith(b"\r\n"):  # a stray empty line before a request is allowed
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise ValueError("request head too long")
            return False
        head = parse_request_head(bytes(buf[:end]))
        del buf[: end + 4]
        heads.append(head)
        if head.chunked:
            self._state = "chunk-size"
        elif head.content_length:
            self._state, self._remaining = "body", head.content_length
        return True
