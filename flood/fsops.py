"""Filesystem primitives Flood's guarantees rest on: moves that never overwrite, safe opens."""

from __future__ import annotations

import contextlib
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
    renameat_noreplace(_AT_FDCWD, src, _AT_FDCWD, dst)


def renameat_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE) relative to directory fds: never overwrites, never follows a
    symlink in a directory above the names (the fds pin the directories)."""
    result = _libc.renameat2(
        src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE
    )
    if result == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):  # a filesystem without RENAME_NOREPLACE
        # link(2) fails on an existing target; a crash in between leaves a second name for
        # the same inode, which start-up finds in processing/ and finishes: never a lost file.
        os.link(src, dst, src_dir_fd=_fd(src_dir), dst_dir_fd=_fd(dst_dir), follow_symlinks=False)
        os.unlink(src, dir_fd=_fd(src_dir))
        return
    raise OSError(err, os.strerror(err), src, None, dst)


def _fd(dir_fd: int) -> int | None:
    return None if dir_fd == _AT_FDCWD else dir_fd


def move_into(src: str, dst: str) -> None:
    """rename_noreplace, creating dst's parent directories as needed."""
    try:
        rename_noreplace(src, dst)
    except FileNotFoundError:
        if not os.path.lexists(src):
            raise
        os.makedirs(os.path.dirname(dst), mode=0o750, exist_ok=True)
        rename_noreplace(src, dst)


class EscapesTree(Exception):
    """A directory on the way to a file is a symlink (or not a directory): not followed."""


def open_dir(root: str, parts: list[str], create: bool = False) -> int:
    """A directory fd for root/parts[0]/..., each component opened with O_NOFOLLOW relative to
    the one before, so no symlink anywhere below root is followed. Creates missing ones (0750)
    if asked. Raises FileNotFoundError or EscapesTree."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(root, flags)
    try:
        for part in parts:
            try:
                child = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o750, dir_fd=fd)
                child = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except (NotADirectoryError, OSError) as exc:
                if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:
                    raise EscapesTree(f"{part!r} below {root} is not a plain directory") from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(name: str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open a file for reading without following a symlink or blocking on a FIFO; the fd and
    its fstat. Raises NotRegularFile for anything but a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile(name, "symlink") from None
        # A socket answers ENXIO, a device may answer anything: say what the name is.
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(name, _kind(mode)) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegularFile(name, _kind(info.st_mode))
    return fd, info


class NotRegularFile(Exception):
    """A path in the spool that is a symlink, FIFO, socket, device or directory."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{kind}, not a regular file: {path!r}")
        self.kind = kind


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "device"),
        (stat.S_ISBLK, "device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
    ):
        if test(mode):
            return name
    return "special file"


class _StatxTimestamp(ctypes.Structure):
    _fields_ = [
        ("tv_sec", ctypes.c_int64),
        ("tv_nsec", ctypes.c_uint32),
        ("reserved", ctypes.c_int32),
    ]


class _Statx(ctypes.Structure):
    _fields_ = [
        ("mask", ctypes.c_uint32),
        ("blksize", ctypes.c_uint32),
        ("attributes", ctypes.c_uint64),
        ("nlink", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("mode", ctypes.c_uint16),
        ("spare0", ctypes.c_uint16),
        ("ino", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("blocks", ctypes.c_uint64),
        ("attributes_mask", ctypes.c_uint64),
        ("atime", _StatxTimestamp),
        ("btime", _StatxTimestamp),
        ("ctime", _StatxTimestamp),
        ("mtime", _StatxTimestamp),
        ("rest", ctypes.c_uint64 * 16),
    ]  # struct statx is 256 bytes


def creation_date(name: str, dir_fd: int = _AT_FDCWD) -> dt.datetime:
    """When the file was created, in naive UTC: its birth time where the filesystem records
    one (statx STATX_BTIME), else its modification time. A symlink is not followed."""
    buf = _Statx()
    statx = getattr(_libc, "statx", None)
    if (
        statx is not None
        and statx(
            dir_fd,
            os.fsencode(name),
            _AT_SYMLINK_NOFOLLOW,
            _STATX_BTIME | _STATX_MTIME,
            ctypes.byref(buf),
        )
        == 0
    ):
        stamp = buf.btime if buf.mask & _STATX_BTIME else buf.mtime
        seconds = stamp.tv_sec + stamp.tv_nsec / 1e9
    else:
        seconds = os.stat(name, dir_fd=_fd(dir_fd), follow_symlinks=False).st_mtime
    return dt.datetime.fromtimestamp(seconds, dt.UTC).replace(tzinfo=None)
