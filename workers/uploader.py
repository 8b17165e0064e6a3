"""The uploader role: takes jobs from its own queue and retries that come due, a batch at a time."""

from __future__ import annotations

import heapq
import os
import queue
from multiprocessing.connection import Connection as Pipe
from typing import Any, cast

from flood import logs, metrics, records
from flood.bandwidth import Bandwidth
from flood.connection import Connection
from flood.jobs import SHUTDOWN, FileRef, Job
from flood.notify import Heartbeat
from flood.passage import Result
from flood.s3 import LazyClient, client_for
from flood.settings import Settings
from flood.states import State, Step
from flood.transfer import sender_for
from flood.upload import BATCH, Uploads
from flood.verdict import describe
from flood.workers.role import serve

BUSY_WAIT = 0.5  # the same path is still in processing/: look again this much later
ERROR_WAIT = 5.0  # an unexpected error: leave the file where it is, look again later
MAX_CRASHES = 3  # ...this many times for one file, then it goes to failed/
IDLE_WAIT = 0.2
# While files wait for a retry, the records are asked this often whether any was made due
# sooner (flood-requeue --waiting): one small query, only while something waits.
DUE_CHECK = 1.0


class UploaderRole:
    """One uploader process of one profile. Files waiting for a retry sit in a heap keyed by
    their due time, so they never hold the uploader while other files flow."""

    def __init__(
        self,
        settings: Settings,
        profile: str,
        slot: int,
        jobs: Any,
        checked_buckets: set[str],
        conn: Pipe | None = None,
        bandwidth: Bandwidth | None = None,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.slot = slot
        self.jobs = jobs
        self.checked_buckets = checked_buckets
        self.alive = True
        self.waiting: list[tuple[float, int, Job]] = []
        self.waiting_keys: set[tuple[str, str]] = set()
        self.counter = 0
        self.crashes: dict[tuple[str, str], int] = {}
        self.log: Any = None
        self.uploads: Uploads | None = None
        self.metrics = metrics.Recorder()
        self.heartbeat = Heartbeat(conn)
        self.bandwidth = bandwidth
        self.next_due_check = 0.0

    def setup(self) -> None:
        self.log = logs.configure(
            "uploader", self.settings.log_level, self.settings.log_file, self.settings.secrets()
        )
        records.open_db(
            self.settings.db_path, self.settings.node, checked=True
        )  # by the supervisor
        # PostgreSQL away: this uploader waits for it inside the records call it was making
        # (a claim not yet recorded is not uploaded, a proven upload moves once recorded),
        # beating its heart meanwhile; the supervisor says it once, as an error.
        records.watch_outages(
            records.Outages(
                down=lambda error: self.log.warning("database_waiting", error=error),
                up=lambda seconds: self.log.info("database_back", seconds=round(seconds, 1)),
                wait=True,
                tick=self.heartbeat.beat,
                alive=lambda: self.alive,
            )
        )
        connection = Connection(self.settings.profiles[self.profile], self.settings.profiles)
        account = self.settings.profiles[self.profile]
        in_flight = account.parts_in_flight or self.settings.parts_in_flight
        pool = max(10, in_flight + 2)
        client = LazyClient(lambda: self.boto3_client(connection, pool))
        self.metrics = metrics.recorder()
        if self.bandwidth is not None:
            self.bandwidth.tick = self.heartbeat.beat  # waiting for the limit is no stall
        self.uploads = Uploads(
            self.settings,
            self.profile,
            client,
            self.log,
            sender=sender_for(self.settings, connection, client, self.bandwidth),
            checked_buckets=self.checked_buckets,
        )
        self.log.info("uploader_started", profile=self.profile, slot=self.slot)

    def boto3_client(self, connection: Connection, pool: int) -> Any:
        """The boto3 client, made at its first use (LazyClient)."""
        client = client_for(connection, pool=pool)
        # Every S3 call that returns is progress, even within one long multipart upload.
        for event in ("after-call.s3", "after-call-error.s3"):
            client.meta.events.register(event, self.heartbeat.beat)
        if self.bandwidth is not None:
            self.bandwidth.attach(client)
        return client

    def stop(self) -> None:
        self.alive = False

    def teardown(self) -> None:
        self.log.info(
            "uploader_stopped", profile=self.profile, slot=self.slot, waiting=len(self.waiting)
        )
        if self.uploads is not None:
            self.uploads.close()
        records.close_db()

    def loop(self, now: float) -> None:
        """One pass: the next job and whatever else is queued already, up to a batch."""
        self.heartbeat.beat()
        if self.waiting and now >= self.next_due_check:
            self.next_due_check = now + DUE_CHECK
            self.take_up_made_due(now)
        job = self.next_job(now)
        if job is None:
            return
        batch = self.gather(job)
        assert self.uploads is not None
        try:
            outcomes = self.uploads.run(batch, now)
        except Exception as exc:  # the batch's own boundary: every job of it crashed
            outcomes = [exc] * len(batch)
        for one, outcome in zip(batch, outcomes, strict=True):
            self.handle(one, outcome, now)
        if self.uploads.holds.take_released():
            self.due_now(now)

    def due_now(self, now: float) -> None:
        """A hold was lifted: the files that waited for it (and every retry) are due now."""
        waiting, self.waiting = self.waiting, []
        self.waiting_keys.clear()
        for _, _, job in waiting:
            self.push(now, job)

    def take_up_made_due(self, now: float) -> None:
        """Retries the records say are due now though this process has them for later
        (flood-requeue --waiting wrote so, or a lifted hold: records.release): due now here too,
        also when no batch runs to notice a lift."""
        later = [w for w in self.waiting if w[0] > now]
        if not later:
            return
        due = records.due_keys(self.profile)
        if not due:
            return
        changed = False
        for index, (at, counter, job) in enumerate(self.waiting):
            if at > now and (job.bucket, records.text(job.key)) in due:
                self.waiting[index] = (now, counter, job)
                changed = True
        if changed:
            heapq.heapify(self.waiting)

    def gather(self, first: Job) -> list[Job]:
        """The first job and whatever other jobs are queued already (up to a batch). A file in
        processing/ is taken up once per batch (a rescan may have sent it twice)."""
        batch = [first]
        resumed = {(first.bucket, first.key)} if first.state == State.PROCESSING else set()
        while len(batch) < BATCH:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is SHUTDOWN:
                self.alive = False
                break
            if job.state == State.PROCESSING:
                if (job.bucket, job.key) in resumed or self.known_waiting(job):
                    continue
                resumed.add((job.bucket, job.key))
            batch.append(job)
        return batch

    def next_job(self, now: float) -> Job | None:
        """A retry that has come due, else the next job from the queue (waiting briefly)."""
        if self.waiting and self.waiting[0][0] <= now:
            _, _, job = heapq.heappop(self.waiting)
            self.waiting_keys.discard((job.bucket, job.key))
            return job
        timeout = IDLE_WAIT
        if self.waiting:
            timeout = max(0.0, min(timeout, self.waiting[0][0] - now))
        try:
            job = self.jobs.get(timeout=timeout)
        except queue.Empty:
            return None
        if job is SHUTDOWN:
            self.alive = False
            return None
        if self.known_waiting(job):
            return None
        return cast(Job, job)  # NamedTuples cross the queue as themselves: no copy

    def known_waiting(self, job: Job) -> bool:
        """A rescan found a file in processing/ that this process already waits on."""
        return job.state == State.PROCESSING and (job.bucket, job.key) in self.waiting_keys

    def handle(self, job: Job, outcome: Result | Exception, now: float) -> None:
        if isinstance(outcome, Exception):
            self.log.error(
                "upload_crashed",
                profile=self.profile,
                bucket=job.bucket,
                key=job.key,
                exc_info=outcome,
            )
            self.crashed(job, outcome, now)
            return
        self.crashes.pop((job.bucket, job.key), None)
        self.metrics.result(self.profile, job.bucket, outcome)
        self.schedule(job, outcome, now)

    def crashed(self, job: Job, exc: Exception, now: float) -> None:
        """Look again later wherever the file now is (it may have been claimed already); a
        file whose handling keeps failing goes to failed/ (internal_error), never loops."""
        assert self.uploads is not None
        ref = FileRef(self.profile, job.bucket, job.key)
        count = self.crashes.get((job.bucket, job.key), 0) + 1
        self.crashes[(job.bucket, job.key)] = count
        claimed = os.path.lexists(self.uploads.moves.layout.path(State.PROCESSING, ref))
        if claimed and count >= MAX_CRASHES:
            try:
                self.uploads.give_up(ref, describe(exc))
                self.crashes.pop((job.bucket, job.key), None)
                return
            except Exception:
                self.log.exception(
                    "give_up_failed", profile=self.profile, bucket=job.bucket, key=job.key
                )
        retry_in = ERROR_WAIT * 2 ** min(count - 1, 6)
        state = State.PROCESSING if claimed else job.state
        self.push(now + retry_in, Job(state, job.bucket, job.key))

    def schedule(self, job: Job, result: Result, now: float) -> None:
        if result.step == Step.BUSY:
            self.push(now + BUSY_WAIT, job)
        elif result.step in (Step.RETRY, Step.CHANGED):
            self.push(result.due, Job(State.PROCESSING, job.bucket, job.key))
        elif result.step == Step.SKIPPED:
            self.log.debug("job_skipped", profile=self.profile, bucket=job.bucket, key=job.key)

    def push(self, due: float, job: Job) -> None:
        self.counter += 1
        heapq.heappush(self.waiting, (due, self.counter, job))
        if job.state == State.PROCESSING:
            self.waiting_keys.add((job.bucket, job.key))


def main(
    settings: Settings,
    profile: str,
    slot: int,
    jobs: Any,
    checked_buckets: set[str],
    bandwidth: Bandwidth | None,
    conn: Pipe,
    supervisor_pid: int,
) -> None:
    """Process entry point (started by the supervisor's arbiter)."""
    role = UploaderRole(settings, profile, slot, jobs, checked_buckets, conn, bandwidth)
    serve(role, conn, supervisor_pid)
