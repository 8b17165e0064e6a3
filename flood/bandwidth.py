"""A profile's bandwidth limit: one token bucket in shared memory for all of its uploaders, so
what an idle uploader does not use another may (not a per-process share of the limit)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

CHUNK = 64 * 1024  # bytes taken at a time: a waiting sender never holds more than this


class Bandwidth:
    """Bytes per second for every process holding it (made by the arbiter, handed to each
    uploader of the profile). Bursts are at most one second of the limit; a sender that takes
    more than there is waits its turn (the bucket goes into debt, so turns are fair)."""

    def __init__(self, rate: float, ctx: Any) -> None:
        self.rate = float(rate)
        self.burst = self.rate  # one second of the limit
        self.state = ctx.RawArray("d", [self.burst, time.monotonic()])  # tokens, last refill
        self.lock = ctx.Lock()
        self.tick: Callable[[], None] | None = None  # set in the uploader: its heartbeat

    def __getstate__(self) -> dict[str, Any]:
        """What crosses into the uploader process: the shared bucket, not the local tick."""
        return {**self.__dict__, "tick": None}

    def attach(self, client: Any) -> None:
        """Pace the bodies boto3's client sends (PutObject, UploadPart), wrapped as they go
        out, after signing: botocore reads a body once more to sign it over plain HTTP, and
        that read must not spend the limit."""
        for operation in ("PutObject", "UploadPart"):
            client.meta.events.register(f"before-send.s3.{operation}", self._pace)

    def _pace(self, request: Any, **_: Any) -> None:
        body = request.body
        if isinstance(body, bytes | bytearray):
            request.body = Throttled(bytes(body), self)
        elif body is not None and not isinstance(body, Throttled):
            request.body = Throttled(body.read(), self)

    def take(self, count: int) -> None:
        """Wait until `count` bytes may be sent (taken in CHUNK-sized turns)."""
        while count > 0:
            turn = min(count, CHUNK)
            self._wait(self._borrow(turn))
            count -= turn

    def _borrow(self, count: int) -> float:
        """Take `count` tokens, into debt if need be; the seconds until the debt is paid."""
        with self.lock:
            now = time.monotonic()
            tokens = min(self.burst, self.state[0] + (now - self.state[1]) * self.rate)
            tokens -= count
            self.state[0], self.state[1] = tokens, now
        return max(0.0, -float(tokens) / self.rate)

    def _wait(self, seconds: float) -> None:
        while seconds > 0:
            step = min(seconds, 1.0)
            time.sleep(step)  # a pause the limit asks for, not synchronisation
            seconds -= step
            if self.tick is not None:
                self.tick()


class Throttled(io.RawIOBase):
    """A request body read at the profile's rate (boto3 reads a file-like body as it sends)."""

    def __init__(self, data: bytes, limit: Bandwidth) -> None:
        self.view = memoryview(data)
        self.position = 0
        self.limit = limit

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.view)}[whence]
        self.position = max(0, min(len(self.view), base + offset))
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), len(self.view) - self.position, CHUNK)
        if count <= 0:
            return 0
        self.limit.take(count)
        buffer[:count] = self.view[self.position : self.position + count]
        self.position += count
        return count

    def __len__(self) -> int:
        return len(self.view)
