"""The SQLite records (peewee): a row per passage of a file, each state change a function."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from typing import Any

import peewee as pw
from playhouse.sqlite_ext import AutoIncrementField  # type: ignore[import-untyped]

from flood.jobs import FileRef

# States of a passage. `abandoned`: a copy that never reached incoming/ (its producer died).
STATES = ("incoming_tmp", "incoming", "processing", "completed", "failed", "abandoned")
OPEN_STATES = ("incoming_tmp", "incoming", "processing")
BUSY_TIMEOUT_MS = 15_000

db = pw.SqliteDatabase(None)


def text(value: str | None) -> str | None:
    """A str SQLite can store: names that are not UTF-8 (surrogate escapes) are kept
    readable with backslash escapes (b'bad\\xff' is stored as 'bad\\xff')."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return os.fsencode(value).decode("utf-8", "backslashreplace")


def utcnow() -> dt.datetime:
    """Naive UTC: every timestamp in the database is UTC."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class _Model(pw.Model):
    class Meta:
        database = db


class FileRecord(_Model):
    """One passage of one file through the spool."""

    id = AutoIncrementField()
    profile = pw.TextField()
    bucket = pw.TextField()
    filepath = pw.TextField()
    file_creation_date = pw.DateTimeField(null=True)
    current_state = pw.TextField()
    last_updated = pw.DateTimeField(default=utcnow)
    upload_outcome = pw.TextField(null=True)
    size = pw.IntegerField(null=True)
    etag = pw.TextField(null=True)
    reason = pw.TextField(null=True)
    error = pw.TextField(null=True)
    retry_count = pw.IntegerField(default=0)
    next_attempt_at = pw.DateTimeField(null=True)
    requeued_from = pw.IntegerField(null=True)

    class Meta:
        table_name = "file_records"
        indexes = ((("profile", "bucket", "filepath"), False), (("current_state",), False))


class RetryAttempt(_Model):
    """One retry of one passage (the first upload is not a retry)."""

    id = AutoIncrementField()
    file_record_id = pw.IntegerField(index=True)
    attempt = pw.IntegerField()
    attempted_at = pw.DateTimeField(default=utcnow)
    outcome = pw.TextField()
    error = pw.TextField(null=True)

    class Meta:
        table_name = "retry_attempts"


class Hold(_Model):
    """A profile (bucket '') or a bucket whose files wait in incoming/ until a check passes."""

    profile = pw.TextField()
    bucket = pw.TextField(default="")
    reason = pw.TextField()
    detail = pw.TextField(null=True)
    since = pw.DateTimeField(default=utcnow)

    class Meta:
        table_name = "holds"
        primary_key = pw.CompositeKey("profile", "bucket")


MODELS = (FileRecord, RetryAttempt, Hold)


def open_db(path: str) -> pw.SqliteDatabase:
    """Open this process's one connection (WAL, busy timeout) and create missing tables."""
    if path != ":memory:" and not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    db.init(
        path,
        pragmas={
            "journal_mode": "wal",
            "busy_timeout": BUSY_TIMEOUT_MS,
            # The directories are the truth and records are repaired from them at start-up, so
            # a commit lost to power failure (not to a crash) costs a repair, never a file.
            "synchronous": "normal",
            "foreign_keys": 0,
        },
    )
    db.connect(reuse_if_open=True)
    with db.atomic("IMMEDIATE"):
        db.create_tables(MODELS, safe=True)
    return db


def close_db() -> None:
    if not db.is_closed():
        db.close()


@contextlib.contextmanager
def write() -> Iterator[None]:
    """A write transaction that takes the lock up front (BEGIN IMMEDIATE). When SQLite has
    already rolled back itself (disk full), the original error is what propagates."""
    transaction = db.atomic("IMMEDIATE")
    transaction.__enter__()
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(pw.OperationalError):
            transaction.__exit__(type(exc), exc, exc.__traceback__)
        raise
    transaction.__exit__(None, None, None)


def newest(ref: FileRef, states: tuple[str, ...] | None = None) -> FileRecord | None:
    query = FileRecord.select().where(
        (FileRecord.profile == ref.profile)
        & (FileRecord.bucket == ref.bucket)
        & (FileRecord.filepath == text(ref.key))
    )
    if states is not None:
        query = query.where(FileRecord.current_state.in_(states))
    return query.order_by(FileRecord.id.desc()).first()  # type: ignore[no-any-return]


def record_queued(
    ref: FileRef,
    state: str,
    created: dt.datetime | None,
    size: int | None,
    record_id: int | None = None,
) -> int:
    """A producer's copy reached `state` (incoming_tmp, then incoming): one passage, one row."""
    with write():
        if record_id is not None:
            # Only forward: the supervisor may have claimed the file between the producer's
            # rename and this update, and a claimed passage must not go back to incoming.
            FileRecord.update(current_state=state, last_updated=utcnow()).where(
                (FileRecord.id == record_id) & (FileRecord.current_state == "incoming_tmp")
            ).execute()
            return record_id
        row = FileRecord.create(
            profile=ref.profile,
            bucket=ref.bucket,
            filepath=text(ref.key),
            file_creation_date=created,
            current_state=state,
            size=size,
        )
        return int(row.id)


# The two writes every file makes, as fixed SQL: peewee's query builder cost more CPU per
# file than the SQLite work itself (tests/benchmarks/hotpath.py: 1.34 ms against 0.05 ms).
_OPEN_PASSAGE = (
    "SELECT id FROM file_records WHERE profile = ? AND bucket = ? AND filepath = ?"
    " AND current_state = ? ORDER BY id DESC LIMIT 1"
)
_CONTINUE = (
    "UPDATE file_records SET current_state = 'processing', last_updated = ?, size = ?,"
    " file_creation_date = COALESCE(file_creation_date, ?) WHERE id = ?"
)
_START = (
    "INSERT INTO file_records (profile, bucket, filepath, file_creation_date,"
    " current_state, last_updated, size, retry_count)"
    " VALUES (?, ?, ?, ?, 'processing', ?, ?, 0)"
)
_COMPLETE = (
    "UPDATE file_records SET current_state = 'completed', upload_outcome = 'success',"
    " size = ?, etag = ?, reason = NULL, error = NULL, retry_count = 0,"
    " next_attempt_at = NULL, last_updated = ? WHERE id = ?"
)


def _sql(query: str, params: tuple[Any, ...]) -> Any:
    """Run fixed SQL on this process's connection (peewee's execute_sql is untyped)."""
    return db.execute_sql(query, params)  # type: ignore[no-untyped-call]


def _stamp(value: dt.datetime | None) -> str | None:
    """A datetime as peewee's DateTimeField stores it in SQLite."""
    return None if value is None else str(value)


def record_claims(claims: list[tuple[FileRef, dt.datetime | None, int]]) -> list[int]:
    """Files (ref, creation date, size) just moved into processing/, in one transaction: each
    continues its producer's passage or starts a new one. Their record ids, in order."""
    now = _stamp(utcnow())
    ids = []
    with write():
        for ref, created, size in claims:
            ids.append(_claim(ref, text(ref.key), _stamp(created), size, now))
    return ids


def _claim(ref: FileRef, key: str | None, created: str | None, size: int, now: str | None) -> int:
    # The passage that reached incoming/ first; a newer copy may still be in incoming_tmp.
    for state in ("incoming", "incoming_tmp"):
        found = _sql(_OPEN_PASSAGE, (ref.profile, ref.bucket, key, state)).fetchone()
        if found is not None:
            _sql(_CONTINUE, (now, size, created, found[0]))
            return int(found[0])
    return int(_sql(_START, (ref.profile, ref.bucket, key, created, now, size)).lastrowid)


def record_resumed(ref: FileRef, created: dt.datetime | None, size: int) -> FileRecord:
    """A file found in processing/ (after a restart): its open passage, or a new one."""
    row = newest(ref, ("processing",))
    if row is not None:
        return row
    with write():
        row = FileRecord.create(
            profile=ref.profile,
            bucket=ref.bucket,
            filepath=text(ref.key),
            file_creation_date=created,
            current_state="processing",
            size=size,
        )
    return row


def record_completions(done: list[tuple[int, int, str | None, int]]) -> None:
    """Uploads proven (record id, size, ETag, retry number), in one transaction."""
    now = _stamp(utcnow())
    with write():
        for record_id, size, etag, attempt in done:
            _sql(_COMPLETE, (size, etag, now, record_id))
            if attempt > 0:
                RetryAttempt.create(file_record_id=record_id, attempt=attempt, outcome="success")


def record_failed(record_id: int, reason: str, error: str, attempt: int) -> None:
    with write():
        FileRecord.update(
            current_state="failed",
            upload_outcome="failure",
            reason=reason,
            error=text(error),
            next_attempt_at=None,
            last_updated=utcnow(),
        ).where(FileRecord.id == record_id).execute()
        if attempt > 0:
            RetryAttempt.create(
                file_record_id=record_id, attempt=attempt, outcome="failure", error=text(error)
            )


def record_retry_scheduled(
    record_id: int, attempt: int, due: dt.datetime, error: str, failed_attempt: int
) -> None:
    """Attempt `failed_attempt` failed (0: the first upload); retry number `attempt` is due then."""
    with write():
        FileRecord.update(
            retry_count=attempt, next_attempt_at=due, error=text(error), last_updated=utcnow()
        ).where(FileRecord.id == record_id).execute()
        if failed_attempt > 0:
            RetryAttempt.create(
                file_record_id=record_id,
                attempt=failed_attempt,
                outcome="failure",
                error=text(error),
            )


def set_state(record_id: int, state: str, reason: str | None = None) -> None:
    with write():
        FileRecord.update(current_state=state, reason=reason, last_updated=utcnow()).where(
            FileRecord.id == record_id
        ).execute()


def open_passages() -> Iterator[FileRecord]:
    """Records still in an open state: what start-up repair checks against the directories."""
    yield from FileRecord.select().where(FileRecord.current_state.in_(OPEN_STATES)).iterator()


def hold(profile: str, bucket: str, reason: str, detail: str) -> bool:
    """Put a profile (bucket '') or bucket on hold; True if it was not held already."""
    with write():
        inserted = (
            Hold.insert(profile=profile, bucket=bucket, reason=reason, detail=text(detail))
            .on_conflict_ignore()
            .execute()
        )
    return bool(inserted)


def release(profile: str, bucket: str) -> bool:
    with write():
        deleted = Hold.delete().where((Hold.profile == profile) & (Hold.bucket == bucket)).execute()
    return bool(deleted)


def holds() -> dict[tuple[str, str], str]:
    return {(h.profile, h.bucket): h.reason for h in Hold.select()}
