"""The tests' PostgreSQL server: password login, outages by stop and start, who it runs as, and
that it dies with the process that started it."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from postgres import (
    Postgres,
    PostgresUnavailable,
    RunAs,
    describe_unavailable,
    find_bindir,
    reachable_by,
    unprivileged_user,
)
from spool import wait_for

pytestmark = pytest.mark.timeout(120)
SCRIPT = Path(__file__).resolve().parents[1] / "support" / "postgres.py"


def connect(pg: Postgres, password: str | None = None) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        pg.url, password=pg.password if password is None else password, connect_timeout=5
    )


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def gone(pid: int) -> bool:
    """Whether the process no longer exists (or is a zombie waiting for its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_a_table_survives_a_stop_and_start_that_break_connections(
    own_postgres: Postgres,
) -> None:
    """A client logs in with the password and creates a table; while the server is stopped
    its connection and new ones fail; after start() on the same port the row is there."""
    pg = own_postgres
    port = pg.port
    conn = connect(pg)
    with conn:
        conn.execute("CREATE TABLE t (n integer)")
        conn.execute("INSERT INTO t VALUES (42)")
    pg.stop()
    assert not pg.running
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        connect(pg)
    pg.start()
    assert pg.port == port and pg.url.endswith(f":{port}/flood")
    with connect(pg) as again:
        assert again.execute("SELECT n FROM t").fetchall() == [(42,)]
    pg.restart(mode="immediate")
    with connect(pg) as after_crash:
        assert after_crash.execute("SELECT n FROM t").fetchall() == [(42,)]


def test_password_login_by_pgpass_and_a_wrong_password_refused(
    postgres: Postgres, tmp_path: Path
) -> None:
    """The URL carries no password; a pgpass file or the password logs in as the database's
    owner (not a superuser); a wrong password is refused by scram-sha-256."""
    assert postgres.password not in postgres.url
    assert postgres.url == f"postgresql://flood@127.0.0.1:{postgres.port}/flood"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(postgres, password="wrong")
    pgpass = postgres.pgpass(tmp_path / "pgpass")
    assert pgpass.stat().st_mode & 0o777 == 0o600
    with psycopg.connect(postgres.url, connect_timeout=5, passfile=str(pgpass)) as conn:
        row = conn.execute(
            "SELECT current_user, usesuper FROM pg_user WHERE usename = current_user"
        ).fetchone()
        assert row == ("flood", False)
    method = postgres.psql("SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host'")
    assert set(method.split()) == {"scram-sha-256"}


def test_the_server_runs_unprivileged(postgres: Postgres) -> None:
    """As root the server runs as the postgres system user with its cluster owned by it;
    otherwise as the test's own user."""
    assert postgres.pid is not None
    uid = process_uid(postgres.pid)
    if os.geteuid() == 0:
        assert postgres.run_as is not None
        assert uid == postgres.run_as.uid != 0
        assert postgres.data_dir.stat().st_uid == uid
    else:
        assert postgres.run_as is None and uid == os.geteuid()


def _python_for(user: RunAs) -> str | None:
    """An interpreter `user` can run (the tox venv's may live below root's 0700 home)."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            ok = subprocess.run(
                [python, "-c", "pass"],
                user=user.uid,
                group=user.gid,
                extra_groups=[],
                capture_output=True,
                check=False,
            )
        except OSError:  # not executable for that user
            continue
        if ok.returncode == 0:
            return python
    return None


@pytest.mark.parametrize("who", ["this user", "an unprivileged user"])
def test_the_server_dies_with_the_process_that_started_it(tmp_path: Path, who: str) -> None:
    """When the process that started the server is killed with SIGKILL, the server goes too
    (its parent-death signal), whether that process is root or an unprivileged user (who
    runs the server directly, its cluster in its own workdir)."""
    reason = describe_unavailable()
    if reason is not None:
        pytest.skip(reason)
    python, workdir, switch = sys.executable, tmp_path, {}
    server_user = unprivileged_user()
    expected_uid = server_user.uid if server_user else os.geteuid()
    if who == "an unprivileged user":
        if os.geteuid() != 0:
            pytest.skip("needs root to start the helper as another user (this run is one)")
        nobody = pwd.getpwnam("nobody")
        user = RunAs("nobody", nobody.pw_uid, nobody.pw_gid)
        found = _python_for(user)
        if found is None or not reachable_by(SCRIPT.parent, user):
            pytest.skip("no Python and script path that nobody may run")
        python, expected_uid = found, user.uid
        workdir = Path(tempfile.mkdtemp(prefix="flood-pgtest-", dir="/tmp"))
        os.chown(workdir, user.uid, user.gid)
        switch = {"user": user.uid, "group": user.gid, "extra_groups": []}
    helper = subprocess.Popen(
        [python, str(SCRIPT), str(workdir / "cluster")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=workdir,
        **switch,
    )
    home = ""
    try:
        assert helper.stdout is not None
        pid, home = helper.stdout.readline().split()
        assert process_uid(int(pid)) == expected_uid
        if switch:
            assert Path(home).parent == workdir / "cluster"  # reachable: no tmp dir of its own
        os.kill(helper.pid, signal.SIGKILL)
        helper.wait(10)
        wait_for(lambda: gone(int(pid)), 30, f"postgres {pid} to exit after its starter died")
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        shutil.rmtree(home, ignore_errors=True)  # made in /tmp when the cluster was root's
        if switch:
            shutil.rmtree(workdir, ignore_errors=True)


def test_find_bindir_takes_the_newest_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of /usr/lib/postgresql/{9.6,15,16}/bin the newest with both binaries wins; a tree
    without any is reported with the package to install."""
    for version, binaries in (("9.6", 2), ("15", 2), ("16", 2), ("17", 1), ("extra", 2)):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        for name in ("initdb", "postgres")[:binaries]:
            (bindir / name).write_text("#!/bin/sh\n")
            (bindir / name).chmod(0o755)
    assert find_bindir(tmp_path) == tmp_path / "16" / "bin"
    empty = tmp_path / "none"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(PostgresUnavailable, match="apt-get install postgresql"):
        find_bindir(empty)
