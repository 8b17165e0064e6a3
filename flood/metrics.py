"""Prometheus metrics: counters in every process (multiprocess mode), live gauges at scrape time."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache
from typing import Any

from flood.errors import DatabaseUnreachable
from flood.passage import Result
from flood.states import Step

ENV = "PROMETHEUS_MULTIPROC_DIR"
SNAPSHOT_TTL = 2.0  # scrapes within this many seconds share one directory walk
DURATION_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
    float("inf"),
)

# prometheus_client picks its value class when first imported: nothing here imports it at
# module level, so a process that never enables metrics never loads it.


def enabled() -> bool:
    """Metrics are on in this process tree when the supervisor set the multiprocess dir."""
    return bool(os.environ.get(ENV))


def prepare_dir() -> str:
    """A fresh, empty multiprocess dir in os.environ, before prometheus_client is imported and
    before the forkserver starts (its children inherit the environment it started with)."""
    path = tempfile.mkdtemp(prefix="flood-metrics-")
    os.environ[ENV] = path
    os.environ.pop("prometheus_multiproc_dir", None)
    return path


def disable() -> None:
    """No multiprocess dir inherited from the caller's environment: metrics stay off."""
    os.environ.pop(ENV, None)
    os.environ.pop("prometheus_multiproc_dir", None)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- what the children count -----------------------------------------------------------------
class Recorder:
    """The counting interface the roles call; this base does nothing (metrics off)."""

    def result(self, profile: str, bucket: str, result: Result) -> None:
        """Count what one pass over a file ended in: a completion or failure, or a retry."""
        if result.ended is not None:
            self.upload(profile, bucket, result.ended, result.size, result.seconds)
        elif result.step == Step.RETRY and result.reason:
            self.retry(profile, bucket, result.reason)

    def upload(
        self, profile: str, bucket: str, outcome: str, size: int | None, seconds: float | None
    ) -> None:
        """One passage ended: outcome 'success' or 'failure'."""

    def retry(self, profile: str, bucket: str, reason: str) -> None:
        """An upload attempt failed and a retry was scheduled."""

    def watcher_event(self) -> None:
        """One inotify event read."""

    def watcher_overflow(self) -> None:
        """The kernel's inotify queue overflowed (events lost; a rescan follows)."""

    def watcher_rescan(self, reason: str) -> None:
        """A scan of incoming/ ran."""


class PromRecorder(Recorder):
    """Counters and a histogram written to this process's files in the multiprocess dir."""

    def __init__(self) -> None:
        m = _children_metrics()
        self.files, self.bytes, self.duration, self.retries = m[:4]
        self.events, self.overflows, self.rescans = m[4:]

    def upload(
        self, profile: str, bucket: str, outcome: str, size: int | None, seconds: float | None
    ) -> None:
        self.files.labels(profile, bucket, outcome).inc()
        if size:
            self.bytes.labels(profile, bucket, outcome).inc(size)
        if seconds is not None and outcome == "success":
            self.duration.labels(profile).observe(seconds)

    def retry(self, profile: str, bucket: str, reason: str) -> None:
        self.retries.labels(profile, bucket, reason).inc()

    def watcher_event(self) -> None:
        self.events.inc()

    def watcher_overflow(self) -> None:
        self.overflows.inc()

    def watcher_rescan(self, reason: str) -> None:
        self.rescans.labels(reason).inc()


@cache
def _children_metrics() -> tuple[Any, ...]:
    from prometheus_client import Counter, Histogram

    return (
        Counter(
            "flood_files_uploaded",
            "Files whose upload ended, by outcome (success: completed/, failure: failed/)",
            ["profile", "bucket", "outcome"],
        ),
        Counter(
            "flood_uploaded_bytes",
            "Bytes of the files whose upload ended, by outcome",
            ["profile", "bucket", "outcome"],
        ),
        Histogram(
            "flood_upload_duration_seconds",
            "Time from the first byte sent to the verified object, per successful upload",
            ["profile"],
            buckets=DURATION_BUCKETS,
        ),
        Counter(
            "flood_retries",
            "Upload attempts that failed and were scheduled again, by reason",
            ["profile", "bucket", "reason"],
        ),
        Counter("flood_watcher_events", "inotify events read by the watcher"),
        Counter("flood_watcher_overflows", "inotify queue overflows (events lost, rescanned)"),
        Counter(
            "flood_watcher_rescans", "Scans of incoming/ by the watcher, by reason", ["reason"]
        ),
    )


def recorder() -> Recorder:
    """The recorder for this process: real when metrics are on, else one that does nothing."""
    return PromRecorder() if enabled() else Recorder()


# -- what the supervisor's own threads count --------------------------------------------------
class Housekeeping:
    """The counting interface of the supervisor's audit and janitor; this base does nothing.
    Each series is made at 0 when its bucket is first looked at (`*_buckets`), so that
    rate() and increase() see its first step."""

    def audit_buckets(self, buckets: Iterable[tuple[str, str]]) -> None:
        """The (profile, bucket)s the periodic audit may count."""

    def audited(
        self, profile: str, bucket: str, checked: int, missing: int, different: int
    ) -> None:
        """One audit's outcome for a bucket: objects compared, and of those missing or different."""

    def janitor_buckets(self, buckets: Iterable[tuple[str, str]]) -> None:
        """The (profile, bucket)s the janitor looks at."""

    def orphans(self, profile: str, bucket: str, aborted: int, failed: int) -> None:
        """One janitor round's aborts in a bucket: done, and failed (tried again next round)."""


class PromHousekeeping(Housekeeping):
    """The audit's and the janitor's counters, in the supervisor's file of the multiprocess dir."""

    def __init__(self) -> None:
        self.checked, self.missing, self.different, self.aborted, self.failed = (
            _housekeeping_metrics()
        )

    def audit_buckets(self, buckets: Iterable[tuple[str, str]]) -> None:
        for profile, bucket in buckets:
            for counter in (self.checked, self.missing, self.different):
                counter.labels(profile, bucket)

    def audited(
        self, profile: str, bucket: str, checked: int, missing: int, different: int
    ) -> None:
        self.checked.labels(profile, bucket).inc(checked)
        self.missing.labels(profile, bucket).inc(missing)
        self.different.labels(profile, bucket).inc(different)

    def janitor_buckets(self, buckets: Iterable[tuple[str, str]]) -> None:
        for profile, bucket in buckets:
            self.aborted.labels(profile, bucket)
            self.failed.labels(profile, bucket)

    def orphans(self, profile: str, bucket: str, aborted: int, failed: int) -> None:
        self.aborted.labels(profile, bucket).inc(aborted)
        self.failed.labels(profile, bucket).inc(failed)


@cache
def _housekeeping_metrics() -> tuple[Any, ...]:
    from prometheus_client import Counter

    labels = ["profile", "bucket"]
    return (
        Counter(
            "flood_audit_checked",
            "Completed objects the periodic audit HEADed and compared with their records",
            labels,
        ),
        Counter(
            "flood_audit_missing",
            "Completed objects the periodic audit found missing from their bucket",
            labels,
        ),
        Counter(
            "flood_audit_different",
            "Completed objects the periodic audit found of another size, ETag or checksum",
            labels,
        ),
        Counter(
            "flood_orphans_aborted",
            "Incomplete multipart uploads no record knows, aborted by the janitor",
            labels,
        ),
        Counter(
            "flood_orphan_aborts_failed",
            "Aborts of orphan multipart uploads that failed (tried again next round)",
            labels,
        ),
    )


def housekeeping() -> Housekeeping:
    """The supervisor threads' recorder: real when metrics are on, else one that does nothing."""
    return PromHousekeeping() if enabled() else Housekeeping()


# -- what the supervisor serves --------------------------------------------------------------
class StateCollector:
    """Gauges computed when scraped: files in each state, oldest pending age, paused profiles
    and buckets, orphan multipart uploads the janitor last found, and the supervisor's own
    counts (child processes restarted)."""

    def __init__(
        self,
        snapshot: Callable[[], Any],
        restarts: Callable[[], Mapping[str, int]],
        orphans: Callable[[], Mapping[tuple[str, str], int]] = dict,
    ):
        self._snapshot = snapshot
        self._restarts = restarts
        self._orphans = orphans
        self._lock = threading.Lock()
        self._cached: tuple[float, Any] | None = None

    def describe(self) -> list[Any]:
        return []  # computed per scrape: do not collect at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            snap, up = self._current(), 1
        except DatabaseUnreachable:  # PostgreSQL away: what the directories hold is not read
            snap, up = None, 0
        database = GaugeMetricFamily(
            "flood_database_up", "1 while the records database answers, 0 while it is away"
        )
        database.add_metric([], up)
        files = GaugeMetricFamily(
            "flood_files",
            "Files in each state now (processing: in "
            "flight; retry_wait: in processing/ waiting for a retry)",
            labels=["profile", "bucket", "state"],
        )
        oldest = GaugeMetricFamily(
            "flood_oldest_pending_age_seconds",
            "Age of the oldest file in incoming/ or processing/ (from its ctime)",
            labels=["profile", "bucket"],
        )
        paused = GaugeMetricFamily(
            "flood_paused",
            '1 for a paused profile (bucket="") or bucket',
            labels=["profile", "bucket", "reason"],
        )
        now = time.time()
        for b in snap.buckets.values() if snap is not None else ():
            for state, count in (
                ("incoming", b.incoming),
                ("processing", b.in_flight()),
                ("retry_wait", b.waiting_retry),
                ("failed", b.failed),
            ):
                files.add_metric([b.profile, b.bucket, state], count)
            if b.oldest_pending is not None:
                oldest.add_metric([b.profile, b.bucket], max(0.0, now - b.oldest_pending))
        for h in snap.holds if snap is not None else ():
            paused.add_metric([h["profile"], h["bucket"] or "", h["reason"]], 1)
        restarts = CounterMetricFamily(
            "flood_process_restarts",
            "Child processes started again by the supervisor, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(self._restarts().items()):
            restarts.add_metric([reason], count)
        orphans = GaugeMetricFamily(
            "flood_orphan_uploads",
            "Incomplete multipart uploads no record knows, found by the janitor's last round",
            labels=["profile", "bucket"],
        )
        for (profile, bucket), count in sorted(self._orphans().items()):
            orphans.add_metric([profile, bucket], count)
        yield from (database, files, oldest, paused, restarts, orphans)

    def _current(self) -> Any:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > SNAPSHOT_TTL:
                self._cached = (now, self._snapshot())
            return self._cached[1]


def serve(
    port: int,
    address: str,
    snapshot: Callable[[], Any],
    restarts: Callable[[], Mapping[str, int]],
    orphans: Callable[[], Mapping[tuple[str, str], int]] = dict,
) -> Any:
    """Serve /metrics on address:port from a thread: every process's counters (read from the
    multiprocess dir) and the supervisor's gauges. Returns the server (call shutdown())."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    registry.register(StateCollector(snapshot, restarts, orphans))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
