"""How a passage ends: completed (its record, then its move), failed with a reason, or a retry
scheduled; and the pause of a profile or bucket that an error condemns."""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any

from flood import crashpoints, records, retry
from flood.holds import Holds
from flood.jobs import FileRef
from flood.moves import Moves, split
from flood.passage import Passage, Result
from flood.records import Completion
from flood.settings import Settings
from flood.states import Outcome, Reason, State, Step
from flood.verdict import Kind, Scope, classify, describe

MOVE_RETRY = 5.0  # seconds before a file whose final move failed is tried again
HELD_WAIT = 60.0  # a file that met its profile on hold looks again this late at the latest
# An outage: this many transient failures of the profile's server (refused, reset, timed out,
# 5xx, 429), from at least two keys, with no answer between them, hold the profile.
OUTAGE_FAILURES = 3
OUTAGE_KEYS = 2
_ENDPOINT_KINDS = (Kind.NETWORK, Kind.SERVER)


class Endings:
    """Records first, then moves: a crash between the two leaves a file whose directory start-up
    repair reads as the truth, never a record that claims more than the directories show."""

    def __init__(
        self, settings: Settings, profile: str, moves: Moves, holds: Holds, log: Any
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.moves = moves
        self.holds = holds
        self.log = log

    def complete_all(self, proven: list[Passage]) -> list[Result | Exception]:
        """Proven uploads: their records first (one transaction), then each file's move to
        completed/ and its result (an Exception: its move crashed; the others still move)."""
        records.record_completions(
            [
                Completion(
                    p.record_id,
                    p.size or 0,
                    p.etag,
                    p.attempt,
                    p.checksum,
                    p.options.to_json(),
                    p.version_id,
                )
                for p in proven
            ],
            profile=self.profile,
            deliver=bool(self.settings.config.hooks.on_complete),
        )
        crashpoints.point("after_record")
        results: list[Result | Exception] = []
        for p in proven:
            try:
                results.append(self.moved_to_completed(p))
            except Exception as exc:  # the per-file boundary
                results.append(exc)
        return results

    def moved_to_completed(self, p: Passage) -> Result:
        inode = p.before.st_ino if p.before is not None else None
        if not self.finish_or_wait(State.COMPLETED, p, inode):
            return Result(Step.RETRY, time.time() + MOVE_RETRY)
        crashpoints.point("after_move_completed")
        self.remove_if_asked(p)
        self.log.info(
            "upload_succeeded",
            profile=p.ref.profile,
            bucket=p.ref.bucket,
            key=p.ref.key,
            path=self.moves.layout.path(State.COMPLETED, p.ref),
            size=p.size,
            etag=p.etag,
            duration=p.seconds,
            attempt=p.attempt,
            record_id=p.record_id,
        )
        return Result(Step.DONE, ended=Outcome.SUCCESS, size=p.size, seconds=p.seconds)

    def remove_if_asked(self, p: Passage) -> None:
        """lifecycle on_success = "delete": the completed record is in, the file goes. A crash
        before this leaves it in completed/, which the next sweep removes."""
        config = self.settings.config
        if config.lifecycle_of(p.ref.profile, p.ref.bucket).on_success != "delete":
            return
        parts, name = split(p.ref)
        try:
            os.unlink(name, dir_fd=self.moves.dir(State.COMPLETED, parts))
        except FileNotFoundError:
            return
        shown = f"{p.ref.profile}/{p.ref.bucket}/{p.ref.key}"
        records.record_removed(shown, "on_success", p.record_id)
        self.log.info(
            "file_removed",
            profile=p.ref.profile,
            bucket=p.ref.bucket,
            key=p.ref.key,
            reason="on_success",
            record_id=p.record_id,
        )

    def fail(self, p: Passage, reason: str, error: str) -> Result:
        deliver = bool(self.settings.config.hooks.on_failure)
        records.record_failed(p.record_id, reason, error, p.attempt, deliver=deliver)
        crashpoints.point("after_fail_record")
        if not self.finish_or_wait(State.FAILED, p):
            return Result(Step.RETRY, time.time() + MOVE_RETRY)
        crashpoints.point("after_move_failed")
        self.log.error(
            "upload_failed",
            profile=p.ref.profile,
            bucket=p.ref.bucket,
            key=p.ref.key,
            path=self.moves.layout.path(State.FAILED, p.ref),
            reason=reason,
            error=error,
            attempt=p.attempt,
            record_id=p.record_id,
        )
        return Result(Step.DONE, ended=Outcome.FAILURE, size=p.size, reason=reason)

    def failed_attempt(self, p: Passage, exc: BaseException, now: float) -> Result:
        """An attempt failed: fail now (pausing the profile or bucket the error condemns), or
        schedule the next retry, or fail once the retries are spent."""
        verdict = classify(exc)
        error = describe(exc)
        if verdict.transient and verdict.scope == Scope.PROFILE:
            # The environment's fault (a certificate that does not verify): the profile waits
            # and so does the file, its retries unspent.
            self.holds.pause("", verdict.reason, error)
            return self.held(p, error, now, spent=False)
        if not verdict.transient:
            if verdict.scope == Scope.PROFILE:
                self.holds.pause(
                    "", verdict.reason, f"the server refused profile {self.profile}'s key"
                )
            elif verdict.scope == Scope.BUCKET:
                self.holds.pause(
                    p.ref.bucket, verdict.reason, f"bucket {p.ref.bucket} does not exist"
                )
            return self.fail(p, verdict.reason, error)
        outage = verdict.kind in _ENDPOINT_KINDS
        if outage:
            failing = records.endpoint_failed(self.profile, p.ref.key)
            if failing.failures >= OUTAGE_FAILURES and failing.keys >= OUTAGE_KEYS:
                self.holds.pause("", Reason.UNREACHABLE, error)
        following = p.attempt + 1
        if following > self.settings.max_retries:
            if outage and not records.answered_since_first_failure(self.profile, p.record_id):
                # Its retries are spent, but the server has answered nothing since its first
                # failure: an outage, not this file's fault. The profile waits, and the file;
                # this last attempt is the outage's, not counted: it comes back as the same
                # retry, so no file ever gets more than --max-retries.
                self.holds.pause("", Reason.UNREACHABLE, error)
                return self.held(p, error, now, spent=False)
            return self.fail(p, verdict.reason, error)
        wait = retry.delay(following, self.settings.retry_base, self.settings.retry_max_delay)
        due = now + wait
        records.record_retry_scheduled(p.record_id, following, _utc(due), error, p.attempt)
        crashpoints.point("after_retry_record")
        self.log.warning(
            "upload_retry_scheduled",
            profile=p.ref.profile,
            bucket=p.ref.bucket,
            key=p.ref.key,
            reason=verdict.reason,
            error=error,
            attempt=p.attempt,
            next_attempt=following,
            delay=round(wait, 3),
            record_id=p.record_id,
        )
        return Result(Step.RETRY, due, reason=verdict.reason)

    def held(self, p: Passage, error: str, now: float, spent: bool) -> Result:
        """The file waits for its profile's hold to be lifted (the uploader takes it up again
        when it is). `spent`: the failed attempt was one of its retries (its row is written
        and it comes back as the next); else it comes back as the same attempt."""
        due = now + HELD_WAIT
        failed, following = (p.attempt, p.attempt + 1) if spent else (None, p.attempt)
        records.record_held(p.record_id, _utc(due), error, failed, following)
        self.log.warning(
            "upload_held",
            profile=p.ref.profile,
            bucket=p.ref.bucket,
            key=p.ref.key,
            reason=self.holds.reason() or "held",
            error=error,
            attempt=p.attempt,
            record_id=p.record_id,
        )
        return Result(Step.RETRY, due)

    def vanished(self, p: Passage) -> Result:
        """The claimed file is gone (deleted behind Flood's back): its passage ends failed."""
        self.log.warning(
            "file_vanished",
            profile=p.ref.profile,
            bucket=p.ref.bucket,
            key=p.ref.key,
            path=self.moves.layout.path(State.PROCESSING, p.ref),
            record_id=p.record_id,
        )
        records.set_state(p.record_id, State.FAILED, Reason.VANISHED)
        return Result(Step.SKIPPED)

    def finish_or_wait(self, state: State, p: Passage, inode: int | None = None) -> bool:
        """Move the file; if the move fails (disk full, say) it stays in processing/ and so
        does its record, so the next pass continues this passage instead of starting one."""
        try:
            self.moves.finish(state, p.ref, inode)
            return True
        except OSError as exc:
            records.set_state(p.record_id, State.PROCESSING)
            self.log.error(
                "move_failed",
                profile=p.ref.profile,
                bucket=p.ref.bucket,
                key=p.ref.key,
                path=self.moves.layout.path(State.PROCESSING, p.ref),
                reason=state,
                error=describe(exc),
                record_id=p.record_id,
            )
            return False

    def give_up(self, ref: FileRef, error: str) -> None:
        """A file whose handling keeps raising: failed/ with reason internal_error."""
        records.fail_open_passage(ref, Reason.INTERNAL_ERROR, error)
        try:
            self.moves.finish(State.FAILED, ref)
        finally:
            self.moves.end_pass()
        self.log.error(
            "upload_failed",
            profile=ref.profile,
            bucket=ref.bucket,
            key=ref.key,
            path=self.moves.layout.path(State.FAILED, ref),
            reason=Reason.INTERNAL_ERROR,
            error=error,
        )


def _utc(epoch: float) -> dt.datetime:
    """Epoch seconds as the records' naive UTC."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).replace(tzinfo=None)
