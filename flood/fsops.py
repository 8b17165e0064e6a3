"""Filesystem primitives Flood's guarantees rest on: moves that never overwrite, safe opens."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import errno
import os
import stat

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_MTIME = 0x40
_STATX_BTIME = 0x800


def rename_noreplace(src: str, dst: str) -> None:
    """Atomically rename src to dst, failing with FileExistsError if dst exists (renameat2)."""
    result = _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                             _RENAME_NOREPLACE)
    if result == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):  # a filesystem without RENAME_NOREPLACE
        _link_then_unlink(src, dst)
        return
    raise OSError(err, os.strerror(err), src, None, dst)


def _link_then_unlink(src: str, dst: str) -> None:
    # link(2) fails on an existing target; a crash in between leaves a second name for the
    # same inode, which start-up finds in processing/ and finishes, never a lost file.
    os.link(src, dst, follow_symlinks=False)
    os.unlink(src)


def move_into(src: str, dst: str) -> None:
    """rename_noreplace, creating dst's parent directories as needed."""
    try:
        rename_noreplace(src, dst)
    except FileNotFoundError:
        if not os.path.lexists(src):
            raise
        os.makedirs(os.path.dirname(dst), mode=0o750, exist_ok=True)
        rename_noreplace(src, dst)


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """Open path for reading without following a symlink or blocking on a FIFO; the fd and its
    fstat. Raises NotRegularFile for anything but a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(path, "symlink") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegularFile(path, _kind(info.st_mode))
    return fd, info


class NotRegularFile(Exception):
    """A path in the spool that is a symlink, FIFO, socket, device or directory."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{kind}, not a regular file: {path!r}")
        self.kind = kind


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
                       (stat.S_ISBLK, "device"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "special file"


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32),
                ("reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32),
                ("attributes", ctypes.c_uint64), ("nlink", ctypes.c_uint32),
                ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("mode", ctypes.c_uint16),
                ("spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("atime", _StatxTimestamp), ("btime", _StatxTimestamp),
                ("ctime", _StatxTimestamp), ("mtime", _StatxTimestamp),
                ("rest", ctypes.c_uint64 * 16)]  # struct statx is 256 bytes


def creation_date(path: str) -> dt.datetime:
    """When the file at path was created, in naive UTC: its birth time where the filesystem
    records one (statx STATX_BTIME), else its modification time. Links are not followed."""
    buf = _Statx()
    statx = getattr(_libc, "statx", None)
    if statx is not None and statx(_AT_FDCWD, os.fsencode(path), _AT_SYMLINK_NOFOLLOW,
                                   _STATX_BTIME | _STATX_MTIME, ctypes.byref(buf)) == 0:
        stamp = buf.btime if buf.mask & _STATX_BTIME else buf.mtime
        seconds = stamp.tv_sec + stamp.tv_nsec / 1e9
    else:
        seconds = os.lstat(path).st_mtime
    return dt.datetime.fromtimestamp(seconds, dt.UTC).replace(tzinfo=None)
