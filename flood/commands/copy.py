"""The flood-copy command: queue local files into incoming/, keyed as `aws s3 cp` keys them."""

from __future__ import annotations

import argparse
import errno
import fcntl
import fnmatch
import os
import shutil
import stat
import sys
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from flood import credentials, fsops, options, records
from flood.commands import common
from flood.errors import ConfigError, FloodError, InvalidName, LayoutError
from flood.jobs import FileRef
from flood.layout import Layout, check_bucket, check_key, check_profile, shown
from flood.options import OPTIONS_XATTR, ObjectOptions
from flood.settings import DEFAULT_IGNORE, MiB
from flood.snapshot import supervisor_state, utc_text
from flood.states import Reason, State

PROG = "flood-copy"
DEFAULT_SERVER_DIR = common.DEFAULT_SERVER_DIR
CHUNK = MiB
BAR_THRESHOLD = 8 * MiB
REDRAW_SECONDS = 0.1
POLL_SECONDS = 0.2
SUPERVISOR_CHECK_SECONDS = 5.0  # --wait looks this often whether a supervisor runs
PLAIN_PROGRESS_SECONDS = 30.0  # --wait off a terminal: a progress line at most this often
BAR_WIDTH, MIN_BAR = 20, 10
EX_USAGE = 2
EX_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
EX_TIMEOUT = 124  # timeout(1)
SHOWN_AT_MOST = 10
TERMINAL_STATES = (State.COMPLETED, State.FAILED, State.ABANDONED)

USAGE = (
    f"{PROG} [-h] [--version] [-q] [-v] [-r] [--server-dir DIR] [--credentials FILE] "
    "[--db PATH] [--wait [--timeout S]] SOURCE... s3://PROFILE/BUCKET/[KEY]"
)
DESCRIPTION = """\
Queues SOURCE files for upload by a flood-supervisor: each file is copied into
SERVER_DIR/incoming_tmp/PROFILE/BUCKET/KEY, synced, and renamed into incoming/. Keys follow
`aws s3 cp`: s3://p/b/ names a file by its own name, s3://p/b/x/y.txt names it x/y.txt, and
-r DIR s3://p/b/pre/ gives pre/<path below DIR>. Several sources need a prefix ending in '/'
(like cp a b c dir/); there each directory keeps its own name. No network is used."""
EPILOG = """\
server dir: --server-dir, else $FLOOD_SERVER_DIR, else /srv/flood. Credentials are found as
flood-supervisor finds them; records go to --db, else $FLOOD_DB, else the database the
supervisor of the server dir records into (SERVER_DIR/.flood.db-path), else ./flood.db.
exit status: 0 all queued (with --wait: all completed); 1 some file was not queued or failed;
2 bad usage or input; 78 configuration error; 124 --wait timed out; 130 interrupted."""


class Refused(FloodError):
    """The command line asks for something that cannot be done: nothing is queued."""

    exit_code = EX_USAGE


class NotQueued(Exception):
    """One file could not be queued; `reason` is the stable code its record gets."""

    def __init__(self, detail: str, reason: Reason = Reason.COPY_FAILED) -> None:
        super().__init__(detail)
        self.reason = reason


class Interrupted(Exception):
    """Ctrl-C during one file's copy; `published` says whether it had reached incoming/."""

    def __init__(self, published: bool, record_id: int | None) -> None:
        super().__init__("interrupted")
        self.published = published
        self.record_id = record_id


# -- the command line ----------------------------------------------------------------------
def parser() -> common.Parser:
    p = common.Parser(
        prog=PROG,
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="files (directories with -r)")
    p.add_argument("destination", metavar="s3://PROFILE/BUCKET/[KEY]")
    p.add_argument(
        "-r", "--recursive", action="store_true", help="copy every file below a directory SOURCE"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="with --wait: a line for each file as it is completed or fails",
    )
    p.add_argument(
        "--server-dir",
        metavar="DIR",
        help=f"spool directory (default: $FLOOD_SERVER_DIR, else {DEFAULT_SERVER_DIR})",
    )
    p.add_argument(
        "--credentials",
        metavar="FILE",
        help="credentials file, used when neither $AWS_SHARED_CREDENTIALS_FILE nor "
        "~/.aws/credentials exists",
    )
    p.add_argument("--db", metavar="PATH|URL", help=f"records: {common.DB_HELP}")
    common.add_node_option(p)
    p.add_argument(
        "--wait",
        action="store_true",
        help="block until every queued file is in completed/ or failed/",
    )
    p.add_argument(
        "--timeout",
        type=common.seconds,
        metavar="S",
        help="with --wait: give up after S seconds (exit 124)",
    )
    own = p.add_argument_group(
        "object options",
        "set on these files' objects, over the config file's levels and rules; they travel with "
        f"each file (its extended attribute {OPTIONS_XATTR}) through restarts and kill -9",
    )
    for name in ("content-type", "content-encoding", "cache-control", "storage-class", "acl"):
        own.add_argument(f"--{name}", metavar="VALUE")
    own.add_argument(
        "--metadata", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    own.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    return p


def own_options(args: argparse.Namespace) -> ObjectOptions | None:
    """The command line's object options, checked as S3 checks them (Refused: nothing is
    queued)."""
    table: dict[str, object] = {}
    for name in ("content_type", "content_encoding", "cache_control", "storage_class", "acl"):
        if getattr(args, name):
            table[name] = getattr(args, name)
    for flag, key in (("metadata", "metadata"), ("tag", "tags")):
        pairs = {}
        for item in getattr(args, flag):
            name, equals, value = item.partition("=")
            if not equals or not name:
                raise Refused(f"--{flag} {item!r} is not KEY=VALUE")
            pairs[name] = value
        if pairs:
            table[key] = pairs
    if not table:
        return None
    try:
        return options.parse(table, "the command line")
    except ConfigError as exc:
        raise Refused(
            str(exc).replace("metadata:", "--metadata:").replace("tags:", "--tag:")
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    common.printable_output()
    p = parser()
    args = p.parse_args(argv)
    if args.timeout is not None and not args.wait:
        p.error("--timeout needs --wait")
    try:
        return run(args)
    except FloodError as exc:
        return common.fail(PROG, str(exc), exc.exit_code)
    except KeyboardInterrupt:  # before or after the copy loop: no file is half-queued
        return common.fail(PROG, "interrupted", EX_INTERRUPTED)
    finally:
        records.close_db()


def run(args: argparse.Namespace) -> int:
    """Check everything, copy every file, report, and wait if asked."""
    target = parse_target(args.destination)
    root = common.server_dir(args.server_dir)
    creds = credentials.load(args.credentials)
    if target.profile not in creds.profiles:
        raise Refused(
            f"unknown profile {target.profile!r}: {creds.path} ({creds.source}) has "
            f"{', '.join(sorted(creds.profiles))}"
        )
    own = own_options(args)
    if own is not None:
        refused = options.refused_by(creds.profiles[target.profile].provider, own)
        if refused:
            raise Refused(
                f"{', '.join(refused)}: not supported by profile {target.profile!r}'s provider "
                f"{creds.profiles[target.profile].provider}"
            )
    plan = make_plan(args.sources, target, args.recursive)
    for line in plan.skipped + _ignored_warnings(plan.items):
        print(f"{PROG}: {line}", file=sys.stderr)
    layout = Layout(root)
    # Refused before any directory is made; never a new database beside the supervisor's.
    records.open_db(
        common.records_db(PROG, args.db, root, create=True), common.node_name(args.node, root)
    )
    prepare_dirs(layout, target)
    report = Copier(layout, target, _progress(plan.items, args.quiet), own).run(plan.items)
    code = report.tell(target, args.quiet, plan.failed)
    if args.wait and code != EX_INTERRUPTED:
        waiter = Waiter(root, target, args.verbose, args.quiet)
        waited = waiter.wait([(target.uri(i.key), rid) for i, rid in report.queued], args.timeout)
        code = waited if waited != 0 else code
    return code


# -- the destination and the server dir ----------------------------------------------------
@dataclass(frozen=True)
class Target:
    """s3://PROFILE/BUCKET/KEY as given: `key` may be empty or end in '/' (a prefix)."""

    profile: str
    bucket: str
    key: str

    def uri(self, key: str) -> str:
        return f"s3://{self.profile}/{self.bucket}/{key}"

    def prefix(self) -> str:
        return self.key.rstrip("/")


def parse_target(uri: str) -> Target:
    """Split and check s3://PROFILE/BUCKET/[KEY]; raise Refused naming what is wrong."""
    if not uri.startswith("s3://"):
        raise Refused(f"destination {_short(uri)} is not s3://PROFILE/BUCKET/[KEY]")
    profile, _, rest = uri.removeprefix("s3://").partition("/")
    bucket, _, key = rest.partition("/")
    if not profile or not bucket:
        raise Refused(
            f"destination {_short(uri)} names no {'profile' if not profile else 'bucket'}"
            " (s3://PROFILE/BUCKET/[KEY])"
        )
    try:
        check_profile(profile)
        check_bucket(bucket)
        if key:
            check_key(key.removesuffix("/"))
    except InvalidName as exc:
        raise Refused(f"invalid destination {_short(uri)}: {exc}") from None
    return Target(profile, bucket, key)


def prepare_dirs(layout: Layout, target: Target) -> None:
    """Create incoming_tmp/P/B and incoming/P/B; refuse them on different filesystems."""
    states = (State.INCOMING_TMP, State.INCOMING)
    try:
        for state in states:
            make_dirs(layout.state_dir(state))
        _same_filesystem([layout.state_dir(s) for s in states])
        buckets = [layout.bucket_dir(s, target.profile, target.bucket) for s in states]
        for path in buckets:
            make_dirs(path)
        _same_filesystem(buckets)
    except OSError as exc:
        raise LayoutError(f"cannot create {exc.filename}: {exc.strerror}") from None


def make_dirs(path: str) -> None:
    """mkdir -p with mode 0750 at every level (os.makedirs gives it to the last one only)."""
    if os.path.isdir(path):
        return
    make_dirs(os.path.dirname(path))
    with suppress(FileExistsError):
        os.mkdir(path, 0o750)


def _same_filesystem(paths: list[str]) -> None:
    devices = [os.stat(p).st_dev for p in paths]
    if len(set(devices)) > 1:
        where = " and ".join(f"{p} (device {d})" for p, d in zip(paths, devices, strict=True))
        raise LayoutError(
            f"{where} are on different filesystems: the rename into incoming/ would not be atomic"
        )


# -- which files, under which keys ---------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One file to queue: the path opened (a link inside the tree resolved), as shown, its key."""

    path: str
    shown: str
    key: str
    size: int


@dataclass
class Plan:
    items: list[Item] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def make_plan(sources: Sequence[str], target: Target, recursive: bool) -> Plan:
    """Every file to copy with its key; raise Refused for a source or key that cannot be."""
    several = len(sources) > 1
    if several and target.key and not target.key.endswith("/"):
        raise Refused(
            f"several sources need a destination ending in '/' (like cp a b dir/), "
            f"not {_short(target.uri(target.key))}"
        )
    plan = Plan()
    for source in sources:
        info = _stat_source(source)
        name = _name(source)
        if stat.S_ISDIR(info.st_mode):
            if not recursive:
                raise Refused(f"{shown(source)} is a directory (use -r to copy the files below it)")
            prefix = _join(target.prefix(), name) if several else target.prefix()
            _walk_tree(source, prefix, plan)
        elif stat.S_ISREG(info.st_mode):
            key = target.key + name if not target.key or target.key.endswith("/") else target.key
            plan.items.append(Item(source, shown(source), key, info.st_size))
        else:
            raise Refused(f"{shown(source)} is a {_kind(info.st_mode)}, not a regular file")
    _check_keys(plan.items)
    return plan


def _stat_source(source: str) -> os.stat_result:
    try:
        return os.stat(source)
    except FileNotFoundError:
        raise Refused(f"{shown(source)}: no such file or directory") from None
    except OSError as exc:
        raise Refused(f"{shown(source)}: {exc.strerror}") from None


def _name(source: str) -> str:
    """The name a source contributes to its keys ('' for '.', '..' and '/', as cp does)."""
    name = os.path.basename(os.path.normpath(source))
    return "" if name in ("", ".", "..") else name


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix and rel else prefix or rel


def _walk_tree(top: str, prefix: str, plan: Plan) -> None:
    """Add every file below `top`; links leading out of it, and special files, are skipped."""
    root = os.path.realpath(top)
    stack = [("", top)]
    while stack:
        rel, path = stack.pop()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name, reverse=True)
        except OSError as exc:
            plan.failed.append((shown(path), f"cannot list the directory: {exc.strerror}"))
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append((_join(rel, entry.name), entry.path))
            else:
                _add_entry(entry, root, top, _join(prefix, _join(rel, entry.name)), plan)
    plan.items.sort(key=lambda i: i.key)


def _add_entry(entry: os.DirEntry[str], root: str, top: str, key: str, plan: Plan) -> None:
    try:
        if entry.is_symlink():
            _add_link(entry.path, root, top, key, plan)
            return
        info = entry.stat(follow_symlinks=False)
    except OSError as exc:
        plan.failed.append((shown(entry.path), exc.strerror or type(exc).__name__))
        return
    if stat.S_ISREG(info.st_mode):
        plan.items.append(Item(entry.path, shown(entry.path), key, info.st_size))
    else:
        plan.skipped.append(
            f"skipped {shown(entry.path)}: {_kind(info.st_mode)}, not a regular file"
        )


def _add_link(path: str, root: str, top: str, key: str, plan: Plan) -> None:
    """Copy a link to a file inside the tree; skip one that leaves it, dangles or is a dir."""
    real = os.path.realpath(path)
    link = f"symlink {shown(path)} -> {shown(os.readlink(path))}"
    if os.path.commonpath([real, root]) != root:
        plan.skipped.append(f"skipped {link}: it leads out of {shown(top)}")
        return
    try:
        info = os.stat(real)
    except FileNotFoundError:
        plan.skipped.append(f"skipped {link}: dangling")
        return
    if stat.S_ISREG(info.st_mode):
        plan.items.append(Item(real, shown(path), key, info.st_size))
    elif stat.S_ISDIR(info.st_mode):
        plan.skipped.append(f"skipped {link}: a link to a directory is not followed")
    else:
        plan.skipped.append(f"skipped {link}: {_kind(info.st_mode)}, not a regular file")


def _check_keys(items: list[Item]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        try:
            check_key(item.key)
        except InvalidName as exc:
            raise Refused(f"{item.shown}: {exc}") from None
        if item.key in seen:
            raise Refused(f"{seen[item.key]} and {item.shown} would both become key {item.key!r}")
        seen[item.key] = item.shown


def _ignored_warnings(items: list[Item]) -> list[str]:
    """Files the supervisor's default --ignore leaves in incoming/: say so before queueing."""
    patterns = ",".join(DEFAULT_IGNORE)
    return [
        f"note: {i.key} matches flood-supervisor's default --ignore ({patterns}): it waits "
        "in incoming/ unless the supervisor ignores other names"
        for i in items
        if any(fnmatch.fnmatchcase(i.key.rsplit("/", 1)[-1], p) for p in DEFAULT_IGNORE)
    ]


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "device"),
        (stat.S_ISBLK, "device"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return name
    return "special file"


def _short(text: str, width: int = 80) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


# -- progress --------------------------------------------------------------------------------
class Progress:
    """Files and bytes done, rate and time left on one stderr line, redrawn <= 10 times a second."""

    def __init__(self, stream: TextIO | None, files: int, total: int) -> None:
        self.stream = stream
        self.files = files
        self.total = total
        self.done_files = 0
        self.done_bytes = 0
        self.started = time.monotonic()
        self.drawn_at = float("-inf")
        self.width = 0

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self._tick()

    def file_done(self) -> None:
        self.done_files += 1
        self._tick()

    def close(self) -> None:
        if self.stream is not None:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def _tick(self) -> None:
        now = time.monotonic()
        if self.stream is not None and now - self.drawn_at >= REDRAW_SECONDS:
            self._draw(now)

    def _draw(self, now: float) -> None:
        assert self.stream is not None
        line = self.line(now, _columns(self.stream))
        self.stream.write("\r" + line + " " * max(0, self.width - len(line)))
        self.stream.flush()
        self.width = len(line)
        self.drawn_at = now

    def line(self, now: float, columns: int = 80) -> str:
        """The line for a terminal `columns` wide (the last column is left free)."""
        rate = self.done_bytes / max(now - self.started, 1e-3)
        left = (self.total - self.done_bytes) / rate if rate > 0 else None
        done = self.done_bytes / self.total if self.total else self.done_files / max(self.files, 1)
        files = f"{self.done_files}/{self.files} files"
        size = f"{_size(self.done_bytes)}/{_size(self.total)}"
        eta = f"{_clock(left)} left"
        return fit([files, size, f"{_size(rate)}/s", eta], min(done, 1.0), columns - 1)


def fit(fields: list[str], done: float, room: int) -> str:
    """The fields and a bar of `done` in `room` characters: the bar narrows first, then goes,
    then the rate and the bytes go; whole words always (never "lef" for "left")."""
    files, size, rate, eta = fields
    for kept in ([files, size, rate, eta], [files, size, eta], [files, eta], [files]):
        text = "  ".join(kept)
        width = min(BAR_WIDTH, room - len(text) - 3)
        if width >= MIN_BAR:
            return f"[{'#' * int(width * done):<{width}}] {text}"
        if len(text) <= room:
            return text
    return files[:room]


def _progress(items: list[Item], quiet: bool) -> Progress:
    total = sum(i.size for i in items)
    wanted = not quiet and sys.stderr.isatty() and (len(items) > 1 or total > BAR_THRESHOLD)
    return Progress(sys.stderr if wanted else None, len(items), total)


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError):
        return shutil.get_terminal_size().columns


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# -- copying -----------------------------------------------------------------------------------
@dataclass
class Report:
    """What a run queued (with record ids), what it could not, and whether it was cut short."""

    total: int
    queued: list[tuple[Item, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_reached: list[str] = field(default_factory=list)
    interrupted: bool = False

    def stop(self, not_reached: list[str]) -> None:
        self.not_reached = not_reached
        self.interrupted = True

    def tell(self, target: Target, quiet: bool, plan_failed: list[tuple[str, str]]) -> int:
        """Say what happened; the exit status so far."""
        for name, why in plan_failed + self.failed:
            print(f"{PROG}: not queued: {name}: {why}", file=sys.stderr)
        if self.interrupted:
            missed = [s for s, _ in self.failed] + self.not_reached
            print(
                f"{PROG}: interrupted: queued {len(self.queued)} of {_files(self.total)}; "
                f"not queued: {_names(missed)}",
                file=sys.stderr,
            )
            return EX_INTERRUPTED
        if not quiet:
            size = _size(sum(i.size for i, _ in self.queued))
            total = self.total + len(plan_failed)
            count = f"{len(self.queued)} of " if len(self.queued) < total else ""
            print(f"queued {count}{_files(total)} ({size}) to {target.uri(target.key)}")
        return 1 if self.failed or plan_failed else 0


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    more = len(names) - SHOWN_AT_MOST
    return ", ".join(names[:SHOWN_AT_MOST]) + (f" and {more} more" if more > 0 else "")


class Passage:
    """One file on its way: the incoming_tmp file this copy holds (locked) and its record."""

    def __init__(self, layout: Layout, ref: FileRef) -> None:
        self.ref = ref
        self.tmp = layout.path(State.INCOMING_TMP, ref)
        self.final = layout.path(State.INCOMING, ref)
        self.fd: int | None = None
        self.record_id: int | None = None

    def published(self) -> bool:
        return self.fd is not None and _same_file(self.fd, self.final)

    def abandon(self, reason: Reason) -> bool:
        """Undo what did not reach incoming/; True if the file had reached it after all."""
        if self.published():
            return True
        if self.fd is not None and _same_file(self.fd, self.tmp):
            with suppress(FileNotFoundError):
                os.unlink(self.tmp)
        if self.record_id is not None:
            records.abandon(self.record_id, reason)
        return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


class Copier:
    """Copies planned files into incoming_tmp, syncs them, and renames them into incoming/."""

    def __init__(
        self,
        layout: Layout,
        target: Target,
        progress: Progress,
        own: ObjectOptions | None = None,
    ) -> None:
        self.layout = layout
        self.target = target
        self.progress = progress
        self.own = own.to_json().encode() if own is not None else None
        self.synced_dirs: set[str] = set()

    def run(self, items: list[Item]) -> Report:
        report = Report(total=len(items))
        try:
            for index, item in enumerate(items):
                try:
                    report.queued.append((item, self.queue_one(item)))
                except NotQueued as exc:
                    report.failed.append((item.shown, str(exc)))
                except Interrupted as exc:
                    if exc.published and exc.record_id is not None:
                        report.queued.append((item, exc.record_id))
                    report.stop([i.shown for i in items[index + 1 if exc.published else index :]])
                    break
                except KeyboardInterrupt:  # between files: this one was not started
                    report.stop([i.shown for i in items[index:]])
                    break
                self.progress.file_done()
        finally:
            self.progress.close()
        self.sync_dirs()
        return report

    def queue_one(self, item: Item) -> int:
        """incoming_tmp, fsync, rename into incoming/, recording both states; the record id."""
        src, info = _open_source(item.path)
        passage = Passage(self.layout, FileRef(self.target.profile, self.target.bucket, item.key))
        try:
            return self._queue(src, info, item, passage)
        except NotQueued as exc:
            passage.abandon(exc.reason)
            raise
        except (OSError, records.DatabaseError) as exc:
            if not passage.abandon(Reason.COPY_FAILED) or passage.record_id is None:
                raise NotQueued(_describe(exc)) from None
            return passage.record_id  # it reached incoming/; the supervisor continues the record
        except KeyboardInterrupt:
            raise Interrupted(passage.abandon(Reason.INTERRUPTED), passage.record_id) from None
        finally:
            os.close(src)
            passage.close()

    def _queue(self, src: int, info: os.stat_result, item: Item, passage: Passage) -> int:
        passage.fd = _open_tmp(passage.tmp)
        created = fsops.creation_date(item.path)
        rid = passage.record_id = records.record_queued(
            passage.ref, State.INCOMING_TMP, created, info.st_size
        )
        if self.own is not None:
            _set_options(passage.fd, self.own)
        self._copy(src, passage.fd)
        os.fsync(passage.fd)
        self._publish(passage)
        records.record_queued(passage.ref, State.INCOMING, created, info.st_size, record_id=rid)
        return rid

    def _copy(self, src: int, dst: int) -> None:
        while True:
            try:
                chunk = os.read(src, CHUNK)
            except OSError as exc:
                raise NotQueued(f"read error: {exc.strerror}", Reason.READ_ERROR) from None
            if not chunk:
                return
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view) :]
            self.progress.advance(len(chunk))

    def _publish(self, passage: Passage) -> None:
        """Rename incoming_tmp -> incoming; a wiped incoming_tmp leaves the file not queued."""
        assert passage.fd is not None
        if not _same_file(passage.fd, passage.tmp):
            raise NotQueued(_WIPED, Reason.WIPED)
        make_dirs(os.path.dirname(passage.final))
        try:
            fsops.move_into(passage.tmp, passage.final)
        except FileNotFoundError:
            raise NotQueued(_WIPED, Reason.WIPED) from None
        except FileExistsError:
            # An older copy of the same key still waits in incoming/, not yet claimed. Decided
            # with the lead: the newer copy supersedes it, as a second `cp` over the same
            # destination would; the older passage's record is closed as superseded.
            os.rename(passage.tmp, passage.final)
            records.supersede_waiting(passage.ref, passage.record_id)
        self.synced_dirs.add(os.path.dirname(passage.final))

    def sync_dirs(self) -> None:
        """fsync the directories renamed into, so the renames survive a power cut."""
        for path in sorted(self.synced_dirs):
            with suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


_WIPED = "incoming_tmp was wiped under the copy (a flood-supervisor started); copy it again"


def _set_options(fd: int, data: bytes) -> None:
    """The file's own object options, as the extended attribute the uploader reads."""
    try:
        os.setxattr(fd, OPTIONS_XATTR, data)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise NotQueued(
                "the spool's filesystem keeps no extended attributes, which a file's own "
                "object options need"
            ) from None
        raise


def _open_source(path: str) -> tuple[int, os.stat_result]:
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise NotQueued(f"cannot read: {exc.strerror}", Reason.UNREADABLE) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotQueued(
            f"{_kind(info.st_mode)}, not a regular file any more", Reason.NOT_REGULAR_FILE
        )
    return fd, info


def _open_tmp(path: str) -> int:
    """Open incoming_tmp's file for this copy alone: a concurrent copy of the same key holds
    the flock until it has renamed its file away; a file left by a killed copy is reused."""
    make_dirs(os.path.dirname(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        fd = os.open(path, flags, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                os.ftruncate(fd, 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # renamed away while we waited for the lock: open the name afresh


def _same_file(fd: int, path: str) -> bool:
    try:
        there = os.lstat(path)
    except FileNotFoundError:
        return False
    ours = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot write{where}: {exc.strerror or type(exc).__name__}"
    return f"records: {exc}"


# -- waiting -----------------------------------------------------------------------------------
@dataclass
class Tally:
    """Where the files waited for stand: finished ones by outcome, the rest by why they wait."""

    total: int
    uploaded: int = 0
    failed: list[str] = field(default_factory=list)  # "URI (reason)"
    waiting: int = 0
    retrying: int = 0  # of the waiting: waiting for a retry
    held: int = 0  # of the waiting: their profile or bucket is paused

    def line(self, seconds: float) -> str:
        retry = f" ({self.retrying} for a retry)" if self.retrying else ""
        return (
            f"waiting for flood-supervisor: {self.uploaded} uploaded, {len(self.failed)} failed, "
            f"{self.waiting} waiting{retry}, {self.held} held  {_clock(seconds)}"
        )

    def summary(self, uri: str, seconds: float, pending: int) -> str:
        text = f"uploaded {self.uploaded} of {_files(self.total)} to {uri} in {seconds:.1f} s"
        if self.failed:
            text += f"; {len(self.failed)} failed: {_names(self.failed)}"
        if pending:
            text += f"; {pending} not finished"
        return text


class Waiter:
    """flood-copy --wait: polls the records until every queued file is completed or failed,
    with a progress line (redrawn on a terminal), warnings when nothing will upload the files
    (no supervisor, a hold), per-file lines with -v, and one summary at the end."""

    def __init__(self, root: Path, target: Target, verbose: bool, quiet: bool) -> None:
        self.root = root
        self.target = target
        self.verbose = verbose
        self.quiet = quiet
        self.terminal = not quiet and sys.stderr.isatty()
        self.drawn = 0  # width of the progress line on the terminal
        self.printed_at = time.monotonic()  # a plain progress line was last printed then
        self.printed = ""
        self.warned: set[str] = set()
        self.supervisor_checked = float("-inf")

    def wait(self, queued: Sequence[tuple[str, int]], timeout: float | None) -> int:
        pending = {rid: uri for uri, rid in queued}
        tally = Tally(len(pending))
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        code = 0
        try:
            while pending:
                self.finish(pending, tally)
                now = time.monotonic()
                if pending and deadline is not None and now >= deadline:
                    self.clear()
                    _say_pending(f"timed out after {timeout or 0:g} s", pending)
                    code = EX_TIMEOUT
                    break
                if pending:
                    self.warn(now)
                    self.progress(tally, now - started)
                    time.sleep(POLL_SECONDS)  # a polling interval against the deadline above
        except KeyboardInterrupt:
            self.clear()
            _say_pending("interrupted", pending)
            code = EX_INTERRUPTED
        self.clear()
        if not self.quiet:
            uri = self.target.uri(self.target.key)
            print(tally.summary(uri, time.monotonic() - started, len(pending)), flush=True)
        return code or (1 if tally.failed else 0)

    def finish(self, pending: dict[int, str], tally: Tally) -> None:
        """Take the finished files out of `pending`; count the rest by why they wait."""
        held = self.held_reason() is not None
        tally.waiting = tally.retrying = tally.held = 0
        for rid, uri, ending in _standing(pending):
            if ending is None or ending.state in TERMINAL_STATES:
                del pending[rid]
                ok = ending is not None and ending.state == State.COMPLETED
                if ok:
                    tally.uploaded += 1
                else:
                    tally.failed.append(f"{uri} ({_why(ending)})")
                if self.verbose:
                    self.clear()
                    print(_outcome_line(uri, ending), flush=True)
                elif self.quiet and not ok:  # no summary will name it
                    print(f"{PROG}: {_outcome_line(uri, ending)}", file=sys.stderr)
            elif held:
                tally.held += 1
            else:
                tally.waiting += 1
                tally.retrying += ending.retry_at is not None

    def held_reason(self) -> str | None:
        """Why the target's profile or bucket is paused, if it is."""
        for hold in records.hold_records():
            if hold.profile == self.target.profile and hold.bucket in ("", self.target.bucket):
                what = f"bucket {hold.profile}/{hold.bucket}" if hold.bucket else "profile"
                what = what if hold.bucket else f"profile {hold.profile}"
                since = utc_text(hold.since) or "?"
                detail = f": {hold.detail}" if hold.detail else ""
                return f"{what} is paused ({hold.reason} since {since}{detail})"
        return None

    def warn(self, now: float) -> None:
        """Say once why the files may not move: a hold, or no supervisor at all."""
        held = self.held_reason()
        if held is not None:
            self.warning(held + ": its files wait in incoming/ until the hold is lifted")
        if now - self.supervisor_checked >= SUPERVISOR_CHECK_SECONDS:
            self.supervisor_checked = now
            if supervisor_state(self.root)["running"] is False:
                self.warning(
                    f"no flood-supervisor holds the lock of {self.root}: the files wait in "
                    "incoming/ until one starts"
                )

    def warning(self, text: str) -> None:
        if text not in self.warned:
            self.warned.add(text)
            self.clear()
            print(f"{PROG}: warning: {text}", file=sys.stderr, flush=True)

    def progress(self, tally: Tally, seconds: float) -> None:
        if self.quiet:
            return
        line = tally.line(seconds)
        if self.terminal:
            line = line[: _columns(sys.stderr) - 1]
            sys.stderr.write("\r" + line + " " * max(0, self.drawn - len(line)))
            sys.stderr.flush()
            self.drawn = len(line)
            return
        # Not a terminal (a cron job's mail, a log): a line when the counts change, rarely.
        counts = line.rsplit("  ", 1)[0]
        now = time.monotonic()
        if counts != self.printed and now - self.printed_at >= PLAIN_PROGRESS_SECONDS:
            print(f"{PROG}: {line}", file=sys.stderr, flush=True)
            self.printed, self.printed_at = counts, now

    def clear(self) -> None:
        """Wipe the progress line off the terminal before anything else is printed."""
        if self.drawn:
            sys.stderr.write("\r" + " " * self.drawn + "\r")
            sys.stderr.flush()
            self.drawn = 0


def _standing(pending: dict[int, str]) -> list[tuple[int, str, records.Ending | None]]:
    """(record id, URI, how its passage stands: None if its record was deleted) of each."""
    found = records.endings(list(pending))
    return [(rid, uri, found.get(rid)) for rid, uri in list(pending.items())]


def _why(ending: records.Ending | None) -> str:
    if ending is None:
        return "its record was deleted"
    return str(ending.reason or ending.state)


def _outcome_line(uri: str, ending: records.Ending | None) -> str:
    if ending is not None and ending.state == State.COMPLETED:
        return f"completed {uri}"
    error = f" ({ending.error})" if ending is not None and ending.error else ""
    return f"failed {uri}: {_why(ending)}{error}"


def _say_pending(what: str, pending: dict[int, str]) -> None:
    print(
        f"{PROG}: {what}; {_files(len(pending))} not finished (still queued): "
        f"{_names(list(pending.values()))}",
        file=sys.stderr,
    )
