"""flood-copy end to end: the console script against a real server dir, local S3 and supervisor."""

from __future__ import annotations

import ctypes
import errno
import os
import pty
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from spool import BIN, Spool, object_bytes, wait_for

pytestmark = pytest.mark.timeout(120)

BIG = 256 * 1024 * 1024  # sparse: big enough to catch the copy half-way, cheap to make


# -- helpers ---------------------------------------------------------------------------------
def copy(spool: Spool, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return spool.run(
        "flood-copy",
        "--server-dir",
        str(spool.dir),
        "--credentials",
        str(spool.credentials),
        *args,
        **kwargs,
    )


def started(spool: Spool) -> None:
    """Start the supervisor and wait until its start-up (which wipes incoming_tmp) is over."""
    spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")


def tree(top: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return top


def other_filesystem(near: Path) -> Path | None:
    """A fresh directory on another filesystem than `near` (tmpfs), or None."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(near).st_dev:
        return None
    return Path(tempfile.mkdtemp(dir="/dev/shm", prefix="flood-copy-test-"))


def drop_dac_override() -> None:
    """In the child before exec: even root then obeys file permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def popen_copy(spool: Spool, *args: str) -> subprocess.Popen[str]:
    """flood-copy in the background, with SIGINT at its default whatever pytest inherited:
    a shell that starts pytest with `&` leaves SIGINT ignored, and that survives exec."""
    return subprocess.Popen(
        [
            str(BIN / "flood-copy"),
            "--server-dir",
            str(spool.dir),
            "--credentials",
            str(spool.credentials),
            *args,
        ],
        env=spool.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def mid_copy(spool: Spool, bucket: str, key: str) -> int:
    """Wait until `key` is half-copied in incoming_tmp with its record there; the record id."""
    tmp = spool.path("incoming_tmp", "p1", bucket, key)
    rows = wait_for(
        lambda: (
            tmp.exists()
            and tmp.stat().st_size > 0
            and spool.query(
                "SELECT id FROM file_records WHERE filepath = ? AND current_state = 'incoming_tmp'",
                key,
            )
        ),
        30,
        f"{key} half-copied",
    )
    return int(rows[0]["id"])


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def big_tree(tmp_path: Path) -> Iterator[Path]:
    """a.txt, b.big (sparse, BIG bytes), c.txt: copied in that order."""
    top = tree(tmp_path / "src", {"a.txt": b"first", "c.txt": b"third"})
    with open(top / "b.big", "wb") as handle:
        handle.truncate(BIG)
    yield top
    shutil.rmtree(top, ignore_errors=True)


# -- keys, as aws s3 cp makes them -------------------------------------------------------------
def test_file_keys_follow_aws_s3_cp(spool: Spool, bucket: str, client: Any, tmp_path: Path) -> None:
    """s3://p/b/ and s3://p/b name a file by its name, a full key names it, several go below."""
    started(spool)
    src = tree(
        tmp_path / "src", {"a.txt": b"alpha", "b.txt": b"beta", "m/1": b"one", "m/2": b"two"}
    )
    elsewhere = other_filesystem(tmp_path)
    far = tree(elsewhere or tmp_path / "far", {"c.txt": b"from another filesystem"})
    try:
        runs = [
            copy(spool, str(src / "a.txt"), f"s3://p1/{bucket}/"),
            copy(spool, str(src / "b.txt"), f"s3://p1/{bucket}"),
            copy(spool, str(far / "c.txt"), f"s3://p1/{bucket}/x/y.txt"),
            copy(spool, str(src / "m/1"), str(src / "m/2"), f"s3://p1/{bucket}/multi/"),
        ]
    finally:
        shutil.rmtree(far)
    assert [r.returncode for r in runs] == [0, 0, 0, 0], [r.stderr for r in runs]
    expected = {
        "a.txt": b"alpha",
        "b.txt": b"beta",
        "x/y.txt": b"from another filesystem",
        "multi/1": b"one",
        "multi/2": b"two",
    }
    spool.wait_done("p1", bucket, list(expected))
    for key, data in expected.items():
        assert object_bytes(client, bucket, key) == data
        assert [r["current_state"] for r in spool.records(key)] == ["completed"]


def test_recursive_nested_unicode_tree_goes_below_the_prefix(
    spool: Spool, bucket: str, client: Any, tmp_path: Path
) -> None:
    """-r DIR s3://p/b/pre/ (or .../pre) keys every file below DIR as pre/<relative path>."""
    started(spool)
    files = {
        "top.txt": b"top",
        "üñí cödé/ファイル name.txt": "ü".encode() * 50,
        "a/b/c/d/deep.bin": os.urandom(3000),
        "a/empty": b"",
    }
    src = tree(tmp_path / "src", files)
    with_slash = copy(spool, "-r", str(src), f"s3://p1/{bucket}/one/")
    without = copy(spool, "--recursive", str(src), f"s3://p1/{bucket}/two")
    assert (with_slash.returncode, without.returncode) == (0, 0), with_slash.stderr + without.stderr
    assert with_slash.stdout == f"queued 4 files (3.0 KiB) to s3://p1/{bucket}/one/\n"
    keys = {f"{prefix}/{rel}": data for prefix in ("one", "two") for rel, data in files.items()}
    spool.wait_done("p1", bucket, list(keys))
    for key, data in keys.items():
        assert object_bytes(client, bucket, key) == data


def test_links_out_of_the_tree_and_special_files_are_skipped_with_a_message(
    spool: Spool, tmp_path: Path
) -> None:
    """A link leading out of the tree and a FIFO are skipped and named; a link inside is copied."""
    outside = tree(tmp_path / "outside", {"secret": b"not for upload"})
    src = tree(tmp_path / "src", {"real.txt": b"real"})
    (src / "out").symlink_to(outside / "secret")
    (src / "in").symlink_to("real.txt")
    os.mkfifo(src / "pipe")
    result = copy(spool, "-r", str(src), "s3://p1/bucket-one/")
    assert result.returncode == 0, result.stderr
    assert f"skipped symlink {src}/out -> {outside}/secret: it leads out of {src}" in result.stderr
    assert f"skipped {src}/pipe: fifo, not a regular file" in result.stderr
    assert spool.files("incoming") == ["p1/bucket-one/in", "p1/bucket-one/real.txt"]
    assert spool.path("incoming", "p1", "bucket-one", "in").read_bytes() == b"real"


def test_newer_copy_of_a_waiting_key_supersedes_it(spool: Spool, tmp_path: Path) -> None:
    """A second copy to a key still waiting in incoming/ replaces it and closes its record."""
    src = tree(tmp_path / "src", {"v1/k": b"version 1", "v2/k": b"version 2"})
    for version in ("v1", "v2"):
        assert copy(spool, str(src / version / "k"), "s3://p1/bucket-one/").returncode == 0
    assert spool.path("incoming", "p1", "bucket-one", "k").read_bytes() == b"version 2"
    states = [(r["current_state"], r["reason"]) for r in spool.records("k")]
    assert states == [("abandoned", "superseded"), ("incoming", None)]


# -- refusals ----------------------------------------------------------------------------------
REFUSALS = [
    (["-r"], "{src}/missing", "s3://p1/bucket-one/", 2, "{src}/missing: no such file or directory"),
    (
        [],
        "{src}",
        "s3://p1/bucket-one/",
        2,
        "{src} is a directory (use -r to copy the files below it)",
    ),
    ([], "{src}/f", "s3://nobody/bucket-one/", 2, "unknown profile 'nobody'"),
    ([], "{src}/f", "http://p1/bucket-one/", 2, "is not s3://PROFILE/BUCKET/[KEY]"),
    ([], "{src}/f", "s3://p1", 2, "names no bucket"),
    ([], "{src}/f", "s3://p1//k", 2, "names no bucket"),
    ([], "{src}/f", "s3://p1/bucket-one/a/../b", 2, "has an empty, '.' or '..' segment"),
    ([], "{src}/f", "s3://p1/bucket-one/a/./b", 2, "has an empty, '.' or '..' segment"),
    ([], "{src}/f", "s3://p1/bucket-one/a//b", 2, "has an empty, '.' or '..' segment"),
    ([], "{src}/f", "s3://p1/bucket-one/" + "é" * 513, 2, "key is 1026 bytes in UTF-8, over 1024"),
    ([], "{src}/f", "s3://p1/Bucket_One/", 2, "invalid bucket name 'Bucket_One'"),
    ([], "{src}/f", "s3://p1/ab/", 2, "invalid bucket name 'ab'"),
    ([], "{src}/f", "s3://p1/" + "b" * 64 + "/", 2, "S3 wants 3-63 characters"),
    (
        ["{src}/f"],
        "{src}/f",
        "s3://p1/bucket-one/k",
        2,
        "several sources need a destination ending in '/'",
    ),
]


@pytest.mark.parametrize(("extra", "source", "uri", "code", "message"), REFUSALS)
def test_bad_input_is_refused_in_one_line_queueing_nothing(
    spool: Spool, tmp_path: Path, extra: list[str], source: str, uri: str, code: int, message: str
) -> None:
    """A missing source, a directory without -r, an unknown profile, a bad URI or bucket."""
    src = tree(tmp_path / "src", {"f": b"data"})
    args = [a.format(src=src) for a in [*extra, source]]
    result = copy(spool, *args, uri)
    assert result.returncode == code
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("flood-copy: ")
    assert message.format(src=src) in result.stderr
    assert spool.files("incoming") == [] and result.stdout == ""


@pytest.mark.parametrize("origin", ["option", "environment", "default"])
def test_missing_server_dir_is_refused_naming_path_and_origin(
    spool: Spool, tmp_path: Path, origin: str
) -> None:
    """A server dir that does not exist is named with where it came from; exit 78."""
    missing = tmp_path / "no-such-dir"
    src = tree(tmp_path / "src", {"f": b"data"})
    args = ["--credentials", str(spool.credentials), str(src / "f"), "s3://p1/bucket-one/"]
    env = spool.env(FLOOD_SERVER_DIR=str(missing)) if origin == "environment" else None
    if origin == "option":
        args = ["--server-dir", str(missing), *args]
    if origin == "default" and os.path.exists("/srv/flood"):
        pytest.skip("/srv/flood exists on this machine")
    result = spool.run("flood-copy", *args, env=env)
    shown = {
        "option": f"{missing} (from --server-dir)",
        "environment": f"{missing} (from $FLOOD_SERVER_DIR)",
        "default": "/srv/flood (the default; set --server-dir or $FLOOD_SERVER_DIR)",
    }[origin]
    assert result.returncode == 78
    assert (
        result.stderr == f"flood-copy: server directory {shown} does not exist or is not a "
        "directory\n"
    )


def test_unprepared_server_dir_is_fine(spool: Spool, tmp_path: Path) -> None:
    """An existing server dir the supervisor has not prepared yet gets what it lacks."""
    src = tree(tmp_path / "src", {"f": b"data"})
    assert not (spool.dir / "incoming").exists()
    result = copy(spool, str(src / "f"), "s3://p1/bucket-one/")
    assert result.returncode == 0, result.stderr
    assert spool.files("incoming") == ["p1/bucket-one/f"]


def test_incoming_tmp_on_another_filesystem_is_refused(spool: Spool, tmp_path: Path) -> None:
    """incoming_tmp and incoming on different filesystems: refused before any copy, exit 78."""
    elsewhere = other_filesystem(tmp_path)
    if elsewhere is None:
        pytest.skip("no second filesystem (tmpfs /dev/shm) here")
    try:
        (spool.dir / "incoming_tmp").symlink_to(elsewhere)
        src = tree(tmp_path / "src", {"f": b"data"})
        result = copy(spool, str(src / "f"), "s3://p1/bucket-one/")
        assert result.returncode == 78
        assert "are on different filesystems" in result.stderr
        assert result.stderr.count("\n") == 1
        assert spool.files("incoming") == [] and os.listdir(elsewhere) == []
    finally:
        shutil.rmtree(elsewhere)


def test_credentials_error_exits_78(spool: Spool, tmp_path: Path) -> None:
    """No credentials file anywhere: the search is named, exit 78, nothing queued."""
    src = tree(tmp_path / "src", {"f": b"data"})
    result = spool.run(
        "flood-copy",
        "--server-dir",
        str(spool.dir),
        "--credentials",
        str(tmp_path / "absent"),
        str(src / "f"),
        "s3://p1/bucket-one/",
    )
    assert result.returncode == 78
    assert result.stderr.startswith("flood-copy: no credentials file found; looked at")
    assert spool.files("incoming") == []


# -- failures half-way -------------------------------------------------------------------------
def test_unreadable_file_among_many_queues_the_rest(
    spool: Spool, bucket: str, client: Any, tmp_path: Path
) -> None:
    """One unreadable file: the others are queued and uploaded, it is listed, exit 1."""
    files = {f"f{i}.txt": f"file {i}".encode() for i in range(5)}
    src = tree(tmp_path / "src", files)
    (src / "f2.txt").chmod(0)
    started(spool)
    as_root = {"preexec_fn": drop_dac_override} if os.geteuid() == 0 else {}
    result = copy(spool, "-r", str(src), f"s3://p1/{bucket}/", **as_root)
    assert result.returncode == 1
    assert f"flood-copy: not queued: {src}/f2.txt: cannot read: Permission denied" in result.stderr
    assert result.stdout == f"queued 4 of 5 files (24 B) to s3://p1/{bucket}/\n"
    done = [k for k in files if k != "f2.txt"]
    spool.wait_done("p1", bucket, done)
    for key in done:
        assert object_bytes(client, bucket, key) == files[key]
    assert spool.records("f2.txt") == []


def test_ctrl_c_leaves_no_partial_file_and_says_what_was_queued(
    spool: Spool, big_tree: Path
) -> None:
    """SIGINT half-way: no partial file in incoming/, the record abandoned, exit 130."""
    proc = popen_copy(spool, "-r", str(big_tree), "s3://p1/bucket-one/")
    try:
        record_id = mid_copy(spool, "bucket-one", "b.big")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert (proc.returncode, out) == (130, ""), err
    assert err.endswith(
        "flood-copy: interrupted: queued 1 of 3 files; not queued: "
        f"{big_tree}/b.big, {big_tree}/c.txt\n"
    )
    assert spool.files("incoming") == ["p1/bucket-one/a.txt"]
    assert spool.files("incoming_tmp") == []
    [row] = spool.records("b.big")
    assert (row["id"], row["current_state"], row["reason"]) == (
        record_id,
        "abandoned",
        "interrupted",
    )


def test_wiped_incoming_tmp_loses_one_file_and_records_follow_each_state(
    spool: Spool, bucket: str, client: Any, big_tree: Path
) -> None:
    """incoming_tmp wiped under a copy: that file is reported and abandoned, the rest go up,
    each record passes incoming_tmp -> incoming and the supervisor continues it."""
    proc = popen_copy(spool, "-r", str(big_tree), f"s3://p1/{bucket}/")
    try:
        mid_copy(spool, bucket, "b.big")
        assert [r["current_state"] for r in spool.records("a.txt")] == ["incoming"]
        shutil.rmtree(spool.dir / "incoming_tmp" / "p1")  # what the supervisor's start does
        (spool.dir / "incoming_tmp" / "p1").mkdir()
        out, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 1
    assert f"not queued: {big_tree}/b.big: incoming_tmp was wiped under the copy" in err
    assert out == f"queued 2 of 3 files (10 B) to s3://p1/{bucket}/\n"
    assert [(r["current_state"], r["reason"]) for r in spool.records("b.big")] == [
        ("abandoned", "wiped")
    ]
    queued = {k: spool.records(k)[0]["id"] for k in ("a.txt", "c.txt")}
    started(spool)
    spool.wait_done("p1", bucket, list(queued))
    assert object_bytes(client, bucket, "c.txt") == b"third"
    for key, record_id in queued.items():
        assert [(r["id"], r["current_state"]) for r in spool.records(key)] == [
            (record_id, "completed")
        ]


# -- --wait ------------------------------------------------------------------------------------
@pytest.fixture
def two_profiles(tmp_path: Path, s3: Any) -> Iterator[Spool]:
    """A spool with p1 (may write) and ro (the server's read-only identity)."""
    assert s3.readonly is not None
    sp = Spool(
        tmp_path, s3, {"p1": s3.credentials_ini("p1"), "ro": s3.credentials_ini("ro", s3.readonly)}
    )
    yield sp
    sp.close()


def test_wait_reports_completed_and_failed_files(
    two_profiles: Spool, bucket: str, client: Any, tmp_path: Path
) -> None:
    """--wait sums up the outcome (each file's with -v): exit 0 when all completed, 1 when one
    failed, which the summary names with its reason."""
    spool = two_profiles
    src = tree(tmp_path / "src", {"good.txt": b"good", "bad.txt": b"bad"})
    started(spool)
    good = copy(
        spool, "-v", "--wait", "--timeout", "60", str(src / "good.txt"), f"s3://p1/{bucket}/"
    )
    assert good.returncode == 0, good.stderr
    lines = good.stdout.splitlines()
    assert lines[1] == f"completed s3://p1/{bucket}/good.txt"
    assert re.fullmatch(rf"uploaded 1 of 1 file to s3://p1/{bucket}/ in \d+\.\d s", lines[2])
    assert object_bytes(client, bucket, "good.txt") == b"good"
    bad = copy(spool, "--wait", "--timeout", "60", str(src / "bad.txt"), f"s3://ro/{bucket}/")
    assert bad.returncode == 1, bad.stderr
    assert len(bad.stdout.splitlines()) == 2  # queued, then the summary: no per-file line
    assert bad.stdout.splitlines()[-1].endswith(
        f"; 1 failed: s3://ro/{bucket}/bad.txt (AccessDenied)"
    )
    assert spool.where("ro", bucket, "bad.txt") == ["failed"]


def test_wait_timeout_exits_124(spool: Spool, tmp_path: Path) -> None:
    """--wait --timeout with no supervisor running warns of it, gives up, names what is
    pending, exit 124."""
    src = tree(tmp_path / "src", {"f": b"data"})
    result = copy(spool, "--wait", "--timeout", "0.5", str(src / "f"), "s3://p1/bucket-one/")
    assert result.returncode == 124
    assert result.stderr == (
        f"flood-copy: warning: no flood-supervisor holds the lock of {spool.dir}: the files "
        "wait in incoming/ until one starts\n"
        "flood-copy: timed out after 0.5 s; 1 file not finished (still "
        "queued): s3://p1/bucket-one/f\n"
    )
    assert result.stdout.splitlines()[-1].endswith("; 1 not finished")
    assert spool.files("incoming") == ["p1/bucket-one/f"]


# -- progress ------------------------------------------------------------------------------------
def run_on_pty(spool: Spool, *args: str) -> tuple[int, str, str]:
    """Run flood-copy with stderr on a pseudo-terminal: exit status, stdout, terminal output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            str(BIN / "flood-copy"),
            "--server-dir",
            str(spool.dir),
            "--credentials",
            str(spool.credentials),
            *args,
        ],
        env=spool.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError as exc:  # EIO: every end of the terminal's other side is closed
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
        out = proc.communicate(timeout=30)[0]
    finally:
        os.close(master)
        stop(proc)
    return proc.returncode, out.decode(), b"".join(chunks).decode()


def test_progress_bar_on_a_terminal_plain_output_in_a_pipe(spool: Spool, tmp_path: Path) -> None:
    """A terminal gets a redrawn bar of files, bytes, rate and time left; a pipe and -q do not."""
    src = tree(tmp_path / "src", {f"f{i}": b"x" * 1000 for i in range(3)})
    code, out, terminal = run_on_pty(spool, "-r", str(src), "s3://p1/bucket-one/tty/")
    assert code == 0
    assert "\r[####################] 3/3 files  2.9 KiB/2.9 KiB  " in terminal
    assert "/s  0:00 left" in terminal and terminal.endswith("\n")
    assert out == "queued 3 files (2.9 KiB) to s3://p1/bucket-one/tty/\n"
    piped = copy(spool, "-r", str(src), "s3://p1/bucket-one/pipe/")
    assert (piped.returncode, piped.stderr) == (0, "")
    assert piped.stdout == "queued 3 files (2.9 KiB) to s3://p1/bucket-one/pipe/\n"
    code, out, terminal = run_on_pty(spool, "-q", "-r", str(src), "s3://p1/bucket-one/quiet/")
    assert (code, out, terminal) == (0, "", "")
    assert len(spool.files("incoming")) == 9
