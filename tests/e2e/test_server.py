"""flood-supervisor end to end: a real server dir, the real local S3 server, real processes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from spool import Spool, new_bucket, object_bytes, object_keys, wait_for

from flood.transfer import WINDOW_BYTES
from flood.upload import BATCH_MAX_BYTES

pytestmark = pytest.mark.timeout(180)


def test_startup_wipes_tmp_creates_dirs_and_drains_processing_and_incoming(
    spool: Spool, bucket: str, client: Any
) -> None:
    """Start-up wipes incoming_tmp, creates the layout and uploads pre-placed files (that
    processing/ is queued first is tests/unit/test_watcher.py's: with two uploaders the
    order in which they finish is not the order they were sent)."""
    stale = spool.path("incoming_tmp", "p1", bucket, "half/written")
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    pre = {
        ("processing", "was/claimed.bin"): b"claimed before a crash",
        ("incoming", "queued.txt"): b"queued while down",
    }
    for (state, key), data in pre.items():
        p = spool.path(state, "p1", bucket, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    spool.start()
    spool.wait_done("p1", bucket, [k for _, k in pre])
    for (_, key), data in pre.items():
        assert object_bytes(client, bucket, key) == data
    assert not stale.exists()
    for state in ("incoming_tmp", "incoming", "processing", "failed", "completed"):
        assert (spool.dir / state / "p1" / bucket).is_dir()
    drained = [e["flood"]["key"] for e in spool.events("upload_succeeded")]
    assert sorted(drained) == ["queued.txt", "was/claimed.bin"]


def test_files_arriving_during_the_drain_are_not_missed(
    spool: Spool, bucket: str, client: Any
) -> None:
    """Files renamed in while the start-up drain runs are uploaded too."""
    early = [f"early/{i:04d}" for i in range(400)]
    for key in early:
        spool.drop("p1", bucket, key, key.encode())
    spool.start(workers=1)
    late = []
    for i in range(100):
        key = f"late/{i:03d}"
        spool.drop("p1", bucket, key, key.encode())
        late.append(key)
    spool.wait_done("p1", bucket, early + late, timeout=120)
    assert object_keys(client, bucket) == sorted(early + late)
    assert object_bytes(client, bucket, "late/099") == b"late/099"


def test_live_files_in_nested_paths_and_odd_names(spool: Spool, bucket: str, client: Any) -> None:
    """Renamed-in files land under their key: nested, unicode, spaces, empty."""
    spool.start()
    files = {
        "a/b/c/d/deep.txt": b"deep",
        "üñí cödé/ファイル name.txt": "ü".encode() * 100,
        "spaces in/the name .csv": b"x,y\n",
        "empty": b"",
    }
    for key, data in files.items():
        spool.drop("p1", bucket, key, data)
    spool.wait_done("p1", bucket, list(files))
    for key, data in files.items():
        assert object_bytes(client, bucket, key) == data


def test_file_written_in_place_is_uploaded_whole(spool: Spool, bucket: str, client: Any) -> None:
    """A file written straight into incoming/ with pauses is uploaded once closed, whole."""
    spool.start(env=None)
    target = spool.path("incoming", "p1", bucket, "inplace.log")
    target.parent.mkdir(parents=True, exist_ok=True)
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the drain")
    with open(target, "wb") as handle:
        for i in range(4):
            handle.write(f"line {i}\n".encode() * 1000)
            handle.flush()
            time.sleep(0.3)  # the producer's pauses between writes are the behaviour under test
    spool.wait_done("p1", bucket, ["inplace.log"])
    assert object_bytes(client, bucket, "inplace.log") == b"".join(
        f"line {i}\n".encode() * 1000 for i in range(4)
    )


def test_mkdir_p_then_immediate_write(spool: Spool, bucket: str, client: Any) -> None:
    """A file written into directories created a moment before is found."""
    spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the drain")
    for i in range(5):
        d = spool.dir / "incoming" / "p1" / bucket / f"new{i}" / "x" / "y"
        d.mkdir(parents=True)
        (d / "f.txt").write_bytes(f"fresh {i}".encode())
    keys = [f"new{i}/x/y/f.txt" for i in range(5)]
    spool.wait_done("p1", bucket, keys)
    assert object_bytes(client, bucket, "new3/x/y/f.txt") == b"fresh 3"


def test_directory_renamed_into_incoming(spool: Spool, bucket: str, client: Any) -> None:
    """A whole directory tree renamed into incoming/ is walked and uploaded."""
    spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the drain")
    staged = spool.dir / "incoming_tmp" / "p1" / bucket / "batch"
    (staged / "sub").mkdir(parents=True)
    for i in range(10):
        (staged / "sub" / f"{i}.dat").write_bytes(bytes([i]) * 100)
    (spool.dir / "incoming" / "p1" / bucket).mkdir(parents=True, exist_ok=True)
    os.rename(staged, spool.dir / "incoming" / "p1" / bucket / "batch")
    keys = [f"batch/sub/{i}.dat" for i in range(10)]
    spool.wait_done("p1", bucket, keys)
    assert object_bytes(client, bucket, "batch/sub/7.dat") == bytes([7]) * 100


def test_large_file_goes_up_in_parts(spool: Spool, bucket: str, client: Any) -> None:
    """A file above the multipart threshold is uploaded in parts with identical bytes."""
    data = os.urandom(13 * 1024 * 1024)
    spool.start("--multipart-threshold", "5")
    spool.drop("p1", bucket, "big.bin", data)
    spool.wait_done("p1", bucket, ["big.bin"], timeout=120)
    head = client.head_object(Bucket=bucket, Key="big.bin")
    assert "-" in head["ETag"]  # a multipart ETag: md5-of-parts, then the part count
    assert (
        hashlib.sha256(object_bytes(client, bucket, "big.bin")).digest()
        == hashlib.sha256(data).digest()
    )


def test_small_and_larger_files_mixed_in_one_batch(spool: Spool, bucket: str, client: Any) -> None:
    """Files queued together are taken in batches; larger ones among them (uploaded one at a
    time, in the middle of a batch), middling ones (batched, but two overflow the bytes in
    flight, so earlier answers are read before later PUTs start) and the small ones around
    them all land with their own bytes and ETags. Queued before start, so the drain hands
    them over together."""
    sizes = (100, BATCH_MAX_BYTES + 1000, WINDOW_BYTES * 6 // 10)
    files = {f"mix/{i:02d}": os.urandom(sizes[i % 3] + i) for i in range(24)}
    for key, data in files.items():
        spool.drop("p1", bucket, key, data)
    spool.start(workers=1)
    spool.wait_done("p1", bucket, list(files), timeout=120)
    for key, data in files.items():
        assert object_bytes(client, bucket, key) == data
    assert {r["filepath"]: r["etag"] for r in spool.records()} == {
        k: hashlib.md5(d).hexdigest() for k, d in files.items()
    }
    # Each on its first try: an answer read for the wrong PUT would show as a retry here.
    assert not spool.events("upload_failed") and not spool.events("upload_retry_scheduled")
    assert not spool.query("SELECT * FROM retry_attempts")


@pytest.mark.parametrize("options", [(), ("--verify", "head"), ("--boto3-put",)])
def test_each_upload_path_stores_the_right_bytes(
    spool: Spool, bucket: str, client: Any, options: tuple[str, ...]
) -> None:
    """The lean PUT, HEAD verification and boto3's put_object each store identical bytes."""
    files = {f"path/{i}.bin": os.urandom(i * 1000) for i in range(5)}
    spool.start(*options)
    for key, data in files.items():
        spool.drop("p1", bucket, key, data)
    spool.wait_done("p1", bucket, list(files))
    for key, data in files.items():
        assert object_bytes(client, bucket, key) == data
    etags = {r["filepath"]: r["etag"] for r in spool.records()}
    assert etags == {k: hashlib.md5(d).hexdigest() for k, d in files.items()}


def test_two_profiles_two_buckets_are_routed(tmp_path: Path, s3: Any) -> None:
    """Each file goes to its own profile's server under its own bucket."""
    b1, b2, b3 = new_bucket(s3), new_bucket(s3), new_bucket(s3)
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1"), "p2": s3.credentials_ini("p2")})
    try:
        sp.start()
        sp.drop("p1", b1, "one", b"1")
        sp.drop("p1", b2, "two", b"2")
        sp.drop("p2", b3, "three", b"3")
        sp.wait_done("p1", b1, ["one"])
        sp.wait_done("p1", b2, ["two"])
        sp.wait_done("p2", b3, ["three"])
        client = s3.client()
        assert (object_keys(client, b1), object_keys(client, b2), object_keys(client, b3)) == (
            ["one"],
            ["two"],
            ["three"],
        )
        profiles = {(r["profile"], r["bucket"]) for r in sp.records()}
        assert profiles == {("p1", b1), ("p1", b2), ("p2", b3)}
    finally:
        sp.close()


def test_missing_bucket_holds_its_files_while_others_flow(
    spool: Spool, bucket: str, s3: Any, client: Any
) -> None:
    """Files of a missing bucket stay in incoming/ (one error) until the bucket exists."""
    missing = f"gone-{bucket}"
    spool.drop("p1", missing, "waits.txt", b"wait for me")
    spool.start("--recheck-interval", "0.5")
    spool.drop("p1", bucket, "flows.txt", b"flow")
    spool.drop("p1", missing, "waits-too.txt", b"me too")
    spool.wait_done("p1", bucket, ["flows.txt"])
    wait_for(lambda: spool.events("bucket_paused"), 10, "bucket_paused")
    time.sleep(1.0)  # give a wrong implementation time to move the held files
    assert spool.where("p1", missing, "waits.txt") == ["incoming"]
    assert spool.where("p1", missing, "waits-too.txt") == ["incoming"]
    assert len(spool.events("bucket_paused")) == 1
    s3.create_bucket(missing)
    spool.wait_done("p1", missing, ["waits.txt", "waits-too.txt"])
    assert object_bytes(client, missing, "waits.txt") == b"wait for me"


def test_same_path_twice_is_uploaded_twice_in_order(spool: Spool, bucket: str, client: Any) -> None:
    """The same key queued twice gives two passages, in order, the newest bytes last."""
    spool.start()
    spool.drop("p1", bucket, "report.csv", b"first")
    spool.wait_done("p1", bucket, ["report.csv"])
    spool.drop("p1", bucket, "report.csv", b"second")
    wait_for(
        lambda: spool.path("completed", "p1", bucket, "report.csv.~1~").exists(),
        30,
        "the first copy kept as report.csv.~1~",
    )
    spool.wait_done("p1", bucket, ["report.csv"])
    assert object_bytes(client, bucket, "report.csv") == b"second"
    assert spool.path("completed", "p1", bucket, "report.csv").read_bytes() == b"second"
    assert spool.path("completed", "p1", bucket, "report.csv.~1~").read_bytes() == b"first"
    rows = spool.records("report.csv")
    assert [(r["current_state"], r["upload_outcome"]) for r in rows] == [
        ("completed", "success")
    ] * 2
    assert rows[0]["id"] < rows[1]["id"]


def test_records_follow_each_passage(spool: Spool, bucket: str) -> None:
    """A completed passage's record holds profile, bucket, key, size, ETag and UTC times."""
    spool.start()
    spool.drop("p1", bucket, "r/one.txt", b"12345")
    spool.wait_done("p1", bucket, ["r/one.txt"])
    [row] = spool.records("r/one.txt")
    assert (
        row["profile"],
        row["bucket"],
        row["current_state"],
        row["upload_outcome"],
        row["size"],
    ) == ("p1", bucket, "completed", "success", 5)
    assert row["etag"] == hashlib.md5(b"12345").hexdigest()
    assert row["file_creation_date"] and row["last_updated"] >= row["file_creation_date"][:19]
    claimed = [e for e in spool.events("file_claimed") if e["flood"]["key"] == "r/one.txt"]
    assert claimed and claimed[0]["flood"]["record_id"] == row["id"]


def test_every_log_line_is_ecs_json(spool: Spool, bucket: str) -> None:
    """Every line written by every process parses as JSON with the ECS fields."""
    sup = spool.start()
    spool.drop("p1", bucket, 'line\nbreak "quoted" \x1b[31m.txt', b"x")
    spool.drop("p1", bucket, "ok.txt", b"y")
    spool.wait_done("p1", bucket, ["ok.txt"])
    assert sup.terminate() == 0
    lines = spool.log_lines()
    roles = {line["flood"]["role"] for line in lines}
    assert roles == {"supervisor", "watcher", "uploader"}
    for line in lines:
        assert {"@timestamp", "log.level", "message", "ecs.version"} <= set(line)
        assert line["@timestamp"].endswith("Z")
        assert isinstance(line["process"]["pid"], int)
        assert line["event"]["action"]
    assert len(spool.log.read_text().splitlines()) == len(lines)


def test_sigterm_exits_zero_leaving_no_child(spool: Spool, bucket: str) -> None:
    """SIGTERM stops the supervisor with status 0 and no child process left."""
    sup = spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the drain")
    children = _session_pids(sup.pid)
    assert len(children) >= 3
    started = time.monotonic()
    assert sup.terminate() == 0
    assert time.monotonic() - started < 30
    wait_for(lambda: not _session_pids(sup.pid), 10, "no process left in the session")


def test_kill9_then_restart_uploads_everything(spool: Spool, bucket: str, client: Any) -> None:
    """After kill -9 of the supervisor its children die, a new one starts at once and
    every file ends uploaded."""
    keys = [f"k9/{i:04d}" for i in range(300)]
    for key in keys[:150]:
        spool.drop("p1", bucket, key, key.encode())
    sup = spool.start()
    wait_for(lambda: len(spool.files("completed")) >= 20, 60, "some uploads")
    sup.kill9()
    wait_for(lambda: not _session_pids(sup.pid), 10, "the children dying with the supervisor")
    for key in keys[150:]:
        spool.drop("p1", bucket, key, key.encode())
    spool.start()
    spool.wait_done("p1", bucket, keys, timeout=120)
    assert object_keys(client, bucket) == sorted(keys)
    assert spool.files("processing") == [] and spool.files("incoming") == []


def test_second_supervisor_is_refused_naming_the_lock(spool: Spool, bucket: str) -> None:
    """A second supervisor on the same server dir exits non-zero naming the lock."""
    spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the drain")
    second = spool.run("flood-supervisor", "--credentials", str(spool.credentials), str(spool.dir))
    assert second.returncode == 75
    assert ".flood.lock" in second.stderr and len(second.stderr.strip().splitlines()) == 1


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "-g", str(sid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.parametrize(
    ("ini", "expected"),
    [
        ("", "has no profiles"),
        (
            "[p]\naws_access_key_id = A\naws_secret_access_key = S3CRET-VALUE\naws_region = r\n",
            "profile 'p' has no 'provider' key",
        ),
        (
            "[p]\nprovider = dropbox\naws_access_key_id = A\naws_secret_access_key = S3CRET-VALUE\n"
            "aws_region = r\n",
            "unknown provider 'dropbox' (known: amazon, backblaze, cloudflare)",
        ),
        (
            "[p]\nprovider = cloudflare\nAWS_SECRET_ACCESS_KEY = S3CRET-VALUE\n",
            "profile 'p' (cloudflare) is missing aws_access_key_id, aws_region, aws_endpoint",
        ),
        ("just a S3CRET-VALUE line\n", "comes before any [profile] header"),
    ],
)
def test_credentials_errors_exit_78_and_touch_nothing(
    spool: Spool, ini: str, expected: str
) -> None:
    """Each credentials problem: exit 78, one line naming it, no secret, the dir untouched."""
    spool.credentials.write_text(ini)
    before = sorted(os.listdir(spool.dir))
    result = spool.run("flood-supervisor", "--credentials", str(spool.credentials), str(spool.dir))
    assert result.returncode == 78
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "S3CRET-VALUE" not in result.stderr + result.stdout
    assert sorted(os.listdir(spool.dir)) == before


def test_no_credentials_file_found(spool: Spool) -> None:
    """Without any credentials file the supervisor names every place it looked, exit 78."""
    result = spool.run(
        "flood-supervisor", "--credentials", str(spool.root / "nope"), str(spool.dir)
    )
    assert result.returncode == 78
    assert "no credentials file found" in result.stderr
    assert "~/.aws/credentials" in result.stderr and "--credentials" in result.stderr


def test_aws_search_order_wins_over_the_option(spool: Spool, bucket: str) -> None:
    """$AWS_SHARED_CREDENTIALS_FILE is used before --credentials, and the log says why."""
    env = spool.env(AWS_SHARED_CREDENTIALS_FILE=str(spool.credentials))
    spool.start(env=env)
    wait_for(lambda: spool.events("credentials_loaded"), 30, "credentials_loaded")
    [line] = spool.events("credentials_loaded")
    assert line["event"]["reason"] == "first that exists: $AWS_SHARED_CREDENTIALS_FILE"


def test_bad_option_is_one_line_and_exit_2(spool: Spool) -> None:
    """A malformed option value gets one line on stderr and exit status 2."""
    result = spool.run("flood-supervisor", "--workers", "zero", str(spool.dir))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--workers" in result.stderr


def test_missing_server_dir_is_refused(spool: Spool) -> None:
    """A server directory that does not exist: one line, exit 78."""
    result = spool.run(
        "flood-supervisor", "--credentials", str(spool.credentials), str(spool.root / "absent")
    )
    assert result.returncode == 78 and "does not exist" in result.stderr


def test_sigint_is_a_graceful_stop_too(spool: Spool, bucket: str) -> None:
    """SIGINT to the supervisor's PID stops it with status 0."""
    sup = spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the drain")
    os.kill(sup.pid, signal.SIGINT)
    assert sup.proc.wait(40) == 0


def test_child_failing_at_boot_stops_the_supervisor(spool: Spool, bucket: str) -> None:
    """A child that dies before it is ready stops the supervisor (exit 70), no restart loop."""
    sup = spool.start(env=spool.env(FLOOD_CRASH_AT="before_ready"))
    assert sup.proc.wait(60) == 70
    assert len(spool.events("child_boot_failed")) == 1
    assert "failed at start" in sup.stderr()
    assert spool.events("children_started") and not spool.events("child_died")
    wait_for(lambda: not _session_pids(sup.pid), 10, "no process left in the session")


def test_unknown_profile_directory_is_left_alone(spool: Spool, bucket: str) -> None:
    """Files under a profile the credentials file lacks stay put; one log line says so."""
    spool.drop("stranger", bucket, "theirs.txt", b"t")
    spool.start()
    spool.drop("stranger", bucket, "more.txt", b"m")
    spool.drop("p1", bucket, "ours.txt", b"o")
    spool.wait_done("p1", bucket, ["ours.txt"])
    assert spool.where("stranger", bucket, "theirs.txt") == ["incoming"]
    assert spool.where("stranger", bucket, "more.txt") == ["incoming"]
    unknown = [
        e
        for e in spool.events("profile_unknown")
        if e["flood"].get("profile") == "stranger" or "stranger" in str(e)
    ]
    assert 1 <= len(unknown) <= 2  # once at start-up, once from the watcher
