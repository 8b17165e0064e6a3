"""The fault-injection proxy in front of the local S3 server, as a boto3 client sees it."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
for entry in (ROOT, ROOT / "tests" / "support"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import boto3  # noqa: E402 - after the sys.path insertion
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.config import Config  # noqa: E402
from botocore.exceptions import (  # noqa: E402
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
)
from faultproxy import (  # noqa: E402
    FaultProxy,
    b2_refusal,
    opaque_body,
    opaque_etag,
    r2_refusal,
)
from httpwire import RequestHead, RequestTap  # noqa: E402

from flood.testing.localserver import LocalS3  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """One local S3 server behind every proxy of this module."""
    with LocalS3(tmp_path_factory.mktemp("faultproxy")) as s3:
        yield s3


@pytest.fixture
def bucket(server: LocalS3) -> str:
    """A fresh bucket on the server."""
    name = f"fp-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return name


@pytest.fixture
def proxy(server: LocalS3) -> Iterator[FaultProxy]:
    """A proxy in front of the server, in pass mode."""
    with FaultProxy("127.0.0.1", server.port) as fp:
        yield fp


@pytest.fixture
def client(server: LocalS3, proxy: FaultProxy) -> Any:
    """A boto3 client that talks to the server through the proxy, with retries off."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=proxy.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.admin.access_key,
        aws_secret_access_key=server.admin.secret_key,
        config=Config(
            retries={"total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=10,
            s3={"addressing_style": "path"},
        ),
    )


@pytest.fixture
def recording(server: LocalS3) -> Iterator[FaultProxy]:
    """A proxy in front of the server that records the request heads it forwards."""
    with FaultProxy("127.0.0.1", server.port, record=True) as fp:
        yield fp


def client_for(server: LocalS3, proxy: FaultProxy) -> Any:
    """A boto3 client through `proxy`, with retries off."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=proxy.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.admin.access_key,
        aws_secret_access_key=server.admin.secret_key,
        config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}),
    )


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` until it holds, failing the test at the monotonic deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)  # a poll interval, not a synchronisation


def test_pass_forwards_requests(client: Any, proxy: FaultProxy, bucket: str) -> None:
    """In pass mode a PUT and a GET go through and come back intact."""
    body = bytes(range(256)) * 4096  # 1 MiB
    client.put_object(Bucket=bucket, Key="k", Body=body)
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == body
    assert proxy.mode == "pass" and proxy.connections >= 1 and proxy.requests_faulted == 0


def test_refuse_cuts_keepalive_and_refuses(client: Any, proxy: FaultProxy, bucket: str) -> None:
    """In refuse mode even a client with a kept-alive connection gets EndpointConnectionError."""
    client.put_object(Bucket=bucket, Key="k", Body=b"before")
    proxy.set_mode("refuse")
    with pytest.raises(EndpointConnectionError):
        client.get_object(Bucket=bucket, Key="k")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    proxy.set_mode("pass")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"before"


def test_reset_breaks_the_connection(client: Any, proxy: FaultProxy, bucket: str) -> None:
    """In reset mode a PUT dies with a connection error and nothing reaches the server."""
    proxy.set_mode("reset")
    with pytest.raises(ConnectionClosedError):
        client.put_object(Bucket=bucket, Key="k", Body=b"x" * 100_000)
    assert proxy.requests_faulted == 1
    proxy.set_mode("pass")
    assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


@pytest.mark.parametrize("as_file", [False, True], ids=["bytes", "file"])
def test_503_is_slow_down(client: Any, proxy: FaultProxy, bucket: str, as_file: bool) -> None:
    """In 503 mode a PUT (a file body brings Expect: 100-continue) is a SlowDown ClientError."""
    body: Any = io.BytesIO(b"y" * 100_000) if as_file else b"x" * 100_000
    proxy.set_mode("503")
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=bucket, Key="k", Body=body)
    assert info.value.response["Error"]["Code"] == "SlowDown"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert proxy.requests_faulted == 1


def test_503_reads_a_chunked_body(proxy: FaultProxy) -> None:
    """In 503 mode a chunked request body with trailers is read to its end before the answer."""
    proxy.set_mode("503")
    request = (
        b"PUT /b/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-amz-checksum-crc32: AAAAAA==\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Slow Down\r\n")
    assert b"Content-Type: application/xml" in head and b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"<Code>SlowDown</Code>" in body
    assert proxy.requests_faulted == 1


def test_unknown_mode_is_rejected(proxy: FaultProxy) -> None:
    """Setting a mode the proxy does not know raises ValueError and keeps the old mode."""
    with pytest.raises(ValueError, match="unknown mode"):
        proxy.set_mode("drop")
    assert proxy.mode == "pass"


def test_port_is_fixed_across_modes(proxy: FaultProxy) -> None:
    """The proxy keeps its port through refuse and back."""
    port = proxy.port
    for mode in ("refuse", "503", "refuse", "b2", "r2", "opaque-etag", "pass"):
        proxy.set_mode(mode)
        assert proxy.port == port and proxy.endpoint == f"http://127.0.0.1:{port}"
    socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_stop_is_prompt_with_idle_clients(server: LocalS3) -> None:
    """stop() returns within 5 s even while clients hold idle connections in every mode."""
    fp = FaultProxy("127.0.0.1", server.port)
    fp.start()
    idle = []
    for mode in ("pass", "503", "reset"):
        fp.set_mode(mode)
        idle.append(socket.create_connection(("127.0.0.1", fp.port), timeout=5))
    wait_until(lambda: fp.connections == 3)
    started = time.monotonic()
    fp.stop()
    assert time.monotonic() - started < 5.5
    assert fp.connections == 3
    for sock in idle:
        sock.close()


def test_record_is_off_by_default(client: Any, proxy: FaultProxy, bucket: str) -> None:
    """A proxy made without record= keeps no request heads."""
    client.put_object(Bucket=bucket, Key="k", Body=b"x")
    assert proxy.received == []


def test_record_shows_headers_the_server_drops(
    server: LocalS3, recording: FaultProxy, bucket: str
) -> None:
    """The record holds the x-amz-acl the server accepted but did not keep on the object."""
    client = client_for(server, recording)
    client.put_object(Bucket=bucket, Key="a/k", Body=b"x", ACL="public-read", Metadata={"m": "1"})
    grants = client.get_object_acl(Bucket=bucket, Key="a/k")["Grants"]
    assert not [g for g in grants if "AllUsers" in g["Grantee"].get("URI", "")]
    put = [h for h in recording.received if h.method == "PUT"]
    assert [h.target for h in put] == [f"/{bucket}/a/k"]
    assert put[0].header("X-Amz-Acl") == "public-read" and put[0].header("x-amz-meta-m") == "1"
    assert (put[0].header("authorization") or "").startswith("AWS4-HMAC-SHA256 ")


def test_record_follows_a_kept_alive_connection(
    server: LocalS3, recording: FaultProxy, bucket: str
) -> None:
    """Every request on one kept-alive connection is recorded in order, a 100-continue PUT too."""
    client = client_for(server, recording)
    client.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(b"z" * 300_000))
    client.get_object(Bucket=bucket, Key="k")["Body"].read()
    client.head_object(Bucket=bucket, Key="k")
    heads = recording.received
    assert [(h.method, h.target) for h in heads] == [
        ("PUT", f"/{bucket}/k"),
        ("GET", f"/{bucket}/k"),
        ("HEAD", f"/{bucket}/k"),
    ]
    assert heads[0].header("expect") == "100-continue" and heads[0].content_length == 300_000
    assert recording.connections == 1
    recording.clear_received()
    assert recording.received == []


def test_tap_finds_heads_byte_by_byte() -> None:
    """The tap finds each head of a pipelined stream fed one byte at a time: sized, chunked
    with trailers, and bodiless requests."""
    stream = (
        b"PUT /b/one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"PUT /b/two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-amz-checksum-crc32: AAAAAA==\r\n\r\n"
        b"PUT /b/three HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /b/four HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    tap = RequestTap()
    heads = [head for i in range(len(stream)) for head in tap.feed(stream[i : i + 1])]
    assert [h.target for h in heads] == ["/b/one", "/b/two", "/b/three", "/b/four"]
    assert heads[1].chunked and heads[0].content_length == 5 and not tap.broken
    assert RequestTap().feed(stream) == heads


def test_tap_goes_quiet_on_bytes_that_are_not_http() -> None:
    """Fed bytes that are not HTTP (a TLS hello), the tap returns nothing and stays broken."""
    tap = RequestTap()
    assert tap.feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n") == []
    assert tap.broken and tap.feed(b"GET / HTTP/1.1\r\n\r\n") == []


# -- provider modes ------------------------------------------------------------------------------


def quirk_client(server: LocalS3, proxy: FaultProxy, *, checksums: str = "when_supported") -> Any:
    """A boto3 client through `proxy` with retries off; `checksums` is botocore's
    request_checksum_calculation (its default sends CRC32 checksum headers)."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=proxy.endpoint,
        region_name="us-east-1",
        aws_access_key_id=server.admin.access_key,
        aws_secret_access_key=server.admin.secret_key,
        config=Config(
            retries={"total_max_attempts": 1},
            s3={"addressing_style": "path"},
            request_checksum_calculation=checksums,
            response_checksum_validation=checksums,
        ),
    )


@pytest.fixture
def quirk(server: LocalS3, request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    """A recording proxy in the provider mode the test is parametrised with (`mode`)."""
    with FaultProxy("127.0.0.1", server.port, record=True) as fp:
        fp.set_mode(request.param)
        yield fp


def b64md5(data: bytes) -> str:
    """The Content-MD5 header value for `data`."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def error_of(call: Callable[..., Any], **kwargs: Any) -> tuple[int, str, str]:
    """The HTTP status, S3 code and message `call(**kwargs)` fails with."""
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    response = info.value.response
    return (
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Code"],
        response["Error"].get("Message", ""),
    )


def stored(server: LocalS3, bucket: str, key: str) -> bytes | None:
    """The object's bytes read straight from the server (not through a proxy), or None."""
    try:
        return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]
    except ClientError:
        return None


def raw_exchange(port: int, *requests: bytes) -> list[bytes]:
    """Send each request on one connection and read its answer (a Content-Length body);
    the answers' heads and bodies."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for request in requests:
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":", 1)[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            while len(body) < length:
                body += sock.recv(65536)
            answers.append(head + b"\r\n\r\n" + body)
    return answers


AWS_CHUNKED_PUT = (
    b"PUT /{bucket}/streamed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Encoding: aws-chunked\r\nX-Amz-Decoded-Content-Length: 5\r\n"
    b"X-Amz-Content-SHA256: STREAMING-UNSIGNED-PAYLOAD-TRAILER\r\n"
    b"X-Amz-Trailer: x-amz-checksum-crc32\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32:NhCmhg==\r\n\r\n"
)  # as boto3 sends a PutObject over TLS by default (trailers are for TLS only)
GET_ROOT = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize("quirk", ["b2"], indirect=True)
@pytest.mark.parametrize("as_file", [False, True], ids=["bytes", "file"])
def test_b2_refuses_boto3s_default_checksums(
    server: LocalS3, quirk: FaultProxy, bucket: str, as_file: bool
) -> None:
    """In b2 mode boto3's default CRC32 checksum headers are answered 400 InvalidArgument,
    Unsupported header, and nothing reaches the server (a file body brings Expect:
    100-continue)."""
    body: Any = io.BytesIO(b"x" * 100_000) if as_file else b"x" * 100_000
    client = quirk_client(server, quirk)
    status, code, message = error_of(client.put_object, Bucket=bucket, Key="k", Body=body)
    assert (status, code) == (400, "InvalidArgument")
    assert re.fullmatch(
        r"Unsupported header 'x-amz-[a-z0-9-]+' received for this API call\.", message
    )
    assert "checksum" in message
    assert [(h.method, h.target) for h in quirk.refused] == [("PUT", f"/{bucket}/k")]
    assert stored(server, bucket, "k") is None
    assert quirk.requests_faulted == 1


@pytest.mark.parametrize("quirk", ["b2"], indirect=True)
def test_b2_passes_requests_without_checksums(
    server: LocalS3, quirk: FaultProxy, bucket: str
) -> None:
    """In b2 mode a client that sends checksums only when required (and Content-MD5 itself)
    puts, reads and uploads in parts through the relay, all on kept-alive connections."""
    client = quirk_client(server, quirk, checksums="when_required")
    body = bytes(range(256)) * 400
    client.put_object(Bucket=bucket, Key="small", Body=body, ContentMD5=b64md5(body))
    big = b"".join(bytes([i]) * (1024 * 1024) for i in range(12))
    client.upload_fileobj(
        io.BytesIO(big),
        bucket,
        "big",
        Config=TransferConfig(
            multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024
        ),
    )
    assert client.get_object(Bucket=bucket, Key="small")["Body"].read() == body
    assert client.head_object(Bucket=bucket, Key="big")["ContentLength"] == len(big)
    assert stored(server, bucket, "big") == big
    assert quirk.refused == [] and quirk.requests_faulted == 0
    methods = [h.method for h in quirk.received]
    assert methods.count("POST") == 2 and methods.count("PUT") == 1 + 3  # the parts: 5, 5, 2 MiB


@pytest.mark.parametrize("quirk", ["b2"], indirect=True)
def test_b2_refuses_a_storage_class_other_than_standard(
    server: LocalS3, quirk: FaultProxy, bucket: str
) -> None:
    """In b2 mode STANDARD_IA is answered 400 and STANDARD passes."""
    client = quirk_client(server, quirk, checksums="when_required")
    status, code, message = error_of(
        client.put_object, Bucket=bucket, Key="ia", Body=b"x", StorageClass="STANDARD_IA"
    )
    assert (status, code) == (400, "NotImplemented")
    assert message == "Backblaze only supports the 'STANDARD' storage class, and not STANDARD_IA"
    client.put_object(Bucket=bucket, Key="std", Body=b"y", StorageClass="STANDARD")
    assert (stored(server, bucket, "ia"), stored(server, bucket, "std")) == (None, b"y")


@pytest.mark.parametrize("quirk", ["b2"], indirect=True)
def test_b2_refuses_checksum_mode_on_head(server: LocalS3, quirk: FaultProxy, bucket: str) -> None:
    """In b2 mode a HEAD asking for checksums (x-amz-checksum-mode) is answered 400 without a
    body; a plain HEAD of the same object passes."""
    client = quirk_client(server, quirk, checksums="when_required")
    client.put_object(Bucket=bucket, Key="k", Body=b"z")
    status, code, _ = error_of(client.head_object, Bucket=bucket, Key="k", ChecksumMode="ENABLED")
    assert (status, code) == (400, "400")  # a HEAD answer has no body to carry the code
    assert client.head_object(Bucket=bucket, Key="k")["ContentLength"] == 1
    assert [h.header("x-amz-checksum-mode") for h in quirk.refused] == ["ENABLED"]


@pytest.mark.parametrize(
    ("quirk", "status", "message"),
    [
        ("b2", 400, b"Unsupported header 'x-amz-trailer'"),
        ("r2", 501, b"Header 'x-amz-content-sha256' with value 'STREAMING-UNSIGNED-PAYLOAD-"),
    ],
    indirect=["quirk"],
)
def test_aws_chunked_bodies_are_refused_and_the_connection_kept(
    quirk: FaultProxy, bucket: str, status: int, message: bytes
) -> None:
    """An aws-chunked streaming PUT is refused, its chunked body read to its end, and the
    next request on the same connection reaches the server."""
    refused, forwarded = raw_exchange(
        quirk.port, AWS_CHUNKED_PUT.replace(b"{bucket}", bucket.encode()), GET_ROOT
    )
    assert refused.startswith(f"HTTP/1.1 {status} ".encode()) and message in refused
    assert b"Server: SeaweedFS" in forwarded  # the unsigned GET is the server's to refuse
    assert [h.method for h in quirk.received] == ["PUT", "GET"]
    assert [h.method for h in quirk.refused] == ["PUT"] and quirk.connections == 1


@pytest.mark.parametrize("quirk", ["b2"], indirect=True)
def test_b2_refuses_content_encoding_aws_chunked_alone(quirk: FaultProxy, bucket: str) -> None:
    """In b2 mode Content-Encoding: aws-chunked is refused even without checksum headers."""
    request = (
        f"PUT /{bucket}/k HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: gzip, aws-chunked\r\n"
        "Content-Length: 3\r\n\r\nabc"
    ).encode()
    [answer] = raw_exchange(quirk.port, request)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"<Code>InvalidArgument</Code>" in answer
    assert b"Unsupported header 'content-encoding' received for this API call." in answer


@pytest.mark.parametrize("quirk", ["r2"], indirect=True)
def test_r2_takes_checksum_headers_but_not_tagging(
    server: LocalS3, quirk: FaultProxy, bucket: str
) -> None:
    """In r2 mode boto3's default checksum headers pass (R2 implements CRC32), while
    x-amz-tagging is answered 501 NotImplemented naming the header and its value."""
    client = quirk_client(server, quirk)
    client.put_object(Bucket=bucket, Key="crc", Body=b"checked")
    assert [h.header("x-amz-checksum-crc32") is not None for h in quirk.received] == [True]
    status, code, message = error_of(
        client.put_object, Bucket=bucket, Key="tagged", Body=b"t", Tagging="team=ops&x=1"
    )
    assert (status, code) == (501, "NotImplemented")
    assert message == "Header 'x-amz-tagging' with value 'team=ops&x=1' not implemented"
    assert (stored(server, bucket, "crc"), stored(server, bucket, "tagged")) == (b"checked", None)
    assert [h.target for h in quirk.refused] == [f"/{bucket}/tagged"]


@pytest.mark.parametrize("quirk", ["r2"], indirect=True)
def test_r2_refuses_sse_headers_on_put_and_multipart(
    server: LocalS3, quirk: FaultProxy, bucket: str
) -> None:
    """In r2 mode SSE-S3 on PutObject and SSE-KMS on CreateMultipartUpload are answered 501."""
    client = quirk_client(server, quirk, checksums="when_required")
    status, code, message = error_of(
        client.put_object, Bucket=bucket, Key="k", Body=b"s", ServerSideEncryption="AES256"
    )
    assert (status, code) == (501, "NotImplemented")
    assert message == "Header 'x-amz-server-side-encryption' with value 'AES256' not implemented"
    status, code, _ = error_of(
        client.create_multipart_upload,
        Bucket=bucket,
        Key="mp",
        ServerSideEncryption="aws:kms",
        SSEKMSKeyId="key-1",
    )
    assert (status, code) == (501, "NotImplemented")
    assert [h.method for h in quirk.refused] == ["PUT", "POST"]
    assert server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_r2_rules_pass_sse_c_and_plain_requests() -> None:
    """R2 implements SSE-C and checksum headers: the r2 rules let them through, as every
    request without a refused header."""
    sse_c = RequestHead(
        "PUT",
        "/b/k",
        "HTTP/1.1",
        (
            ("X-Amz-Server-Side-Encryption-Customer-Algorithm", "AES256"),
            ("X-Amz-Server-Side-Encryption-Customer-Key", "a2V5"),
            ("x-amz-checksum-sha256", "abc="),
            ("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"),
        ),
    )
    assert r2_refusal(sse_c) is None
    assert r2_refusal(RequestHead("GET", "/", "HTTP/1.1", (("Host", "x"),))) is None
    assert b2_refusal(RequestHead("PUT", "/b/k", "HTTP/1.1", (("Content-MD5", "x=="),))) is None


@pytest.mark.parametrize("quirk", ["opaque-etag"], indirect=True)
def test_opaque_etag_hides_the_md5_of_a_put(
    server: LocalS3, quirk: FaultProxy, bucket: str
) -> None:
    """In opaque-etag mode PutObject, HEAD and GET answer one opaque ETag, not the MD5 the
    server holds; the bytes are the ones sent."""
    client = quirk_client(server, quirk)
    body = b"opaque body"
    put = client.put_object(Bucket=bucket, Key="k", Body=body, ContentMD5=b64md5(body))
    real = f'"{hashlib.md5(body).hexdigest()}"'
    assert put["ETag"] == opaque_etag(real) and put["ETag"].startswith('"opaque-')
    assert hashlib.md5(body).hexdigest() not in put["ETag"]
    head = client.head_object(Bucket=bucket, Key="k")
    assert head["ETag"] == put["ETag"]
    # Nor does SeaweedFS's own copy of the ETag (Seaweed-X-Amz-Etag) get through.
    etags = {k: v for k, v in head["ResponseMetadata"]["HTTPHeaders"].items() if "etag" in k}
    assert etags and set(etags.values()) == {put["ETag"]}
    got = client.get_object(Bucket=bucket, Key="k")
    assert (got["ETag"], got["Body"].read()) == (put["ETag"], body)
    assert server.client().head_object(Bucket=bucket, Key="k")["ETag"] == real
    assert quirk.refused == []


@pytest.mark.parametrize("quirk", ["opaque-etag"], indirect=True)
def test_opaque_etag_hides_a_multipart_etag(
    server: LocalS3, quirk: FaultProxy, bucket: str
) -> None:
    """In opaque-etag mode a multipart upload completes (part ETags are handed back as the
    server gave them) and CompleteMultipartUpload's <ETag> and header are opaque."""
    client = quirk_client(server, quirk)
    parts = [b"a" * (5 * 1024 * 1024), b"b" * 1000]
    upload = client.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    done = []
    for number, part in enumerate(parts, start=1):
        answer = client.upload_part(
            Bucket=bucket, Key="mp", UploadId=upload, PartNumber=number, Body=part
        )
        assert answer["ETag"] == f'"{hashlib.md5(part).hexdigest()}"'
        done.append({"PartNumber": number, "ETag": answer["ETag"]})
    completed = client.complete_multipart_upload(
        Bucket=bucket, Key="mp", UploadId=upload, MultipartUpload={"Parts": done}
    )
    real = server.client().head_object(Bucket=bucket, Key="mp")["ETag"]
    assert real.endswith('-2"')
    assert completed["ETag"] == opaque_etag(real)
    assert client.head_object(Bucket=bucket, Key="mp")["ETag"] == opaque_etag(real)
    assert stored(server, bucket, "mp") == b"".join(parts)


def testopaque_body_rewrites_each_etag_element() -> None:
    """The <ETag> of a CompleteMultipartUpload answer is replaced whether quoted as &quot;,
    &#34; or bare, and nothing else in the document changes."""
    body = (
        b"<CompleteMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>"
        b"<ETag>&#34;abc-2&#34;</ETag></CompleteMultipartUploadResult>"
    )
    rewritten = opaque_body(body)
    assert rewritten == body.replace(
        b"&#34;abc-2&#34;", opaque_etag('"abc-2"').replace('"', "&quot;").encode()
    )
    assert opaque_body(b"<ETag>abc-2</ETag>") == opaque_body(b"<ETag>&quot;abc-2&quot;</ETag>")


@pytest.mark.parametrize("quirk", ["b2", "r2", "opaque-etag"], indirect=True)
def test_provider_modes_relay_a_kept_alive_connection_in_order(
    server: LocalS3, quirk: FaultProxy, bucket: str
) -> None:
    """In every provider mode one kept-alive connection carries PUT (with Expect:
    100-continue), GET, HEAD and a ListObjects of a 1 MiB object, each recorded in order."""
    client = quirk_client(server, quirk, checksums="when_required")
    body = bytes(range(256)) * 4096
    client.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(body))
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == body
    assert client.head_object(Bucket=bucket, Key="k")["ContentLength"] == len(body)
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["k"]
    heads = quirk.received
    assert [(h.method, h.target.partition("?")[0]) for h in heads] == [
        ("PUT", f"/{bucket}/k"),
        ("GET", f"/{bucket}/k"),
        ("HEAD", f"/{bucket}/k"),
        ("GET", f"/{bucket}"),
    ]
    assert heads[0].header("expect") == "100-continue"
    assert quirk.connections == 1 and quirk.refused == []


class ScriptedServer:
    """A one-connection HTTP server that answers each request with the next canned answer."""

    def __init__(self, *answers: bytes) -> None:
        self.answers = list(answers)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            for answer in self.answers:
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                _, _, data = data.partition(b"\r\n\r\n")  # the requests here have no body
                conn.sendall(answer)
        self.listener.close()


def test_opaque_etag_rewrites_a_chunked_complete_answer_and_relays_one_ended_by_close() -> None:
    """In opaque-etag mode a chunked CompleteMultipartUpload answer reaches the client
    de-chunked, with its <ETag> opaque and a Content-Length; an answer without a length is
    relayed up to the server's close, and the client's connection is closed after it."""
    document = (
        b"<CompleteMultipartUploadResult><ETag>&quot;abc-2&quot;</ETag>"
        b"</CompleteMultipartUploadResult>"
    )
    chunked = (
        b'HTTP/1.1 200 OK\r\nETag: "abc-2"\r\nTransfer-Encoding: chunked\r\n\r\n'
        + b"".join(
            f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            for piece in (document[:30], document[30:])
        )
        + b"0\r\n\r\n"
    )
    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end"
    upstream = ScriptedServer(chunked, until_close)
    with FaultProxy("127.0.0.1", upstream.port) as proxy:
        proxy.set_mode("opaque-etag")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"POST /b/k?uploadId=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            sock.sendall(b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    first, _, rest = answer.partition(b"\r\n\r\n")
    opaque = opaque_etag("abc-2")
    body = document.replace(b"&quot;abc-2&quot;", opaque.replace('"', "&quot;").encode())
    assert f"ETag: {opaque}".encode() in first and b"Transfer-Encoding" not in first
    assert f"Content-Length: {len(body)}".encode() in first
    assert rest[: len(body)] == body
    assert rest[len(body) :] == until_close
    upstream.thread.join(5)
