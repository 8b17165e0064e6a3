"""The skeleton every child role shares: boot, setup(), while alive: loop(), teardown()."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import select
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Protocol

from flood import crashpoints
from flood.errors import FloodError
from flood.jobs import Ready

_PR_SET_PDEATHSIG = 1


class Role(Protocol):
    alive: bool

    def setup(self) -> None: ...
    def loop(self, now: float) -> None: ...
    def stop(self) -> None: ...
    def teardown(self) -> None: ...


def run(module: str, *args: Any) -> None:
    """Every child's entry point: the main() of role flood.workers.<module>, imported here in
    the child (preloaded by the forkserver), so that the supervisor never imports a role's
    dependencies (boto3, for the uploader and the checker) to name its entry point."""
    importlib.import_module(f"flood.workers.{module}").main(*args)


def die_with_supervisor(supervisor_pid: int) -> None:
    """SIGKILL this process as soon as the supervisor dies, so no orphan keeps uploading.

    PR_SET_PDEATHSIG alone is not enough: our parent is the forkserver, and the forkserver only
    exits once every child has closed its inherited "alive" pipe, which ours never would. So a
    thread also waits on a pidfd of the supervisor itself."""
    parent = os.getppid()
    # The process's own symbols hold libc's: find_library would run ldconfig in a subprocess.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)
    try:
        pidfd = os.pidfd_open(supervisor_pid)
    except ProcessLookupError:
        os._exit(1)
    threading.Thread(
        target=_kill_self_when_readable, args=(pidfd,), name="supervisor-watch", daemon=True
    ).start()


def _kill_self_when_readable(pidfd: int) -> None:
    select.select([pidfd], [], [])  # a pidfd becomes readable when its process exits
    os.kill(os.getpid(), signal.SIGKILL)


def serve(role: Role, conn: Connection, supervisor_pid: int) -> None:
    """Run a role in this (child) process until it stops; tell the supervisor once it is ready.

    SIGINT is ignored (a terminal's Ctrl-C reaches the whole group; the supervisor decides);
    SIGTERM means: finish the current file, then exit."""
    die_with_supervisor(supervisor_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: role.stop())
    try:
        role.setup()
    except FloodError as exc:
        print(f"flood: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    crashpoints.point("before_ready")
    conn.send(Ready(os.getpid()))
    try:
        while role.alive:
            role.loop(time.time())
    finally:
        role.teardown()


def send(conn: Connection | None, message: Any) -> None:
    """Tell the supervisor something; a supervisor that is gone is not an error here."""
    if conn is None:
        return
    with contextlib.suppress(OSError):
        conn.send(message)
