"""moto's standalone server as a subprocess: a second S3 implementation beside SeaweedFS."""

from __future__ import annotations

import contextlib
import http.client
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from flood.testing.localserver import (
    ADMIN_ACTIONS,
    REGION,
    Identity,
    die_with_parent,
    random_identity,
)

HOST = "127.0.0.1"
START_ATTEMPTS = 3  # a fresh port after a lost race for one
STOP_GRACE = 10.0
LOG_TAIL = 20


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def _answers(port: int) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
    try:
        conn.request("GET", "/moto-api/data.json")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return True


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    return "\n".join(lines[-LOG_TAIL:])


class MotoServer:
    """`python -m moto.server` on 127.0.0.1, in its own session, dying with this process.

    moto takes any key pair; `admin` is a random one so the credentials look like LocalS3's.
    """

    def __init__(self, workdir: Path, identity: Identity | None = None) -> None:
        self.workdir = Path(workdir)
        self.log_path = self.workdir / "moto.log"
        self.admin = identity or random_identity("moto", ADMIN_ACTIONS)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin_client: Any = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        if not self.port:
            raise RuntimeError("MotoServer has not been started: no endpoint yet")
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def command(self) -> list[str]:
        """The command line for the current port."""
        return [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]

    def start(self, timeout: float = 60.0) -> None:
        """Start the server on a free port and return once it answers HTTP."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = _free_port()
            try:
                self._launch_and_wait(timeout)
                return
            except RuntimeError as exc:
                if attempt == START_ATTEMPTS or "Address already in use" not in str(exc):
                    self.port = 0
                    raise

    def _launch_and_wait(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- flood: starting {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = self._spawn(log)
        deadline = time.monotonic() + timeout
        while not _answers(self.port):
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(self._failure("exited during startup"))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(self._failure(f"did not answer within {timeout:.0f} s"))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.05)  # wakes early if the server dies

    def _spawn(self, log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )

    def _failure(self, what: str) -> str:
        return f"moto server {what}; last lines of {self.log_path}:\n{_tail(self.log_path)}"

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

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def client(self, identity: Identity | None = None, *, endpoint: str | None = None) -> Any:
        """A boto3 S3 client for this server (path-style), signed as `identity` or the admin."""
        import boto3
        from botocore.config import Config

        ident = identity or self.admin
        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=ident.access_key,
            aws_secret_access_key=ident.secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (in us-east-1)."""
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
