"""What flood-status and the metrics both show: per profile and bucket, the files in each
state (counted in the directories) beside what the records say, holds and recent errors."""

from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flood import records
from flood.layout import LOCK_NAME, Layout, shown
from flood.settings import DEFAULT_IGNORE
from flood.states import State

ERROR_WINDOW = dt.timedelta(hours=24)
MISPLACED_SHOWN = 20  # misplaced files named; the rest are counted
_CODE_RE = re.compile(r"An error occurred \((\w+)\)")


def utc_text(value: dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a Z (the records hold naive UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


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
    # Files in incoming/ not below PROFILE/BUCKET/ (nothing uploads them): the first few
    # paths, and how many in all.
    misplaced: list[str] = field(default_factory=list)
    misplaced_count: int = 0

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
    """Count the directories and read the records (the db must be open in this thread).
    `history`: also completed-today counts and the last errors (they read older records)."""
    snap = Snapshot(now or records.utcnow())
    for profile in sorted(set(profiles) | layout.profiles_present()):
        for bucket in sorted(layout.buckets_present(profile)):
            snap.bucket(profile, bucket)
    _count_pending(layout, snap, ignore)
    _count_failed(layout, snap)
    for (profile, bucket), (count, due) in records.waiting_retries().items():
        entry = snap.bucket(profile, bucket)
        entry.waiting_retry, entry.next_retry_at = count, due
    _read_holds(snap)
    if history:
        midnight = snap.now.replace(hour=0, minute=0, second=0, microsecond=0)
        for (profile, bucket), count in records.completed_since(midnight).items():
            snap.bucket(profile, bucket).completed_today = count
        snap.errors = last_errors(snap.now - ERROR_WINDOW)
    return snap


def _count_pending(layout: Layout, snap: Snapshot, ignore: Sequence[str]) -> None:
    for state in (State.INCOMING, State.PROCESSING):
        for path in layout.walk_files(state):
            ref = layout.parse(state, path)
            if ref is None:
                if state == State.INCOMING:
                    snap.misplaced_count += 1
                    if len(snap.misplaced) < MISPLACED_SHOWN:
                        snap.misplaced.append(shown(path))
                continue
            entry = snap.bucket(ref.profile, ref.bucket)
            name = os.path.basename(path)
            if state == State.INCOMING and any(fnmatch.fnmatchcase(name, p) for p in ignore):
                entry.ignored += 1
                continue
            try:
                ctime = os.lstat(path).st_ctime
            except FileNotFoundError:
                continue  # moved on while we looked
            if state == State.INCOMING:
                entry.incoming += 1
            else:
                entry.processing += 1
            if entry.oldest_pending is None or ctime < entry.oldest_pending:
                entry.oldest_pending = ctime


def _count_failed(layout: Layout, snap: Snapshot) -> None:
    for path in layout.walk_files(State.FAILED):
        ref = layout.parse(State.FAILED, path)
        if ref is not None:
            snap.bucket(ref.profile, ref.bucket).failed += 1


def _read_holds(snap: Snapshot) -> None:
    for hold in records.hold_records():
        snap.holds.append(
            {
                "profile": hold.profile,
                "bucket": hold.bucket or None,
                "reason": hold.reason,
                "detail": hold.detail,
                "since": utc_text(hold.since),
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
    for problem in records.problems_since(since):
        reason = problem.reason or _error_type(problem.error)
        group = groups.setdefault(
            (problem.state, reason),
            {
                "state": problem.state,
                "reason": reason,
                "files": 0,
                "last_at": None,
                "last_error": None,
                "buckets": [],
            },
        )
        group["files"] += 1
        group["last_at"] = utc_text(problem.at)
        group["last_error"] = problem.error
        where = f"{problem.profile}/{problem.bucket}"
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
