"""The local SeaweedFS server's HTTPS port, with a certificate from the test CA."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, SSLError
from tlsca import HttpsS3

from flood.testing.localserver import ADMIN_ACTIONS, GRPC_OFFSET, Identity, LocalS3

pytestmark = pytest.mark.timeout(120)

NO_RETRIES = Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"})


def fresh_bucket(s3_https: HttpsS3) -> str:
    """Create a uniquely named bucket and return its name."""
    name = f"tls-{uuid.uuid4().hex[:12]}"
    s3_https.server.create_bucket(name)
    return name


def plain_client(s3_https: HttpsS3, endpoint: str, **kwargs: Any) -> Any:
    """A boto3 client for `endpoint` signed as the admin, retries off, other options as given."""
    admin = s3_https.server.admin
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=admin.access_key,
        aws_secret_access_key=admin.secret_key,
        config=NO_RETRIES,
        **kwargs,
    )


def test_https_endpoint_names_the_certificate_host(s3_https: HttpsS3) -> None:
    """The HTTPS endpoint is https://localhost on a port of its own beside the plain one."""
    server = s3_https.server
    assert s3_https.endpoint == f"https://localhost:{server.https_port}"
    assert server.https_port not in {p for role, p in server.ports.items() if role != "https"}
    assert server.endpoint == f"http://127.0.0.1:{server.port}"
    with socket.create_connection(("127.0.0.1", server.https_port), timeout=5):
        pass
    assert server.https_port + GRPC_OFFSET not in server.ports.values()


def test_put_over_https_reads_back_over_http(s3_https: HttpsS3) -> None:
    """An object put over HTTPS comes back byte for byte over HTTPS and over the plain port."""
    bucket = fresh_bucket(s3_https)
    body = bytes(range(256)) * 1024
    s3_https.client().put_object(Bucket=bucket, Key="a/b.bin", Body=body)
    assert s3_https.client().get_object(Bucket=bucket, Key="a/b.bin")["Body"].read() == body
    assert s3_https.server.client().get_object(Bucket=bucket, Key="a/b.bin")["Body"].read() == body


def test_ip_endpoint_verifies(s3_https: HttpsS3) -> None:
    """https://127.0.0.1:PORT verifies too: the certificate names the IP address."""
    bucket = fresh_bucket(s3_https)
    endpoint = f"https://127.0.0.1:{s3_https.server.https_port}"
    client = plain_client(s3_https, endpoint, verify=str(s3_https.ca_bundle))
    client.put_object(Bucket=bucket, Key="k", Body=b"by ip")
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"by ip"


def test_aws_ca_bundle_variable_is_honoured(
    s3_https: HttpsS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client given no verify= trusts the test CA through AWS_CA_BUNDLE."""
    bucket = fresh_bucket(s3_https)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(s3_https.ca_bundle))
    client = plain_client(s3_https, s3_https.endpoint)
    client.put_object(Bucket=bucket, Key="k", Body=b"env")
    assert client.head_object(Bucket=bucket, Key="k")["ContentLength"] == 3


def test_untrusted_client_fails(s3_https: HttpsS3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that trusts only the default CAs fails the handshake with SSLError."""
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    client = plain_client(s3_https, s3_https.endpoint)
    with pytest.raises(SSLError, match="certificate verify failed"):
        client.list_buckets()


def test_signatures_are_checked_over_https(s3_https: HttpsS3) -> None:
    """Over HTTPS a wrong secret is still answered SignatureDoesNotMatch."""
    bucket = fresh_bucket(s3_https)
    wrong = Identity("flood", s3_https.server.admin.access_key, "x" * 40, ADMIN_ACTIONS)
    with pytest.raises(ClientError) as info:
        s3_https.client(wrong).put_object(Bucket=bucket, Key="k", Body=b"1")
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_credentials_ini_for_the_https_endpoint(s3_https: HttpsS3) -> None:
    """credentials_ini can point a profile at the HTTPS endpoint."""
    text = s3_https.server.credentials_ini("tls", endpoint=s3_https.endpoint)
    assert f"aws_endpoint = https://localhost:{s3_https.server.https_port}\n" in text


def test_no_https_without_tls(tmp_path: Path) -> None:
    """A server made without tls= has no HTTPS port and says so when asked for the endpoint."""
    server = LocalS3(tmp_path)
    assert server.https_port == 0
    with pytest.raises(RuntimeError, match="without tls="):
        _ = server.https_endpoint
