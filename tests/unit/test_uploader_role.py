"""The uploader role's loop in-process, with a queue.Queue and a fake clock: batches, the
retry heap, busy paths and files whose handling keeps crashing."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import pytest

from flood.credentials import Profile
from flood.jobs import SHUTDOWN, FileRef, Job
from flood.layout import Layout
from flood.passage import Result
from flood.settings import Settings
from flood.states import Outcome, State, Step
from flood.upload import BATCH
from flood.workers import uploader
from flood.workers.uploader import BUSY_WAIT, MAX_CRASHES, UploaderRole

NOW = 1_000.0


class Log:
    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: None


class Moves:
    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)


class Holds:
    def __init__(self) -> None:
        self.released = False

    def take_released(self) -> bool:
        released, self.released = self.released, False
        return released


class Uploads:
    """Plays the pipeline: results scripted per key (a list is consumed one pass at a time)."""

    def __init__(self, root: Path) -> None:
        self.moves = Moves(root)
        self.holds = Holds()
        self.script: dict[str, list[Result | Exception]] = {}
        self.batches: list[list[Job]] = []
        self.given_up: list[FileRef] = []

    def run(self, jobs: list[Job], now: float) -> list[Result | Exception]:
        self.batches.append(list(jobs))
        done = Result(Step.DONE, ended=Outcome.SUCCESS)
        return [(self.script.get(j.key) or [done]).pop(0) for j in jobs]

    def give_up(self, ref: FileRef, error: str) -> None:
        self.given_up.append(ref)


@pytest.fixture(autouse=True)
def no_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop asks the records once a second which waiting retries are due now (requeue
    --waiting, a lifted hold); here none are, unless a test says so (no database is open)."""
    monkeypatch.setattr(uploader.records, "due_keys", lambda profile: set())


def role(tmp_path: Path) -> tuple[UploaderRole, queue.Queue[Any], Uploads]:
    settings = Settings(
        server_dir=tmp_path,
        db_path=":memory:",
        credentials_path="c",
        profiles={"p": Profile("p", "amazon", "AK", "S", "us-east-1", None)},
    )
    jobs: queue.Queue[Any] = queue.Queue()
    up = UploaderRole(settings, "p", 0, jobs, set())
    up.log = Log()
    fake = Uploads(tmp_path)
    up.uploads = fake  # type: ignore[assignment]
    return up, jobs, fake


def test_queued_jobs_are_taken_as_one_batch(tmp_path: Path) -> None:
    """What is queued already goes into one pass, up to BATCH jobs."""
    up, jobs, fake = role(tmp_path)
    for i in range(BATCH + 5):
        jobs.put(Job(State.INCOMING, "b", f"k{i}"))
    up.loop(NOW)
    up.loop(NOW)
    assert [len(b) for b in fake.batches] == [BATCH, 5]


def test_a_retry_runs_at_its_due_time_and_not_before(tmp_path: Path) -> None:
    """A RETRY result puts the file in the heap; the loop runs it once the clock reaches its
    due time, as a job in processing/, while other files flow meanwhile."""
    up, jobs, fake = role(tmp_path)
    fake.script["slow"] = [Result(Step.RETRY, NOW + 30, reason="SlowDown")]
    jobs.put(Job(State.INCOMING, "b", "slow"))
    up.loop(NOW)
    jobs.put(Job(State.INCOMING, "b", "other"))
    up.loop(NOW + 10)
    up.loop(NOW + 29.9)
    assert [[j.key for j in b] for b in fake.batches] == [["slow"], ["other"]]
    up.loop(NOW + 30)
    assert fake.batches[-1] == [Job(State.PROCESSING, "b", "slow")]


def test_a_busy_path_is_tried_again_shortly(tmp_path: Path) -> None:
    """BUSY (the same name still in processing/) comes back after BUSY_WAIT, unchanged."""
    up, jobs, fake = role(tmp_path)
    fake.script["k"] = [Result(Step.BUSY)]
    jobs.put(Job(State.INCOMING, "b", "k"))
    up.loop(NOW)
    up.loop(NOW + BUSY_WAIT / 2)
    assert len(fake.batches) == 1
    up.loop(NOW + BUSY_WAIT)
    assert fake.batches[-1] == [Job(State.INCOMING, "b", "k")]


def test_a_file_that_keeps_crashing_is_given_up(tmp_path: Path) -> None:
    """An exception is retried later with backoff; after MAX_CRASHES of a claimed file it
    goes to failed/ (give_up) instead of looping."""
    up, jobs, fake = role(tmp_path)
    claimed = tmp_path / "processing" / "p" / "b" / "bad"
    claimed.parent.mkdir(parents=True)
    claimed.write_bytes(b"x")
    fake.script["bad"] = [RuntimeError("boom")] * MAX_CRASHES
    jobs.put(Job(State.PROCESSING, "b", "bad"))
    clock = NOW
    for _ in range(60):
        up.loop(clock)
        clock += 400.0
        if fake.given_up:
            break
    assert fake.given_up == [FileRef("p", "b", "bad")]
    assert len(fake.batches) == MAX_CRASHES


def test_a_file_in_processing_is_taken_once_per_batch(tmp_path: Path) -> None:
    """A rescan may queue a file in processing/ twice: one batch takes it up once."""
    up, jobs, fake = role(tmp_path)
    for _ in range(3):
        jobs.put(Job(State.PROCESSING, "b", "same"))
    jobs.put(Job(State.INCOMING, "b", "new"))
    up.loop(NOW)
    assert [j.key for j in fake.batches[0]] == ["same", "new"]


def test_shutdown_ends_the_loop_after_the_batch(tmp_path: Path) -> None:
    """SHUTDOWN on the queue finishes what was taken, then the role stops."""
    up, jobs, fake = role(tmp_path)
    jobs.put(Job(State.INCOMING, "b", "k"))
    jobs.put(SHUTDOWN)
    up.loop(NOW)
    assert not up.alive and fake.batches == [[Job(State.INCOMING, "b", "k")]]


def test_a_lifted_hold_makes_every_waiting_file_due(tmp_path: Path) -> None:
    """Files waiting while their profile was held (an outage) are taken up as soon as the
    hold is lifted, not at the due times their retries had."""
    up, jobs, fake = role(tmp_path)
    fake.script["late"] = [Result(Step.RETRY, NOW + 3600, reason="EndpointConnectionError")]
    jobs.put(Job(State.INCOMING, "b", "late"))
    up.loop(NOW)
    up.loop(NOW + 1)
    assert len(fake.batches) == 1
    fake.holds.released = True
    jobs.put(Job(State.INCOMING, "b", "other"))
    up.loop(NOW + 1.5)  # this pass's batch notices the release (before the once-a-second look)
    up.loop(NOW + 1.5)
    assert fake.batches[-1] == [Job(State.PROCESSING, "b", "late")]


def test_a_lifted_hold_frees_the_waiting_files_of_an_idle_uploader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing else queued (no batch to notice the lift), the loop still looks: the
    file that waited for the hold goes up within a second of it, not when its wait ends
    (lifting a hold makes its retries due in the records, which the loop reads once a second
    while files wait)."""
    up, jobs, fake = role(tmp_path)
    due: set[tuple[str, str]] = set()
    monkeypatch.setattr(uploader.records, "due_keys", lambda profile: due)
    fake.script["held"] = [Result(Step.RETRY, NOW + 60)]
    jobs.put(Job(State.INCOMING, "b", "held"))
    up.loop(NOW)
    due.add(("b", "held"))  # the hold lifted: records.release made its retry due
    up.loop(NOW + 1.5)  # the once-a-second look: due now
    up.loop(NOW + 1.5)
    assert fake.batches[-1] == [Job(State.PROCESSING, "b", "held")]
