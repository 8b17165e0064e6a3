"""A fleet: supervisors on several hosts (here: spools with different --node names) sharing one
PostgreSQL database for their records, each touching only its own node's rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from postgres import Postgres
from spool import Spool, object_bytes, object_keys, wait_for

from flood.testing.localserver import LocalS3

pytestmark = pytest.mark.timeout(300)
SHARED = [f"shared/{i:02d}.txt" for i in range(10)]


def _started(sp: Spool, count: int = 1) -> None:
    wait_for(
        lambda: len(sp.events("startup_drain_queued")) >= count, 90, f"start {count} of {sp.dir}"
    )


@pytest.fixture
def proxy(s3: LocalS3) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", s3.port) as fp:
        yield fp


@pytest.fixture
def fleet(
    tmp_path: Path, s3: LocalS3, proxy: FaultProxy, pg_database: Callable[[], tuple[str, Path]]
) -> Iterator[tuple[Spool, Spool]]:
    """Two spools, nodes node-a and node-b, recording into one fresh PostgreSQL database; b's
    profile reaches the S3 server through the fault proxy."""
    url, pgpass = pg_database()
    spools = []
    for name, endpoint in (("a", None), ("b", proxy.endpoint)):
        root = tmp_path / name
        root.mkdir()
        ini = s3.credentials_ini("p1", endpoint=endpoint) if endpoint else s3.credentials_ini("p1")
        sp = Spool(root, s3, {"p1": ini})
        sp.use_postgres(url, pgpass)
        spools.append(sp)
    yield spools[0], spools[1]
    for sp in spools:
        sp.close()


def _drop_all(sp: Spool, bucket: str, own: str) -> list[str]:
    keys = [*SHARED, *(f"{own}/{i:02d}.txt" for i in range(10))]
    for key in keys:
        sp.drop("p1", bucket, key, key.encode())
    return keys


def _status(sp: Spool, *args: str) -> subprocess.CompletedProcess[str]:
    return sp.run("flood-status", "--server-dir", str(sp.dir), *args)


def test_two_nodes_share_the_records_each_repairing_only_its_own(
    fleet: tuple[Spool, Spool], bucket: str, client: Any, proxy: FaultProxy
) -> None:
    """Two supervisors with different --node names upload into one database: every file of
    each is on record once under its node (the same keys on both are separate passages);
    flood-status names both nodes and --node shows one; why shows a key's passages on both;
    after kill -9 of node-a its restart repairs node-a's open rows and not node-b's; requeue
    on node-a leaves node-b's failed file alone and says so."""
    a, b = fleet
    sup_a = a.start("--node", "node-a", "--max-retries", "0")
    b.start("--node", "node-b", "--max-retries", "0")
    _started(a)
    _started(b)
    keys_a, keys_b = _drop_all(a, bucket, "a"), _drop_all(b, bucket, "b")
    a.wait_done("p1", bucket, keys_a)
    b.wait_done("p1", bucket, keys_b)
    assert object_bytes(client, bucket, "shared/03.txt") == b"shared/03.txt"

    rows = a.query("SELECT node, filepath, current_state FROM file_records ORDER BY id")
    assert sorted((r["node"], r["filepath"]) for r in rows) == sorted(
        [("node-a", k) for k in keys_a] + [("node-b", k) for k in keys_b]
    )
    assert {r["current_state"] for r in rows} == {"completed"}

    table = _status(a)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split()[:3] == ["NODE", "PROFILE", "BUCKET"]
    assert [line.split()[0] for line in lines[2:4]] == ["node-a", "node-b"]
    assert all(line.split()[8] == "20" for line in lines[2:4])  # DONE TODAY
    only_b = json.loads(_status(a, "--node", "node-b", "--json").stdout)
    assert [(r["node"], r["completed_today"]) for r in only_b["buckets"]] == [("node-b", 20)]
    assert only_b["nodes"] == ["node-a", "node-b"]
    why = _status(b, "why", f"s3://p1/{bucket}/shared/05.txt")
    assert why.returncode == 0, why.stderr
    assert "on node node-a" in why.stdout and "on node node-b" in why.stdout

    # A passage each node's records still call open, its file in completed/: a crash between
    # the move and the record as seen by repair. Only node-a restarts.
    ids = {}
    for node in ("node-a", "node-b"):
        [row] = a.query(
            "SELECT id FROM file_records WHERE node = ? AND filepath = ?", node, SHARED[0]
        )
        ids[node] = row["id"]
        a.query(
            "UPDATE file_records SET current_state = 'processing' WHERE id = ? RETURNING id",
            row["id"],
        )
    late = [f"a/late-{i:02d}.txt" for i in range(30)]
    for key in late:
        a.drop("p1", bucket, key, key.encode())
    sup_a.kill9()
    a.start("--node", "node-a", "--max-retries", "0")
    _started(a, 2)
    a.wait_done("p1", bucket, late)
    repaired = {e["flood"]["record_id"] for e in a.events("record_repaired")}
    assert ids["node-a"] in repaired and ids["node-b"] not in repaired
    state = {
        r["node"]: r["current_state"]
        for r in a.query(
            "SELECT node, current_state FROM file_records WHERE filepath = ?", SHARED[0]
        )
    }
    assert state == {"node-a": "completed", "node-b": "processing"}
    late_rows = a.query(
        "SELECT node, filepath, current_state FROM file_records WHERE filepath LIKE ?", "a/late-%"
    )
    assert {(r["node"], r["current_state"]) for r in late_rows} == {("node-a", "completed")}
    # Every late file on record (a file proven but not yet moved when killed goes up again,
    # in a passage of its own: delivery after kill -9 is at least once, as on SQLite).
    assert {r["filepath"] for r in late_rows} == set(late)

    proxy.set_mode("503")
    b.drop("p1", bucket, "b/fails.txt", b"x")
    b.wait_done("p1", bucket, ["b/fails.txt"], state="failed")
    proxy.set_mode("pass")
    requeue = a.run("flood-requeue", "--server-dir", str(a.dir), "--all")
    assert requeue.returncode == 0, requeue.stderr
    assert "moved 0 files" in requeue.stdout
    assert "other nodes left alone: node-b (1)" in requeue.stderr
    assert b.where("p1", bucket, "b/fails.txt") == ["failed"]


def test_supervisors_starting_at_once_on_an_empty_database_both_come_up(
    fleet: tuple[Spool, Spool], bucket: str
) -> None:
    """Two supervisors started at the same moment on an empty database: one creates the
    schema, the other waits for it; both start and upload, one schema version on record."""
    a, b = fleet
    a.start("--node", "node-a")
    b.start("--node", "node-b")
    _started(a)
    _started(b)
    a.drop("p1", bucket, "a.txt", b"a")
    b.drop("p1", bucket, "b.txt", b"b")
    a.wait_done("p1", bucket, ["a.txt"])
    b.wait_done("p1", bucket, ["b.txt"])
    assert [r["version"] for r in a.query("SELECT version FROM flood_schema")] == [6]
    for sp in (a, b):
        assert not [e for e in sp.log_lines() if e.get("log.level") == "error"]


def test_the_password_in_a_url_is_never_shown(
    tmp_path: Path, s3: LocalS3, bucket: str, postgres: Postgres, pg_database: Any
) -> None:
    """A password given in the URL (no pgpass) logs in, and appears in no log line, no
    output of a command, and not in the server dir's record of the database."""
    url, _ = pg_database()
    secret_url = url.replace(f"{postgres.user}@", f"{postgres.user}:{postgres.password}@")
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1")})
    sp.use_postgres(secret_url, tmp_path / "no-pgpass")
    try:
        sp.start("--db", secret_url)
        _started(sp)
        sp.drop("p1", bucket, "s.txt", b"s")
        sp.wait_done("p1", bucket, ["s.txt"])
        where = ("--server-dir", str(sp.dir), "--credentials", str(sp.credentials))
        outputs = [
            sp.run("flood-status", *where, "--db", secret_url),
            sp.run("flood-status", *where, "--db", secret_url, "--json"),
            sp.run("flood-status", *where, "--db", secret_url, "why", "s.txt"),
            sp.run("flood-doctor", *where, "--db", secret_url),
            sp.run("flood-audit", *where, "--db", secret_url),
            sp.run("flood-status", *where, "--db", secret_url + "x"),
        ]
        source = tmp_path / "copied.txt"
        source.write_bytes(b"copied")
        outputs.append(sp.run("flood-copy", *where, "--wait", str(source), f"s3://p1/{bucket}/"))
        assert outputs[0].returncode == 0, outputs[0].stderr
        assert "postgresql://flood:***@" in outputs[0].stdout
        assert "schema version 6, read only" in outputs[3].stdout, outputs[3].stdout
        assert outputs[4].returncode == 0, outputs[4].stdout + outputs[4].stderr
        assert outputs[6].returncode == 0, outputs[6].stdout + outputs[6].stderr
        assert sp.where("p1", bucket, "copied.txt") == ["completed"]
        assert outputs[5].returncode == 78  # no such database: refused, password masked
        recorded = (sp.dir / ".flood.db-path").read_text()
        assert recorded.strip() == url
        seen = [sp.log.read_text(), sp.log.with_suffix(".stderr").read_text(), recorded]
        seen += [o.stdout + o.stderr for o in outputs]
        assert all(postgres.password not in text for text in seen)
    finally:
        sp.close()


def test_many_processes_opening_an_empty_database_at_once(
    pg_database: Callable[[], tuple[str, Path]], tmp_path: Path
) -> None:
    """Eight processes open the same empty database at the same moment: every one succeeds
    and the schema is made once (the advisory lock inside the creating transaction)."""
    url, pgpass = pg_database()
    script = tmp_path / "opener.py"
    script.write_text(
        "import sys, time\n"
        "from flood import records\n"
        "start = float(sys.argv[1])\n"
        "time.sleep(max(0.0, start - time.time()))\n"
        f"records.open_db({url!r}, sys.argv[2])\n"
        "print(records.check_db(" + repr(url) + "))\n"
    )
    env = {**os.environ, "PGPASSFILE": str(pgpass)}
    start = str(time.time() + 3)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), start, f"n{i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in results]
    assert [out.strip() for out, _ in results] == ["6"] * 8


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        return str(answer.read().decode())


def _database_up(port: int) -> float | None:
    for line in _scrape(port).splitlines():
        if line.startswith("flood_database_up "):
            return float(line.split()[1])
    return None


def test_postgresql_stopped_mid_stream_loses_nothing_and_uploads_nothing_twice(
    tmp_path: Path, s3: LocalS3, own_postgres: Postgres, bucket: str, client: Any
) -> None:
    """PostgreSQL stopped for 20 s in a stream of uploads, then started: the files that
    arrived meanwhile are not uploaded while it is away; one error line says so and
    flood_database_up is 0; afterwards every file is uploaded once, recorded once, completed."""
    pg = own_postgres
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1")})
    sp.use_postgres(pg.url, pg.pgpass(tmp_path / "pgpass"))
    try:
        sp.start("--metrics-port", "0")
        _started(sp)
        wait_for(lambda: sp.events("metrics_serving"), 60, "the metrics server")
        port = int(sp.events("metrics_serving")[0]["flood"]["port"])
        before = [f"before/{i:03d}.txt" for i in range(40)]
        for key in before:
            sp.drop("p1", bucket, key, key.encode())
        wait_for(lambda: len(sp.files("completed")) >= 10, 60, "some uploads before the stop")
        pg.stop()
        stopped = time.monotonic()
        during = [f"during/{i:03d}.txt" for i in range(20)]
        for key in during:
            sp.drop("p1", bucket, key, key.encode())
        wait_for(lambda: _database_up(port) == 0.0, 30, "flood_database_up 0")
        while time.monotonic() - stopped < 20:  # the outage lasts 20 s; watch it meanwhile
            uploaded = set(object_keys(client, bucket))
            assert not uploaded & set(during), "a file uploaded while the records were away"
            time.sleep(0.5)
        pg.start()
        keys = before + during
        sp.wait_done("p1", bucket, keys, timeout=120)
        wait_for(lambda: _database_up(port) == 1.0, 30, "flood_database_up 1")
        assert sorted(object_keys(client, bucket)) == sorted(keys)
        assert all(object_bytes(client, bucket, k) == k.encode() for k in during[:3])
        rows = sp.query("SELECT filepath, current_state FROM file_records")
        assert sorted(r["filepath"] for r in rows) == sorted(keys)  # one passage each
        assert {r["current_state"] for r in rows} == {"completed"}
        succeeded = [e["flood"]["key"] for e in sp.events("upload_succeeded")]
        assert sorted(succeeded) == sorted(keys)  # none uploaded twice
        errors = [e for e in sp.log_lines() if e.get("log.level") == "error"]
        assert [e["event"]["action"] for e in errors] == ["database_unreachable"]
        assert sp.events("database_reachable")
    finally:
        sp.close()


def test_postgresql_down_at_start_waits_then_uploads(
    tmp_path: Path, s3: LocalS3, own_postgres: Postgres, bucket: str
) -> None:
    """The records unreachable when the supervisor starts: it keeps running, says so once,
    uploads nothing, and starts uploading once PostgreSQL is up."""
    pg = own_postgres
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1")})
    sp.use_postgres(pg.url, pg.pgpass(tmp_path / "pgpass"))
    try:
        pg.stop()
        sp.drop("p1", bucket, "early.txt", b"early")
        sup = sp.start()
        wait_for(lambda: sp.events("database_unreachable"), 60, "the one error line")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # it keeps running and uploads nothing
            assert sup.proc.poll() is None
            assert sp.where("p1", bucket, "early.txt") == ["incoming"]
            time.sleep(0.25)
        pg.start()
        sp.wait_done("p1", bucket, ["early.txt"], timeout=90)
        assert len(sp.events("database_unreachable")) == 1
        assert sp.events("database_reachable")
    finally:
        sp.close()
