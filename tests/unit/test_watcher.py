"""The watcher's loop in-process: routing, ignore patterns, settling and watch failures."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path
from typing import Any

from flood.credentials import Profile
from flood.jobs import Job
from flood.settings import Settings
from flood.workers.watcher import WatcherRole, slot_of


class Log:
    """Collects log calls as (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, kw))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [kw for _, event, kw in self.lines if event == name]


class WatchManager:
    """A WatchManager whose add_watch fails, as inotify does when watches run out."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def add_watch(self, path: str, mask: int, rec: bool, auto_add: bool) -> dict[str, int]:
        return {path: -1 if self.fail else 1}

    def get_wd(self, path: str) -> int | None:
        return None if self.fail else 1


def role(tmp_path: Path, workers: int = 3, fail: bool = False) -> tuple[WatcherRole, list[Any]]:
    profile = Profile("p", "amazon", "AK", "SECRET", "us-east-1", None)
    settings = Settings(
        server_dir=tmp_path,
        db_path=":memory:",
        credentials_path="c",
        profiles={"p": profile},
        workers=workers,
        settle_seconds=0.5,
    )
    queues: list[Any] = [queue.Queue() for _ in range(workers)]
    watcher = WatcherRole(settings, {"p": queues}, None)
    watcher.log = Log()
    watcher.wm = WatchManager(fail)
    return watcher, queues


def put(tmp_path: Path, rel: str, age: float = 10.0) -> str:
    path = tmp_path / "incoming" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    then = time.time() - age
    os.utime(path, (then, then))
    return str(path)


def test_a_path_always_goes_to_the_same_uploader(tmp_path: Path) -> None:
    """Dispatch routes by a hash of bucket and key: the same path, the same queue."""
    watcher, queues = role(tmp_path)
    path = put(tmp_path, "p/bkt/a/b.txt")
    for _ in range(3):
        watcher.dispatch("incoming", path)
    slot = slot_of("bkt", "a/b.txt", 3)
    assert queues[slot].qsize() == 3
    assert queues[slot].get() == Job("incoming", "bkt", "a/b.txt")


def test_ignored_misplaced_and_unknown_are_left_and_logged_once(tmp_path: Path) -> None:
    """Ignored names, files above P/B/ and unknown profiles are not sent; one log line each."""
    watcher, queues = role(tmp_path)
    for rel in ("p/bkt/.hidden", "p/bkt/x.swp", "p/loose.txt", "other/bkt/f"):
        path = put(tmp_path, rel)
        watcher.dispatch("incoming", path)
        watcher.dispatch("incoming", path)
    assert sum(q.qsize() for q in queues) == 0
    assert len(watcher.log.events("file_ignored")) == 2
    assert len(watcher.log.events("file_misplaced")) == 1
    assert len(watcher.log.events("profile_unknown")) == 1


def test_scanned_files_wait_until_settled(tmp_path: Path) -> None:
    """A scanned file younger than the settle time is held back, then sent once settled."""
    watcher, queues = role(tmp_path, workers=1)
    fresh = put(tmp_path, "p/bkt/fresh", age=0.0)
    old = put(tmp_path, "p/bkt/old", age=10.0)
    assert watcher.dispatch_found(old) == 1
    assert watcher.dispatch_found(fresh) == 0
    assert fresh in watcher.pending
    watcher.check_pending(time.time() + 0.1)
    assert queues[0].qsize() == 1
    watcher.check_pending(time.time() + 5.0)
    assert queues[0].qsize() == 2 and not watcher.pending


def test_failed_watches_switch_to_frequent_rescans(tmp_path: Path) -> None:
    """A watch inotify refuses (at start or on a new directory) is logged as an error and
    turns on the fallback rescan."""
    watcher, _ = role(tmp_path, fail=True)
    (tmp_path / "incoming" / "p" / "bkt").mkdir(parents=True)
    watcher.add_watch(str(tmp_path / "incoming" / "p" / "bkt"), rec=True)
    assert watcher.watch_failed
    assert watcher.log.events("watch_failed")


def test_the_start_up_drain_sends_processing_before_incoming(tmp_path: Path) -> None:
    """Files a crash left claimed are queued before the files that waited in incoming/."""
    watcher, queues = role(tmp_path, workers=1)
    claimed = tmp_path / "processing" / "p/bkt/was/claimed.bin"
    claimed.parent.mkdir(parents=True)
    claimed.write_bytes(b"x")
    put(tmp_path, "p/bkt/queued.txt")
    sent: list[Any] = []
    watcher.conn = type("Conn", (), {"send": lambda self, message: sent.append(message)})()
    watcher.drain()
    jobs = [queues[0].get_nowait() for _ in range(queues[0].qsize())]
    assert jobs == [
        Job("processing", "bkt", "was/claimed.bin"),
        Job("incoming", "bkt", "queued.txt"),
    ]
    assert [m.files for m in sent] == [2]
