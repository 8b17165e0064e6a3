"""The records: a database of the previous release migrates keeping every row, one that is
newer or not Flood's is refused untouched, and the named functions keep passages straight."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import peewee as pw
import pytest

from flood import dburl, records
from flood.errors import ConfigError
from flood.jobs import FileRef
from flood.records import Claim, Completion
from flood.states import Reason, State

FIXTURE = Path(__file__).parent.parent / "fixtures" / "records-0.1.0.db"
BAD = os.fsdecode(b"bad-name-\xff.txt")


@pytest.fixture
def db(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "flood.db")
    records.open_db(path)
    yield path
    records.close_db()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The records in SQLite, then in a fresh PostgreSQL database (the test id says which):
    for the functions whose SQL differs between the two."""
    path = str(tmp_path / "flood.db")
    if request.param == "postgresql":
        path, pgpass = request.getfixturevalue("pg_database")()
        monkeypatch.setenv("PGPASSFILE", str(pgpass))
    records.open_db(path)
    yield path
    records.close_db()


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def table_rows(path: str) -> dict[str, list[tuple[object, ...]]]:
    con = sqlite3.connect(path)
    try:
        return {
            t: sorted(con.execute(f"SELECT * FROM {t}"))
            for t in ("file_records", "retry_attempts", "holds")
        }
    finally:
        con.close()


def columns(path: str, table: str) -> set[str]:
    con = sqlite3.connect(path)
    try:
        return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
    finally:
        con.close()


def test_release_1_database_migrates_keeping_every_row(tmp_path: Path) -> None:
    """The fixture written by release 0.1.0 opens, keeps every row as it was, gains every
    column and table of this schema, and records the new version; opening again is a no-op."""
    path = str(tmp_path / "old.db")
    shutil.copy(FIXTURE, path)
    before = table_rows(path)
    assert records.check_db(path) == 1
    records.open_db(path)
    try:
        after = table_rows(path)
        for table, rows in before.items():
            width = len(rows[0])
            assert [row[:width] for row in after[table]] == rows, table
        for model in records.MODELS:
            table = model._meta.table_name
            assert {f.column_name for f in model._meta.sorted_fields} <= columns(path, table)
        assert records.check_db(path) == records.SCHEMA_VERSION
        # The rows read back through the named functions, a non-UTF-8 name included.
        assert [
            f.reason for f in records.unrequeued_failures(FileRef("p1", "bucket-one", BAD))
        ] == ["invalid_utf8"]
        assert records.holds() == {
            ("p2", ""): "unreachable",
            ("p1", "bucket-gone"): "NoSuchBucket",
        }
    finally:
        records.close_db()
    records.open_db(path)
    records.close_db()
    assert table_rows(path) == after


def test_newer_database_is_refused_untouched(tmp_path: Path) -> None:
    """A database whose schema is newer than this code is refused with one line naming both
    versions, and its bytes stay as they were."""
    path = str(tmp_path / "new.db")
    records.open_db(path)
    records.close_db()
    con = sqlite3.connect(path)
    con.execute("UPDATE flood_schema SET version = ?", (records.SCHEMA_VERSION + 1,))
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    before = digest(path)
    with pytest.raises(ConfigError) as info:
        records.open_db(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"schema version {records.SCHEMA_VERSION + 1}" in message
    assert f"({records.SCHEMA_VERSION})" in message
    assert digest(path) == before


@pytest.mark.parametrize("kind", ["other_sqlite", "not_sqlite"])
def test_a_file_that_is_not_a_flood_database_is_refused_untouched(
    tmp_path: Path, kind: str
) -> None:
    """Another program's SQLite file, or a file that is no database at all, is refused in one
    line and left byte for byte as it was (no WAL switch, no tables added)."""
    path = str(tmp_path / "other.db")
    if kind == "other_sqlite":
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE users (name TEXT)")
        con.commit()
        con.close()
    else:
        Path(path).write_bytes(os.urandom(4096))
    before = digest(path)
    with pytest.raises(ConfigError) as info:
        records.open_db(path)
    assert "\n" not in str(info.value)
    assert ("not a Flood records database" if kind == "other_sqlite" else "cannot be read") in str(
        info.value
    )
    assert digest(path) == before


def test_a_new_database_is_private_and_current(tmp_path: Path) -> None:
    """A database Flood creates is mode 0600 and carries this code's schema version."""
    path = str(tmp_path / "fresh.db")
    records.open_db(path)
    records.close_db()
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert records.check_db(path) == records.SCHEMA_VERSION


def test_a_claim_continues_the_producers_passage(any_db: str) -> None:
    """flood-copy's passage (incoming_tmp, then incoming) is the one the claim continues, the
    one in incoming/ before a newer copy's still in incoming_tmp; a file nobody recorded gets
    a passage of its own; the ids come back in the claims' order."""
    copied = FileRef("p", "b", "copied.txt")
    rid = records.record_queued(copied, State.INCOMING_TMP, None, 3)
    records.record_queued(copied, State.INCOMING, None, 3, record_id=rid)
    newer = records.record_queued(copied, State.INCOMING_TMP, None, 5)
    stray = FileRef("p", "b", "stray.txt")
    staged = FileRef("p", "b2", "staged.txt")
    tmp_only = records.record_queued(staged, State.INCOMING_TMP, None, 6)
    others = [Claim(FileRef("p", "b", f"new-{n}"), None, n) for n in range(5)]
    claims = [Claim(stray, None, 4), Claim(copied, None, 3), *others, Claim(staged, None, 6)]
    ids = records.record_claims(claims)
    assert ids[1] == rid and ids[-1] == tmp_only and len(set(ids)) == len(claims)
    assert [(p.id, p.state) for p in records.passages(copied)] == [
        (rid, "processing"),
        (newer, "incoming_tmp"),
    ]
    assert [(p.state, p.size) for p in records.passages(stray)] == [("processing", 4)]
    for claim, record_id in zip(others, ids[2:-1], strict=True):
        assert [(p.id, p.size) for p in records.passages(claim.ref)] == [(record_id, claim.size)]
    twice = FileRef("p", "b", "twice.txt")  # one key twice in a batch: a passage each, in order
    first, second = records.record_claims([Claim(twice, None, 1), Claim(twice, None, 2)])
    assert [(p.id, p.size) for p in records.passages(twice)] == [(first, 1), (second, 2)]


def test_a_retry_keeps_its_due_time_and_count(any_db: str) -> None:
    """A scheduled retry is on record with its count and due time; its success adds a row."""
    ref = FileRef("p", "b", "k")
    [rid] = records.record_claims([Claim(ref, None, 1)])
    due = dt.datetime(2030, 1, 1, 12, 0, 0)
    records.record_retry_scheduled(rid, 1, due, "SlowDown", 0)
    resumed = records.record_resumed(ref, None, 1)
    assert (resumed.id, resumed.retries, resumed.due) == (rid, 1, due)
    records.record_completions([Completion(rid, 1, "e", 1)])
    [passage] = records.passages(ref)
    assert (passage.state, passage.retry_count, passage.next_attempt_at) == ("completed", 0, None)
    assert [(a.attempt, a.outcome) for a in passage.attempts] == [(1, "success")]


def test_non_utf8_names_are_stored_escaped_and_found_again(any_db: str) -> None:
    """A name that is not UTF-8 is stored with backslash escapes by every function that takes
    a key, and the escaped form leads back to the file's real name."""
    ref = FileRef("p", "b", BAD)
    [rid] = records.record_claims([Claim(ref, None, 2)])
    records.record_failed(rid, Reason.INVALID_UTF8, "name is not valid UTF-8", 0)
    assert records.known(ref)
    assert records.buckets_with_key(BAD) == [("p", "b")]
    assert [f.id for f in records.unrequeued_failures(ref)] == [rid]
    again = records.record_requeued(ref, rid, 2)
    assert records.unrequeued_failures(ref) == []
    assert [p.id for p in records.passages(ref)] == [rid, again]
    stored = records.text(BAD)
    assert stored == "bad-name-\\xff.txt"
    assert records.names_for(stored) == [stored, BAD]
    assert records.names_for("plain\\x41") == ["plain\\x41"]  # 'A' is no escape text() makes


def test_repair_marks_wiped_copies_abandoned_and_found_files_completed(db: str) -> None:
    """Start-up repair's two writes: a wiped copy is abandoned (wiped), a file found in
    completed/ is a success."""
    wiped = records.record_queued(FileRef("p", "b", "w"), State.INCOMING_TMP, None, 1)
    [done] = records.record_claims([Claim(FileRef("p", "b", "d"), None, 1)])
    records.repair(wiped, State.ABANDONED)
    records.repair(done, State.COMPLETED)
    assert {p.id: p.state for p in records.open_passages()} == {}
    [w] = records.passages(FileRef("p", "b", "w"))
    [d] = records.passages(FileRef("p", "b", "d"))
    assert (w.state, w.reason) == ("abandoned", "wiped")
    assert (d.state, d.outcome) == ("completed", "success")


def test_a_failed_passage_forgets_its_multipart_upload_and_may_queue_its_hook(db: str) -> None:
    """Nothing continues the upload of a failed passage: its rows go in the same transaction
    (the janitor aborts it on the server once it is old), and the on_failure delivery is due."""
    ref = FileRef("p", "b", "big.bin")
    [rid] = records.record_claims([Claim(ref, None, 20)])
    upload = records.Upload(rid, "b", "big.bin", "u-1", 10, 20, 1, 2, "md5", {})
    records.multipart_started(upload)
    records.part_done(rid, records.Part(1, 10, "e1", None))
    assert records.upload_ids("b") == {"u-1"}
    records.record_failed(rid, "SlowDown", "retries exhausted", 3, deliver=True)
    assert records.multipart_of(rid) is None and records.upload_ids("b") == set()
    assert records.deliveries_of(rid) == [("failure", "pending", 0, None)]
    [due] = records.due_deliveries(records.utcnow() + dt.timedelta(seconds=1))
    assert (due.event, due.key, due.reason) == ("failure", "big.bin", "SlowDown")


def test_a_delivery_read_before_its_attempt_ended_is_no_longer_current(db: str) -> None:
    """The hooks' poll may read a delivery while an attempt of it is ending; once that
    attempt is recorded (failed and rescheduled, or done), the stale read is not current, so
    the retry is not spent twice."""
    ref = FileRef("p", "b", "h.txt")
    [rid] = records.record_claims([Claim(ref, None, 1)])
    records.record_failed(rid, "SlowDown", "retries exhausted", 3, deliver=True)
    [due] = records.due_deliveries(records.utcnow() + dt.timedelta(seconds=1))
    assert records.delivery_current(due.id, due.attempts)
    records.delivery_failed(due.id, "exit 1", records.utcnow())
    assert not records.delivery_current(due.id, due.attempts)
    [again] = records.due_deliveries(records.utcnow() + dt.timedelta(seconds=1))
    assert again.attempts == 1 and records.delivery_current(again.id, again.attempts)
    records.delivered(again.id)
    assert not records.delivery_current(again.id, again.attempts)


# -- what the audit reads ----------------------------------------------------------------------
def _complete(keys: list[str], profile: str = "p", bucket: str = "b") -> list[int]:
    ids = records.record_claims([Claim(FileRef(profile, bucket, k), None, 1) for k in keys])
    records.record_completions([Completion(i, 1, "e", 0) for i in ids])
    return ids


def test_completed_page_is_completed_passages_a_page_at_a_time(db: str) -> None:
    """Pages by record id give the newest completed passage of each key, as
    completed_passages() does, filtered by profile, bucket and [since, until)."""
    _complete(["a", "b", "a", "c"])
    _complete(["d"], bucket="other")
    whole = [c.id for c in records.completed_passages()]
    paged: list[int] = []
    after = 0
    while page := records.completed_page(after, 2):
        paged += [c.id for c in page]
        after = page[-1].id
    assert paged == whole and [c.key for c in records.completed_passages()] == ["b", "a", "c", "d"]
    assert [c.key for c in records.completed_page(0, 10, bucket="other")] == ["d"]
    assert records.completed_page(0, 10, profile="nobody") == []
    later = records.utcnow() + dt.timedelta(seconds=60)
    assert records.completed_page(0, 10, since=later) == []
    assert records.completed_page(0, 10, until=later) == records.completed_page(0, 10)


def test_superseded_when_a_newer_passage_is_under_way_or_completed(db: str) -> None:
    """A completed passage is superseded by a newer one in flight or completed, not by a
    newer one that failed."""
    [first] = _complete(["k"])
    [done] = records.completed_page(0, 10)
    assert not records.superseded(done)
    [newer] = records.record_claims([Claim(FileRef("p", "b", "k"), None, 1)])
    assert records.superseded(done)
    records.record_failed(newer, "AccessDenied", "denied", 0)
    assert not records.superseded(done)
    assert first == done.id


def test_open_readonly_reads_and_refuses_writes_and_other_versions(tmp_path: Path, db: str) -> None:
    """A read-only open reads the records, cannot write them, and refuses a missing database
    or one of an older schema in one line, without creating or changing either."""
    _complete(["a"])
    records.close_db()
    before = digest(db)
    records.open_readonly(db)
    try:
        assert [c.key for c in records.completed_passages()] == ["a"]
        with pytest.raises(records.DatabaseError):
            records.set_state(1, State.FAILED)
    finally:
        records.close_db()
    assert digest(db) == before
    missing = str(tmp_path / "none.db")
    with pytest.raises(ConfigError, match="no records database"):
        records.open_readonly(missing)
    assert not os.path.exists(missing)
    old = str(tmp_path / "old.db")
    shutil.copy(FIXTURE, old)
    with pytest.raises(ConfigError, match="older than this Flood's"):
        records.open_readonly(old)
    assert digest(old) == digest(str(FIXTURE))


def test_waiting_retries_made_due_now_keep_their_count(db: str) -> None:
    """make_due: a waiting retry is due now, its count kept, a note after its error, no
    retry_attempts row; due_keys then names it, and a passage in flight is left alone."""
    now = dt.datetime(2026, 1, 1, 12, 0, 0)
    later = now + dt.timedelta(minutes=20)
    [waiting, flying] = records.record_claims(
        [Claim(FileRef("p", "b", "w.txt"), None, 1), Claim(FileRef("p", "b", "f.txt"), None, 1)]
    )
    records.record_retry_scheduled(waiting, 2, later, "SlowDown", 1)
    found = records.waiting_passages("p", now=now)
    assert [(w.id, w.retry_count, w.due) for w in found] == [(waiting, 2, later)]
    assert records.waiting_passages("other", now=now) == []
    assert records.due_keys("p", now) == set()
    assert records.make_due([waiting, flying], " [made due]", now) == 1
    [row] = [r for r in records.passages(FileRef("p", "b", "w.txt")) if r.id == waiting]
    assert (row.next_attempt_at, row.retry_count, row.error) == (now, 2, "SlowDown [made due]")
    assert [a.attempt for a in row.attempts] == [1]  # the failed retry's row only
    assert records.waiting_passages("p", now=now) == []
    assert records.due_keys("p", now) == {("b", "w.txt")}
    [other] = records.passages(FileRef("p", "b", "f.txt"))
    assert (other.next_attempt_at, other.error) == (None, None)


def test_migration_6_gives_every_existing_row_the_migrating_node(tmp_path: Path) -> None:
    """A database of an earlier release was one host's: opened as node `old-host`, every row
    it had is old-host's (holds keyed by node too), and that node's repair and holds see them
    while another node's do not."""
    path = str(tmp_path / "old.db")
    shutil.copy(FIXTURE, path)
    records.open_db(path, "old-host")
    try:
        con = sqlite3.connect(path)
        for table in ("file_records", "retry_attempts", "holds"):
            nodes = {r[0] for r in con.execute(f"SELECT node FROM {table}")}
            assert nodes <= {"old-host"}, table
        open_rows = con.execute(
            "SELECT COUNT(*) FROM file_records WHERE current_state IN"
            " ('incoming_tmp', 'incoming', 'processing')"
        ).fetchone()[0]
        con.close()
        mine = list(records.open_passages())
        held = records.holds()
    finally:
        records.close_db()
    records.open_db(path, "other-host")
    try:
        assert list(records.open_passages()) == [] and records.holds() == {}
        assert records.nodes() == ["old-host"]
    finally:
        records.close_db()
    assert held and len(mine) == open_rows


def test_a_url_is_shown_and_recorded_without_its_password() -> None:
    """The password of a URL (user part or libpq's password= parameter) is masked where it
    is shown and left out where it is recorded; a path and a URL without one are unchanged."""
    url = "postgresql://flood:s3cr%40t@db.example:5433/flood?sslmode=verify-full"
    assert dburl.password_of(url) == "s3cr@t"
    assert dburl.shown(url) == "postgresql://flood:***@db.example:5433/flood?sslmode=verify-full"
    assert (
        dburl.without_password(url)
        == "postgresql://flood@db.example:5433/flood?sslmode=verify-full"
    )
    query = "postgresql://flood@db/flood?password=pw1&sslmode=require"
    assert dburl.shown(query) == "postgresql://flood@db/flood?password=***&sslmode=require"
    assert dburl.without_password(query) == "postgresql://flood@db/flood?sslmode=require"
    assert dburl.scrub("failed for pw1 at db", query) == "failed for *** at db"
    for plain in ("/var/lib/flood/flood.db", "postgresql://flood@db/flood"):
        assert dburl.shown(plain) == dburl.without_password(plain) == plain


def test_a_connect_timeout_is_added_only_where_the_url_has_none() -> None:
    """libpq waits for the system's TCP timeout by default: Flood asks for 10 s unless the
    URL's own connect_timeout says otherwise (the URL's parameters are never overridden)."""
    assert records._defaults("postgresql://flood@db/flood") == {"connect_timeout": 10}
    assert records._defaults("postgresql://flood@db/flood?connect_timeout=3&sslmode=x") == {}


def test_lifting_a_hold_makes_the_retries_it_covers_due(db: str) -> None:
    """The passages that waited on a hold (their next attempt an HELD_WAIT away) are due as
    soon as it is lifted, in the records too: an uploader resuming one finds it due. Another
    bucket's, under a bucket hold, keep their time."""
    later = records.utcnow() + dt.timedelta(hours=1)
    ids = records.record_claims([Claim(FileRef("p", b, "k"), None, 1) for b in ("held", "other")])
    for record_id in ids:
        records.record_held(record_id, later, "no answer", None, 0)
    assert records.due_keys("p") == set()
    assert records.hold("p", "held", Reason.NO_SUCH_BUCKET, "missing")
    assert records.release("p", "held")
    assert records.due_keys("p") == {("held", "k")}
    assert records.hold("p", "", Reason.UNREACHABLE, "no answer")
    assert records.release("p", "")
    assert records.due_keys("p") == {("held", "k"), ("other", "k")}
    assert not records.release("p", "")  # no hold: nothing to lift


def test_a_postgresql_batch_that_fails_midway_writes_none_of_it(
    pg_database: Callable[[], tuple[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a batch's completions go as one pipeline in one transaction: a value the
    server refuses (after the batch's first statement ran) leaves every row as it was, and the
    connection serves the next batch."""
    url, pgpass = pg_database()
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    records.open_db(url)
    try:
        ids = records.record_claims([Claim(FileRef("p", "b", f"k{i}"), None, 1) for i in range(3)])
        too_big = 2**63  # not a bigint: the server refuses the batch's update
        batch = [Completion(i, too_big if n == 1 else 1, "e", 0) for n, i in enumerate(ids)]
        with pytest.raises(pw.DataError):
            records.record_completions(batch, "p")

        def states() -> list[str]:
            rows = records.FileRecord.select().where(records.FileRecord.id.in_(ids))
            return sorted(str(r.current_state) for r in rows)

        assert states() == ["processing"] * 3
        assert records.due_deliveries(records.utcnow()) == []
        done = [Completion(i, 1, "e", 2 if n == 0 else 0) for n, i in enumerate(ids)]
        records.record_completions(done, "p", deliver=True)
        assert states() == ["completed"] * 3
        due = records.due_deliveries(records.utcnow() + dt.timedelta(seconds=1))
        assert sorted(d.record_id for d in due) == sorted(ids)
        retried = records.RetryAttempt.select().where(records.RetryAttempt.file_record_id == ids[0])
        assert [(r.attempt, r.outcome) for r in retried] == [(2, "success")]
    finally:
        records.close_db()
