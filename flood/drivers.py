"""Database drivers Flood's records never use, kept out of its daemons' memory."""

from __future__ import annotations

import sys

# peewee imports every PostgreSQL and MySQL driver it finds installed (psycopg alone holds
# 15 MiB), though SQLite's records need none. Only a daemon's entry point calls this, never a
# library import: a program that imports flood may want psycopg for itself. The records let
# psycopg in again when they open a PostgreSQL database (records._hand_psycopg_to_peewee).
UNUSED = ("psycopg", "psycopg2", "psycopg2cffi", "pymysql", "MySQLdb")


def keep_out_unused() -> None:
    """Make `import psycopg` and the like fail in this process (unless imported already), so
    peewee takes them for not installed."""
    for name in UNUSED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None: "not importable"


def let_in(name: str) -> None:
    """Undo keep_out_unused for one driver: a PostgreSQL database is in use after all."""
    if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]
