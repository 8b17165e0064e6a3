"""tinyproxy, a third-party forward proxy, between boto3 and the local servers."""

from __future__ import annotations

import io
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ProxyConnectionError
from faultproxy import FaultProxy
from spool import wait_for
from tinyproxy import TinyProxy, find_tinyproxy
from tlsca import HttpsS3

from flood.testing.localserver import REGION, Identity, LocalS3

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        find_tinyproxy() is None,
        reason="tinyproxy is not installed (apt-get install tinyproxy; .ci/run does)",
    ),
]

EXPECT_TIMEOUT = 1.0  # how long botocore waits for 100 Continue before it sends the body anyway


@pytest.fixture
def recorder(s3: LocalS3) -> Iterator[FaultProxy]:
    """A recording relay in front of SeaweedFS: what the server received from tinyproxy."""
    with FaultProxy("127.0.0.1", s3.port, record=True) as relay:
        yield relay


def client_via(proxy_url: str, endpoint: str, identity: Identity, *, verify: Any = None) -> Any:
    """A boto3 client for `endpoint` through the proxy at `proxy_url`, retries off."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=identity.access_key,
        aws_secret_access_key=identity.secret_key,
        verify=verify,
        config=Config(
            proxies={"http": proxy_url, "https": proxy_url},
            retries={"total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=10,
            s3={"addressing_style": "path"},
        ),
    )


def fresh_bucket(server: LocalS3) -> str:
    """Create a uniquely named bucket and return its name."""
    name = f"tp-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return name


def test_absolute_form_put_and_get(tinyproxy: TinyProxy, s3: LocalS3, recorder: FaultProxy) -> None:
    """A PUT and a GET to an http endpoint go through tinyproxy, which marks them with Via."""
    bucket = fresh_bucket(s3)
    client = client_via(tinyproxy.url, recorder.endpoint, s3.admin)
    body = bytes(range(256)) * 1024
    client.put_object(Bucket=bucket, Key="k", Body=body)
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == body
    assert s3.client().get_object(Bucket=bucket, Key="k")["Body"].read() == body
    url = f"{recorder.endpoint}/{bucket}/k"
    wait_for(lambda: f"GET {url} HTTP/1.1" in tinyproxy.requests(), 5, "tinyproxy's log")
    assert f"PUT {url} HTTP/1.1" in tinyproxy.requests()
    received = [h for h in recorder.received if h.target == f"/{bucket}/k"]
    assert [h.method for h in received] == ["PUT", "GET"]
    assert all("tinyproxy" in (h.header("via") or "") for h in received)
    # tinyproxy opens one upstream connection per request and says so
    assert all(h.header("connection") == "close" for h in received)


def test_100_continue_is_not_relayed(
    tinyproxy: TinyProxy, s3: LocalS3, recorder: FaultProxy
) -> None:
    """tinyproxy forwards Expect: 100-continue but not the answer: the PUT waits out 1 s."""
    bucket = fresh_bucket(s3)
    client = client_via(tinyproxy.url, recorder.endpoint, s3.admin)
    started = time.monotonic()
    client.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(b"e" * 10_000))
    assert time.monotonic() - started >= EXPECT_TIMEOUT * 0.9
    (put,) = [h for h in recorder.received if h.method == "PUT"]
    assert put.header("expect") == "100-continue"
    assert s3.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"e" * 10_000


def test_connect_to_any_port(tinyproxy: TinyProxy, s3_https: HttpsS3) -> None:
    """With no ConnectPort line, tinyproxy tunnels to the HTTPS server's high port."""
    server = s3_https.server
    bucket = fresh_bucket(server)
    ca_bundle = str(s3_https.ca_bundle)
    client = client_via(tinyproxy.url, s3_https.endpoint, server.admin, verify=ca_bundle)
    client.put_object(Bucket=bucket, Key="k", Body=b"tunnelled")
    assert s3_https.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"tunnelled"
    line = f"CONNECT localhost:{server.https_port} "  # http.client tunnels with HTTP/1.0
    wait_for(lambda: any(r.startswith(line) for r in tinyproxy.requests()), 5, "tinyproxy's log")


def test_packaged_connect_ports_refuse_other_ports(tmp_path: Path, s3_https: HttpsS3) -> None:
    """With Debian's ConnectPort 443 and 563, a CONNECT to another port is refused."""
    with TinyProxy(tmp_path, connect_ports=(443, 563)) as proxy:
        server = s3_https.server
        ca_bundle = str(s3_https.ca_bundle)
        client = client_via(proxy.url, s3_https.endpoint, server.admin, verify=ca_bundle)
        with pytest.raises(ProxyConnectionError) as info:
            client.list_buckets()
    assert "403" in str(info.value.kwargs["error"])


def test_basic_auth(tmp_path: Path, s3: LocalS3) -> None:
    """With BasicAuth, a request without credentials is answered 407 and one with them passes."""
    bucket = fresh_bucket(s3)
    with TinyProxy(tmp_path, auth=("flood", "pr0xy")) as proxy:
        assert proxy.url == f"http://flood:pr0xy@127.0.0.1:{proxy.port}"
        bare = f"http://127.0.0.1:{proxy.port}"
        with pytest.raises(ClientError) as info:
            client_via(bare, s3.endpoint, s3.admin).head_bucket(Bucket=bucket)
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 407
        client_via(proxy.url, s3.endpoint, s3.admin).put_object(Bucket=bucket, Key="k", Body=b"1")
    assert s3.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"


def test_stop_ends_the_process(tmp_path: Path) -> None:
    """stop() ends tinyproxy and its port stops accepting; a second stop() does nothing."""
    proxy = TinyProxy(tmp_path)
    proxy.start()
    assert proxy.running and "ConnectPort" not in proxy.config_path.read_text()
    proxy.stop()
    proxy.stop()
    assert not proxy.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
