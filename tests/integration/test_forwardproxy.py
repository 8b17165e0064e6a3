"""The suite's own forward proxy: tunnels, absolute-form requests, authentication, names only it
resolves, tinyproxy's 100-continue, refused CONNECTs, and TLS it terminates for Amazon names."""

from __future__ import annotations

import io
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ProxyConnectionError, SSLError
from forwardproxy import Carry, ForwardProxy
from motoserver import MotoServer
from tlsca import HttpsS3

from flood.testing.localserver import ADMIN_ACTIONS, REGION, Identity, LocalS3

pytestmark = pytest.mark.timeout(120)

Start = Callable[..., ForwardProxy]
MAPPED = "s3.flood.test"  # resolves inside the proxy only
AMAZON = "*.s3.us-east-1.amazonaws.com"
EXPECT_TIMEOUT = 1.0  # how long botocore waits for 100 Continue before it sends the body anyway


def client_via(
    proxy: ForwardProxy,
    endpoint: str | None,
    identity: Identity,
    *,
    verify: Any = None,
    proxy_url: str | None = None,
    addressing: str = "path",
) -> Any:
    """A boto3 client for `endpoint` (None: Amazon's own) through `proxy`, retries off."""
    url = proxy_url or proxy.url
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=identity.access_key,
        aws_secret_access_key=identity.secret_key,
        verify=verify,
        config=Config(
            proxies={"http": url, "https": url},
            retries={"total_max_attempts": 1},
            connect_timeout=5,
            read_timeout=10,
            s3={"addressing_style": addressing, "us_east_1_regional_endpoint": "regional"},
        ),
    )


def fresh_bucket(server: Any) -> str:
    """Create a uniquely named bucket and return its name."""
    name = f"px-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return name


def raw_exchange(proxy: ForwardProxy, request: bytes) -> bytes:
    """Send raw bytes to the proxy and read its answer to the end of the connection."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_absolute_form_reaches_a_name_only_the_proxy_knows(
    forward_proxy: Start, s3: LocalS3
) -> None:
    """PUT, GET and HEAD to http://s3.flood.test go through the proxy, which alone resolves it."""
    proxy = forward_proxy(hosts={MAPPED: ("127.0.0.1", s3.port)})
    bucket = fresh_bucket(s3)
    client = client_via(proxy, f"http://{MAPPED}:9000", s3.admin)
    body = bytes(range(256)) * 2048
    client.put_object(Bucket=bucket, Key="a/k", Body=body)
    assert client.get_object(Bucket=bucket, Key="a/k")["Body"].read() == body
    assert client.head_object(Bucket=bucket, Key="a/k")["ContentLength"] == len(body)
    assert s3.client().get_object(Bucket=bucket, Key="a/k")["Body"].read() == body
    url = f"http://{MAPPED}:9000/{bucket}/a/k"
    log = proxy.log
    assert [(e.kind, e.method, e.target, e.status) for e in log] == [
        (Carry.HTTP, "PUT", url, 200),
        (Carry.HTTP, "GET", url, 200),
        (Carry.HTTP, "HEAD", url, 200),
    ]
    assert {e.header("host") for e in log} == {f"{MAPPED}:9000"}
    assert all(e.upstream == ("127.0.0.1", s3.port) for e in log)


def test_connect_tunnels_https(forward_proxy: Start, s3_https: HttpsS3) -> None:
    """An https endpoint is reached through a CONNECT tunnel the proxy cannot see into."""
    proxy = forward_proxy()
    bucket = fresh_bucket(s3_https.server)
    client = client_via(
        proxy, s3_https.endpoint, s3_https.server.admin, verify=str(s3_https.ca_bundle)
    )
    client.put_object(Bucket=bucket, Key="k", Body=b"tunnelled")
    assert s3_https.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"tunnelled"
    log = proxy.log
    assert {(e.kind, e.method, e.target, e.status) for e in log} == {
        (Carry.CONNECT, "CONNECT", f"localhost:{s3_https.server.https_port}", 200)
    }


def test_a_mapped_name_still_needs_a_matching_certificate(
    forward_proxy: Start, s3_https: HttpsS3
) -> None:
    """Tunnelled to the real TLS server under a name its certificate lacks, boto3 refuses it."""
    proxy = forward_proxy(hosts={MAPPED: ("127.0.0.1", s3_https.server.https_port)})
    client = client_via(
        proxy, f"https://{MAPPED}", s3_https.server.admin, verify=str(s3_https.ca_bundle)
    )
    with pytest.raises(SSLError, match=f"hostname '{MAPPED}' doesn't match"):
        client.list_buckets()
    assert [(e.target, e.status) for e in proxy.log] == [(f"{MAPPED}:443", 200)]


def test_basic_authentication(forward_proxy: Start, s3_https: HttpsS3, s3: LocalS3) -> None:
    """With auth on, requests without the credentials get 407 and requests with them pass."""
    proxy = forward_proxy(auth=("flood", "s3cr3t:!"), hosts={MAPPED: ("127.0.0.1", s3.port)})
    bare = f"http://127.0.0.1:{proxy.port}"
    tls, ca_bundle = s3_https.server, str(s3_https.ca_bundle)
    with pytest.raises(ProxyConnectionError):
        client_via(
            proxy, s3_https.endpoint, tls.admin, verify=ca_bundle, proxy_url=bare
        ).list_buckets()
    with pytest.raises(ClientError) as info:
        client_via(proxy, f"http://{MAPPED}", s3.admin, proxy_url=bare).list_buckets()
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 407
    assert [(e.kind, e.status) for e in proxy.log] == [(Carry.CONNECT, 407), (Carry.HTTP, 407)]
    proxy.clear_log()
    client_via(proxy, s3_https.endpoint, tls.admin, verify=ca_bundle).list_buckets()
    client_via(proxy, f"http://{MAPPED}", s3.admin).list_buckets()
    assert [(e.kind, e.status) for e in proxy.log] == [(Carry.CONNECT, 200), (Carry.HTTP, 200)]
    assert all((e.header("proxy-authorization") or "").startswith("Basic ") for e in proxy.log)


def test_407_carries_a_basic_challenge(forward_proxy: Start) -> None:
    """The 407 answer names the Basic scheme in Proxy-Authenticate and closes the connection."""
    proxy = forward_proxy(auth=("u", "p"))
    answer = raw_exchange(proxy, b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
    head = answer.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 407 Proxy Authentication Required"
    assert b'Proxy-Authenticate: Basic realm="flood-test-proxy"' in head
    assert b"Connection: close" in head


def test_refused_connect_is_403(forward_proxy: Start, s3_https: HttpsS3) -> None:
    """In refuse_connect mode a CONNECT is answered 403 and boto3 raises ProxyConnectionError."""
    proxy = forward_proxy(refuse_connect=True)
    client = client_via(
        proxy, s3_https.endpoint, s3_https.server.admin, verify=str(s3_https.ca_bundle)
    )
    with pytest.raises(ProxyConnectionError) as info:
        client.list_buckets()
    assert "403 Forbidden" in str(info.value.kwargs["error"])
    assert [(e.kind, e.status, e.upstream) for e in proxy.log] == [(Carry.CONNECT, 403, None)]
    proxy.refuse_connect = False
    client.list_buckets()
    assert proxy.log[-1].status == 200


def test_100_continue_relayed_or_not(forward_proxy: Start, s3: LocalS3) -> None:
    """A 100 Continue reaches the client by default; with relay_continue off (like tinyproxy)
    it does not, and the PUT waits out botocore's own 1 s before sending its body."""
    proxy = forward_proxy(hosts={MAPPED: ("127.0.0.1", s3.port)})
    bucket = fresh_bucket(s3)
    client = client_via(proxy, f"http://{MAPPED}", s3.admin)
    client.put_object(Bucket=bucket, Key="relayed", Body=io.BytesIO(b"r" * 10_000))
    proxy.relay_continue = False
    started = time.monotonic()
    client.put_object(Bucket=bucket, Key="held", Body=io.BytesIO(b"h" * 10_000))
    waited = time.monotonic() - started
    relayed, held = proxy.log
    assert relayed.header("expect") == held.header("expect") == "100-continue"
    assert relayed.continued and not held.continued
    assert waited >= EXPECT_TIMEOUT * 0.9
    assert s3.client().get_object(Bucket=bucket, Key="held")["Body"].read() == b"h" * 10_000


def test_a_refused_put_is_relayed(forward_proxy: Start, s3: LocalS3) -> None:
    """SeaweedFS's 403 to a badly signed 100-continue PUT reaches the client as the S3 error
    (SeaweedFS sends its 100 Continue before it checks the signature)."""
    proxy = forward_proxy(hosts={MAPPED: ("127.0.0.1", s3.port)})
    bucket = fresh_bucket(s3)
    wrong = Identity("wrong", s3.admin.access_key, "x" * 40, ADMIN_ACTIONS)
    client = client_via(proxy, f"http://{MAPPED}", wrong)
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=bucket, Key="k", Body=io.BytesIO(b"z" * 300_000))
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert [(e.method, e.status, e.continued) for e in proxy.log] == [("PUT", 403, True)]


def test_an_answer_before_the_body_ends_the_connection(forward_proxy: Start) -> None:
    """When the server answers a 100-continue request before the body is sent, the client gets
    that answer and the proxy closes the connection (its framing is lost)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        proxy = forward_proxy(hosts={MAPPED: listener.getsockname()})
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.sendall(
                f"PUT http://{MAPPED}/b/k HTTP/1.1\r\nHost: {MAPPED}\r\n"
                "Content-Length: 10\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            server, _ = listener.accept()
            with server:
                server.settimeout(5)
                assert server.recv(65536).startswith(b"PUT /b/k HTTP/1.1\r\n")
                server.sendall(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
                answer = b""
                while chunk := client.recv(65536):
                    answer += chunk
    assert answer == b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n"
    assert [(e.method, e.status, e.continued) for e in proxy.log] == [("PUT", 417, False)]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n",
    ],
    ids=["connect-name", "absolute-name", "connect-ip"],
)
def test_nothing_leaves_the_machine(forward_proxy: Start, request_bytes: bytes) -> None:
    """A name the proxy does not map, or an IP off loopback, is answered 502 and never tried."""
    proxy = forward_proxy()
    answer = raw_exchange(proxy, request_bytes)
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert [(e.status, e.upstream) for e in proxy.log] == [(502, None)]


def test_tls_terminated_for_amazon_style_hosts(
    forward_proxy: Start, moto: MotoServer, ca: Any
) -> None:
    """With Amazon's own endpoint and virtual-hosted addressing, the proxy takes the TLS for
    mybucket.s3.us-east-1.amazonaws.com and moto receives the request, Host header and all."""
    proxy = forward_proxy(terminate={AMAZON: ("127.0.0.1", moto.port)})
    bucket = fresh_bucket(moto)
    client = client_via(proxy, None, moto.admin, verify=str(ca.bundle), addressing="virtual")
    client.put_object(Bucket=bucket, Key="v/k", Body=b"virtual")
    assert client.get_object(Bucket=bucket, Key="v/k")["Body"].read() == b"virtual"
    assert moto.client().get_object(Bucket=bucket, Key="v/k")["Body"].read() == b"virtual"
    host = f"{bucket}.s3.us-east-1.amazonaws.com"
    tls = [e for e in proxy.log if e.kind == Carry.TLS]
    assert [(e.method, e.target, e.status) for e in tls] == [
        ("PUT", f"https://{host}/v/k", 200),
        ("GET", f"https://{host}/v/k", 200),
    ]
    assert {e.header("host") for e in tls} == {host}
    connects = [e for e in proxy.log if e.kind == Carry.CONNECT]
    assert connects and {e.target for e in connects} == {f"{host}:443"}


def test_seaweedfs_takes_virtual_hosted_requests_with_a_domain_name(
    forward_proxy: Start, ca: Any, tmp_path: Any
) -> None:
    """LocalS3(domain_name=...) serves BUCKET.s3.us-east-1.amazonaws.com (signature checked):
    a virtual-hosted PUT through the terminating proxy lands in that bucket."""
    with LocalS3(tmp_path / "s3", domain_name="s3.us-east-1.amazonaws.com") as server:
        proxy = forward_proxy(terminate={AMAZON: ("127.0.0.1", server.port)})
        bucket = fresh_bucket(server)
        client = client_via(proxy, None, server.admin, verify=str(ca.bundle), addressing="virtual")
        client.put_object(Bucket=bucket, Key="v/k", Body=b"virtual")
        assert server.client().get_object(Bucket=bucket, Key="v/k")["Body"].read() == b"virtual"
        assert {e.header("host") for e in proxy.log if e.kind == Carry.TLS} == {
            f"{bucket}.s3.us-east-1.amazonaws.com"
        }


def test_terminated_tls_is_not_trusted_without_the_ca(
    forward_proxy: Start, moto: MotoServer
) -> None:
    """A client that does not trust the test CA refuses the proxy's certificate."""
    proxy = forward_proxy(terminate={AMAZON: ("127.0.0.1", moto.port)})
    client = client_via(proxy, None, moto.admin, addressing="virtual")
    with pytest.raises(SSLError, match="certificate verify failed"):
        client.head_bucket(Bucket="mybucket")
    assert [e.kind for e in proxy.log] == [Carry.CONNECT]


def test_terminate_needs_a_ca() -> None:
    """A proxy asked to terminate TLS without a CA is rejected before it starts."""
    with pytest.raises(ValueError, match="needs ca="):
        ForwardProxy(terminate={AMAZON: ("127.0.0.1", 1)})


def test_stop_is_prompt_with_open_tunnels(forward_proxy: Start, s3: LocalS3) -> None:
    """stop() returns within 5 s while a tunnel and an idle client connection are open."""
    proxy = forward_proxy()
    tunnel = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    tunnel.sendall(f"CONNECT 127.0.0.1:{s3.port} HTTP/1.1\r\n\r\n".encode())
    assert tunnel.recv(1024).startswith(b"HTTP/1.1 200")
    idle = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 5
    assert tunnel.recv(1024) == b"" and idle.recv(1024) == b""
    tunnel.close()
    idle.close()
