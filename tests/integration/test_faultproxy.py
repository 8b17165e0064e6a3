"""The fault-injection proxy in front of the local S3 server, as a boto3 client sees it."""

from __future__ import annotations

import io
import socket
import sys
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
from botocore.config import Config  # noqa: E402
from botocore.exceptions import (  # noqa: E402
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
)
from faultproxy import FaultProxy  # noqa: E402
from httpwire import RequestTap  # noqa: E402

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
    for mode in ("refuse", "503", "refuse", "pass"):
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
