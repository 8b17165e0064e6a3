"""The upload pipeline in-process, with a fake clock: a real server dir and real records, and
S3 played by a scripted sender (the real servers are in tests/e2e)."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from flood import records
from flood.credentials import Profile
from flood.jobs import FileRef, Job
from flood.options import ObjectOptions
from flood.passage import Result
from flood.settings import Settings
from flood.states import Outcome, State, Step
from flood.upload import BATCH_MAX_BYTES, Uploads

NOW = 1_900_000_000.0  # the fake clock
B = "bucket-one"


class Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((event, kw))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [kw for event, kw in self.lines if event == name]


def answer(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


class Put:
    version_id: str | None = None  # as a bucket without versioning answers

    def __init__(self, sender: Sender, key: str, body: bytes, md5: str) -> None:
        self.sender, self.key, self.body, self.md5 = sender, key, body, md5

    def result(self) -> str:
        self.sender.inflight.remove(self)
        reply = self.sender.script.get(self.key)
        if isinstance(reply, Exception):
            raise reply
        if callable(reply):
            return str(reply(self))
        assert base64.b64decode(self.md5) == hashlib.md5(self.body).digest()
        self.sender.stored[self.key] = self.body
        return f'"{hashlib.md5(self.body).hexdigest()}"'


class Sender:
    """S3 as a script: key -> an exception to raise, or a function of the PUT; else stored."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.script: dict[str, Any] = {}
        self.stored: dict[str, bytes] = {}
        self.inflight: list[Put] = []
        self.options: dict[str, ObjectOptions] = {}
        self.most_in_flight = 0

    def start(
        self, bucket: str, key: str, body: bytes, content_md5: str, options: ObjectOptions
    ) -> Put:
        self.options[key] = options
        put = Put(self, key, body, content_md5)
        self.inflight.append(put)
        self.most_in_flight = max(self.most_in_flight, sum(len(p.body) for p in self.inflight))
        return put


class Client:
    """What the pipeline asks boto3 for: a HEAD of an object."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    def head_object(self, Bucket: str, Key: str) -> dict[str, Any]:
        return {"ContentLength": len(self.sender.stored.get(Key, b""))}


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Path]:
    for state in ("incoming_tmp", "incoming", "processing", "failed", "completed"):
        (tmp_path / "srv" / state / "p" / B).mkdir(parents=True)
    records.open_db(str(tmp_path / "flood.db"))
    yield tmp_path / "srv"
    records.close_db()


def uploads(spool: Path, sender: Sender, **options: Any) -> tuple[Uploads, Log]:
    profile = Profile("p", "amazon", "AK", "SECRET", "us-east-1", "http://127.0.0.1:1")
    settings = Settings(
        server_dir=spool,
        db_path=":memory:",
        credentials_path="c",
        profiles={"p": profile},
        **options,
    )
    log = Log()
    return Uploads(settings, "p", Client(sender), log, sender=sender, checked_buckets={B}), log


def drop(spool: Path, key: str, data: bytes) -> Job:
    path = spool / "incoming" / "p" / B / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Job(State.INCOMING, B, key)


def where(spool: Path, key: str) -> list[str]:
    return [s for s in ("incoming", "processing", "failed", "completed")
            if (spool / s / "p" / B / key).exists()]  # fmt: skip


def steps(outcomes: list[Result | Exception]) -> list[Step]:
    return [o.step for o in outcomes if isinstance(o, Result)]


def test_a_batch_shares_its_puts_and_completes_together(spool: Path) -> None:
    """Small files of one batch go up as PUTs in flight together, never more bytes than the
    sender's window, and all end in completed/ with completed records."""
    sender = Sender(window=3000)
    up, log = uploads(spool, sender)
    jobs = [drop(spool, f"d/k{i}", os.urandom(1000)) for i in range(6)]
    outcomes = up.run(jobs, NOW)
    assert steps(outcomes) == [Step.DONE] * 6
    assert all(isinstance(o, Result) and o.ended == Outcome.SUCCESS for o in outcomes)
    assert sender.most_in_flight == 3000
    assert [where(spool, j.key) for j in jobs] == [["completed"]] * 6
    assert {p.state for j in jobs for p in records.passages(FileRef("p", B, j.key))} == {
        "completed"
    }
    assert len(log.events("upload_succeeded")) == 6


def test_one_at_a_time_when_the_sender_has_no_window(spool: Path) -> None:
    """boto3's put_object (window 0) has one PUT in flight: each answered before the next."""
    sender = Sender(window=0)
    up, _ = uploads(spool, sender)
    jobs = [drop(spool, f"k{i}", b"x" * 10) for i in range(3)]
    assert steps(up.run(jobs, NOW)) == [Step.DONE] * 3
    assert sender.most_in_flight == 10


def test_a_transient_error_waits_for_its_retry_then_completes(spool: Path) -> None:
    """A SlowDown schedules retry 1 within [base, 2*base) on the fake clock; before it is due
    the file is not tried, at its time it completes and its retry row says success."""
    sender = Sender(window=1 << 20)
    up, _ = uploads(spool, sender, retry_base=30.0)
    sender.script["slow"] = answer("SlowDown", 503)
    [first] = up.run([drop(spool, "slow", b"abc")], NOW)
    assert isinstance(first, Result) and first.step == Step.RETRY and first.reason == "SlowDown"
    assert NOW + 30 <= first.due < NOW + 60
    assert where(spool, "slow") == ["processing"]
    del sender.script["slow"]
    [early] = up.run([Job(State.PROCESSING, B, "slow")], first.due - 1)
    assert isinstance(early, Result) and early.step == Step.RETRY and "slow" not in sender.stored
    [done] = up.run([Job(State.PROCESSING, B, "slow")], first.due)
    assert isinstance(done, Result) and done.ended == Outcome.SUCCESS
    [passage] = records.passages(FileRef("p", B, "slow"))
    assert [(a.attempt, a.outcome) for a in passage.attempts] == [(1, "success")]


def test_a_permanent_error_fails_the_file_with_its_reason(spool: Path) -> None:
    """AccessDenied is not retried: failed/ at once, the reason on record."""
    sender = Sender(window=1 << 20)
    up, _ = uploads(spool, sender)
    sender.script["denied"] = answer("AccessDenied", 403)
    [result] = up.run([drop(spool, "denied", b"no")], NOW)
    assert isinstance(result, Result) and result.ended == Outcome.FAILURE
    assert where(spool, "denied") == ["failed"]
    assert records.passages(FileRef("p", B, "denied"))[0].reason == "AccessDenied"


def test_an_etag_that_is_not_the_md5_is_verified_by_head(spool: Path) -> None:
    """An answer that does not prove the bytes leads to a HEAD; a size that differs is a
    mismatch, retried, never completed."""
    sender = Sender(window=1 << 20)
    up, _ = uploads(spool, sender)
    sender.script["kms"] = lambda put: "not-an-md5"  # the server stored nothing
    [result] = up.run([drop(spool, "kms", b"12345")], NOW)
    assert isinstance(result, Result) and result.step == Step.RETRY
    assert result.reason == "verify_mismatch"
    assert where(spool, "kms") == ["processing"]


def test_a_file_written_to_during_its_upload_is_not_completed(spool: Path) -> None:
    """If the file changes between its read and the answer, it is uploaded again once it
    settles: never a completed record for other bytes."""
    sender = Sender(window=1 << 20)
    up, log = uploads(spool, sender)
    path = spool / "processing" / "p" / B / "grows"

    def append_then_answer(put: Put) -> str:
        with open(path, "ab") as handle:
            handle.write(b"more")
        return f'"{hashlib.md5(put.body).hexdigest()}"'

    sender.script["grows"] = append_then_answer
    [result] = up.run([drop(spool, "grows", b"start")], NOW)
    assert isinstance(result, Result) and result.step == Step.CHANGED
    assert result.due == NOW + up.settings.settle_seconds
    assert log.events("source_modified") and where(spool, "grows") == ["processing"]


def test_files_above_the_batch_size_go_up_alone(spool: Path) -> None:
    """A file larger than a batch's share is read and PUT by itself, with its own proof."""
    sender = Sender(window=1 << 20)
    up, _ = uploads(spool, sender)
    big = os.urandom(BATCH_MAX_BYTES + 1)
    outcomes = up.run([drop(spool, "small", b"s"), drop(spool, "big", big)], NOW)
    assert steps(outcomes) == [Step.DONE, Step.DONE]
    assert sender.stored["big"] == big and where(spool, "big") == ["completed"]


@pytest.mark.parametrize(
    ("prepare", "step", "state"),
    [
        (lambda p: None, Step.SKIPPED, []),  # gone before its claim
        (lambda p: (p / "processing" / "p" / B / "busy").write_bytes(b"old"), Step.BUSY, None),
    ],
)
def test_claims_that_do_not_happen(
    spool: Path, prepare: Callable[[Path], Any], step: Step, state: list[str] | None
) -> None:
    """A file that vanished is skipped; a name still in processing/ is busy (tried later, in
    order), and the newer file waits in incoming/."""
    sender = Sender(window=1 << 20)
    up, _ = uploads(spool, sender)
    key = "busy" if step == Step.BUSY else "gone"
    prepare(spool)
    job = drop(spool, key, b"new") if step == Step.BUSY else Job(State.INCOMING, B, key)
    [result] = up.run([job], NOW)
    assert isinstance(result, Result) and result.step == step
    if step == Step.BUSY:
        assert where(spool, key) == ["incoming", "processing"]
