"""Test helpers: a server dir with credentials and a db, the real flood-supervisor, polling."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from flood.testing.localserver import die_with_parent

STATES = ("incoming_tmp", "incoming", "processing", "failed", "completed")
BIN = Path(sys.executable).parent


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 30.0,
    what: str | Callable[[], str] = "condition",
) -> Any:
    """Poll condition() against a monotonic deadline; return its first truthy value. `what`
    names the condition in the timeout's message (a callable: as things stand at the timeout)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            shown = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g} s waiting for {shown}")
        time.sleep(delay)  # polling interval, not synchronisation
        delay = min(delay * 1.5, 0.25)


# Every supervisor a test started, stopped after the test whatever it did (tests/conftest.py):
# one left running would hold memory and CPU for the rest of the session and beyond.
LIVE: list[Supervisor] = []


def stop_all() -> None:
    """Stop every supervisor still running (the end of a test)."""
    while LIVE:
        LIVE.pop().stop()


class Supervisor:
    """A flood-supervisor subprocess in its own session; stopped TERM, then KILL. It dies
    with the test process (SIGKILL on the parent's death), and after its test (LIVE)."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.handle = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.errors = open(log_path.with_suffix(".stderr"), "ab")  # noqa: SIM115 - as above
        self.proc = subprocess.Popen(
            [str(BIN / "flood-supervisor"), *args],
            env=env,
            stdout=self.handle,
            stderr=self.errors,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=log_path.parent,
            preexec_fn=die_with_parent(),
        )
        LIVE.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.stop()

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.handle.closed:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.handle.close()
        self.errors.close()

    def stderr(self) -> str:
        """What the supervisor and its children wrote to stderr (not JSON: tracebacks, the
        one-line refusals)."""
        self.errors.flush()
        return self.log_path.with_suffix(".stderr").read_text(errors="replace")


class Spool:
    """A server directory, its credentials file and database, and ways to look at them."""

    def __init__(self, root: Path, s3: Any, profiles: dict[str, str]) -> None:
        self.root = root
        self.s3 = s3
        self.dir = root / "srv"
        self.dir.mkdir()
        self.db = root / "flood.db"
        self.log = root / "flood.log"
        self.home = root / "home"
        self.home.mkdir()
        self.credentials = root / "credentials"
        self.credentials.write_text("".join(profiles.values()))
        self.credentials.chmod(0o600)
        self.supervisors: list[Supervisor] = []
        self.db_url: str | None = None  # PostgreSQL records instead of the SQLite file
        self.pgpass: Path | None = None

    def use_postgres(self, url: str, pgpass: Path) -> None:
        """Records in PostgreSQL at `url` (no password in it: libpq reads `pgpass`)."""
        self.db_url, self.pgpass = url, pgpass

    # -- processes -----------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(HOME=str(self.home), FLOOD_DB=str(self.db), PYTHONUNBUFFERED="1")
        if self.db_url is not None:
            env.update(FLOOD_DB=self.db_url, PGPASSFILE=str(self.pgpass))
        env.update(extra)
        return env

    def start(self, *args: str, workers: int = 2, env: dict[str, str] | None = None) -> Supervisor:
        argv = [
            "--credentials",
            str(self.credentials),
            "--workers",
            str(workers),
            "--log-level",
            "debug",
            *args,
            str(self.dir),
        ]
        sup = Supervisor(argv, env or self.env(), self.log)
        self.supervisors.append(sup)
        return sup

    def run(
        self,
        command: str,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 60,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / command), *args],
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )

    def close(self) -> None:
        for sup in self.supervisors:
            sup.stop()

    # -- files ---------------------------------------------------------------------------
    def path(self, state: str, profile: str, bucket: str, key: str) -> Path:
        return self.dir / state / profile / bucket / key

    def drop(self, profile: str, bucket: str, key: str, data: bytes) -> Path:
        """Queue a file the producer's way: write in incoming_tmp, rename into incoming."""
        tmp = self.path("incoming_tmp", profile, bucket, key)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        final = self.path("incoming", profile, bucket, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
        return final

    def where(self, profile: str, bucket: str, key: str) -> list[str]:
        """The state directories holding this key (a healthy spool: exactly one)."""
        return [s for s in STATES if os.path.lexists(self.path(s, profile, bucket, key))]

    def files(self, state: str) -> list[str]:
        top = self.dir / state
        return (
            sorted(str(p.relative_to(top)) for p in top.rglob("*") if p.is_file() or p.is_symlink())
            if top.exists()
            else []
        )

    def wait_done(
        self,
        profile: str,
        bucket: str,
        keys: Sequence[str],
        timeout: float = 60,
        state: str = "completed",
    ) -> None:
        wait_for(
            lambda: all(self.where(profile, bucket, k) == [state] for k in keys),
            timeout,
            lambda: (
                f"{len(keys)} files in {state}/ (left: {self.pending_summary()})" + self.trouble()
            ),
        )

    def trouble(self, last: int = 12) -> str:
        """The last warnings and errors of the log, one short line each, for a timeout's
        message: what Flood said while the test waited."""
        try:
            events = self.log_lines()
        except ValueError:  # a line half written as the wait ran out
            return ""
        lines = [
            f"{e.get('@timestamp', '')[11:23]} {e.get('event', {}).get('action')}: "
            f"{str(e.get('message', ''))[:160]}"
            for e in events
            if e.get("log.level") in ("warning", "error", "critical")
        ]
        return "".join(f"\n  {line}" for line in lines[-last:])

    def pending_summary(self) -> str:
        return ", ".join(f"{s}={len(self.files(s))}" for s in STATES)

    # -- records and logs ----------------------------------------------------------------
    def query(self, sql: str, *params: Any) -> list[Any]:
        """Rows as mappings, from whichever database the spool records into (SQL written with
        ? placeholders; PostgreSQL hands times back as datetimes, SQLite as text)."""
        if self.db_url is not None:
            import psycopg  # the test extra's driver, as Flood's
            from psycopg.rows import dict_row

            with psycopg.connect(
                self.db_url, passfile=str(self.pgpass), connect_timeout=10, row_factory=dict_row
            ) as pg:
                return list(pg.execute(sql.replace("?", "%s"), params).fetchall())
        con = sqlite3.connect(self.db, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return list(con.execute(sql, params))
        finally:
            con.close()

    def records(self, key: str | None = None) -> list[Any]:
        if key is None:
            return self.query("SELECT * FROM file_records ORDER BY id")
        return self.query("SELECT * FROM file_records WHERE filepath = ? ORDER BY id", key)

    def log_lines(self) -> list[dict[str, Any]]:
        """Every line the supervisor and its children wrote, parsed as JSON (fails if not)."""
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def events(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.log_lines() if e.get("event", {}).get("action") == action]


def new_bucket(s3: Any) -> str:
    """A fresh bucket with a unique name on the local server."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    return name


def object_bytes(client: Any, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]


def object_keys(client: Any, bucket: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(keys)


def walk(top: Path) -> Iterator[Path]:
    yield from (p for p in top.rglob("*") if p.is_file())
