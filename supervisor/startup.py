"""The ordered start-up steps: lock, directories, incoming_tmp wiped, records repaired, buckets."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from flood import crashpoints, dburl, records
from flood.checks import CREDENTIALS, MISSING, OK, REJECTED, TLS, ProfileCheck
from flood.credentials import INSECURE, Profile
from flood.endpoints import endpoint_of, proxy_for
from flood.errors import AlreadyRunning, DatabaseUnreachable, LayoutError
from flood.jobs import FileRef
from flood.layout import DB_RECORD_NAME, LOCK_NAME, Layout
from flood.settings import Settings
from flood.states import Reason, State


class Probe(Protocol):
    """Asks a profile's server about buckets, in a child (Arbiter.probe): the profile's
    check, or with whole=False one bucket's HeadBucket."""

    def __call__(self, profile: str, buckets: list[str], whole: bool = True) -> ProfileCheck: ...


def lock(server_dir: Path) -> int:
    """Hold the server directory's lock for this process's life (flock: it dies with us)."""
    if not server_dir.is_dir():
        raise LayoutError(f"server directory {server_dir} does not exist or is not a directory")
    path = os.path.join(server_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise LayoutError(f"cannot open lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another flood-supervisor holds the lock {path}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def prepare(settings: Settings, log: Any) -> Layout:
    """Open the records (refusing a database that is not Flood's or is newer, before anything
    is touched), wipe incoming_tmp, create the directories, and repair the records."""
    layout = Layout(settings.server_dir)
    if not layout.root.is_dir():
        raise LayoutError(f"server directory {layout.root} does not exist or is not a directory")
    records.open_db(settings.db_path, settings.node)
    records.watch_outages(
        records.Outages(
            down=lambda error: log.error("database_unreachable", error=error),
            up=lambda seconds: log.info("database_reachable", seconds=round(seconds, 1)),
        )
    )
    record_db(layout, settings.db_path, log)
    record_node(layout, records.node(), log)
    os.makedirs(layout.state_dir(State.INCOMING_TMP), mode=0o750, exist_ok=True)
    wiped = layout.wipe_incoming_tmp()
    log.info("incoming_tmp_wiped", path=layout.state_dir(State.INCOMING_TMP), entries=wiped)
    crashpoints.point("after_wipe")
    layout.prepare(settings.profiles)
    log.info("directories_ready", path=str(layout.root), profiles=sorted(settings.profiles))
    repair(layout, log)
    crashpoints.point("after_repair")
    return layout


def wait_for_database(settings: Settings, log: Any) -> None:
    """PostgreSQL records that do not answer at start: the supervisor keeps running, says so
    once, and goes on (uploading nothing before) once they answer. A database that is not
    Flood's, or is newer, is refused as ever."""
    since = None
    while True:
        try:
            records.check_db(settings.db_path)
        except DatabaseUnreachable as exc:
            if since is None:
                since = time.monotonic()
                log.error("database_unreachable", error=str(exc))
            time.sleep(records.RECONNECT_EVERY)
            continue
        if since is not None:
            log.info("database_reachable", seconds=round(time.monotonic() - since, 1))
        return


def record_db(layout: Layout, db_path: str, log: Any) -> None:
    """Say in the server dir which records this supervisor writes (it holds the lock), so the
    commands find them from any directory instead of guessing ./flood.db."""
    before = layout.recorded_db()
    db_path = dburl.without_password(db_path)  # the file is world-readable; libpq has pgpass
    try:
        layout.record_db(db_path)
    except OSError as exc:
        raise LayoutError(
            f"cannot record the database's path in {layout.root / DB_RECORD_NAME}: {exc.strerror}"
        ) from None
    previous = dburl.shown(before) if before is not None and before != db_path else None
    log.info("db_recorded", path=dburl.shown(db_path), previous=previous)


def record_node(layout: Layout, node: str, log: Any) -> None:
    """Say in the server dir which node this supervisor writes as (the commands act as it)."""
    try:
        layout.record_node(node)
    except OSError as exc:
        raise LayoutError(f"cannot record the node in {layout.root}: {exc.strerror}") from None
    log.info("node_recorded", node=node)


def repair(layout: Layout, log: Any) -> int:
    """Make every open record agree with where its file is: the directories are the truth."""
    fixed = 0
    for passage in list(records.open_passages()):
        state = _where(layout, passage.ref, passage.state)
        if state is None or state == passage.state:
            continue
        records.repair(passage.id, state)
        log.warning(
            "record_repaired",
            profile=passage.ref.profile,
            bucket=passage.ref.bucket,
            key=passage.ref.key,
            record_id=passage.id,
            was=passage.state,
            now=state,
        )
        fixed += 1
    return fixed


def _where(layout: Layout, stored: FileRef, recorded: State) -> State | None:
    """The state an open passage's file is in now (None: leave the record as it is)."""
    refs = [stored._replace(key=key) for key in records.names_for(stored.key)]

    def present(state: State) -> bool:
        return any(os.path.lexists(layout.path(state, ref)) for ref in refs)

    for state in (State.PROCESSING, State.INCOMING):
        if present(state):
            return state
    if recorded == State.INCOMING_TMP:
        return State.ABANDONED  # incoming_tmp was wiped: the copy never reached incoming/
    for state in (State.COMPLETED, State.FAILED):
        if present(state):
            return state
    return None


def check_buckets(
    settings: Settings, layout: Layout, log: Any, probe: Probe
) -> dict[str, set[str]]:
    """Check every profile's buckets on its server; hold what fails. The buckets found OK."""
    records.release_all()
    checked: dict[str, set[str]] = {}
    for name in sorted(settings.profiles):
        checked[name] = check_one(settings, layout, name, log, probe)
    for name in sorted(layout.profiles_present() - set(settings.profiles)):
        log.warning(
            "profile_unknown",
            profile=name,
            reason="directory has no profile in the credentials file; files left alone",
        )
    return checked


_HOLD_REASONS = {REJECTED: Reason.KEY_REJECTED, TLS: Reason.TLS, CREDENTIALS: Reason.CREDENTIALS}


def check_one(settings: Settings, layout: Layout, name: str, log: Any, probe: Probe) -> set[str]:
    """Check one profile now; record holds for it or its buckets; the buckets that are OK."""
    result = probe(name, sorted(layout.buckets_present(name)))
    if result.status != OK:
        reason = _HOLD_REASONS.get(result.status, Reason.UNREACHABLE)
        if records.hold(name, "", reason, result.detail):
            log.error("profile_paused", profile=name, reason=reason, error=result.detail)
        return set()
    records.endpoint_answered(name)
    records.release(name, "")
    ok = set()
    for bucket, verdict in result.buckets.items():
        if verdict == MISSING:
            if records.hold(name, bucket, Reason.NO_SUCH_BUCKET, f"bucket {bucket} does not exist"):
                log.error(
                    "bucket_paused",
                    profile=name,
                    bucket=bucket,
                    reason="NoSuchBucket",
                    error="bucket does not exist on the server; its files stay in incoming/",
                )
        else:
            records.release(name, bucket)
            ok.add(bucket)
    log.info("profile_checked", profile=name, buckets=sorted(ok))
    return ok


def check_connections(profiles: Mapping[str, Profile]) -> None:
    """Refuse, before anything is touched, a proxy setting that is not a URL ($HTTPS_PROXY,
    $HTTP_PROXY or a profile's proxy key: ConfigError naming it)."""
    for profile in profiles.values():
        proxy_for(profile, endpoint_of(profile))
        if profile.credential_source:
            # botocore's credential providers: imported only for a profile that names one.
            from flood.connection import check_source

            check_source(profile)


class Caution(NamedTuple):
    event: str
    profile: str
    reason: str


def connection_warnings(settings: Settings) -> list[Caution]:
    """What the start-up line warns of: a profile whose TLS is not verified."""
    return [
        Caution(
            "tls_verification_off",
            name,
            f"ca_bundle = insecure: the certificate of {endpoint_of(profile)} is not verified",
        )
        for name, profile in sorted(settings.profiles.items())
        if profile.ca_bundle == INSECURE
    ]
