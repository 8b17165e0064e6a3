"""Failed files back into incoming/: which files a selection means, and the move of one with
a new record linked to its failed one (flood-requeue, and later the supervisor's own sweep)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from flood import fsops, records
from flood.jobs import FileRef
from flood.layout import Layout, shown
from flood.states import Reason, State

_BACKUP_RE = re.compile(r"^(.*)\.~(\d+)~$")
NEWEST = 1 << 30


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

    def shown(self) -> str:
        """failed/P/B/NAME [as s3://P/B/KEY] (record #N, reason), printable whatever its bytes."""
        text = f"failed/{self.ref.profile}/{self.ref.bucket}/{shown(self.name)}"
        if self.is_backup:
            text += f" as s3://{self.ref.profile}/{self.ref.bucket}/{shown(self.ref.key)}"
        return text + (f" (record #{self.record_id}, {self.reason})" if self.record_id else "")


@dataclass(frozen=True)
class Selection:
    """Which failed files: by reason, profile and bucket; `backups` takes KEY.~N~ as well."""

    reason: str | None = None
    profile: str | None = None
    bucket: str | None = None
    backups: bool = False

    def admits(self, cand: Candidate) -> bool:
        return (
            (not self.profile or cand.ref.profile == self.profile)
            and (not self.bucket or cand.ref.bucket == self.bucket)
            and (not self.reason or cand.reason == self.reason)
        )


def candidates(layout: Layout) -> list[Candidate]:
    """Every file in failed/, each matched to the failed record it most likely belongs to."""
    by_key: dict[FileRef, list[tuple[int, str]]] = {}
    for path in layout.walk_files(State.FAILED):
        ref = layout.parse(State.FAILED, path)
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
        failures = records.unrequeued_failures(ref)
        # Newest name first against the newest failed record: mv --backup=numbered keeps the
        # newest under the name and numbers older ones upwards in the order they came.
        pairs = zip(sorted(names, reverse=True), failures + [None] * len(names), strict=False)
        for (gen, name), failure in pairs:
            record_id = failure.id if failure is not None else None
            reason = (failure.reason if failure is not None else None) or "unknown"
            found.append(Candidate(ref, _name_key(ref, name), gen, record_id, reason))
    return sorted(found, key=lambda c: (c.ref, c.generation))


def _name_key(ref: FileRef, name: str) -> str:
    """The name below failed/P/B/ as a key-shaped path (KEY or KEY.~N~ in KEY's directory)."""
    head = ref.key.rsplit("/", 1)[0] + "/" if "/" in ref.key else ""
    return head + name


def choose(layout: Layout, selection: Selection) -> tuple[list[Candidate], list[str]]:
    """The files to move (at most one per key: the oldest chosen failure) and notes on the rest."""
    chosen: dict[FileRef, Candidate] = {}
    notes: list[str] = []
    for cand in candidates(layout):
        if not selection.admits(cand):
            continue
        where = f"failed/{cand.ref.profile}/{cand.ref.bucket}/{shown(cand.name)}"
        if cand.is_backup and not selection.backups:
            notes.append(
                f"not moved {where}: an older failure of {shown(cand.ref.key)} (use --all)"
            )
        elif cand.ref in chosen:
            notes.append(
                f"not moved yet {where}: an older failure of {shown(cand.ref.key)} goes first; "
                "run again once it is uploaded"
            )
        else:
            chosen[cand.ref] = cand
    return list(chosen.values()), notes


def requeue(layout: Layout, cand: Candidate) -> str | None:
    """Move one file into incoming/ under its key with a new record; None, or why not."""
    src = os.path.join(
        layout.bucket_dir(State.FAILED, cand.ref.profile, cand.ref.bucket), cand.name
    )
    dst = layout.path(State.INCOMING, cand.ref)
    if os.path.lexists(dst):
        return f"{shown(dst)} is waiting already; not overwritten"
    try:
        size = os.lstat(src).st_size
    except FileNotFoundError:
        return "it is gone from failed/"
    # The record comes first, as flood-copy's does: the uploader that claims the file at once
    # continues a passage in incoming_tmp when none in incoming exists.
    record_id = records.record_requeued(cand.ref, cand.record_id, size)
    try:
        fsops.move_into(src, dst)
    except OSError as exc:
        records.abandon(record_id, Reason.REQUEUE_SKIPPED)
        if isinstance(exc, FileExistsError):
            return f"{shown(dst)} is waiting already; not overwritten"
        return f"cannot move it: {exc.strerror or exc}"
    records.record_queued(cand.ref, State.INCOMING, None, size, record_id=record_id)
    return None
