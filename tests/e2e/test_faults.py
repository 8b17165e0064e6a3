"""Faults around the spool (full disk, locked db, odd names, changing files, floods of files):
each has a defined, logged outcome and loses nothing."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from invariant import Ref, check, drained, events, stored, wait_drained
from spool import Spool, Supervisor, object_bytes, wait_for

from flood.records import BUSY_TIMEOUT_MS

pytestmark = pytest.mark.timeout(300)
QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")
# Files landed at once while the watcher cannot read: above the (lowered) inotify queue, so
# the kernel drops events and the watcher must rescan. 50,000 files take far longer than a
# CI run should on 2 cores (see the report), so the queue is lowered instead.
BURST_FILES = 3000
BURST_QUEUE = 1024


def started(spool: Spool, sup: Supervisor) -> None:
    wait_for(
        lambda: [
            e for e in events(spool, "startup_drain_queued") if e["process"]["pid"] == sup.pid
        ],
        60,
        "the start-up drain",
    )


def assert_invariant(spool: Spool, client: Any, expected: dict[Ref, bytes]) -> None:
    report = check(spool, client, expected)
    assert report.ok, report.summary()


def logged(spool: Spool, action: str, key: str) -> list[dict[str, Any]]:
    return [e for e in events(spool, action) if e.get("flood", {}).get("key") == key]


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A small tmpfs mounted on `where` (skips the test where mounting is not permitted)."""
    where.mkdir(exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_inodes(top: Path) -> list[Path]:
    """Use up a filesystem's inodes with empty files; the files made."""
    top.mkdir(exist_ok=True)
    made: list[Path] = []
    while True:
        path = top / f"f{len(made)}"
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return made
        made.append(path)


def fill_blocks(path: Path) -> None:
    """Use up a filesystem's blocks with one file."""
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def test_disk_full_when_moving_to_completed(spool: Spool, client: Any, bucket: str) -> None:
    """With no room for completed/'s new directory the file stays in processing/, the error is
    logged, and it lands in completed/ once there is room again."""
    with tmpfs(spool.dir, "size=16m,nr_inodes=400"):
        for state in ("incoming", "processing"):
            spool.path(state, "p1", bucket, "deep/x").parent.mkdir(parents=True)
        sup = spool.start()
        started(spool, sup)
        spool.path("incoming_tmp", "p1", bucket, "deep/x").parent.mkdir(parents=True)
        ref = ("p1", bucket, "deep/full.bin")
        expected = {ref: os.urandom(20_000)}
        staged = spool.path("incoming_tmp", *ref)
        staged.write_bytes(expected[ref])
        filler = fill_inodes(spool.dir / "filler")
        os.rename(staged, spool.path("incoming", *ref))
        wait_for(lambda: logged(spool, "move_failed", ref[2]), 60, "the failed move")
        assert spool.where(*ref) == ["processing"]
        assert "No space left" in str(logged(spool, "move_failed", ref[2])[0])
        assert [r["current_state"] for r in spool.records(ref[2])] == ["processing"]
        for path in filler:
            path.unlink()
        wait_drained(spool, expected, 60)
        assert_invariant(spool, client, expected)
        # The same passage went on once there was room: one record, not one per attempt.
        assert [r["current_state"] for r in spool.records(ref[2])] == ["completed"]
        sup.terminate()


def test_disk_full_writing_the_database(spool: Spool, client: Any, bucket: str) -> None:
    """With the database's disk full a claimed file waits in processing/ (logged) and is
    uploaded once the database can be written again."""
    with tmpfs(spool.root / "dbfs", "size=2m") as dbfs:
        spool.db = dbfs / "flood.db"
        sup = spool.start("--db", str(spool.db))
        started(spool, sup)
        fill_blocks(dbfs / "filler")
        expected: dict[Ref, bytes] = {}
        for i in range(5):
            ref = ("p1", bucket, f"dbfull/{i}.txt")
            expected[ref] = os.urandom(300 * (i + 1))
            spool.drop(*ref, expected[ref])
        wait_for(
            lambda: [e for e in events(spool, "upload_crashed") if "full" in str(e)],
            60,
            "a write refused for a full disk",
        )
        assert spool.files("completed") == []
        (dbfs / "filler").unlink()
        wait_drained(spool, expected, 90)
        assert_invariant(spool, client, expected)
        sup.terminate()


def test_database_locked_longer_than_the_busy_timeout(
    spool: Spool, client: Any, bucket: str
) -> None:
    """A db write lock held past the busy timeout: the claim's record write fails (logged),
    the file waits in processing/ and completes once the lock is gone."""
    sup = spool.start(workers=1)
    started(spool, sup)
    ref = ("p1", bucket, "locked.txt")
    expected = {ref: b"patience"}
    holder = sqlite3.connect(spool.db, isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        spool.drop(*ref, expected[ref])
        wait_for(
            lambda: logged(spool, "upload_crashed", ref[2]),
            BUSY_TIMEOUT_MS / 1000 + 60,
            "the record write to give up",
        )
        assert spool.where(*ref) == ["processing"]
        assert "locked" in str(logged(spool, "upload_crashed", ref[2])[0])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    wait_drained(spool, expected, 60)
    assert_invariant(spool, client, expected)


def test_file_deleted_between_its_event_and_its_claim(
    spool: Spool, client: Any, bucket: str
) -> None:
    """Files withdrawn right after landing are skipped (logged); every other file arrives."""
    sup = spool.start()
    started(spool, sup)
    expected: dict[Ref, bytes] = {}
    withdrawn = []
    for i in range(200):
        ref = ("p1", bucket, f"burst/{i:03d}.txt")
        data = f"file {i}".encode()
        path = spool.drop(*ref, data)
        if i % 2:
            try:
                path.unlink()
                withdrawn.append(ref[2])
                continue
            except FileNotFoundError:
                pass  # claimed already: it must arrive
        expected[ref] = data
    wait_drained(spool, expected, 90)
    assert_invariant(spool, client, expected)
    assert withdrawn
    skipped = {e["flood"]["key"] for e in events(spool, "job_skipped")}
    assert skipped & set(withdrawn)
    assert not [r for r in spool.records() if r["filepath"] in withdrawn]


def watch_and_change(spool: Spool, ref: Ref, change: Any) -> None:
    """As soon as the file is claimed, change it (the producer misbehaving mid-upload)."""
    target = spool.path("processing", *ref)
    deadline = time.monotonic() + 60
    while not target.exists():  # a tight poll: the upload window is short
        assert time.monotonic() < deadline, "the file was never claimed"
    change(target)


def test_file_appended_to_while_uploading(spool: Spool, client: Any, bucket: str) -> None:
    """A file that grows during its upload is never completed with the old bytes: the change
    is logged (source_modified) and the settled file is uploaded again."""
    sup = spool.start()
    started(spool, sup)
    ref = ("p1", bucket, "growing.bin")
    data = os.urandom(48 * 1024 * 1024)
    tail = []

    def grow(path: Path) -> None:
        with open(path, "ab") as handle:
            for _ in range(30):
                chunk = os.urandom(65536)
                handle.write(chunk)
                handle.flush()
                tail.append(chunk)
                time.sleep(0.05)  # the producer's pace of writing is the behaviour under test

    spool.drop(*ref, data)
    watch_and_change(spool, ref, grow)
    expected = {ref: data + b"".join(tail)}
    wait_drained(spool, expected, 120)
    assert_invariant(spool, client, expected)
    assert logged(spool, "source_modified", ref[2])


def test_file_truncated_while_uploading(spool: Spool, client: Any, bucket: str) -> None:
    """A file truncated during its upload ends with the truncated bytes in S3, never others."""
    sup = spool.start()
    started(spool, sup)
    ref = ("p1", bucket, "shrinking.bin")
    data = os.urandom(40 * 1024 * 1024)
    spool.drop(*ref, data)
    watch_and_change(spool, ref, lambda path: os.truncate(path, 1024 * 1024))
    expected = {ref: data[: 1024 * 1024]}
    wait_drained(spool, expected, 120)
    assert_invariant(spool, client, expected)
    assert object_bytes(client, bucket, ref[2]) == data[: 1024 * 1024]


def test_read_only_file(spool: Spool, client: Any, bucket: str) -> None:
    """A file mode 0444 (and one mode 0000) is read, uploaded and moved like any other when
    Flood runs as root; as another user the unreadable one fails with `unreadable`."""
    sup = spool.start()
    started(spool, sup)
    expected: dict[Ref, bytes] = {}
    for name, mode in (("ro.txt", 0o444), ("none.txt", 0o000)):
        ref = ("p1", bucket, f"modes/{name}")
        expected[ref] = name.encode() * 100
        staged = spool.root / name
        staged.write_bytes(expected[ref])
        staged.chmod(mode)
        spool.path("incoming", *ref).parent.mkdir(parents=True, exist_ok=True)
        os.rename(staged, spool.path("incoming", *ref))
    wait_drained(spool, expected, 60)
    as_root = os.geteuid() == 0
    if not as_root:  # the failed file keeps mode 0000; the checker must read it back
        [row] = spool.records("modes/none.txt")
        assert row["reason"] == "unreadable"
        spool.path("failed", "p1", bucket, "modes/none.txt").chmod(0o400)
    assert_invariant(spool, client, expected)
    assert spool.where("p1", bucket, "modes/none.txt") == ["completed" if as_root else "failed"]
    assert spool.where("p1", bucket, "modes/ro.txt") == ["completed"]
    assert spool.path("completed", "p1", bucket, "modes/ro.txt").stat().st_mode & 0o777 == 0o444


def test_name_not_valid_utf8(spool: Spool, client: Any, bucket: str) -> None:
    """A file whose name is not UTF-8 goes to failed/ with reason invalid_utf8 and the
    watcher keeps running: a later file still arrives."""
    sup = spool.start()
    started(spool, sup)
    folder = spool.path("incoming", "p1", bucket, "odd")
    folder.mkdir(parents=True)
    staged = os.fsencode(spool.root / "staged")
    Path(os.fsdecode(staged)).write_bytes(b"latin-1 name")
    os.rename(staged, os.path.join(os.fsencode(folder), b"bad\xff.txt"))
    bad = ("p1", bucket, "odd/" + os.fsdecode(b"bad\xff.txt"))
    good = ("p1", bucket, "odd/good.txt")
    spool.drop(*good, b"fine")
    expected = {bad: b"latin-1 name", good: b"fine"}
    wait_for(
        lambda: sup.proc.poll() is not None or drained(spool, expected),
        60,
        f"the drain ({spool.pending_summary()})",
    )
    assert spool.where(*bad) == ["failed"]
    assert_invariant(spool, client, expected)
    assert [r["reason"] for r in spool.records(stored(bad)[2])] == ["invalid_utf8"]
    assert not events(spool, "child_died")


def test_key_longer_than_1024_bytes(spool: Spool, client: Any, bucket: str) -> None:
    """A key over S3's 1,024 bytes goes to failed/ with reason key_too_long, others flow."""
    sup = spool.start()
    started(spool, sup)
    long_key = "/".join(["d" * 200] * 5) + "/" + "f" * 50
    assert len(long_key.encode()) > 1024
    expected = {("p1", bucket, long_key): b"too long", ("p1", bucket, "short.txt"): b"ok"}
    for ref, data in expected.items():
        spool.drop(*ref, data)
    wait_drained(spool, expected, 60)
    assert_invariant(spool, client, expected)
    assert spool.where("p1", bucket, long_key) == ["failed"]
    [row] = [r for r in spool.records() if r["filepath"] == long_key]
    assert row["reason"] == "key_too_long"


def test_files_landed_faster_than_inotify_can_queue(spool: Spool, client: Any, bucket: str) -> None:
    """More files land at once than the inotify queue holds: the overflow is logged, a rescan
    finds every file and all of them arrive."""
    if not os.access(QUEUED_EVENTS, os.W_OK):
        pytest.skip("cannot lower fs.inotify.max_queued_events here")
    for i in range(10):  # watched from the start: files landing there make one event each
        spool.path("incoming", "p1", bucket, f"flood/{i}").mkdir(parents=True)
    before = QUEUED_EVENTS.read_text()
    QUEUED_EVENTS.write_text(str(BURST_QUEUE))
    try:  # the limit is taken when the watcher creates its inotify instance
        sup = spool.start(workers=2)
        started(spool, sup)
    finally:
        QUEUED_EVENTS.write_text(before)
    started_line = [e for e in events(spool, "children_started") if e["process"]["pid"] == sup.pid][
        -1
    ]
    watcher = started_line["flood"]["pids"][-1]
    expected: dict[Ref, bytes] = {}
    os.kill(watcher, signal.SIGSTOP)  # it cannot read: the kernel queue overflows
    try:
        for i in range(BURST_FILES):
            ref = ("p1", bucket, f"flood/{i % 10}/{i:05d}")
            expected[ref] = b"%d" % i
            spool.drop(*ref, expected[ref])
    finally:
        os.kill(watcher, signal.SIGCONT)
    wait_for(lambda: events(spool, "inotify_overflow"), 60, "the overflow")
    seconds = wait_drained(spool, expected, 240)
    assert_invariant(spool, client, expected)
    assert [e for e in events(spool, "rescan_finished") if e["event"].get("reason") == "overflow"]
    print(f"{BURST_FILES} files drained {seconds:.1f} s after the burst")
