"""The audit: each completed record's object HEADed and compared with what was uploaded, so
an object deleted or overwritten behind Flood's back is found. Reads records and objects
only; no printing and no logging here (flood-audit and the supervisor's thread report)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from flood import checksums, records
from flood.credentials import Profile
from flood.errors import ConfigError
from flood.records import Completed
from flood.s3 import make_client
from flood.states import Field, Finding, Reason
from flood.verdict import Kind, Scope, classify, describe

PAGE = 500  # records read at a time (a short read each; no read is held across a HEAD)
GIVE_UP_AFTER = 3  # failures of a profile's server or key in a row before its rest is skipped


# -- pacing ------------------------------------------------------------------------------------
class TokenBucket:
    """At most `rate` takes a second: a bucket of `burst` tokens refilled at `rate`. With the
    default burst of 1, n takes last at least (n - 1) / rate seconds. `wait(seconds)` sleeps
    and returns True when interrupted (the supervisor stopping)."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.wait = wait or threading.Event().wait
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> bool:
        """Take one token, waiting for it if need be; False if the wait was interrupted."""
        self.refill()
        if self.tokens < 1:
            if self.wait((1 - self.tokens) / self.rate):
                return False
            self.refill()
        self.tokens = max(0.0, self.tokens - 1)
        return True

    def refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now


# -- what one object is and was ------------------------------------------------------------------
@dataclass(frozen=True)
class Seen:
    """An object as the records have it, or as a HEAD found it."""

    size: int | None
    etag: str | None  # without quotes
    checksum: str | None  # "algorithm:value", the value as S3 gives it (composites end -N)

    def text(self) -> str:
        """'size 5, ETag abc, crc32 xyz', leaving out what is not known."""
        parts = [f"size {self.size}"] if self.size is not None else []
        parts += [f"ETag {self.etag}"] if self.etag else []
        if self.checksum:
            algorithm, _, value = self.checksum.partition(":")
            parts.append(f"{algorithm} {value}")
        return ", ".join(parts) or "-"


@dataclass(frozen=True)
class Discrepancy:
    """A completed record whose object is missing, or differs in `differs`."""

    record: Completed
    finding: Finding
    recorded: Seen
    found: Seen | None  # None: missing
    differs: tuple[Field, ...] = ()


@dataclass(frozen=True)
class Unchecked:
    """A completed record whose object could not be compared: the HEAD failed, or was not
    sent after its profile's server failed GIVE_UP_AFTER times in a row."""

    record: Completed
    reason: str
    kind: str
    error: str


@dataclass
class Tally:
    """One bucket's counts: objects compared, of which missing and different; not compared."""

    checked: int = 0
    missing: int = 0
    different: int = 0
    errors: int = 0


@dataclass
class Report:
    discrepancies: list[Discrepancy] = field(default_factory=list)
    unchecked: list[Unchecked] = field(default_factory=list)
    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    interrupted: bool = False

    def total(self) -> Tally:
        whole = Tally()
        for t in self.tallies.values():
            whole.checked += t.checked
            whole.missing += t.missing
            whole.different += t.different
            whole.errors += t.errors
        return whole

    def tally(self, record: Completed) -> Tally:
        return self.tallies.setdefault((record.profile, record.bucket), Tally())


# -- comparing -----------------------------------------------------------------------------------
def recorded(record: Completed) -> Seen:
    return Seen(record.size, _bare(record.etag), record.checksum)


def head(client: Any, record: Completed) -> Seen | None:
    """The object as the server has it now (None: there is none). The checksum is asked for
    (ChecksumMode) only when the record has one. Other errors raise."""
    algorithm, _, value = (record.checksum or "").partition(":")
    checksum = checksums.named(algorithm) if value else None
    extra = {"ChecksumMode": "ENABLED"} if checksum is not None else {}
    try:
        answer = client.head_object(Bucket=record.bucket, Key=record.key, **extra)
    except ClientError as exc:
        if classify(exc, "HeadObject").kind == Kind.MISSING_OBJECT:
            return None
        raise
    told = answer.get(checksum.field) if checksum is not None else None
    return Seen(
        int(answer["ContentLength"]) if "ContentLength" in answer else None,
        _bare(answer.get("ETag")),
        f"{algorithm}:{told}" if told else None,
    )


def compare(was: Seen, now: Seen) -> tuple[Field, ...]:
    """What differs, of what both sides know. A checksum is compared without its -N part
    count; one the server does not report is not a difference (the ETag still is)."""
    differs = []
    if was.size is not None and now.size != was.size:
        differs.append(Field.SIZE)
    if was.etag and now.etag and now.etag != was.etag:
        differs.append(Field.ETAG)
    if was.checksum and now.checksum and _value(now.checksum) != _value(was.checksum):
        differs.append(Field.CHECKSUM)
    return tuple(differs)


def check(client: Any, record: Completed) -> Discrepancy | None:
    """One record against its object: a Discrepancy, or None when they agree."""
    was = recorded(record)
    now = head(client, record)
    if now is None:
        return Discrepancy(record, Finding.MISSING, was, None)
    differs = compare(was, now)
    return Discrepancy(record, Finding.DIFFERENT, was, now, differs) if differs else None


def _bare(etag: Any) -> str | None:
    return (str(etag).strip('"') or None) if etag else None


def _value(checksum: str) -> str:
    return checksum.partition(":")[2].split("-")[0]


# -- the audit -----------------------------------------------------------------------------------
class Audit:
    """Compares the completed records (the newest completed passage of each key) with their
    objects, one HEAD each, paced by an optional TokenBucket; `stopped()` ends it early."""

    def __init__(
        self,
        profiles: Mapping[str, Profile],
        pacer: TokenBucket | None = None,
        stopped: Callable[[], bool] = lambda: False,
        client: Callable[[Profile, Mapping[str, Profile]], Any] = make_client,
    ) -> None:
        self.profiles = profiles
        self.pacer = pacer
        self.stopped = stopped
        self.make_client = client
        self.clients: dict[str, Any] = {}
        self.failing: dict[str, tuple[int, Unchecked]] = {}  # profile -> failures in a row

    def run(
        self,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        profile: str | None = None,
        bucket: str | None = None,
    ) -> Report:
        report = Report()
        for record in self.records(since, until, profile, bucket):
            if self.stopped() or not self.one(record, report):
                report.interrupted = True
                break
        return report

    def records(
        self,
        since: dt.datetime | None,
        until: dt.datetime | None,
        profile: str | None,
        bucket: str | None,
    ) -> Iterator[Completed]:
        after = 0
        while True:
            page = records.completed_page(after, PAGE, since, until, profile, bucket)
            yield from page
            if len(page) < PAGE:
                return
            after = page[-1].id

    def one(self, record: Completed, report: Report) -> bool:
        """Check one record into the report; False if waiting for the pace was interrupted."""
        tally = report.tally(record)
        skipped = self.skipped(record)
        if skipped is not None:
            tally.errors += 1
            report.unchecked.append(skipped)
            return True
        if self.pacer is not None and not self.pacer.take():
            return False
        try:
            found = check(self.client(record.profile), record)
        except (ClientError, BotoCoreError, ConfigError) as exc:
            tally.errors += 1
            report.unchecked.append(self.failed(record, exc))
            return True
        self.failing.pop(record.profile, None)
        if found is not None and records.superseded(record):
            found = None  # a newer upload of the key is under way or done: not this one's
        tally.checked += 1
        if found is not None:
            report.discrepancies.append(found)
            if found.finding == Finding.MISSING:
                tally.missing += 1
            else:
                tally.different += 1
        return True

    def client(self, profile: str) -> Any:
        if profile not in self.clients:
            self.clients[profile] = self.make_client(self.profiles[profile], self.profiles)
        return self.clients[profile]

    def skipped(self, record: Completed) -> Unchecked | None:
        """Why this record is not checked at all: its profile is not in the credentials file,
        or its server failed GIVE_UP_AFTER times in a row."""
        if record.profile not in self.profiles:
            return Unchecked(
                record,
                Reason.UNKNOWN_PROFILE,
                Kind.LOCAL,
                f"profile {record.profile!r} is not in the credentials file",
            )
        count, last = self.failing.get(record.profile, (0, None))
        if last is None or count < GIVE_UP_AFTER:
            return None
        why = f"not checked: {count} HEADs of profile {record.profile} failed in a row"
        return Unchecked(record, last.reason, last.kind, f"{why}; the last: {last.error}")

    def failed(self, record: Completed, exc: BaseException) -> Unchecked:
        if isinstance(exc, ConfigError):
            failure = Unchecked(record, "config", Kind.LOCAL, str(exc))
            self.failing[record.profile] = (GIVE_UP_AFTER, failure)
            return failure
        verdict = classify(exc, "HeadObject")
        failure = Unchecked(record, verdict.reason, verdict.kind, describe(exc))
        if verdict.transient or verdict.scope == Scope.PROFILE:
            count = self.failing.get(record.profile, (0, failure))[0]
            self.failing[record.profile] = (count + 1, failure)
        else:
            self.failing.pop(record.profile, None)  # the server answered (403, say)
        return failure
