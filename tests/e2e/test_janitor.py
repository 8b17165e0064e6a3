"""The orphan janitor of flood-supervisor and flood-doctor's orphan check, against the real
local S3 server: incomplete multipart uploads no record knows are aborted once old enough;
young ones and those Flood's records know are left alone."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from spool import Spool, wait_for

from flood import records
from flood.records import Upload
from flood.testing.localserver import LocalS3

pytestmark = pytest.mark.timeout(180)


# -- helpers -----------------------------------------------------------------------------------
def uploads(client: Any, bucket: str) -> dict[str, str]:
    """The bucket's incomplete multipart uploads: upload id -> key."""
    answer = client.list_multipart_uploads(Bucket=bucket)
    return {u["UploadId"]: u["Key"] for u in answer.get("Uploads", [])}


def older_than(client: Any, bucket: str, upload_id: str, seconds: float) -> bool:
    """Whether the server's Initiated of this upload is more than `seconds` ago."""
    answer = client.list_multipart_uploads(Bucket=bucket)
    [initiated] = [u["Initiated"] for u in answer["Uploads"] if u["UploadId"] == upload_id]
    return bool((dt.datetime.now(dt.UTC) - initiated).total_seconds() > seconds)


def on_record(sp: Spool, bucket: str, key: str, upload_id: str) -> None:
    """Write a MultipartUpload row for this upload, as an interrupted upload of Flood's has."""
    records.open_db(str(sp.db))
    try:
        records.multipart_started(
            Upload(
                record_id=999,
                bucket=bucket,
                key=key,
                upload_id=upload_id,
                part_size=8 * 1024 * 1024,
                file_size=20 * 1024 * 1024,
                mtime_ns=0,
                inode=0,
                checksum="md5",
                parts={},
            )
        )
    finally:
        records.close_db()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def rounds(sp: Spool, count: int) -> list[dict[str, Any]]:
    """The first `count` janitor_finished events (waited for), as their flood fields."""
    wait_for(lambda: len(sp.events("janitor_finished")) >= count, 60, f"janitor round {count}")
    return [e["flood"] for e in sp.events("janitor_finished")]


# -- the janitor ---------------------------------------------------------------------------------
def test_janitor_aborts_stale_orphans_and_leaves_young_and_recorded_uploads(
    spool: Spool, bucket: str, client: Any
) -> None:
    """At start, with the default --abandon-multipart-after (24h), two foreign uploads are
    counted as orphans and left (young), and the one on record is not even counted;
    flood-doctor lists the two, aborting nothing; with --abandon-multipart-after 1s, once
    they are older than that, both foreign uploads are aborted and the recorded one stays."""
    (spool.dir / "incoming" / "p1" / bucket).mkdir(parents=True)
    stale = client.create_multipart_upload(Bucket=bucket, Key="foreign/stale.bin")["UploadId"]
    known = client.create_multipart_upload(Bucket=bucket, Key="ours/known.bin")["UploadId"]
    on_record(spool, bucket, "ours/known.bin", known)
    # Initiated has whole seconds: one apart, the stale one is the oldest.
    wait_for(lambda: older_than(client, bucket, stale, 1.0), 30, "a second after the first")
    fresh = client.create_multipart_upload(Bucket=bucket, Key="foreign/fresh.bin")["UploadId"]
    everything = {stale: "foreign/stale.bin", known: "ours/known.bin", fresh: "foreign/fresh.bin"}

    sup = spool.start("--metrics-port", "0", workers=1)
    [first] = rounds(spool, 1)
    assert (first["orphans"], first["aborted"], first["failing"], first["left_young"]) == (
        2,
        0,
        0,
        2,
    )
    assert uploads(client, bucket) == everything
    port = int(spool.events("metrics_serving")[0]["flood"]["port"])
    values = scrape(port)
    where = (("bucket", bucket), ("profile", "p1"))
    assert values[("flood_orphan_uploads", where)] == 2
    assert values[("flood_orphans_aborted_total", where)] == 0
    assert values[("flood_orphan_aborts_failed_total", where)] == 0
    assert sup.terminate() == 0

    doctor = spool.run(
        "flood-doctor", "--server-dir", str(spool.dir), "--credentials", str(spool.credentials)
    )
    [line] = [x for x in doctor.stdout.splitlines() if "orphans:" in x]
    assert line.split()[:2] == ["warn", f"p1/{bucket}"]
    assert "2 incomplete multipart uploads no record of Flood's knows" in line
    assert "the oldest initiated " in line and "(foreign/stale.bin)" in line
    report = json.loads(
        spool.run(
            "flood-doctor",
            "--server-dir",
            str(spool.dir),
            "--credentials",
            str(spool.credentials),
            "--json",
        ).stdout
    )
    assert [c["subject"] for c in report["checks"] if c["category"] == "orphans"] == [
        f"p1/{bucket}"
    ]
    assert uploads(client, bucket) == everything  # the doctor aborts nothing

    wait_for(lambda: older_than(client, bucket, fresh, 1.5), 30, "the uploads older than 1 s")
    sup = spool.start("--abandon-multipart-after", "1s", workers=1)
    second = rounds(spool, 2)[1]
    assert (second["orphans"], second["aborted"], second["failing"]) == (2, 2, 0)
    assert uploads(client, bucket) == {known: "ours/known.bin"}
    aborted = {e["flood"]["upload_id"]: e["flood"]["key"] for e in spool.events("orphan_aborted")}
    assert aborted == {stale: "foreign/stale.bin", fresh: "foreign/fresh.bin"}
    assert all(e["flood"]["age_seconds"] > 1 for e in spool.events("orphan_aborted"))
    assert sup.terminate() == 0


def test_a_failed_abort_is_tried_again_next_round(
    tmp_path: Path, s3: LocalS3, bucket: str, client: Any
) -> None:
    """With a key that may list but not abort, the abort fails round after round
    (orphan_abort_failed, counted as failing); once the credentials file has a key that may
    and the supervisor re-reads it (SIGHUP), the next round aborts the upload."""
    assert s3.readonly is not None
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1", s3.readonly)})
    try:
        (sp.dir / "incoming" / "p1" / bucket).mkdir(parents=True)
        stale = client.create_multipart_upload(Bucket=bucket, Key="stale.bin")["UploadId"]
        wait_for(lambda: older_than(client, bucket, stale, 1.5), 30, "the upload older than 1 s")
        sup = sp.start("--janitor-interval", "1s", "--abandon-multipart-after", "1s", workers=1)
        first, second = rounds(sp, 2)[:2]
        assert (first["failing"], second["failing"], second["aborted"]) == (1, 1, 0)
        failed = sp.events("orphan_abort_failed")
        assert {e["flood"]["upload_id"] for e in failed} == {stale}
        assert "AccessDenied" in failed[0]["error"]["message"]
        assert uploads(client, bucket) == {stale: "stale.bin"}
        sp.credentials.write_text(s3.credentials_ini("p1"))
        os.kill(sup.pid, signal.SIGHUP)
        [done] = wait_for(lambda: sp.events("orphan_aborted"), 60, "the abort")
        assert done["flood"]["upload_id"] == stale
        assert uploads(client, bucket) == {}
        assert sup.terminate() == 0
    finally:
        sp.close()
