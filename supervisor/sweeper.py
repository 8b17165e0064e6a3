"""The spool's lifecycle, a thread of the supervisor: at start and then every sweep_interval it
removes what completed/ need not keep (on_success = "delete", keep_completed) and sends
transient failures back to incoming/ (requeue_failed_after, at most requeue_max times).
Nothing in failed/ is ever deleted."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from typing import Any

from flood import records
from flood.config import Lifecycle
from flood.errors import DatabaseUnreachable
from flood.layout import Layout, shown
from flood.requeue import candidates, requeue
from flood.settings import Settings
from flood.states import State
from flood.verdict import transient_reason


class Sweeper(threading.Thread):
    """Sweeps at start, then every interval (the shortest any bucket asks for)."""

    def __init__(self, settings: Settings, layout: Layout, log: Any) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.settings = settings
        self.layout = layout
        self.log = log
        self.halted = threading.Event()

    @property
    def wanted(self) -> bool:
        """Whether any bucket's lifecycle asks for a sweep at all."""
        conf = self.settings.config
        return any(_acts(c) for c in (conf.lifecycle, *conf.bucket_lifecycle.values()))

    def interval(self) -> float:
        conf = self.settings.config
        return min(c.sweep_interval for c in (conf.lifecycle, *conf.bucket_lifecycle.values()))

    def halt(self) -> None:
        self.halted.set()

    def run(self) -> None:
        while not self.halted.is_set():
            try:
                if self.wanted:  # a reload may turn the lifecycle on or off
                    self.sweep(time.time())
            except DatabaseUnreachable:
                pass  # the records' outage is said once, by the supervisor's watch
            except Exception:
                self.log.exception("sweep_crashed")
            self.halted.wait(self.interval())

    def sweep(self, now: float) -> None:
        removed = self.sweep_completed(now)
        requeued = self.sweep_failed(now)
        if removed or requeued:
            self.log.info("sweep_finished", removed=removed, requeued=requeued)

    # -- completed/ -----------------------------------------------------------------------
    def sweep_completed(self, now: float) -> int:
        removed = 0
        for path in self.layout.walk_files(State.COMPLETED):
            ref = self.layout.parse(State.COMPLETED, path)
            if ref is None:
                continue
            rules = self.settings.config.lifecycle_of(ref.profile, ref.bucket)
            reason = _why_remove(rules, path, now)
            if reason is None:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            record_id = records.completed_id(ref)
            where = f"{ref.profile}/{ref.bucket}/{ref.key}"
            records.record_removed(where, reason, record_id)
            self.log.info(
                "file_removed",
                profile=ref.profile,
                bucket=ref.bucket,
                key=shown(ref.key),
                path=shown(path),
                reason=reason,
                record_id=record_id,
            )
            removed += 1
        return removed

    # -- failed/ --------------------------------------------------------------------------
    def sweep_failed(self, now: float) -> int:
        conf = self.settings.config
        if not any(
            c.requeue_failed_after is not None
            for c in (conf.lifecycle, *conf.bucket_lifecycle.values())
        ):
            return 0
        requeued = 0
        for cand in candidates(self.layout):
            rules = conf.lifecycle_of(cand.ref.profile, cand.ref.bucket)
            if rules.requeue_failed_after is None or cand.is_backup:
                continue
            failed = records.newest_failure(cand.ref)
            if failed is None or not transient_reason(failed.reason) or failed.at is None:
                continue
            age = now - failed.at.replace(tzinfo=dt.UTC).timestamp()
            if age < rules.requeue_failed_after or failed.requeues >= rules.requeue_max:
                continue
            problem = requeue(self.layout, cand)
            if problem is None:
                requeued += 1
                self.log.info(
                    "file_requeued",
                    profile=cand.ref.profile,
                    bucket=cand.ref.bucket,
                    key=shown(cand.ref.key),
                    reason=failed.reason,
                    requeues=failed.requeues + 1,
                    record_id=failed.id,
                )
        return requeued


def _acts(rules: Lifecycle) -> bool:
    return (
        rules.on_success == "delete"
        or rules.keep_completed is not None
        or rules.requeue_failed_after is not None
    )


def _why_remove(rules: Lifecycle, path: str, now: float) -> str | None:
    """Why a file in completed/ goes: its bucket deletes on success (a crash came between the
    record and the unlink), or it is older than keep_completed (by when it was moved there)."""
    if rules.on_success == "delete":
        return "on_success"
    if rules.keep_completed is None:
        return None
    try:
        moved = os.lstat(path).st_ctime
    except FileNotFoundError:
        return None
    return "keep_completed" if now - moved >= rules.keep_completed else None
