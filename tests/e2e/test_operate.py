"""Operating Flood: flood-status, flood-requeue, flood-doctor, metrics, systemd notify, SIGHUP,
the deploy/ files, and every log line checked against the ECS rules Filebeat applies."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from faultproxy import FaultProxy
from prometheus_client.parser import text_string_to_metric_families
from spool import Spool, object_bytes, object_keys, wait_for

from flood import credentials
from flood.commands.doctor import classify
from flood.testing.localserver import Identity, LocalS3

pytestmark = pytest.mark.timeout(180)
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture
def proxy(s3: LocalS3) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", s3.port) as fp:
        yield fp


def drained(spool: Spool, count: int = 1) -> None:
    wait_for(lambda: len(spool.events("startup_drain_queued")) >= count, 60, "the start-up drain")


def run_json(spool: Spool, command: str, *args: str) -> Any:
    result = spool.run(
        command,
        "--server-dir",
        str(spool.dir),
        "--credentials",
        str(spool.credentials),
        "--json",
        *args,
    )
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_pids(spool: Spool) -> list[int]:
    """The pids of the newest generation of children (the watcher is the last)."""
    return list(spool.events("children_started")[-1]["flood"]["pids"])


def by(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, rows)
    return found[0]


# -- flood-status ------------------------------------------------------------------------------
def test_status_counts_each_state_holds_and_errors(
    tmp_path: Path, s3: LocalS3, bucket: str, proxy: FaultProxy
) -> None:
    """flood-status shows, per profile and bucket, completed, failed, held and retrying files,
    the pause and its reason, the errors by reason, and the running supervisor."""
    sp = Spool(
        tmp_path,
        s3,
        {
            "p1": s3.credentials_ini("p1"),
            "slow": s3.credentials_ini("slow", endpoint=proxy.endpoint),
        },
    )
    try:
        missing = f"gone-{bucket}"
        sp.drop("p1", missing, "held.txt", b"waits")
        sup = sp.start("--retry-base", "120", workers=1)
        drained(sp)
        proxy.set_mode("503")
        for key in ("ok1", "ok2"):
            sp.drop("p1", bucket, key, b"12345")
        link = sp.path("incoming", "p1", bucket, "link")
        os.symlink("/etc/hostname", link)
        sp.drop("slow", bucket, "later.txt", b"later")
        sp.wait_done("p1", bucket, ["ok1", "ok2"])
        sp.wait_done("p1", bucket, ["link"], state="failed")
        wait_for(lambda: sp.events("upload_retry_scheduled"), 60, "a scheduled retry")
        data = run_json(sp, "flood-status")
        rows = data["buckets"]
        done = by(rows, profile="p1", bucket=bucket)
        assert (done["completed_today"], done["failed"], done["incoming"]) == (2, 1, 0)
        held = by(rows, profile="p1", bucket=missing)
        assert (held["incoming"], held["paused"]) == (1, "NoSuchBucket")
        assert held["oldest_pending_age_seconds"] >= 0
        slow = by(rows, profile="slow", bucket=bucket)
        assert (slow["waiting_retry"], slow["processing"]) == (1, 0)
        due = dt.datetime.fromisoformat(slow["next_retry_at"].rstrip("Z"))
        assert due > dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=60)
        assert by(data["paused"], profile="p1", bucket=missing)["reason"] == "NoSuchBucket"
        assert by(data["errors"], state="failed", reason="not_regular_file")["files"] == 1
        assert by(data["errors"], state="retrying")["buckets"] == [f"slow/{bucket}"]
        assert data["supervisor"] == {"running": True, "pid": sup.pid}
        assert data["oldest_pending_age_seconds"] >= held["oldest_pending_age_seconds"]
        table = sp.run("flood-status", "--server-dir", str(sp.dir))
        assert table.returncode == 0, table.stderr
        assert "PROFILE" in table.stdout and "NEXT RETRY" in table.stdout
        assert f"p1/{missing}: NoSuchBucket" in table.stdout
        assert "not_regular_file: 1 file" in table.stdout
        assert sup.terminate() == 0
        stopped = run_json(sp, "flood-status")
        assert stopped["supervisor"]["running"] is False
    finally:
        sp.close()


def test_status_why_tells_one_files_history(
    tmp_path: Path, s3: LocalS3, bucket: str, proxy: FaultProxy
) -> None:
    """`flood-status why` lists a file's attempts with their errors, its outcome, size and
    ETag, found by s3:// URI, by its path in completed/ and by its bare key."""
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1", endpoint=proxy.endpoint)})
    try:
        sp.start("--retry-base", "0.2", "--max-retries", "8", workers=1)
        drained(sp)
        proxy.set_mode("503")
        sp.drop("p1", bucket, "dir/story.txt", b"a story")
        wait_for(lambda: len(sp.query("SELECT * FROM retry_attempts")) >= 1, 60, "a retry")
        proxy.set_mode("pass")
        sp.wait_done("p1", bucket, ["dir/story.txt"])
        uri = f"s3://p1/{bucket}/dir/story.txt"
        [item] = run_json(sp, "flood-status", "why", uri)
        [passage] = item["passages"]
        assert (passage["state"], passage["size"]) == ("completed", 7)
        assert passage["etag"] == hashlib.md5(b"a story").hexdigest()
        attempts = passage["attempts"]
        assert attempts[-1]["outcome"] == "success"
        assert all(a["outcome"] == "failure" and "SlowDown" in a["error"] for a in attempts[:-1])
        assert [d["state"] for d in item["on_disk"]] == ["completed"]
        completed = str(sp.path("completed", "p1", bucket, "dir/story.txt"))
        for target in (completed, "dir/story.txt"):
            text = sp.run("flood-status", "--server-dir", str(sp.dir), target)
            assert text.returncode == 0, text.stderr
            assert uri in text.stdout and "failure: " in text.stdout
            assert f"completed: size 7, ETag {passage['etag']}" in text.stdout
        unknown = sp.run("flood-status", "--server-dir", str(sp.dir), "why", "no/such/key")
        assert unknown.returncode == 1 and "no record" in unknown.stderr
    finally:
        sp.close()


# -- flood-requeue -----------------------------------------------------------------------------
def test_requeue_moves_failed_files_back_with_linked_records(
    tmp_path: Path, s3: LocalS3, bucket: str, proxy: FaultProxy, client: Any
) -> None:
    """Failed files go back to incoming/ and up, each with a record linked to its failure;
    an older failure of the same key waits for --all and goes before the newer one."""
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1", endpoint=proxy.endpoint)})
    try:
        sp.start("--max-retries", "0", workers=1)
        drained(sp)
        proxy.set_mode("503")
        sp.drop("p1", bucket, "a.txt", b"old a")
        sp.drop("p1", bucket, "b.txt", b"b")
        sp.wait_done("p1", bucket, ["a.txt", "b.txt"], state="failed")
        sp.drop("p1", bucket, "a.txt", b"new a")
        wait_for(
            lambda: (
                sp.path("failed", "p1", bucket, "a.txt.~1~").exists()
                and not sp.path("processing", "p1", bucket, "a.txt").exists()
            ),
            60,
            "the second failure of a.txt",
        )
        dry = sp.run(
            "flood-requeue", "--server-dir", str(sp.dir), "--reason", "SlowDown", "--dry-run"
        )
        assert dry.returncode == 0, dry.stderr
        assert "would move 2 files" in dry.stdout and "a.txt.~1~" in dry.stderr
        assert "--all" in dry.stderr
        assert sp.files("incoming") == [] and len(sp.files("failed")) == 3
        none = sp.run("flood-requeue", "--server-dir", str(sp.dir), "--reason", "AccessDenied")
        assert none.returncode == 0 and "moved 0 files" in none.stdout
        proxy.set_mode("pass")
        first = sp.run("flood-requeue", "--server-dir", str(sp.dir), "--all")
        assert first.returncode == 0, first.stderr
        assert "moved 2 files" in first.stdout and "run again" in first.stderr
        sp.wait_done("p1", bucket, ["b.txt"])
        wait_for(lambda: sp.path("completed", "p1", bucket, "a.txt").exists(), 60, "a.txt")
        assert object_bytes(client, bucket, "a.txt") == b"old a"
        second = sp.run("flood-requeue", "--server-dir", str(sp.dir), "--all")
        assert second.returncode == 0 and "moved 1 file" in second.stdout, second.stderr
        wait_for(
            lambda: sp.path("completed", "p1", bucket, "a.txt.~1~").exists(), 60, "the newer a.txt"
        )
        assert object_bytes(client, bucket, "a.txt") == b"new a"
        assert sp.files("failed") == []
        rows = sp.records("a.txt")
        assert [r["current_state"] for r in rows] == ["failed", "failed", "completed", "completed"]
        assert (rows[2]["requeued_from"], rows[3]["requeued_from"]) == (
            rows[0]["id"],
            rows[1]["id"],
        )
        [b_old, b_new] = sp.records("b.txt")
        assert b_new["requeued_from"] == b_old["id"] and b_new["current_state"] == "completed"
    finally:
        sp.close()


def test_requeue_never_overwrites_a_file_waiting_in_incoming(spool: Spool, bucket: str) -> None:
    """A failed file whose name already waits in incoming/ is skipped and reported (exit 1)."""
    failed = spool.path("failed", "p1", bucket, "x.txt")
    waiting = spool.path("incoming", "p1", bucket, "x.txt")
    for path, data in ((failed, b"failed copy"), (waiting, b"waiting copy")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    result = spool.run("flood-requeue", "--server-dir", str(spool.dir), "--all")
    assert result.returncode == 1
    assert "is waiting already" in result.stderr and "moved 0 files" in result.stdout
    assert (failed.read_bytes(), waiting.read_bytes()) == (b"failed copy", b"waiting copy")
    assert [r["current_state"] for r in spool.records()] == []
    usage = spool.run("flood-requeue", "--server-dir", str(spool.dir))
    assert usage.returncode == 2 and "--all" in usage.stderr


# -- flood-doctor ------------------------------------------------------------------------------
def test_doctor_round_trip_and_classified_failures(
    tmp_path: Path, s3: LocalS3, bucket: str, client: Any
) -> None:
    """flood-doctor passes a good profile (probe put, read and deleted) and classifies a wrong
    secret, a missing bucket, a read-only key and a stopped server."""
    assert s3.readonly is not None
    wrong = Identity("wrong", s3.admin.access_key, "x" * 40, s3.admin.actions)
    missing = f"gone-{uuid.uuid4().hex[:8]}"
    sp = Spool(
        tmp_path,
        s3,
        {
            "good": s3.credentials_ini("good"),
            "nobucket": s3.credentials_ini("nobucket"),
            "badsecret": s3.credentials_ini("badsecret", wrong),
            "ro": s3.credentials_ini("ro", s3.readonly),
            "down": s3.credentials_ini("down", endpoint=f"http://127.0.0.1:{closed_port()}"),
        },
    )
    try:
        for profile, name in (
            ("good", bucket),
            ("nobucket", missing),
            ("badsecret", bucket),
            ("ro", bucket),
            ("down", bucket),
        ):
            (sp.dir / "incoming" / profile / name).mkdir(parents=True)
        sp.start(workers=1)
        drained(sp)
        report = run_json(sp, "flood-doctor")
        checks = report["checks"]
        assert report["ok"] is False
        assert by(checks, subject=f"good/{bucket}")["status"] == "ok"
        assert by(checks, subject=f"nobucket/{missing}")["category"] == "missing_bucket"
        assert by(checks, subject="badsecret")["category"] == "auth"
        assert "SignatureDoesNotMatch" in by(checks, subject="badsecret")["detail"]
        ro = by(checks, subject=f"ro/{bucket}")
        assert (ro["category"], ro["status"]) == ("permissions", "FAIL")
        assert "PutObject denied" in ro["detail"]
        assert by(checks, subject="down")["category"] == "network"
        for subject in ("credentials", "server dir", "inotify", "disk"):
            assert by(checks, subject=subject)["status"] == "ok", checks
        where = ("--server-dir", str(sp.dir), "--credentials", str(sp.credentials))
        good = sp.run("flood-doctor", *where, "--profile", "good")
        assert good.returncode == 0, good.stdout + good.stderr
        assert "all is well" in good.stdout and "clock" in good.stdout
        assert not [k for k in object_keys(client, bucket) if k.startswith(".flood-doctor/")]
        text = sp.run("flood-doctor", *where, "--profile", "badsecret")
        assert text.returncode == 1 and re.search(r"FAIL\s+badsecret\s+auth: ", text.stdout)
    finally:
        sp.close()


def _client_error(code: str, status: int, message: str = "m") -> Exception:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("error", "operation", "category"),
    [
        (_client_error("InvalidAccessKeyId", 403), "ListBuckets", "auth"),
        (_client_error("NoSuchBucket", 404), "PutObject", "missing_bucket"),
        (_client_error("404", 404), "HeadBucket", "missing_bucket"),
        (_client_error("AccessDenied", 403), "DeleteObject", "permissions"),
        (
            _client_error(
                "NotImplemented",
                501,
                "A header you provided implies functionality that is not implemented",
            ),
            "PutObject",
            "incompatible",
        ),
        (
            _client_error("InvalidArgument", 400, "Unsupported header 'x-amz-checksum-crc32'"),
            "PutObject",
            "incompatible",
        ),
        (_client_error("RequestTimeTooSkewed", 403), "PutObject", "clock"),
        (_client_error("SlowDown", 503), "PutObject", "server"),
    ],
)
def test_doctor_classifies_provider_answers(
    error: Exception, operation: str, category: str
) -> None:
    """Answers the local server cannot give (a refused checksum header, 501, skew) still get
    their category, and a permissions problem names the operation."""
    found, detail = classify(error, operation)
    assert found == category
    assert operation in detail
    if "checksum" in str(error):
        assert "checksum headers" in detail


# -- metrics -----------------------------------------------------------------------------------
def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_uploads_across_processes_and_restarts(spool: Spool, bucket: str) -> None:
    """The metrics endpoint, parsed with prometheus_client, counts every upload of every
    uploader, keeps the counts of a killed one, and shows states, holds and restarts."""
    sizes = {f"m/{i}": b"x" * (100 + i) for i in range(6)}
    missing = f"gone-{bucket}"
    spool.drop("p1", missing, "held.txt", b"h")
    sup = spool.start("--metrics-port", "0", workers=2)
    wait_for(lambda: spool.events("metrics_serving"), 60, "the metrics server")
    [serving] = spool.events("metrics_serving")
    port, path = serving["flood"]["port"], serving["file"]["path"]
    assert serving["flood"]["address"] == "127.0.0.1" and os.path.isdir(path)
    drained(spool)
    for key, data in list(sizes.items())[:4]:
        spool.drop("p1", bucket, key, data)
    os.symlink("/etc/hostname", spool.path("incoming", "p1", bucket, "link"))
    spool.wait_done("p1", bucket, list(sizes)[:4])
    spool.wait_done("p1", bucket, ["link"], state="failed")
    ok = (("bucket", bucket), ("outcome", "success"), ("profile", "p1"))
    wait_for(lambda: scrape(port).get(("flood_files_uploaded_total", ok)) == 4, 30, "4 counted")
    os.kill(child_pids(spool)[0], signal.SIGKILL)
    wait_for(lambda: len(spool.events("children_started")) >= 2, 60, "a new generation")
    for key, data in list(sizes.items())[4:]:
        spool.drop("p1", bucket, key, data)
    spool.wait_done("p1", bucket, list(sizes))
    values = wait_for(
        lambda: (v := scrape(port)).get(("flood_files_uploaded_total", ok)) == 6 and v,
        30,
        "6 counted",
    )
    failed = (("bucket", bucket), ("outcome", "failure"), ("profile", "p1"))
    assert values[("flood_files_uploaded_total", failed)] == 1
    assert values[("flood_uploaded_bytes_total", ok)] == sum(len(d) for d in sizes.values())
    assert values[("flood_upload_duration_seconds_count", (("profile", "p1"),))] == 6
    assert (
        values[("flood_files", (("bucket", bucket), ("profile", "p1"), ("state", "failed")))] == 1
    )
    assert (
        values[("flood_files", (("bucket", missing), ("profile", "p1"), ("state", "incoming")))]
        == 1
    )
    assert (
        values[
            ("flood_paused", (("bucket", missing), ("profile", "p1"), ("reason", "NoSuchBucket")))
        ]
        == 1
    )
    assert (
        values[("flood_oldest_pending_age_seconds", (("bucket", missing), ("profile", "p1")))] >= 0
    )
    assert values[("flood_process_restarts_total", (("reason", "child_died"),))] == 3
    # Certain events: the last two files renamed into a directory watched since start-up
    # (how many of the first ones arrive as events or by the new directory's scan is timing).
    assert values[("flood_watcher_events_total", ())] >= 2
    assert sup.terminate() == 0
    assert not os.path.exists(path)


# -- systemd -----------------------------------------------------------------------------------
class NotifySocket:
    """The socket systemd would listen on for sd_notify datagrams."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "notify.sock")
        if len(self.path) > 100:  # sun_path holds 108 bytes
            self.path = f"/tmp/flood-notify-{uuid.uuid4().hex[:8]}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen: list[str] = []

    def next_until(self, wanted: str, timeout: float = 60) -> list[str]:
        """Messages received until one holding the `wanted` line (returned, with it last)."""
        got: list[str] = []
        deadline = dt.datetime.now() + dt.timedelta(seconds=timeout)
        while True:
            left = (deadline - dt.datetime.now()).total_seconds()
            if left <= 0:
                raise AssertionError(f"no {wanted} within {timeout} s; got {got}")
            self.sock.settimeout(left)
            message = self.sock.recv(4096).decode()
            got.append(message)
            self.seen.append(message)
            if wanted in message.splitlines():
                return got

    def drain(self) -> None:
        """Read what is already queued on the socket."""
        self.sock.setblocking(False)
        try:
            while True:
                self.seen.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def quiet_for(self, seconds: float, unwanted: str) -> bool:
        """True if no message holding `unwanted` arrives within `seconds`."""
        self.sock.settimeout(seconds)
        end = dt.datetime.now() + dt.timedelta(seconds=seconds)
        try:
            while dt.datetime.now() < end:
                self.sock.settimeout(max(0.01, (end - dt.datetime.now()).total_seconds()))
                if unwanted in self.sock.recv(4096).decode().splitlines():
                    return False
        except TimeoutError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


def test_notify_ready_watchdog_reload_and_stopping(
    spool: Spool, bucket: str, tmp_path: Path
) -> None:
    """READY=1 after the drain, then WATCHDOG=1 while children make progress (withheld while
    the watcher is stopped), RELOADING=1 and READY=1 on SIGHUP, STOPPING=1 at the end."""
    notify = NotifySocket(tmp_path)
    try:
        env = spool.env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="1000000")
        sup = spool.start(env=env)
        before = notify.next_until("READY=1")
        assert not [m for m in before if "WATCHDOG=1" in m.splitlines()]
        assert spool.events("startup_drain_queued")
        notify.next_until("WATCHDOG=1", 30)
        pids = child_pids(spool)
        for pid in pids:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith(b"NOTIFY_SOCKET=")]
        watcher = pids[-1]
        os.kill(watcher, signal.SIGSTOP)
        try:
            wait_for(lambda: spool.events("watchdog_withheld"), 30, "watchdog_withheld")
            assert spool.events("watchdog_withheld")[0]["flood"]["children"] == ["watcher"]
            notify.drain()  # pings sent before the stall was seen
            assert notify.quiet_for(2.5, "WATCHDOG=1")
        finally:
            os.kill(watcher, signal.SIGCONT)
        notify.next_until("WATCHDOG=1", 30)
        os.kill(sup.pid, signal.SIGHUP)
        reload = notify.next_until("READY=1", 90)
        assert [m for m in reload if "RELOADING=1" in m.splitlines()]
        spool.drop("p1", bucket, "after-reload.txt", b"r")
        spool.wait_done("p1", bucket, ["after-reload.txt"])
        sup.proc.send_signal(signal.SIGTERM)
        notify.next_until("STOPPING=1", 60)
        assert sup.proc.wait(60) == 0
    finally:
        notify.close()


def test_sighup_picks_up_a_new_profile_and_survives_a_broken_file(
    spool: Spool, bucket: str, s3: LocalS3, client: Any
) -> None:
    """SIGHUP re-reads the credentials: a new profile's waiting file goes up; a broken file
    is logged and the profiles already loaded keep working."""
    sup = spool.start()
    drained(spool)
    spool.drop("p2", bucket, "new-profile.txt", b"p2 data")
    wait_for(
        lambda: [e for e in spool.events("profile_unknown") if e["file"]["path"] == "p2"],
        30,
        "profile_unknown for p2",
    )
    assert spool.where("p2", bucket, "new-profile.txt") == ["incoming"]
    good = spool.credentials.read_text() + s3.credentials_ini("p2")
    spool.credentials.write_text(good)
    os.kill(sup.pid, signal.SIGHUP)
    spool.wait_done("p2", bucket, ["new-profile.txt"], timeout=90)
    assert object_bytes(client, bucket, "new-profile.txt") == b"p2 data"
    [reloaded] = spool.events("credentials_reloaded")
    assert reloaded["flood"]["profiles"] == ["p1", "p2"]
    assert not spool.events("child_killed")
    spool.credentials.write_text("not an ini file\n")
    os.kill(sup.pid, signal.SIGHUP)
    wait_for(lambda: spool.events("reload_failed"), 30, "reload_failed")
    assert sup.proc.poll() is None
    spool.drop("p1", bucket, "still-p1.txt", b"1")
    spool.drop("p2", bucket, "still-p2.txt", b"2")
    spool.wait_done("p1", bucket, ["still-p1.txt"])
    spool.wait_done("p2", bucket, ["still-p2.txt"])
    assert sup.terminate() == 0


# -- deploy/ -----------------------------------------------------------------------------------
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit without a warning (ExecStart pointed here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit = (DEPLOY / "flood-supervisor.service").read_text()
    here = Path(sys.executable).parent / "flood-supervisor"
    assert "ExecStart=/opt/flood/bin/flood-supervisor " in unit
    (tmp_path / "flood-supervisor.service").write_text(
        unit.replace("/opt/flood/bin/flood-supervisor", str(here))
    )
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "flood-supervisor.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    for line in (
        "Type=notify",
        "KillMode=mixed",
        "RestartPreventExitStatus=78",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "User=flood",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert line in unit.splitlines()
    stop = int(re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert stop > 20 + 5  # --grace default plus the children's final join


def test_deploy_examples_are_usable(tmp_path: Path) -> None:
    """The example credentials parse into profiles and are installed mode 0600 (git keeps no
    mode, so the install line must); the cron line names flood-copy; the logrotate config
    copies and truncates the file the unit's config file names."""
    example = DEPLOY / "credentials.example"
    loaded = credentials.load(str(example), {"HOME": str(tmp_path)})
    assert sorted(loaded.profiles) == ["archive", "backup", "offsite"]
    assert re.search(r"install .*-m 0600 credentials\.example ", (DEPLOY / "README.md").read_text())
    assert "flood-copy" in (DEPLOY / "flood-copy.cron").read_text()
    rotate = (DEPLOY / "flood.logrotate").read_text()
    unit = (DEPLOY / "flood-supervisor.service").read_text()
    installed = re.search(r"--config /etc/flood/(\S+)", unit).group(1)  # type: ignore[union-attr]
    log_file = tomllib.loads((DEPLOY / installed).read_text())["supervisor"]["log_file"]
    assert log_file + " {" in rotate and "copytruncate" in rotate.split("{", 1)[1]
    assert log_file in (DEPLOY / "filebeat.yml").read_text()


# -- ECS log lines -----------------------------------------------------------------------------
ECS_OBJECTS = {
    "agent",
    "client",
    "cloud",
    "container",
    "destination",
    "dns",
    "ecs",
    "error",
    "event",
    "file",
    "group",
    "host",
    "http",
    "log",
    "network",
    "observer",
    "orchestrator",
    "organization",
    "os",
    "package",
    "process",
    "related",
    "rule",
    "server",
    "service",
    "source",
    "span",
    "threat",
    "tls",
    "trace",
    "transaction",
    "url",
    "user",
    "user_agent",
    "vulnerability",
    "labels",
}
TOP_LEVEL = ECS_OBJECTS | {"@timestamp", "message", "tags", "flood"}
ECS_TYPES = {
    "@timestamp": "string",
    "message": "string",
    "log.level": "string",
    "log.logger": "string",
    "ecs.version": "string",
    "event.action": "string",
    "event.reason": "string",
    "event.duration": "integer",
    "process.pid": "integer",
    "file.path": "string",
    "file.size": "integer",
    "error.message": "string",
    "error.type": "string",
    "error.stack_trace": "string",
    "service.name": "string",
}
LEVELS = {"debug", "info", "warning", "error", "critical"}
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")


def _type(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    kinds = {_type(v) for v in value} - {None}
    return (
        f"array of {kinds.pop()}"
        if len(kinds) == 1
        else ("array" if not kinds else f"mixed array {sorted(kinds)}")
    )


def expand(doc: dict[str, Any], problems: list[str], where: str = "") -> dict[str, Any]:
    """Filebeat's expand_keys: dotted names become nested objects; a dotted name that meets a
    value of another kind at the same place is a collision."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        parts = key.split(".")
        if any(not p for p in parts):
            problems.append(f"field name {where}{key!r} has an empty segment")
            continue
        if isinstance(value, dict):
            value = expand(value, problems, f"{where}{key}.")
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"{where}{'.'.join(parts[: i + 1])} is a value and an object")
                break
        else:
            _merge(node, parts[-1], value, problems, f"{where}{key}")
    return out


def _merge(node: dict[str, Any], name: str, value: Any, problems: list[str], where: str) -> None:
    if name not in node:
        node[name] = value
    elif isinstance(node[name], dict) and isinstance(value, dict):
        for k, v in value.items():
            _merge(node[name], k, v, problems, f"{where}.{k}")
    else:
        problems.append(f"{where} is given twice (a value and an object, or two values)")


def leaves(doc: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def ecs_problems(line: str, types: dict[str, tuple[str, str]], origin: str) -> list[str]:
    """What in one line would break Filebeat's ndjson parsing or an Elasticsearch mapping;
    `types` carries each field's type across lines (one index holds them all)."""
    try:
        raw = json.loads(line)
    except ValueError as exc:
        return [f"not JSON: {exc}"]
    if not isinstance(raw, dict):
        return ["not a JSON object"]
    problems: list[str] = []
    doc = expand(raw, problems)
    fields = dict(leaves(doc))
    for name in ("@timestamp", "log.level", "message", "ecs.version"):
        if not isinstance(fields.get(name), str) or not fields[name]:
            problems.append(f"{name} missing or not a string")
    stamp = str(fields.get("@timestamp", ""))
    if not TIMESTAMP.match(stamp):
        problems.append(f"@timestamp {stamp!r} is not ISO 8601 UTC")
    if fields.get("log.level") not in LEVELS:
        problems.append(f"log.level {fields.get('log.level')!r} is not a level")
    problems += [
        f"top-level field {k!r} is neither ECS nor flood.*" for k in doc if k not in TOP_LEVEL
    ]
    problems += [
        f"ECS object {k!r} is a {_type(doc[k])}"
        for k in doc
        if k in ECS_OBJECTS and not isinstance(doc[k], dict)
    ]
    for name in list(fields):
        parts = name.split(".")
        for i in range(1, len(parts)):
            problems += _same_type(".".join(parts[:i]), "object", types, origin)
    for name, value in fields.items():
        kind = _type(value)
        if kind is None or kind in ("array", "object"):
            continue
        if kind.startswith("mixed"):
            problems.append(f"{name} is a {kind}")
        expected = ECS_TYPES.get(name)
        if expected and kind != expected:
            problems.append(f"{name} is a {kind}, ECS maps it as {expected}")
        problems += _same_type(name, kind, types, origin)
    return problems


def _same_type(name: str, kind: str, types: dict[str, tuple[str, str]], origin: str) -> list[str]:
    """One mapping per field in the index: integer and number mix (ES coerces), nothing else."""
    seen = types.setdefault(name, (kind, origin))
    if seen[0] == kind or {seen[0], kind} == {"integer", "number"}:
        return []
    return [f"{name} is a {kind} here but a {seen[0]} in {seen[1]}"]


def log_files(top: Path) -> list[Path]:
    """Every Flood log file below `top` (a file whose first line is an ECS JSON object)."""
    found = []
    for folder, _, names in os.walk(top):
        for name in names:
            if not name.endswith(".log"):
                continue
            path = Path(folder) / name
            with open(path, "rb") as handle:
                if handle.read(14) == b'{"@timestamp":':
                    found.append(path)
    return sorted(found)


def check_logs(top: Path) -> tuple[int, list[str]]:
    """(lines checked, problems) over every Flood log line below `top`. Lines that do not
    start with '{' are what the tests' Spool merges in from stderr (one-line errors,
    tracebacks), not log lines."""
    types: dict[str, tuple[str, str]] = {}
    problems: list[str] = []
    count = 0
    for path in log_files(top):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.startswith("{"):
                continue
            count += 1
            where = f"{path.relative_to(top)}:{number}"
            problems += [f"{where}: {p}" for p in ecs_problems(line, types, where)]
    return count, problems


@pytest.fixture(scope="session")
def session_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """At the very end of the session, check the log lines every e2e test wrote (its
    failure shows as an error in the teardown of the session's last test)."""
    top = tmp_path_factory.getbasetemp()
    yield top
    _, problems = check_logs(top)
    assert not problems, "log lines that would break Filebeat/Elasticsearch:\n" + "\n".join(
        problems[:50]
    )


def test_every_log_line_follows_the_ecs_rules_filebeat_applies(
    spool: Spool, bucket: str, session_logs: Path
) -> None:
    """Every log line written so far in this session (this test's supervisor included) is
    valid JSON with an ISO 8601 UTC @timestamp, log.level, message and ecs.version, dotted
    names that expand without collisions, and one type per field across all lines."""
    sup = spool.start()
    drained(spool)
    spool.drop("p1", bucket, "ok.txt", b"ok")
    os.symlink("/nonexistent", spool.path("incoming", "p1", bucket, "dangling"))
    spool.drop("p1", f"gone-{bucket}", "held.txt", b"h")
    spool.wait_done("p1", bucket, ["ok.txt"])
    spool.wait_done("p1", bucket, ["dangling"], state="failed")
    os.kill(sup.pid, signal.SIGHUP)
    wait_for(lambda: len(spool.events("startup_drain_queued")) >= 2, 60, "the reload")
    assert sup.terminate() == 0
    count, problems = check_logs(session_logs)
    assert count >= len(spool.log_lines()) > 20
    assert not problems, "\n".join(problems[:50])


def test_the_ecs_check_catches_what_breaks_a_mapping() -> None:
    """The checker rejects a collision, a bad timestamp, an ECS object as a string and a
    field whose type changes between lines."""
    types: dict[str, tuple[str, str]] = {}
    good = {
        "@timestamp": "2026-01-01T00:00:00.000Z",
        "log.level": "info",
        "message": "m",
        "ecs.version": "1.6.0",
        "flood": {"n": 1},
    }
    assert ecs_problems(json.dumps(good), types, "a") == []
    bad = [
        {**good, "flood.n": "one"},
        {**good, "flood": {"n.x": 1}},
        {**good, "@timestamp": "2026-01-01 00:00:00"},
        {**good, "host": "h1"},
        {**good, "log": "x"},
        {**good, "custom": 1},
    ]
    for doc in bad:
        assert ecs_problems(json.dumps(doc), dict(types), "b"), doc
    assert ecs_problems("{not json", types, "c")
