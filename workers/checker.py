"""The checker role: a short-lived child that asks one profile's server something for the
supervisor (its buckets' check, the janitor's orphan multipart uploads) and hands the answer
back, so that boto3 and S3's model live in the children, never in the supervisor."""

from __future__ import annotations

import datetime as dt
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection as Pipe
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from flood import orphans, records
from flood.checks import ProfileCheck
from flood.errors import ConfigError
from flood.s3 import check_bucket, check_profile, make_client
from flood.settings import Settings
from flood.verdict import describe
from flood.workers.role import die_with_supervisor


def probe(settings: Settings, profile: str, buckets: list[str], whole: bool) -> ProfileCheck:
    """The profile's check (ListBuckets, or HeadBucket per bucket), or with whole=False one
    bucket's HeadBucket."""
    client = make_client(settings.profiles[profile], settings.profiles)
    if whole:
        return check_profile(client, buckets)
    return check_bucket(client, buckets[0])


def sweep_orphans(
    settings: Settings, profile: str, buckets: list[str], now: dt.datetime | None
) -> tuple[str | None, dict[str, orphans.Sweep | str]]:
    """The janitor's round for one profile: each bucket's Sweep, or why its listing failed;
    or (first) why no client could be made."""
    try:
        client = make_client(settings.profiles[profile], settings.profiles)
    except ConfigError as exc:
        return str(exc), {}
    records.open_db(
        settings.db_path, settings.node, checked=True
    )  # which uploads are Flood's, in flight
    swept: dict[str, orphans.Sweep | str] = {}
    try:
        for bucket in buckets:
            try:
                swept[bucket] = orphans.sweep(client, bucket, settings.abandon_multipart_after, now)
            except (ClientError, BotoCoreError) as exc:
                swept[bucket] = describe(exc)
    finally:
        records.close_db()
    return None, swept


TASKS: dict[str, Callable[..., Any]] = {"probe": probe, "orphans": sweep_orphans}


def main(task: str, args: tuple[Any, ...], conn: Pipe, supervisor_pid: int) -> None:
    """Process entry point (the arbiter's Arbiter.ask): one answer on the pipe, then exit."""
    die_with_supervisor(supervisor_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(TASKS[task](*args))
    conn.close()
