"""The records (SQLite, or PostgreSQL for a fleet, through peewee), the only door to the
database: the schema and its migrations, and every query as a named function. A row per
passage of a file, each row marked with the node (host) that wrote it."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import re
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, ParamSpec, TypeVar

import peewee as pw

from flood import dburl, drivers
from flood.errors import ConfigError, DatabaseUnreachable
from flood.jobs import FileRef
from flood.states import OPEN, Outcome, Reason, State

if TYPE_CHECKING:  # playhouse's migrations and pool are imported where they are used: a
    # daemon's child on SQLite needs neither (about a MiB of every process)
    from playhouse.migrate import SchemaMigrator

BUSY_TIMEOUT_MS = 15_000
DatabaseError = pw.PeeweeException  # what a failed query raises, for callers to catch
# The schema this code writes. 1: release 0.1.0 (no version table). 2: the version table and
# an index for requeue's look-up of linked passages. 3: endpoints (when each profile's server
# last answered, its current run of failures) and file_records.first_failed_at. 4: multipart
# uploads and their parts as they finish (resume), file_records.checksum. 5: the object
# options and version id of a passage, hook deliveries, and the spool's removals. 6: the node
# (host) of every row; holds and endpoints keyed by node too.
SCHEMA_VERSION = 6
# Held inside the transaction that creates or migrates the schema on PostgreSQL, so supervisors
# starting at once on an empty database take turns ("flood" in ASCII).
MIGRATION_LOCK = 0x666C6F6F64
POOL_CONNECTIONS = 4  # per process: one in use, a few to spare across reconnects
POOL_STALE_SECONDS = 600

# SQLite or PostgreSQL, whichever open_db() chose; the models are bound to this proxy, the
# fixed SQL of the per-file writes goes to the database itself (the proxy's indirection cost
# a tenth of those writes' CPU).
db = pw.DatabaseProxy()
_backend: dict[str, Any] = {"postgresql": False, "database": None}
_node = {"name": os.uname().nodename}


def default_node() -> str:
    """The node a process writes as unless told: the host name."""
    return os.uname().nodename


def node() -> str:
    """The node this process writes as, and whose rows its repair, holds and requeue touch."""
    return _node["name"]


def postgresql() -> bool:
    """Whether the open records are PostgreSQL's."""
    return bool(_backend["postgresql"])


def text(value: str | None) -> str | None:
    """A str the database can store: names that are not UTF-8 (surrogate escapes) are kept
    readable with backslash escapes (b'bad\\xff' is stored as 'bad\\xff'). Every name and
    error text goes through here on its way in."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return os.fsencode(value).decode("utf-8", "backslashreplace")


def names_for(stored: str) -> list[str]:
    """The file names a stored name may stand for: itself, and where it holds backslash
    escapes, the name text() made them from (b'bad\\xff' for 'bad\\xff')."""
    if "\\x" not in stored:
        return [stored]
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), stored.encode())
    original = os.fsdecode(raw)
    return [stored, original] if text(original) == stored else [stored]


def utcnow() -> dt.datetime:
    """Naive UTC: every timestamp in the database is UTC."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# -- the schema ------------------------------------------------------------------------------
class _Model(pw.Model):
    class Meta:
        database = db


class _Serial(pw.BigAutoField):
    """An id never given out twice: AUTOINCREMENT on SQLite (INTEGER PRIMARY KEY, as before),
    BIGSERIAL on PostgreSQL (whose sequences never reuse a value anyway)."""

    def ddl(self, ctx: Any) -> Any:
        node_list = super().ddl(ctx)
        return node_list if postgresql() else pw.NodeList((node_list, pw.SQL("AUTOINCREMENT")))


def _node_field() -> pw.TextField:
    """The node column: '' as the SQL default (what migration 6 adds), the node on insert."""
    return pw.TextField(default=node, constraints=[pw.SQL("DEFAULT ''")])


class FileRecord(_Model):
    """One passage of one file through the spool."""

    id = _Serial()
    profile = pw.TextField()
    bucket = pw.TextField()
    filepath = pw.TextField()
    file_creation_date = pw.DateTimeField(null=True)
    current_state = pw.TextField()
    last_updated = pw.DateTimeField(default=utcnow)
    upload_outcome = pw.TextField(null=True)
    size = pw.BigIntegerField(null=True)
    etag = pw.TextField(null=True)
    reason = pw.TextField(null=True)
    error = pw.TextField(null=True)
    retry_count = pw.IntegerField(default=0)
    next_attempt_at = pw.DateTimeField(null=True)
    requeued_from = pw.BigIntegerField(null=True, index=True)
    first_failed_at = pw.DateTimeField(null=True)  # the passage's first failed attempt
    checksum = pw.TextField(null=True)  # "crc32c:<base64>[-N]" of a completed object
    options = pw.TextField(null=True)  # the object options it was uploaded with (JSON)
    version_id = pw.TextField(null=True)  # the object's version, where the bucket keeps them
    node = _node_field()

    class Meta:
        table_name = "file_records"
        indexes = ((("profile", "bucket", "filepath"), False), (("current_state",), False))


class RetryAttempt(_Model):
    """One retry of one passage (the first upload is not a retry)."""

    id = _Serial()
    file_record_id = pw.BigIntegerField(index=True)
    attempt = pw.IntegerField()
    attempted_at = pw.DateTimeField(default=utcnow)
    outcome = pw.TextField()
    error = pw.TextField(null=True)
    node = _node_field()

    class Meta:
        table_name = "retry_attempts"


class Hold(_Model):
    """A profile (bucket '') or a bucket whose files wait in incoming/ until a check passes."""

    profile = pw.TextField()
    bucket = pw.TextField(default="")
    reason = pw.TextField()
    detail = pw.TextField(null=True)
    since = pw.DateTimeField(default=utcnow)
    node = _node_field()

    class Meta:
        table_name = "holds"
        primary_key = pw.CompositeKey("node", "profile", "bucket")


class Endpoint(_Model):
    """A profile's server as the uploads see it: when it last answered (an upload proven or a
    check passed), and the run of transient failures since (none: failures = 0)."""

    profile = pw.TextField()
    last_success_at = pw.DateTimeField(null=True)
    failing_since = pw.DateTimeField(null=True)
    failures = pw.IntegerField(default=0)
    failing_keys = pw.IntegerField(default=0)  # how many times the failing key changed, + 1
    last_failed_key = pw.TextField(null=True)
    node = _node_field()

    class Meta:
        table_name = "endpoints"
        primary_key = pw.CompositeKey("node", "profile")


class MultipartUpload(_Model):
    """A passage's multipart upload on the server, and the file it was started for: a
    restart continues it only while the file is still that file."""

    record_id = pw.BigIntegerField(primary_key=True)
    bucket = pw.TextField()
    key = pw.TextField()
    upload_id = pw.TextField()
    part_size = pw.BigIntegerField()
    file_size = pw.BigIntegerField()
    mtime_ns = pw.BigIntegerField()
    inode = pw.BigIntegerField()
    checksum = pw.TextField()  # the algorithm the parts carry (md5: Content-MD5 only)
    started_at = pw.DateTimeField(default=utcnow)
    node = _node_field()

    class Meta:
        table_name = "multipart_uploads"


class MultipartPart(_Model):
    """One part the server has acknowledged."""

    record_id = pw.BigIntegerField()
    number = pw.IntegerField()
    size = pw.BigIntegerField()
    etag = pw.TextField()
    checksum = pw.TextField(null=True)
    done_at = pw.DateTimeField(default=utcnow)
    node = _node_field()

    class Meta:
        table_name = "multipart_parts"
        primary_key = pw.CompositeKey("record_id", "number")


class Delivery(_Model):
    """A hook to run for a passage that ended (at least once: pending until it succeeds or
    its retries are spent)."""

    id = _Serial()
    record_id = pw.BigIntegerField(index=True)
    event = pw.TextField()  # complete | failure
    state = pw.TextField(default="pending", index=True)  # pending | done | failed
    attempts = pw.IntegerField(default=0)
    next_attempt_at = pw.DateTimeField(default=utcnow)
    error = pw.TextField(null=True)
    created_at = pw.DateTimeField(default=utcnow)
    node = _node_field()

    class Meta:
        table_name = "deliveries"


class Removal(_Model):
    """A file the spool's lifecycle removed from completed/ (nothing in failed/ ever is)."""

    id = _Serial()
    record_id = pw.BigIntegerField(null=True, index=True)
    path = pw.TextField()  # below completed/
    reason = pw.TextField()  # on_success | keep_completed
    removed_at = pw.DateTimeField(default=utcnow)
    node = _node_field()

    class Meta:
        table_name = "removals"


class SchemaVersion(_Model):
    """One row: the schema version the tables were last migrated to."""

    version = pw.IntegerField()

    class Meta:
        table_name = "flood_schema"
        primary_key = False


MODELS = (
    FileRecord,
    RetryAttempt,
    Hold,
    Endpoint,
    MultipartUpload,
    MultipartPart,
    Delivery,
    Removal,
    SchemaVersion,
)
_RELEASE_1_TABLES = {"file_records", "retry_attempts", "holds"}


def _to_v2(migrator: SchemaMigrator) -> None:
    db.create_tables([SchemaVersion])
    # The name peewee gives the model's own index, so a migrated and a new database agree.
    _sql('CREATE INDEX "filerecord_requeued_from" ON "file_records" ("requeued_from")', ())


def _to_v3(migrator: SchemaMigrator) -> None:
    db.create_tables([Endpoint])
    _apply(migrator.add_column("file_records", "first_failed_at", FileRecord.first_failed_at))


def _to_v4(migrator: SchemaMigrator) -> None:
    db.create_tables([MultipartUpload, MultipartPart])
    _apply(migrator.add_column("file_records", "checksum", FileRecord.checksum))


def _to_v5(migrator: SchemaMigrator) -> None:
    db.create_tables([Delivery, Removal])
    _apply(
        migrator.add_column("file_records", "options", FileRecord.options),
        migrator.add_column("file_records", "version_id", FileRecord.version_id),
    )


def _to_v6(migrator: SchemaMigrator) -> None:
    """The node of every row: rows written before are this node's (a database of release 5
    and earlier was one host's), holds and endpoints rebuilt with the node in their key.
    Tables the earlier steps just made from today's models have the column already."""
    for model in MODELS:
        table = model._meta.table_name
        if model is SchemaVersion or "node" in {c.name for c in db.get_columns(table)}:
            continue
        if model in (Hold, Endpoint):
            _rebuild_with_node(model)
            continue
        _sql(f'ALTER TABLE "{table}" ADD COLUMN "node" TEXT NOT NULL DEFAULT \'\'', ())
        _sql(f'UPDATE "{table}" SET "node" = ?', (node(),))


def _rebuild_with_node(model: type[_Model]) -> None:
    table = model._meta.table_name
    columns = ", ".join(f'"{c.name}"' for c in db.get_columns(table))
    _sql(f'ALTER TABLE "{table}" RENAME TO "{table}_v5"', ())
    db.create_tables([model])
    _sql(
        f'INSERT INTO "{table}" ({columns}, "node") SELECT {columns}, ? FROM "{table}_v5"',
        (node(),),
    )
    _sql(f'DROP TABLE "{table}_v5"', ())


# version -> the step that brings the schema from version - 1 to it
MIGRATIONS = {2: _to_v2, 3: _to_v3, 4: _to_v4, 5: _to_v5, 6: _to_v6}


# -- opening ---------------------------------------------------------------------------------
def check_db(path: str) -> int:
    """The schema version of the database at `path` (0: none yet), read without changing it;
    ConfigError for a database that is not Flood's, is newer than this code, or (PostgreSQL)
    cannot be reached."""
    if dburl.is_url(path):
        names, version = _pg_version(path)
    else:
        if path == ":memory:" or not os.path.exists(path) or os.path.getsize(path) == 0:
            return 0
        names, version = _sqlite_version(path)
    shown = dburl.shown(path)
    if version < 0:
        listed = ", ".join(sorted(names)[:5])
        raise ConfigError(
            f"{shown} is not a Flood records database (its tables: {listed}); give another --db"
        )
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"records database {shown} has schema version {version}, newer than this Flood "
            f"knows ({SCHEMA_VERSION}): it was written by a newer release; upgrade Flood"
        )
    return version


def _sqlite_version(path: str) -> tuple[set[str], int]:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            return names, _version_of(names, lambda q: con.execute(q).fetchone())
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"records database {path} cannot be read: {exc}") from None


def _pg_version(url: str) -> tuple[set[str], int]:
    """The tables and schema version of a PostgreSQL database, on a connection of its own."""
    _hand_psycopg_to_peewee()
    probe = pw.PostgresqlDatabase(url, **_defaults(url))
    try:
        probe.connect()
        try:
            names = set(probe.get_tables())
            return names, _version_of(names, lambda q: probe.execute_sql(q).fetchone())  # type: ignore[no-untyped-call]
        finally:
            probe.close()
    except pw.PeeweeException as exc:
        raise DatabaseUnreachable(unreachable(url, exc)) from None


def _hand_psycopg_to_peewee() -> None:
    """peewee looks for psycopg once, when it is imported; Flood's daemons keep the driver out
    of their memory until a PostgreSQL database is opened (flood.drivers), so here it is let
    in and given to peewee as its import would have (peewee 4.5's names)."""
    if getattr(pw, "psycopg", None) is not None:
        return
    drivers.let_in("psycopg")
    import psycopg
    from psycopg.pq import TransactionStatus
    from psycopg.types.json import Json, Jsonb

    found = {"psycopg": psycopg, "TransactionStatus": TransactionStatus}
    found.update(Json_pg3=Json, Jsonb_pg3=Jsonb)
    for name, value in found.items():
        setattr(pw, name, value)
    states = {"txn_idle": "IDLE", "txn_inerror": "INERROR", "txn_unknown": "UNKNOWN"}
    for name, state in states.items():
        setattr(pw.Psycopg3Adapter, name, getattr(TransactionStatus, state))


CONNECT_TIMEOUT = 10  # seconds, unless the URL's query says (libpq waits for the OS's TCP timeout)


def _defaults(url: str) -> dict[str, Any]:
    """libpq parameters Flood sets where the URL does not: a connect_timeout, so that a host
    gone silent is found away in seconds (the URL's own parameters pass unchanged)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    return {} if "connect_timeout" in query else {"connect_timeout": CONNECT_TIMEOUT}


def unreachable(url: str, exc: BaseException) -> str:
    """One line for a PostgreSQL database that cannot be used, its password masked."""
    cause = " ".join(str(exc).split()) or type(exc).__name__
    return dburl.scrub(f"cannot use the records database {dburl.shown(url)}: {cause}", url)


def _version_of(names: set[str], one: Any) -> int:
    """-1: not Flood's; 0: empty; 1: release 0.1.0; else the recorded version."""
    if not names:
        return 0
    if "flood_schema" in names:
        row = one("SELECT MAX(version) FROM flood_schema")
        return int(row[0] or 0)
    return 1 if names >= _RELEASE_1_TABLES else -1


def open_db(path: str, node_name: str | None = None, *, checked: bool = False) -> None:
    """Open this process's connection (SQLite: WAL, busy timeout; PostgreSQL: a small pool),
    create the schema or migrate it to this code's version; rows are written as `node_name`
    (default: the host name). ConfigError for a database that is not Flood's or is newer.
    checked=True: a child of the supervisor, which has done both before starting it (the
    checks cost a child 1.6 MiB of memory for good)."""
    _node["name"] = node_name or default_node()
    if not checked:
        check_db(path)
    try:
        if dburl.is_url(path):
            _open_pg(path, migrate=not checked)
        else:
            _open(path, migrate=not checked)
    except (OSError, pw.PeeweeException) as exc:
        close_db()
        if dburl.is_url(path):
            raise DatabaseUnreachable(unreachable(path, exc)) from None
        raise ConfigError(f"cannot open the records database {path}: {exc}") from None


def initialise_sqlite() -> None:
    """Have SQLite initialise itself (its allocator, page cache and mutexes, set up at its
    first connection in a process) with a throwaway in-memory database: the forkserver does
    it once for all its children."""
    sqlite3.connect(":memory:").close()


def _apply(*operations: Any) -> None:
    from playhouse.migrate import migrate

    migrate(*operations)


def _pooled(database: Any) -> bool:
    """A PostgreSQL pool (playhouse.pool is imported only to make one)."""
    pool = sys.modules.get("playhouse.pool")
    return pool is not None and isinstance(database, pool.PooledPostgresqlDatabase)


def _use(database: pw.Database) -> None:
    close_db()
    if _pooled(db.obj):
        db.obj.close_all()  # a database opened again: the old pool's connections go
    _backend["postgresql"] = isinstance(database, pw.PostgresqlDatabase)
    _backend["database"] = database
    db.initialize(database)


def _open(path: str, *, migrate: bool = True) -> None:
    if path != ":memory:" and not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    _use(
        pw.SqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "busy_timeout": BUSY_TIMEOUT_MS,
                # The directories are the truth and records are repaired from them at start-up,
                # so a commit lost to power failure (not to a crash) costs a repair, never a file.
                "synchronous": "normal",
                "foreign_keys": 0,
            },
        )
    )
    db.connect(reuse_if_open=True)
    if migrate:
        with write():
            _migrate()


def _open_pg(url: str, *, migrate: bool = True) -> None:
    # The URL goes to libpq as it is (its query holds libpq's parameters: sslmode, ...); the
    # password comes from it or from ~/.pgpass, $PGPASSFILE, $PGPASSWORD, as libpq finds it.
    _hand_psycopg_to_peewee()
    from playhouse.pool import PooledPostgresqlDatabase

    _use(
        PooledPostgresqlDatabase(
            url,
            max_connections=POOL_CONNECTIONS,
            stale_timeout=POOL_STALE_SECONDS,
            **_defaults(url),
        )
    )
    db.connect(reuse_if_open=True)
    if not migrate:
        return
    with write():
        # Supervisors starting at once on an empty database: one creates the schema, the
        # others wait here and then find it made (DDL is transactional in PostgreSQL).
        _sql("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        _migrate()


def _migrate() -> None:
    """Inside a write transaction: bring the schema to SCHEMA_VERSION (another process may
    have done it since check_db read the version)."""
    names = set(db.get_tables())
    if not names:
        db.create_tables(MODELS)
        SchemaVersion.insert(version=SCHEMA_VERSION).execute()
        return
    if "flood_schema" in names:
        version = SchemaVersion.select(pw.fn.MAX(SchemaVersion.version)).scalar() or 0
    else:
        version = 1
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"records database has schema version {version}, newer than "
            f"this Flood knows ({SCHEMA_VERSION}); upgrade Flood"
        )
    from playhouse.migrate import SchemaMigrator

    migrator = SchemaMigrator.from_database(db.obj)
    for step in range(version + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[step](migrator)
    if version < SCHEMA_VERSION:
        SchemaVersion.delete().execute()
        SchemaVersion.insert(version=SCHEMA_VERSION).execute()


def close_db() -> None:
    """Close this thread's connection (to the pool, for PostgreSQL: other threads keep theirs)."""
    if db.obj is None:
        return
    try:
        if not db.is_closed():
            db.close()
    except (pw.OperationalError, pw.InterfaceError):  # a connection PostgreSQL cut off
        _drop_connection()


@contextlib.contextmanager
def write() -> Iterator[None]:
    """A write transaction that takes the lock up front (SQLite: BEGIN IMMEDIATE; PostgreSQL
    takes row locks as it goes). When the database has already rolled back itself (disk
    full, a lost connection), the original error is what propagates."""
    transaction = db.atomic() if postgresql() else db.atomic("IMMEDIATE")
    transaction.__enter__()
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(pw.OperationalError, pw.InterfaceError):
            transaction.__exit__(type(exc), exc, exc.__traceback__)
        raise
    transaction.__exit__(None, None, None)


class _ReadOnlyPostgresql(pw.PostgresqlDatabase):
    """A PostgreSQL connection whose transactions cannot write."""

    def _connect(self) -> Any:
        conn = super()._connect()  # type: ignore[misc]  # untyped in the stubs
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        return conn


def open_readonly(path: str, node_name: str | None = None) -> None:
    """Open this process's connection to an existing database for reading only (flood-audit,
    flood-doctor: commands that change nothing). ConfigError for no database, one that is not
    Flood's, or one an earlier release wrote (a supervisor or flood-status migrates it)."""
    _node["name"] = node_name or default_node()
    version = check_db(path)
    shown = dburl.shown(path)
    if version == 0:
        raise ConfigError(f"no records database at {shown} (--db, else $FLOOD_DB, else ./flood.db)")
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"records database {shown} has schema version {version}, older than this Flood's "
            f"({SCHEMA_VERSION}): start flood-supervisor or run flood-status once to migrate it"
        )
    try:
        if dburl.is_url(path):
            _hand_psycopg_to_peewee()
            _use(_ReadOnlyPostgresql(path, **_defaults(path)))
        else:
            uri = f"file:{urllib.parse.quote(path)}?mode=ro"
            pragmas = {"busy_timeout": BUSY_TIMEOUT_MS, "query_only": 1}
            _use(pw.SqliteDatabase(uri, uri=True, pragmas=pragmas))
        db.connect(reuse_if_open=True)
    except pw.PeeweeException as exc:
        close_db()
        raise ConfigError(
            unreachable(path, exc)
            if dburl.is_url(path)
            else (f"cannot open the records database {path}: {exc}")
        ) from None


# -- PostgreSQL away: a lost connection ---------------------------------------------------------
RECONNECT_EVERY = 1.0  # seconds between attempts while the database is away
_P = ParamSpec("_P")
_R = TypeVar("_R")
# Server-side codes of a connection going away: connection exceptions, and the shutdowns of
# an administrator, a crash, or a server not yet accepting connections.
_GONE_CODES = ("57P01", "57P02", "57P03")


@dataclass
class Outages:
    """What this process does when PostgreSQL goes away: `down(message)` once per outage,
    `up(seconds)` once it is back; with `wait`, a call blocks (calling `tick` every second,
    while `alive()`) until the database is back and then runs again; without, it raises
    DatabaseUnreachable at once (the next call tries to connect afresh)."""

    down: Callable[[str], None] = lambda message: None
    up: Callable[[float], None] = lambda seconds: None
    wait: bool = False
    tick: Callable[[], None] = lambda: None
    alive: Callable[[], bool] = lambda: True
    since: float | None = None  # monotonic start of the current outage


_outages = {"now": Outages()}


def watch_outages(outages: Outages) -> None:
    """How this process meets a PostgreSQL outage (the default: raise, say nothing)."""
    _outages["now"] = outages


def database_up() -> bool:
    """False while this process has found the database away and not yet back."""
    return _outages["now"].since is None


def _connection_lost(exc: BaseException) -> bool:
    """Whether a PostgreSQL error means the connection (or the server) went away."""
    cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    code = getattr(cause, "sqlstate", None) or ""
    if code.startswith("08") or code in _GONE_CODES:
        return True
    database = _backend["database"]
    conn = getattr(getattr(database, "_state", None), "conn", None)
    return conn is None or bool(conn.closed) or bool(getattr(conn, "broken", False))


def _drop_connection() -> None:
    """Forget this thread's connection (and the pool's idle ones: they died with it), so the
    next query connects afresh."""
    database = _backend["database"]
    state = database._state
    conn, _ = state.conn, state.reset()
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
    if _pooled(database):
        if conn is not None:
            database._in_use.pop(database.conn_key(conn), None)
        with contextlib.suppress(Exception):
            database.close_idle()


def _back() -> None:
    """A query succeeded: an outage this process saw is over."""
    outages = _outages["now"]
    if outages.since is not None:
        seconds, outages.since = time.monotonic() - outages.since, None
        outages.up(seconds)


def _away(exc: BaseException) -> None:
    """The connection went away: say so once, then raise or wait until it is back."""
    _drop_connection()
    outages = _outages["now"]
    if outages.since is None:
        outages.since = time.monotonic()
        outages.down(" ".join(str(exc).split()) or type(exc).__name__)
    if not outages.wait:
        raise DatabaseUnreachable(f"the records database is unreachable: {exc}") from None
    while outages.alive():
        outages.tick()
        time.sleep(RECONNECT_EVERY)
        try:
            db.connect(reuse_if_open=True)
            _sql("SELECT 1", ())
            return
        except (pw.OperationalError, pw.InterfaceError):
            _drop_connection()
    raise DatabaseUnreachable(f"the records database is unreachable: {exc}") from None


def _resilient(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """A records function that meets a PostgreSQL outage as this process asked (Outages). A
    transaction cut off is rolled back by the server, so running the call again is safe;
    SQLite's errors pass through as they always did."""

    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        while True:
            try:
                result = fn(*args, **kwargs)
            except (pw.OperationalError, pw.InterfaceError) as exc:
                if not _backend["postgresql"] or not _connection_lost(exc):
                    raise
                _away(exc)
                continue
            if _outages["now"].since is not None:
                _back()
            return result

    return call


# -- fixed SQL for the per-file writes ---------------------------------------------------------
# The writes every file makes, as fixed SQL: peewee's query builder cost more CPU per file
# than the SQLite work itself (tests/benchmarks/hotpath.py: 1.34 ms against 0.05 ms).
_OPEN_PASSAGE = (
    "SELECT id FROM file_records WHERE profile = ? AND bucket = ? AND filepath = ?"
    " AND current_state = ? AND node = ? ORDER BY id DESC LIMIT 1"
)
_CONTINUE = (
    "UPDATE file_records SET current_state = 'processing', last_updated = ?, size = ?,"
    " file_creation_date = COALESCE(file_creation_date, ?) WHERE id = ?"
)
_START = (
    "INSERT INTO file_records (profile, bucket, filepath, file_creation_date,"
    " current_state, last_updated, size, retry_count, node)"
    " VALUES (?, ?, ?, ?, 'processing', ?, ?, 0, ?)"
)
_COMPLETE = (
    "UPDATE file_records SET current_state = 'completed', upload_outcome = 'success',"
    " size = ?, etag = ?, checksum = ?, options = ?, version_id = ?, reason = NULL,"
    " error = NULL, retry_count = 0, next_attempt_at = NULL, last_updated = ? WHERE id = ?"
)
_DELIVER = "INSERT INTO deliveries (record_id, event, state, attempts, next_attempt_at,"
_DELIVER += " created_at, node) VALUES (?, ?, 'pending', 0, ?, ?, ?)"
# The same SQL in PostgreSQL's placeholders, made once per statement.
_PG_SQL: dict[str, str] = {}


def _sql(query: str, params: tuple[Any, ...]) -> Any:
    """Run fixed SQL on this process's connection, written with SQLite's placeholders
    (PostgreSQL's driver takes %s)."""
    if _backend["postgresql"]:
        query = _pg(query)
    return _backend["database"].execute_sql(query, params)


def _insert(query: str, params: tuple[Any, ...]) -> int:
    """Fixed SQL that inserts one row: its id (SQLite: lastrowid; PostgreSQL: RETURNING)."""
    if postgresql():
        return int(_sql(query + " RETURNING id", params).fetchone()[0])
    return int(_sql(query, params).lastrowid)


def _stamp(value: dt.datetime | None) -> Any:
    """A datetime as peewee's DateTimeField stores it: text in SQLite, the datetime itself
    for PostgreSQL's timestamp columns."""
    if value is None or _backend["postgresql"]:
        return value
    return str(value)


def _of(ref: FileRef, mine: bool = True) -> Any:
    """The condition that selects the passages of one key (`mine`: of this node only)."""
    where = (
        (FileRecord.profile == ref.profile)
        & (FileRecord.bucket == ref.bucket)
        & (FileRecord.filepath == text(ref.key))
    )
    return where & (FileRecord.node == node()) if mine else where


# -- a producer's copy (flood-copy, flood-requeue) ---------------------------------------------
@_resilient
def record_queued(
    ref: FileRef,
    state: State,
    created: dt.datetime | None,
    size: int | None,
    record_id: int | None = None,
) -> int:
    """A producer's copy reached `state` (incoming_tmp, then incoming): one passage, one row."""
    with write():
        if record_id is not None:
            # Only forward: the supervisor may have claimed the file between the producer's
            # rename and this update, and a claimed passage must not go back to incoming.
            FileRecord.update(current_state=state, last_updated=utcnow()).where(
                (FileRecord.id == record_id) & (FileRecord.current_state == State.INCOMING_TMP)
            ).execute()
            return record_id
        row = FileRecord.create(
            profile=ref.profile,
            bucket=ref.bucket,
            filepath=text(ref.key),
            file_creation_date=created,
            current_state=state,
            size=size,
        )
        return int(row.id)


@_resilient
def record_requeued(ref: FileRef, from_id: int | None, size: int) -> int:
    """A failed file on its way back to incoming/: a new passage in incoming_tmp, linked to
    the failed one and keeping its creation date."""
    old = FileRecord.get_or_none(FileRecord.id == from_id) if from_id else None
    with write():
        row = FileRecord.create(
            profile=ref.profile,
            bucket=ref.bucket,
            filepath=text(ref.key),
            file_creation_date=old.file_creation_date if old is not None else None,
            current_state=State.INCOMING_TMP,
            size=size,
            requeued_from=from_id,
        )
    return int(row.id)


@_resilient
def abandon(record_id: int, reason: Reason) -> None:
    """A copy that will not reach incoming/ (after all, or only if it has not yet)."""
    with write():
        FileRecord.update(
            current_state=State.ABANDONED, reason=reason, last_updated=utcnow()
        ).where(
            (FileRecord.id == record_id) & (FileRecord.current_state == State.INCOMING_TMP)
        ).execute()


@_resilient
def supersede_waiting(ref: FileRef, newer_id: int | None) -> None:
    """A newer copy of a key replaced one that waited in incoming/: close the older passages."""
    with write():
        FileRecord.update(
            current_state=State.ABANDONED, reason=Reason.SUPERSEDED, last_updated=utcnow()
        ).where(
            _of(ref) & (FileRecord.current_state == State.INCOMING) & (FileRecord.id != newer_id)
        ).execute()


class Ending(NamedTuple):
    """How a passage stands, for flood-copy --wait."""

    state: str
    reason: str | None
    error: str | None
    retry_at: dt.datetime | None = None  # in processing/, waiting for this retry


@_resilient
def endings(ids: Sequence[int]) -> dict[int, Ending]:
    """The state of each of these passages (a deleted one is absent)."""
    found: dict[int, Ending] = {}
    for start in range(0, len(ids), 500):
        query = FileRecord.select(
            FileRecord.id,
            FileRecord.current_state,
            FileRecord.reason,
            FileRecord.error,
            FileRecord.next_attempt_at,
        ).where(FileRecord.id.in_(list(ids[start : start + 500])))
        for row in query:
            found[int(row.id)] = Ending(
                row.current_state, row.reason, row.error, _time(row.next_attempt_at)
            )
    return found


class Failure(NamedTuple):
    """A failed passage that no later passage was requeued from."""

    id: int
    reason: str | None


@_resilient
def unrequeued_failures(ref: FileRef) -> list[Failure]:
    """Failed passages of this key that no later passage was requeued from, newest first."""
    requeued = FileRecord.select(FileRecord.requeued_from).where(
        FileRecord.requeued_from.is_null(False)
    )
    query = (
        FileRecord.select(FileRecord.id, FileRecord.reason)
        .where(
            _of(ref) & (FileRecord.current_state == State.FAILED) & FileRecord.id.not_in(requeued)
        )
        .order_by(FileRecord.id.desc())
    )
    return [Failure(int(row.id), row.reason) for row in query]


# -- the uploads -------------------------------------------------------------------------------
class Claim(NamedTuple):
    """A file just moved into processing/: what its record needs."""

    ref: FileRef
    created: dt.datetime | None
    size: int


@_resilient
def record_claims(claims: Sequence[Claim]) -> list[int]:
    """Files just moved into processing/, in one transaction: each continues its producer's
    passage or starts a new one. Their record ids, in order."""
    now = _stamp(utcnow())
    if _backend["postgresql"]:
        return _claims_pg(claims, now) if claims else []
    ids = []
    with write():
        for ref, created, size in claims:
            ids.append(_claim(ref, text(ref.key), _stamp(created), size, now))
    return ids


# PostgreSQL: the batch's claims as one statement over arrays (the same choice as _claim for
# each file: the passage that reached incoming/ first, else a newer copy's in incoming_tmp,
# else a new one): one round trip, and one statement for the server to run, not one a file.
# The new rows' ids are matched to their files by (profile, bucket, key), unique in a batch.
_CLAIMS_PG = (
    "WITH input AS (SELECT * FROM unnest(%(profiles)s::text[], %(buckets)s::text[],"
    " %(keys)s::text[], %(created)s::timestamp[], %(sizes)s::bigint[]) WITH ORDINALITY"
    " AS i(profile, bucket, filepath, created, size, n)),"
    " found AS (SELECT DISTINCT ON (i.n) i.n, f.id FROM input i JOIN file_records f"
    " ON f.profile = i.profile AND f.bucket = i.bucket AND f.filepath = i.filepath"
    " AND f.node = %(node)s AND f.current_state IN ('incoming', 'incoming_tmp')"
    " ORDER BY i.n, f.current_state = 'incoming' DESC, f.id DESC),"
    " continued AS (UPDATE file_records f SET current_state = 'processing',"
    " last_updated = %(now)s, size = i.size,"
    " file_creation_date = COALESCE(f.file_creation_date, i.created)"
    " FROM found JOIN input i USING (n) WHERE f.id = found.id RETURNING found.n, f.id),"
    " started AS (INSERT INTO file_records (profile, bucket, filepath, file_creation_date,"
    " current_state, last_updated, size, retry_count, node)"
    " SELECT i.profile, i.bucket, i.filepath, i.created, 'processing', %(now)s, i.size, 0,"
    " %(node)s FROM input i WHERE i.n NOT IN (SELECT n FROM found) ORDER BY i.n"
    " RETURNING id, profile, bucket, filepath)"
    " SELECT n, id FROM continued UNION ALL SELECT i.n, s.id FROM started s JOIN input i"
    " ON i.profile = s.profile AND i.bucket = s.bucket AND i.filepath = s.filepath"
    " ORDER BY 1"
)


# The driver's errors raised as peewee's (what execute_sql does), for the raw cursors below.
_AS_PEEWEE: Any = pw.__dict__["__exception_wrapper__"]


@contextlib.contextmanager
def _one_trip() -> Iterator[Any]:
    """PostgreSQL: a write transaction sent as one pipeline (BEGIN, the block's statements,
    COMMIT) and one wait for all their answers, where peewee's atomic() waits for BEGIN, for
    each statement and for COMMIT. The statements' results are read after the block. An error
    leaves nothing written (the server skips the rest; the transaction is rolled back) and
    propagates as peewee's, as execute_sql's would."""
    with _AS_PEEWEE:
        conn = _backend["database"].connection()
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                yield conn
                conn.execute("COMMIT")
        except BaseException:
            if not conn.closed:
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
            raise


def _pg(query: str) -> str:
    """Fixed SQL written with SQLite's placeholders, in the driver's (made once a statement)."""
    return _PG_SQL.get(query) or _PG_SQL.setdefault(query, query.replace("?", "%s"))


def _claims_pg(claims: Sequence[Claim], now: Any) -> list[int]:
    keys = [(ref.profile, ref.bucket, text(ref.key)) for ref, _, _ in claims]
    if len(set(keys)) < len(keys):  # never from an uploader (one claim a file); kept correct
        with write():
            return [_claims_pg([claim], now)[0] for claim in claims]
    params = {
        "profiles": [profile for profile, _, _ in keys],
        "buckets": [bucket for _, bucket, _ in keys],
        "keys": [key for _, _, key in keys],
        "created": [created for _, created, _ in claims],
        "sizes": [size for _, _, size in claims],
        "node": node(),
        "now": now,
    }
    rows = _backend["database"].execute_sql(_CLAIMS_PG, params).fetchall()
    if [n for n, _ in rows] != list(range(1, len(claims) + 1)):
        raise pw.IntegrityError(f"{len(claims)} claims recorded as {len(rows)} rows")
    return [int(record_id) for _, record_id in rows]


def _claim(ref: FileRef, key: str | None, created: Any, size: int, now: Any) -> int:
    # The passage that reached incoming/ first; a newer copy may still be in incoming_tmp.
    me = node()
    for state in (State.INCOMING, State.INCOMING_TMP):
        found = _sql(_OPEN_PASSAGE, (ref.profile, ref.bucket, key, str(state), me)).fetchone()
        if found is not None:
            _sql(_CONTINUE, (now, size, created, found[0]))
            return int(found[0])
    return _insert(_START, (ref.profile, ref.bucket, key, created, now, size, me))


class Resumed(NamedTuple):
    """The open passage of a file found in processing/."""

    id: int
    retries: int  # retries made so far
    due: dt.datetime | None  # when the next one is due, if one is scheduled


@_resilient
def record_resumed(ref: FileRef, created: dt.datetime | None, size: int) -> Resumed:
    """A file found in processing/ (after a restart, or a retry come due): its open passage,
    or a new one."""
    row = _newest(ref, (State.PROCESSING,))
    if row is None:
        with write():
            row = FileRecord.create(
                profile=ref.profile,
                bucket=ref.bucket,
                filepath=text(ref.key),
                file_creation_date=created,
                current_state=State.PROCESSING,
                size=size,
            )
    return Resumed(int(row.id), int(row.retry_count or 0), row.next_attempt_at)


class Completion(NamedTuple):
    """An upload proven on the server."""

    record_id: int
    size: int
    etag: str | None
    attempt: int  # the retry number that succeeded (0: the first upload)
    checksum: str | None = None  # "algorithm:value" where the object has one
    options: str | None = None  # the object options, as JSON
    version_id: str | None = None


_ANSWERED = (
    "INSERT INTO endpoints (node, profile, last_success_at, failures, failing_keys)"
    " VALUES (?, ?, ?, 0, 0) ON CONFLICT (node, profile) DO UPDATE"
    " SET last_success_at = excluded.last_success_at,"
    " failing_since = NULL, failures = 0, failing_keys = 0, last_failed_key = NULL"
)


@_resilient
def record_completions(
    done: Sequence[Completion], profile: str | None = None, deliver: bool = False
) -> None:
    """Uploads proven, in one transaction; the profile's server answered; with `deliver`, the
    on_complete hook of each is due (in the same transaction: a crash cannot lose one)."""
    now = _stamp(utcnow())
    if _backend["postgresql"]:  # the batch's transaction in one pipeline: one round trip
        _completions_pg(done, profile, now, deliver)
        return
    with write():
        if profile is not None and done:
            _sql(_ANSWERED, (node(), profile, now))
        for record_id, size, etag, attempt, checksum, options, version_id in done:
            _sql(_COMPLETE, (size, etag, checksum, options, version_id, now, record_id))
            if deliver:
                _sql(_DELIVER, (record_id, "complete", now, now, node()))
            if attempt > 0:
                RetryAttempt.create(
                    file_record_id=record_id, attempt=attempt, outcome=Outcome.SUCCESS
                )


# PostgreSQL: a batch's completions as one UPDATE over arrays (one statement for the server to
# run, not one a file), its hook deliveries as one INSERT.
_COMPLETE_PG = (
    "UPDATE file_records AS f SET current_state = 'completed', upload_outcome = 'success',"
    " size = v.size, etag = v.etag, checksum = v.checksum, options = v.options,"
    " version_id = v.version_id, reason = NULL, error = NULL, retry_count = 0,"
    " next_attempt_at = NULL, last_updated = %s"
    " FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[])"
    " AS v(id, size, etag, checksum, options, version_id) WHERE f.id = v.id"
)
_DELIVER_PG = (
    "INSERT INTO deliveries (record_id, event, state, attempts, next_attempt_at, created_at,"
    " node) SELECT id, 'complete', 'pending', 0, %s, %s, %s FROM unnest(%s::bigint[]) AS v(id)"
)
_RETRIED = (
    "INSERT INTO retry_attempts (file_record_id, attempt, attempted_at, outcome, node)"
    " VALUES (?, ?, ?, ?, ?)"
)


def _completions_pg(
    done: Sequence[Completion], profile: str | None, now: Any, deliver: bool
) -> None:
    me = node()
    ids = [d.record_id for d in done]
    columns = [[d.size for d in done], [d.etag for d in done], [d.checksum for d in done]]
    columns += [[d.options for d in done], [d.version_id for d in done]]
    retried = [(d.record_id, d.attempt, now, Outcome.SUCCESS.value, me) for d in done if d.attempt]
    with _one_trip() as conn:
        cursor = conn.cursor()
        if profile is not None and done:
            cursor.execute(_pg(_ANSWERED), (me, profile, now))
        cursor.execute(_COMPLETE_PG, (now, ids, *columns))
        if deliver:
            cursor.execute(_DELIVER_PG, (now, now, me, ids))
        if retried:
            cursor.executemany(_pg(_RETRIED), retried)


@_resilient
def record_failed(
    record_id: int, reason: str, error: str, attempt: int, deliver: bool = False
) -> None:
    """A passage failed for good (`deliver`: its on_failure hook is due, in the same
    transaction). A multipart upload it left is forgotten: no passage continues it, so it is
    the janitor's to abort once old enough (or the next passage's of the key, before it
    starts)."""
    with write():
        MultipartPart.delete().where(MultipartPart.record_id == record_id).execute()
        MultipartUpload.delete().where(MultipartUpload.record_id == record_id).execute()
        if deliver:
            now = _stamp(utcnow())
            _sql(_DELIVER, (record_id, "failure", now, now, node()))
        FileRecord.update(
            current_state=State.FAILED,
            upload_outcome=Outcome.FAILURE,
            reason=reason,
            error=text(error),
            next_attempt_at=None,
            last_updated=utcnow(),
        ).where(FileRecord.id == record_id).execute()
        if attempt > 0:
            RetryAttempt.create(
                file_record_id=record_id,
                attempt=attempt,
                outcome=Outcome.FAILURE,
                error=text(error),
            )


@_resilient
def fail_open_passage(ref: FileRef, reason: str, error: str) -> None:
    """The passage in processing/ of a file whose handling keeps crashing: failed."""
    row = _newest(ref, (State.PROCESSING,))
    if row is not None:
        record_failed(int(row.id), reason, error, 0)


@_resilient
def record_retry_scheduled(
    record_id: int, attempt: int, due: dt.datetime, error: str, failed_attempt: int
) -> None:
    """Attempt `failed_attempt` failed (0: the first upload); retry number `attempt` is due then."""
    now = utcnow()
    with write():
        FileRecord.update(
            retry_count=attempt,
            next_attempt_at=due,
            error=text(error),
            last_updated=now,
            first_failed_at=pw.fn.COALESCE(FileRecord.first_failed_at, now),
        ).where(FileRecord.id == record_id).execute()
        if failed_attempt > 0:
            RetryAttempt.create(
                file_record_id=record_id,
                attempt=failed_attempt,
                outcome=Outcome.FAILURE,
                error=text(error),
            )


@_resilient
def record_held(
    record_id: int, due: dt.datetime, error: str, failed_attempt: int | None, next_attempt: int
) -> None:
    """A file that waits for its profile's hold to lift (an outage, a certificate that does not
    verify): the error is on record, and the failed attempt's row where it was a retry that
    counts (`failed_attempt`); `next_attempt` is the retry number it comes back as."""
    now = utcnow()
    with write():
        FileRecord.update(
            retry_count=next_attempt,
            next_attempt_at=due,
            error=text(error),
            last_updated=now,
            first_failed_at=pw.fn.COALESCE(FileRecord.first_failed_at, now),
        ).where(FileRecord.id == record_id).execute()
        if failed_attempt:
            RetryAttempt.create(
                file_record_id=record_id,
                attempt=failed_attempt,
                outcome=Outcome.FAILURE,
                error=text(error),
            )


# -- retries made due now (flood-requeue --waiting) ------------------------------------------
@dataclass(frozen=True)
class Waiting:
    """A passage in processing/ waiting for a retry."""

    id: int
    ref: FileRef  # as stored (a non-UTF-8 key escaped)
    retry_count: int
    due: dt.datetime | None
    error: str | None


@_resilient
def waiting_passages(
    profile: str | None = None, bucket: str | None = None, now: dt.datetime | None = None
) -> list[Waiting]:
    """Passages waiting for a retry not yet due, oldest first, filtered as asked."""
    query = FileRecord.select().where(
        (FileRecord.current_state == State.PROCESSING)
        & FileRecord.next_attempt_at.is_null(False)
        & (FileRecord.next_attempt_at > (now or utcnow()))
        & (FileRecord.node == node())
    )
    if profile is not None:
        query = query.where(FileRecord.profile == profile)
    if bucket is not None:
        query = query.where(FileRecord.bucket == bucket)
    return [
        Waiting(
            int(row.id),
            FileRef(row.profile, row.bucket, row.filepath),
            int(row.retry_count or 0),
            _time(row.next_attempt_at),
            row.error,
        )
        for row in query.order_by(FileRecord.id)
    ]


_MAKE_DUE = (
    "UPDATE file_records SET next_attempt_at = ?, last_updated = ?,"
    " error = COALESCE(error, '') || ? WHERE id = ? AND current_state = 'processing'"
    " AND next_attempt_at IS NOT NULL"
)


@_resilient
def make_due(ids: Sequence[int], note: str, now: dt.datetime | None = None) -> int:
    """Retries due now instead of later: each passage still waiting gets next_attempt_at =
    now and `note` after its error (the retry count and retry_attempts are left as they are:
    this is no attempt). How many were changed."""
    stamp = _stamp(now or utcnow())
    changed = 0
    with write():
        for record_id in ids:
            changed += _sql(_MAKE_DUE, (stamp, stamp, text(note), record_id)).rowcount
    return changed


@_resilient
def due_keys(profile: str, now: dt.datetime | None = None) -> set[tuple[str, str]]:
    """(bucket, key as stored) of the profile's passages in processing/ whose retry is due by
    now: what an uploader whose own schedule says later may take up at once."""
    query = FileRecord.select(FileRecord.bucket, FileRecord.filepath).where(
        (FileRecord.profile == profile)
        & (FileRecord.current_state == State.PROCESSING)
        & FileRecord.next_attempt_at.is_null(False)
        & (FileRecord.next_attempt_at <= (now or utcnow()))
        & (FileRecord.node == node())
    )
    return {(bucket, key) for bucket, key in _tuples(query)}


# -- a profile's server ------------------------------------------------------------------------
class Failing(NamedTuple):
    """A profile's current run of transient failures."""

    failures: int  # since its server last answered
    keys: int  # different keys among them (at least: the key changed keys - 1 times)
    since: dt.datetime | None


@_resilient
def endpoint_failed(profile: str, key: str) -> Failing:
    """One more transient failure of the profile's server (refused, reset, timed out, 5xx)."""
    now = utcnow()
    with write():
        row = Endpoint.get_or_none((Endpoint.profile == profile) & (Endpoint.node == node()))
        if row is None:
            row = Endpoint.create(profile=profile, failures=0, failing_keys=0)
        row.failures = int(row.failures or 0) + 1
        row.failing_since = row.failing_since or now
        if text(key) != row.last_failed_key:
            row.failing_keys = int(row.failing_keys or 0) + 1
            row.last_failed_key = text(key)
        row.save()
    return Failing(row.failures, row.failing_keys, _time(row.failing_since))


@_resilient
def endpoint_answered(profile: str) -> None:
    """The profile's server answered (a check passed): its run of failures is over."""
    with write():
        _sql(_ANSWERED, (node(), profile, _stamp(utcnow())))


@_resilient
def answered_since_first_failure(profile: str, record_id: int) -> bool:
    """Whether the profile's server answered since this passage's first failed attempt."""
    first = FileRecord.select(FileRecord.first_failed_at).where(FileRecord.id == record_id).scalar()
    last = (
        Endpoint.select(Endpoint.last_success_at)
        .where((Endpoint.profile == profile) & (Endpoint.node == node()))
        .scalar()
    )
    first, last = _time(first), _time(last)
    return first is None or (last is not None and last >= first)


# -- multipart uploads ---------------------------------------------------------------------------
class Part(NamedTuple):
    number: int
    size: int
    etag: str
    checksum: str | None


@dataclass(frozen=True)
class Upload:
    """A multipart upload on record: its id, the file it belongs to, the parts done."""

    record_id: int
    bucket: str
    key: str
    upload_id: str
    part_size: int
    file_size: int
    mtime_ns: int
    inode: int
    checksum: str
    parts: dict[int, Part]
    started_at: dt.datetime | None = None


@_resilient
def multipart_started(upload: Upload) -> None:
    """A new multipart upload of a passage (any earlier one of it is forgotten)."""
    with write():
        MultipartPart.delete().where(MultipartPart.record_id == upload.record_id).execute()
        MultipartUpload.delete().where(MultipartUpload.record_id == upload.record_id).execute()
        MultipartUpload.create(
            record_id=upload.record_id,
            bucket=upload.bucket,
            key=text(upload.key),
            upload_id=upload.upload_id,
            part_size=upload.part_size,
            file_size=upload.file_size,
            mtime_ns=upload.mtime_ns,
            inode=upload.inode,
            checksum=upload.checksum,
        )


@_resilient
def part_done(record_id: int, part: Part) -> None:
    """The server acknowledged a part (recorded as soon as its answer is read)."""
    query = MultipartPart.insert(
        record_id=record_id,
        number=part.number,
        size=part.size,
        etag=part.etag,
        checksum=part.checksum,
    )
    if postgresql():  # no INSERT OR REPLACE there: the same replacement as an upsert
        keys = [MultipartPart.record_id, MultipartPart.number]
        changed = [MultipartPart.size, MultipartPart.etag, MultipartPart.checksum]
        query = query.on_conflict(conflict_target=keys, preserve=[*changed, MultipartPart.done_at])
    else:
        query = query.on_conflict_replace()
    with write():
        query.execute()


@_resilient
def multipart_of(record_id: int) -> Upload | None:
    """The passage's multipart upload on record, with its parts, if it has one."""
    row = MultipartUpload.get_or_none(MultipartUpload.record_id == record_id)
    if row is None:
        return None
    parts = {
        int(p.number): Part(int(p.number), int(p.size), p.etag, p.checksum)
        for p in MultipartPart.select().where(MultipartPart.record_id == record_id)
    }
    return Upload(
        record_id=record_id,
        bucket=row.bucket,
        key=row.key,
        upload_id=row.upload_id,
        part_size=int(row.part_size),
        file_size=int(row.file_size),
        mtime_ns=int(row.mtime_ns),
        inode=int(row.inode),
        checksum=row.checksum,
        parts=parts,
        started_at=_time(row.started_at),
    )


@_resilient
def multipart_forget(record_id: int) -> None:
    """The passage's multipart upload is over (completed, aborted, or gone from the server)."""
    with write():
        MultipartPart.delete().where(MultipartPart.record_id == record_id).execute()
        MultipartUpload.delete().where(MultipartUpload.record_id == record_id).execute()


@_resilient
def upload_ids(bucket: str | None = None) -> set[str]:
    """The multipart uploads Flood's records know (the janitor leaves these alone)."""
    query = MultipartUpload.select(MultipartUpload.upload_id)
    if bucket is not None:
        query = query.where(MultipartUpload.bucket == bucket)
    return {row.upload_id for row in query}


# -- hooks -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Due:
    """A hook delivery that is due, with what its receipt says."""

    id: int
    event: str
    attempts: int
    record_id: int
    profile: str
    bucket: str
    key: str
    size: int | None
    etag: str | None
    version_id: str | None
    options: str | None
    checksum: str | None
    reason: str | None
    error: str | None
    created: dt.datetime | None
    ended: dt.datetime | None


@_resilient
def due_deliveries(now: dt.datetime, limit: int = 64) -> list[Due]:
    """Pending hook deliveries whose time has come, oldest first."""
    pending = list(
        Delivery.select()
        .where(
            (Delivery.state == "pending")
            & (Delivery.next_attempt_at <= now)
            & (Delivery.node == node())
        )
        .order_by(Delivery.id)
        .limit(limit)
    )
    rows = {
        int(r.id): r
        for r in FileRecord.select().where(FileRecord.id.in_([d.record_id for d in pending]))
    }
    found = []
    for d in pending:
        r = rows.get(int(d.record_id))
        if r is None:
            continue
        found.append(
            Due(
                id=int(d.id),
                event=d.event,
                attempts=int(d.attempts),
                record_id=int(r.id),
                profile=r.profile,
                bucket=r.bucket,
                key=r.filepath,
                size=r.size,
                etag=r.etag,
                version_id=r.version_id,
                options=r.options,
                checksum=r.checksum,
                reason=r.reason,
                error=r.error,
                created=_time(r.file_creation_date),
                ended=_time(r.last_updated),
            )
        )
    return found


@_resilient
def delivered(delivery_id: int) -> None:
    with write():
        Delivery.update(state="done", attempts=Delivery.attempts + 1, error=None).where(
            Delivery.id == delivery_id
        ).execute()


@_resilient
def delivery_current(delivery_id: int, attempts: int) -> bool:
    """Whether a delivery is still pending after `attempts` attempts: a Due read before an
    attempt of it ended is stale, and running it again would spend a retry twice."""
    query = Delivery.select(Delivery.id).where(
        (Delivery.id == delivery_id)
        & (Delivery.state == "pending")
        & (Delivery.attempts == attempts)
    )
    return query.exists()


@_resilient
def delivery_failed(delivery_id: int, error: str, due: dt.datetime | None) -> None:
    """One attempt failed: try again at `due`, or (None) its retries are spent."""
    with write():
        Delivery.update(
            state="pending" if due is not None else "failed",
            attempts=Delivery.attempts + 1,
            next_attempt_at=due or utcnow(),
            error=text(error),
        ).where(Delivery.id == delivery_id).execute()


@_resilient
def deliveries_of(record_id: int) -> list[tuple[str, str, int, str | None]]:
    """A passage's hook deliveries: (event, state, attempts, last error)."""
    query = Delivery.select().where(Delivery.record_id == record_id).order_by(Delivery.id)
    return [(d.event, d.state, int(d.attempts), d.error) for d in query]


# -- the spool's lifecycle ---------------------------------------------------------------------
@_resilient
def record_removed(path: str, reason: str, record_id: int | None) -> None:
    """The lifecycle removed a file from completed/ (recorded, then logged)."""
    with write():
        Removal.create(record_id=record_id, path=text(path), reason=reason)


@_resilient
def completed_id(ref: FileRef) -> int | None:
    """The newest completed passage of a key (the one a file in completed/ stands for)."""
    row = _newest(ref, (State.COMPLETED,))
    return int(row.id) if row is not None else None


class Failed(NamedTuple):
    """A key's newest passage, failed: its reason, when, and how many requeues led to it."""

    id: int
    reason: str | None
    at: dt.datetime | None
    requeues: int


@_resilient
def newest_failure(ref: FileRef) -> Failed | None:
    """The key's newest passage if it failed, with the length of its chain of requeues."""
    row = _newest(ref)
    if row is None or row.current_state != State.FAILED:
        return None
    requeues, link = 0, row.requeued_from
    while link is not None and requeues < 1000:
        requeues += 1
        link = FileRecord.select(FileRecord.requeued_from).where(FileRecord.id == link).scalar()
    return Failed(int(row.id), row.reason, _time(row.last_updated), requeues)


@_resilient
def set_state(record_id: int, state: State, reason: str | None = None) -> None:
    with write():
        FileRecord.update(current_state=state, reason=reason, last_updated=utcnow()).where(
            FileRecord.id == record_id
        ).execute()


def _newest(
    ref: FileRef, states: tuple[State, ...] | None = None, mine: bool = True
) -> FileRecord | None:
    query = FileRecord.select().where(_of(ref, mine))
    if states is not None:
        query = query.where(FileRecord.current_state.in_(states))
    return query.order_by(FileRecord.id.desc()).first()  # type: ignore[no-any-return]


# -- start-up repair ---------------------------------------------------------------------------
class OpenPassage(NamedTuple):
    """A passage the records still call open, as stored (a non-UTF-8 key escaped)."""

    id: int
    ref: FileRef
    state: State


def open_passages() -> Iterator[OpenPassage]:
    """Records still in an open state: what start-up repair checks against the directories."""
    query = FileRecord.select(
        FileRecord.id,
        FileRecord.profile,
        FileRecord.bucket,
        FileRecord.filepath,
        FileRecord.current_state,
    ).where(FileRecord.current_state.in_(OPEN) & (FileRecord.node == node()))
    for row in query.iterator():
        ref = FileRef(row.profile, row.bucket, row.filepath)
        yield OpenPassage(int(row.id), ref, State(row.current_state))


@_resilient
def repair(record_id: int, state: State) -> None:
    """Make an open passage agree with where its file is: a copy wiped from incoming_tmp is
    abandoned, a file found in completed/ was uploaded."""
    reason = Reason.WIPED if state == State.ABANDONED else None
    with write():
        values: dict[Any, Any] = {
            FileRecord.current_state: state,
            FileRecord.reason: reason,
            FileRecord.last_updated: utcnow(),
        }
        if state == State.COMPLETED:
            values[FileRecord.upload_outcome] = Outcome.SUCCESS
        FileRecord.update(values).where(FileRecord.id == record_id).execute()


# -- holds -------------------------------------------------------------------------------------
@_resilient
def hold(profile: str, bucket: str, reason: str, detail: str) -> bool:
    """Put a profile (bucket '') or bucket on hold; True if it was not held already. An
    outage hold gives way to a more telling reason found meanwhile (a certificate, a key)."""
    where = (Hold.profile == profile) & (Hold.bucket == bucket) & (Hold.node == node())
    with write():
        old = Hold.get_or_none(where)
        if old is None:
            Hold.create(profile=profile, bucket=bucket, reason=reason, detail=text(detail))
            return True
        if old.reason == reason or old.reason != Reason.UNREACHABLE:
            return False
        Hold.update(reason=reason, detail=text(detail)).where(where).execute()
        return True


@_resilient
def release(profile: str, bucket: str) -> bool:
    """Lift a hold; True if there was one. In the same transaction the retries it covers that
    wait for later (the files that met the hold, and those an outage pushed back) become due
    now: an uploader that sees the hold gone finds them due, not still waiting."""
    with write():
        deleted = (
            Hold.delete()
            .where((Hold.profile == profile) & (Hold.bucket == bucket) & (Hold.node == node()))
            .execute()
        )
        if deleted:
            now = utcnow()
            waiting = (
                (FileRecord.profile == profile)
                & (FileRecord.node == node())
                & (FileRecord.current_state == State.PROCESSING)
                & (FileRecord.next_attempt_at > now)
            )
            if bucket:
                waiting &= FileRecord.bucket == bucket
            FileRecord.update(next_attempt_at=now).where(waiting).execute()
    return bool(deleted)


@_resilient
def release_all() -> None:
    """Every hold of this node lifted: start-up checks each profile and bucket afresh."""
    with write():
        Hold.delete().where(Hold.node == node()).execute()


@_resilient
def holds() -> dict[tuple[str, str], str]:
    return {(h.profile, h.bucket): h.reason for h in Hold.select().where(Hold.node == node())}


@dataclass(frozen=True)
class HoldRecord:
    profile: str
    bucket: str  # '' for the whole profile
    reason: str
    detail: str | None
    since: dt.datetime | None


@_resilient
def hold_records() -> list[HoldRecord]:
    query = Hold.select().where(Hold.node == node()).order_by(Hold.profile, Hold.bucket)
    return [HoldRecord(h.profile, h.bucket, h.reason, h.detail, _time(h.since)) for h in query]


# -- what flood-status and the metrics read ----------------------------------------------------
@_resilient
def waiting_retries() -> dict[tuple[str, str], tuple[int, dt.datetime | None]]:
    """Per profile and bucket: passages in processing/ waiting for a retry, and the next due."""
    query = (
        FileRecord.select(
            FileRecord.profile,
            FileRecord.bucket,
            pw.fn.COUNT(FileRecord.id).alias("n"),
            pw.fn.MIN(FileRecord.next_attempt_at).alias("due"),
        )
        .where(
            (FileRecord.current_state == State.PROCESSING)
            & FileRecord.next_attempt_at.is_null(False)
            & (FileRecord.node == node())
        )
        .group_by(FileRecord.profile, FileRecord.bucket)
    )
    return {(p, b): (int(n), _time(due)) for p, b, n, due in _tuples(query)}


@_resilient
def completed_since(when: dt.datetime) -> dict[tuple[str, str], int]:
    """Per profile and bucket: passages completed at or after `when`."""
    query = (
        FileRecord.select(
            FileRecord.profile, FileRecord.bucket, pw.fn.COUNT(FileRecord.id).alias("n")
        )
        .where(
            (FileRecord.current_state == State.COMPLETED)
            & (FileRecord.last_updated >= when)
            & (FileRecord.node == node())
        )
        .group_by(FileRecord.profile, FileRecord.bucket)
    )
    return {(p, b): int(n) for p, b, n in _tuples(query)}


@dataclass(frozen=True)
class Problem:
    """A passage that failed, or that waits for a retry, with its last error."""

    state: str  # "failed" or "retrying"
    profile: str
    bucket: str
    reason: str | None
    error: str | None
    at: dt.datetime | None


def problems_since(when: dt.datetime) -> Iterator[Problem]:
    """Passages failed since `when`, then every passage now waiting for a retry, oldest first."""
    failed = FileRecord.select().where(
        (FileRecord.current_state == State.FAILED)
        & (FileRecord.last_updated >= when)
        & (FileRecord.node == node())
    )
    waiting = FileRecord.select().where(
        (FileRecord.current_state == State.PROCESSING)
        & FileRecord.next_attempt_at.is_null(False)
        & (FileRecord.node == node())
    )
    for state, query in (("failed", failed), ("retrying", waiting)):
        for row in query.order_by(FileRecord.id).iterator():
            yield Problem(
                state, row.profile, row.bucket, row.reason, row.error, _time(row.last_updated)
            )


@dataclass(frozen=True)
class Completed:
    """A completed passage as the audit compares it with its object."""

    id: int
    profile: str
    bucket: str
    key: str  # as stored (a non-UTF-8 name escaped)
    size: int | None
    etag: str | None
    checksum: str | None
    at: dt.datetime | None


def completed_passages(
    since: dt.datetime | None = None,
    profile: str | None = None,
    bucket: str | None = None,
) -> Iterator[Completed]:
    """Completed passages, oldest first, that are the newest passage of their key (an older
    one's object was replaced by the newer upload), filtered as asked."""
    newest = (
        FileRecord.select(pw.fn.MAX(FileRecord.id))
        .where(FileRecord.current_state == State.COMPLETED)
        .group_by(FileRecord.profile, FileRecord.bucket, FileRecord.filepath)
    )
    query = FileRecord.select().where(FileRecord.id.in_(newest) & (FileRecord.node == node()))
    if since is not None:
        query = query.where(FileRecord.last_updated >= since)
    if profile is not None:
        query = query.where(FileRecord.profile == profile)
    if bucket is not None:
        query = query.where(FileRecord.bucket == bucket)
    for row in query.order_by(FileRecord.id).iterator():
        yield Completed(
            int(row.id),
            row.profile,
            row.bucket,
            row.filepath,
            row.size,
            row.etag,
            row.checksum,
            _time(row.last_updated),
        )


@_resilient
def buckets_with_key(key: str) -> list[tuple[str, str]]:
    """Every (profile, bucket) with a passage of this key."""
    query = (
        FileRecord.select(FileRecord.profile, FileRecord.bucket)
        .distinct()
        .where(FileRecord.filepath == text(key))
        .order_by(FileRecord.profile, FileRecord.bucket)
    )
    return [(r.profile, r.bucket) for r in query]


@_resilient
def known(ref: FileRef) -> bool:
    """Whether any passage of this key is on record, on any node."""
    return _newest(ref, mine=False) is not None


@dataclass(frozen=True)
class AttemptRecord:
    attempt: int
    at: dt.datetime | None
    outcome: str
    error: str | None


@dataclass(frozen=True)
class PassageRecord:
    """One passage with its retries, for flood-status why."""

    id: int
    state: str
    since: dt.datetime | None
    created: dt.datetime | None
    outcome: str | None
    size: int | None
    etag: str | None
    reason: str | None
    error: str | None
    retry_count: int
    next_attempt_at: dt.datetime | None
    requeued_from: int | None
    attempts: list[AttemptRecord] = field(default_factory=list)
    checksum: str | None = None
    options: str | None = None  # JSON, as uploaded
    version_id: str | None = None
    deliveries: list[tuple[str, str, int, str | None]] = field(default_factory=list)
    removed: list[tuple[str, dt.datetime | None]] = field(default_factory=list)  # (reason, at)
    node: str = ""  # the node whose spool the passage went through


@_resilient
def passages(ref: FileRef) -> list[PassageRecord]:
    """Every passage of one key, oldest first, each with its retries."""
    rows = list(FileRecord.select().where(_of(ref, mine=False)).order_by(FileRecord.id))
    tries: dict[int, list[AttemptRecord]] = {}
    if rows:
        query = (
            RetryAttempt.select()
            .where(RetryAttempt.file_record_id.in_([r.id for r in rows]))
            .order_by(RetryAttempt.attempt, RetryAttempt.id)
        )
        for a in query:
            tries.setdefault(int(a.file_record_id), []).append(
                AttemptRecord(int(a.attempt), _time(a.attempted_at), a.outcome, a.error)
            )
    return [
        PassageRecord(
            id=int(r.id),
            state=r.current_state,
            since=_time(r.last_updated),
            created=_time(r.file_creation_date),
            outcome=r.upload_outcome,
            size=r.size,
            etag=r.etag,
            reason=r.reason,
            error=r.error,
            retry_count=int(r.retry_count or 0),
            next_attempt_at=_time(r.next_attempt_at),
            requeued_from=r.requeued_from,
            attempts=tries.get(int(r.id), []),
            checksum=r.checksum,
            options=r.options,
            version_id=r.version_id,
            node=r.node,
            deliveries=deliveries_of(int(r.id)),
            removed=[
                (m.reason, _time(m.removed_at))
                for m in Removal.select().where(Removal.record_id == r.id).order_by(Removal.id)
            ],
        )
        for r in rows
    ]


def _tuples(query: Any) -> Iterator[tuple[Any, ...]]:
    """A query's rows as plain tuples (peewee types them as models)."""
    yield from query.tuples()


def _time(value: Any) -> dt.datetime | None:
    """A stored time (aggregates may hand back text) as naive UTC."""
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


# -- what the audit reads ----------------------------------------------------------------------
@_resilient
def completed_page(
    after: int,
    limit: int,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    profile: str | None = None,
    bucket: str | None = None,
) -> list[Completed]:
    """completed_passages() a page at a time: up to `limit` of them with a record id above
    `after`, completed in [since, until). Each page is a short read of its own, so an audit
    holds no read open across its HEADs (the supervisor's checkpoints go on meanwhile)."""
    newer = FileRecord.alias("newer")
    replaced = newer.select(newer.id).where(
        (newer.profile == FileRecord.profile)
        & (newer.bucket == FileRecord.bucket)
        & (newer.filepath == FileRecord.filepath)
        & (newer.current_state == State.COMPLETED)
        & (newer.id > FileRecord.id)
    )
    query = FileRecord.select().where(
        (FileRecord.current_state == State.COMPLETED)
        & (FileRecord.id > after)
        & ~pw.fn.EXISTS(replaced)
        & (FileRecord.node == node())
    )
    if since is not None:
        query = query.where(FileRecord.last_updated >= since)
    if until is not None:
        query = query.where(FileRecord.last_updated < until)
    if profile is not None:
        query = query.where(FileRecord.profile == profile)
    if bucket is not None:
        query = query.where(FileRecord.bucket == bucket)
    return [
        Completed(
            int(row.id),
            row.profile,
            row.bucket,
            row.filepath,
            row.size,
            row.etag,
            row.checksum,
            _time(row.last_updated),
        )
        for row in query.order_by(FileRecord.id).limit(limit)
    ]


@_resilient
def superseded(done: Completed) -> bool:
    """Whether a newer passage of the key is under way or completed: its object is being (or
    has been) replaced since, so what the server holds now is not `done`'s to answer for."""
    return bool(
        FileRecord.select(FileRecord.id)
        .where(
            (FileRecord.profile == done.profile)
            & (FileRecord.bucket == done.bucket)
            & (FileRecord.filepath == done.key)
            & (FileRecord.id > done.id)
            & FileRecord.current_state.in_((*OPEN, State.COMPLETED))
        )
        .exists()
    )


# -- the fleet: every node's passages, for flood-status ------------------------------------------
@dataclass
class NodeBucket:
    """One node's profile and bucket as its records tell it (flood-status reads the directories
    of its own node only: another node's spool lies on another host)."""

    node: str
    profile: str
    bucket: str
    incoming: int = 0
    processing: int = 0  # in processing/, waiting for a retry or not
    waiting_retry: int = 0
    next_retry_at: dt.datetime | None = None
    failed: int = 0  # keys whose newest passage failed
    completed_today: int = 0


@_resilient
def nodes() -> list[str]:
    """Every node with a row in the records, sorted."""
    query = FileRecord.select(FileRecord.node).distinct().order_by(FileRecord.node)
    return [str(n) for (n,) in _tuples(query)]


@_resilient
def node_buckets(since: dt.datetime) -> dict[tuple[str, str, str], NodeBucket]:
    """Per (node, profile, bucket): open passages, retries waiting, failed keys, and passages
    completed at or after `since`."""
    found: dict[tuple[str, str, str], NodeBucket] = {}

    def entry(n: str, p: str, b: str) -> NodeBucket:
        return found.setdefault((n, p, b), NodeBucket(n, p, b))

    where = FileRecord.node, FileRecord.profile, FileRecord.bucket
    open_query = (
        FileRecord.select(
            *where,
            FileRecord.current_state,
            pw.fn.COUNT(FileRecord.id),
            pw.fn.COUNT(FileRecord.next_attempt_at),
            pw.fn.MIN(FileRecord.next_attempt_at),
        )
        .where(FileRecord.current_state.in_((State.INCOMING, State.PROCESSING)))
        .group_by(*where, FileRecord.current_state)
    )
    for n, p, b, state, count, waiting, due in _tuples(open_query):
        e = entry(n, p, b)
        if state == State.INCOMING:
            e.incoming = int(count)
        else:
            e.processing, e.waiting_retry, e.next_retry_at = int(count), int(waiting), _time(due)
    done = (
        FileRecord.select(*where, pw.fn.COUNT(FileRecord.id))
        .where((FileRecord.current_state == State.COMPLETED) & (FileRecord.last_updated >= since))
        .group_by(*where)
    )
    for n, p, b, count in _tuples(done):
        entry(n, p, b).completed_today = int(count)
    newest = FileRecord.select(pw.fn.MAX(FileRecord.id)).group_by(*where, FileRecord.filepath)
    failed = (
        FileRecord.select(*where, pw.fn.COUNT(FileRecord.id))
        .where((FileRecord.current_state == State.FAILED) & FileRecord.id.in_(newest))
        .group_by(*where)
    )
    for n, p, b, count in _tuples(failed):
        entry(n, p, b).failed = int(count)
    return found
