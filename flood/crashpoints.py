"""A testing hook, off unless asked for: die with os._exit at a named step of a file's way.

FLOOD_CRASH_AT=POINT makes the first process (of any role) that reaches POINT exit at once, as
kill -9 would leave it: no cleanup, no flush, no record. With FLOOD_CRASH_TARGET=supervisor it
SIGKILLs the supervisor first (its children then die with it). FLOOD_CRASH_ONCE=FILE makes the
crash happen once across all processes and restarts (FILE is created when it does), so a
restarted process runs through. Nothing here runs unless FLOOD_CRASH_AT is set.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    # uploader, success path
    "after_claim",
    "after_put_start",
    "after_put",
    "after_head",
    "after_record",
    "after_move_completed",
    # uploader, failure path
    "after_fail_record",
    "after_move_failed",
    "after_retry_record",
    # every child, after its setup and before it reports ready (a failure at boot)
    "before_ready",
    # watcher and supervisor start-up
    "after_drain_processing",
    "after_drain_incoming",
    "after_wipe",
    "after_repair",
)
_AT = os.environ.get("FLOOD_CRASH_AT", "")
_TARGET = os.environ.get("FLOOD_CRASH_TARGET", "self")
_ONCE = os.environ.get("FLOOD_CRASH_ONCE", "")
SUPERVISOR_PID_ENV = "FLOOD_SUPERVISOR_PID"


def point(name: str) -> None:
    """Crash here if the environment asks for it (see the module docstring)."""
    if name != _AT:
        return
    if _ONCE:
        try:
            os.close(os.open(_ONCE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return
    if _TARGET == "supervisor":
        supervisor = int(os.environ.get(SUPERVISOR_PID_ENV, "0") or 0)
        if supervisor and supervisor != os.getpid():
            os.kill(supervisor, signal.SIGKILL)
    os._exit(137)
