"""An uploader's view of the holds: whether its profile or a bucket is paused, a first look at
a bucket it has not checked yet, and pausing what an answer condemns."""

from __future__ import annotations

from typing import Any

from flood import records
from flood.errors import InvalidName
from flood.layout import check_bucket
from flood.s3 import MISSING, REJECTED
from flood.s3 import check_bucket as head_bucket
from flood.states import Reason

HOLDS_TTL = 1.0  # seconds a "not held" answer is trusted before the records are read again


class Holds:
    """Paused profiles and buckets, read from the records at most once a second."""

    def __init__(self, profile: str, client: Any, log: Any, checked: set[str]) -> None:
        self.profile = profile
        self.client = client
        self.log = log
        self.checked = set(checked)
        self.cached: dict[tuple[str, str], str] = {}
        self.read_at = float("-inf")
        self.released = False  # a hold of this profile was lifted since take_released()

    def held(self, bucket: str, now: float) -> bool:
        """True if the profile or bucket is paused (its files stay in incoming/)."""
        if now - self.read_at > HOLDS_TTL:
            self.refresh(now)
        if self.covers(bucket):
            # A cached "held" is read again: the rescan that follows a release must not be
            # skipped on a stale answer (only "not held" is cached, the common case).
            self.refresh(now)
            if self.covers(bucket):
                return True
        if bucket not in self.checked:
            return not self.check_new_bucket(bucket)
        return False

    def covers(self, bucket: str) -> bool:
        return (self.profile, "") in self.cached or (self.profile, bucket) in self.cached

    def waiting(self, bucket: str, now: float) -> bool:
        """For a file already claimed: whether its profile or bucket is on hold (no new
        bucket check; a file in processing/ has been through one)."""
        if now - self.read_at > HOLDS_TTL:
            self.refresh(now)
        return self.covers(bucket)

    def reason(self) -> str | None:
        """Why the profile is held, if it is."""
        return self.cached.get((self.profile, ""))

    def refresh(self, now: float) -> None:
        before = {key for key in self.cached if key[0] == self.profile}
        self.cached = records.holds()
        self.read_at = now
        if before - set(self.cached):
            self.released = True

    def take_released(self) -> bool:
        """True once after a hold of this profile (or of one of its buckets) was lifted."""
        released, self.released = self.released, False
        return released

    def check_new_bucket(self, bucket: str) -> bool:
        """A bucket directory seen for the first time: HeadBucket it before claiming files.

        Only a definite answer holds files back (missing bucket, rejected key). A server that
        cannot be reached now is no reason to leave files unclaimed: their uploads meet the
        same error and go through the retry schedule, on record."""
        try:
            check_bucket(bucket)
        except InvalidName:
            self.checked.add(bucket)  # its files fail one by one with the reason
            return True
        verdict = head_bucket(self.client, bucket)
        if verdict.status == REJECTED:
            self.pause("", verdict.detail, f"the server refused profile {self.profile}'s key")
            return False
        if verdict.detail == MISSING:
            self.pause(bucket, Reason.NO_SUCH_BUCKET, f"bucket {bucket} does not exist")
            return False
        self.checked.add(bucket)
        return True

    def pause(self, bucket: str, reason: str, detail: str) -> None:
        """Hold the profile (bucket '') or one bucket; logged once, when the hold is new."""
        if records.hold(self.profile, bucket, reason, detail):
            self.log.error(
                "profile_paused" if not bucket else "bucket_paused",
                profile=self.profile,
                bucket=bucket or None,
                reason=reason,
                error=detail,
            )
        self.cached[(self.profile, bucket)] = reason
