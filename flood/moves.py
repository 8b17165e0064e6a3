"""An uploader's moves in the server dir: claim a file into processing/, open what it claimed,
finish it into completed/ or failed/ without ever overwriting, never following a link."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from typing import NamedTuple

from flood import crashpoints, fsops
from flood.jobs import FileRef
from flood.layout import Layout, next_backup
from flood.states import State
from flood.verdict import Mismatch


class Claimed(NamedTuple):
    """A file now in processing/: its stat and creation date, for its record."""

    info: os.stat_result
    created: dt.datetime | None


class Busy(Exception):
    """The same path is still in processing/ (an earlier file of that name is on its way)."""


def protected_hardlinks() -> bool:
    """Whether the kernel refuses hard links to files the linker does not own."""
    try:
        with open("/proc/sys/fs/protected_hardlinks") as handle:
            return handle.read().strip() == "1"
    except OSError:
        return False


class Moves:
    """The moves of one uploader. Directory fds are opened once per pass (a job or a batch of
    them: each chain of O_NOFOLLOW opens, fsops.open_dir, is walked once instead of once per
    step and file) and closed by end_pass(), so none outlives it and a directory removed or
    replaced between passes is opened afresh."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.fds: dict[tuple[str, tuple[str, ...]], int] = {}
        self.kernel_guards_hardlinks = protected_hardlinks()

    def dir(self, state: State, parts: list[str], create: bool = False) -> int:
        key = (str(state), tuple(parts))
        fd = self.fds.get(key)
        if fd is None:
            fd = fsops.open_dir(self.layout.state_dir(state), parts, create=create)
            self.fds[key] = fd
        return fd

    def end_pass(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def claim(self, ref: FileRef) -> Claimed | None:
        """Move incoming -> processing without overwriting; None if it is not there. Raises
        Busy when the name is taken in processing/, fsops.EscapesTree for a link on the way."""
        parts, name = split(ref)
        try:
            src = self.dir(State.INCOMING, parts)
        except FileNotFoundError:
            return None
        try:
            dst = self.dir(State.PROCESSING, parts, create=True)
            fsops.renameat_noreplace(src, name, dst, name)
            info = os.stat(name, dir_fd=dst, follow_symlinks=False)
            created = fsops.creation_date(name, dst)
        except FileNotFoundError:
            return None
        except FileExistsError:
            raise Busy(ref.key) from None
        crashpoints.point("after_claim")
        return Claimed(info, created)

    def claimed(self, ref: FileRef) -> Claimed | None:
        """A file already in processing/ (found after a restart, or a retry come due)."""
        parts, name = split(ref)
        try:
            folder = self.dir(State.PROCESSING, parts)
            info = os.stat(name, dir_fd=folder, follow_symlinks=False)
            return Claimed(info, fsops.creation_date(name, folder))
        except (FileNotFoundError, fsops.EscapesTree):
            return None

    def open(self, ref: FileRef) -> tuple[int, os.stat_result]:
        """The claimed file opened for reading: a regular file, never through a link. Raises
        fsops.NotRegularFile, FileNotFoundError, fsops.EscapesTree or PermissionError."""
        parts, name = split(ref)
        return fsops.open_regular(name, dir_fd=self.dir(State.PROCESSING, parts))

    def finish(self, state: State, ref: FileRef, inode: int | None = None) -> None:
        """Move processing -> completed/ or failed/, keeping an older file of the same name as
        key.~N~ (mv --backup=numbered). With `inode`, only that file is moved (what we read)."""
        parts, name = split(ref)
        src = self.dir(State.PROCESSING, parts)
        if inode is not None and os.stat(name, dir_fd=src, follow_symlinks=False).st_ino != inode:
            raise Mismatch(f"processing/{ref.key} is no longer the file that was uploaded")
        dst = self.dir(state, parts, create=True)
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=dst, follow_symlinks=False)
            backup = next_backup(os.listdir(dst), name)
            fsops.renameat_noreplace(dst, name, dst, backup)
        fsops.renameat_noreplace(src, name, dst, name)


def split(ref: FileRef) -> tuple[list[str], str]:
    """The directories below STATE/ leading to a file, and its name."""
    *dirs, name = ref.key.split("/")
    return [ref.profile, ref.bucket, *dirs], name


def changed(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether a file was written to between two fstat()s of it."""
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )


def read_all(fd: int, size: int, start: int = 0) -> bytes:
    """Up to `size` bytes of the file from `start` (fewer if it was truncated meanwhile)."""
    chunks = []
    done = 0
    while done < size:
        chunk = os.pread(fd, size - done, start + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)
