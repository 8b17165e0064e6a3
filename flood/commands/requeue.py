"""The flood-requeue command: failed files back into incoming/, each with a new linked record."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import peewee as pw

from flood import fsops, records
from flood.commands import common
from flood.errors import ConfigError, FloodError
from flood.jobs import FileRef
from flood.layout import FAILED, INCOMING, Layout
from flood.records import FileRecord

PROG = "flood-requeue"
_BACKUP_RE = re.compile(r"^(.*)\.~(\d+)~$")

DESCRIPTION = """\
Moves files from SERVER_DIR/failed/ back into incoming/ (the rename the watcher sees, so a
running supervisor uploads them at once; a stopped one at its next start). Each moved file gets
a new record linked to its failed one (requeued_from). Choose the files with --reason,
--profile and --bucket, or take every failed file with --all."""
EPILOG = """\
Older failures of the same key, kept in failed/ as KEY.~N~, are moved only with --all, under
their key, oldest first, one per key and run: only one file of a name can wait in incoming/,
and uploading them in the order they failed leaves the newest bytes in the bucket. Run
flood-requeue --all again once the first is uploaded to move the next. A name already waiting
in incoming/ is never overwritten: that file is skipped and reported.
exit status: 0 every chosen file moved (or would be, with --dry-run); 1 some were skipped;
2 bad usage; 78 configuration error."""


@dataclass(frozen=True)
class Candidate:
    """One file in failed/: its key, the name it has there, and the reason it failed."""

    ref: FileRef
    name: str  # the key itself, or KEY.~N~
    generation: int  # N of KEY.~N~; the bare key is the newest (a large number)
    record_id: int | None
    reason: str

    @property
    def is_backup(self) -> bool:
        return self.name != self.ref.key


NEWEST = 1 << 30


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
    p.add_argument("--dry-run", action="store_true", help="say what would move; move nothing")
    common.add_location_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not (args.all or args.reason or args.profile or args.bucket):
        p.error("choose files with --reason, --profile or --bucket, or take all with --all")
    try:
        return run(args)
    except FloodError as exc:
        return common.fail(PROG, str(exc), exc.exit_code)
    finally:
        records.close_db()


def run(args: argparse.Namespace) -> int:
    layout = Layout(common.server_dir(args.server_dir))
    open_records(common.db_path(args.db))
    chosen, notes = choose(layout, args)
    moved, skipped = 0, 0
    for cand in chosen:
        problem = None if args.dry_run else requeue(layout, cand)
        verb = "would requeue" if args.dry_run else "requeued"
        if problem is None:
            moved += 1
            print(f"{verb} {_shown(cand)}")
        else:
            skipped += 1
            print(f"{PROG}: skipped {_shown(cand)}: {problem}", file=sys.stderr)
    for note in notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    files = "file" if moved == 1 else "files"
    print(
        f"{'would move' if args.dry_run else 'moved'} {moved} {files} to incoming/"
        + (f"; skipped {skipped}" if skipped else "")
    )
    return 1 if skipped else 0


def open_records(path: str) -> None:
    """Open the records, creating them as flood-copy does (files may be requeued before a
    supervisor ever ran)."""
    try:
        records.open_db(path)
    except (OSError, pw.PeeweeException) as exc:
        raise ConfigError(f"cannot open the records database {path}: {exc}") from None


def _shown(cand: Candidate) -> str:
    text = f"failed/{cand.ref.profile}/{cand.ref.bucket}/{cand.name}"
    if cand.is_backup:
        text += f" as s3://{cand.ref.profile}/{cand.ref.bucket}/{cand.ref.key}"
    return text + (f" (record #{cand.record_id}, {cand.reason})" if cand.record_id else "")


# -- which files -------------------------------------------------------------------------------
def candidates(layout: Layout) -> list[Candidate]:
    """Every file in failed/, each matched to the failed record it most likely belongs to."""
    by_key: dict[FileRef, list[tuple[int, str]]] = {}
    for path in layout.walk_files(FAILED):
        ref = layout.parse(FAILED, path)
        if ref is None:
            continue
        match = _BACKUP_RE.match(ref.key)
        if match:
            ref, gen = FileRef(ref.profile, ref.bucket, match.group(1)), int(match.group(2))
        else:
            gen = NEWEST
        by_key.setdefault(ref, []).append((gen, os.path.basename(path)))
    found = []
    for ref, names in by_key.items():
        rows = _unrequeued_failures(ref)
        # Newest name first against the newest failed record: mv --backup=numbered keeps the
        # newest under the name and numbers older ones upwards in the order they came.
        for (gen, name), row in zip(
            sorted(names, reverse=True), rows + [None] * len(names), strict=False
        ):
            found.append(
                Candidate(
                    ref,
                    _name_key(ref, name),
                    gen,
                    int(row.id) if row is not None else None,
                    (row.reason or "unknown") if row is not None else "unknown",
                )
            )
    return sorted(found, key=lambda c: (c.ref, c.generation))


def _name_key(ref: FileRef, name: str) -> str:
    """The name below failed/P/B/ as a key-shaped path (KEY or KEY.~N~ in KEY's directory)."""
    head = ref.key.rsplit("/", 1)[0] + "/" if "/" in ref.key else ""
    return head + name


def _unrequeued_failures(ref: FileRef) -> list[FileRecord]:
    """Failed records of this key that no later record was requeued from, newest first."""
    requeued = FileRecord.select(FileRecord.requeued_from).where(
        FileRecord.requeued_from.is_null(False)
    )
    return list(
        FileRecord.select()
        .where(
            (FileRecord.profile == ref.profile)
            & (FileRecord.bucket == ref.bucket)
            & (FileRecord.filepath == ref.key)
            & (FileRecord.current_state == FAILED)
            & FileRecord.id.not_in(requeued)
        )
        .order_by(FileRecord.id.desc())
    )


def choose(layout: Layout, args: argparse.Namespace) -> tuple[list[Candidate], list[str]]:
    """The files to move (at most one per key: the oldest chosen failure) and notes on the rest."""
    chosen: dict[FileRef, Candidate] = {}
    notes: list[str] = []
    for cand in candidates(layout):
        if not _selected(cand, args):
            continue
        if cand.is_backup and not args.all:
            notes.append(
                f"not moved failed/{cand.ref.profile}/{cand.ref.bucket}/{cand.name}: an "
                f"older failure of {cand.ref.key} (use --all)"
            )
        elif cand.ref in chosen:
            notes.append(
                f"not moved yet failed/{cand.ref.profile}/{cand.ref.bucket}/{cand.name}:"
                f" an older failure of {cand.ref.key} goes first; run again once "
                "it is uploaded"
            )
        else:
            chosen[cand.ref] = cand
    return list(chosen.values()), notes


def _selected(cand: Candidate, args: argparse.Namespace) -> bool:
    return (
        (not args.profile or cand.ref.profile == args.profile)
        and (not args.bucket or cand.ref.bucket == args.bucket)
        and (not args.reason or cand.reason == args.reason)
    )


# -- moving ------------------------------------------------------------------------------------
def requeue(layout: Layout, cand: Candidate) -> str | None:
    """Move one file into incoming/ under its key with a new record; None, or why not."""
    src = os.path.join(layout.bucket_dir(FAILED, cand.ref.profile, cand.ref.bucket), cand.name)
    dst = layout.path(INCOMING, cand.ref)
    if os.path.lexists(dst):
        return f"{dst} is waiting already; not overwritten"
    try:
        size = os.lstat(src).st_size
    except FileNotFoundError:
        return "it is gone from failed/"
    # The record comes first, as flood-copy's does: the uploader that claims the file at once
    # continues a passage in incoming_tmp when none in incoming exists.
    record_id = _new_record(cand, size)
    try:
        fsops.move_into(src, dst)
    except (FileExistsError, FileNotFoundError, OSError) as exc:
        _abandon(record_id)
        if isinstance(exc, FileExistsError):
            return f"{dst} is waiting already; not overwritten"
        return f"cannot move it: {exc.strerror or exc}"
    records.record_queued(cand.ref, INCOMING, None, size, record_id=record_id)
    return None


def _new_record(cand: Candidate, size: int) -> int:
    old = FileRecord.get_or_none(FileRecord.id == cand.record_id) if cand.record_id else None
    with records.write():
        row = FileRecord.create(
            profile=cand.ref.profile,
            bucket=cand.ref.bucket,
            filepath=cand.ref.key,
            file_creation_date=old.file_creation_date if old is not None else None,
            current_state="incoming_tmp",
            size=size,
            requeued_from=cand.record_id,
        )
    return int(row.id)


def _abandon(record_id: int) -> None:
    with records.write():
        FileRecord.update(
            current_state="abandoned", reason="requeue_skipped", last_updated=records.utcnow()
        ).where(
            (FileRecord.id == record_id) & (FileRecord.current_state == "incoming_tmp")
        ).execute()
