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
