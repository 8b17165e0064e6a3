"""Memory end to end: the PSS (smaps_rollup) of all of flood-supervisor's processes at
--workers 4 stays within the budget, with one profile and with three, while files upload."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from spool import Spool, new_bucket, wait_for

pytestmark = pytest.mark.timeout(240)

MiB = 1024  # smaps_rollup counts KiB
# Issue 18's targets: 120 MiB for the supervisor, the forkserver and its children with 4
# uploaders; 60 MiB more for each further profile (4 more uploaders).
TARGET = {1: 120 * MiB, 3: 240 * MiB}
# What this test holds: one profile measures 118.0-118.4 MiB from run to run on this machine
# (2026-12-02), so the line is drawn 5 MiB above the target there (a regression shows, another
# machine's few MiB more do not); three profiles measure 197-198 MiB, within their target.
BUDGET = {1: 125 * MiB, 3: 240 * MiB}
FILES = 300  # per profile, 4 KiB each: benchmark workload (a)'s kind of file


def rollup(pid: int) -> dict[str, int] | None:
    """The process's smaps_rollup in KiB by field; None if it exited meanwhile."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            lines = [line.split() for line in handle if line.endswith("kB\n")]
    except OSError:
        return None
    return {fields[0].rstrip(":"): int(fields[1]) for fields in lines}


def private(fields: dict[str, int]) -> int:
    """The KiB only this process maps (its own allocations and the pages it copied on
    write), from its smaps_rollup."""
    return fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    found = [pid]
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += tree(int(child))
    return found


def names(spool: Spool, root: int, profiles: list[str]) -> dict[int, str]:
    """What each process is: the supervisor, the children the log names (uploaders in
    profile order, then the watcher), the forkserver and the resource tracker."""
    known = {root: "supervisor"}
    started = spool.events("children_started")
    if started:
        roles = [f"uploader-{p}-{s}" for p in sorted(profiles) for s in range(4)]
        known.update(zip(started[-1]["flood"]["pids"], [*roles, "watcher"], strict=False))
    for pid in tree(root):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        for what in ("resource_tracker", "forkserver"):
            if pid not in known and what in command:
                known[pid] = what
    return known


class Peak:
    """The largest PSS sum over the supervisor's process tree seen, and each process's PSS
    in that sample."""

    def __init__(self, root: int, profiles: list[str]) -> None:
        self.root = root
        self.profiles = profiles
        self.total = 0
        self.each: dict[int, int] = {}
        self.own: dict[int, int] = {}

    def sample(self) -> None:
        # PSS: shared pages divided among the processes mapping them, so a sum over
        # processes counts each page once; read once per process with its private part.
        read = {pid: fields for pid in tree(self.root) if (fields := rollup(pid)) is not None}
        now = {pid: fields.get("Pss", 0) for pid, fields in read.items()}
        if sum(now.values()) > self.total:
            self.total, self.each = sum(now.values()), now
            self.own = {pid: private(fields) for pid, fields in read.items()}

    def table(self, spool: Spool) -> str:
        shown = names(spool, self.root, self.profiles)
        rows = sorted((shown.get(pid, f"pid {pid}"), pid, kib) for pid, kib in self.each.items())
        lines = [
            f"  {name:24s} {kib / MiB:6.1f} MiB  ({self.own.get(pid, 0) / MiB:.1f} private)"
            for name, pid, kib in rows
        ]
        return "\n".join([f"PSS {self.total / MiB:.1f} MiB in all:", *lines])


def upload_and_measure(spool: Spool, profiles: list[str], bucket: str) -> Peak:
    """Start a supervisor with --workers 4 (the bucket's directories exist, as on a spool in
    use), drop FILES files per profile, and sample the PSS until all are completed."""
    for profile in profiles:
        spool.path("incoming", profile, bucket, "x").parent.mkdir(parents=True)
    sup = spool.start(workers=4)
    wait_for(lambda: spool.events("startup_drain_queued"), 60, "the start-up drain")
    # The bucket checks and the janitor's round (at start, then hourly) run in short-lived
    # checker children (boto3's); the budget is the daemon's own, once they have exited.
    # The supervisor, the forkserver, its resource tracker, the watcher, 4 uploaders a profile.
    wait_for(lambda: spool.events("janitor_finished"), 60, "the janitor's first round")
    wait_for(lambda: len(tree(sup.pid)) == 4 + 4 * len(profiles), 30, "the checkers to exit")
    peak = Peak(sup.pid, profiles)
    keys = [f"d{i % 10}/f{i:04d}" for i in range(FILES)]
    for profile in profiles:
        for key in keys:
            spool.drop(profile, bucket, key, os.urandom(4096))

    def done() -> bool:
        peak.sample()
        return all(
            len(list((spool.dir / "completed" / p / bucket).rglob("f*"))) == FILES for p in profiles
        )

    wait_for(done, 120, lambda: f"the uploads (left: {spool.pending_summary()})")
    for _ in range(5):  # and once they are all done
        peak.sample()
    return peak


@pytest.fixture
def profiles(request: pytest.FixtureRequest, tmp_path: Path, s3: Any) -> Any:
    """A spool whose credentials file has request.param profiles, p1, p2, ..."""
    wanted = [f"p{i}" for i in range(1, request.param + 1)]
    sp = Spool(tmp_path, s3, {name: s3.credentials_ini(name) for name in wanted})
    yield sp, wanted
    sp.close()


@pytest.mark.parametrize("profiles", [1, 3], indirect=True, ids=["1-profile", "3-profiles"])
def test_all_processes_fit_the_memory_budget(profiles: Any, s3: Any) -> None:
    """With --workers 4, the PSS of the supervisor and all its descendants stays within its
    budget while files upload (the table, and the issue's target beside it, is printed)."""
    spool, wanted = profiles
    peak = upload_and_measure(spool, wanted, new_bucket(s3))
    budget, target = BUDGET[len(wanted)], TARGET[len(wanted)]
    print(f"{peak.table(spool)}\n(target {target / MiB:.0f} MiB, held at {budget / MiB:.0f})")
    assert peak.total <= budget, f"over the budget of {budget / MiB:.0f} MiB\n{peak.table(spool)}"
