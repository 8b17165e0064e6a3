"""A real PostgreSQL server for the tests: initdb into a tmp dir, postgres on loopback with
password (scram-sha-256) authentication, stopped and started again on the same port and data."""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

HOST = "127.0.0.1"
DEBIAN_ROOT = Path("/usr/lib/postgresql")
BINARIES = ("initdb", "postgres")
# initdb and postgres refuse to run as root; these users can run them instead (the first that
# exists): the Debian package's system user, then the classic unprivileged one.
UNPRIVILEGED_USERS = ("postgres", "nobody")
START_TIMEOUT = 60.0
STOP_GRACE = 20.0
START_ATTEMPTS = 3  # fresh ports after a lost race for one
SUN_PATH_MAX = 100  # sun_path holds 108 bytes; postgres appends "/.s.PGSQL.<port>"
LOG_TAIL = 20
PR_SET_PDEATHSIG = 1
# Signals of the postmaster's shutdown modes: smart waits for clients to leave, fast
# disconnects them and checkpoints, immediate quits at once (crash recovery on the next start).
StopMode = Literal["smart", "fast", "immediate"]
STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
# Settings for a throwaway cluster: small, quiet, no fsync (a killed server loses nothing the
# kernel already has; only a machine crash would, and the cluster dies with the test run).
SETTINGS = {
    "listen_addresses": HOST,
    "fsync": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "40",
    "password_encryption": "scram-sha-256",
    "logging_collector": "off",
    "log_line_prefix": "%m [%p] ",
}


class PostgresUnavailable(RuntimeError):
    """The server binaries, or a user allowed to run them, are missing: the tests skip."""


def version_key(path: Path) -> tuple[int, ...]:
    """Sort key of a Debian version directory name such as 15 or 9.6 (not a version: -1)."""
    parts = path.name.split(".")
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else (-1,)


def find_bindir(debian_root: Path = DEBIAN_ROOT) -> Path:
    """The newest installed server's bin dir: /usr/lib/postgresql/<newest>/bin (Debian,
    Ubuntu), else the directory of `postgres` or `initdb` on PATH; it must hold both."""
    candidates: list[Path] = []
    if debian_root.is_dir():
        versions = sorted(debian_root.iterdir(), key=version_key, reverse=True)
        candidates += [v / "bin" for v in versions if version_key(v) != (-1,)]
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            candidates.append(Path(found).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / b, os.X_OK) for b in BINARIES):
            return bindir
    raise PostgresUnavailable(
        f"PostgreSQL server binaries ({', '.join(BINARIES)}) not found in "
        f"{debian_root}/*/bin or on PATH (apt-get install postgresql)"
    )


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account the server runs as when the tests run as root."""

    name: str
    uid: int
    gid: int


def unprivileged_user(names: tuple[str, ...] = UNPRIVILEGED_USERS) -> RunAs | None:
    """None when not root (the server runs as us), else the first of `names` that exists."""
    if os.geteuid() != 0:
        return None
    for name in names:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return RunAs(name, entry.pw_uid, entry.pw_gid)
    raise PostgresUnavailable(
        f"running as root and none of the users {', '.join(names)} exists to run PostgreSQL "
        "(initdb and postgres refuse root)"
    )


def reachable_by(path: Path, user: RunAs) -> bool:
    """Whether `user` may traverse every directory down to `path` (root's pytest tmp dir,
    /tmp/pytest-of-root, is 0700: the server's user cannot reach a cluster inside it)."""
    groups = {user.gid} | {g.gr_gid for g in grp.getgrall() if user.name in g.gr_mem}
    for folder in [path, *path.parents]:
        info = folder.stat()
        if info.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


def free_port() -> int:
    """A loopback port free now (bound, then closed; a lost race is retried by start())."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the server gets SIGQUIT (immediate shutdown) when the thread that started
    it exits, even by SIGKILL. It runs after Popen switched user: a change of credentials
    clears the parent-death signal, so it must be set after the switch."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved in the parent

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)

    return preexec


def _tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


def _literal(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


class Postgres:
    """A PostgreSQL cluster of this process: made by initdb on the first start(), its server
    on 127.0.0.1 (a free port) and a Unix socket in the cluster's dir, a password-protected
    role owning a database. stop()/start()/restart() keep the port and the data."""

    def __init__(
        self,
        workdir: Path,
        *,
        user: str = "flood",
        database: str = "flood",
        bindir: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.user = user
        self.database = database
        self.password = secrets.token_urlsafe(18)
        self.admin_user = "postgres"
        self.admin_password = secrets.token_urlsafe(18)
        self.bindir = bindir or find_bindir()
        self.run_as = unprivileged_user()
        self.log_path = self.workdir / "postgres.log"
        self.home: Path | None = None  # the cluster's dir: data/ and socket/
        self._own_home = False  # made outside workdir (unreachable for run_as): removed by us
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        """postgresql://USER@127.0.0.1:PORT/DB (no password: see `password`, `pgpass()`)."""
        if not self.port:
            raise RuntimeError("Postgres has not been started: no port yet")
        return f"postgresql://{self.user}@{HOST}:{self.port}/{self.database}"

    @property
    def data_dir(self) -> Path:
        return self._home() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._home() / "socket"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pgpass(self, path: Path) -> Path:
        """Write a pgpass file (mode 0600) for this server's role; set PGPASSFILE to it."""
        line = f"{HOST}:{self.port}:{self.database}:{self.user}:{self.password}\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(line)
        return path

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server; return once it accepts connections. The first start runs
        initdb, creates the role and the database, and picks the port."""
        if self.running:
            return
        if self.port:
            self._launch_and_wait(timeout)
            return
        self._initdb()
        for attempt in range(1, START_ATTEMPTS + 1):
            self.port = free_port()
            try:
                self._launch_and_wait(timeout)
                return
            except RuntimeError as exc:
                if attempt == START_ATTEMPTS or "could not bind" not in str(exc):
                    self.port = 0
                    raise

    def stop(self, mode: StopMode = "fast", timeout: float = STOP_GRACE) -> None:
        """Shut the server down in `mode` (fast: clients are disconnected), SIGKILL after
        `timeout`; does nothing if it is not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(STOP_SIGNALS[mode])
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # its backends notice the postmaster's death and exit
            proc.wait()

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop and start on the same port and data."""
        self.stop(mode)
        self.start()

    def cleanup(self) -> None:
        """Stop, and remove the cluster's dir if it was made outside workdir."""
        self.stop("immediate")
        if self._own_home and self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Postgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- SQL as the superuser --------------------------------------------------------------
    def psql(self, sql: str, database: str | None = None) -> str:
        """Run SQL with psql as the superuser over the Unix socket; its output (unaligned,
        tuples only). Raises CalledProcessError with psql's message on an error."""
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "--no-psqlrc",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                self.admin_user,
                "-d",
                database or self.database,
                "-c",
                sql,
            ],
            env={**self._env(), "PGPASSWORD": self.admin_password},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, result.stdout, result.stderr
            )
        return result.stdout

    # -- the cluster -----------------------------------------------------------------------
    def _home(self) -> Path:
        if self.home is None:
            raise RuntimeError("Postgres has not been started: no cluster yet")
        return self.home

    def _make_home(self) -> Path:
        """The cluster's dir, owned by the server's user: inside workdir where that user can
        reach it and the socket's path fits sun_path, else a fresh dir in the system tmp."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        home = self.workdir / "pg"
        fits = len(str(home / "socket" / ".s.PGSQL.65535")) <= SUN_PATH_MAX
        if fits and (self.run_as is None or reachable_by(self.workdir, self.run_as)):
            home.mkdir()
        else:
            home = Path(tempfile.mkdtemp(prefix="flood-pg-", dir="/tmp"))
            self._own_home = True
            with contextlib.suppress(OSError):  # a pointer for whoever reads workdir
                (self.workdir / "pg").symlink_to(home)
        (home / "socket").mkdir()
        for path in (home, home / "socket"):
            path.chmod(0o700)
            if self.run_as is not None:
                os.chown(path, self.run_as.uid, self.run_as.gid)
        return home

    def _initdb(self) -> None:
        self.home = self._make_home()
        pwfile = self.home / "admin-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.admin_password + "\n")
        if self.run_as is not None:
            os.chown(pwfile, self.run_as.uid, self.run_as.gid)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                self.admin_user,
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--locale=C",
                "--encoding=UTF8",
                "--no-sync",
            )
        finally:
            pwfile.unlink()
        # Single-user mode needs no connection: the role and the database exist before the
        # first start, with nothing to authenticate.
        self._run(
            "postgres",
            "--single",
            "-j",
            "-D",
            str(self.data_dir),
            "template1",
            stdin=(
                f"CREATE ROLE {self.user} LOGIN PASSWORD {_literal(self.password)};\n\n"
                f"CREATE DATABASE {self.database} OWNER {self.user};\n\n"
            ),
        )

    def _run(self, program: str, *args: str, stdin: str | None = None) -> None:
        result = subprocess.run(
            [str(self.bindir / program), *args],
            input=(stdin or "").encode(),
            capture_output=True,
            cwd=self._home(),
            env=self._env(),
            timeout=120,
            **self._user_kwargs(),
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        if result.returncode != 0 or re.search(r"\b(ERROR|FATAL|PANIC):\s", output):
            raise RuntimeError(f"{program} failed ({result.returncode}):\n{output}")

    def command(self) -> list[str]:
        """The postgres command line for the current port and cluster."""
        settings = {
            **SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
        }
        options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        return [str(self.bindir / "postgres"), "-D", str(self.data_dir), *options]

    def _launch_and_wait(self, timeout: float) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- flood: starting {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self._home(),
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
                **self._user_kwargs(),
            )
        deadline = time.monotonic() + timeout
        while not self._accepting():
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(self._failure("exited during startup"))
            if time.monotonic() > deadline:
                self.stop("immediate")
                raise RuntimeError(self._failure(f"did not accept connections in {timeout:g} s"))
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.05)  # wakes early if the server dies

    def _accepting(self) -> bool:
        """postmaster.pid's status line says ready (written once connections are accepted)
        and the TCP port answers."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        with socket.socket() as sock:
            sock.settimeout(1.0)
            try:
                sock.connect((HOST, self.port))
            except OSError:
                return False
        return True

    def _failure(self, what: str) -> str:
        return f"postgres {what}; last lines of {self.log_path}:\n{_tail(self.log_path)}"

    def _env(self) -> dict[str, str]:
        """Our environment without libpq's and the server's variables (PGDATA, PGPORT...)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", TZ="UTC")
        return env

    def _user_kwargs(self) -> dict[str, Any]:
        """Popen's arguments to switch to run_as in the child (none when not root)."""
        if self.run_as is None:
            return {}
        return {"user": self.run_as.uid, "group": self.run_as.gid, "extra_groups": []}


def describe_unavailable() -> str | None:
    """Why a Postgres cannot run here (None when it can): the tests' skip reason."""
    try:
        find_bindir()
        unprivileged_user()
    except PostgresUnavailable as exc:
        return str(exc)
    return None


if __name__ == "__main__":  # pragma: no cover - used by the death test and by hand
    with Postgres(Path(sys.argv[1])) as pg:
        print(pg.pid, pg.home, flush=True)
        sys.stdin.read()
