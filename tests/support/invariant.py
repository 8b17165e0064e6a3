"""Flood's crash-safety invariant on a drained spool: each file in one place, right bytes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError
from spool import Spool

Ref = tuple[str, str, str]  # (profile, bucket, key)
OPEN = ("incoming", "processing")
FINAL = ("completed", "failed")
MAX_KEY_BYTES = 1024


@dataclass
class Report:
    """What check() found; `ok` when nothing was lost, wrong, out of step or left behind."""

    files: int = 0
    completed: int = 0
    failed: int = 0
    lost: list[str] = field(default_factory=list)  # not in exactly one final place
    wrong: list[str] = field(default_factory=list)  # an object whose bytes differ
    out_of_step: list[str] = field(default_factory=list)  # records disagreeing with directories
    leftover: list[str] = field(default_factory=list)  # still in incoming/ or processing/

    @property
    def ok(self) -> bool:
        return not (self.lost or self.wrong or self.out_of_step or self.leftover)

    def summary(self) -> str:
        parts = [
            f"files={self.files}",
            f"completed={self.completed}",
            f"failed={self.failed}",
            f"lost={len(self.lost)}",
            f"wrong={len(self.wrong)}",
            f"out_of_step={len(self.out_of_step)}",
            f"leftover={len(self.leftover)}",
        ]
        details = [
            f"{name}: {items[:5]}"
            for name, items in (
                ("lost", self.lost),
                ("wrong", self.wrong),
                ("out_of_step", self.out_of_step),
                ("leftover", self.leftover),
            )
            if items
        ]
        return " ".join(parts) + ("\n" + "\n".join(details) if details else "")


def check(spool: Spool, client: Any, expected: Mapping[Ref, bytes]) -> Report:
    """The invariant for `expected` files (their final bytes), reading every object back."""
    report = Report(files=len(expected))
    for state in OPEN:
        report.leftover.extend(f"{state}/{p}" for p in _files(spool.dir / state))
    newest = _newest_records(spool)
    for ref, data in expected.items():
        _check_file(spool, client, ref, data, newest.get(stored(ref)), report)
    for ref, row in newest.items():
        if row["current_state"] in (*OPEN, "incoming_tmp"):
            report.out_of_step.append(f"{_show(ref)}: newest record still {row['current_state']}")
    return report


def _check_file(spool: Spool, client: Any, ref: Ref, data: bytes, row: Any, report: Report) -> None:
    places = [s for s in (*OPEN, *FINAL) if os.path.lexists(_path(spool, s, ref))]
    name = _show(ref)
    if len(places) != 1 or places[0] not in FINAL:
        report.lost.append(f"{name}: in {places or 'no directory'}")
        return
    state = places[0]
    held = _read(_path(spool, state, ref))
    if held != data:
        report.lost.append(f"{name}: the file in {state}/ no longer holds its bytes")
    if state == "completed":
        report.completed += 1
        if _object(client, ref) != held:
            report.wrong.append(f"{name}: the object is not the file's bytes")
    else:
        report.failed += 1
        stored = _object(client, ref)
        if stored is not None and stored != held:
            report.wrong.append(f"{name}: failed, but an object with other bytes exists")
    _check_record(ref, state, row, report)


def _check_record(ref: Ref, state: str, row: Any, report: Report) -> None:
    name = _show(ref)
    if row is None:
        report.out_of_step.append(f"{name}: in {state}/ with no record")
    elif row["current_state"] != state:
        report.out_of_step.append(f"{name}: in {state}/, newest record says {row['current_state']}")
    elif state == "failed" and not row["reason"]:
        report.out_of_step.append(f"{name}: failed with no reason on record")


def stored(ref: Ref) -> Ref:
    """The key as the records hold it: a name that is not UTF-8 with backslash escapes."""
    profile, bucket, key = ref
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        key = os.fsencode(key).decode("utf-8", "backslashreplace")
    return profile, bucket, key


def _newest_records(spool: Spool) -> dict[Ref, Any]:
    newest: dict[Ref, Any] = {}
    if not spool.db.exists():
        return newest
    for row in spool.query("SELECT * FROM file_records ORDER BY id"):
        newest[(row["profile"], row["bucket"], row["filepath"])] = row
    return newest


def _object(client: Any, ref: Ref) -> bytes | None:
    """The object's bytes, None if there is none (or the key cannot be an S3 key at all)."""
    _, bucket, key = ref
    try:
        if len(key.encode("utf-8")) > MAX_KEY_BYTES:
            return None
    except UnicodeEncodeError:
        return None
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise


def _path(spool: Spool, state: str, ref: Ref) -> str:
    profile, bucket, key = ref
    return os.path.join(spool.dir, state, profile, bucket, key)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def _files(top: Any) -> list[str]:
    found = []
    for folder, _, names in os.walk(top):
        found.extend(os.path.relpath(os.path.join(folder, n), top) for n in names)
    return sorted(found)


def _show(ref: Ref) -> str:
    return "/".join(ref).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")


def drained(spool: Spool, expected: Mapping[Ref, bytes]) -> bool:
    """Nothing in incoming/ or processing/ and every expected file in completed/ or failed/."""
    if any(_files(spool.dir / s) for s in OPEN):
        return False
    return all(any(os.path.lexists(_path(spool, s, r)) for s in FINAL) for r in expected)


def wait_drained(spool: Spool, expected: Mapping[Ref, bytes], timeout: float = 120.0) -> float:
    """Poll until drained() against a deadline; the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    delay = 0.05
    while not drained(spool, expected):
        if time.monotonic() > deadline:
            raise AssertionError(f"not drained after {timeout:g} s: {spool.pending_summary()}")
        time.sleep(delay)  # polling interval, not synchronisation
        delay = min(delay * 1.5, 0.5)
    return time.monotonic() - started


def events(spool: Spool, action: str) -> list[dict[str, Any]]:
    """Log lines of one action; lines that are not JSON are skipped (see non_json_lines)."""
    found = []
    for line in _log_text(spool).splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event", {}).get("action") == action:
            found.append(entry)
    return found


def non_json_lines(spool: Spool) -> list[str]:
    """Lines of the log that are not JSON objects (every process should write only JSON)."""
    bad = []
    for line in _log_text(spool).splitlines():
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    return [line for line in bad if line.strip()]


def _log_text(spool: Spool) -> str:
    try:
        return spool.log.read_text(errors="replace")
    except FileNotFoundError:
        return ""
