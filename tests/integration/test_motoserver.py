"""moto's standalone server as a second S3 implementation, and how it differs from SeaweedFS."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import boto3
import pytest
from botocore.exceptions import ClientError
from motoserver import MotoServer
from spool import wait_for

from flood.testing.localserver import ADMIN_ACTIONS, REGION, Identity, LocalS3

pytestmark = pytest.mark.timeout(120)

PART = 5 * 1024 * 1024  # the smallest part both servers take before the last one
SUPPORT = Path(__file__).resolve().parents[1] / "support"


class Target(NamedTuple):
    """One S3 implementation under test, by name, with an admin client made once."""

    kind: str  # "seaweedfs" or "moto"
    server: Any  # LocalS3 or MotoServer: the same client(), create_bucket(), admin
    client: Any


@pytest.fixture(scope="module")
def admin_clients(s3: LocalS3, moto: MotoServer) -> dict[str, Any]:
    """One admin client per server for the module (making a boto3 client takes 0.1-0.2 s)."""
    return {"seaweedfs": s3.client(), "moto": moto.client()}


@pytest.fixture(params=["seaweedfs", "moto"])
def target(
    request: pytest.FixtureRequest, s3: LocalS3, moto: MotoServer, admin_clients: dict[str, Any]
) -> Target:
    """Each server in turn, for the tests that set their answers side by side."""
    server = s3 if request.param == "seaweedfs" else moto
    return Target(request.param, server, admin_clients[request.param])


def fresh_bucket(server: Any) -> str:
    """Create a uniquely named bucket and return its name."""
    name = f"moto-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return name


def outcome(call: Any, **kwargs: Any) -> str:
    """ "ok" if `call(**kwargs)` succeeds, else the S3 error code it answers with."""
    try:
        call(**kwargs)
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    return "ok"


def b64md5(data: bytes) -> str:
    """The Content-MD5 header value for `data`."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip().startswith("Z")


def test_put_and_get_object(moto: MotoServer) -> None:
    """An object put into a new bucket comes back byte for byte and the bucket is listed."""
    bucket = fresh_bucket(moto)
    client = moto.client()
    body = bytes(range(256)) * 512
    client.put_object(Bucket=bucket, Key="a/b.bin", Body=body)
    assert client.get_object(Bucket=bucket, Key="a/b.bin")["Body"].read() == body
    assert client.head_object(Bucket=bucket, Key="a/b.bin")["ETag"].strip('"') == (
        hashlib.md5(body).hexdigest()
    )
    assert bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_multipart_etag_form(moto: MotoServer) -> None:
    """A completed multipart upload's ETag is the MD5 of the parts' binary MD5s, then -N."""
    bucket = fresh_bucket(moto)
    client = moto.client()
    parts = [b"a" * PART, b"b" * 1000]
    upload = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    done = [
        {
            "PartNumber": n,
            "ETag": client.upload_part(
                Bucket=bucket, Key="mp", UploadId=upload, PartNumber=n, Body=part
            )["ETag"],
        }
        for n, part in enumerate(parts, start=1)
    ]
    answer = client.complete_multipart_upload(
        Bucket=bucket, Key="mp", UploadId=upload, MultipartUpload={"Parts": done}
    )
    digests = b"".join(hashlib.md5(part).digest() for part in parts)
    assert answer["ETag"] == f'"{hashlib.md5(digests).hexdigest()}-2"'
    assert client.get_object(Bucket=bucket, Key="mp")["Body"].read() == b"".join(parts)
    assert client.head_object(Bucket=bucket, Key="mp")["ContentLength"] == PART + 1000


def test_credentials_ini(moto: MotoServer) -> None:
    """The INI section names the profile, provider, key pair, region and endpoint of moto."""
    text = moto.credentials_ini("m1", provider="backblaze", endpoint="http://x:1")
    assert text == (
        "[m1]\nprovider = backblaze\n"
        f"aws_access_key_id = {moto.admin.access_key}\n"
        f"aws_secret_access_key = {moto.admin.secret_key}\n"
        f"aws_region = {REGION}\naws_endpoint = http://x:1\n"
    )
    assert moto.endpoint == f"http://127.0.0.1:{moto.port}"
    assert f"aws_endpoint = {moto.endpoint}\n" in moto.credentials_ini("m2")


def test_stop_ends_the_process(tmp_path: Path) -> None:
    """stop() ends the server process and frees its port; a second stop() does nothing."""
    server = MotoServer(tmp_path)
    server.start()
    pid, port = server.pid, server.port
    assert pid is not None and process_alive(pid)
    server.stop()
    server.stop()
    assert server.pid is None and not process_alive(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_dies_with_its_parent(tmp_path: Path) -> None:
    """A server started by a process that is killed with SIGKILL goes down with it."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(SUPPORT)!r})
        from motoserver import MotoServer
        server = MotoServer({str(tmp_path)!r})
        server.start()
        print(server.pid, flush=True)
        sys.stdin.read()
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert process_alive(pid)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not process_alive(pid), timeout=15, what="moto to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait(10)


# -- what each server checks: the same request, both servers' answers ---------------------------


def test_signature_with_a_wrong_secret(target: Target) -> None:
    """A request signed with a wrong secret: SeaweedFS refuses it, moto does not check."""
    bucket = fresh_bucket(target.server)
    wrong = Identity("wrong", target.server.admin.access_key, "x" * 40, ADMIN_ACTIONS)
    code = outcome(target.server.client(wrong).put_object, Bucket=bucket, Key="k", Body=b"1")
    # Difference: moto does not verify SigV4 signatures at all.
    assert code == {"seaweedfs": "SignatureDoesNotMatch", "moto": "ok"}[target.kind]


def test_unknown_access_key(target: Target) -> None:
    """An access key the server never issued: SeaweedFS refuses it, moto takes any key."""
    bucket = fresh_bucket(target.server)
    stranger = Identity("stranger", "AKUNKNOWN00000000000", "x" * 40, ADMIN_ACTIONS)
    code = outcome(target.server.client(stranger).put_object, Bucket=bucket, Key="k", Body=b"1")
    # Difference: moto has no identities unless IAM authentication is switched on.
    assert code == {"seaweedfs": "InvalidAccessKeyId", "moto": "ok"}[target.kind]


def test_session_token_not_issued(target: Target) -> None:
    """A session token the server did not issue: SeaweedFS refuses it, moto ignores it."""
    bucket = fresh_bucket(target.server)
    admin = target.server.admin
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=target.server.endpoint,
        region_name=REGION,
        aws_access_key_id=admin.access_key,
        aws_secret_access_key=admin.secret_key,
        aws_session_token="FwoGZXIvYXdzEFLOODTESTTOKEN",
    )
    code = outcome(client.put_object, Bucket=bucket, Key="k", Body=b"1")
    # Difference: test session tokens against moto; SeaweedFS takes none it did not issue.
    assert code == {"seaweedfs": "InvalidAccessKeyId", "moto": "ok"}[target.kind]


def test_content_md5_mismatch_on_put(target: Target) -> None:
    """A PutObject whose Content-MD5 is not its body's: SeaweedFS says BadDigest, moto stores it."""
    bucket = fresh_bucket(target.server)
    client = target.client
    code = outcome(
        client.put_object, Bucket=bucket, Key="k", Body=b"data", ContentMD5=b64md5(b"other")
    )
    # Difference: moto never compares Content-MD5 with the body; the object is stored as sent.
    assert code == {"seaweedfs": "BadDigest", "moto": "ok"}[target.kind]
    stored = outcome(client.head_object, Bucket=bucket, Key="k")
    assert stored == {"seaweedfs": "404", "moto": "ok"}[target.kind]


def test_content_md5_mismatch_on_upload_part(target: Target) -> None:
    """An UploadPart with a wrong Content-MD5: SeaweedFS answers BadDigest, moto takes the part."""
    bucket = fresh_bucket(target.server)
    client = target.client
    upload = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    code = outcome(
        client.upload_part,
        Bucket=bucket,
        Key="mp",
        UploadId=upload,
        PartNumber=1,
        Body=b"part",
        ContentMD5=b64md5(b"other"),
    )
    # Difference: moto does not check a part's Content-MD5 either.
    assert code == {"seaweedfs": "BadDigest", "moto": "ok"}[target.kind]
    client.abort_multipart_upload(Bucket=bucket, Key="mp", UploadId=upload)


def test_wrong_crc32_checksum(target: Target) -> None:
    """A PutObject with a wrong x-amz-checksum-crc32: SeaweedFS refuses it, moto stores it."""
    bucket = fresh_bucket(target.server)
    client = target.client
    code = outcome(
        client.put_object, Bucket=bucket, Key="k", Body=b"data", ChecksumCRC32="AAAAAA=="
    )
    # Difference: moto records the checksum it was sent without computing one.
    assert code == {"seaweedfs": "BadDigest", "moto": "ok"}[target.kind]


def test_small_part_before_the_last(target: Target) -> None:
    """Both servers refuse to complete an upload whose non-last part is under 5 MiB."""
    bucket = fresh_bucket(target.server)
    client = target.client
    upload = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    parts = [
        {
            "PartNumber": n,
            "ETag": client.upload_part(
                Bucket=bucket, Key="mp", UploadId=upload, PartNumber=n, Body=b"x" * 1000
            )["ETag"],
        }
        for n in (1, 2)
    ]
    code = outcome(
        client.complete_multipart_upload,
        Bucket=bucket,
        Key="mp",
        UploadId=upload,
        MultipartUpload={"Parts": parts},
    )
    assert code == "EntityTooSmall"


def test_missing_content_type(target: Target) -> None:
    """Without Content-Type SeaweedFS guesses from the bytes, moto stores binary/octet-stream."""
    bucket = fresh_bucket(target.server)
    client = target.client
    client.put_object(Bucket=bucket, Key="page", Body=b"<html><body>hi</body></html>")
    stored = client.head_object(Bucket=bucket, Key="page")["ContentType"]
    # Difference: moto (like AWS) does not sniff the content.
    assert (
        stored
        == {"seaweedfs": "text/html; charset=utf-8", "moto": "binary/octet-stream"}[target.kind]
    )


def test_canned_acl(target: Target) -> None:
    """x-amz-acl public-read: moto keeps the AllUsers grant, SeaweedFS accepts and drops it."""
    bucket = fresh_bucket(target.server)
    client = target.client
    client.put_object(Bucket=bucket, Key="k", Body=b"x", ACL="public-read")
    grants = client.get_object_acl(Bucket=bucket, Key="k")["Grants"]
    public = [g for g in grants if g["Grantee"].get("URI", "").endswith("/global/AllUsers")]
    # Difference: on SeaweedFS check an ACL on the request the server received, not on the object.
    assert len(public) == {"seaweedfs": 0, "moto": 1}[target.kind]


def test_delete_non_empty_bucket(target: Target) -> None:
    """Deleting a bucket that holds an object: SeaweedFS deletes it, moto answers BucketNotEmpty."""
    bucket = fresh_bucket(target.server)
    client = target.client
    client.put_object(Bucket=bucket, Key="k", Body=b"x")
    # Difference: moto behaves like AWS here, SeaweedFS does not.
    code = outcome(client.delete_bucket, Bucket=bucket)
    assert code == {"seaweedfs": "ok", "moto": "BucketNotEmpty"}[target.kind]


def test_missing_bucket(target: Target) -> None:
    """A PUT into a missing bucket is NoSuchBucket on both servers."""
    client = target.client
    code = outcome(client.put_object, Bucket=f"missing-{uuid.uuid4().hex[:8]}", Key="k", Body=b"")
    assert code == "NoSuchBucket"
