"""What crosses a process boundary: small tuples of plain values, never models or clients."""

from __future__ import annotations

from typing import NamedTuple


class FileRef(NamedTuple):
    """One file of the spool: profile and bucket directory names and the S3 key."""

    profile: str
    bucket: str
    key: str


class Job(NamedTuple):
    """A file for an uploader: `state` is the directory it was seen in (incoming or processing)."""

    state: str
    bucket: str
    key: str


# Put on an uploader's queue to make it finish its current file and exit.
SHUTDOWN = None


# -- messages between a child and the supervisor (over the child's pipe) ----------------------
class Ready(NamedTuple):
    """Child -> supervisor: setup is done, the child is in its loop."""

    pid: int


class Alive(NamedTuple):
    """Child -> supervisor: the child made progress (at most once a second)."""

    pid: int


class Drained(NamedTuple):
    """Watcher -> supervisor: the start-up drain has queued what waited."""

    files: int  # files dispatched by the drain


class Rescan(NamedTuple):
    """Supervisor -> watcher: walk incoming/ again (a hold was released, say)."""

    profile: str | None  # one profile's tree, or None for all of incoming/
    reason: str  # why, for the log and the rescan metric
