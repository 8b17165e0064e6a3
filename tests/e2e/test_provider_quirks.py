"""flood-supervisor through a relay that answers as Backblaze B2, Cloudflare R2 or a provider
with opaque ETags would (tests/support/faultproxy.py), in front of the local S3 server: every
file completes with its bytes, and Flood sends nothing the provider refuses."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from faultproxy import QUIRKS, FaultProxy, opaque_etag
from httpwire import RequestHead
from spool import Spool, object_bytes, object_keys

from flood.testing.localserver import LocalS3

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
MULTIPART_SIZE = 17 * MiB  # above the default 16 MiB --multipart-threshold: parts of 8, 8, 1
PUT_PATHS = {"lean": (), "boto3": ("--boto3-put",)}


class Quirk(NamedTuple):
    """A relay mode and the provider a user names for such a server in the credentials file."""

    mode: str
    provider: str


# Opaque ETags are Amazon's own with SSE-KMS: the profile says amazon.
QUIRK_PROFILES = {
    "b2": Quirk("b2", "backblaze"),
    "r2": Quirk("r2", "cloudflare"),
    "opaque-etag": Quirk("opaque-etag", "amazon"),
}


@pytest.fixture(params=list(QUIRK_PROFILES))
def quirk(request: pytest.FixtureRequest) -> Quirk:
    return QUIRK_PROFILES[request.param]


@pytest.fixture
def relay(s3: LocalS3, quirk: Quirk) -> Iterator[FaultProxy]:
    """A recording relay in the quirk's mode in front of the local S3 server."""
    with FaultProxy("127.0.0.1", s3.port, record=True) as proxy:
        proxy.set_mode(quirk.mode)
        yield proxy


@pytest.fixture
def spool(tmp_path: Path, s3: LocalS3, quirk: Quirk, relay: FaultProxy) -> Iterator[Spool]:
    """A server dir whose profile p1 names the quirk's provider and reaches the local S3
    server through the relay."""
    profile = s3.credentials_ini("p1", provider=quirk.provider, endpoint=relay.endpoint)
    sp = Spool(tmp_path, s3, {"p1": profile})
    yield sp
    sp.close()


def object_path(bucket: str, key: str) -> str:
    """The request target's path of an object, as both of Flood's clients encode it."""
    return f"/{bucket}/{urllib.parse.quote(key, safe='/~')}"


def requests_for(relay: FaultProxy, method: str, bucket: str, key: str) -> list[RequestHead]:
    path = object_path(bucket, key)
    return [h for h in relay.received if h.method == method and h.target.split("?")[0] == path]


def refused_headers(relay: FaultProxy, quirk: Quirk) -> list[tuple[str, str, str]]:
    """Every request Flood sent that the quirk refuses: method, target and the refusal."""
    rule = QUIRKS[quirk.mode]
    return [
        (h.method, h.target, refusal.message)
        for h in relay.received
        if (refusal := rule(h)) is not None
    ]


def assert_completed(spool: Spool, client: Any, bucket: str, files: dict[str, bytes]) -> None:
    """Each file lies in completed/ with one successful record of its size, the server holds
    its bytes, and failed/ is empty."""
    for key, data in files.items():
        assert spool.where("p1", bucket, key) == ["completed"], key
        assert object_bytes(client, bucket, key) == data, key
        [row] = spool.records(key)
        assert (row["current_state"], row["upload_outcome"], row["size"]) == (
            "completed",
            "success",
            len(data),
        ), key
    assert object_keys(client, bucket) == sorted(files)
    assert spool.files("failed") == []


def assert_nothing_refused(relay: FaultProxy, quirk: Quirk) -> None:
    """Flood sent no request the provider refuses (read from the relay's record)."""
    assert refused_headers(relay, quirk) == []
    assert relay.refused == [] and relay.requests_faulted == 0


@pytest.mark.parametrize("put", PUT_PATHS, ids=list(PUT_PATHS))
def test_single_puts_through_the_quirk(
    spool: Spool, relay: FaultProxy, quirk: Quirk, bucket: str, client: Any, put: str
) -> None:
    """Small files (batched) and one of 2 MiB (sent alone) go up in single PUTs, the lean
    client's or boto3's, through the provider's quirk: all completed with their bytes, no
    request refused. With opaque ETags each is proven by a HEAD; otherwise by its ETag, with
    no HEAD at all."""
    files = {f"small/{i}.bin": os.urandom(1 + i * 30_000) for i in range(6)}
    files["alone/2mib.bin"] = os.urandom(2 * MiB)
    spool.start(*PUT_PATHS[put])
    for key, data in files.items():
        spool.drop("p1", bucket, key, data)
    spool.wait_done("p1", bucket, list(files))
    assert_completed(spool, client, bucket, files)
    assert_nothing_refused(relay, quirk)
    client_name = {"lean": "flood/", "boto3": "Boto3/"}[put]  # which client sent each PUT
    for key in files:
        [sent] = requests_for(relay, "PUT", bucket, key)
        assert (sent.header("user-agent") or "").startswith(client_name), key
    heads = {key: len(requests_for(relay, "HEAD", bucket, key)) for key in files}
    etags = {r["filepath"]: r["etag"] for r in spool.records()}
    if quirk.mode == "opaque-etag":
        # The ETag proves nothing here: each object was verified by a HEAD, and the record
        # keeps the ETag the provider gave.
        assert heads == dict.fromkeys(files, 1)
        assert etags == {
            k: opaque_etag(hashlib.md5(d).hexdigest()).strip('"') for k, d in files.items()
        }
    else:
        assert heads == dict.fromkeys(files, 0)
        assert etags == {k: hashlib.md5(d).hexdigest() for k, d in files.items()}


def test_multipart_through_the_quirk(
    spool: Spool, relay: FaultProxy, quirk: Quirk, bucket: str, client: Any
) -> None:
    """A 17 MiB file goes up in three parts through the provider's quirk, is verified by a
    HEAD and completed with its bytes; no request is refused."""
    key = "big/17mib.bin"
    data = os.urandom(MULTIPART_SIZE)
    spool.start()
    spool.drop("p1", bucket, key, data)
    spool.wait_done("p1", bucket, [key], timeout=120)
    assert_completed(spool, client, bucket, {key: data})
    assert_nothing_refused(relay, quirk)
    parts = [h for h in requests_for(relay, "PUT", bucket, key) if "partNumber=" in h.target]
    assert len(parts) == 3
    posts = requests_for(relay, "POST", bucket, key)
    assert [("uploads" in h.target, "uploadId=" in h.target) for h in posts] == [
        (True, False),
        (False, True),
    ]
    assert len(requests_for(relay, "HEAD", bucket, key)) == 1
    assert client.head_object(Bucket=bucket, Key=key)["ContentLength"] == MULTIPART_SIZE
