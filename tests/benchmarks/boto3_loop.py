"""Reference client for the benchmark: N processes, each a plain loop of put_object (bytes with
Content-MD5, as Flood sends them) and optionally head_object, on Flood's own boto3 client
(flood.s3.make_client). Flood minus this loop is the cost of Flood's own machinery: watcher,
queue, claims, records, logs.

Usage: boto3_loop.py SRC_DIR BUCKET --endpoint URL [--processes N] [--head]
Keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."""

from __future__ import annotations

import argparse
import base64
import hashlib
import multiprocessing as mp
import os
import sys

from flood.credentials import Profile
from flood.testing.localserver import REGION


def files_under(root: str) -> list[str]:
    out = []
    for top, _, names in os.walk(root):
        out += [os.path.join(top, n) for n in names]
    return sorted(out)


def worker(root: str, paths: list[str], bucket: str, endpoint: str, head: bool) -> None:
    from flood.s3 import make_client

    profile = Profile(
        "bench",
        "amazon",
        os.environ["AWS_ACCESS_KEY_ID"],
        os.environ["AWS_SECRET_ACCESS_KEY"],
        REGION,
        endpoint,
    )
    client = make_client(profile)
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read()
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        key = os.path.relpath(path, root)
        client.put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=md5)
        if head:
            client.head_object(Bucket=bucket, Key=key)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("src")
    p.add_argument("bucket")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--head", action="store_true")
    args = p.parse_args()
    paths = files_under(args.src)
    ctx = mp.get_context("fork")  # boto3 imported in the child only: nothing unsafe to inherit
    procs = [
        ctx.Process(
            target=worker,
            args=(args.src, paths[i :: args.processes], args.bucket, args.endpoint, args.head),
        )
        for i in range(args.processes)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return max(abs(proc.exitcode or 0) for proc in procs)


if __name__ == "__main__":
    sys.exit(main())
