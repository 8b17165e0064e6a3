"""Fixtures: one real local S3 server (SeaweedFS, auth on) for the session, a bucket and a
server directory per test; real PostgreSQL servers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))

from postgres import Postgres, describe_unavailable
from prometheus import Prometheus, unavailable
from spool import Spool, new_bucket

from flood.testing.localserver import LocalS3


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
