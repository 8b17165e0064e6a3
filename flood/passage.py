"""One file's passage through one pass of an uploader, and the Result that ends the pass."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from flood.jobs import FileRef
from flood.options import NONE, ObjectOptions
from flood.states import Outcome, Step


@dataclass(eq=False)
class Passage:
    """One file's passage through one pass of an uploader: what is known of it so far."""

    ref: FileRef
    record_id: int
    attempt: int  # the retry number (0: the first upload)
    size: int | None = None  # of the file as claimed or opened (None: not a regular file)
    fd: int = -1  # open for reading once opened
    before: os.stat_result | None = None  # its fstat when opened
    body: bytes = b""  # the bytes read, for a single PUT
    md5: str = ""  # hex MD5 of body
    etag: str | None = None  # what the server answered
    checksum: str | None = None  # "algorithm:value" of a multipart object, when it has one
    options: ObjectOptions = NONE  # what is set on the object (resolved when it is opened)
    version_id: str | None = None  # the object's version, where the bucket keeps them
    proven: bool = False  # the answer itself proves the bytes (ETag == MD5)
    started: float = 0.0  # monotonic, when its upload began
    seconds: float = 0.0  # from its first byte sent to its proof


@dataclass(frozen=True)
class Result:
    """The end of one pass over a job, for the uploader role to schedule and count."""

    step: Step
    due: float = 0.0  # for RETRY and CHANGED: when to look again (epoch seconds)
    ended: Outcome | None = None  # DONE after a completion or a failure
    size: int | None = None
    seconds: float | None = None  # a completion's upload time
    reason: str | None = None  # a failure's reason, or why a retry was scheduled


def regular_size(info: os.stat_result) -> int | None:
    return info.st_size if stat.S_ISREG(info.st_mode) else None
