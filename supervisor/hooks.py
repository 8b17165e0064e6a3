"""Hooks, a thread of the supervisor: the commands of [hooks] run for each file that completed
or failed, its receipt as JSON on stdin, at least once (their state is in the records, so a
restart goes on), retried with backoff, never holding any upload."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flood import crashpoints, logs, records, retry
from flood.config import Hooks
from flood.errors import DatabaseUnreachable
from flood.records import Due
from flood.settings import Settings
from flood.snapshot import utc_text

POLL = 0.5  # seconds between looks for deliveries that are due
AT_ONCE = 4  # hooks running at the same time (each is a process)
OUTPUT_KEPT = 2000  # characters of a failing hook's stderr kept in its error
# Secrets the daemon may have in its environment that a hook has no business with.
WITHHELD = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "PGPASSWORD")
# The supervisor's own variables for its children (crash points, log format): not the hook's.
INTERNAL = (crashpoints.SUPERVISOR_PID_ENV, logs.FORMAT_ENV, logs.SUCCESSES_ENV)


def receipt(due: Due) -> dict[str, Any]:
    """What a hook gets on stdin (the README lists these fields)."""
    return {
        "event": due.event,
        "profile": due.profile,
        "bucket": due.bucket,
        "key": due.key,
        "size": due.size,
        "etag": due.etag,
        "version_id": due.version_id,
        "checksum": due.checksum,
        "options": json.loads(due.options) if due.options else {},
        "reason": due.reason,
        "error": due.error,
        "created": utc_text(due.created),
        "ended": utc_text(due.ended),
        "record_id": due.record_id,
        "delivery": due.attempts + 1,
    }


class HookRunner(threading.Thread):
    """Runs due deliveries in a small pool of threads, each a process of the hook's command."""

    def __init__(self, settings: Settings, log: Any) -> None:
        super().__init__(name="hooks", daemon=True)
        self.settings = settings
        self.log = log
        self.halted = threading.Event()
        self.running: set[int] = set()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(AT_ONCE, thread_name_prefix="hook")

    @property
    def hooks(self) -> Hooks:
        return self.settings.config.hooks

    def halt(self) -> None:
        self.halted.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        while not self.halted.wait(POLL):
            try:
                self.start_due()
            except DatabaseUnreachable:
                pass  # the records' outage is said once, by the supervisor's watch
            except Exception:
                self.log.exception("hooks_crashed")

    def start_due(self) -> None:
        for due in records.due_deliveries(records.utcnow()):
            with self.lock:
                if due.id in self.running:
                    continue
                self.running.add(due.id)
            self.pool.submit(self.deliver, due)

    def deliver(self, due: Due) -> None:
        try:
            self.run_one(due)
        except Exception:
            self.log.exception("hook_crashed", delivery=due.id)
        finally:
            with self.lock:
                self.running.discard(due.id)
            records.close_db()  # this thread's connection; the next delivery opens its own

    def run_one(self, due: Due) -> None:
        if not records.delivery_current(due.id, due.attempts):
            return  # read while its previous attempt was ending: the poll finds it anew
        command = self.hooks.on_complete if due.event == "complete" else self.hooks.on_failure
        if not command:
            records.delivered(due.id)  # the hook was taken out of the config since
            return
        started = time.monotonic()
        error = self.call(command, due)
        fields = dict(
            profile=due.profile,
            bucket=due.bucket,
            key=due.key,
            hook=due.event,
            record_id=due.record_id,
            attempt=due.attempts + 1,
            duration=round(time.monotonic() - started, 3),
        )
        if error is None:
            records.delivered(due.id)
            self.log.info("hook_ran", **fields)
            return
        following = due.attempts + 1
        if following > self.hooks.retries:
            records.delivery_failed(due.id, error, None)
            self.log.error("hook_failed", error=error, **fields)
            return
        wait = retry.delay(following, self.settings.retry_base, self.settings.retry_max_delay)
        at = records.utcnow() + dt.timedelta(seconds=wait)
        records.delivery_failed(due.id, error, at)
        self.log.warning("hook_retry_scheduled", error=error, delay=round(wait, 3), **fields)

    def call(self, command: tuple[str, ...], due: Due) -> str | None:
        """Run the hook; None when it exited 0 within the timeout, else why not."""
        env = {k: v for k, v in os.environ.items() if k not in WITHHELD and k not in INTERNAL}
        env.update(
            FLOOD_EVENT=due.event,
            FLOOD_PROFILE=due.profile,
            FLOOD_BUCKET=due.bucket,
            FLOOD_KEY=due.key,
            FLOOD_SIZE="" if due.size is None else str(due.size),
            FLOOD_ETAG=due.etag or "",
        )
        try:
            done = subprocess.run(
                list(command),
                input=json.dumps(receipt(due)).encode(),
                env=env,
                capture_output=True,
                timeout=self.hooks.timeout,
                cwd="/",
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"timed out after {self.hooks.timeout:g} s"
        except OSError as exc:
            return f"cannot run {command[0]}: {exc.strerror}"
        if done.returncode == 0:
            return None
        said = done.stderr.decode("utf-8", "replace").strip()[-OUTPUT_KEPT:]
        return f"exit status {done.returncode}" + (f": {said}" if said else "")
