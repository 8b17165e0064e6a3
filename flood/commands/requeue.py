"""The flood-requeue command: failed files back into incoming/, each with a new linked record."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from flood import records
from flood.commands import common
from flood.errors import FloodError
from flood.layout import Layout, shown
from flood.requeue import Selection, choose, requeue
from flood.snapshot import supervisor_state, utc_text

PROG = "flood-requeue"

DESCRIPTION = """\
Moves files from SERVER_DIR/failed/ back into incoming/ (the rename the watcher sees, so a
running supervisor uploads them at once; a stopped one at its next start). Each moved file gets
a new record linked to its failed one (requeued_from). Choose the files with --reason,
--profile and --bucket, or take every failed file with --all.
With --waiting: files in processing/ waiting for a retry are made due now instead (their
retry count kept, a note added to their record's error): a running supervisor's uploaders take
them up within a second."""
EPILOG = """\
Older failures of the same key, kept in failed/ as KEY.~N~, are moved only with --all, under
their key, oldest first, one per key and run: only one file of a name can wait in incoming/,
and uploading them in the order they failed leaves the newest bytes in the bucket. Run
flood-requeue --all again once the first is uploaded to move the next. A name already waiting
in incoming/ is never overwritten: that file is skipped and reported.
exit status: 0 every chosen file moved or made due (or would be, with --dry-run); 1 some were
skipped; 2 bad usage; 78 configuration error."""


def parser() -> common.Parser:
    p = common.Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--reason",
        metavar="CODE",
        help="only files whose failure has this reason (as flood-status shows it)",
    )
    p.add_argument("--profile", metavar="P", help="only this profile's files")
    p.add_argument("--bucket", metavar="B", help="only this bucket's files")
    p.add_argument(
        "--all",
        action="store_true",
        help="every failed file the other options allow, older failures (KEY.~N~) included",
    )
    p.add_argument(
        "--waiting",
        action="store_true",
        help="instead of failed files: make the files waiting for a retry (of --profile, "
        "--bucket) due now",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would move; move nothing")
    common.add_location_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    common.printable_output()
    p = parser()
    args = p.parse_args(argv)
    if args.waiting and (args.all or args.reason):
        p.error("--waiting takes --profile and --bucket only (a retry has no reason yet)")
    if not (args.waiting or args.all or args.reason or args.profile or args.bucket):
        p.error("choose files with --reason, --profile or --bucket, or take all with --all")
    try:
        return run_waiting(args) if args.waiting else run(args)
    except FloodError as exc:
        return common.fail(PROG, str(exc), exc.exit_code)
    finally:
        records.close_db()


def run(args: argparse.Namespace) -> int:
    root = common.server_dir(args.server_dir)
    layout = Layout(root)
    # Created if missing, as flood-copy does: files may be requeued before a supervisor ran.
    records.open_db(
        common.records_db(PROG, args.db, root, create=True), common.node_name(args.node, root)
    )
    selection = Selection(args.reason, args.profile, args.bucket, backups=args.all)
    chosen, notes = choose(layout, selection)
    moved, skipped = 0, 0
    for cand in chosen:
        problem = None if args.dry_run else requeue(layout, cand)
        verb = "would requeue" if args.dry_run else "requeued"
        if problem is None:
            moved += 1
            print(f"{verb} {cand.shown()}")
        else:
            skipped += 1
            print(f"{PROG}: skipped {cand.shown()}: {problem}", file=sys.stderr)
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    files = "file" if moved == 1 else "files"
    print(
        f"{'would move' if args.dry_run else 'moved'} {moved} {files} to incoming/"
        + (f"; skipped {skipped}" if skipped else "")
    )
    others(lambda b: b.failed, "failed")
    return 1 if skipped else 0


def others(count: Callable[[records.NodeBucket], int], what: str) -> None:
    """Say which other nodes of shared records have files this command left alone: each
    node's spool is on its own host, and only its own flood-requeue moves its files."""
    per_node: dict[str, int] = {}
    for entry in records.node_buckets(records.utcnow()).values():
        if entry.node != records.node() and count(entry):
            per_node[entry.node] = per_node.get(entry.node, 0) + count(entry)
    if per_node:
        listed = ", ".join(f"{n} ({k})" for n, k in sorted(per_node.items()))
        print(
            f"{PROG}: note: {what} files of other nodes left alone: {listed}; this acts on "
            f"node {records.node()}'s only (run flood-requeue on those nodes)",
            file=sys.stderr,
        )


def run_waiting(args: argparse.Namespace) -> int:
    """Retries due now: written in the records, which the uploaders of a running supervisor
    look at every second while files wait (nothing is restarted)."""
    root = common.server_dir(args.server_dir)
    records.open_db(
        common.records_db(PROG, args.db, root, create=False), common.node_name(args.node, root)
    )
    now = records.utcnow()
    waiting = records.waiting_passages(args.profile, args.bucket, now)
    verb = "would make due now" if args.dry_run else "due now"
    for w in waiting:
        uri = shown(f"s3://{w.ref.profile}/{w.ref.bucket}/{w.ref.key}")
        print(f"{verb}: {uri} (retry {w.retry_count}, was due {utc_text(w.due)})")
    files = "file" if len(waiting) == 1 else "files"
    others(lambda b: b.waiting_retry, "waiting")
    if not waiting:
        print("no file waits for a retry")
        return 0
    if args.dry_run:
        print(f"would make {len(waiting)} waiting {files} due now")
        return 0
    note = f" [made due at {utc_text(now)} by flood-requeue --waiting]"
    changed = records.make_due([w.id for w in waiting], note, now)
    print(f"made {changed} waiting {'file' if changed == 1 else 'files'} due now")
    state = supervisor_state(root)
    if state["running"] is False:
        print("no flood-supervisor runs: they go up when one starts")
    else:
        print("flood-supervisor's uploaders take them up within a second")
    return 0
