"""Fixtures: one real local S3 server (SeaweedFS, auth on) for the session, a bucket and a
server directory per test; a test CA, SeaweedFS over HTTPS, moto's standalone server,
forward proxies (the suite's own and tinyproxy), real PostgreSQL and Prometheus servers; and
`server`, each S3 implementation in turn (SeaweedFS, then moto)."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

from forwardproxy import ForwardProxy
from implementations import KINDS, S3Implementation
from motoserver import MotoServer
from postgres import Postgres, describe_unavailable
from prometheus import Prometheus, unavailable
from spool import Spool, new_bucket, stop_all
from tinyproxy import TinyProxy, find_tinyproxy
from tlsca import CertAuthority, HttpsS3

from flood.testing.localserver import LocalS3, ServerTLS


@pytest.fixture(autouse=True)
def _no_supervisor_outlives_its_test() -> Iterator[None]:
    yield
    stop_all()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    server = LocalS3(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3: LocalS3) -> str:
    return new_bucket(s3)


@pytest.fixture
def client(s3: LocalS3) -> Any:
    return s3.client()


@pytest.fixture
def spool(tmp_path: Path, s3: LocalS3) -> Iterator[Spool]:
    """A server dir whose credentials file has profile `p1` (the admin key of the server)."""
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1")})
    yield sp
    sp.close()


def _postgres(workdir: Path) -> Iterator[Postgres]:
    reason = describe_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with Postgres(workdir) as server:
        yield server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One PostgreSQL server for the session (role and database `flood`, a password); a test
    that stops or restarts a server uses own_postgres instead."""
    yield from _postgres(tmp_path_factory.mktemp("postgres"))


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[Postgres]:
    """A PostgreSQL server of the test's own, for outage tests (stop(), start(), restart())."""
    yield from _postgres(tmp_path / "postgres")


@pytest.fixture
def pg_database(postgres: Postgres, tmp_path: Path) -> Callable[[], tuple[str, Path]]:
    """new(): a fresh, empty database on the session's server owned by its role, as (URL
    without a password, a pgpass file for it)."""
    pgpass = tmp_path / "pgpass"
    fd = os.open(pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"{postgres.host}:{postgres.port}:*:{postgres.user}:{postgres.password}\n")

    def new() -> tuple[str, Path]:
        name = f"flood_{secrets.token_hex(6)}"
        postgres.psql(f"CREATE DATABASE {name} OWNER {postgres.user}", database="postgres")
        return f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{name}", pgpass

    return new


@pytest.fixture(params=["sqlite", "postgresql"])
def records_backend(request: pytest.FixtureRequest) -> Callable[[Spool], Spool]:
    """into(spool): the spool's records in SQLite (as made), then in a fresh PostgreSQL
    database; the test id says which."""

    def into(spool: Spool) -> Spool:
        if request.param == "postgresql":
            spool.use_postgres(*request.getfixturevalue("pg_database")())
        return spool

    return into


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """start(*targets, rule_files=(), scrape_interval="1s"): a real Prometheus scraping the
    targets ("host:port") as job `flood`, ready to query; stopped at the end of the test."""
    reason = unavailable("prometheus")
    if reason is not None:
        pytest.skip(reason)
    servers: list[Prometheus] = []

    def start(
        *targets: str, rule_files: Sequence[Path] = (), scrape_interval: str = "1s"
    ) -> Prometheus:
        server = Prometheus(
            tmp_path / f"prometheus-{len(servers)}",
            targets,
            rule_files=rule_files,
            scrape_interval=scrape_interval,
        )
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertAuthority:
    """A test CA for the session; `ca.bundle` is the PEM file to trust, `ca.issue(...)` makes
    server certificates."""
    return CertAuthority(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def s3_https(tmp_path_factory: pytest.TempPathFactory, ca: CertAuthority) -> Iterator[HttpsS3]:
    """A second local S3 server whose gateway also serves HTTPS (a certificate for localhost,
    127.0.0.1 and ::1 from `ca`), with the CA bundle to trust."""
    files = ca.localhost
    server = LocalS3(tmp_path_factory.mktemp("s3-https"), tls=ServerTLS(files.cert, files.key))
    server.start()
    yield HttpsS3(server, ca.bundle)
    server.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's standalone server for the session: a second S3 implementation (it checks no
    signatures and no Content-MD5: tests/integration/test_motoserver.py)."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=KINDS)
def server(request: pytest.FixtureRequest) -> S3Implementation:
    """Each S3 implementation in turn, behind one face (credentials_ini(), client(),
    create_bucket(), new_bucket()): SeaweedFS with signatures checked, then moto. Only the
    server a test runs against is started."""
    backend = request.getfixturevalue("s3" if request.param == "seaweedfs" else "moto")
    return S3Implementation(request.param, backend)


@pytest.fixture
def forward_proxy(ca: CertAuthority) -> Iterator[Callable[..., ForwardProxy]]:
    """Start a forward proxy with ForwardProxy's options (`ca` defaults to the test CA): call it
    as often as needed; every proxy it started is stopped after the test."""
    started: list[ForwardProxy] = []

    def start(**options: Any) -> ForwardProxy:
        options.setdefault("ca", ca)
        proxy = ForwardProxy(**options)
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def tinyproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyProxy]:
    """tinyproxy for the session, CONNECT allowed to any port, no authentication; the test
    skips when the binary is not installed."""
    if find_tinyproxy() is None:
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy; .ci/run does)")
    proxy = TinyProxy(tmp_path_factory.mktemp("tinyproxy"))
    proxy.start()
    yield proxy
    proxy.stop()
