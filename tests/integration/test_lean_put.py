"""The lean PUT against the real server: what it stores, and what the server refuses. Its
payload goes unsigned, so the server's check of the signed Content-MD5 is what keeps wrong
bytes out; these tests show that check happens."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import pytest
from botocore.exceptions import ClientError
from spool import new_bucket, object_bytes

from flood.connection import Connection
from flood.credentials import Profile
from flood.lean import LeanClient
from flood.testing.localserver import REGION, LocalS3

pytestmark = pytest.mark.timeout(120)


def md5_of(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def lean(s3: LocalS3, secret: str | None = None) -> LeanClient:
    key, secret = s3.admin.access_key, secret or s3.admin.secret_key
    return LeanClient(Connection(Profile("p", "other", key, secret, REGION, s3.endpoint)))


@pytest.mark.parametrize("size", [0, 1, 4096, 1 << 20])
def test_stores_the_bytes_and_answers_their_md5(s3: LocalS3, client: Any, size: int) -> None:
    bucket = new_bucket(s3)
    data = os.urandom(size)
    for key in ("plain", "dir/with space/ünï+=~(x).bin"):
        etag = lean(s3).put(bucket, key, data, md5_of(data))
        assert etag.strip('"') == hashlib.md5(data).hexdigest()
        assert object_bytes(client, bucket, key) == data


def test_several_in_flight_each_land(s3: LocalS3, client: Any) -> None:
    bucket = new_bucket(s3)
    put = lean(s3)
    bodies = {f"k{i}": os.urandom(100 + i) for i in range(8)}
    started = [put.start(bucket, key, data, md5_of(data)) for key, data in bodies.items()]
    assert [p.result().strip('"') for p in started] == [
        hashlib.md5(d).hexdigest() for d in bodies.values()
    ]
    assert {k: object_bytes(client, bucket, k) for k in bodies} == bodies


def test_bytes_that_do_not_match_content_md5_are_refused(s3: LocalS3, client: Any) -> None:
    """What the payload's missing signature leaves to Content-MD5: a body changed on the way
    (here: sent with the MD5 of other bytes) is refused and nothing is stored."""
    bucket = new_bucket(s3)
    with pytest.raises(ClientError) as info:
        lean(s3).put(bucket, "tampered", b"what arrived", md5_of(b"what was read"))
    assert info.value.response["Error"]["Code"] == "BadDigest"
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_wrong_secret_is_a_signature_mismatch(s3: LocalS3) -> None:
    bucket = new_bucket(s3)
    with pytest.raises(ClientError) as info:
        lean(s3, secret="not-the-secret-at-all").put(bucket, "k", b"x", md5_of(b"x"))
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_a_put_in_the_middle_of_a_batch_gets_its_own_answer(s3: LocalS3, client: Any) -> None:
    """A file uploaded on its own while a batch's PUTs wait for their answers (a larger file
    met in the batch) must not read one of their answers as its own: each PUT has a
    connection of its own until its answer is read, and the client hands them out."""
    bucket = new_bucket(s3)
    put = lean(s3)
    small = {f"small{i}": os.urandom(10 + i) for i in range(2)}
    started = [put.start(bucket, key, data, md5_of(data)) for key, data in small.items()]
    large = os.urandom(300 * 1024)
    assert (
        put.put(bucket, "large", large, md5_of(large)).strip('"') == hashlib.md5(large).hexdigest()
    )
    assert [p.result().strip('"') for p in started] == [
        hashlib.md5(d).hexdigest() for d in small.values()
    ]
    assert object_bytes(client, bucket, "large") == large


def idle(client: LeanClient) -> int:
    return sum(len(free) for free in client.free.values())


def test_connections_are_reused_once_answered(s3: LocalS3) -> None:
    """A connection goes back to the free list when its answer is read and is handed to the
    next PUT; PUTs in flight together each hold their own."""
    bucket = new_bucket(s3)
    put = lean(s3)
    for i in range(3):
        put.put(bucket, f"seq{i}", b"x", md5_of(b"x"))
    assert idle(put) == 1
    started = [put.start(bucket, f"par{i}", b"y", md5_of(b"y")) for i in range(4)]
    assert idle(put) == 0
    for pending in started:
        pending.result()
    assert idle(put) == 4
    put.close()
    assert idle(put) == 0
