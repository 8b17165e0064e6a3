"""The flood-audit command: the completed records compared with the objects in the buckets."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from collections.abc import Sequence
from typing import Any

from flood import credentials, dburl, records
from flood.audit import Audit, Discrepancy, Report, Seen, TokenBucket, Unchecked
from flood.commands import common
from flood.errors import ConfigError, FloodError
from flood.jobs import FileRef
from flood.layout import Layout, shown
from flood.snapshot import utc_text
from flood.states import Finding, State

PROG = "flood-audit"
DESCRIPTION = """\
Checks that what Flood uploaded is still there: for the newest completed passage of each key
in the records, a HEAD of its object (with ChecksumMode where the record has a checksum),
compared with what was uploaded. Lists the objects that are missing, or whose size, ETag or
checksum differ from the record's, then one line of counts. Objects that could not be checked
(access denied, an unreachable server) are counted and listed apart.
Reads only: no file, record or object is changed."""
EPILOG = """\
A key uploaded again since (its newer passage in flight or completed) is judged by the newer
passage. A checksum is compared without its -N part count; an ETag without its quotes.
exit status: 0 nothing missing or different; 1 objects missing or different; 2 bad usage;
78 configuration error (credentials, records database, server dir)."""


# -- the report as data ------------------------------------------------------------------------
def _seen(seen: Seen | None) -> dict[str, Any] | None:
    if seen is None:
        return None
    return {"size": seen.size, "etag": seen.etag, "checksum": seen.checksum}


def _finding(found: Discrepancy, layout: Layout) -> dict[str, Any]:
    record = found.record
    local = layout.path(State.COMPLETED, FileRef(record.profile, record.bucket, record.key))
    return {
        "profile": record.profile,
        "bucket": record.bucket,
        "key": shown(record.key),
        "record_id": record.id,
        "completed_at": utc_text(record.at),
        "finding": str(found.finding),
        "differs": [str(d) for d in found.differs],
        "recorded": _seen(found.recorded),
        "found": _seen(found.found),
        "completed_file": shown(local) if os.path.lexists(local) else None,
    }


def _unchecked(failure: Unchecked) -> dict[str, Any]:
    record = failure.record
    return {
        "profile": record.profile,
        "bucket": record.bucket,
        "key": shown(record.key),
        "record_id": record.id,
        "reason": failure.reason,
        "kind": failure.kind,
        "error": failure.error,
    }


def document(report: Report, args: argparse.Namespace, db: str, layout: Layout) -> dict[str, Any]:
    total = report.total()
    return {
        "generated_at": utc_text(records.utcnow()),
        "db": db,
        "since": args.since_text,
        "profile": args.profile,
        "bucket": args.bucket,
        "findings": [_finding(d, layout) for d in report.discrepancies],
        "errors": [_unchecked(u) for u in report.unchecked],
        "counts": {
            "checked": total.checked,
            "missing": total.missing,
            "different": total.different,
            "errors": total.errors,
        },
    }


# -- the report as text ------------------------------------------------------------------------
def rows(finding: dict[str, Any]) -> list[tuple[str, ...]]:
    """One table row per difference (one for a missing object)."""
    where = (finding["profile"], finding["bucket"], finding["key"])
    recorded, found = finding["recorded"], finding["found"]
    if finding["finding"] == Finding.MISSING:
        return [(*where, "missing", _whole(recorded), "no object")]
    return [
        (*where, what, _text(recorded[what]), _text(found[what])) for what in finding["differs"]
    ]


def _whole(seen: dict[str, Any]) -> str:
    return Seen(seen["size"], seen["etag"], seen["checksum"]).text()


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def print_report(data: dict[str, Any]) -> None:
    header = ("PROFILE", "BUCKET", "KEY", "DIFFERS", "RECORDED", "FOUND")
    lines = [r for f in data["findings"] for r in rows(f)]
    if lines:
        table = [header, *lines]
        widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
        for line in table:
            cells = [c.ljust(w) for c, w in zip(line, widths, strict=False)]
            print("  ".join([*cells, line[-1]]).rstrip())
        local = [f for f in data["findings"] if f["completed_file"]]
        if local:
            print(
                f"{len(local)} of these still in completed/ (--json names the paths): a file "
                "moved into incoming/ is uploaded again"
            )
    else:
        print("no object missing or different")
    _print_errors(data["errors"])
    counts = data["counts"]
    print(
        f"checked {counts['checked']}: {counts['missing']} missing, {counts['different']} "
        f"different; {counts['errors']} not checked (errors)"
    )


def _print_errors(errors: list[dict[str, Any]]) -> None:
    """The objects that could not be checked, grouped by bucket and reason."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for e in errors:
        groups.setdefault((e["profile"], e["bucket"], e["reason"]), []).append(e)
    if groups:
        print("not checked:")
    for (profile, bucket, reason), found in sorted(groups.items()):
        last = found[-1]
        print(
            f"  {profile}/{bucket}: {_count(len(found), 'object')}, {reason} "
            f"(the last, {last['key']}: {last['error']})"
        )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- the command -------------------------------------------------------------------------------
def parser() -> common.Parser:
    p = common.Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--since",
        type=common.duration,
        metavar="DURATION",
        help="only what completed in the last DURATION (90s, 30m, 12h, 7d; default: all)",
    )
    p.add_argument("--profile", metavar="P", help="only this profile's objects")
    p.add_argument("--bucket", metavar="B", help="only this bucket's objects")
    p.add_argument(
        "--rate",
        type=common.pace,
        metavar="N/s",
        help="at most N HEADs a second (10/s, 600/m; default: no limit)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    common.add_location_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    common.printable_output()
    common.quiet_when_the_reader_goes()
    args = parser().parse_args(argv)
    try:
        return run(args)
    except FloodError as exc:
        return common.fail(PROG, str(exc), exc.exit_code)
    finally:
        records.close_db()


def run(args: argparse.Namespace) -> int:
    layout = Layout(common.server_dir(args.server_dir))
    creds = credentials.load(args.credentials)
    if args.profile is not None and args.profile not in creds.profiles:
        raise ConfigError(
            f"unknown profile {args.profile!r}: {creds.path} has "
            f"{', '.join(sorted(creds.profiles))}"
        )
    db = common.records_db(PROG, args.db, layout.root, create=False)
    records.open_readonly(db, common.node_name(args.node, layout.root))
    now = records.utcnow()
    since = None if args.since is None else now - dt.timedelta(seconds=args.since)
    args.since_text = utc_text(since)
    pacer = TokenBucket(args.rate) if args.rate else None
    report = Audit(creds.profiles, pacer).run(since, now, args.profile, args.bucket)
    data = document(report, args, dburl.shown(db), layout)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print_report(data)
    return 1 if data["findings"] else 0
