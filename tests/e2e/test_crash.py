"""Crash safety: a process killed at any named step loses nothing, checked by the invariant."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from invariant import Ref, check, drained, events, non_json_lines
from spool import Spool, Supervisor, object_bytes, wait_for

from flood.crashpoints import POINTS
from flood.testing.localserver import LocalS3

pytestmark = pytest.mark.timeout(300)

UPLOADER_POINTS = (
    "after_claim",
    "after_put_start",
    "after_put",
    "after_head",
    "after_record",
    "after_move_completed",
    "after_fail_record",
    "after_move_failed",
)
WATCHER_POINTS = ("after_drain_processing", "after_drain_incoming")
STARTUP_POINTS = ("after_wipe", "after_repair")
TARGETS = ("self", "supervisor")


@pytest.fixture
def two(tmp_path: Path, s3: LocalS3) -> Iterator[Spool]:
    """A spool with profile p1 (may write) and ro (read-only key: every PUT is AccessDenied)."""
    assert s3.readonly is not None
    sp = Spool(
        tmp_path, s3, {"p1": s3.credentials_ini("p1"), "ro": s3.credentials_ini("ro", s3.readonly)}
    )
    yield sp
    sp.close()


def session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "-g", str(sid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def place(spool: Spool, state: str, ref: Ref, data: bytes) -> None:
    """Put a file straight into a state directory, as a crash before start-up would leave it."""
    path = spool.path(state, *ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def preload(spool: Spool, bucket: str) -> dict[Ref, bytes]:
    """Files of both profiles already in processing/ and incoming/, and junk in incoming_tmp/."""
    expected: dict[Ref, bytes] = {}
    for profile, count in (("p1", 6), ("ro", 2)):
        for i in range(count):
            state = "processing" if i % 3 == 0 else "incoming"
            ref = (profile, bucket, f"pre/{profile}/{state}/{i:02d}.bin")
            expected[ref] = f"{profile} {state} {i}".encode() * (i + 1)
            place(spool, state, ref, expected[ref])
    place(spool, "incoming_tmp", ("p1", bucket, "half/written.bin"), b"wiped at start-up")
    return expected


def drop_more(spool: Spool, bucket: str, expected: dict[Ref, bytes], count: int = 8) -> None:
    """Queue files the producer's way while the supervisor runs (or is being replaced)."""
    for i in range(count):
        profile = "ro" if i % 4 == 3 else "p1"
        ref = (profile, bucket, f"live/{profile}/{i:02d}/ünï-{i}.txt")
        expected[ref] = os.urandom(100 + 1000 * i)
        spool.drop(*ref, expected[ref])


def crash_env(spool: Spool, point: str, target: str) -> dict[str, str]:
    return spool.env(
        FLOOD_CRASH_AT=point,
        FLOOD_CRASH_TARGET=target,
        FLOOD_CRASH_ONCE=str(spool.root / "crashed"),
    )


def replace_dead_supervisor(
    spool: Spool, sup: Supervisor, args: tuple[str, ...], env: dict[str, str], workers: int = 2
) -> Supervisor:
    """The supervisor was killed: its children die with it and a new one starts at once."""
    code = sup.proc.wait(60)
    assert code in (-signal.SIGKILL, 137), f"supervisor exit status {code}"
    wait_for(lambda: not session_pids(sup.pid), 10, "no orphan child left in the session")
    new = spool.start(*args, workers=workers, env=env)
    wait_for(
        lambda: (
            new.proc.poll() is not None
            or [e for e in events(spool, "startup_drain_queued") if e["process"]["pid"] == new.pid]
        ),
        60,
        "the new supervisor's drain",
    )
    assert new.proc.poll() is None, "the new supervisor did not start at once"
    return new


def drain_running(
    spool: Spool, sup: Supervisor, expected: dict[Ref, bytes], timeout: float = 120
) -> None:
    """Wait for the drain while the supervisor keeps running; fail fast if it exits."""
    wait_for(
        lambda: sup.proc.poll() is not None or drained(spool, expected),
        timeout,
        f"the drain ({spool.pending_summary()})",
    )
    assert sup.proc.poll() is None, (
        f"supervisor exited with {sup.proc.returncode}; left: {spool.pending_summary()}"
    )


def assert_invariant(spool: Spool, client: Any, expected: dict[Ref, bytes]) -> None:
    report = check(spool, client, expected)
    assert report.ok, report.summary()


def run_crash(
    spool: Spool, client: Any, bucket: str, point: str, target: str, args: tuple[str, ...] = ()
) -> None:
    """Crash at `point` once (the process itself or the supervisor), then check the invariant."""
    expected = preload(spool, bucket)
    env = crash_env(spool, point, target)
    sup = spool.start(*args, env=env)
    drop_more(spool, bucket, expected)
    wait_for(lambda: (spool.root / "crashed").exists(), 60, f"the crash at {point}")
    if target == "supervisor" or point in STARTUP_POINTS:
        sup = replace_dead_supervisor(spool, sup, args, env)
    drain_running(spool, sup, expected)
    assert_invariant(spool, client, expected)
    assert spool.where("p1", bucket, "half/written.bin") == []
    if target == "self" and point not in STARTUP_POINTS:
        assert events(spool, "child_died"), "the dead child was not replaced"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("point", UPLOADER_POINTS)
def test_uploader_crash_point(
    two: Spool, client: Any, bucket: str, point: str, target: str
) -> None:
    """An uploader dying at a step of a file's way (or killing the supervisor there) loses
    nothing: every file ends in completed/ with its bytes in S3, or in failed/ on record."""
    run_crash(two, client, bucket, point, target)


@pytest.mark.parametrize(
    ("point", "target"), [(point, target) for point in WATCHER_POINTS for target in TARGETS]
)
def test_watcher_crash_point(two: Spool, client: Any, bucket: str, point: str, target: str) -> None:
    """The watcher dying during its start-up drain (or killing the supervisor there) loses
    nothing and the supervisor carries on."""
    run_crash(two, client, bucket, point, target)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("point", STARTUP_POINTS)
def test_startup_crash_point(two: Spool, client: Any, bucket: str, point: str, target: str) -> None:
    """The supervisor dying during its own start-up steps loses nothing once restarted."""
    run_crash(two, client, bucket, point, target)


@pytest.mark.parametrize("target", TARGETS)
def test_crash_after_retry_record(
    tmp_path: Path, s3: LocalS3, client: Any, bucket: str, target: str
) -> None:
    """A crash just after a retry was put on record: the retry still happens and completes."""
    with FaultProxy("127.0.0.1", s3.port) as proxy:
        sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1", endpoint=proxy.endpoint)})
        try:
            args = ("--retry-base", "0.05", "--max-retries", "50", "--retry-max-delay", "0.5")
            env = crash_env(sp, "after_retry_record", target)
            sup = sp.start(*args, env=env)
            wait_for(lambda: events(sp, "startup_drain_queued"), 60, "the start-up drain")
            proxy.set_mode("503")
            expected: dict[Ref, bytes] = {}
            for i in range(6):
                ref = ("p1", bucket, f"retry/{i}.bin")
                expected[ref] = os.urandom(500 * (i + 1))
                sp.drop(*ref, expected[ref])
            wait_for(lambda: (sp.root / "crashed").exists(), 60, "the crash")
            proxy.set_mode("pass")  # a start-up during the outage: see the hold test below
            if target == "supervisor":
                sup = replace_dead_supervisor(sp, sup, args, env)
            drain_running(sp, sup, expected)
            report = check(sp, client, expected)
            assert report.ok and report.completed == len(expected), report.summary()
        finally:
            sp.close()


@pytest.mark.parametrize("target", TARGETS)
def test_crash_before_ready(two: Spool, client: Any, bucket: str, target: str) -> None:
    """A child dying at boot, before it reports ready, is replaced or stops the supervisor
    (status 70, a boot failure; or killed with it); started again, as systemd would, nothing
    is lost."""
    expected = preload(two, bucket)
    env = crash_env(two, "before_ready", target)
    sup = two.start(env=env)
    drop_more(two, bucket, expected)
    wait_for(lambda: sup.proc.poll() is not None or drained(two, expected), 120, "the drain")
    assert (two.root / "crashed").exists()
    if sup.proc.poll() is not None:
        if target == "self":
            assert sup.proc.returncode == 70 and events(two, "child_boot_failed")
        else:
            assert sup.proc.returncode == -signal.SIGKILL
        wait_for(lambda: not session_pids(sup.pid), 30, "no orphan child left in the session")
        sup = two.start(env=env)
    drain_running(two, sup, expected)
    assert_invariant(two, client, expected)


def test_every_crash_point_has_a_test() -> None:
    """Each named point in flood.crashpoints.POINTS is exercised by a test in this module."""
    covered = {
        *UPLOADER_POINTS,
        *WATCHER_POINTS,
        *STARTUP_POINTS,
        "after_retry_record",
        "before_ready",
    }
    assert set(POINTS) == covered


def test_restart_during_an_outage_then_the_outage_ends(
    tmp_path: Path, s3: LocalS3, client: Any, bucket: str
) -> None:
    """A supervisor started while the server answers 503 holds the profile; once the server
    answers again the hold is released and every queued file is uploaded without waiting
    for the periodic rescan."""
    with FaultProxy("127.0.0.1", s3.port) as proxy:
        sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1", endpoint=proxy.endpoint)})
        try:
            expected: dict[Ref, bytes] = {}
            for i in range(5):
                ref = ("p1", bucket, f"outage/{i}.bin")
                expected[ref] = os.urandom(100 * (i + 1))
                sp.drop(*ref, expected[ref])
            proxy.set_mode("503")
            sup = sp.start("--retry-base", "0.05")
            wait_for(lambda: events(sp, "startup_drain_queued"), 60, "the start-up drain")
            assert events(sp, "profile_paused")
            proxy.set_mode("pass")
            wait_for(lambda: events(sp, "profile_resumed"), 60, "the hold released")
            drain_running(sp, sup, expected, timeout=60)
            assert_invariant(sp, client, expected)
        finally:
            sp.close()


def children_started(spool: Spool, sup: Supervisor) -> list[dict[str, Any]]:
    return [e for e in events(spool, "children_started") if e["process"]["pid"] == sup.pid]


def children(spool: Spool, sup: Supervisor) -> list[int]:
    """The pids of the newest generation of children (uploaders first, the watcher last)."""
    started = children_started(spool, sup)
    return list(started[-1]["flood"]["pids"]) if started else []


@pytest.mark.parametrize("role", ["watcher", "uploader"])
def test_kill9_of_a_child_mid_stream(spool: Spool, client: Any, bucket: str, role: str) -> None:
    """kill -9 of the watcher or of one uploader while files flow: the supervisor rebuilds its
    children, the claimed files are finished without a restart and every file arrives."""
    sup = spool.start()
    wait_for(lambda: events(spool, "startup_drain_queued"), 60, "the start-up drain")
    expected: dict[Ref, bytes] = {}
    for i in range(300):
        ref = ("p1", bucket, f"mid/{i // 50}/{i:04d}.bin")
        expected[ref] = os.urandom(2000 + i)
        spool.drop(*ref, expected[ref])
        if i == 100:
            wait_for(lambda: spool.files("completed"), 60, "a first upload")
            pids = children(spool, sup)
            os.kill(pids[-1] if role == "watcher" else pids[0], signal.SIGKILL)
    wait_for(lambda: len(events(spool, "children_started")) >= 2, 60, "a new generation")
    drain_running(spool, sup, expected)
    assert_invariant(spool, client, expected)
    [died] = events(spool, "child_died")
    assert died["flood"]["child"].startswith(role)


def test_log_stays_json_after_kill9_of_the_supervisor(spool: Spool, bucket: str) -> None:
    """After kill -9 of a child and then of the supervisor every line of the log is still one
    JSON object (nothing of multiprocessing's own, such as leaked-semaphore warnings)."""
    sup = spool.start()
    spool.drop("p1", bucket, "one.txt", b"1")
    spool.wait_done("p1", bucket, ["one.txt"])
    os.kill(children(spool, sup)[0], signal.SIGKILL)
    wait_for(lambda: len(children_started(spool, sup)) >= 2, 60, "a new generation")
    spool.drop("p1", bucket, "two.txt", b"2")
    spool.wait_done("p1", bucket, ["two.txt"])
    sup.kill9()
    wait_for(lambda: not session_pids(sup.pid), 10, "no process left in the session")
    assert non_json_lines(spool) == []


def test_crash_before_a_multipart_put_leaves_no_upload_behind(
    spool: Spool, client: Any, bucket: str
) -> None:
    """A crash at after_put_start with a file above the multipart threshold: the file is
    uploaded whole afterwards and no incomplete multipart upload is left."""
    expected = {("p1", bucket, "big/parts.bin"): os.urandom(12 * 1024 * 1024)}
    env = crash_env(spool, "after_put_start", "self")
    sup = spool.start("--multipart-threshold", "5", env=env)
    spool.drop(*next(iter(expected)), next(iter(expected.values())))
    drain_running(spool, sup, expected)
    assert (spool.root / "crashed").exists()
    assert_invariant(spool, client, expected)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_kill9_during_a_multipart_upload_leaves_no_incomplete_upload(
    spool: Spool, client: Any, bucket: str
) -> None:
    """kill -9 of the supervisor while a multipart upload is in flight: after a restart the
    file is uploaded and no incomplete upload of that key is left on the server."""
    data = os.urandom(40 * 1024 * 1024)
    expected = {("p1", bucket, "big/cut.bin"): data}
    args = ("--multipart-threshold", "5")
    sup = spool.start(*args)
    wait_for(lambda: events(spool, "startup_drain_queued"), 60, "the start-up drain")
    spool.drop(*next(iter(expected)), data)
    if not _catch_upload(client, bucket, spool):
        pytest.fail("no multipart upload was seen in flight: nothing was interrupted")
    sup.kill9()
    wait_for(lambda: not session_pids(sup.pid), 10, "no orphan child left in the session")
    sup = spool.start(*args)
    drain_running(spool, sup, expected)
    assert object_bytes(client, bucket, "big/cut.bin") == data
    assert_invariant(spool, client, expected)
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert left == [], f"{len(left)} incomplete multipart upload(s) left behind"


def _catch_upload(client: Any, bucket: str, spool: Spool, timeout: float = 60) -> bool:
    """Poll (tightly: the window is short) until a multipart upload is in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            return True
        if spool.files("completed"):
            return False
    return False


def test_short_chaos_run(s3: LocalS3, tmp_path: Path) -> None:
    """The chaos run's short form: kills, restarts and network faults, two files of 40-60 MiB
    among the small ones, then zero lost, zero wrong, zero out of step."""
    chaos = _load_chaos()
    config = chaos.Config(
        seed=int(os.environ.get("FLOOD_CHAOS_SEED", "20240611")),
        duration=float(os.environ.get("FLOOD_CHAOS_DURATION", "60")),
        files=int(os.environ.get("FLOOD_CHAOS_FILES", "600")),
        max_size=8 * 1024 * 1024,
        drain_timeout=150,
        large=2,  # kills land in the middle of their parts
        large_min=40 * 1024 * 1024,
        large_max=60 * 1024 * 1024,
    )
    result = chaos.run(config, s3, tmp_path)
    print(result.line())
    assert (result.lost, result.wrong, result.out_of_step) == (0, 0, 0), result.line()


def _load_chaos() -> Any:
    path = Path(__file__).parent.parent / "chaos" / "chaos.py"
    spec = importlib.util.spec_from_file_location("flood_chaos", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
