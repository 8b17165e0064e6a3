"""The test CA: its certificates as plain `ssl` and boto3 clients judge them."""

from __future__ import annotations

import os
import socket
import ssl
import stat
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import SSLError
from cryptography import x509
from spool import wait_for
from tlsca import LOCAL_NAMES, CertAuthority, CertFiles, HandshakeServer

pytestmark = pytest.mark.timeout(60)

BUCKET_HOST = "mybucket.s3.us-east-1.amazonaws.com"


def handshake(
    ca: CertAuthority, files: CertFiles, server_hostname: str, host: str = "127.0.0.1"
) -> HandshakeServer:
    """Serve `files` on `host` and verify them as `server_hostname`; raise what ssl raises."""
    with HandshakeServer(ca.server_context(files), host) as server:
        with socket.create_connection((host, server.port), timeout=5) as raw:
            ca.client_context().wrap_socket(raw, server_hostname=server_hostname).close()
        wait_for(lambda: server.handshakes == 1, timeout=5, what="the server's handshake")
    return server


def verify_error(ca: CertAuthority, files: CertFiles, server_hostname: str) -> str:
    """The verification message plain `ssl` gives for `files` presented as `server_hostname`."""
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(ca, files, server_hostname)
    return str(info.value.verify_message)


def boto3_client(endpoint: str, verify: Any) -> Any:
    """A boto3 S3 client with retries off and short timeouts."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIAFLOODTEST0000000",
        aws_secret_access_key="x" * 40,
        verify=verify,
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=5),
    )


def test_files_are_pem_and_the_key_is_private(ca: CertAuthority) -> None:
    """The bundle is a CA certificate, the server certificate names its hosts, its key is 0600."""
    root = x509.load_pem_x509_certificate(ca.bundle.read_bytes())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    files = ca.localhost
    leaf = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert leaf.issuer == root.subject and files.names == LOCAL_NAMES
    assert stat.S_IMODE(os.stat(files.key).st_mode) == 0o600
    assert files.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_a_certificate_needs_a_name(ca: CertAuthority) -> None:
    """Issuing a certificate without any name is a ValueError."""
    with pytest.raises(ValueError, match="at least one name"):
        ca.issue()


@pytest.mark.parametrize(
    ("server_hostname", "host"),
    [("localhost", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("::1", "::1")],
)
def test_local_names_verify(ca: CertAuthority, server_hostname: str, host: str) -> None:
    """The local certificate passes verification as localhost, 127.0.0.1 and ::1."""
    assert handshake(ca, ca.localhost, server_hostname, host).handshakes == 1


def test_wildcard_covers_one_label(ca: CertAuthority) -> None:
    """A wildcard certificate verifies for a bucket's virtual host, not a bare or deeper name."""
    files = ca.issue("*.s3.us-east-1.amazonaws.com")
    assert handshake(ca, files, BUCKET_HOST).handshakes == 1
    for name in ("s3.us-east-1.amazonaws.com", "a.b.s3.us-east-1.amazonaws.com"):
        assert "Hostname mismatch" in verify_error(ca, files, name)


def test_expired_fails_plain_ssl(ca: CertAuthority) -> None:
    """Plain ssl refuses the expired certificate as expired."""
    assert verify_error(ca, ca.expired(), "localhost") == "certificate has expired"


def test_wrong_host_fails_plain_ssl(ca: CertAuthority) -> None:
    """Plain ssl refuses a valid certificate issued for another host name."""
    assert "Hostname mismatch" in verify_error(ca, ca.wrong_host(), "localhost")


def test_untrusted_without_the_bundle(ca: CertAuthority) -> None:
    """A client that trusts only the system's CAs does not trust the test CA."""
    with (
        HandshakeServer(ca.server_context(ca.localhost)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError) as info,
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
    assert "unable to get local issuer certificate" in str(info.value.verify_message)


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("expired", "certificate has expired"),
        # urllib3 matches the host name itself, after the handshake, in words of its own
        ("wrong_host", "hostname 'localhost' doesn't match 'wrong-host.flood.test'"),
    ],
    ids=["expired", "wrong_host"],
)
def test_boto3_refuses(ca: CertAuthority, which: str, message: str) -> None:
    """boto3 given the CA bundle fails with SSLError on the expired and wrong-host certificates."""
    files = ca.expired() if which == "expired" else ca.wrong_host()
    with HandshakeServer(ca.server_context(files)) as server:
        client = boto3_client(f"https://localhost:{server.port}", str(ca.bundle))
        with pytest.raises(SSLError, match=message):
            client.list_buckets()
