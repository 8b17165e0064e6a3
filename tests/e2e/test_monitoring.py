"""Monitoring: a real Prometheus scrapes a real flood-supervisor; the alert rules and the
Grafana dashboard in deploy/ are checked with promtool and against what Flood serves."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from faultproxy import FaultProxy
from prometheus import Prometheus, find_binary, unavailable
from prometheus_client.parser import text_string_to_metric_families
from spool import Spool, wait_for

from flood.testing.localserver import LocalS3

pytestmark = pytest.mark.timeout(240)
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "flood-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "flood-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "flood-dashboard.json"
SEVERITIES = {"warning", "critical"}
# Series about a target that Prometheus makes itself, not Flood.
PROMETHEUS_OWN = {"up"}
# Metrics without profile and bucket labels: alerts on them name the instance instead.
INSTANCE_LEVEL = {
    "up",
    "flood_database_up",
    "flood_process_restarts_total",
    "flood_watcher_events_total",
    "flood_watcher_overflows_total",
    "flood_watcher_rescans_total",
}
# Values for the dashboard's variables when its expressions are run without Grafana.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s"}


# -- PromQL: the metrics an expression names ---------------------------------------------------
_STRING = r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\''
TOKEN = re.compile(
    rf"""
    (?P<string>{_STRING})
    |(?P<matchers>\{{(?:{_STRING}|[^{{}}"'])*\}})
    |(?P<range>\[[^\]]*\])
    |(?P<name>[A-Za-z_:][\w:]*)
    |(?P<number>[0-9][\w.+]*)
    |(?P<space>\s+)
    |(?P<other>.)
    """,
    re.X,
)
KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"}
AGGREGATIONS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}


def selectors(expr: str) -> list[tuple[str, str]]:
    """Each vector selector of a PromQL expression: (metric name, its {matchers} or "").
    Functions, keywords, grouping labels, strings, ranges and numbers are skipped."""
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(expr) if m.lastgroup != "space"]
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        after = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        i += 1
        if kind != "name":
            continue
        if text.lower() in GROUPING and after[1] == "(":
            while i < len(tokens) and tokens[i][1] != ")":
                i += 1  # the label list
            continue
        if text.lower() in KEYWORDS | GROUPING | AGGREGATIONS or after[1] == "(":
            continue  # a keyword, an aggregation (`sum by (...) (...)`) or a function
        matchers = after[1] if after[0] == "matchers" else ""
        found.append((text, matchers))
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


def test_selectors_are_found_in_promql() -> None:
    """The PromQL reader finds the metric of each selector, with its matchers, and nothing
    of functions, grouping labels, keywords, strings, durations or Grafana variables."""
    expr = (
        "histogram_quantile(0.9, sum by (le, profile) (rate("
        'a_bucket{x="1", y=~"$v", z="{not}"}[$__rate_interval]))) '
        "/ on (instance) group_left (reason) b:rate5m offset 15m > bool 3 or vector(0) "
        'unless sum(c_total) without (bucket) and label_replace(d, "e", "f", "g", "h")'
    )
    assert selectors(expr) == [
        ("a_bucket", '{x="1", y=~"$v", z="{not}"}'),
        ("b:rate5m", ""),
        ("c_total", ""),
        ("d", ""),
    ]


# -- the rules -----------------------------------------------------------------------------------
def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    """promtool accepts deploy/prometheus/flood-alerts.yml and every unit test in
    flood-alerts.test.yml passes (each alert fires on its series and stays quiet on others)."""
    reason = unavailable("promtool")
    if reason is not None:
        pytest.skip(reason)
    promtool = find_binary("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr


def test_every_alert_has_for_severity_annotations_and_tests() -> None:
    """Every alert has `for:`, a warning or critical severity, a summary and a description
    naming the profile and bucket (the instance for daemon-wide ones), and unit tests in
    which each of its severities fires and in which it must not."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    firing: set[tuple[str, str]] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            if not check.get("exp_alerts"):
                quiet.add(check["alertname"])
            for alert in check.get("exp_alerts") or []:
                firing.add((check["alertname"], alert["exp_labels"]["severity"]))
    for rule in alert_rules():
        name, severity = rule["alert"], rule.get("labels", {}).get("severity")
        assert re.fullmatch(r"[0-9]+[smh]", str(rule.get("for", ""))), f"{name}: no for:"
        assert severity in SEVERITIES, f"{name}: severity {severity!r}"
        notes = rule.get("annotations", {})
        assert notes.get("summary") and notes.get("description"), f"{name}: annotations"
        if metric_names(rule["expr"]) - INSTANCE_LEVEL:
            for label in ("profile", "bucket"):
                assert f"$labels.{label}" in notes["description"], f"{name}: names no {label}"
        elif "absent(" not in rule["expr"]:
            assert "$labels.instance" in notes["summary"], f"{name}: names no instance"
        assert (name, severity) in firing, f"{name} ({severity}) never fires in a unit test"
        assert name in quiet, f"{name} has no unit test in which it must stay quiet"


# -- the dashboard -------------------------------------------------------------------------------
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_exprs() -> list[str]:
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def grafana_free(expr: str) -> str:
    """The expression as Prometheus gets it from Grafana with every variable set to All."""
    expr = re.sub(r"label_values\((.*), *\w+\)$", r"\1", expr)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES.get(m.group(1), ".*"), expr)


def test_the_dashboard_is_well_formed() -> None:
    """The dashboard is JSON Grafana imports: unique panel ids inside a 24-column grid, each
    panel and query on the chosen Prometheus data source, and every variable used defined."""
    board = dashboard()
    variables = {v["name"] for v in board["templating"]["list"]} | set(GRAFANA_VARIABLES)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] and board["title"] == "Flood"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"]))
            assert used <= variables, (panel["title"], used - variables)
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for wanted in (
        "uploads per second by outcome",
        "bytes per second",
        "upload duration",
        "files by state",
        "oldest pending",
        "paused",
        "retries per second by reason",
        "process restarts",
        "audit",
        "orphan multipart uploads",
    ):
        assert wanted in titles, wanted


# -- a real Prometheus scraping a real Flood ----------------------------------------------------
def served(port: int) -> dict[str, set[str]]:
    """The metric families a running Flood serves now: family name -> its sample names."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {
        family.name: {s.name for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


@pytest.fixture
def proxy(s3: LocalS3) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", s3.port) as fp:
        yield fp


def busy_flood(sp: Spool, bucket: str, proxy: FaultProxy) -> tuple[Any, int]:
    """A supervisor that has something for every metric: uploads, a failure, a retry (profile
    `slow`, answered 503), a held bucket, a periodic rescan, a rebuild of its children, and
    the periodic audit and the janitor (every 2 s, so that they see the buckets made later)."""
    sp.drop("p1", f"gone-{bucket}", "held.txt", b"held")
    sup = sp.start(
        "--metrics-port",
        "0",
        "--retry-base",
        "120",
        "--rescan-interval",
        "2",
        "--audit-interval",
        "2s",
        "--janitor-interval",
        "2s",
        workers=1,
    )
    wait_for(lambda: sp.events("metrics_serving"), 60, "the metrics server")
    port = int(sp.events("metrics_serving")[0]["flood"]["port"])
    wait_for(lambda: sp.events("startup_drain_queued"), 60, "the start-up drain")
    proxy.set_mode("503")
    keys = ["a.txt", "b.txt", "c/d.txt"]
    for key in keys:
        sp.drop("p1", bucket, key, key.encode() * 100)
    os.symlink("/etc/hostname", sp.path("incoming", "p1", bucket, "link"))
    sp.drop("slow", bucket, "later.txt", b"later")
    sp.wait_done("p1", bucket, keys)
    sp.wait_done("p1", bucket, ["link"], state="failed")
    wait_for(lambda: sp.events("upload_retry_scheduled"), 60, "a scheduled retry")
    wait_for(lambda: sp.events("rescan_started"), 60, "a periodic rescan")
    rounds = len(sp.events("janitor_finished"))
    wait_for(lambda: len(sp.events("janitor_finished")) > rounds, 60, "a janitor round now")
    wait_for(lambda: sp.events("audit_finished"), 60, "a periodic audit")
    os.kill(sp.events("children_started")[-1]["flood"]["pids"][0], signal.SIGKILL)
    wait_for(lambda: len(sp.events("children_started")) >= 2, 60, "a new generation")
    return sup, port


def test_prometheus_scrapes_flood_and_the_rules_and_dashboard_fit_its_metrics(
    tmp_path: Path,
    s3: LocalS3,
    bucket: str,
    proxy: FaultProxy,
    prometheus: Callable[..., Prometheus],
) -> None:
    """A real Prometheus scraping a real flood-supervisor counts its uploads in
    flood_files_uploaded_total; the alert rules evaluate on its series without error (the held
    bucket's FloodPaused goes pending); every selector of the rules and the dashboard finds
    series; and they name only metrics Flood serves, all of which the dashboard shows."""
    sp = Spool(
        tmp_path,
        s3,
        {
            "p1": s3.credentials_ini("p1"),
            "slow": s3.credentials_ini("slow", endpoint=proxy.endpoint),
        },
    )
    try:
        sup, port = busy_flood(sp, bucket, proxy)
        prom = prometheus(f"127.0.0.1:{port}", rule_files=[RULES])
        where = f'job="flood", profile="p1", bucket="{bucket}"'
        counted = wait_for(
            lambda: prom.value(f'flood_files_uploaded_total{{{where}, outcome="success"}}') == 3,
            60,
            "Prometheus to count 3 uploads",
        )
        assert counted
        assert prom.value(f'flood_files_uploaded_total{{{where}, outcome="failure"}}') == 1
        assert prom.value('up{job="flood"}') == 1 and prom.targets_health() == ["up"]

        def rules_evaluated() -> list[dict[str, Any]] | None:
            rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
            done = all(not r["lastEvaluation"].startswith("0001") for r in rules)
            return rules if rules and done else None

        rules = wait_for(rules_evaluated, 60, "every rule evaluated")
        assert len(rules) == len(alert_rules())
        assert [r for r in rules if r["health"] != "ok"] == []
        paused = wait_for(
            lambda: [
                a for a in prom.api("alerts")["alerts"] if a["labels"]["alertname"] == "FloodPaused"
            ],
            60,
            "FloodPaused pending",
        )
        assert [(a["state"], a["labels"]["bucket"], a["labels"]["reason"]) for a in paused] == [
            ("pending", f"gone-{bucket}", "NoSuchBucket")
        ]

        rule_exprs = [r["expr"] for r in alert_rules()]
        board_exprs = [grafana_free(e) for e in dashboard_exprs()]
        for expr in rule_exprs + board_exprs:
            prom.query(expr)  # raises with Prometheus's message if it does not parse
            for name, matchers in selectors(expr):
                assert prom.query(name + matchers), f"no series for {name}{matchers} in {expr}"

        families = served(port)
        names = set().union(*families.values())
        used = {n for e in rule_exprs + board_exprs for n in metric_names(e)} - PROMETHEUS_OWN
        assert used <= names, f"not served by Flood: {used - names}"
        shown = {n for e in board_exprs for n in metric_names(e)}
        unshown = {f for f, samples in families.items() if samples and not samples & shown}
        assert not unshown, f"served but not on the dashboard: {unshown}"
        assert sup.terminate() == 0
    finally:
        sp.close()
