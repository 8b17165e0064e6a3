"""Counting hooks for the benchmark's accounting run, loaded as `sitecustomize` (bench.py copies
this file under that name onto PYTHONPATH): every HTTP request botocore or Flood's lean PUT
sends and every SQL statement SQLite runs (or psycopg sends, and its round trips, with
$FLOOD_BENCH_COUNT_PG), per process, written to
$FLOOD_BENCH_COUNT_DIR/<pid>.json as they happen.

Loaded only when that variable is set; Flood's code is not touched. Children forked by the
forkserver inherit the patched modules and write their own file."""

from __future__ import annotations

import json
import os
from typing import Any

_DIR = os.environ.get("FLOOD_BENCH_COUNT_DIR")
READ_ONLY = 1  # psycopg's Wait.R (selectors.EVENT_READ): the client waits to read, nothing to send
_counts: dict[str, int] = {}
_owner = 0


def _bump(name: str) -> None:
    global _owner
    if _owner != os.getpid():  # a forked child starts from zero, not from its parent's counts
        _counts.clear()
        _owner = os.getpid()
    _counts[name] = _counts.get(name, 0) + 1
    fd = os.open(
        os.path.join(_DIR or ".", f"{_owner}.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
    )
    try:
        os.write(fd, json.dumps(_counts).encode())
    finally:
        os.close(fd)


def _sql(statement: str) -> None:
    word = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
    if word == "BEGIN":
        _bump(
            "db_transaction_"
            + (statement.split()[1].lower() if " " in statement.strip() else "deferred")
        )
    else:
        _bump("db_" + word.lower())


def _install() -> None:
    import botocore.endpoint
    import peewee

    send = botocore.endpoint.Endpoint._send

    def counted_send(self: Any, request: Any) -> Any:
        _bump(f"s3_{request.method}")
        return send(self, request)

    setattr(botocore.endpoint.Endpoint, "_send", counted_send)  # noqa: B010 - patching

    from flood.lean import PendingPut  # Flood's own PUTs do not go through botocore's endpoint

    lean_send = PendingPut.send

    def counted_lean_send(self: Any) -> None:
        _bump("s3_PUT")
        lean_send(self)

    setattr(PendingPut, "send", counted_lean_send)  # noqa: B010 - patching

    connect = getattr(peewee.SqliteDatabase, "_connect")  # noqa: B009 - a private method

    def counted_connect(self: Any) -> Any:
        conn = connect(self)
        conn.set_trace_callback(_sql)
        return conn

    setattr(peewee.SqliteDatabase, "_connect", counted_connect)  # noqa: B010 - patching
    if os.environ.get("FLOOD_BENCH_COUNT_PG"):
        _install_psycopg()


def _install_psycopg() -> None:
    """psycopg's statements (by their first word) and its round trips: each time the client
    has sent what it had and waits to read the server's answer (a wait for reading alone;
    a pipeline sends its statements while reading what has come back, and waits once, at its
    sync), whatever the number of Connection.wait calls that take it there."""
    import psycopg

    wait = psycopg.Connection.wait

    def watched(gen: Any) -> Any:
        reading = False
        try:
            state = gen.send(None)
            while True:
                if int(state) == READ_ONLY:
                    if not reading:
                        _bump("db_round_trip")
                    reading = True
                else:
                    reading = False
                state = gen.send((yield state))
        except StopIteration as done:
            return done.value

    def counted_wait(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
        return wait(self, watched(gen), *args, **kwargs)

    setattr(psycopg.Connection, "wait", counted_wait)  # noqa: B010 - patching
    for name in ("execute", "executemany"):
        method = getattr(psycopg.Cursor, name)

        def counted(self: Any, query: Any, *args: Any, _method: Any = method, **kw: Any) -> Any:
            _sql(query if isinstance(query, str) else "?")
            return _method(self, query, *args, **kw)

        setattr(psycopg.Cursor, name, counted)


if _DIR:
    _install()
