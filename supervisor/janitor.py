"""The orphan janitor: a thread of the supervisor that, at start and every --janitor-interval,
aborts the incomplete multipart uploads no record knows once they are older than
--abandon-multipart-after, in every bucket Flood writes to (its bucket directories)."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

from flood import metrics, orphans
from flood.errors import DatabaseUnreachable
from flood.layout import Layout
from flood.settings import Settings


class Janitor(threading.Thread):
    def __init__(
        self, settings: Settings, layout: Layout, log: Any, ask: Callable[..., Any]
    ) -> None:
        super().__init__(name="janitor", daemon=True)
        self.ask = ask  # Arbiter.ask: the listing and the aborts run in a child (boto3's)
        self.settings = settings
        self.layout = layout
        self.log = log
        self.halted = threading.Event()
        self.found: dict[tuple[str, str], int] = {}  # orphans per bucket in the last round
        self.metrics: metrics.Housekeeping = metrics.Housekeeping()

    def halt(self) -> None:
        self.halted.set()

    def run(self) -> None:
        self.metrics = metrics.housekeeping()
        while not self.halted.is_set():
            try:
                self.round()
            except DatabaseUnreachable:
                pass  # the records' outage is said once, by the supervisor's watch
            except Exception:
                self.log.exception("janitor_crashed")
            self.halted.wait(self.settings.janitor_interval)

    def round(self, now: dt.datetime | None = None) -> dict[tuple[str, str], orphans.Sweep]:
        """One pass over every bucket directory of every profile."""
        swept: dict[tuple[str, str], orphans.Sweep] = {}
        for profile in sorted(self.settings.profiles):
            buckets = sorted(self.layout.buckets_present(profile))
            if not buckets:
                continue
            self.metrics.janitor_buckets((profile, b) for b in buckets)
            if self.halted.is_set():
                return swept
            failed, answers = self.ask("orphans", self.settings, profile, buckets, now)
            if failed is not None:
                self.log.warning("orphan_list_failed", profile=profile, error=failed)
                continue
            for bucket, answer in answers.items():
                result = self.sweep(profile, bucket, answer, now)
                if result is not None:
                    swept[(profile, bucket)] = result
        self.found = {where: result.found for where, result in swept.items()}
        self.finished(swept)
        return swept

    def sweep(
        self, profile: str, bucket: str, result: orphans.Sweep | str, now: dt.datetime | None
    ) -> orphans.Sweep | None:
        """Log one bucket's sweep (done in the child), or why its listing failed."""
        if isinstance(result, str):
            self.log.warning("orphan_list_failed", profile=profile, bucket=bucket, error=result)
            return None
        now = now or dt.datetime.now(dt.UTC)
        for orphan in result.aborted:
            self.log.info("orphan_aborted", **_fields(profile, orphan, now))
        for orphan, error in result.failed:
            self.log.warning(
                "orphan_abort_failed",
                **_fields(profile, orphan, now),
                error=error,
                reason="tried again next round",
            )
        self.metrics.orphans(profile, bucket, len(result.aborted), len(result.failed))
        return result

    def finished(self, swept: dict[tuple[str, str], orphans.Sweep]) -> None:
        results = list(swept.values())
        self.log.info(
            "janitor_finished",
            orphans=sum(r.found for r in results),
            aborted=sum(len(r.aborted) for r in results),
            failing=sum(len(r.failed) for r in results),
            left_young=sum(len(r.young) for r in results),
            abandon_after=self.settings.abandon_multipart_after,
        )


def _fields(profile: str, orphan: orphans.Orphan, now: dt.datetime) -> dict[str, Any]:
    return {
        "profile": profile,
        "bucket": orphan.bucket,
        "key": orphan.key,
        "upload_id": orphan.upload_id,
        "initiated": orphan.initiated.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "age_seconds": round(orphan.age(now), 1),
    }
