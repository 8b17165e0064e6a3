"""flood-audit and the supervisor's periodic audit, against the real local S3 server: objects
deleted or overwritten behind Flood's back are found, nothing else is, and nothing changes."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from spool import Spool, new_bucket, wait_for

from flood.testing.localserver import Identity, LocalS3

pytestmark = pytest.mark.timeout(180)
BIG = 1024 * 1024 + 10  # above --multipart-threshold 1: one part, with the profile's crc32


# -- helpers -----------------------------------------------------------------------------------
def audit(sp: Spool, *args: str) -> subprocess.CompletedProcess[str]:
    return sp.run(
        "flood-audit", "--server-dir", str(sp.dir), "--credentials", str(sp.credentials), *args
    )


def audit_json(sp: Spool, *args: str) -> tuple[int, dict[str, Any]]:
    result = audit(sp, "--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def found(doc: dict[str, Any]) -> list[tuple[str, str, str, str, list[str]]]:
    return sorted(
        (f["profile"], f["bucket"], f["key"], f["finding"], f["differs"]) for f in doc["findings"]
    )


def upload(sp: Spool, files: dict[tuple[str, str, str], bytes], *args: str) -> None:
    """Upload the files with a real supervisor, then stop it (the records are then still)."""
    sup = sp.start(*args, workers=1)
    wait_for(lambda: sp.events("startup_drain_queued"), 60, "the start-up drain")
    for (profile, bucket, key), data in files.items():
        sp.drop(profile, bucket, key, data)
    for profile, bucket, key in files:
        sp.wait_done(profile, bucket, [key])
    assert sup.terminate() == 0


def still(sp: Spool) -> dict[str, Any]:
    """What flood-audit must not change: every row of every table, the database file's bytes,
    and every entry of the server dir with its size and times."""
    tables = [r["name"] for r in sp.query("SELECT name FROM sqlite_master WHERE type='table'")]
    rows = {t: [tuple(r) for r in sp.query(f'SELECT * FROM "{t}" ORDER BY rowid')] for t in tables}
    entries = sorted(
        (
            str(p.relative_to(sp.dir)),
            p.lstat().st_size,
            p.lstat().st_mtime_ns,
            p.lstat().st_ctime_ns,
        )
        for p in sp.dir.rglob("*")
    )
    return {
        "rows": rows,
        "db": hashlib.sha256(sp.db.read_bytes()).hexdigest(),
        "entries": entries,
    }


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- flood-audit -------------------------------------------------------------------------------
def test_audit_finds_the_deleted_and_the_overwritten_object_and_changes_nothing(
    tmp_path: Path, s3: LocalS3, bucket: str, client: Any
) -> None:
    """Of four uploads (one multipart with a crc32 checksum on record), the object deleted
    and the one overwritten behind Flood's back are the only findings, in the table and in
    --json, with exit 1; the records, the database file and the server dir are unchanged."""
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1") + "checksum = crc32\n"})
    try:
        files = {
            ("p1", bucket, "a.txt"): b"a" * 100,
            ("p1", bucket, "b.txt"): b"b" * 100,
            ("p1", bucket, "dir/c.txt"): b"c" * 100,
            ("p1", bucket, "big.bin"): os.urandom(BIG),
        }
        upload(sp, files, "--multipart-threshold", "1")
        [big] = sp.records("big.bin")
        assert big["checksum"].startswith("crc32:") and big["checksum"].endswith("-1")
        client.delete_object(Bucket=bucket, Key="b.txt")
        client.put_object(Bucket=bucket, Key="dir/c.txt", Body=b"not what was uploaded")
        before = still(sp)

        table = audit(sp)
        assert table.returncode == 1, table.stdout + table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["PROFILE", "BUCKET", "KEY", "DIFFERS", "RECORDED", "FOUND"]
        rows = sorted(line.split(None, 4) for line in lines[1:4])
        assert [r[:4] for r in rows] == [
            ["p1", bucket, "b.txt", "missing"],
            ["p1", bucket, "dir/c.txt", "etag"],
            ["p1", bucket, "dir/c.txt", "size"],
        ]
        etag = hashlib.md5(b"c" * 100).hexdigest()
        assert rows[1][4].split() == [etag, hashlib.md5(b"not what was uploaded").hexdigest()]
        assert rows[2][4].split() == ["100", "21"]
        assert lines[-1] == "checked 4: 1 missing, 1 different; 0 not checked (errors)"
        assert "a.txt" not in table.stdout and "big.bin" not in table.stdout

        code, doc = audit_json(sp)
        assert code == 1
        assert found(doc) == [
            ("p1", bucket, "b.txt", "missing", []),
            ("p1", bucket, "dir/c.txt", "different", ["size", "etag"]),
        ]
        missing = doc["findings"][0]
        assert missing["found"] is None and missing["recorded"]["size"] == 100
        assert missing["completed_file"] == str(sp.path("completed", "p1", bucket, "b.txt"))
        assert doc["counts"] == {"checked": 4, "missing": 1, "different": 1, "errors": 0}
        assert doc["errors"] == []
        assert still(sp) == before
    finally:
        sp.close()


def test_audit_notices_a_checksum_that_differs(
    tmp_path: Path, s3: LocalS3, bucket: str, client: Any
) -> None:
    """An object replaced by one of the same size whose crc32 differs from the record's is
    reported as differing in ETag and checksum, recorded and found values side by side."""
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1") + "checksum = crc32\n"})
    try:
        upload(sp, {("p1", bucket, "big.bin"): os.urandom(BIG)}, "--multipart-threshold", "1")
        [record] = sp.records("big.bin")
        other = os.urandom(BIG)
        client.put_object(Bucket=bucket, Key="big.bin", Body=other, ChecksumAlgorithm="CRC32")
        code, doc = audit_json(sp)
        assert code == 1
        assert found(doc) == [("p1", bucket, "big.bin", "different", ["etag", "checksum"])]
        [finding] = doc["findings"]
        assert finding["recorded"]["checksum"] == record["checksum"]
        assert finding["found"]["checksum"].startswith("crc32:")
        assert finding["found"]["checksum"] != record["checksum"]
    finally:
        sp.close()


def test_audit_filters_by_since_profile_and_bucket_and_a_clean_bucket_exits_0(
    tmp_path: Path, s3: LocalS3, bucket: str, client: Any
) -> None:
    """--since leaves out older completions, --profile and --bucket other profiles' and
    buckets' objects; a selection with nothing missing or different exits 0."""
    other, clean = new_bucket(s3), new_bucket(s3)
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1"), "p2": s3.credentials_ini("p2")})
    try:
        upload(
            sp,
            {
                ("p1", bucket, "old.txt"): b"old",
                ("p1", bucket, "new.txt"): b"new",
                ("p2", other, "x.txt"): b"x",
                ("p1", clean, "y.txt"): b"y",
            },
        )
        # The test's own arrangement: old.txt completed two hours ago.
        con = sqlite3.connect(sp.db)
        with con:
            con.execute(
                "UPDATE file_records SET last_updated = datetime('now', '-2 hours')"
                " WHERE filepath = 'old.txt'"
            )
        con.close()
        client.delete_object(Bucket=bucket, Key="old.txt")
        client.delete_object(Bucket=other, Key="x.txt")

        assert found(audit_json(sp)[1]) == [
            ("p1", bucket, "old.txt", "missing", []),
            ("p2", other, "x.txt", "missing", []),
        ]
        code, recent = audit_json(sp, "--since", "1h")
        assert code == 1 and found(recent) == [("p2", other, "x.txt", "missing", [])]
        assert recent["counts"]["checked"] == 3
        assert found(audit_json(sp, "--profile", "p1")[1]) == [
            ("p1", bucket, "old.txt", "missing", [])
        ]
        assert found(audit_json(sp, "--bucket", other)[1]) == [
            ("p2", other, "x.txt", "missing", [])
        ]
        for args in (("--bucket", clean), ("--profile", "p1", "--since", "1h")):
            result = audit(sp, *args)
            assert result.returncode == 0, (args, result.stdout, result.stderr)
            assert result.stdout.splitlines()[0] == "no object missing or different"
        assert audit(sp, "--bucket", clean).stdout.splitlines()[-1] == (
            "checked 1: 0 missing, 0 different; 0 not checked (errors)"
        )
    finally:
        sp.close()


def test_audit_counts_what_it_could_not_check_apart(
    tmp_path: Path, s3: LocalS3, bucket: str
) -> None:
    """HEADs denied (a key the server refuses) and HEADs to a server that refuses connections
    are not findings: they are listed apart and counted as not checked, exit 0; after 3
    connection failures in a row the profile's other objects are not tried."""
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1"), "p2": s3.credentials_ini("p2")})
    try:
        files = {("p1", bucket, f"denied/{i}"): b"d" for i in range(2)}
        files |= {("p2", bucket, f"down/{i}"): b"u" for i in range(5)}
        upload(sp, files)
        wrong = Identity("wrong", s3.admin.access_key, "x" * 40, s3.admin.actions)
        broken = tmp_path / "broken-credentials"
        broken.write_text(
            s3.credentials_ini("p1", wrong)
            + s3.credentials_ini("p2", endpoint=f"http://127.0.0.1:{closed_port()}")
        )
        broken.chmod(0o600)
        result = sp.run(
            "flood-audit", "--server-dir", str(sp.dir), "--credentials", str(broken), "--json"
        )
        assert result.returncode == 0, result.stdout + result.stderr
        doc = json.loads(result.stdout)
        assert doc["findings"] == []
        assert doc["counts"] == {"checked": 0, "missing": 0, "different": 0, "errors": 7}
        denied = [e for e in doc["errors"] if e["profile"] == "p1"]
        assert {(e["reason"], e["kind"]) for e in denied} == {("AccessDenied", "permissions")}
        down = [e for e in doc["errors"] if e["profile"] == "p2"]
        assert {e["kind"] for e in down} == {"network"} and len(down) == 5
        assert [e["error"].startswith("not checked: 3 HEADs") for e in down] == [
            False,
            False,
            False,
            True,
            True,
        ]
        table = sp.run("flood-audit", "--server-dir", str(sp.dir), "--credentials", str(broken))
        assert table.returncode == 0
        lines = table.stdout.splitlines()
        assert lines[0] == "no object missing or different" and lines[1] == "not checked:"
        assert f"  p1/{bucket}: 2 objects, AccessDenied (the last, denied/1: " in table.stdout
        assert f"  p2/{bucket}: 5 objects, " in table.stdout
        assert lines[-1] == "checked 0: 0 missing, 0 different; 7 not checked (errors)"
    finally:
        sp.close()


def test_audit_rate_paces_the_heads(tmp_path: Path, s3: LocalS3, bucket: str) -> None:
    """--rate 4/s spreads 8 HEADs over at least (8 - 1) / 4 seconds."""
    sp = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1")})
    try:
        upload(sp, {("p1", bucket, f"f{i}"): b"%d" % i for i in range(8)})
        started = time.monotonic()
        result = audit(sp, "--rate", "4/s")
        took = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.splitlines()[-1].startswith("checked 8: ")
        assert took >= (8 - 1) / 4
    finally:
        sp.close()


def test_audit_refuses_bad_usage_and_configuration(spool: Spool, bucket: str) -> None:
    """A pace or duration that is not one exits 2; an unknown profile or no records database
    exits 78, in one line each."""
    for args in (("--rate", "0/s"), ("--rate", "fast"), ("--since", "yesterday")):
        result = audit(spool, *args)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, args
    nodb = audit(spool)
    assert nodb.returncode == 78 and "no records database" in nodb.stderr
    assert not spool.db.exists()  # and it made none
    upload(spool, {("p1", bucket, "a"): b"a"})
    unknown = audit(spool, "--profile", "nope")
    assert unknown.returncode == 78 and "unknown profile 'nope'" in unknown.stderr


# -- the periodic audit --------------------------------------------------------------------------
def test_the_supervisor_audit_finds_a_deleted_object(
    spool: Spool, bucket: str, client: Any
) -> None:
    """With --audit-interval, the supervisor's audit of what completed since its last run logs
    object_missing for an object deleted meanwhile, audit_finished with the counts, and
    counts it in flood_audit_missing_total."""
    sup = spool.start("--audit-interval", "4s", "--metrics-port", "0", workers=1)
    wait_for(lambda: spool.events("metrics_serving"), 60, "the metrics server")
    port = int(spool.events("metrics_serving")[0]["flood"]["port"])
    # After a run, the next covers everything completed from then on: upload and delete now.
    wait_for(lambda: spool.events("audit_finished"), 60, "the first audit")
    spool.drop("p1", bucket, "kept.txt", b"kept")
    spool.drop("p1", bucket, "gone.txt", b"gone")
    spool.wait_done("p1", bucket, ["kept.txt", "gone.txt"])
    client.delete_object(Bucket=bucket, Key="gone.txt")
    [missing] = wait_for(lambda: spool.events("object_missing"), 60, "object_missing")
    assert (missing["flood"]["bucket"], missing["flood"]["key"]) == (bucket, "gone.txt")
    assert missing["log.level"] == "warning"
    counted = [e["flood"] for e in spool.events("audit_finished") if e["flood"]["checked"]]
    assert counted[0]["checked"] == 2 and counted[0]["missing"] == 1
    assert counted[0]["different"] == 0 and counted[0]["errors"] == 0
    where = (("bucket", bucket), ("profile", "p1"))
    values = scrape(port)
    assert values[("flood_audit_missing_total", where)] == 1
    assert values[("flood_audit_checked_total", where)] == 2
    assert values[("flood_audit_different_total", where)] == 0
    assert sup.terminate() == 0
