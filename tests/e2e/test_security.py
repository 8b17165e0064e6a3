"""Attacks planted in a real server dir: symlinks, special files, path tricks, leaked secrets."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from spool import Spool, object_bytes, object_keys, wait_for

pytestmark = pytest.mark.timeout(180)
SECRET_BYTES = b"root:$6$very-secret-hash-never-upload-me:19000:0:99999:7:::\n"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "shadow"
    path.write_bytes(SECRET_BYTES)
    path.chmod(0o600)
    return path


def all_object_bytes(client: Any, bucket: str) -> list[bytes]:
    return [object_bytes(client, bucket, k) for k in object_keys(client, bucket)]


def drained(spool: Spool) -> None:
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")


def test_symlink_to_a_secret_goes_to_failed_unfollowed(
    spool: Spool, bucket: str, client: Any, secret_file: Path
) -> None:
    """A symlink in incoming/ is moved, as a link, to failed/ with not_regular_file."""
    link = spool.path("incoming", "p1", bucket, "innocent.txt")
    link.parent.mkdir(parents=True)
    link.symlink_to(secret_file)
    spool.start()
    spool.drop("p1", bucket, "real.txt", b"real")
    spool.wait_done("p1", bucket, ["real.txt"])
    spool.wait_done("p1", bucket, ["innocent.txt"], state="failed")
    failed = spool.path("failed", "p1", bucket, "innocent.txt")
    assert failed.is_symlink() and os.readlink(failed) == str(secret_file)
    assert [r["reason"] for r in spool.records("innocent.txt")] == ["not_regular_file"]
    assert SECRET_BYTES not in b"".join(all_object_bytes(client, bucket))


def test_live_symlink_and_symlinked_directories_are_not_followed(
    spool: Spool, bucket: str, client: Any, secret_file: Path, tmp_path: Path
) -> None:
    """Links created while running (to a file, to a directory, to '..') upload nothing."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "loot.txt").write_bytes(SECRET_BYTES)
    spool.start()
    drained(spool)
    base = spool.path("incoming", "p1", bucket, "x").parent
    base.mkdir(parents=True, exist_ok=True)
    (base / "to-file").symlink_to(secret_file)
    (base / "to-dir").symlink_to(outside)
    (base / "up").symlink_to("..")
    spool.drop("p1", bucket, "canary.txt", b"canary")
    spool.wait_done("p1", bucket, ["canary.txt"])
    spool.wait_done("p1", bucket, ["to-file", "to-dir", "up"], state="failed")
    assert object_keys(client, bucket) == ["canary.txt"]
    assert (outside / "loot.txt").read_bytes() == SECRET_BYTES  # never moved or read


def test_symlinked_profile_directory_is_not_walked(
    spool: Spool, bucket: str, client: Any, tmp_path: Path
) -> None:
    """incoming/PROFILE -> elsewhere: nothing below it is uploaded or moved."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / bucket).mkdir(parents=True)
    (elsewhere / bucket / "loot.txt").write_bytes(SECRET_BYTES)
    (spool.dir / "incoming").mkdir()
    (spool.dir / "incoming" / "p1").symlink_to(elsewhere)
    sup = spool.start("--rescan-interval", "1")
    wait_for(lambda: len(spool.events("rescan_finished")) >= 2, 30, "two rescans")
    assert (elsewhere / bucket / "loot.txt").read_bytes() == SECRET_BYTES
    assert object_keys(client, bucket) == []
    assert sup.terminate() == 0


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_special_files_fail_without_hanging_the_uploader(
    spool: Spool, bucket: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FIFO, socket or device node goes to failed/ and the only uploader keeps going."""
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    spool.start(workers=1)
    drained(spool)
    path = spool.path("incoming", "p1", bucket, f"special-{kind}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        monkeypatch.chdir(path.parent)  # sun_path holds 108 bytes; a deep spool needs more
        sock.bind(path.name)
        sock.close()
    else:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    after = [f"after-{i}" for i in range(5)]
    for key in after:
        spool.drop("p1", bucket, key, key.encode())
    spool.wait_done("p1", bucket, after)
    spool.wait_done("p1", bucket, [f"special-{kind}"], state="failed")
    [row] = spool.records(f"special-{kind}")
    assert row["reason"] == "not_regular_file"


def test_bad_names_fail_with_a_reason_and_the_watcher_lives(
    spool: Spool, bucket: str, client: Any
) -> None:
    """Control characters and over-long keys go to failed/ with reasons; others still flow."""
    spool.start()
    drained(spool)
    spool.drop("p1", bucket, "tab\there.txt", b"t")
    deep = "/".join(["d" * 200] * 5) + "/" + "f" * 30  # over 1,024 bytes of key
    spool.drop("p1", bucket, deep, b"long")
    spool.drop("p1", bucket, "fine.txt", b"fine")
    spool.wait_done("p1", bucket, ["fine.txt"])
    spool.wait_done("p1", bucket, ["tab\there.txt", deep], state="failed")
    reasons = {r["filepath"]: r["reason"] for r in spool.records()}
    assert reasons["tab\there.txt"] == "invalid_key" and reasons[deep] == "key_too_long"
    assert object_keys(client, bucket) == ["fine.txt"]


def test_non_utf8_name_fails_and_the_watcher_lives(spool: Spool, bucket: str) -> None:
    """A file name that is not UTF-8 goes to failed/ (invalid_utf8); later files still flow."""
    spool.start()
    drained(spool)
    folder = spool.path("incoming", "p1", bucket, "x").parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = spool.path("incoming_tmp", "p1", bucket, "x").parent
    tmp.mkdir(parents=True, exist_ok=True)
    raw = os.fsencode(str(tmp)) + b"/bad\xff.txt"
    with open(raw, "wb") as handle:
        handle.write(b"bytes")
    os.rename(raw, os.fsencode(str(folder)) + b"/bad\xff.txt")
    spool.drop("p1", bucket, "later.txt", b"later")
    spool.wait_done("p1", bucket, ["later.txt"])
    failed = os.fsencode(str(spool.dir / "failed" / "p1" / bucket)) + b"/bad\xff.txt"
    wait_for(lambda: os.path.lexists(failed), 60, "the undecodable name in failed/")
    assert [r["reason"] for r in spool.records() if r["reason"]] == ["invalid_utf8"]


def test_hard_links_follow_the_kernel_rule(spool: Spool, bucket: str, tmp_path: Path) -> None:
    """A hard-linked file uploads only where fs.protected_hardlinks already guards links."""
    original = tmp_path / "original.txt"
    original.write_bytes(b"linked")
    spool.start()
    drained(spool)
    target = spool.path("incoming", "p1", bucket, "linked.txt")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = spool.path("incoming_tmp", "p1", bucket, "linked.txt")
    staged.parent.mkdir(parents=True, exist_ok=True)
    os.link(original, staged)
    os.rename(staged, target)
    protected = Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    spool.wait_done("p1", bucket, ["linked.txt"], state="completed" if protected else "failed")
    if not protected:
        assert spool.records("linked.txt")[0]["reason"] == "hard_link"


def test_no_secret_in_logs_db_help_or_errors(spool: Spool, bucket: str, s3: Any) -> None:
    """At DEBUG, no log line, no db byte, no --help or error text holds the secret or a
    request signature."""
    secret = s3.admin.secret_key
    sup = spool.start("--log-level", "DEBUG")
    spool.drop("p1", bucket, "a.txt", b"a")
    spool.drop("p1", bucket, "big.bin", os.urandom(6 * 1024 * 1024))
    spool.drop("p1", f"missing-{bucket}", "held.txt", b"h")
    spool.wait_done("p1", bucket, ["a.txt", "big.bin"], timeout=90)
    assert sup.terminate() == 0
    text = spool.log.read_text()
    assert spool.log_lines()
    for needle in (secret, "Authorization", "AWS4-HMAC-SHA256", "Signature="):
        assert needle not in text
    assert secret.encode() not in spool.db.read_bytes()
    helptext = spool.run("flood-supervisor", "--help").stdout
    assert secret not in helptext
    spool.credentials.write_text(
        s3.credentials_ini("p1").replace("provider = amazon", "provider = nope")
    )
    refused = spool.run("flood-supervisor", "--credentials", str(spool.credentials), str(spool.dir))
    assert refused.returncode == 78 and secret not in refused.stderr + refused.stdout


def test_loose_credentials_file_warns_or_is_refused(spool: Spool, bucket: str) -> None:
    """A 0644 credentials file is warned about; with --strict-permissions it is refused."""
    spool.credentials.chmod(0o644)
    strict = spool.run(
        "flood-supervisor",
        "--credentials",
        str(spool.credentials),
        "--strict-permissions",
        str(spool.dir),
    )
    assert strict.returncode == 78 and "mode 644" in strict.stderr
    assert not (spool.dir / "incoming").exists()
    spool.start()
    wait_for(lambda: spool.events("credentials_file_exposed"), 30, "the warning")
    assert spool.events("credentials_file_exposed")[0]["log.level"] == "warning"


def test_created_files_and_directories_are_not_open_to_all(spool: Spool, bucket: str) -> None:
    """Directories Flood creates are not world-writable; db and log are 0600/0640 at most."""
    sup = spool.start("--log-file", str(spool.root / "own.log"))
    spool.drop("p1", bucket, "m.txt", b"m")
    spool.wait_done("p1", bucket, ["m.txt"])
    assert sup.terminate() == 0
    for path in [spool.dir / s for s in ("incoming", "processing", "completed", "failed")] + [
        spool.dir / "completed" / "p1" / bucket
    ]:
        assert not path.stat().st_mode & stat.S_IWOTH, path
    assert stat.S_IMODE(spool.db.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((spool.root / "own.log").stat().st_mode) & 0o037 == 0
