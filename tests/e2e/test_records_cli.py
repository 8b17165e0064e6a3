"""The commands on the records as a user runs them: names that are not UTF-8 are handled and
printed escaped, and a database that is newer or not Flood's is refused by every command."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from spool import BIN, Spool, wait_for

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
