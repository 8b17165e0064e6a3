"""Log lines: ECS JSON or readable text, a sentence per event, secrets scrubbed in both, and
the per-file success lines left out on request."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from flood import logs
from flood.messages import MESSAGES, message

TOP = Path(__file__).resolve().parents[2]
SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_json_lines_keep_the_action_and_say_a_sentence(tmp_path: Path) -> None:
    """event.action is the stable name, message the sentence; a secret is scrubbed in both."""
    log = logs.configure("uploader", "info", str(tmp_path / "x.log"), [SECRET], fmt="json")
    log.info("upload_succeeded", profile="p", bucket="b", key=f"k-{SECRET}", size=3, duration=0.5)
    [line] = lines(tmp_path / "x.log")
    doc = json.loads(line)
    assert doc["event"]["action"] == "upload_succeeded"
    assert doc["message"] == "uploaded k-[REDACTED] to p/b"
    assert doc["event"]["duration"] == 500_000_000
    assert SECRET not in line


def test_text_lines_are_one_readable_line_with_seconds_and_no_secret(tmp_path: Path) -> None:
    """Text: time, level, role[pid], the sentence, then key fields first; durations in
    seconds; no colours in a file; a secret scrubbed from the sentence and the fields."""
    log = logs.configure("uploader", "info", str(tmp_path / "x.log"), [SECRET], fmt="text")
    log.warning(
        "upload_retry_scheduled",
        profile="p",
        bucket="b",
        key="a b.txt",
        error=f"refused with {SECRET}\nsecond line",
        delay=30.0,
        next_attempt=2,
        duration=0.01234,
    )
    [line] = lines(tmp_path / "x.log")
    assert line.split(" ", 1)[1].startswith("warning  uploader[")
    assert "a b.txt failed for p/b, retry 2 later: refused with [REDACTED]" in line
    fields = line.split("  [upload_retry_scheduled] ", 1)[1]
    assert fields.startswith('profile=p bucket=b key="a b.txt" duration=0.012s ')
    assert 'error="refused with [REDACTED]\\nsecond line"' in fields
    assert SECRET not in line and "\x1b[" not in line


def test_successes_can_be_left_out(tmp_path: Path) -> None:
    """successes=False drops file_claimed and upload_succeeded; failures and retries stay."""
    log = logs.configure("uploader", "info", str(tmp_path / "x.log"), fmt="json", successes=False)
    log.info("file_claimed", key="k")
    log.info("upload_succeeded", key="k")
    log.error("upload_failed", key="k", error="AccessDenied")
    log.warning("upload_retry_scheduled", key="k", error="503")
    actions = [json.loads(line)["event"]["action"] for line in lines(tmp_path / "x.log")]
    assert actions == ["upload_failed", "upload_retry_scheduled"]


def test_children_take_the_supervisors_choices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configure() without fmt or successes follows what the supervisor exported."""
    monkeypatch.setenv(logs.FORMAT_ENV, "text")
    monkeypatch.setenv(logs.SUCCESSES_ENV, "0")
    log = logs.configure("watcher", "info", str(tmp_path / "x.log"))
    log.info("upload_succeeded", key="k")
    log.info("watcher_stopped")
    [line] = lines(tmp_path / "x.log")
    assert "watcher stopped  [watcher_stopped]" in line


def test_auto_is_json_off_a_terminal() -> None:
    """auto: a log file or a pipe gets JSON."""
    assert logs.resolve_format("auto", "/var/log/flood/flood.log") == "json"
    assert logs.resolve_format("text", "/var/log/flood/flood.log") == "text"


def logged_actions() -> set[str]:
    """Every event name the code logs as a literal (the first argument of log.info & co)."""
    found = set()
    files = [*TOP.glob("flood/*.py"), *TOP.glob("workers/*.py"), *TOP.glob("supervisor/*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("debug", "info", "warning", "error", "exception")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and node.args[0].value.isidentifier()
            ):
                found.add(node.args[0].value)
    return found


def test_every_logged_event_has_a_sentence() -> None:
    """Each event the code logs has its own message, and every template formats."""
    missing = logged_actions() - set(MESSAGES)
    assert not missing, f"no sentence in flood/messages.py for {sorted(missing)}"
    for action in MESSAGES:
        assert message(action, {}) and "{" not in message(action, {}), action
    assert message("some_new_event", {}) == "some new event"
    assert message("watchdog_withheld", {"children": ["a", "b"], "reason": "r"}) == (
        "watchdog withheld: a, b silent (r)"
    )


@pytest.mark.parametrize(("level", "libraries"), [("debug", "INFO"), ("warning", "WARNING")])
def test_library_loggers_never_go_below_info(tmp_path: Path, level: str, libraries: str) -> None:
    """botocore's DEBUG lines carry the Authorization header: its loggers (and the other
    libraries') stay at INFO or above, hand what they log to the root, and keep no handler."""
    import logging

    stray = logging.StreamHandler()
    logging.getLogger("botocore").addHandler(stray)
    logging.getLogger("urllib3").setLevel(logging.DEBUG)
    logs.configure("uploader", level, str(tmp_path / "log"))
    for name in logs.LIBRARIES:
        lib = logging.getLogger(name)
        assert (logging.getLevelName(lib.level), lib.handlers, lib.propagate) == (
            libraries,
            [],
            True,
        ), name
    assert logging.getLevelName(logging.getLogger().level) == libraries
