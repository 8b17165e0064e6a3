"""sd_notify datagrams, the watchdog's decision and the children's heartbeats, in-process."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flood import metrics
from flood.jobs import Alive
from flood.notify import HEARTBEAT_SECONDS, STALL_MIN, Heartbeat, Notifier, Watchdog
from flood.passage import Result
from flood.states import Outcome, Step

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound at a path, as systemd's notify socket is."""
    path = str(tmp_path / "notify.sock")
    if len(path) > 100:  # sun_path holds 108 bytes
        path = f"/tmp/flood-notify-{uuid.uuid4().hex[:8]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()
    os.unlink(path)


def test_ready_reaches_a_socket_path(listener: tuple[socket.socket, str]) -> None:
    """READY=1 with its STATUS= line arrives as one datagram at $NOTIFY_SOCKET."""
    sock, path = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.ready("uploading")
    assert sock.recv(4096) == b"READY=1\nSTATUS=uploading"


def test_abstract_namespace_socket() -> None:
    """'@name' in $NOTIFY_SOCKET addresses Linux's abstract namespace."""
    name = f"flood-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    """Outside systemd every message is a no-op that reports it was not sent."""
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert not notifier.ready("x") and not notifier.stopping("y")
    assert notifier.watchdog_interval is None


def test_variables_are_read_then_unset_for_children(listener: tuple[socket.socket, str]) -> None:
    """With unset, the socket and watchdog variables leave the environment children inherit."""
    _, path = listener
    env = {
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "4000000",
        "WATCHDOG_PID": str(os.getpid()),
        "OTHER": "kept",
    }
    notifier = Notifier.from_environ(env, unset=True)
    assert notifier.enabled and notifier.watchdog_interval == 4.0
    assert env == {"OTHER": "kept"}


def test_watchdog_meant_for_another_pid_is_ignored() -> None:
    """WATCHDOG_USEC is not ours when WATCHDOG_PID names another process."""
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert notifier.watchdog_interval is None


def test_reloading_carries_the_monotonic_time(listener: tuple[socket.socket, str]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC, as Type=notify-reload requires."""
    sock, path = listener
    Notifier.from_environ({"NOTIFY_SOCKET": path}).reloading("re-reading")
    lines = sock.recv(4096).decode().splitlines()
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert int(lines[1].split("=")[1]) > 0 and lines[2] == "STATUS=re-reading"


def test_watchdog_pings_every_half_interval() -> None:
    """After a ping the next is due half a watchdog interval later."""
    dog = Watchdog(10.0)
    assert dog.due(0.0)
    dog.pinged(0.0)
    assert not dog.due(4.9) and dog.due(5.0)


def test_a_child_without_recent_progress_withholds_the_ping() -> None:
    """A child whose last beat is older than the stall limit is named as stale."""
    dog = Watchdog(10.0)
    assert dog.stale(100.0, {"watcher": 95.0, "uploader-p1-0": 89.0}) == ["uploader-p1-0"]
    assert dog.stale(100.0, {"watcher": 95.0, "uploader-p1-0": 99.0}) == []


def test_stall_limit_is_never_shorter_than_a_few_beats() -> None:
    """A short watchdog interval still allows a few heartbeats before calling a child stalled."""
    assert Watchdog(1.0).stall_after == STALL_MIN
    assert Watchdog(60.0).stall_after == 60.0


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)


def test_heartbeat_is_sent_at_most_once_a_second() -> None:
    """Beats closer together than a second send one message."""
    clock = [100.0]
    pipe = _Pipe()
    beat = Heartbeat(pipe, clock=lambda: clock[0])
    beat.beat()
    clock[0] += HEARTBEAT_SECONDS / 2
    beat.beat(event_name="after-call.s3")  # botocore passes keyword arguments
    assert pipe.sent == [Alive(os.getpid())]
    clock[0] += HEARTBEAT_SECONDS
    beat.beat()
    assert len(pipe.sent) == 2


def test_heartbeat_survives_a_closed_pipe() -> None:
    """A supervisor that is gone is not an error for the child that beats."""

    class Broken:
        def send(self, message: Any) -> None:
            raise BrokenPipeError

    Heartbeat(Broken()).beat()
    Heartbeat(None).beat()


def test_metrics_count_what_a_pass_ended_in() -> None:
    """The uploader counts results, not log lines: a completion with its size and time, a
    failure, a retry with its reason; a busy or skipped pass counts nothing."""
    counted: list[tuple[Any, ...]] = []

    class Rec(metrics.Recorder):
        def upload(self, *args: Any) -> None:
            counted.append(("upload", *args))

        def retry(self, *args: Any) -> None:
            counted.append(("retry", *args))

    rec = Rec()
    rec.result("p", "b", Result(Step.DONE, ended=Outcome.SUCCESS, size=5, seconds=0.5))
    rec.result("p", "b", Result(Step.RETRY, due=9.0, reason="SlowDown"))
    rec.result("p", "b", Result(Step.DONE, ended=Outcome.FAILURE, size=3, reason="AccessDenied"))
    rec.result("p", "b", Result(Step.RETRY, due=9.0))  # a move to retry: not an attempt
    rec.result("p", "b", Result(Step.BUSY))
    rec.result("p", "b", Result(Step.SKIPPED))
    assert counted == [
        ("upload", "p", "b", "success", 5, 0.5),
        ("retry", "p", "b", "SlowDown"),
        ("upload", "p", "b", "failure", 3, None),
    ]
