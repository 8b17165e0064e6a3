"""What every Flood command shares: one-line errors, option types, credentials and db lookup."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from flood import __version__, dburl, records, units
from flood.errors import ConfigError, LayoutError
from flood.layout import DB_RECORD_NAME, NODE_RECORD_NAME, Layout

DEFAULT_DB = "flood.db"
DEFAULT_SERVER_DIR = "/srv/flood"
DB_DEFAULT_HELP = f"$FLOOD_DB, else the supervisor's (SERVER_DIR/{DB_RECORD_NAME}), else ./flood.db"
DB_HELP = (
    "a SQLite file, or postgresql://USER@HOST[:PORT]/DB[?libpq parameters] shared by a fleet "
    f"(password from ~/.pgpass, $PGPASSFILE or $PGPASSWORD) (default: {DB_DEFAULT_HELP})"
)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2, with --version."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--version",
            action="version",
            version=f"{self.prog} {__version__}",
            help="print the command's name and Flood's version, and exit",
        )

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def seconds(text: str) -> float:
    """A duration: 90s, 30m, 12h, 7d, 250ms, or a plain number of seconds."""
    try:
        return units.duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration(text: str) -> float:
    """A duration option: 90s, 30m, 12h, 7d or seconds (flood.units.duration)."""
    try:
        return units.duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def pace(text: str) -> float:
    """A pace option: 10/s, 600/m, 3600/h or a number a second (flood.units.per_second)."""
    try:
        return units.per_second(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def log_level(text: str) -> str:
    level = text.lower()
    if level == "warn":
        level = "warning"
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a level (debug, info, warning, error, critical)"
        )
    return level


def db_location(option: str | None, root: Path | None = None) -> tuple[str, str]:
    """The records database and where its name came from: --db, else $FLOOD_DB, else the one
    the supervisor of `root` recorded it uses, else ./flood.db; made absolute so every
    process agrees."""
    if option:
        return _absolute(option), "from --db"
    if os.environ.get("FLOOD_DB"):
        return _absolute(os.environ["FLOOD_DB"]), "from $FLOOD_DB"
    if root is not None:
        recorded = Layout(root).recorded_db()
        if recorded is not None:
            return recorded, f"the supervisor's, recorded in {root / DB_RECORD_NAME}"
    return os.path.abspath(DEFAULT_DB), "the default ./flood.db: no supervisor recorded one"


def _absolute(target: str) -> str:
    """A SQLite path made absolute; a postgresql:// URL as given."""
    return target if dburl.is_url(target) else os.path.abspath(target)


def node_name(option: str | None, root: Path | None = None) -> str:
    """--node, else the node the supervisor of `root` writes as, else the host name."""
    if option:
        return option
    if root is not None:
        recorded = Layout(root).recorded_node()
        if recorded:
            return recorded
    return records.default_node()


def db_path(option: str | None, root: Path | None = None) -> str:
    """--db, else $FLOOD_DB, else the supervisor's (when `root` is given), else ./flood.db."""
    return db_location(option, root)[0]


def records_db(prog: str, option: str | None, root: Path, create: bool) -> str:
    """The records a command opens (flood.records.open_db next). A database that does not
    exist is never created where the supervisor of `root` records elsewhere (ConfigError),
    nor at all unless `create`; one that exists but is not the supervisor's gets a note."""
    path, source = db_location(option, root)
    recorded = Layout(root).recorded_db()
    if dburl.is_url(path):
        return _records_url(prog, path, source, recorded, create)
    exists = os.path.exists(path)
    if recorded is not None and recorded != path:
        if not exists:
            raise ConfigError(
                f"no records database at {path} ({source}), and the supervisor of {root} "
                f"records into {recorded}: give --db {recorded}, or neither --db nor $FLOOD_DB"
            )
        print(
            f"{prog}: note: records {path} ({source}) are not the supervisor's "
            f"({recorded}, recorded in {root / DB_RECORD_NAME})",
            file=sys.stderr,
        )
    if not exists and not create:
        raise ConfigError(f"no records database at {path} ({source})")
    return path


def _records_url(prog: str, url: str, source: str, recorded: str | None, create: bool) -> str:
    """A PostgreSQL database: it exists or the URL is refused when opened; without `create`
    it must hold Flood's schema already (check_db's version 0: none)."""
    if recorded is not None and recorded != dburl.without_password(url):
        print(
            f"{prog}: note: records {dburl.shown(url)} ({source}) are not the supervisor's "
            f"({dburl.shown(recorded)}, recorded in {DB_RECORD_NAME})",
            file=sys.stderr,
        )
    if not create and records.check_db(url) == 0:
        raise ConfigError(f"no Flood records in {dburl.shown(url)} ({source})")
    return url


def add_node_option(parser: argparse.ArgumentParser) -> None:
    """--node: the node whose rows a command acts on (a fleet sharing PostgreSQL records)."""
    parser.add_argument(
        "--node",
        metavar="NAME",
        help=f"the node (host) this command acts as (default: the supervisor's, recorded in "
        f"SERVER_DIR/{NODE_RECORD_NAME}, else the host name)",
    )


def server_dir(option: str | None) -> Path:
    """--server-dir, else $FLOOD_SERVER_DIR, else the default; it must exist."""
    if option:
        path, source = option, "from --server-dir"
    elif os.environ.get("FLOOD_SERVER_DIR"):
        path, source = os.environ["FLOOD_SERVER_DIR"], "from $FLOOD_SERVER_DIR"
    else:
        path, source = DEFAULT_SERVER_DIR, "the default; set --server-dir or $FLOOD_SERVER_DIR"
    root = Path(os.path.abspath(path))
    if not root.is_dir():
        raise LayoutError(
            f"server directory {root} ({source}) does not exist or is not a directory"
        )
    return root


def add_location_options(parser: argparse.ArgumentParser) -> None:
    """--server-dir, --credentials and --db, resolved as flood-copy and the supervisor do."""
    parser.add_argument(
        "--server-dir",
        metavar="DIR",
        help=f"spool directory (default: $FLOOD_SERVER_DIR, else {DEFAULT_SERVER_DIR})",
    )
    parser.add_argument(
        "--credentials",
        metavar="FILE",
        help="credentials file, used when neither $AWS_SHARED_CREDENTIALS_FILE "
        "nor ~/.aws/credentials exists",
    )
    parser.add_argument("--db", metavar="PATH|URL", help=f"records: {DB_HELP}")
    add_node_option(parser)


def printable_output() -> None:
    """Whatever a name holds, printing it never raises: characters the terminal's encoding
    cannot show come out as backslash escapes (names are escaped by layout.shown first)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def quiet_when_the_reader_goes() -> None:
    """For the commands that only report (status, audit, doctor): `flood-status | head` ends
    quietly when head has read enough, as Unix tools do, not with a BrokenPipeError."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code
