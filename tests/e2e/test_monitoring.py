"""Monitoring: a real Prometheus scrapes a real flood-supervisor."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from prometheus import Prometheus
from spool import Spool, wait_for

pytestmark = pytest.mark.timeout(240)


def test_prometheus_counts_the_uploads_of_a_running_flood(
    spool: Spool, bucket: str, prometheus: Callable[..., Prometheus]
) -> None:
    """A real Prometheus scraping a real flood-supervisor finds flood_files_uploaded_total
    with the number of files uploaded and the number that failed."""
    sup = spool.start("--metrics-port", "0", workers=1)
    wait_for(lambda: spool.events("metrics_serving"), 60, "the metrics server")
    port = int(spool.events("metrics_serving")[0]["flood"]["port"])
    prom = prometheus(f"127.0.0.1:{port}")
    wait_for(lambda: spool.events("startup_drain_queued"), 60, "the start-up drain")
    keys = ["a.txt", "b.txt", "c/d.txt"]
    for key in keys:
        spool.drop("p1", bucket, key, key.encode() * 100)
    os.symlink("/etc/hostname", spool.path("incoming", "p1", bucket, "link"))
    spool.wait_done("p1", bucket, keys)
    spool.wait_done("p1", bucket, ["link"], state="failed")
    where = f'job="flood", profile="p1", bucket="{bucket}"'
    wait_for(
        lambda: prom.value(f'flood_files_uploaded_total{{{where}, outcome="success"}}') == 3,
        60,
        "Prometheus to count 3 uploads",
    )
    assert prom.value(f'flood_files_uploaded_total{{{where}, outcome="failure"}}') == 1
    assert prom.value('up{job="flood"}') == 1 and prom.targets_health() == ["up"]
    assert sup.terminate() == 0
