"""A real Prometheus server for the tests (Debian's `prometheus` package): it scrapes the
targets a test names, evaluates rule files, and answers the HTTP query API."""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_GRACE = 20.0
START_ATTEMPTS = 3
LOG_TAIL = 20
PR_SET_PDEATHSIG = 1
INSTALL_HINT = "apt-get install prometheus"


class PrometheusUnavailable(RuntimeError):
    """A binary of the prometheus package is missing: the tests that need it skip."""


def find_binary(name: str) -> str:
    """`prometheus` or `promtool` on PATH (Debian puts both in /usr/bin)."""
    found = shutil.which(name)
    if found is None:
        raise PrometheusUnavailable(f"`{name}` not found on PATH ({INSTALL_HINT})")
    return found


def unavailable(*names: str) -> str | None:
    """Why one of these binaries cannot be used (None when all are there): a skip reason."""
    try:
        for name in names:
            find_binary(name)
    except PrometheusUnavailable as exc:
        return str(exc)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn: SIGTERM when the thread that started the server exits, even by SIGKILL."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved in the parent

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


class Prometheus:
    """One Prometheus on 127.0.0.1 (a free port), its storage and prometheus.yml in workdir:
    one scrape job `job` over `targets` ("host:port") every `scrape_interval`, and
    `rule_files` evaluated as often."""

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        *,
        job: str = "flood",
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.job = job
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.config_path = self.workdir / "prometheus.yml"
        self.log_path = self.workdir / "prometheus.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("Prometheus has not been started: no port yet")
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        """prometheus.yml as data (written as JSON, which YAML reads as it is)."""
        interval = self.scrape_interval
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [
                {"job_name": self.job, "static_configs": [{"targets": self.targets}]}
            ],
        }

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server; return once /-/ready answers 200."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            try:
                self._launch_and_wait(timeout)
                return
            except RuntimeError as exc:
                if attempt == START_ATTEMPTS or "address already in use" not in str(exc):
                    raise

    def command(self) -> list[str]:
        return [
            find_binary("prometheus"),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
            "--log.level=info",
        ]

    def _launch_and_wait(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(self._failure("exited during startup"))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(self._failure(f"was not ready within {timeout:g} s"))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.1)  # wakes early if the server dies

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                return bool(answer.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _failure(self, what: str) -> str:
        return f"prometheus {what}; last lines of {self.log_path}:\n{_tail(self.log_path)}"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s; does nothing if not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the HTTP API ----------------------------------------------------------------------
    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; its `data`. An error answer raises with Prometheus's message."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400/422: a bad expression, with the reason
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: [{"metric": {labels}, "value": [time, "text"]}, ...]."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise ValueError(f"{expr!r} is a {data['resultType']}, not an instant vector")
        return list(data["result"])

    def value(self, expr: str) -> float | None:
        """The value of a query that yields one series, None when it yields none."""
        result = self.query(expr)
        if len(result) > 1:
            raise ValueError(f"{expr!r} yields {len(result)} series: {result}")
        return float(result[0]["value"][1]) if result else None

    def targets_health(self) -> list[str]:
        """The health ("up", "down", "unknown") of each active target."""
        return [t["health"] for t in self.api("targets")["activeTargets"]]
