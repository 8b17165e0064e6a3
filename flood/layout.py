"""The server directory: SERVER_DIR/{incoming_tmp,incoming,processing,failed,completed}/P/B/key."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flood.errors import InvalidName, LayoutError
from flood.jobs import FileRef
from flood.states import DIRECTORIES, Reason, State

LOCK_NAME = ".flood.lock"  # the supervisor's flock on the server dir
DB_RECORD_NAME = ".flood.db-path"  # the absolute path of the records the supervisor writes
NODE_RECORD_NAME = ".flood.node"  # the node the supervisor writes its rows as
MAX_KEY_BYTES = 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BACKUP_RE = re.compile(r"\.~(\d+)~$")


def check_profile(name: str) -> str:
    """Return `name` if it can be a profile directory, else raise InvalidName."""
    if name in ("", ".", "..") or "/" in name or _CONTROL_RE.search(name):
        raise InvalidName(Reason.INVALID_PROFILE, f"invalid profile name {shown(name)!r}")
    _check_utf8(name, Reason.INVALID_PROFILE)
    return name


def check_bucket(name: str) -> str:
    """Return `name` if S3 accepts it as a bucket name (3-63 of a-z 0-9 . -), else raise."""
    if not _BUCKET_RE.match(name) or ".." in name:
        raise InvalidName(
            Reason.INVALID_BUCKET,
            f"invalid bucket name {shown(name)!r}: S3 wants 3-63 characters of lowercase letters, "
            "digits, dots and hyphens, starting and ending with a letter or digit",
        )
    return name


def check_key(key: str) -> str:
    """Return `key` if every segment is a real name and it fits S3's 1,024 bytes, else raise."""
    raw = _check_utf8(key, Reason.INVALID_UTF8)
    segments = key.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidName(Reason.INVALID_KEY, f"key {key!r} has an empty, '.' or '..' segment")
    if _CONTROL_RE.search(key):
        raise InvalidName(Reason.INVALID_KEY, f"key {key!r} contains a control character")
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidName(Reason.KEY_TOO_LONG, f"key is {len(raw)} bytes in UTF-8, over 1024")
    return key


def _check_utf8(text: str, reason: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(reason, f"name {shown(text)!r} is not valid UTF-8") from None


def shown(name: str) -> str:
    """A name as it can be printed or stored: bytes that are not UTF-8 (surrogate escapes from
    the filesystem) as backslash escapes, b'bad\\xff' as 'bad\\xff'."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Layout:
    """Paths of one server directory; the only place that knows how they are built."""

    root: Path

    def state_dir(self, state: str) -> str:
        return os.path.join(self.root, state)

    def path(self, state: str, ref: FileRef) -> str:
        return os.path.join(self.root, state, ref.profile, ref.bucket, ref.key)

    def bucket_dir(self, state: str, profile: str, bucket: str) -> str:
        return os.path.join(self.root, state, profile, bucket)

    def parse(self, state: str, path: str) -> FileRef | None:
        """The file a path in `state` stands for; None when it is not below P/B/ (misplaced)."""
        rel = os.path.relpath(path, self.state_dir(state))
        parts = rel.split(os.sep)
        if len(parts) < 3 or parts[0] in ("..", "."):
            return None
        return FileRef(parts[0], parts[1], "/".join(parts[2:]))

    def profiles_present(self) -> set[str]:
        """Profile directory names found under any of the five state directories."""
        found: set[str] = set()
        for state in DIRECTORIES:
            found.update(_subdirs(self.state_dir(state)))
        return found

    def buckets_present(self, profile: str) -> set[str]:
        """Bucket directory names of `profile` found under any of the five state directories."""
        found: set[str] = set()
        for state in DIRECTORIES:
            found.update(_subdirs(os.path.join(self.state_dir(state), profile)))
        return found

    def prepare(self, profiles: Iterable[str]) -> None:
        """Create the five directories, each profile's under each, and mirror bucket dirs."""
        if not self.root.is_dir():
            raise LayoutError(f"server directory {self.root} does not exist or is not a directory")
        for state in DIRECTORIES:
            os.makedirs(self.state_dir(state), mode=0o750, exist_ok=True)
        self.check_one_filesystem()
        for profile in sorted(set(profiles) | self.profiles_present()):
            buckets = self.buckets_present(profile)
            for state in DIRECTORIES:
                os.makedirs(os.path.join(self.state_dir(state), profile), mode=0o750, exist_ok=True)
                for bucket in buckets:
                    os.makedirs(self.bucket_dir(state, profile, bucket), mode=0o750, exist_ok=True)

    def check_one_filesystem(self) -> None:
        """Refuse state directories on different filesystems: a cross-device move is a copy."""
        devices = {state: os.stat(self.state_dir(state)).st_dev for state in DIRECTORIES}
        if len(set(devices.values())) > 1:
            where = ", ".join(f"{s} on device {d}" for s, d in devices.items())
            raise LayoutError(f"the state directories of {self.root} span filesystems: {where}")

    def wipe_incoming_tmp(self) -> int:
        """Delete what producers left half-written in incoming_tmp; return how many entries."""
        top = self.state_dir(State.INCOMING_TMP)
        count = 0
        for entry in os.scandir(top):
            if entry.is_dir(follow_symlinks=False):
                count += sum(len(files) + len(dirs) for _, dirs, files in os.walk(entry.path))
                shutil.rmtree(entry.path)
                os.mkdir(entry.path, 0o750)
            else:
                os.unlink(entry.path)
            count += 1
        return count

    def recorded_db(self) -> str | None:
        """The records database the supervisor of this server dir last said it uses, if any."""
        try:
            text = (self.root / DB_RECORD_NAME).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        if text.startswith(("postgresql://", "postgres://")):
            return text
        return text if os.path.isabs(text) else None

    def record_db(self, db_path: str) -> None:
        """Say where this server dir's records are (the supervisor, once it holds the lock), so
        that every command finds them from wherever it runs. Written whole or not at all."""
        self._record(DB_RECORD_NAME, db_path)

    def recorded_node(self) -> str | None:
        """The node the supervisor of this server dir last said it writes as, if any."""
        try:
            text = (self.root / NODE_RECORD_NAME).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return text or None

    def record_node(self, node: str) -> None:
        """Say which node this server dir's rows are written as (commands act as that node)."""
        self._record(NODE_RECORD_NAME, node)

    def _record(self, name: str, value: str) -> None:
        final = self.root / name
        tmp = self.root / f"{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{value}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)

    def walk_files(self, state: str, profile: str | None = None) -> Iterator[str]:
        """Every non-directory below `state` (or one profile of it), streamed, no links followed."""
        top = self.state_dir(state)
        yield from _walk(top if profile is None else os.path.join(top, profile))


def _walk(top: str) -> Iterator[str]:
    """Depth first, streamed: one open directory iterator per level, never a list of a whole
    directory (a spool may hold 100,000 files in one)."""
    try:
        with os.scandir(top) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    yield from _walk(entry.path)
                else:
                    yield entry.path
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return


def _subdirs(path: str) -> list[str]:
    if os.path.islink(path):  # a symlinked profile directory is not walked
        return []
    try:
        return [e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def next_backup(names: Iterable[str], base: str) -> str:
    """`base.~N~` with N one above the highest backup of base among names."""
    highest = 0
    for name in names:
        if name.startswith(base + ".~"):
            match = _BACKUP_RE.search(name)
            if match and name == f"{base}.~{match.group(1)}~":
                highest = max(highest, int(match.group(1)))
    return f"{base}.~{highest + 1}~"
