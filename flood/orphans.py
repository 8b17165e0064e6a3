"""Orphans: incomplete multipart uploads in a bucket that no record of Flood's knows, found
(listed page by page), judged by their age, and aborted. No logging here: callers say what
happened (the supervisor's janitor, flood-doctor)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from flood import records
from flood.verdict import Kind, classify, describe

PAGE = 1000  # uploads per ListMultipartUploads answer (S3's own maximum)


@dataclass(frozen=True)
class Orphan:
    """One incomplete multipart upload on the server."""

    bucket: str
    key: str
    upload_id: str
    initiated: dt.datetime  # aware, the server's clock

    def age(self, now: dt.datetime) -> float:
        """Seconds since it was initiated (`now` aware)."""
        return (now - self.initiated).total_seconds()


def listed(client: Any, bucket: str, page: int = PAGE) -> Iterator[Orphan]:
    """Every incomplete multipart upload of the bucket, following KeyMarker/UploadIdMarker.
    A server that answers only NextUploadIdMarker (SeaweedFS) is followed by that alone."""
    markers: dict[str, str] = {}
    while True:
        answer = client.list_multipart_uploads(Bucket=bucket, MaxUploads=page, **markers)
        for upload in answer.get("Uploads", []):
            yield Orphan(bucket, upload["Key"], upload["UploadId"], _aware(upload["Initiated"]))
        following = {
            name: str(answer[f"Next{name}"])
            for name in ("KeyMarker", "UploadIdMarker")
            if answer.get(f"Next{name}")
        }
        if not answer.get("IsTruncated") or not following or following == markers:
            return  # the last page (or a server that gives no way on: never loop)
        markers = following


def find(
    client: Any,
    bucket: str,
    known: Callable[[str], set[str]] = records.upload_ids,
    page: int = PAGE,
) -> list[Orphan]:
    """The bucket's incomplete uploads that no record knows, oldest first. The records are read
    after the listing: an upload Flood had started before the listing is on record by then."""
    found = list(listed(client, bucket, page))
    ours = known(bucket)
    return sorted((o for o in found if o.upload_id not in ours), key=lambda o: o.initiated)


@dataclass
class Sweep:
    """One bucket's round: orphans aborted, those whose abort failed (with why), and those
    left because they are younger than the setting."""

    aborted: list[Orphan] = field(default_factory=list)
    failed: list[tuple[Orphan, str]] = field(default_factory=list)
    young: list[Orphan] = field(default_factory=list)

    @property
    def found(self) -> int:
        return len(self.aborted) + len(self.failed) + len(self.young)


def sweep(
    client: Any,
    bucket: str,
    older_than: float,
    now: dt.datetime | None = None,
    known: Callable[[str], set[str]] = records.upload_ids,
    page: int = PAGE,
) -> Sweep:
    """Abort the bucket's orphans initiated more than `older_than` seconds before `now`. An
    abort that fails is left for the next round; one already gone counts as aborted. A
    listing that fails raises (ClientError, BotoCoreError)."""
    now = now or dt.datetime.now(dt.UTC)
    result = Sweep()
    for orphan in find(client, bucket, known, page):
        if orphan.age(now) <= older_than:
            result.young.append(orphan)
            continue
        error = abort(client, orphan)
        if error is None:
            result.aborted.append(orphan)
        else:
            result.failed.append((orphan, error))
    return result


def abort(client: Any, orphan: Orphan) -> str | None:
    """Abort one upload: None once it is gone (aborted now, or already), else why not."""
    try:
        client.abort_multipart_upload(
            Bucket=orphan.bucket, Key=orphan.key, UploadId=orphan.upload_id
        )
    except (ClientError, BotoCoreError) as exc:
        if classify(exc, "AbortMultipartUpload").kind == Kind.MISSING_OBJECT:
            return None  # NoSuchUpload: completed or aborted meanwhile
        return describe(exc)
    return None


def _aware(value: Any) -> dt.datetime:
    """An upload's Initiated as an aware datetime (botocore parses it; naive is UTC)."""
    when = (
        value
        if isinstance(value, dt.datetime)
        else dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    )
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
