"""flood.orphans against the real local S3 server: listing follows the server's pages, the
uploads on record are left out, and the age rule decides what is aborted."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flood import orphans


def create(client: Any, bucket: str, keys: list[str]) -> list[str]:
    return [client.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"] for k in keys]


def left(client: Any, bucket: str) -> set[str]:
    return {u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}


def test_listing_follows_the_pages(client: Any, bucket: str) -> None:
    """Five uploads (two of one key) listed two a page are all found, each once."""
    ids = create(client, bucket, ["a", "a", "b", "c/d", "e"])
    found = [o.upload_id for o in orphans.listed(client, bucket, page=2)]
    assert sorted(found) == sorted(ids)


def test_sweep_aborts_only_old_uploads_no_record_knows(client: Any, bucket: str) -> None:
    """With `now` an hour on, uploads no record knows are older than 60 s and aborted; the
    one on record is left; with the real now they are all young and left."""
    mine, *foreign = create(client, bucket, ["mine", "x", "y"])
    known = lambda _bucket: {mine}  # noqa: E731 - the records' answer for this bucket
    young = orphans.sweep(client, bucket, 60, known=known)
    assert (len(young.young), young.aborted, young.failed) == (2, [], [])
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    swept = orphans.sweep(client, bucket, 60, now=later, known=known, page=1)
    assert sorted(o.upload_id for o in swept.aborted) == sorted(foreign)
    assert swept.failed == [] and swept.young == []
    assert left(client, bucket) == {mine}


def test_an_upload_gone_meanwhile_counts_as_aborted(client: Any, bucket: str) -> None:
    """Aborting an upload the server no longer has (NoSuchUpload) is not a failure."""
    [upload] = create(client, bucket, ["k"])
    [orphan] = orphans.find(client, bucket, known=lambda _b: set())
    client.abort_multipart_upload(Bucket=bucket, Key="k", UploadId=upload)
    gone = orphans.Orphan(bucket, "k", "no-such-upload-id", orphan.initiated)
    assert orphans.abort(client, orphan) is None
    assert orphans.abort(client, gone) is None
