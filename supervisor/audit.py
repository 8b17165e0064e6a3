"""The periodic audit: a thread of the supervisor that, every --audit-interval, HEADs the
objects completed since its previous run began and logs what is missing or different."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from flood import metrics, records
from flood.audit import Audit, Discrepancy, Report, Unchecked
from flood.errors import DatabaseUnreachable
from flood.layout import Layout
from flood.settings import Settings
from flood.states import Finding


class PeriodicAudit(threading.Thread):
    """Each run covers [the previous run's start, this run's start); the first starts one
    interval before the supervisor did."""

    def __init__(self, settings: Settings, layout: Layout, log: Any) -> None:
        super().__init__(name="audit", daemon=True)
        self.settings = settings
        self.layout = layout
        self.log = log
        self.halted = threading.Event()
        self.since = records.utcnow() - dt.timedelta(seconds=settings.audit_interval)
        self.metrics: metrics.Housekeeping = metrics.Housekeeping()

    def halt(self) -> None:
        self.halted.set()

    def run(self) -> None:
        self.metrics = metrics.housekeeping()
        self.metrics.audit_buckets(
            (p, b) for p in sorted(self.settings.profiles) for b in self.layout.buckets_present(p)
        )
        while not self.halted.wait(self.settings.audit_interval):
            try:
                self.once()
            except DatabaseUnreachable:
                pass  # the records' outage is said once, by the supervisor's watch
            except Exception:
                self.log.exception("audit_crashed")
            finally:
                records.close_db()

    def once(self) -> Report:
        """One run: what completed since the last run began, up to now."""
        until = records.utcnow()
        audit = Audit(self.settings.profiles, stopped=self.halted.is_set)
        report = audit.run(since=self.since, until=until)
        self.tell(report, self.since)
        self.since = until
        return report

    def tell(self, report: Report, since: dt.datetime) -> None:
        for found in report.discrepancies:
            self.finding(found)
        groups: dict[tuple[str, str, str], list[Unchecked]] = {}
        for failure in report.unchecked:
            key = (failure.record.profile, failure.record.bucket, failure.reason)
            groups.setdefault(key, []).append(failure)
        for (profile, bucket, reason), failures in sorted(groups.items()):
            self.log.warning(
                "audit_unchecked",
                profile=profile,
                bucket=bucket,
                reason=reason,
                count=len(failures),
                error=failures[-1].error,
            )
        for (profile, bucket), tally in sorted(report.tallies.items()):
            self.metrics.audited(profile, bucket, tally.checked, tally.missing, tally.different)
        total = report.total()
        stopped = {"reason": "stopping: the rest is left"} if report.interrupted else {}
        self.log.info(
            "audit_finished",
            checked=total.checked,
            missing=total.missing,
            different=total.different,
            errors=total.errors,
            since=f"{since.isoformat(timespec='seconds')}Z",
            **stopped,
        )

    def finding(self, found: Discrepancy) -> None:
        record = found.record
        where = {
            "profile": record.profile,
            "bucket": record.bucket,
            "key": record.key,
            "record_id": record.id,
            "recorded": found.recorded.text(),
        }
        if found.finding == Finding.MISSING:
            self.log.warning("object_missing", **where)
            return
        assert found.found is not None
        self.log.warning(
            "object_different",
            **where,
            differs=[str(d) for d in found.differs],
            found=found.found.text(),
        )
