"""What every Flood command shares: one-line errors, option types, credentials and db lookup."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from flood import __version__
from flood.errors import LayoutError

DEFAULT_DB = "flood.db"
DEFAULT_SERVER_DIR = "/srv/flood"


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
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def log_level(text: str) -> str:
    level = text.lower()
    if level == "warn":
        level = "warning"
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a level (debug, info, warning, error, critical)"
        )
    return level


def db_path(option: str | None) -> str:
    """--db, else $FLOOD_DB, else ./flood.db; made absolute so every process agrees."""
    return os.path.abspath(option or os.environ.get("FLOOD_DB") or DEFAULT_DB)


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
    parser.add_argument(
        "--db", metavar="PATH", help="SQLite records (default: $FLOOD_DB, else ./flood.db)"
    )


def printable_output() -> None:
    """Whatever a name holds, printing it never raises: characters the terminal's encoding
    cannot show come out as backslash escapes (names are escaped by layout.shown first)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code
