"""The chaos run: files queued while processes die and the network fails, then the invariant."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "support"))

from faultproxy import FaultProxy
from invariant import Ref, check, drained
from spool import Spool, Supervisor, new_bucket

MiB = 1024 * 1024
FAULTS = ("refuse", "reset", "503")
ACTIONS = {
    "kill_uploader": 3,
    "kill_watcher": 2,
    "kill_supervisor": 2,
    "restart": 1,
    "fault": 4,
    "heal": 3,
}
SUPERVISOR_ARGS = (
    "--retry-base",
    "0.2",
    "--retry-max-delay",
    "3",
    "--max-retries",
    "60",
    "--recheck-interval",
    "0.5",
    "--grace",
    "3",
    "--settle",
    "0.5",
    "--multipart-threshold",
    "5",
    "--part-size",
    "5",
    "--parts-in-flight",
    "4",
    "--log-level",
    "info",
)
DIRS = ("a", "a/b/c", "données/été", "深い/パス", "with space/x", "z")
WORDS = ("plain", "ünïcødé", "日本語", "emoji-🙂", "space name", "Ωmega")


@dataclass(frozen=True)
class Config:
    seed: int = 1
    duration: float = 300.0  # seconds of kills and faults while files are queued
    files: int = 3000
    max_size: int = 32 * MiB
    workers: int = 3
    drain_timeout: float = 600.0
    large: int = 0  # files of large_min to large_max, so that kills land mid-multipart
    large_min: int = 50 * MiB
    large_max: int = 200 * MiB


@dataclass
class Result:
    config: Config
    queued: int = 0
    queued_bytes: int = 0
    killed: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    requests_faulted: int = 0
    restarts: int = 0
    exits: int = 0  # supervisors that exited without being told to
    orphans: int = 0  # children still alive after their supervisor was killed
    refused: int = 0  # new supervisors refused the lock after a kill
    lost: int = 0
    wrong: int = 0
    out_of_step: int = 0
    completed: int = 0
    failed: int = 0
    incomplete_uploads: int = 0
    drain_seconds: float = float("nan")
    details: str = ""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.wrong or self.out_of_step or self.orphans or self.refused)

    def line(self) -> str:
        """The one line a user can quote."""
        c = self.config
        kills = ", ".join(f"{k} {v}" for k, v in sorted(self.killed.items())) or "none"
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        return (
            f"flood chaos seed={c.seed} duration={c.duration:g}s: "
            f"{self.queued} files queued ({self.queued_bytes / MiB:.0f} MiB), "
            f"{sum(self.killed.values())} processes killed ({kills}), "
            f"{sum(self.faults.values())} faults injected ({faults}; "
            f"{self.requests_faulted} requests failed), "
            f"{self.lost} files lost, {self.wrong} objects with wrong bytes, "
            f"{self.out_of_step} records out of step, "
            f"time to drain {self.drain_seconds:.1f} s "
            f"[completed {self.completed}, failed {self.failed}, "
            f"supervisor restarts {self.restarts}, unasked exits {self.exits}, "
            f"orphans {self.orphans}, lock refusals {self.refused}, "
            f"incomplete multipart uploads {self.incomplete_uploads}]"
        )


# -- the files -----------------------------------------------------------------------------
def plan(config: Config, bucket: str) -> list[tuple[Ref, int]]:
    """Keys (unique, nested, unicode) and sizes (0 bytes to max_size), from the seed."""
    rng = random.Random(f"files/{config.seed}")
    files = []
    for i in range(config.files):
        roll = rng.random()
        if roll < 0.05:
            size = 0
        elif roll < 0.75:
            size = rng.randint(1, 64 * 1024)
        elif roll < 0.97:
            size = rng.randint(64 * 1024, MiB)
        else:
            size = int(2 ** rng.uniform(20, max(20.0, _log2(config.max_size))))
        key = f"{rng.choice(DIRS)}/{i:05d}-{rng.choice(WORDS)}.bin"
        files.append((("p1", bucket, key), size))
    step = max(1, config.files // (config.large + 1))
    for n in range(config.large):  # spread among the others, so they meet the kills
        size = rng.randint(config.large_min, config.large_max)
        files.insert(
            step * (n + 1), (("p1", bucket, f"large/{n:03d}-{rng.choice(WORDS)}.bin"), size)
        )
    return files


def _log2(n: int) -> float:
    return n.bit_length() - 1.0


def content(seed: int, ref: Ref, size: int) -> bytes:
    """A file's bytes, the same for the same seed and key."""
    return random.Random(f"bytes/{seed}/{ref[2]}").randbytes(size)


class Files(Mapping[Ref, bytes]):
    """The queued files and their bytes, made again when asked (nothing big held in memory)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.sizes: dict[Ref, int] = {}

    def __getitem__(self, ref: Ref) -> bytes:
        return content(self.seed, ref, self.sizes[ref])

    def __iter__(self) -> Iterator[Ref]:
        return iter(list(self.sizes))

    def __len__(self) -> int:
        return len(self.sizes)


class Producer(threading.Thread):
    """Queues the planned files the producer's way (write aside, rename into incoming/)."""

    def __init__(
        self, spool: Spool, files: list[tuple[Ref, int]], seed: int, span: float, queued: Files
    ) -> None:
        super().__init__(name="producer", daemon=True)
        self.spool, self.files, self.seed, self.span, self.queued = spool, files, seed, span, queued
        self.staging = spool.root / "staging"
        self.staging.mkdir(exist_ok=True)
        self.bytes = 0

    def run(self) -> None:
        started = time.monotonic()
        for n, (ref, size) in enumerate(self.files):
            due = started + self.span * n / max(1, len(self.files))
            time.sleep(max(0.0, due - time.monotonic()))  # the producer's pace
            staged = self.staging / f"{n}.part"
            staged.write_bytes(content(self.seed, ref, size))
            final = self.spool.path("incoming", *ref)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staged, final)
            self.queued.sizes[ref] = size
            self.bytes += size


# -- the processes -------------------------------------------------------------------------
class Children:
    """Reads the supervisors' log as it grows: the newest generation of children of each."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0
        self.generations: dict[int, list[int]] = {}

    def of(self, supervisor: int) -> list[int]:
        self._read()
        return self.generations.get(supervisor, [])

    def _read(self) -> None:
        try:
            with open(self.log, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event", {}).get("action") == "children_started":
                self.generations[entry["process"]["pid"]] = list(entry["flood"]["pids"])


def session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "-g", str(sid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Chaos:
    """One chaos run against a local S3 server behind a fault proxy."""

    def __init__(self, config: Config, s3: Any, workdir: Path, proxy: FaultProxy) -> None:
        self.config = config
        self.s3 = s3
        self.proxy = proxy
        self.rng = random.Random(f"actions/{config.seed}")
        self.spool = Spool(workdir, s3, {"p1": s3.credentials_ini("p1", endpoint=proxy.endpoint)})
        self.children = Children(self.spool.log)
        self.result = Result(config)
        self.sup: Supervisor | None = None

    def start(self) -> None:
        self.sup = self.spool.start(*SUPERVISOR_ARGS, workers=self.config.workers)

    def ensure_running(self) -> None:
        """A supervisor that exited on its own is started again (as systemd would)."""
        if self.sup is None or self.sup.proc.poll() is not None:
            if self.sup is not None:
                self.result.exits += 1
                self.sup.stop()
            self.start()

    def act(self) -> None:
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        getattr(self, action)()

    def kill_uploader(self) -> None:
        self._kill_child("uploader", lambda pids: pids[:-1])

    def kill_watcher(self) -> None:
        self._kill_child("watcher", lambda pids: pids[-1:])

    def _kill_child(self, role: str, pick: Any) -> None:
        assert self.sup is not None
        candidates = [p for p in pick(self.children.of(self.sup.pid)) if alive(p)]
        if candidates:
            os.kill(self.rng.choice(sorted(candidates)), signal.SIGKILL)
            self.result.killed[role] += 1

    def kill_supervisor(self) -> None:
        assert self.sup is not None
        if self.sup.proc.poll() is not None:
            return
        self.sup.kill9()
        self.result.killed["supervisor"] += 1
        deadline = time.monotonic() + 10
        while session_pids(self.sup.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval
        left = session_pids(self.sup.pid)
        if left:
            self.result.orphans += len(left)
            os.killpg(self.sup.pid, signal.SIGKILL)
        self.sup.stop()
        self.start()
        self._check_not_refused()

    def _check_not_refused(self) -> None:
        assert self.sup is not None
        try:
            code = self.sup.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            return
        if code == 75:
            self.result.refused += 1

    def restart(self) -> None:
        assert self.sup is not None
        self.sup.terminate(60)
        self.result.restarts += 1
        self.start()

    def fault(self) -> None:
        mode = self.rng.choice(FAULTS)
        self.proxy.set_mode(mode)
        self.result.faults[mode] += 1

    def heal(self) -> None:
        self.proxy.set_mode("pass")

    def drain(self, expected: Files) -> None:
        self.proxy.set_mode("pass")
        started = time.monotonic()
        deadline = started + self.config.drain_timeout
        while time.monotonic() < deadline:
            self.ensure_running()
            if drained(self.spool, expected):
                self.result.drain_seconds = time.monotonic() - started
                return
            time.sleep(0.25)  # polling interval

    def finish(self, expected: Files, client: Any, bucket: str) -> None:
        if self.sup is not None:
            self.sup.terminate(60)
        report = check(self.spool, client, expected)
        r = self.result
        r.lost = len(report.lost) + len(report.leftover)
        r.wrong, r.out_of_step = len(report.wrong), len(report.out_of_step)
        r.completed, r.failed = report.completed, report.failed
        r.requests_faulted = self.proxy.requests_faulted
        r.incomplete_uploads = len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))
        r.details = report.summary()


def run(config: Config, s3: Any, workdir: Path) -> Result:
    """Queue, break things for `duration` seconds, heal, drain and check; the figures."""
    bucket = new_bucket(s3)
    files = plan(config, bucket)
    expected = Files(config.seed)
    with FaultProxy("127.0.0.1", s3.port) as proxy:
        chaos = Chaos(config, s3, workdir, proxy)
        try:
            chaos.start()
            producer = Producer(chaos.spool, files, config.seed, config.duration * 0.95, expected)
            producer.start()
            end = time.monotonic() + config.duration
            while time.monotonic() < end:
                time.sleep(chaos.rng.uniform(0.5, 3.0))  # the pace of the chaos, by the seed
                chaos.ensure_running()
                chaos.act()
            producer.join()
            chaos.result.queued, chaos.result.queued_bytes = len(expected), producer.bytes
            chaos.drain(expected)
            chaos.finish(expected, s3.client(), bucket)
        finally:
            chaos.spool.close()
    return chaos.result


def size(text: str) -> int:
    """A byte count: 123, 64K, 32M, 1G (powers of 1024)."""
    units = {"K": 1024, "M": MiB, "G": 1024 * MiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    from flood.testing.localserver import LocalS3

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of chaos (300)")
    p.add_argument("--files", type=int, default=3000, help="files queued (3000)")
    p.add_argument("--max-size", type=size, default=32 * MiB, help="largest file (32M)")
    p.add_argument("--workers", type=int, default=3, help="uploaders (3)")
    p.add_argument("--large", type=int, default=4, help="files of 50-200 MiB among them (4)")
    p.add_argument("--drain-timeout", type=float, default=600.0, help="seconds (600)")
    p.add_argument("--workdir", type=Path, default=None, help="kept afterwards if given")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    config = Config(
        seed,
        args.duration,
        args.files,
        args.max_size,
        args.workers,
        args.drain_timeout,
        large=args.large,
    )
    with tempfile.TemporaryDirectory(prefix="flood-chaos-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        with LocalS3(root / "s3") as s3:
            (root / "spool").mkdir()
            result = run(config, s3, root / "spool")
    if not result.ok:
        print(result.details, file=sys.stderr)
    print(result.line(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
