"""The flood-doctor command: a real round trip per profile and bucket, and the host's limits."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import email.utils
import hashlib
import json
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from flood import credentials, dburl, orphans, records
from flood import verdict as taxonomy
from flood.commands import common
from flood.commands.status import age_text
from flood.connection import Connection
from flood.credentials import Profile
from flood.errors import ConfigError, FloodError, InvalidName, LayoutError
from flood.layout import Layout
from flood.layout import check_bucket as check_bucket_name
from flood.lean import LeanClient
from flood.s3 import client_for
from flood.states import DIRECTORIES, State
from flood.transfer import Boto3Sender, LeanSender, Sender
from flood.verdict import Kind

PROG = "flood-doctor"
OK, WARN, FAIL = "ok", "warn", "FAIL"
PROBE_PREFIX = ".flood-doctor/"
PROBE_BODY = b"flood-doctor probe: safe to delete\n"
SKEW_WARN = 30.0  # seconds; SigV4 refuses requests beyond 15 minutes
SKEW_FAIL = 300.0
DISK_FAIL = (0.01, 256 * 1024 * 1024)  # fraction free, bytes free
DISK_WARN = (0.10, 1024 * 1024 * 1024)
INODES_FAIL, INODES_WARN = 0.01, 0.10
WATCHES = "/proc/sys/fs/inotify/max_user_watches"
DESCRIPTION = """\
Checks what Flood needs, and says what it found:
  credentials   the file Flood would use, its profiles and its mode;
  server dir    the five state directories: present, on one filesystem, usable by this user;
  inotify       fs.inotify.max_user_watches against the directories below incoming/;
  disk          free space and inodes on the server dir's filesystem;
  records       the records database the commands use (--db, $FLOOD_DB, else the one the
                supervisor recorded in SERVER_DIR/.flood.db-path), opened read only: Flood's
                and not newer;
  PROFILE/BUCKET  for every bucket directory of every profile (or the buckets named as
                s3://PROFILE/BUCKET, directory or not): HeadBucket, then PUT a small
                probe object the way uploads PUT (the lean client with Content-MD5, or
                boto3 with --boto3-put; through the same proxy, CA and credentials), HEAD it,
                DELETE it, and the clock skew against the server's Date header; then the
                incomplete multipart uploads no record of Flood's knows (orphans: a warning
                with how many and the oldest's age; nothing is aborted).
A problem is classified: auth (the key or secret is refused), missing_bucket, permissions
(naming the operation denied), incompatible (the provider refuses a request Flood makes, such
as checksum headers), tls (the server's certificate does not verify), network (with its
cause: refused, reset, timed out, a proxy that refused CONNECT), server (5xx), clock."""
EPILOG = """\
A denied HEAD or DELETE is a warning only: uploads accept a HEAD they may not make, and Flood
never deletes objects (the probe's key is named so it can be removed by hand).
exit status: 0 all is well (warnings allowed); 1 a problem found; 2 bad usage."""


@dataclass
class Check:
    """One line of the report."""

    subject: str
    status: str
    category: str
    detail: str


# -- S3 --------------------------------------------------------------------------------------
def classify(exc: BaseException, operation: str) -> tuple[str, str]:
    """(category, detail) of an S3 error raised by `operation`, from flood.verdict's kind."""
    kind = taxonomy.classify(exc, operation).kind
    if kind == Kind.TLS:
        return "tls", f"{operation}: {taxonomy.describe(exc)}: the certificate does not verify"
    if kind == Kind.CREDENTIALS:
        return "credentials", f"{operation}: {taxonomy.describe(exc)}: no keys to sign with"
    if not isinstance(exc, ClientError):
        if isinstance(exc, BotoCoreError):
            return "network", f"{operation}: {taxonomy.describe(exc)}"
        return "error", f"{operation}: {taxonomy.describe(exc)}"
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "")) or str(taxonomy.status_of(exc))
    said = f"{operation}: {code}" + (f" ({error['Message']})" if error.get("Message") else "")
    if kind == Kind.AUTH:
        return "auth", f"{said}: the server refused the key (check the access key and secret)"
    if kind == Kind.CLOCK:
        return "clock", f"{said}: this machine's clock is too far from the server's"
    if kind == Kind.MISSING_BUCKET:
        return "missing_bucket", f"{said}: the bucket does not exist"
    if kind == Kind.PERMISSIONS:
        return "permissions", f"{operation} denied ({code})"
    if kind in (Kind.INCOMPATIBLE, Kind.MISMATCH):
        checksum = "checksum" in str(error.get("Message", "")).lower()
        hint = " (the provider refuses checksum headers?)" if checksum else ""
        return "incompatible", f"{said}: the provider refused the request{hint}"
    if kind == Kind.SERVER:
        return "server", f"{said}: the server failed"
    return "error", said


class Probe:
    """The S3 calls of one profile, remembering the server's Date for the clock check. Its PUT
    goes the way the uploads' PUTs go: the lean client, or boto3's put_object."""

    def __init__(self, connection: Connection, lean: bool) -> None:
        self.client = client_for(connection)
        self.sender: Sender = (
            LeanSender(LeanClient(connection)) if lean else Boto3Sender(self.client)
        )
        self.path = "lean client" if lean else "boto3 put_object"
        self.skews: list[float] = []

    def call(self, operation: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        answer = fn(**kwargs)
        self.note_date(answer)
        return answer

    def note_date(self, answer: Any) -> None:
        headers = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}) if answer else {}
        date = headers.get("date")
        if date:
            with_tz = email.utils.parsedate_to_datetime(date)
            self.skews.append(with_tz.timestamp() - time.time())

    def skew(self) -> float | None:
        return max(self.skews, key=abs) if self.skews else None


def check_profile(
    profile: Profile,
    buckets: list[str],
    profiles: Mapping[str, Profile],
    lean: bool = True,
    known: Callable[[str], set[str]] | None = None,
) -> list[Check]:
    """ListBuckets (auth and network), then the round trip on each bucket."""
    try:
        probe = Probe(Connection(profile, profiles), lean)
    except ConfigError as exc:
        return [Check(profile.name, FAIL, "config", str(exc))]
    where = profile.endpoint or f"{profile.provider} ({profile.region})"
    try:
        probe.call("ListBuckets", probe.client.list_buckets)
    except (ClientError, BotoCoreError) as exc:
        category, detail = classify(exc, "ListBuckets")
        if isinstance(exc, ClientError):
            probe.note_date(exc.response)
        if category != "permissions":  # a bucket-scoped key may not list: go on to the buckets
            return [Check(profile.name, FAIL, category, f"{detail} [{where}]")]
    if not buckets:
        return [
            Check(
                profile.name,
                OK,
                "ok",
                f"key accepted by {where}; no bucket directory "
                "yet, so no round trip" + _skew_text(probe.skew()),
            )
        ]
    checks = []
    for bucket in buckets:
        checks.append(check_bucket(probe, profile.name, bucket, where))
        if known is not None and checks[-1].status != FAIL:
            checks += check_orphans(probe, profile.name, bucket, known)
    return checks


def check_orphans(
    probe: Probe, profile: str, bucket: str, known: Callable[[str], set[str]]
) -> list[Check]:
    """A warning when the bucket holds incomplete multipart uploads no record knows (the
    supervisor's janitor aborts them once old enough); nothing when it holds none."""
    subject = f"{profile}/{bucket}"
    try:
        found = orphans.find(probe.client, bucket, known)
    except (ClientError, BotoCoreError) as exc:
        category, detail = classify(exc, "ListMultipartUploads")
        return [Check(subject, WARN, category, f"{detail}: orphan uploads cannot be listed")]
    if not found:
        return []
    age = found[0].age(dt.datetime.now(dt.UTC))
    detail = (
        f"{len(found)} incomplete multipart upload{'s' if len(found) > 1 else ''} no record "
        f"of Flood's knows, the oldest initiated {age_text(age)} ago "
        f"({found[0].key}); flood-supervisor's janitor aborts them after "
        "--abandon-multipart-after"
    )
    return [Check(subject, WARN, "orphans", detail)]


def check_bucket(probe: Probe, profile: str, bucket: str, where: str) -> Check:
    subject = f"{profile}/{bucket}"
    key = f"{PROBE_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    warnings: list[str] = []
    try:
        _round_trip(probe, bucket, key, warnings)
    except _Failed as failed:
        return Check(subject, FAIL, failed.category, f"{failed.detail} [{where}]")
    took = (time.monotonic() - started) * 1000
    skew = probe.skew()
    status, category = OK, "ok"
    if skew is not None and abs(skew) > SKEW_WARN:
        status = FAIL if abs(skew) > SKEW_FAIL else WARN
        category = "clock"
    if warnings and status == OK:
        status, category = WARN, "permissions"
    detail = (
        f"HeadBucket, PUT ({probe.path}), HEAD, DELETE of a {len(PROBE_BODY)}-byte probe "
        f"in {took:.0f} ms" + _skew_text(skew) + "".join(f"; {w}" for w in warnings)
    )
    return Check(subject, status, category, detail)


class _Failed(Exception):
    def __init__(self, category: str, detail: str) -> None:
        super().__init__(detail)
        self.category = category
        self.detail = detail


def _step(probe: Probe, operation: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    try:
        return probe.call(operation, fn, **kwargs)
    except (ClientError, BotoCoreError) as exc:
        if isinstance(exc, ClientError):
            probe.note_date(exc.response)
        raise _Failed(*classify(exc, operation)) from None


def _round_trip(probe: Probe, bucket: str, key: str, warnings: list[str]) -> None:
    client = probe.client
    try:
        _step(probe, "HeadBucket", client.head_bucket, Bucket=bucket)
    except _Failed as failed:
        if failed.category != "permissions":  # a 403 on HEAD says nothing yet: PUT decides
            raise
    digest = hashlib.md5(PROBE_BODY, usedforsecurity=False)
    md5 = base64.b64encode(digest.digest()).decode()
    try:
        etag = probe.sender.start(bucket, key, PROBE_BODY, md5).result().strip('"')
    except (ClientError, BotoCoreError) as exc:
        if isinstance(exc, ClientError):
            probe.note_date(exc.response)
        raise _Failed(*classify(exc, "PutObject")) from None
    if etag and etag != digest.hexdigest():
        warnings.append(
            f"the ETag {etag} is not the MD5 of the probe (verification by ETag will fail)"
        )
    try:
        head = _step(probe, "HeadObject", client.head_object, Bucket=bucket, Key=key)
        if int(head.get("ContentLength", -1)) != len(PROBE_BODY):
            raise _Failed(
                "incompatible",
                f"HeadObject reports {head.get('ContentLength')} "
                f"bytes for a {len(PROBE_BODY)}-byte probe",
            )
    except _Failed as failed:
        if failed.category != "permissions":
            raise
        warnings.append(f"{failed.detail}: uploads skip their verification HEAD")
    try:
        _step(probe, "DeleteObject", client.delete_object, Bucket=bucket, Key=key)
    except _Failed as failed:
        if failed.category != "permissions":
            raise
        warnings.append(f"{failed.detail}: the probe object {key} was left in the bucket")


def _skew_text(skew: float | None) -> str:
    if skew is None:
        return ""
    return (
        f"; clock {abs(skew):.0f} s {'behind' if skew > 0 else 'ahead of'} the server"
        if abs(skew) >= 1.5
        else "; clock within a second of the server"
    )


# -- the host --------------------------------------------------------------------------------
def check_server_dir(layout: Layout) -> Check:
    missing = [s for s in DIRECTORIES if not os.path.isdir(layout.state_dir(s))]
    if missing:
        return Check(
            "server dir",
            WARN,
            "layout",
            f"{layout.root}: no {', '.join(missing)} yet (flood-supervisor creates them at start)",
        )
    try:
        layout.check_one_filesystem()
    except LayoutError as exc:
        return Check("server dir", FAIL, "layout", str(exc))
    denied = [
        s for s in DIRECTORIES if not os.access(layout.state_dir(s), os.R_OK | os.W_OK | os.X_OK)
    ]
    if denied:
        return Check(
            "server dir",
            FAIL,
            "permissions",
            f"{', '.join(denied)} below {layout.root} not writable by uid {os.getuid()}",
        )
    info = os.stat(layout.state_dir(State.INCOMING))
    return Check(
        "server dir",
        OK,
        "ok",
        f"{layout.root}: the five state directories are on one filesystem (device "
        f"{os.major(info.st_dev)}:{os.minor(info.st_dev)}) and usable by uid "
        f"{os.getuid()}",
    )


def check_inotify(layout: Layout) -> Check:
    try:
        limit = int(Path(WATCHES).read_text())
    except (OSError, ValueError):
        return Check("inotify", WARN, "inotify", f"cannot read {WATCHES}")
    dirs = count_dirs(layout.state_dir(State.INCOMING))
    detail = (
        f"{dirs} directories below incoming/ to watch; fs.inotify.max_user_watches = "
        f"{limit} (shared by every inotify user of this uid)"
    )
    if dirs > limit:
        return Check(
            "inotify",
            FAIL,
            "inotify",
            detail + ": raise it (sysctl), or the watcher falls back to rescans",
        )
    if dirs > limit // 2:
        return Check("inotify", WARN, "inotify", detail + ": more than half used")
    return Check("inotify", OK, "ok", detail)


def count_dirs(top: str) -> int:
    """Directories at and below top (what a recursive inotify watch needs), links not followed."""
    count = 0
    stack = [top]
    while stack:
        path = stack.pop()
        count += 1
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
    return count if os.path.isdir(top) else 0


def check_disk(root: Path) -> Check:
    vfs = os.statvfs(root)
    free = vfs.f_bavail * vfs.f_frsize
    share = free / (vfs.f_blocks * vfs.f_frsize) if vfs.f_blocks else 1.0
    inodes = vfs.f_favail / vfs.f_files if vfs.f_files else 1.0
    detail = f"{_bytes(free)} free ({share:.0%})" + (
        f", {vfs.f_favail} inodes free ({inodes:.0%})" if vfs.f_files else ""
    )
    if share < DISK_FAIL[0] or free < DISK_FAIL[1] or inodes < INODES_FAIL:
        return Check("disk", FAIL, "disk", detail)
    if share < DISK_WARN[0] or free < DISK_WARN[1] or inodes < INODES_WARN:
        return Check("disk", WARN, "disk", detail)
    return Check("disk", OK, "ok", detail)


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def check_records(
    option: str | None, root: Path, node: str | None = None
) -> tuple[Check, Callable[[str], set[str]] | None]:
    """Which records database the commands use and why, opened read only, and the multipart
    uploads it knows (what the orphan check leaves out); None when there is none to read, so
    no orphan is claimed."""
    path, source = common.db_location(option, root)
    recorded = Layout(root).recorded_db()
    elsewhere = recorded is not None and recorded != dburl.without_password(path)
    if not dburl.is_url(path) and not os.path.exists(path):
        if elsewhere:
            detail = f"no records database at {path} ({source}); the supervisor records into "
            check = Check("records", FAIL, "records", f"{detail}{recorded}: give --db {recorded}")
            return check, None
        detail = (
            f"no records database at {path} ({source}) yet: flood-supervisor creates it at "
            "start; orphan uploads are not looked for"
        )
        return Check("records", WARN, "records", detail), None
    shown = dburl.shown(path)
    try:
        version = records.check_db(path)
        if version < records.SCHEMA_VERSION:
            detail = f"{shown} has schema {version}: flood-supervisor migrates it at start"
            return Check("records", WARN, "records", detail), None
        records.open_readonly(path, common.node_name(node, root))
    except ConfigError as exc:
        return Check("records", FAIL, "records", str(exc)), None
    detail = f"{shown} ({source}), schema version {version}, read only"
    if elsewhere:
        check = Check(
            "records", WARN, "records", f"{detail}; but the supervisor records into {recorded}"
        )
        return check, records.upload_ids
    return Check("records", OK, "ok", detail), records.upload_ids


def check_credentials(option: str | None) -> tuple[Check, credentials.CredentialsFile | None]:
    try:
        creds = credentials.load(option)
    except ConfigError as exc:
        return Check("credentials", FAIL, "config", str(exc)), None
    mode = stat.S_IMODE(creds.mode)
    detail = (
        f"{creds.path} ({creds.chosen()}); profiles "
        f"{', '.join(sorted(creds.profiles))}; mode {mode:o}"
    )
    if creds.loose_permissions():
        return Check("credentials", WARN, "permissions", detail + ": chmod 600 it"), creds
    return Check("credentials", OK, "ok", detail), creds


# -- the command -----------------------------------------------------------------------------
def parser() -> common.Parser:
    p = common.Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "targets",
        nargs="*",
        metavar="s3://PROFILE[/BUCKET]",
        help="probe these buckets (whether or not their directories exist yet) or profiles only",
    )
    p.add_argument("--profile", metavar="P", help="probe this profile only")
    p.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    p.add_argument(
        "--boto3-put",
        action="store_true",
        help="PUT the probe with boto3's put_object, as flood-supervisor --boto3-put uploads "
        "(default: the lean client, as it uploads by default)",
    )
    common.add_location_options(p)
    return p


def parse_targets(p: common.Parser, targets: Sequence[str]) -> dict[str, set[str]]:
    """s3://PROFILE[/BUCKET] arguments: the buckets asked for, by profile (empty: all of it)."""
    wanted: dict[str, set[str]] = {}
    for target in targets:
        profile, _, bucket = target.removeprefix("s3://").rstrip("/").partition("/")
        if not target.startswith("s3://") or not profile or "/" in bucket:
            p.error(f"{target!r} is not s3://PROFILE or s3://PROFILE/BUCKET")
        if bucket:
            try:
                check_bucket_name(bucket)
            except InvalidName as exc:
                p.error(str(exc))
        wanted.setdefault(profile, set())
        if bucket:
            wanted[profile].add(bucket)
    return wanted


def main(argv: Sequence[str] | None = None) -> int:
    common.printable_output()
    common.quiet_when_the_reader_goes()
    p = parser()
    args = p.parse_args(argv)
    args.wanted = parse_targets(p, args.targets)
    if args.profile:
        args.wanted.setdefault(args.profile, set())
    try:
        checks = run(args)
    except FloodError as exc:
        return common.fail(PROG, str(exc), exc.exit_code)
    finally:
        records.close_db()
    report(checks, args.json)
    return 1 if any(c.status == FAIL for c in checks) else 0


def run(args: argparse.Namespace) -> list[Check]:
    root = common.server_dir(args.server_dir)
    layout = Layout(root)
    creds_check, creds = check_credentials(args.credentials)
    records_check, known = check_records(args.db, root, args.node)
    checks = [creds_check, check_server_dir(layout), check_inotify(layout), check_disk(root)]
    checks.append(records_check)
    if creds is None:
        return checks
    wanted: dict[str, set[str]] = args.wanted
    unknown = sorted(set(wanted) - set(creds.profiles))
    if unknown:
        raise ConfigError(
            f"unknown profile {unknown[0]!r}: {creds.path} has {', '.join(sorted(creds.profiles))}"
        )
    for name in sorted(creds.profiles):
        if not wanted or name in wanted:
            # A bucket asked for by name is probed whether or not its directory exists.
            buckets = sorted(wanted.get(name) or layout.buckets_present(name))
            checks += check_profile(
                creds.profiles[name], buckets, creds.profiles, not args.boto3_put, known
            )
    return checks


def report(checks: list[Check], as_json: bool) -> None:
    problems = sum(c.status == FAIL for c in checks)
    if as_json:
        print(json.dumps({"ok": problems == 0, "checks": [asdict(c) for c in checks]}, indent=2))
        return
    width = max(len(c.subject) for c in checks)
    for c in checks:
        label = "" if c.category == "ok" else f"{c.category}: "
        print(f"{c.status:<4}  {c.subject:<{width}}  {label}{c.detail}")
    print(
        "all is well" if not problems else f"{problems} problem{'s' if problems > 1 else ''} found"
    )
