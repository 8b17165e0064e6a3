"""Large files end to end against the real server: every part proven (a flipped bit caught),
uploads that resume after kill -9 sending only what is missing, the faults a multipart upload
meets (a forgotten upload, a stray part, an error in a 200, a file cut short), and a shared
bandwidth limit."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from forwardproxy import ForwardProxy
from relay import Relay
from spool import Spool, new_bucket, object_bytes, wait_for

from flood.testing.localserver import LocalS3

pytestmark = pytest.mark.timeout(300)
MiB = 1024 * 1024
PARTS = ("--multipart-threshold", "6", "--part-size", "5")  # files of 6 MiB and up, 5 MiB parts
FAST = ("--retry-base", "0.2", "--recheck-interval", "1")
Start = Callable[..., ForwardProxy]


@pytest.fixture
def relay(s3: LocalS3) -> Iterator[Relay]:
    with Relay(("127.0.0.1", s3.port)) as found:
        yield found


def spool_at(tmp_path: Path, s3: LocalS3, endpoint: str, *extra: str) -> Spool:
    ini = s3.credentials_ini("p1", endpoint=endpoint) + "".join(f"{line}\n" for line in extra)
    return Spool(tmp_path, s3, {"p1": ini})


def started(spool: Spool, *args: str, **env: str) -> None:
    spool.start(*args, env=spool.env(**env))
    wait_for(lambda: spool.events("startup_drain_queued"), 60, "the start-up drain")


def parts_on_record(spool: Spool) -> int:
    return int(spool.query("SELECT COUNT(*) AS n FROM multipart_parts")[0]["n"])


@pytest.mark.parametrize("checksum", ["md5", "crc32", "crc32c", "sha256"])
def test_a_flipped_bit_in_a_part_is_caught_and_the_object_is_right(
    tmp_path: Path, s3: LocalS3, relay: Relay, client: Any, checksum: str
) -> None:
    """One bit of part 2 flipped on the wire: the server refuses the part (its Content-MD5,
    and the profile's checksum, do not match), the file is retried, the upload continues with
    the parts already proven, and the object holds exactly the file's bytes."""
    spool = spool_at(tmp_path, s3, f"http://127.0.0.1:{relay.port}", f"checksum = {checksum}")
    bucket = new_bucket(s3)
    relay.flip_once(b"partNumber=2 HTTP")
    started(spool, *PARTS, *FAST)
    data = os.urandom(13 * MiB)
    spool.drop("p1", bucket, "flipped.bin", data)
    spool.wait_done("p1", bucket, ["flipped.bin"], timeout=120)
    assert relay.flipped == 1
    assert object_bytes(client, bucket, "flipped.bin") == data
    [retry] = spool.events("upload_retry_scheduled")
    assert retry["event"]["reason"] in ("BadDigest", "XAmzContentChecksumMismatch", "InvalidDigest")
    [resumed] = spool.events("multipart_resumed")
    assert resumed["flood"]["parts_done"] >= 1
    [record] = spool.records("flipped.bin")
    assert record["etag"].endswith("-3")
    if checksum != "md5":
        assert record["checksum"].startswith(f"{checksum}:")


def test_kill9_mid_upload_resends_at_most_the_parts_in_flight(
    tmp_path: Path, s3: LocalS3, client: Any
) -> None:
    """A kill -9 of the whole tree in the middle of a 200 MiB upload: flood-status why shows
    the upload and its parts done; after the restart only the parts that were in flight at the
    kill are sent again (counted at a relay), and the object is the file."""
    with FaultProxy("127.0.0.1", s3.port, record=True) as recorder:
        spool = spool_at(tmp_path, s3, recorder.endpoint, "max_bandwidth = 40MB/s")
        bucket = new_bucket(s3)
        in_flight = 4
        args = (*PARTS, "--parts-in-flight", str(in_flight), *FAST)
        sup = spool.start(*args)
        wait_for(lambda: spool.events("startup_drain_queued"), 60, "the start-up drain")
        data = os.urandom(200 * MiB)
        spool.drop("p1", bucket, "big.bin", data)
        wait_for(lambda: parts_on_record(spool) >= 12, 120, "a dozen parts on record")
        sup.kill9()
        done_before = parts_on_record(spool)
        assert done_before < 40
        why = spool.run("flood-status", "--server-dir", str(spool.dir), "why", "big.bin")
        assert "multipart upload" in why.stdout and "parts done" in why.stdout, why.stdout
        spool.start(*args)
        spool.wait_done("p1", bucket, ["big.bin"], timeout=240)
        sent: dict[int, int] = {}
        for head in recorder.received:
            if head.method == "PUT" and "partNumber=" in head.target:
                number = int(head.target.split("partNumber=")[1].split("&")[0])
                sent[number] = sent.get(number, 0) + 1
    assert sorted(sent) == list(range(1, 41))
    twice = [n for n, count in sent.items() if count > 1]
    assert len(twice) <= in_flight, twice
    got = client.get_object(Bucket=bucket, Key="big.bin")["Body"].read()
    assert hashlib.md5(got).digest() == hashlib.md5(data).digest()
    assert parts_on_record(spool) == 0  # the finished upload is forgotten


def _uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_an_upload_the_server_forgot_starts_over(
    tmp_path: Path, s3: LocalS3, client: Any, forward_proxy: Start
) -> None:
    """Part 2 fails, and meanwhile the upload is aborted behind Flood's back: the retry finds
    NoSuchUpload, starts a new upload and completes it with the right bytes."""
    proxy = forward_proxy(faults={"PUT partNumber=2": 500})
    spool = spool_at(tmp_path, s3, s3.endpoint)
    bucket = new_bucket(s3)
    started(spool, *PARTS, "--retry-base", "2", HTTP_PROXY=proxy.url)
    data = os.urandom(12 * MiB)
    spool.drop("p1", bucket, "forgotten.bin", data)
    wait_for(lambda: spool.events("upload_retry_scheduled"), 60, "the failed part's retry")
    [upload] = _uploads(client, bucket)
    client.abort_multipart_upload(Bucket=bucket, Key="forgotten.bin", UploadId=upload["UploadId"])
    proxy.faults.clear()
    spool.wait_done("p1", bucket, ["forgotten.bin"], timeout=60)
    assert object_bytes(client, bucket, "forgotten.bin") == data
    assert _uploads(client, bucket) == []


def test_a_part_the_records_do_not_know_is_sent_again(
    tmp_path: Path, s3: LocalS3, client: Any, forward_proxy: Start
) -> None:
    """ListParts answers a part the records do not know (someone else's bytes as part 2): the
    resumed upload sends its own part 2 over it, and the object is the file."""
    proxy = forward_proxy(faults={"PUT partNumber=2": 500})
    spool = spool_at(tmp_path, s3, s3.endpoint)
    bucket = new_bucket(s3)
    started(spool, *PARTS, "--retry-base", "2", HTTP_PROXY=proxy.url)
    data = os.urandom(12 * MiB)
    spool.drop("p1", bucket, "stray.bin", data)
    wait_for(lambda: spool.events("upload_retry_scheduled"), 60, "the failed part's retry")
    [upload] = _uploads(client, bucket)
    client.upload_part(
        Bucket=bucket,
        Key="stray.bin",
        UploadId=upload["UploadId"],
        PartNumber=2,
        Body=os.urandom(5 * MiB),
    )
    proxy.faults.clear()
    spool.wait_done("p1", bucket, ["stray.bin"], timeout=60)
    assert object_bytes(client, bucket, "stray.bin") == data


def test_complete_answered_200_with_an_error_is_never_a_completion(
    tmp_path: Path, s3: LocalS3, client: Any, forward_proxy: Start
) -> None:
    """S3 may answer CompleteMultipartUpload 200 with an error in the body: that is a failed
    attempt (the record stays open, the file in processing/), retried until the server
    really completes it."""
    proxy = forward_proxy(faults={"POST uploadId=": 200})
    spool = spool_at(tmp_path, s3, s3.endpoint)
    bucket = new_bucket(s3)
    started(spool, *PARTS, "--retry-base", "2", HTTP_PROXY=proxy.url)
    data = os.urandom(7 * MiB)
    spool.drop("p1", bucket, "answered.bin", data)
    wait_for(lambda: spool.events("upload_retry_scheduled"), 60, "the retry after the 200")
    [record] = spool.records("answered.bin")
    assert record["current_state"] == "processing"
    assert spool.where("p1", bucket, "answered.bin") == ["processing"]
    proxy.faults.clear()
    spool.wait_done("p1", bucket, ["answered.bin"], timeout=60)
    assert object_bytes(client, bucket, "answered.bin") == data


@pytest.mark.parametrize("change", ["truncated", "appended"])
def test_a_file_cut_or_grown_during_its_upload_is_never_completed_with_other_bytes(
    tmp_path: Path, s3: LocalS3, client: Any, relay: Relay, change: str
) -> None:
    """Truncated or appended to while its parts go up (slowly, under a bandwidth limit): the
    upload is not completed with those bytes; once the file settles it goes up again, and
    the object is the file as it finally is."""
    spool = spool_at(tmp_path, s3, f"http://127.0.0.1:{relay.port}", "max_bandwidth = 6MB/s")
    bucket = new_bucket(s3)
    started(spool, *PARTS, *FAST, "--settle", "0.5")
    spool.drop("p1", bucket, "moving.bin", os.urandom(16 * MiB))
    path = spool.path("processing", "p1", bucket, "moving.bin")
    wait_for(lambda: parts_on_record(spool) >= 1, 60, "the first part")
    with open(path, "r+b") as handle:
        if change == "truncated":
            handle.truncate(9 * MiB)
        else:
            handle.seek(0, os.SEEK_END)
            handle.write(os.urandom(3 * MiB))
    final = path.read_bytes()
    spool.wait_done("p1", bucket, ["moving.bin"], timeout=120)
    assert object_bytes(client, bucket, "moving.bin") == final
    assert spool.events("source_modified")


def test_a_bandwidth_limit_holds_across_two_uploaders(
    tmp_path: Path, s3: LocalS3, relay: Relay
) -> None:
    """max_bandwidth = 4MB/s shared by two uploaders, small files and parts alike: over 20 s
    the bytes that reach the server stay within 10% of 4 MB/s, and flood-status shows the
    limit."""
    spool = spool_at(tmp_path, s3, f"http://127.0.0.1:{relay.port}", "max_bandwidth = 4MB/s")
    bucket = new_bucket(s3)
    started(spool, *PARTS)  # two uploaders (the Spool's default)
    for i in range(40):
        spool.drop("p1", bucket, f"load/{i}.bin", os.urandom(3 * MiB if i % 4 else 7 * MiB))
    time.sleep(3)  # let both uploaders get going before the window starts
    first, began = relay.sent, time.monotonic()
    time.sleep(20)  # the measuring window
    rate = (relay.sent - first) / (time.monotonic() - began)
    assert 0.9 * 4e6 <= rate <= 1.1 * 4e6, f"{rate / 1e6:.2f} MB/s"
    uploaders = {e["process"]["pid"] for e in spool.events("file_claimed")}
    assert len(uploaders) == 2
    where = ("--server-dir", str(spool.dir), "--credentials", str(spool.credentials))
    shown = spool.run("flood-status", *where)
    assert "bandwidth: p1 at most 4.0 MB/s" in shown.stdout
    data = json.loads(spool.run("flood-status", *where, "--json").stdout)
    assert data["bandwidth"] == {"p1": 4e6}
