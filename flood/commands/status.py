"""The flood-status command: counts per profile and bucket, holds, errors, one file's history."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flood import credentials, dburl, records
from flood.commands import common
from flood.credentials import Profile
from flood.errors import ConfigError, FloodError
from flood.jobs import FileRef
from flood.layout import Layout, shown
from flood.multipart import plan
from flood.snapshot import Snapshot, snapshot, supervisor_state, utc_text
from flood.states import DIRECTORIES, State
from flood.units import shown_rate

PROG = "flood-status"
_BACKUP_RE = re.compile(r"^(.*)\.~(\d+)~$")

DESCRIPTION = """\
Without TARGET: per profile and bucket, the files in incoming/, processing/ (in flight),
waiting for a retry (and when the next is due), in failed/, and completed today (UTC); the
age of the oldest file still pending; paused profiles and buckets and why; the errors of the
last 24 hours grouped by reason.
With records shared by a fleet (PostgreSQL), a NODE column: this node's rows from its
directories and records, every other node found in the records from its records alone
(--node NAME: that node's only).
With TARGET (or `why TARGET`): the history of one file from the records, its passages on
every node. TARGET is a path in the server dir, s3://PROFILE/BUCKET/KEY, PROFILE/BUCKET/KEY
or a bare KEY."""
EPILOG = """\
Pending age is counted from a file's ctime, the time it was renamed into incoming/ or
processing/ (its mtime may be preserved from elsewhere by cp -p or rsync -a).
exit status: 0 shown; 1 TARGET has no record and no file; 2 bad usage; 78 configuration error."""


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
    if len(parts) == 3 and records.known(FileRef(*parts)):
        return [FileRef(*parts)]
    return [FileRef(p, b, target) for p, b in records.buckets_with_key(target)]


def _from_path(target: str, layout: Layout) -> FileRef | None:
    path = os.path.abspath(target)
    for state in DIRECTORIES:
        top = layout.state_dir(state)
        if path.startswith(top + os.sep):
            ref = layout.parse(state, path)
            if ref is None:
                return None
            match = _BACKUP_RE.match(ref.key)
            if match and state in (State.COMPLETED, State.FAILED):
                return FileRef(ref.profile, ref.bucket, match.group(1))
            return ref
    return None


def history(ref: FileRef, layout: Layout) -> dict[str, Any]:
    """Every passage of one key with its attempts, and where its files lie now."""
    rows = records.passages(ref)
    later = {r.requeued_from: r.id for r in rows if r.requeued_from is not None}
    return {
        "uri": shown(f"s3://{ref.profile}/{ref.bucket}/{ref.key}"),
        "profile": ref.profile,
        "bucket": ref.bucket,
        "key": shown(ref.key),
        "on_disk": on_disk(ref, layout),
        "passages": [_passage(row, later.get(row.id)) for row in rows],
        "nodes": sorted({row.node for row in rows}),
    }


def _passage(row: records.PassageRecord, requeued_to: int | None) -> dict[str, Any]:
    return {
        "id": row.id,
        "node": row.node,
        "state": row.state,
        "since": utc_text(row.since),
        "created": utc_text(row.created),
        "outcome": row.outcome,
        "size": row.size,
        "etag": row.etag,
        "checksum": row.checksum,
        "reason": row.reason,
        "error": row.error,
        "retry_count": row.retry_count,
        "next_attempt_at": utc_text(row.next_attempt_at),
        "requeued_from": row.requeued_from,
        "requeued_to": requeued_to,
        "multipart": _multipart(row.id) if row.state == State.PROCESSING else None,
        "options": json.loads(row.options) if row.options else None,
        "version_id": row.version_id,
        "hooks": [
            {"event": event, "state": state, "attempts": attempts, "error": error}
            for event, state, attempts, error in row.deliveries
        ],
        "removed": [{"reason": reason, "at": utc_text(at)} for reason, at in row.removed],
        "attempts": [
            {"attempt": a.attempt, "at": utc_text(a.at), "outcome": a.outcome, "error": a.error}
            for a in row.attempts
        ],
    }


def on_disk(ref: FileRef, layout: Layout) -> list[dict[str, Any]]:
    """The key's file in each state directory, and its numbered backups in completed/failed."""
    found = []
    for state in DIRECTORIES:
        path = layout.path(state, ref)
        names = [os.path.basename(path)]
        if state in (State.COMPLETED, State.FAILED):
            names += _backups(os.path.dirname(path), names[0])
        for name in names:
            full = os.path.join(os.path.dirname(path), name)
            try:
                size = os.lstat(full).st_size
            except OSError:
                continue
            found.append({"state": str(state), "path": shown(full), "size": size})
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


def snapshot_json(
    snap: Snapshot,
    root: Path,
    db: str,
    sup: dict[str, Any],
    fleet: Sequence[records.NodeBucket] = (),
    only: str | None = None,
) -> dict[str, Any]:
    """The snapshot of this node, and the rows of the other nodes (`fleet`, from the records);
    `only`: one node's rows."""
    now = _epoch(snap.now)
    rows = []
    own = records.node()
    for entry in snap.buckets.values() if only in (None, own) else ():
        row = {"node": own, **asdict(entry)}
        row["processing"] = entry.in_flight()
        row["next_retry_at"] = utc_text(entry.next_retry_at)
        del row["oldest_pending"]
        row["oldest_pending_age_seconds"] = (
            None if entry.oldest_pending is None else round(now - entry.oldest_pending, 3)
        )
        rows.append(row)
    rows += [
        _fleet_row(entry) for entry in fleet if entry.node != own and only in (None, entry.node)
    ]
    oldest = snap.oldest_pending()
    return {
        "generated_at": utc_text(snap.now),
        "server_dir": str(root),
        "db": db,
        "node": own,
        "nodes": sorted({own} | {e.node for e in fleet}),
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
        "misplaced": {"count": snap.misplaced_count, "paths": snap.misplaced},
        "credentials": None,
        "unknown_profiles": [],
    }


def _fleet_row(entry: records.NodeBucket) -> dict[str, Any]:
    """Another node's bucket as its records tell it (its directories are on its own host)."""
    return {
        "node": entry.node,
        "profile": entry.profile,
        "bucket": entry.bucket,
        "incoming": entry.incoming,
        "processing": max(0, entry.processing - entry.waiting_retry),
        "waiting_retry": entry.waiting_retry,
        "next_retry_at": utc_text(entry.next_retry_at),
        "failed": entry.failed,
        "completed_today": entry.completed_today,
        "ignored": 0,
        "oldest_pending_age_seconds": None,
        "paused": None,
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
    fleet = len(data.get("nodes", [])) > 1 or any(
        r["node"] != data.get("node") for r in data["buckets"]
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
    if fleet:  # a NODE column where the records are a fleet's (one node's look as before)
        lines = [("NODE", *header)] + [
            (r["node"], *line) for r, line in zip(data["buckets"], lines[1:], strict=True)
        ]
    left = {0, 1, 9} if not fleet else {0, 1, 2, 10}
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print(
            "  ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
    if not data["buckets"]:
        print("(no profile or bucket directories yet)")
    print(f"oldest pending: {age_text(data['oldest_pending_age_seconds'])}")
    _print_holds(data["paused"])
    _print_strays(data)
    for name, rate in data.get("bandwidth", {}).items():
        print(f"bandwidth: {name} at most {shown_rate(rate)}, shared by its uploaders")
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


def _print_strays(data: dict[str, Any]) -> None:
    """What nothing will upload: files not below PROFILE/BUCKET/, directories of no profile."""
    misplaced = data["misplaced"]
    if misplaced["count"]:
        more = misplaced["count"] - len(misplaced["paths"])
        print(
            f"misplaced: {_count(misplaced['count'], 'file')} in incoming/ not below "
            "PROFILE/BUCKET/ (never uploaded; move them below a bucket's directory):"
        )
        for path in misplaced["paths"]:
            print(f"  {path}")
        if more > 0:
            print(f"  and {more} more")
    if data["unknown_profiles"]:
        print(
            f"unknown profiles: {', '.join(data['unknown_profiles'])} (directories with no "
            f"profile in {data['credentials']}: their files are left alone)"
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
    named = item.get("nodes", []) != [records.node()]  # another node's passages are here too
    for p in item["passages"]:
        link = f" (requeued from #{p['requeued_from']})" if p["requeued_from"] else ""
        where = f" on node {p['node'] or '?'}" if named else ""
        print(f"  passage #{p['id']}{where}{link}: file created {p['created'] or '?'}")
        for a in p["attempts"]:
            error = f": {_one_line(a['error'])}" if a["error"] else ""
            print(f"    {a['at']}  retry {a['attempt']} {a['outcome']}{error}")
        print(f"    {p['since']}  {_ending(p)}")
        if p["options"]:
            print(f"    options: {_options_text(p['options'])}")
        for h in p["hooks"]:
            error = f": {_one_line(h['error'])}" if h["error"] else ""
            tries = _count(h["attempts"], "attempt")
            print(f"    hook on_{h['event']}: {h['state']} after {tries}{error}")
        for r in p["removed"]:
            print(f"    {r['at']}  removed from completed/ ({r['reason']})")


def _options_text(chosen: dict[str, Any]) -> str:
    """The object options of a passage on one line: key=value, tables as {k=v, ...}."""
    parts = []
    for key, value in chosen.items():
        if isinstance(value, dict):
            value = "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _multipart(record_id: int) -> dict[str, Any] | None:
    """A passage's multipart upload on record: its id and how many parts are done."""
    upload = records.multipart_of(record_id)
    if upload is None:
        return None
    total = plan(upload.file_size, upload.part_size).count
    done = sum(p.size for p in upload.parts.values())
    return {
        "upload_id": upload.upload_id,
        "parts_done": len(upload.parts),
        "parts": total,
        "bytes_done": done,
        "part_size": upload.part_size,
        "checksum": upload.checksum,
        "started": utc_text(upload.started_at),
    }


def _ending(p: dict[str, Any]) -> str:
    if p["state"] == State.COMPLETED:
        checksum = f", {p['checksum']}" if p.get("checksum") else ""
        version = f", version {p['version_id']}" if p.get("version_id") else ""
        return f"completed: size {p['size']}, ETag {p['etag'] or '-'}{checksum}{version}"
    if p["state"] == State.FAILED:
        error = _one_line(p["error"])
        reason = p["reason"] or "?"
        text = f"failed: {error if error.startswith(reason) else f'{reason}: {error}'}"
    elif p["state"] == State.PROCESSING and p["next_attempt_at"]:
        text = (
            f"processing: retry {p['retry_count']} due {p['next_attempt_at']} after "
            f"{_one_line(p['error'])}"
        )
    else:
        text = p["state"] + (f" ({p['reason']})" if p["reason"] else "")
    if p["multipart"]:
        m = p["multipart"]
        text += (
            f"; multipart upload {m['upload_id']}: {m['parts_done']} of {m['parts']} parts done "
            f"({_count(m['bytes_done'], 'byte')}, {m['checksum']})"
        )
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
    common.printable_output()
    common.quiet_when_the_reader_goes()
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


def open_records(option: str | None, root: Path) -> str:
    """Open the existing records database (a read-only command must not create one) as the
    node of the server dir's supervisor; the records as shown (a URL's password masked)."""
    path = common.records_db(PROG, option, root, create=False)
    records.open_db(path, common.node_name(None, root))
    return dburl.shown(path)


def credentials_of(option: str | None) -> credentials.CredentialsFile | None:
    """The credentials file; flood-status still works (from the directories) when the file
    cannot be read, and says so."""
    try:
        return credentials.load(option)
    except ConfigError as exc:
        print(f"{PROG}: note: {exc}; profiles are taken from the directories", file=sys.stderr)
        return None


def run(args: argparse.Namespace, target: str | None) -> int:
    root = common.server_dir(args.server_dir)
    layout = Layout(root)
    db = open_records(args.db, root)
    if target is not None:
        return show_history(target, layout, args.json)
    creds = credentials_of(args.credentials)
    profiles: Mapping[str, Profile] = creds.profiles if creds is not None else {}
    snap = snapshot(layout, sorted(profiles))
    midnight = snap.now.replace(hour=0, minute=0, second=0, microsecond=0)
    fleet = list(records.node_buckets(midnight).values())
    data = snapshot_json(snap, root, db, supervisor_state(root), fleet, args.node)
    if creds is not None:
        data["credentials"] = str(creds.path)
        data["unknown_profiles"] = sorted(layout.profiles_present() - set(profiles))
    data["bandwidth"] = {
        name: p.max_bandwidth for name, p in sorted(profiles.items()) if p.max_bandwidth
    }
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
