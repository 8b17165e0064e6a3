#!/usr/bin/env python3
"""Flood's per-file hot path taken apart: the CPU of each step of one upload, measured alone in
one process (no other load), with Flood's own functions and client, plus the variants an
optimisation would use. Complements bench.py's end-to-end figures and py-spy profile.

Usage: python tests/benchmarks/hotpath.py [--files 1000] [--json PATH]"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flood.testing.localserver import REGION, LocalS3

KiB = 1024


def proc_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def measured(
    results: dict[str, Any], name: str, count: int, server_pid: int | None = None
) -> Iterator[None]:
    """CPU (user+sys of this process; of the S3 server too if given) and wall time per
    operation, in milliseconds."""
    r0, t0, s0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), proc_cpu(server_pid)
    yield
    t1, r1, s1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), proc_cpu(server_pid)
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / count * 1000
    sys_cpu = (r1.ru_stime - r0.ru_stime) / count * 1000
    server = (s1 - s0) / count * 1000
    results[name] = {
        "cpu_ms": round(cpu, 3),
        "sys_ms": round(sys_cpu, 3),
        "wall_ms": round((t1 - t0) / count * 1000, 3),
        "server_cpu_ms": round(server, 3) if server_pid else None,
    }
    extra = f"  server CPU {server:6.3f} ms" if server_pid else ""
    print(
        f"{name:58} CPU {cpu:7.3f} ms (sys {sys_cpu:5.3f})  wall "
        f"{(t1 - t0) / count * 1000:7.3f} ms{extra}",
        flush=True,
    )


def s3_steps(server: LocalS3, n: int, results: dict[str, Any]) -> None:
    from botocore import handlers

    from flood.credentials import Profile
    from flood.s3 import make_client

    server.create_bucket("hot-path")
    base = Profile(
        "p", "amazon", server.admin.access_key, server.admin.secret_key, REGION, server.endpoint
    )
    other = Profile(
        "p", "other", server.admin.access_key, server.admin.secret_key, REGION, server.endpoint
    )
    data = os.urandom(4 * KiB)
    md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()

    def loop(client: Any, name: str, call: Callable[[Any, int], Any]) -> None:
        call(client, -1)  # first request: botocore loads models and rulesets lazily
        pid = server._proc.pid if server._proc is not None else None  # the server's CPU
        with measured(results, name, n, pid):
            for i in range(n):
                call(client, i)

    def put(c: Any, i: int) -> Any:
        return c.put_object(Bucket="hot-path", Key=f"k{i}", Body=data, ContentMD5=md5)

    def head(c: Any, i: int) -> Any:
        return c.head_object(Bucket="hot-path", Key=f"k{i}")

    client = make_client(base)
    loop(client, "s3 PUT 4 KiB (Flood's client: CRC32 + Expect: 100-continue)", put)
    loop(client, "s3 HEAD (Flood's verify)", head)
    quiet = make_client(base)
    quiet.meta.events.unregister("before-call.s3", handlers.add_expect_header)
    loop(quiet, "s3 PUT, no Expect: 100-continue", put)
    lean = make_client(other)  # when_required: no CRC32 on top of Content-MD5
    lean.meta.events.unregister("before-call.s3", handlers.add_expect_header)
    loop(lean, "s3 PUT, no Expect, checksum when_required", put)

    from flood.lean import LeanClient  # what Flood's uploader really sends

    one = LeanClient(other)
    loop(
        one,
        "s3 PUT, Flood's LeanPut, one at a time",
        lambda c, i: c.put("hot-path", f"l{i}", data, md5),
    )
    batch = int(os.environ.get("HOTPATH_BATCH", "8"))
    many = LeanClient(other)

    def in_flight(c: Any, i: int) -> None:
        if i % batch == 0 or i < 0:
            started = [c.start("hot-path", f"m{i}-{j}", data, md5) for j in range(batch)]
            for pending in started:
                pending.result()

    loop(many, f"s3 PUT, Flood's LeanPut, {batch} in flight", in_flight)


def db_steps(tmp: Path, n: int, results: dict[str, Any]) -> None:
    from flood import records
    from flood.jobs import FileRef

    records.open_db(str(tmp / "flood.db"))
    now = dt.datetime(2024, 1, 1)
    with measured(results, "db: a claim and a completion per file (2 txns)", n):
        for i in range(n):
            rid = records.record_claims([(FileRef("p", "b", f"d/k{i}"), now, 4096)])[0]
            records.record_completions([records.Completion(rid, 4096, "etag", 0)])
    with measured(results, "db: claims and completions of 8 files per txn", n):
        for j in range(0, n, 8):
            ids = records.record_claims(
                [(FileRef("p", "b", f"e/k{i}"), now, 4096) for i in range(j, min(n, j + 8))]
            )
            records.record_completions([records.Completion(rid, 4096, "etag", 0) for rid in ids])
    with measured(results, "db: records.holds() (read every second; per call)", n):
        for _ in range(n):
            records.holds()
    records.close_db()
    conn = sqlite3.connect(tmp / "flood.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA synchronous=normal")
    insert = (
        "INSERT INTO file_records (profile, bucket, filepath, file_creation_date, "
        "current_state, last_updated, upload_outcome, size, etag, retry_count) "
        "VALUES (?, ?, ?, ?, 'completed', ?, 'success', ?, ?, 0)"
    )
    with measured(results, "db: one raw INSERT per file (sqlite3, 1 txn)", n):
        for i in range(n):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(insert, ("p", "b", f"r/k{i}", now, now, 4096, "etag"))
            conn.execute("COMMIT")
    with measured(results, "db: raw INSERTs, 50 files per txn", n):
        for j in range(0, n, 50):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                insert,
                [("p", "b", f"s/k{i}", now, now, 4096, "etag") for i in range(j, min(n, j + 50))],
            )
            conn.execute("COMMIT")
    conn.close()


def log_steps(tmp: Path, n: int, results: dict[str, Any]) -> None:
    from flood import logs

    log = logs.configure("uploader", "info", str(tmp / "flood.log"), ["S" * 40])
    with measured(results, "logs: file_claimed + upload_succeeded (2 lines)", n):
        for i in range(n):
            log.info(
                "file_claimed",
                profile="p",
                bucket="b",
                key=f"d/k{i}",
                path=f"/srv/processing/p/b/d/k{i}",
                size=4096,
                record_id=i,
            )
            log.info(
                "upload_succeeded",
                profile="p",
                bucket="b",
                key=f"d/k{i}",
                path=f"/srv/completed/p/b/d/k{i}",
                size=4096,
                etag="0" * 32,
                duration=0.004,
                attempt=0,
                record_id=i,
            )


def fs_steps(tmp: Path, n: int, results: dict[str, Any]) -> None:
    from flood import fsops
    from flood.moves import read_all

    states = {
        s: tmp / "spool" / s / "p" / "b" / "d" for s in ("incoming", "processing", "completed")
    }
    for path in states.values():
        path.mkdir(parents=True)
    for i in range(n):
        (states["incoming"] / f"k{i}").write_bytes(os.urandom(4 * KiB))
    with measured(results, "fs: claim+open+read+md5+fstat+finish (Flood's fsops)", n):
        for i in range(n):
            src, mid, dst = (
                str(states[s] / f"k{i}") for s in ("incoming", "processing", "completed")
            )
            fsops.move_into(src, mid)
            os.lstat(mid)
            fsops.creation_date(mid)
            fd, info = fsops.open_regular(mid)
            data = read_all(fd, info.st_size)
            hashlib.md5(data, usedforsecurity=False)
            os.fstat(fd)
            os.close(fd)
            os.path.lexists(dst)
            fsops.move_into(mid, dst)


def queue_steps(n: int, results: dict[str, Any]) -> None:
    from flood.jobs import Job

    jobs = mp.get_context("forkserver").Queue(n + 1)
    with measured(results, "queue: Job put + get (watcher + uploader side)", n):
        for i in range(n):
            jobs.put(Job("incoming", "b", f"d/k{i}"))
        for _ in range(n):
            jobs.get()
    jobs.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    results: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="flood-hotpath-"))
    server = LocalS3(tmp / "s3")
    try:
        server.start()
        s3_steps(server, args.files, results)
        db_steps(tmp, args.files, results)
        log_steps(tmp, args.files, results)
        fs_steps(tmp, args.files, results)
        queue_steps(args.files, results)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
