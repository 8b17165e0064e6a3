"""The flood-status command: counts per profile and bucket, holds, errors, one file's history."""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import peewee as pw

from flood import credentials, records
from flood.commands import common
from flood.errors import ConfigError, FloodError
from flood.jobs import FileRef
from flood.layout import COMPLETED, FAILED, INCOMING, PROCESSING, STATES, Layout
from flood.records import FileRecord, Hold, RetryAttempt
from flood.settings import DEFAULT_IGNORE

PROG = "flood-status"
ERROR_WINDOW = dt.timedelta(hours=24)
LOCK_NAME = ".flood.lock"  # supervisor.startup.LOCK_NAME (flood/ does not import supervisor/)
_BACKUP_RE = re.compile(r"^(.*)\.~(\d+)~$")
_CODE_RE = re.compile(r"An error occurred \((\w+)\)")

DESCRIPTION = """\
Without TARGET: per profile and bucket, the files in incoming/, processing/ (in flight),
waiting for a retry (and when the next is due), in failed/, and completed today (UTC); the
age of the oldest file still pending; paused profiles and buckets and why; the errors of the
last 24 hours grouped by reason.
With TARGET (or `why TARGET`): the history of one file from the records. TARGET is a path in
the server dir, s3://PROFILE/BUCKET/KEY, PROFILE/BUCKET/KEY or a bare KEY."""
EPILOG = """\
Pending age is counted from a file's ctime, the time it was renamed into incoming/ or
processing/ (its mtime may be preserved from elsewhere by cp -p or rsync -a).
exit status: 0 shown; 1 TARGET has no record and no file; 2 bad usage; 78 configuration error."""


def utc_text(value: dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a Z (the records hold naive UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def as_datetime(value: Any) -> dt.datetime | None:
    """A record's time (peewee may hand back text from aggregates) as naive UTC."""
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


# -- the snapshot ------------------------------------------------------------------------------
@dataclass
class BucketState:
    """What one profile's bucket has in each state, and how old its oldest pending file is."""

    profile: str
    bucket: str
    incoming: int = 0
    processing: int = 0
    waiting_retry: int = 0
    next_retry_at: dt.datetime | None = None
    failed: int = 0
    completed_today: int = 0
    ignored: int = 0
    oldest_pending: float | None = None  # epoch seconds (ctime)
    paused: str | None = None

    def in_flight(self) -> int:
        """Files in processing/ that are not waiting for a retry."""
        return max(0, self.processing - self.waiting_retry)


@dataclass
class Snapshot:
    """Everything flood-status shows, gathered once."""

    now: dt.datetime
    buckets: dict[tuple[str, str], BucketState] = field(default_factory=dict)
    holds: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def bucket(self, profile: str, bucket: str) -> BucketState:
        key = (profile, bucket)
        if key not in self.buckets:
            self.buckets[key] = BucketState(profile, bucket)
        return self.buckets[key]

    def oldest_pending(self) -> float | None:
        ages = [b.oldest_pending for b in self.buckets.values() if b.oldest_pending is not None]
        return min(ages) if ages else None


def snapshot(
    layout: Layout,
    profiles: Iterable[str] = (),
    ignore: Sequence[str] = DEFAULT_IGNORE,
    now: dt.datetime | None = None,
    history: bool = True,
) -> Snapshot:
    """Count the directories and query the records (the db must be open in this thread).
    `history`: also completed-today counts and the last errors (they read older records)."""
    snap = Snapshot(now or records.utcnow())
    for profile in sorted(set(profiles) | layout.profiles_present()):
        for bucket in sorted(layout.buckets_present(profile)):
            snap.bucket(profile, bucket)
    _count_pending(layout, snap, ignore)
    _count_failed(layout, snap)
    _count_waiting(snap)
    _read_holds(snap)
    if history:
        _count_completed_today(snap)
        snap.errors = last_errors(snap.now - ERROR_WINDOW)
    return snap


def _count_pending(layout: Layout, snap: Snapshot, ignore: Sequence[str]) -> None:
    for state in (INCOMING, PROCESSING):
        for path in layout.walk_files(state):
            ref = layout.parse(state, path)
            if ref is None:
                continue
            entry = snap.bucket(ref.profile, ref.bucket)
            name = os.path.basename(path)
            if state == INCOMING and any(fnmatch.fnmatchcase(name, p) for p in ignore):
                entry.ignored += 1
                continue
            try:
                ctime = os.lstat(path).st_ctime
            except FileNotFoundError:
                continue  # moved on while we looked
            if state == INCOMING:
                entry.incoming += 1
            else:
                entry.processing += 1
            if entry.oldest_pending is None or ctime < entry.oldest_pending:
                entry.oldest_pending = ctime


def _count_failed(layout: Layout, snap: Snapshot) -> None:
    for path in layout.walk_files(FAILED):
        ref = layout.parse(FAILED, path)
        if ref is not None:
            snap.bucket(ref.profile, ref.bucket).failed += 1


def _count_waiting(snap: Snapshot) -> None:
    query = (
        FileRecord.select(
            FileRecord.profile,
            FileRecord.bucket,
            pw.fn.COUNT(FileRecord.id).alias("n"),
            pw.fn.MIN(FileRecord.next_attempt_at).alias("due"),
        )
        .where((FileRecord.current_state == PROCESSING) & FileRecord.next_attempt_at.is_null(False))
        .group_by(FileRecord.profile, FileRecord.bucket)
    )
    rows = cast(Iterable[dict[str, Any]], query.dicts())  # peewee types .dicts() as models
    for row in rows:
        entry = snap.bucket(row["profile"], row["bucket"])
        entry.waiting_retry = int(row["n"])
        entry.next_retry_at = as_datetime(row["due"])


def _count_completed_today(snap: Snapshot) -> None:
    midnight = snap.now.replace(hour=0, minute=0, second=0, microsecond=0)
    query = (
        FileRecord.select(
            FileRecord.profile, FileRecord.bucket, pw.fn.COUNT(FileRecord.id).alias("n")
        )
        .where((FileRecord.current_state == COMPLETED) & (FileRecord.last_updated >= midnight))
        .group_by(FileRecord.profile, FileRecord.bucket)
    )
    rows = cast(Iterable[dict[str, Any]], query.dicts())  # peewee types .dicts() as models
    for row in rows:
        snap.bucket(row["profile"], row["bucket"]).completed_today = int(row["n"])


def _read_holds(snap: Snapshot) -> None:
    for hold in Hold.select().order_by(Hold.profile, Hold.bucket):
        snap.holds.append(
            {
                "profile": hold.profile,
                "bucket": hold.bucket or None,
                "reason": hold.reason,
                "detail": hold.detail,
                "since": utc_text(as_datetime(hold.since)),
            }
        )
        targets = (
            [b for (p, _), b in snap.buckets.items() if p == hold.profile]
            if not hold.bucket
            else [snap.bucket(hold.profile, hold.bucket)]
        )
        for entry in targets:
            entry.paused = hold.reason


def last_errors(since: dt.datetime) -> list[dict[str, Any]]:
    """Failed passages since then, and files now waiting for a retry, grouped by reason."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    failed = (
        FileRecord.select()
        .where((FileRecord.current_state == FAILED) & (FileRecord.last_updated >= since))
        .order_by(FileRecord.id)
    )
    waiting = (
        FileRecord.select()
        .where((FileRecord.current_state == PROCESSING) & FileRecord.next_attempt_at.is_null(False))
        .order_by(FileRecord.id)
    )
    for state, rows in (("failed", failed), ("retrying", waiting)):
        for row in rows.iterator():
            reason = row.reason or _error_type(row.error)
            group = groups.setdefault(
                (state, reason),
                {
                    "state": state,
                    "reason": reason,
                    "files": 0,
                    "last_at": None,
                    "last_error": None,
                    "buckets": [],
                },
            )
            group["files"] += 1
            group["last_at"] = utc_text(as_datetime(row.last_updated))
            group["last_error"] = row.error
            where = f"{row.profile}/{row.bucket}"
            if where not in group["buckets"]:
                group["buckets"].append(where)
    return sorted(groups.values(), key=lambda g: (g["state"], -g["files"], g["reason"]))


def _error_type(error: str | None) -> str:
    """A retry's record keeps the error text only: the S3 code in it, else the exception name,
    stands for the reason."""
    if not error:
        return "unknown"
    code = _CODE_RE.search(error)
    if code:
        return code.group(1)
    head = error.split(":", 1)[0].strip()
    return head if head.isidentifier() else "unknown"


def supervisor_state(root: Path) -> dict[str, Any]:
    """Whether a supervisor holds the server dir's lock, read from /proc/locks (never by taking
    the lock: a probe would make a supervisor starting at that moment exit 75)."""
    path = root / LOCK_NAME
    try:
        info = os.stat(path)
        pid_text = path.read_text().strip()
    except OSError:
        return {"running": False, "pid": None}
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks") as handle:
            held = any(wanted in line.split() and "FLOCK" in line for line in handle)
    except OSError:
        return {"running": None, "pid": int(pid_text) if pid_text.isdigit() else None}
    return {"running": held, "pid": int(pid_text) if held and pid_text.isdigit() else None}


# -- one file's history ------------------------------------------------------------------------
def resolve(target: str, layout: Layout) -> list[FileRef]:
    """The files TARGET may mean: a spool path, s3://P/B/KEY, P/B/KEY, or a bare key."""
    if target.startswith("s3://"):
        profile, _, rest = target.removeprefix("s3://").partition("/")
        bucket, _, key = rest.partition("/")
        return [FileRef(profile, bucket, key)] if key else []
    ref = _from_path(target, layout)
    if ref is not None:
        return [ref]
    parts = target.split("/", 2)
    if len(parts) == 3 and _known(FileRef(*parts)):
        return [FileRef(*parts)]
    rows = (
        FileRecord.select(FileRecord.profile, FileRecord.bucket)
        .distinct()
        .where(FileRecord.filepath == target)
        .order_by(FileRecord.profile, FileRecord.bucket)
    )
    return [FileRef(r.profile, r.bucket, target) for r in rows]


def _from_path(target: str, layout: Layout) -> FileRef | None:
    path = os.path.abspath(target)
    for state in STATES:
        top = layout.state_dir(state)
        if path.startswith(top + os.sep):
            ref = layout.parse(state, path)
            if ref is None:
                return None
            match = _BACKUP_RE.match(ref.key)
            if match and state in (COMPLETED, FAILED):
                return FileRef(ref.profile, ref.bucket, match.group(1))
            return ref
    return None


def _known(ref: FileRef) -> bool:
    return records.newest(ref) is not None


def history(ref: FileRef, layout: Layout) -> dict[str, Any]:
    """Every passage of one key with its attempts, and where its files lie now."""
    rows = list(
        FileRecord.select()
        .where(
            (FileRecord.profile == ref.profile)
            & (FileRecord.bucket == ref.bucket)
            & (FileRecord.filepath == ref.key)
        )
        .order_by(FileRecord.id)
    )
    later = {int(r.requeued_from): int(r.id) for r in rows if r.requeued_from is not None}
    return {
        "uri": f"s3://{ref.profile}/{ref.bucket}/{ref.key}",
        "profile": ref.profile,
        "bucket": ref.bucket,
        "key": ref.key,
        "on_disk": on_disk(ref, layout),
        "passages": [_passage(row, later.get(int(row.id))) for row in rows],
    }


def _passage(row: FileRecord, requeued_to: int | None) -> dict[str, Any]:
    return {
        "id": int(row.id),
        "state": row.current_state,
        "since": utc_text(as_datetime(row.last_updated)),
        "created": utc_text(as_datetime(row.file_creation_date)),
        "outcome": row.upload_outcome,
        "size": row.size,
        "etag": row.etag,
        "reason": row.reason,
        "error": row.error,
        "retry_count": row.retry_count,
        "next_attempt_at": utc_text(as_datetime(row.next_attempt_at)),
        "requeued_from": row.requeued_from,
        "requeued_to": requeued_to,
        "attempts": [
            {
                "attempt": a.attempt,
                "at": utc_text(as_datetime(a.attempted_at)),
                "outcome": a.outcome,
                "error": a.error,
            }
            for a in RetryAttempt.select()
            .where(RetryAttempt.file_record_id == row.id)
            .order_by(RetryAttempt.attempt, RetryAttempt.id)
        ],
    }


def on_disk(ref: FileRef, layout: Layout) -> list[dict[str, Any]]:
    """The key's file in each state directory, and its numbered backups in completed/failed."""
    found = []
    for state in STATES:
        path = layout.path(state, ref)
        names = [os.path.basename(path)]
        if state in (COMPLETED, FAILED):
            names += _backups(os.path.dirname(path), names[0])
        for name in names:
            full = os.path.join(os.path.dirname(path), name)
            try:
                size = os.lstat(full).st_size
            except OSError:
                continue
            found.append({"state": state, "path": full, "size": size})
    return found


def _backups(directory: str, base: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = [
        (int(m.group(2)), n) for n in names if (m := _BACKUP_RE.match(n)) and m.group(1) == base
    ]
    return [n for _, n in sorted(found, reverse=True)]


# -- output ------------------------------------------------------------------------------------
def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _epoch(now: dt.datetime) -> float:
    return now.replace(tzinfo=dt.UTC).timestamp()


def snapshot_json(snap: Snapshot, root: Path, db: str, sup: dict[str, Any]) -> dict[str, Any]:
    now = _epoch(snap.now)
    rows = []
    for entry in snap.buckets.values():
        row = asdict(entry)
        row["processing"] = entry.in_flight()
        row["next_retry_at"] = utc_text(entry.next_retry_at)
        del row["oldest_pending"]
        row["oldest_pending_age_seconds"] = (
            None if entry.oldest_pending is None else round(now - entry.oldest_pending, 3)
        )
        rows.append(row)
    oldest = snap.oldest_pending()
    return {
        "generated_at": utc_text(snap.now),
        "server_dir": str(root),
        "db": db,
        "supervisor": sup,
        "buckets": rows,
        "totals": {
            k: sum(r[k] for r in rows)
            for k in (
                "incoming",
                "processing",
                "waiting_retry",
                "failed",
                "completed_today",
                "ignored",
            )
        },
        "oldest_pending_age_seconds": None if oldest is None else round(now - oldest, 3),
        "paused": snap.holds,
        "errors": snap.errors,
    }


def print_table(data: dict[str, Any]) -> None:
    sup = data["supervisor"]
    running = (
        "running, pid {}".format(sup["pid"])
        if sup["running"]
        else "not running"
        if sup["running"] is False
        else "state unknown"
    )
    print(
        f"{data['server_dir']} (supervisor {running}); records {data['db']}; {data['generated_at']}"
    )
    header = (
        "PROFILE",
        "BUCKET",
        "INCOMING",
        "PROCESSING",
        "RETRY",
        "NEXT RETRY",
        "FAILED",
        "DONE TODAY",
        "OLDEST PENDING",
        "PAUSED",
    )
    lines = [header] + [_table_row(r, data["generated_at"]) for r in data["buckets"]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print(
            "  ".join(
                c.ljust(w) if i < 2 or i == 9 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
    if not data["buckets"]:
        print("(no profile or bucket directories yet)")
    print(f"oldest pending: {age_text(data['oldest_pending_age_seconds'])}")
    _print_holds(data["paused"])
    _print_errors(data["errors"])


def _table_row(row: dict[str, Any], now_text: str) -> tuple[str, ...]:
    due = "-"
    if row["next_retry_at"]:
        now = dt.datetime.fromisoformat(now_text.rstrip("Z"))
        wait = (dt.datetime.fromisoformat(row["next_retry_at"].rstrip("Z")) - now).total_seconds()
        due = f"in {age_text(wait)}" if wait > 0 else "due"
    ignored = f" (+{row['ignored']} ignored)" if row["ignored"] else ""
    return (
        row["profile"],
        row["bucket"],
        f"{row['incoming']}{ignored}",
        str(row["processing"]),
        str(row["waiting_retry"]),
        due,
        str(row["failed"]),
        str(row["completed_today"]),
        age_text(row["oldest_pending_age_seconds"]),
        row["paused"] or "",
    )


def _print_holds(holds: list[dict[str, Any]]) -> None:
    if not holds:
        print("paused: none")
        return
    print("paused:")
    for h in holds:
        what = f"{h['profile']}/{h['bucket']}" if h["bucket"] else f"{h['profile']} (profile)"
        print(f"  {what}: {h['reason']} since {h['since']}: {h['detail'] or ''}".rstrip(": "))


def _print_errors(errors: list[dict[str, Any]]) -> None:
    if not errors:
        print("errors (last 24 h): none")
        return
    print("errors (last 24 h failed; retrying now):")
    for g in errors:
        files = _count(g["files"], "file")
        print(
            f"  {g['state']:<8} {g['reason']}: {files} in {', '.join(g['buckets'])}; "
            f"last {g['last_at']}: {_one_line(g['last_error'])}"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _one_line(text: str | None, width: int = 160) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def print_history(item: dict[str, Any]) -> None:
    print(item["uri"])
    where = "; ".join(
        f"{f['state']}: {f['path']} ({_count(f['size'], 'byte')})" for f in item["on_disk"]
    )
    print(f"  on disk: {where or 'nowhere in the server dir'}")
    if not item["passages"]:
        print("  no record")
    for p in item["passages"]:
        link = f" (requeued from #{p['requeued_from']})" if p["requeued_from"] else ""
        print(f"  passage #{p['id']}{link}: file created {p['created'] or '?'}")
        for a in p["attempts"]:
            error = f": {_one_line(a['error'])}" if a["error"] else ""
            print(f"    {a['at']}  retry {a['attempt']} {a['outcome']}{error}")
        print(f"    {p['since']}  {_ending(p)}")


def _ending(p: dict[str, Any]) -> str:
    if p["state"] == COMPLETED:
        return f"completed: size {p['size']}, ETag {p['etag'] or '-'}"
    if p["state"] == FAILED:
        error = _one_line(p["error"])
        reason = p["reason"] or "?"
        text = f"failed: {error if error.startswith(reason) else f'{reason}: {error}'}"
    elif p["state"] == PROCESSING and p["next_attempt_at"]:
        text = (
            f"processing: retry {p['retry_count']} due {p['next_attempt_at']} after "
            f"{_one_line(p['error'])}"
        )
    else:
        text = p["state"] + (f" ({p['reason']})" if p["reason"] else "")
    if p["requeued_to"]:
        text += f"; requeued as #{p['requeued_to']}"
    return text


# -- the command -------------------------------------------------------------------------------
def parser() -> common.Parser:
    p = common.Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "target",
        nargs="*",
        metavar="[why] TARGET",
        help="a file's path in the server dir, s3://PROFILE/BUCKET/KEY or KEY",
    )
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    common.add_location_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    target = list(args.target)
    if target and target[0] == "why":
        target = target[1:]
        if not target:
            p.error("why needs a TARGET")
    if len(target) > 1:
        p.error("one TARGET at a time")
    try:
        return run(args, target[0] if target else None)
    except FloodError as exc:
        return common.fail(PROG, str(exc), exc.exit_code)
    finally:
        records.close_db()


def open_records(option: str | None) -> str:
    """Open the existing records database (a read-only command must not create one)."""
    path = common.db_path(option)
    if not os.path.exists(path):
        raise ConfigError(f"no records database at {path} (--db, else $FLOOD_DB, else ./flood.db)")
    try:
        records.open_db(path)
    except (OSError, pw.PeeweeException) as exc:
        raise ConfigError(f"cannot open the records database {path}: {exc}") from None
    return path


def profile_names(option: str | None) -> list[str]:
    """The credentials file's profiles; flood-status still works (from the directories) when
    the file cannot be read, and says so."""
    try:
        return sorted(credentials.load(option).profiles)
    except ConfigError as exc:
        print(f"{PROG}: note: {exc}; profiles are taken from the directories", file=sys.stderr)
        return []


def run(args: argparse.Namespace, target: str | None) -> int:
    root = common.server_dir(args.server_dir)
    layout = Layout(root)
    db = open_records(args.db)
    if target is not None:
        return show_history(target, layout, args.json)
    snap = snapshot(layout, profile_names(args.credentials))
    data = snapshot_json(snap, root, db, supervisor_state(root))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_table(data)
    return 0


def show_history(target: str, layout: Layout, as_json: bool) -> int:
    refs = resolve(target, layout)
    items = [history(ref, layout) for ref in refs]
    items = [i for i in items if i["passages"] or i["on_disk"]]
    if as_json:
        print(json.dumps(items, indent=2))
    for item in [] if as_json else items:
        print_history(item)
    if not items:
        print(f"{PROG}: no record and no file for {target!r}", file=sys.stderr)
        return 1
    return 0
