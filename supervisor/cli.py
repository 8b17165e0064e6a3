"""The flood-supervisor command line: options into Settings, then start-up and the arbiter."""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flood import config, credentials, logs, metrics, records, snapshot
from flood.commands import common
from flood.errors import EX_TEMPFAIL, ConfigError, FloodError
from flood.layout import DB_RECORD_NAME, Layout
from flood.settings import DEFAULT_IGNORE, MiB, Settings
from flood.supervisor import startup
from flood.supervisor.arbiter import Arbiter

DESCRIPTION = """\
Uploads every file renamed into SERVER_DIR/incoming/PROFILE/BUCKET/path/to/key to bucket
BUCKET of credentials profile PROFILE as key path/to/key, verifies it, and moves it to
completed/ (or failed/, with the reason in the records). Layout:
  SERVER_DIR/{incoming_tmp,incoming,processing,failed,completed}/PROFILE/BUCKET/key
  producers write into incoming_tmp/ and rename into incoming/ (or use flood-copy)."""

EPILOG = """\
credentials: the first file that exists of $AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials,
--credentials; each [profile] names provider (amazon|cloudflare|backblaze),
aws_access_key_id, aws_secret_access_key, aws_region, aws_endpoint.
exit status: 0 stopped cleanly; 78 configuration error; 75 another supervisor holds the
server directory; 70 a child failed at start."""


def parser() -> common.Parser:
    p = common.Parser(
        prog="flood-supervisor",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "server_dir",
        metavar="SERVER_DIR",
        nargs="?",
        help="the spool directory (or server_dir in the config file's [supervisor])",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the config file, TOML (default: $FLOOD_CONFIG, else none): [supervisor] holds "
        "any of these options (a flag here wins), [upload], [[rules]], [lifecycle], [hooks]",
    )
    p.add_argument(
        "--workers",
        type=common.positive_int,
        default=4,
        metavar="N",
        help="uploader processes per profile (default: 4)",
    )
    p.add_argument(
        "--credentials",
        metavar="FILE",
        help="credentials file, used when neither $AWS_SHARED_CREDENTIALS_FILE nor "
        "~/.aws/credentials exists",
    )
    p.add_argument(
        "--db",
        metavar="PATH|URL",
        help="records: a SQLite file, or postgresql://USER@HOST[:PORT]/DB[?libpq parameters] "
        "shared by a fleet, password from ~/.pgpass, $PGPASSFILE or $PGPASSWORD (default: "
        f"$FLOOD_DB, else the one this server dir's last supervisor used, "
        f"SERVER_DIR/{DB_RECORD_NAME}, else ./flood.db); recorded there",
    )
    p.add_argument(
        "--node",
        metavar="NAME",
        help="the node (host) every row is written as; start-up repair, holds and requeue "
        "touch this node's rows only (default: the host name)",
    )
    p.add_argument(
        "--retry-base",
        type=common.seconds,
        default=30.0,
        metavar="SECONDS",
        help="retry n waits d..2d with d = base * 2^(n-1) (default: 30)",
    )
    p.add_argument(
        "--max-retries",
        type=common.non_negative_int,
        default=10,
        metavar="N",
        help="retries after the first upload before failed/ (default: 10)",
    )
    p.add_argument(
        "--retry-max-delay",
        type=common.seconds,
        default=None,
        metavar="SECONDS",
        help="cap on one retry's wait (default: no cap)",
    )
    p.add_argument("--log-file", metavar="PATH", help="log lines go here (default: stdout)")
    p.add_argument(
        "--log-format",
        choices=("json", "text", "auto"),
        default="auto",
        help="json: one ECS JSON object per line; text: one readable line per event (colours "
        "on a terminal); auto: text on a terminal, json otherwise (default: auto)",
    )
    p.add_argument(
        "--log-successes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write file_claimed and upload_succeeded, two info lines per file; "
        "--no-log-successes leaves them out (failures, retries and holds are always written; "
        "default: on)",
    )
    p.add_argument(
        "--log-level",
        type=common.log_level,
        default="info",
        metavar="LEVEL",
        help="debug, info, warning, error or critical, any case (default: info)",
    )
    p.add_argument(
        "--multipart-threshold",
        type=common.positive_int,
        default=16,
        metavar="MIB",
        help="files this size or larger go up in parts (default: 16)",
    )
    p.add_argument(
        "--part-size",
        type=part_mib,
        default=8,
        metavar="MIB",
        help="multipart part size, 5 to 5120 (default: 8; a profile's part_size key wins; "
        "grown for files that would need over 10,000 parts)",
    )
    p.add_argument(
        "--parts-in-flight",
        type=parts,
        default=10,
        metavar="N",
        help="parts of one file sent at once, 1 to 64; memory is N x part size per uploader "
        "(default: 10; a profile's parts_in_flight key wins)",
    )
    p.add_argument(
        "--settle",
        type=common.seconds,
        default=1.0,
        metavar="SECONDS",
        help="a file found by a scan is claimed once unchanged this long (default: 1)",
    )
    p.add_argument(
        "--rescan-interval",
        type=common.seconds,
        default=300.0,
        metavar="SECONDS",
        help="reconciling scan of incoming/ (default: 300)",
    )
    p.add_argument(
        "--recheck-interval",
        type=common.seconds,
        default=30.0,
        metavar="SECONDS",
        help="first re-check of a paused profile or bucket, doubling (default: 30)",
    )
    p.add_argument(
        "--grace",
        type=common.seconds,
        default=20.0,
        metavar="SECONDS",
        help="on SIGTERM, time for uploads in flight to finish (default: 20)",
    )
    p.add_argument(
        "--verify",
        choices=("content-md5", "head"),
        default="content-md5",
        help="content-md5: a single PUT is proven by the server's Content-MD5 "
        "check and its ETag, HEAD only for multipart or non-MD5 ETags; "
        "head: also HEAD every object (default: content-md5)",
    )
    p.add_argument(
        "--boto3-put",
        action="store_true",
        help="send single PUTs through boto3 instead of the lean signed path",
    )
    p.add_argument(
        "--inject-failures",
        type=share,
        default=0.0,
        metavar="RATE",
        help="staging: fail this share (0 to 1) of upload attempts on purpose, before any "
        "request, as transient errors; the retries and the lifecycle then run as they would",
    )
    p.add_argument(
        "--strict-permissions",
        action="store_true",
        help="refuse (exit 78) a credentials file group or others can read, instead of warning",
    )
    p.add_argument(
        "--ignore",
        default=",".join(DEFAULT_IGNORE),
        metavar="PATTERNS",
        help="comma-separated file-name patterns left in incoming/ and logged "
        f"(default: {','.join(DEFAULT_IGNORE)}; '' ignores nothing)",
    )
    p.add_argument(
        "--audit-interval",
        type=common.duration,
        default=0.0,
        metavar="DURATION",
        help="every DURATION, HEAD the objects completed meanwhile and log those missing or "
        "different from their records (90s, 30m, 1h, 1d; default: 0, off)",
    )
    p.add_argument(
        "--janitor-interval",
        type=common.duration,
        default=3600.0,
        metavar="DURATION",
        help="at start and every DURATION, abort incomplete multipart uploads no record knows "
        "in the buckets Flood writes to, once older than --abandon-multipart-after "
        "(default: 1h; 0: off)",
    )
    p.add_argument(
        "--abandon-multipart-after",
        type=positive_duration,
        default=86400.0,
        metavar="DURATION",
        help="age from which the janitor aborts an orphan multipart upload (default: 24h)",
    )
    p.add_argument(
        "--metrics-port",
        type=port_number,
        metavar="PORT",
        help="serve Prometheus metrics on this port (0: any free one, logged)",
    )
    p.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address the metrics port is bound to (default: 127.0.0.1)",
    )
    return p


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1")
    return value


def part_mib(text: str) -> int:
    value = common.positive_int(text)
    if not 5 <= value <= 5120:
        raise argparse.ArgumentTypeError(f"{text!r} is outside S3's 5 to 5120 MiB for a part")
    return value


def parts(text: str) -> int:
    value = common.positive_int(text)
    if value > 64:
        raise argparse.ArgumentTypeError(f"{text!r} is more than 64 parts in flight")
    return value


def positive_duration(text: str) -> float:
    value = common.duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def port_number(text: str) -> int:
    value = common.non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    common.printable_output()
    p = parser()
    args = p.parse_args(argv)
    try:
        path = config.locate(args.config)
        data = config.read(path) if path is not None else {}
        if data.get("supervisor"):
            assert path is not None
            from_file(p, data["supervisor"], path)
            args = p.parse_args(argv)  # the command line wins over the file
        if not args.server_dir:
            p.error("SERVER_DIR is needed (or server_dir in the config file's [supervisor])")
        creds = credentials.load(args.credentials)
        startup.check_connections(creds.profiles)
        conf = config.build(path, data, creds.profiles) if path is not None else config.EMPTY
    except ConfigError as exc:
        return common.fail("flood-supervisor", str(exc), exc.exit_code)
    server_dir = Path(os.path.abspath(args.server_dir))
    settings = Settings(
        server_dir=server_dir,
        db_path=common.db_path(args.db, server_dir),
        credentials_path=str(creds.path),
        profiles=creds.profiles,
        workers=args.workers,
        retry_base=args.retry_base,
        max_retries=args.max_retries,
        retry_max_delay=args.retry_max_delay,
        log_file=os.path.abspath(args.log_file) if args.log_file else None,
        log_level=args.log_level,
        log_format=logs.resolve_format(args.log_format, args.log_file),
        log_successes=args.log_successes,
        multipart_threshold=args.multipart_threshold * MiB,
        part_size=args.part_size * MiB,
        parts_in_flight=args.parts_in_flight,
        settle_seconds=args.settle,
        rescan_interval=args.rescan_interval,
        recheck_interval=args.recheck_interval,
        grace=args.grace,
        ignore=tuple(p for p in args.ignore.split(",") if p),
        verify=args.verify,
        lean_put=not args.boto3_put,
        config=conf,
        inject_failures=args.inject_failures,
        audit_interval=args.audit_interval,
        janitor_interval=args.janitor_interval,
        abandon_multipart_after=args.abandon_multipart_after,
        node=args.node or records.default_node(),
    )
    logs.export_options(settings.log_format, settings.log_successes)  # for the children
    log = logs.configure(
        "supervisor",
        settings.log_level,
        settings.log_file,
        settings.secrets(),
        settings.log_format,
        settings.log_successes,
    )
    for note in creds.skipped:
        log.info("credentials_file_skipped", reason=note)
    log.info(
        "credentials_loaded",
        path=str(creds.path),
        reason=creds.chosen(),
        profiles=sorted(creds.profiles),
    )
    if conf.path is not None:
        log.info("config_loaded", path=str(conf.path), reason="from --config or $FLOOD_CONFIG")
    for problem in startup.connection_warnings(settings):
        log.warning(problem.event, profile=problem.profile, reason=problem.reason)
    if settings.inject_failures:
        log.warning(
            "failure_injection_on",
            reason=f"--inject-failures {settings.inject_failures:g}: that share of upload "
            "attempts fails on purpose, before any request (staging only)",
        )
    if creds.loose_permissions():
        why = (
            f"credentials file {creds.path} has mode {creds.mode & 0o777:o}: group or "
            "others can read it; chmod 600 it"
        )
        if args.strict_permissions:
            log.error("credentials_file_exposed", path=str(creds.path), reason=why)
            return common.fail("flood-supervisor", why, 78)
        log.warning("credentials_file_exposed", path=str(creds.path), reason=why)
    try:
        # A database that is not Flood's, or is newer, is refused before anything is touched;
        # PostgreSQL not answering yet is waited for.
        startup.wait_for_database(settings, log)
        # The lock comes first: a second supervisor must not wipe the first one's incoming_tmp.
        startup.lock(settings.server_dir)
        layout = startup.prepare(settings, log)
    except FloodError as exc:
        log.error("startup_failed", error=str(exc))
        return common.fail("flood-supervisor", str(exc), exc.exit_code)
    return run_arbiter(args, settings, layout, log)


def from_file(p: argparse.ArgumentParser, table: Mapping[str, Any], path: Path) -> None:
    """The config file's [supervisor] table as the parser's defaults: every flag under its own
    name (dashes or underscores), read with the flag's own type; an unknown key is an error."""
    actions = {a.dest: a for a in p._actions if a.dest not in ("help", "config")}
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        where = f"config file {path}: [supervisor] {key}"
        if action is None:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise ConfigError(f"config file {path}: unknown key {key!r} in [supervisor]{hint}")
        defaults[dest] = _value(action, value, where)
    p.set_defaults(**defaults)


def _value(action: argparse.Action, value: Any, where: str) -> Any:
    if action.nargs == 0:  # a switch such as --boto3-put
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where} must be a string or a number, not {value!r}")
    text = str(value)
    if action.choices is not None and text not in action.choices:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(map(str, action.choices))}")
    if action.type is None:
        return text
    try:
        return action.type(text)  # type: ignore[operator]  # argparse types are callables
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def run_arbiter(
    args: argparse.Namespace,
    settings: Settings,
    layout: Layout,
    log: Any,
) -> int:
    """The arbiter until it stops, with metrics only when --metrics-port asks: the multiprocess
    dir must be in the environment before prometheus_client loads and the first child starts."""
    if args.metrics_port is None:
        metrics.disable()
        return int(Arbiter(settings, layout, None, log).run())
    path = metrics.prepare_dir()
    try:
        arbiter = Arbiter(settings, layout, None, log)
        try:
            server = metrics.serve(
                args.metrics_port,
                args.metrics_address,
                lambda: _snapshot(arbiter),
                lambda: arbiter.restart_counts,
                arbiter.orphans_found,
            )
        except OSError as exc:
            why = f"cannot serve metrics on {args.metrics_address}:{args.metrics_port}: {exc}"
            log.error("metrics_failed", error=why)
            return common.fail("flood-supervisor", why, EX_TEMPFAIL)
        log.info(
            "metrics_serving", address=args.metrics_address, port=server.server_port, path=path
        )
        try:
            return int(arbiter.run())
        finally:
            server.shutdown()
    finally:
        metrics.remove_dir(path)


def _snapshot(arbiter: Arbiter) -> snapshot.Snapshot:
    """Counts for a scrape, from the scrape's own thread and db connection."""
    try:
        return snapshot.snapshot(
            arbiter.layout, arbiter.settings.profiles, arbiter.settings.ignore, history=False
        )
    finally:
        records.close_db()
