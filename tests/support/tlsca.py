"""A test certificate authority: a CA and server certificates as PEM files in a directory."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import itertools
import os
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from flood.testing.localserver import Identity, LocalS3

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
WRONG_HOST = "wrong-host.flood.test"
VALID = dt.timedelta(days=30)
BACKDATE = dt.timedelta(hours=1)  # a clock a little behind ours still accepts a new certificate
EXPIRED_AGO = dt.timedelta(days=1)
JOIN_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 5.0


@dataclass(frozen=True)
class CertFiles:
    """A server certificate and its private key as PEM files, and the names it was issued for."""

    cert: Path
    key: Path
    names: tuple[str, ...]


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


class CertAuthority:
    """A self-signed CA (EC P-256) that issues server certificates into `directory`.

    `bundle` is the CA certificate to trust (`verify=`, `AWS_CA_BUNDLE`, `cafile=`).
    """

    def __init__(self, directory: Path, name: str = "Flood test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._serials = itertools.count(1)
        self._lock = threading.Lock()
        self._localhost: CertFiles | None = None
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.bundle = self.directory / "ca.pem"
        self.bundle.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names: str, expired: bool = False) -> CertFiles:
        """A server certificate for these DNS names (wildcards too) and IP addresses."""
        if not names:
            raise ValueError("a certificate needs at least one name")
        with self._lock:
            serial = next(self._serials)
        stem = f"{serial:03d}-" + re.sub(r"[^A-Za-z0-9.-]+", "_", names[0])[:60]
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = (now - VALID, now - EXPIRED_AGO) if expired else (now - BACKDATE, now + VALID)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        files = CertFiles(
            self.directory / f"{stem}.pem", self.directory / f"{stem}-key.pem", tuple(names)
        )
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(files.key, key)
        return files

    @property
    def localhost(self) -> CertFiles:
        """One certificate for localhost, 127.0.0.1 and ::1 (issued once)."""
        with self._lock:
            cached = self._localhost
        if cached is None:
            cached = self.issue(*LOCAL_NAMES)
            with self._lock:
                self._localhost = cached
        return cached

    def expired(self, *names: str) -> CertFiles:
        """A certificate for `names` (default: the local names) that expired a day ago."""
        return self.issue(*(names or LOCAL_NAMES), expired=True)

    def wrong_host(self) -> CertFiles:
        """A valid certificate for a name no test connects to (`wrong-host.flood.test`)."""
        return self.issue(WRONG_HOST)

    def server_context(self, files: CertFiles) -> ssl.SSLContext:
        """A server-side TLS context presenting `files`."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(files.cert, files.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side TLS context that trusts this CA only, with host name checking on."""
        return ssl.create_default_context(cafile=str(self.bundle))


class HttpsS3(NamedTuple):
    """A started LocalS3 with its HTTPS port on, and the CA bundle that verifies it."""

    server: LocalS3
    ca_bundle: Path

    @property
    def endpoint(self) -> str:
        """The server's HTTPS endpoint."""
        return self.server.https_endpoint

    def client(self, identity: Identity | None = None) -> Any:
        """A boto3 client over HTTPS that trusts the test CA."""
        return self.server.client(identity, endpoint=self.endpoint, verify=str(self.ca_bundle))


class HandshakeServer:
    """A loopback TLS listener presenting one certificate; each connection ends after its handshake.

    Enough to see a client accept or reject the certificate; it speaks no HTTP.
    """

    def __init__(self, context: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        self._context = context
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self.handshakes = 0  # completed on the server side
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> HandshakeServer:
        self._listener.listen(16)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._thread.join(JOIN_TIMEOUT)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.settimeout(HANDSHAKE_TIMEOUT)
            try:
                with self._context.wrap_socket(conn, server_side=True):
                    self.handshakes += 1
            except (OSError, ssl.SSLError):
                conn.close()  # the client refused our certificate, or went away
