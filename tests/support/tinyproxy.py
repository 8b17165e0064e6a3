"""tinyproxy (Debian package `tinyproxy`) as a subprocess: a third-party forward proxy."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from flood.testing.localserver import die_with_parent

HOST = "127.0.0.1"
START_ATTEMPTS = 3  # a fresh port after a lost race for one
STOP_GRACE = 10.0
LOG_TAIL = 20
_REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (.+)$")


def find_tinyproxy() -> str | None:
    """The tinyproxy binary on PATH (Debian puts it in /usr/bin), or None."""
    return shutil.which("tinyproxy")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def _listening(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1.0).close()
    except OSError:
        return False
    return True


class TinyProxy:
    """`tinyproxy -d` on 127.0.0.1 with a config of its own in `workdir`.

    CONNECT is allowed to any port: the config has no ConnectPort line (Debian's packaged
    config allows only 443 and 563); pass `connect_ports` to restrict it the same way.
    `auth` turns on BasicAuth. tinyproxy forwards `Expect: 100-continue` but not the server's
    100 Continue, so a client that sends it waits out its own timeout before its body.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        auth: tuple[str, str] | None = None,
        connect_ports: Sequence[int] | None = None,
    ) -> None:
        binary = find_tinyproxy()
        if binary is None:
            raise FileNotFoundError("tinyproxy not found: apt-get install tinyproxy")
        self.binary = binary
        self.workdir = Path(workdir)
        self.auth = auth
        self.connect_ports = tuple(connect_ports) if connect_ports is not None else None
        self.config_path = self.workdir / "tinyproxy.conf"
        self.log_path = self.workdir / "tinyproxy.log"
        self.output_path = self.workdir / "tinyproxy.out"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The proxy URL for clients, with the credentials in it when auth is on."""
        if not self.port:
            raise RuntimeError("TinyProxy has not been started: no URL yet")
        userinfo = ""
        if self.auth is not None:
            userinfo = f"{quote(self.auth[0], safe='')}:{quote(self.auth[1], safe='')}@"
        return f"http://{userinfo}{HOST}:{self.port}"

    def proxies(self) -> dict[str, str]:
        """The proxy for both schemes, as botocore's `Config(proxies=...)` takes it."""
        return {"http": self.url, "https": self.url}

    @property
    def running(self) -> bool:
        """Whether the tinyproxy process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> str:
        """The configuration file's text for the current port."""
        lines = [
            f"Port {self.port}",
            f"Listen {HOST}",
            "Timeout 30",
            f'LogFile "{self.log_path}"',
            "LogLevel Info",
            f'PidFile "{self.workdir / "tinyproxy.pid"}"',
            "MaxClients 64",
            f"Allow {HOST}",
        ]
        lines += [f"ConnectPort {port}" for port in self.connect_ports or ()]
        if self.auth is not None:
            lines.append(f"BasicAuth {self.auth[0]} {self.auth[1]}")
        return "\n".join(lines) + "\n"

    def requests(self) -> list[str]:
        """The request lines tinyproxy logged, oldest first (`PUT http://h:p/k HTTP/1.1`,
        `CONNECT h:p HTTP/1.1`)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [m.group(1) for line in text.splitlines() if (m := _REQUEST_LINE.search(line))]

    def start(self, timeout: float = 10.0) -> None:
        """Start tinyproxy on a free port and return once it accepts connections."""
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = _free_port()
            self.config_path.write_text(self.config(), encoding="utf-8")
            try:
                self._launch_and_wait(timeout)
                return
            except RuntimeError:
                if attempt == START_ATTEMPTS:
                    self.port = 0
                    raise

    def _launch_and_wait(self, timeout: float) -> None:
        with open(self.output_path, "ab") as out:
            self._proc = subprocess.Popen(
                [self.binary, "-d", "-c", str(self.config_path)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(self._failure("exited during startup"))
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(self._failure(f"did not listen within {timeout:.0f} s"))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.02)  # wakes early if tinyproxy dies

    def _failure(self, what: str) -> str:
        tail = []
        for path in (self.output_path, self.log_path):
            with contextlib.suppress(OSError):
                tail += path.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL:]
        return f"tinyproxy {what}; its last lines:\n" + "\n".join(tail)

    def stop(self) -> None:
        """SIGTERM tinyproxy, wait up to 10 s, then SIGKILL; does nothing if not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> TinyProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
