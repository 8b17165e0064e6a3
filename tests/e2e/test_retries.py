"""Retries through a fault proxy: transient errors wait with backoff, permanent ones do not."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from spool import Spool, new_bucket, object_bytes, object_keys, wait_for

from flood.testing.localserver import LocalS3, random_identity

pytestmark = pytest.mark.timeout(240)
FAST = ("--retry-base", "0.05", "--max-retries", "3")


@pytest.fixture
def proxy(s3: LocalS3) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", s3.port) as fp:
        yield fp


@pytest.fixture
def proxied(tmp_path: Path, s3: LocalS3, proxy: FaultProxy) -> Iterator[Spool]:
    """A spool whose profile p1 reaches the local S3 server through the fault proxy."""
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1", endpoint=proxy.endpoint)})
    yield sp
    sp.close()


def attempts(spool: Spool, key: str) -> list[Any]:
    return spool.query(
        "SELECT a.* FROM retry_attempts a JOIN file_records r ON a.file_record_id = r.id "
        "WHERE r.filepath = ? ORDER BY a.attempt",
        key,
    )


def started(spool: Spool) -> None:
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")


CAUSES = {"refuse": "connection refused", "reset": "reset", "503": "SlowDown"}


@pytest.mark.parametrize("fault", ["refuse", "reset", "503"])
def test_an_outage_longer_than_every_retry_holds_the_profile_and_loses_nothing(
    proxied: Spool, proxy: FaultProxy, bucket: str, client: Any, fault: str
) -> None:
    """An outage that outlasts the whole retry budget (3 retries, 0.05 s base: under a second)
    holds the profile as unreachable, shown by flood-status within 10 s, with one error line
    naming the cause; no file goes to failed/, none spends more than its retries, and when
    the server is back every file completes with its bytes."""
    proxied.start(*FAST, "--recheck-interval", "2", workers=2)
    started(proxied)
    proxy.set_mode(fault)
    began = time.monotonic()
    files = {f"outage/{i}.txt": f"file {i}".encode() for i in range(6)}
    for key, data in files.items():
        proxied.drop("p1", bucket, key, data)

    def held() -> bool:
        shown = proxied.run("flood-status", "--server-dir", str(proxied.dir), "--json")
        return any(h["reason"] == "unreachable" for h in json.loads(shown.stdout)["paused"])

    wait_for(held, 10, "the unreachable hold in flood-status")
    assert time.monotonic() - began < 10
    time.sleep(3)  # the outage goes on, three times the whole retry budget
    assert proxied.files("failed") == []
    assert all(r["retry_count"] <= 3 for r in proxied.records())
    [paused] = proxied.events("profile_paused")
    assert paused["event"]["reason"] == "unreachable"
    assert CAUSES[fault] in paused["error"]["message"]
    proxy.set_mode("pass")
    proxied.wait_done("p1", bucket, list(files), timeout=60)
    assert {k: object_bytes(client, bucket, k) for k in files} == files
    assert proxied.files("failed") == [] and proxied.events("profile_resumed")


def test_outage_that_ends_completes_with_the_right_bytes(
    proxied: Spool, proxy: FaultProxy, bucket: str, client: Any
) -> None:
    """A 503 outage that ends after a couple of retries: completed, last attempt a success."""
    proxied.start("--retry-base", "0.2", "--max-retries", "8", workers=1)
    started(proxied)
    proxy.set_mode("503")
    proxied.drop("p1", bucket, "patient.txt", b"worth the wait")
    wait_for(lambda: len(attempts(proxied, "patient.txt")) >= 2, 60, "two failed retries")
    proxy.set_mode("pass")
    proxied.wait_done("p1", bucket, ["patient.txt"], timeout=60)
    assert object_bytes(client, bucket, "patient.txt") == b"worth the wait"
    rows = attempts(proxied, "patient.txt")
    assert rows[-1]["outcome"] == "success"
    assert all(r["outcome"] == "failure" for r in rows[:-1])
    [record] = proxied.records("patient.txt")
    assert (record["upload_outcome"], record["retry_count"], record["next_attempt_at"]) == (
        "success",
        0,
        None,
    )


def test_a_waiting_file_does_not_hold_the_uploader(
    proxied: Spool, proxy: FaultProxy, bucket: str, client: Any
) -> None:
    """While one file waits for its retry, other files of the profile upload (one uploader)."""
    proxied.start("--retry-base", "30", workers=1)
    started(proxied)
    proxy.set_mode("503")
    proxied.drop("p1", bucket, "waiting.txt", b"later")
    wait_for(lambda: proxied.events("upload_retry_scheduled"), 30, "a scheduled retry")
    proxy.set_mode("pass")
    others = [f"other/{i}" for i in range(20)]
    for key in others:
        proxied.drop("p1", bucket, key, key.encode())
    proxied.wait_done("p1", bucket, others, timeout=30)
    assert proxied.where("p1", bucket, "waiting.txt") == ["processing"]
    assert "waiting.txt" not in object_keys(client, bucket)


def test_a_restart_continues_the_retry_count(
    proxied: Spool, proxy: FaultProxy, bucket: str
) -> None:
    """After a restart the count goes on from the db. A restart in the middle of the outage
    finds the server unreachable, holds the profile and leaves the waiting file as it is
    (no retry spent while held); once the server is back the file is taken up at once and
    completes as the next retry, every attempt on record in order."""
    sup = proxied.start("--retry-base", "1", "--max-retries", "5", workers=1)
    started(proxied)
    proxy.set_mode("refuse")
    proxied.drop("p1", bucket, "survivor.txt", b"x")
    wait_for(lambda: attempts(proxied, "survivor.txt"), 60, "the first retry row")
    assert sup.terminate() == 0
    [record] = proxied.records("survivor.txt")
    count_before = record["retry_count"]
    assert count_before >= 2
    proxied.start("--retry-base", "1", "--max-retries", "5", "--recheck-interval", "1", workers=1)
    wait_for(lambda: proxied.events("profile_paused"), 60, "the profile held at start")
    time.sleep(2)  # held: the file's retry, due meanwhile, is not spent
    [record] = proxied.records("survivor.txt")
    assert record["retry_count"] == count_before
    assert proxied.where("p1", bucket, "survivor.txt") == ["processing"]
    proxy.set_mode("pass")
    proxied.wait_done("p1", bucket, ["survivor.txt"], timeout=60)
    rows = attempts(proxied, "survivor.txt")
    assert [r["attempt"] for r in rows] == list(range(1, count_before + 1))
    assert [r["outcome"] for r in rows] == ["failure"] * (count_before - 1) + ["success"]


def test_access_denied_fails_at_once_without_retries(
    tmp_path: Path, s3: LocalS3, bucket: str
) -> None:
    """A read-only key (AccessDenied on PUT) sends the file to failed/ well before any retry."""
    assert s3.readonly is not None
    sp = Spool(tmp_path, s3, {"ro": s3.credentials_ini("ro", s3.readonly)})
    try:
        sp.start(workers=1)  # default 30 s base: a retry would take at least 30 s
        started(sp)
        sp.drop("ro", bucket, "denied.txt", b"no")
        sp.wait_done("ro", bucket, ["denied.txt"], state="failed", timeout=15)
        assert attempts(sp, "denied.txt") == []
        [record] = sp.records("denied.txt")
        assert record["reason"] == "AccessDenied"
    finally:
        sp.close()


def test_key_rejected_at_startup_holds_the_profile(
    tmp_path: Path, s3: LocalS3, bucket: str
) -> None:
    """An unknown key at start-up: its files stay in incoming/, one error names the profile."""
    bogus = random_identity("bogus", ("Read",))
    sp = Spool(
        tmp_path, s3, {"bad": s3.credentials_ini("bad", bogus), "p1": s3.credentials_ini("p1")}
    )
    try:
        sp.drop("bad", bucket, "stays.txt", b"s")
        sp.start("--recheck-interval", "0.3")
        sp.drop("p1", bucket, "flows.txt", b"f")
        sp.wait_done("p1", bucket, ["flows.txt"])
        wait_for(lambda: sp.events("profile_paused"), 10, "profile_paused")
        wait_for(lambda: len(sp.events("profile_checked")) >= 1, 10, "checks")
        assert sp.where("bad", bucket, "stays.txt") == ["incoming"]
        paused = sp.events("profile_paused")
        assert len(paused) == 1 and paused[0]["flood"]["profile"] == "bad"
    finally:
        sp.close()


def test_revoked_key_pauses_its_profile_and_resumes_when_restored(tmp_path: Path) -> None:
    """A key revoked mid-run: one file to failed/, the rest wait in incoming/ while another
    profile flows; once the key is restored they upload without restarting Flood."""
    worker = random_identity("worker", ("Read", "Write", "List"))
    server = LocalS3(tmp_path / "s3", identities=None)
    server.start()
    admin = server.admin
    try:
        server.restart(identities=[admin, worker])
        b1, b2 = new_bucket(server), new_bucket(server)
        (tmp_path / "sp").mkdir()
        sp = Spool(
            tmp_path / "sp",
            server,
            {"rev": server.credentials_ini("rev", worker), "ok": server.credentials_ini("ok")},
        )
        sp.start("--recheck-interval", "0.5", "--retry-base", "0.2", workers=1)
        started(sp)
        server.restart(identities=[admin])  # the worker key is revoked
        sp.drop("rev", b1, "first.txt", b"1")
        sp.wait_done("rev", b1, ["first.txt"], state="failed", timeout=60)
        rest = [f"rest/{i}" for i in range(5)]
        for key in rest:
            sp.drop("rev", b1, key, b"r")
        sp.drop("ok", b2, "other.txt", b"o")
        sp.wait_done("ok", b2, ["other.txt"], timeout=60)
        assert all(sp.where("rev", b1, k) == ["incoming"] for k in rest)
        assert [r["reason"] for r in sp.records("first.txt")] == ["InvalidAccessKeyId"]
        server.restart(identities=[admin, worker])  # the key is back
        sp.wait_done("rev", b1, rest, timeout=90)
        assert object_keys(server.client(), b1) == sorted(rest)
        sp.close()
    finally:
        server.stop()


def test_retry_rows_carry_utc_timestamps(proxied: Spool, proxy: FaultProxy, bucket: str) -> None:
    """attempted_at is UTC: within a minute of the test's UTC clock."""
    proxied.start(*FAST, workers=1)
    started(proxied)
    proxy.set_mode("503")
    proxied.drop("p1", bucket, "clock.txt", b"c")
    wait_for(lambda: attempts(proxied, "clock.txt"), 30, "an attempt row")
    stamp = dt.datetime.fromisoformat(attempts(proxied, "clock.txt")[0]["attempted_at"])
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert abs((now - stamp).total_seconds()) < 60


def test_endpoint_unreachable_at_startup_waits_then_flows(
    proxied: Spool, proxy: FaultProxy, bucket: str, client: Any
) -> None:
    """A server that cannot be reached at start-up holds its profile; files flow once it can."""
    proxy.set_mode("refuse")
    proxied.drop("p1", bucket, "early.txt", b"early")
    sup = proxied.start("--recheck-interval", "0.3")
    wait_for(lambda: proxied.events("profile_paused"), 30, "profile_paused")
    assert proxied.events("profile_paused")[0]["event"]["reason"] == "unreachable"
    assert sup.proc.poll() is None
    assert proxied.where("p1", bucket, "early.txt") == ["incoming"]
    proxy.set_mode("pass")
    proxied.wait_done("p1", bucket, ["early.txt"], timeout=60)
    assert object_bytes(client, bucket, "early.txt") == b"early"
