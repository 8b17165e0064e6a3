"""The commands on the records as a user runs them: names that are not UTF-8 are handled and
printed escaped, and a database that is newer or not Flood's is refused by every command."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from spool import BIN, Spool, object_bytes, wait_for

from flood import records

BAD_NAME = b"bad-\xff.txt"
SHOWN = "bad-\\xff.txt"


def run(spool: Spool, *argv: str | bytes) -> subprocess.CompletedProcess[str]:
    """A command with argv as given (bytes pass through unchanged, as from a shell)."""
    return subprocess.run(
        [os.fsencode(BIN / str(argv[0])), *(os.fsencode(a) for a in argv[1:])],
        env=spool.env(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_requeue_status_and_copy_handle_a_name_that_is_not_utf8(spool: Spool, bucket: str) -> None:
    """A file that failed for its non-UTF-8 name is requeued (dry run first), its history shown
    by its path, its name printed with backslash escapes; flood-copy refuses such a name in
    one line. No command prints a traceback."""
    sup = spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 60, "the supervisor's start")
    folder = os.fsencode(spool.path("incoming", "p1", bucket, "odd"))
    os.makedirs(folder)
    staged = spool.root / "staged"
    staged.write_bytes(b"latin-1 name")
    os.rename(staged, os.path.join(folder, BAD_NAME))
    failed = os.path.join(os.fsencode(spool.path("failed", "p1", bucket, "odd")), BAD_NAME)
    wait_for(lambda: os.path.exists(failed), 60, "the file in failed/")
    sup.terminate()
    where = ("--server-dir", str(spool.dir), "--credentials", str(spool.credentials))

    dry = run(spool, "flood-requeue", *where, "--all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would requeue failed/p1/{bucket}/odd/{SHOWN}" in dry.stdout
    assert "(record #" in dry.stdout and "invalid_utf8" in dry.stdout
    assert os.path.exists(failed)

    history = run(spool, "flood-status", *where, "why", failed)
    assert history.returncode == 0, history.stderr
    assert f"s3://p1/{bucket}/odd/{SHOWN}" in history.stdout
    assert "failed: invalid_utf8" in history.stdout

    moved = run(spool, "flood-requeue", *where, "--reason", "invalid_utf8")
    assert moved.returncode == 0, moved.stderr
    assert "moved 1 file to incoming/" in moved.stdout
    incoming = os.path.join(folder, BAD_NAME)
    assert os.path.exists(incoming) and not os.path.exists(failed)
    rows = spool.query("SELECT id, current_state, requeued_from FROM file_records ORDER BY id")
    assert rows[-1]["current_state"] == "incoming" and rows[-1]["requeued_from"] == rows[-2]["id"]

    table = run(spool, "flood-status", *where)
    assert table.returncode == 0, table.stderr

    source = os.path.join(os.fsencode(spool.root), BAD_NAME)
    Path(os.fsdecode(source)).write_bytes(b"x")
    copy = run(spool, "flood-copy", *where, source, f"s3://p1/{bucket}/")
    assert copy.returncode == 2
    assert copy.stderr.count("\n") == 1 and SHOWN in copy.stderr
    for result in (dry, history, moved, table, copy):
        assert "Traceback" not in result.stderr + result.stdout


def _newer(path: Path) -> None:
    records.open_db(str(path))
    records.close_db()
    con = sqlite3.connect(path)
    con.execute("UPDATE flood_schema SET version = ?", (records.SCHEMA_VERSION + 1,))
    con.commit()
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def _foreign(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE invoices (number INTEGER)")
    con.commit()
    con.close()


@pytest.mark.parametrize("make", [_newer, _foreign], ids=["newer", "not_flood"])
def test_every_command_refuses_a_database_it_cannot_use(
    spool: Spool, bucket: str, make: Any
) -> None:
    """A database from a newer Flood, or another program's, is refused by the supervisor and
    by flood-copy, flood-status and flood-requeue: one line, exit 78, the database and the
    spool untouched (the supervisor takes no lock and wipes nothing)."""
    make(spool.db)
    before = hashlib.sha256(spool.db.read_bytes()).hexdigest()
    leftover = spool.path("incoming_tmp", "p1", bucket, "half-written")
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"a producer is still writing")
    source = spool.root / "report.csv"
    source.write_text("a,b\n")
    where = ("--server-dir", str(spool.dir), "--credentials", str(spool.credentials))
    results = {
        "flood-supervisor": run(
            spool, "flood-supervisor", "--credentials", str(spool.credentials), str(spool.dir)
        ),
        "flood-copy": run(spool, "flood-copy", *where, str(source), f"s3://p1/{bucket}/"),
        "flood-status": run(spool, "flood-status", *where),
        "flood-requeue": run(spool, "flood-requeue", *where, "--all"),
    }
    for command, result in results.items():
        assert result.returncode == 78, (command, result.stderr)
        assert result.stderr.count("\n") == 1, (command, result.stderr)
        assert str(spool.db) in result.stderr, command
    assert hashlib.sha256(spool.db.read_bytes()).hexdigest() == before
    assert leftover.read_bytes() == b"a producer is still writing"
    assert not (spool.dir / ".flood.lock").exists()
    assert not spool.path("incoming", "p1", bucket, "report.csv").exists()


# -- the records' acceptance behaviours, on SQLite and on PostgreSQL ---------------------------
FAST = ("--retry-base", "0.05", "--max-retries", "3")


@pytest.fixture
def proxy(s3: Any) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", s3.port) as fp:
        yield fp


def _spool(tmp_path: Path, s3: Any, into: Callable[[Spool], Spool], endpoint: str | None) -> Spool:
    ini = s3.credentials_ini("p1", endpoint=endpoint) if endpoint else s3.credentials_ini("p1")
    return into(Spool(tmp_path, s3, {"p1": ini}))


def _started(sp: Spool) -> None:
    wait_for(lambda: sp.events("startup_drain_queued"), 60, "the start-up drain")


def test_each_passage_of_a_key_is_a_row_of_its_own(
    tmp_path: Path, s3: Any, bucket: str, records_backend: Callable[[Spool], Spool]
) -> None:
    """The same key queued twice gives two completed rows, in order, each with its size, ETag,
    UTC times and this node's name."""
    sp = _spool(tmp_path, s3, records_backend, None)
    try:
        sp.start("--node", "node-a")
        for data in (b"first", b"second!"):
            sp.drop("p1", bucket, "twice.txt", data)
            wait_for(lambda: sp.files("incoming") == [], 30, "the copy taken")
            sp.wait_done("p1", bucket, ["twice.txt"])
        wait_for(lambda: len(sp.records("twice.txt")) == 2, 30, "two rows")
        rows = sp.records("twice.txt")
        assert [(r["current_state"], r["upload_outcome"], r["size"]) for r in rows] == [
            ("completed", "success", 5),
            ("completed", "success", 7),
        ]
        assert rows[0]["id"] < rows[1]["id"]
        assert rows[1]["etag"] == hashlib.md5(b"second!").hexdigest()
        assert {r["node"] for r in rows} == {"node-a"}
        assert str(rows[1]["last_updated"]) >= str(rows[1]["file_creation_date"])[:19]
    finally:
        sp.close()


def test_retries_leave_a_row_each_and_the_upload_completes(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    proxy: FaultProxy,
    records_backend: Callable[[Spool], Spool],
) -> None:
    """Answers of 503 are retried: one retry_attempts row per retry (failures, then the
    success), the passage completed with its retry count reset."""
    sp = _spool(tmp_path, s3, records_backend, proxy.endpoint)
    try:
        sp.start(*FAST, workers=1)
        _started(sp)
        proxy.set_mode("503")
        sp.drop("p1", bucket, "flaky.txt", b"flaky")
        query = (
            "SELECT a.attempt, a.outcome FROM retry_attempts a JOIN file_records r"
            " ON a.file_record_id = r.id WHERE r.filepath = ? ORDER BY a.attempt"
        )
        wait_for(lambda: len(sp.query(query, "flaky.txt")) >= 1, 60, "a failed retry row")
        proxy.set_mode("pass")
        sp.wait_done("p1", bucket, ["flaky.txt"])
        tries = [(r["attempt"], r["outcome"]) for r in sp.query(query, "flaky.txt")]
        assert tries[-1][1] == "success" and all(o == "failure" for _, o in tries[:-1])
        assert [n for n, _ in tries] == list(range(1, len(tries) + 1))
        [row] = sp.records("flaky.txt")
        assert (row["current_state"], row["retry_count"]) == ("completed", 0)
    finally:
        sp.close()


def test_requeue_makes_a_new_row_linked_to_the_failure(
    tmp_path: Path,
    s3: Any,
    bucket: str,
    proxy: FaultProxy,
    client: Any,
    records_backend: Callable[[Spool], Spool],
) -> None:
    """A file failed for good is requeued: a new passage linked to the failed one completes,
    the failed row stays as it was."""
    sp = _spool(tmp_path, s3, records_backend, proxy.endpoint)
    try:
        sp.start("--max-retries", "0", workers=1)
        _started(sp)
        proxy.set_mode("503")
        sp.drop("p1", bucket, "again.txt", b"again")
        sp.wait_done("p1", bucket, ["again.txt"], state="failed")
        proxy.set_mode("pass")
        moved = sp.run("flood-requeue", "--server-dir", str(sp.dir), "--all")
        assert moved.returncode == 0 and "moved 1 file" in moved.stdout, moved.stderr
        sp.wait_done("p1", bucket, ["again.txt"])
        assert object_bytes(client, bucket, "again.txt") == b"again"
        old, new = sp.records("again.txt")
        assert (old["current_state"], new["current_state"]) == ("failed", "completed")
        assert new["requeued_from"] == old["id"]
    finally:
        sp.close()
