"""Liveness signalling: sd_notify datagrams to systemd and the children's progress heartbeats."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from flood.jobs import Alive

HEARTBEAT_SECONDS = 1.0  # a child reports progress at most this often
STALL_MIN = 3.0  # never call a child stalled sooner than this (beats are ~1 s apart)


def socket_address(value: str) -> str | bytes:
    """$NOTIFY_SOCKET as an address: '@name' is Linux's abstract namespace (a leading NUL)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends sd_notify messages to $NOTIFY_SOCKET (a datagram on a Unix socket); without the
    variable every call does nothing, so the daemon runs the same outside systemd."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_usec / 1e6 if watchdog_usec else None
        self.sock: socket.socket | None = None
        if address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, unset: bool = False
    ) -> Notifier:
        """Read NOTIFY_SOCKET and WATCHDOG_USEC (honouring WATCHDOG_PID); with `unset`, remove
        them so that child processes do not inherit them (only the main PID may notify)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET") or None
        usec = _watchdog_usec(env)
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(name, None)
        return cls(socket_address(raw) if raw else None, usec)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *lines: str) -> bool:
        """One datagram of newline-separated assignments; False if it could not be sent."""
        if self.sock is None or self.address is None:
            return False
        try:
            self.sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self, status: str) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID unset or ours)."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


@dataclass
class Watchdog:
    """When to send WATCHDOG=1: every half interval, and only while every child has reported
    progress within `stall_after` seconds. A stalled daemon stops pinging and gets restarted."""

    interval: float
    stall_after: float = 0.0
    next_ping: float = 0.0

    def __post_init__(self) -> None:
        if not self.stall_after:
            self.stall_after = max(self.interval, STALL_MIN)

    def due(self, now: float) -> bool:
        return now >= self.next_ping

    def stale(self, now: float, beats: Mapping[str, float]) -> list[str]:
        """The children whose last report of progress is older than `stall_after`."""
        return sorted(name for name, beat in beats.items() if now - beat > self.stall_after)

    def pinged(self, now: float) -> None:
        self.next_ping = now + self.interval / 2


class Heartbeat:
    """A child's report of progress to the supervisor: Alive(pid), at most once a second.
    Called from the child's loop and from its S3 calls as they complete, never from a timer
    thread, so a child stuck inside a call falls silent."""

    def __init__(
        self,
        conn: Any,
        every: float = HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conn = conn
        self.every = every
        self.clock = clock
        self.sent_at = float("-inf")
        self.lock = threading.Lock()

    def beat(self, *_: Any, **__: Any) -> None:
        """Send a beat if the last is old enough (botocore's event kwargs are ignored)."""
        if self.conn is None or self.clock() - self.sent_at < self.every:
            return
        with self.lock:
            now = self.clock()
            if now - self.sent_at < self.every:
                return
            self.sent_at = now
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(Alive(os.getpid()))
