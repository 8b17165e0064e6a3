"""What users set on objects and what is left on disk, end to end: object options from every
level of the config file and from flood-copy on the stored objects (SeaweedFS; moto for the
canned ACL and SSE-KMS it keeps), the config file's checks, the spool's lifecycle, hooks and
failure injection."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from faultproxy import FaultProxy
from motoserver import MotoServer
from spool import Spool, Supervisor, new_bucket, object_bytes, wait_for

from flood.testing.localserver import LocalS3

pytestmark = pytest.mark.timeout(180)
MiB = 1024 * 1024
FAST = ("--retry-base", "0.2", "--recheck-interval", "1")


# -- helpers -----------------------------------------------------------------------------------
def write_config(spool: Spool, text: str, name: str = "flood.toml", mode: int = 0o644) -> Path:
    path = spool.root / name
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def started(spool: Spool, *args: str, count: int = 1, **env: str) -> Any:
    sup = spool.start(*args, env=spool.env(**env))
    wait_for(lambda: len(spool.events("startup_drain_queued")) >= count, 60, "the start-up drain")
    return sup


def copy(spool: Spool, *args: str) -> Any:
    return spool.run(
        "flood-copy",
        "--server-dir",
        str(spool.dir),
        "--credentials",
        str(spool.credentials),
        *args,
    )


def head(client: Any, bucket: str, key: str) -> dict[str, Any]:
    found = client.head_object(Bucket=bucket, Key=key)
    found.pop("ResponseMetadata")
    return found  # type: ignore[no-any-return]


def tags(client: Any, bucket: str, key: str) -> dict[str, str]:
    found = client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    return {t["Key"]: t["Value"] for t in found}


def recorded_options(spool: Spool, key: str) -> dict[str, Any]:
    [row] = [r for r in spool.records(key) if r["current_state"] == "completed"]
    return json.loads(row["options"])  # type: ignore[no-any-return]


def hook_script(spool: Spool, name: str, body: str) -> Path:
    """An executable Python hook: `body` runs with `receipt` (stdin's JSON) and `state`, a
    directory of its own to count calls in."""
    path = spool.root / name
    state = spool.root / f"{name}.state"
    state.mkdir()
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        "from pathlib import Path\n"
        f"state = Path({str(state)!r})\n"
        "receipt = json.load(sys.stdin)\n" + textwrap.dedent(body)
    )
    path.chmod(0o755)
    return path


# -- object options ----------------------------------------------------------------------------
LEVELS = """\
    [upload]
    cache_control = "max-age=60"
    metadata = {{ origin = "everywhere", team = "everywhere" }}
    tags = {{ level = "everywhere" }}

    [profiles.p1.upload]
    storage_class = "STANDARD_IA"
    metadata = {{ team = "profile" }}

    [buckets."p1/{bucket}".upload]
    content_disposition = "inline"
    tags = {{ bucket = "yes" }}

    [[rules]]
    match = "p1/{bucket}/logs/**/*.log"
    upload = {{ content_type = "text/plain", content_encoding = "gzip", tags = {{ kind = "log" }} }}

    [[rules]]
    match = "p1/{bucket}/logs/special.log"
    upload = {{ cache_control = "no-store", tags = {{ kind = "special" }} }}

    [[rules]]
    match = "p1/{bucket}/raw/*"
    upload = {{ content_type = "none" }}
    """


@pytest.mark.parametrize("path", ["lean", "boto3"])
def test_each_level_of_options_lands_on_the_stored_object(
    recorded: tuple[Spool, FaultProxy], s3: LocalS3, client: Any, path: str, tmp_path: Path
) -> None:
    """[upload], the profile's, the bucket's, the rules in file order and flood-copy's own,
    each overriding only the keys it sets, metadata and tags merged key by key: seen on each
    stored object (HEAD and its tagging), single PUT and multipart, on both PUT paths; the
    options used are in the record and in flood-status why."""
    spool, recorder = recorded
    bucket = new_bucket(s3)
    conf = write_config(spool, LEVELS.format(bucket=bucket))
    args = ["--config", str(conf), "--multipart-threshold", "6", "--part-size", "5", *FAST]
    if path == "boto3":
        args.append("--boto3-put")
    started(spool, *args)
    spool.drop("p1", bucket, "site/index.html", b"<p>hello</p>")
    spool.drop("p1", bucket, "data.flood-unknown-ext", b"?")
    spool.drop("p1", bucket, "logs/app/a.log", b"log line\n")
    spool.drop("p1", bucket, "logs/special.log", b"special\n")
    spool.drop("p1", bucket, "raw/page.html", b"<p>raw</p>")
    big = os.urandom(7 * MiB)
    spool.drop("p1", bucket, "logs/big/huge.log", big)
    src = tmp_path / "report.csv"
    src.write_bytes(b"a,b\n1,2\n")
    result = copy(
        spool,
        "--content-type",
        "text/x-report",
        "--metadata",
        "origin=file",
        "--tag",
        "level=file",
        "--storage-class",
        "STANDARD",
        str(src),
        f"s3://p1/{bucket}/logs/report.csv",
    )
    assert result.returncode == 0, result.stderr
    keys = [
        "site/index.html",
        "data.flood-unknown-ext",
        "logs/app/a.log",
        "logs/special.log",
        "raw/page.html",
        "logs/big/huge.log",
        "logs/report.csv",
    ]
    spool.wait_done("p1", bucket, keys, timeout=90)

    html = head(client, bucket, "site/index.html")
    assert html["ContentType"] == "text/html"  # content_type "auto", from the name
    assert html["CacheControl"] == "max-age=60"
    assert html["ContentDisposition"] == "inline"
    assert html["StorageClass"] == "STANDARD_IA"
    assert html["Metadata"] == {"origin": "everywhere", "team": "profile"}
    assert tags(client, bucket, "site/index.html") == {"level": "everywhere", "bucket": "yes"}

    # "auto" with a name mimetypes does not know: no Content-Type sent (SeaweedFS then sniffs
    # one from the bytes, as R2 does)
    assert sent_content_type(recorder, bucket, "data.flood-unknown-ext") is None
    assert "content_type" not in recorded_options(spool, "data.flood-unknown-ext")

    log = head(client, bucket, "logs/app/a.log")
    assert (log["ContentType"], log["ContentEncoding"]) == ("text/plain", "gzip")
    assert log["CacheControl"] == "max-age=60"
    assert tags(client, bucket, "logs/app/a.log") == {
        "level": "everywhere",
        "bucket": "yes",
        "kind": "log",
    }
    special = head(client, bucket, "logs/special.log")  # both rules; the later one wins
    assert special["CacheControl"] == "no-store" and special["ContentType"] == "text/plain"
    assert tags(client, bucket, "logs/special.log")["kind"] == "special"

    # "none": never sent, though .html is known
    assert sent_content_type(recorder, bucket, "raw/page.html") is None
    assert sent_content_type(recorder, bucket, "site/index.html") == "text/html"

    huge = head(client, bucket, "logs/big/huge.log")  # CreateMultipartUpload carries them
    assert huge["ETag"].strip('"').endswith("-2")
    assert (huge["ContentType"], huge["ContentEncoding"]) == ("text/plain", "gzip")
    assert huge["StorageClass"] == "STANDARD_IA"
    assert huge["Metadata"] == {"origin": "everywhere", "team": "profile"}
    assert tags(client, bucket, "logs/big/huge.log")["kind"] == "log"
    assert object_bytes(client, bucket, "logs/big/huge.log") == big

    report = head(client, bucket, "logs/report.csv")  # flood-copy's own win over everything
    assert report["ContentType"] == "text/x-report"
    assert report["Metadata"] == {"origin": "file", "team": "profile"}
    assert report.get("StorageClass", "STANDARD") == "STANDARD"
    assert tags(client, bucket, "logs/report.csv") == {"level": "file", "bucket": "yes"}

    assert recorded_options(spool, "logs/special.log") == {
        "cache_control": "no-store",
        "content_disposition": "inline",
        "content_encoding": "gzip",
        "content_type": "text/plain",
        "metadata": {"origin": "everywhere", "team": "profile"},
        "storage_class": "STANDARD_IA",
        "tags": {"bucket": "yes", "kind": "special", "level": "everywhere"},
    }
    why = spool.run("flood-status", "--server-dir", str(spool.dir), "why", "logs/report.csv")
    assert why.returncode == 0, why.stderr
    assert "options: " in why.stdout and "content_type=text/x-report" in why.stdout, why.stdout
    assert "metadata={origin=file, team=profile}" in why.stdout, why.stdout


@pytest.fixture
def recorded(tmp_path: Path, s3: LocalS3) -> Iterator[tuple[Spool, FaultProxy]]:
    """A spool whose profile p1 reaches the server through a relay that records each request
    head (for what the server does not store as sent)."""
    with FaultProxy("127.0.0.1", s3.port, record=True) as recorder:
        spool = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1", endpoint=recorder.endpoint)})
        yield spool, recorder
        spool.close()


def sent_content_type(recorder: FaultProxy, bucket: str, key: str) -> str | None:
    """The Content-Type of the one PUT of `key` the relay saw."""
    [put] = [
        h
        for h in recorder.received
        if h.method == "PUT" and h.target.split("?")[0] == f"/{bucket}/{key}"
    ]
    return put.header("Content-Type")


def moto_spool(tmp_path: Path, moto: MotoServer, s3: LocalS3) -> tuple[Spool, Any]:
    ini = (
        "[m1]\nprovider = amazon\n"
        f"aws_access_key_id = {moto.admin.access_key}\n"
        f"aws_secret_access_key = {moto.admin.secret_key}\n"
        f"aws_region = us-east-1\naws_endpoint = {moto.endpoint}\n"
    )
    client = boto3.client(
        "s3",
        endpoint_url=moto.endpoint,
        aws_access_key_id=moto.admin.access_key,
        aws_secret_access_key=moto.admin.secret_key,
        region_name="us-east-1",
    )
    return Spool(tmp_path, s3, {"m1": ini}), client


@pytest.fixture
def on_moto(tmp_path: Path, moto: MotoServer, s3: LocalS3) -> Iterator[tuple[Spool, Any]]:
    spool, client = moto_spool(tmp_path, moto, s3)
    yield spool, client
    spool.close()


@pytest.mark.parametrize("path", ["lean", "boto3"])
def test_canned_acl_and_sse_kms_are_kept_by_the_second_implementation(
    on_moto: tuple[Spool, Any], path: str
) -> None:
    """SeaweedFS keeps no canned ACL and answers SSE-KMS with an error; moto keeps both: the
    object's grants show public-read, its HEAD aws:kms with the key; single PUT and parts."""
    spool, client = on_moto
    bucket = f"kms-{path}-{os.getpid()}"
    client.create_bucket(Bucket=bucket)
    conf = write_config(
        spool,
        f"""\
        [buckets."m1/{bucket}".upload]
        acl = "public-read"
        sse = "aws:kms"
        sse_kms_key_id = "alias/flood-test"
        """,
    )
    args = ["--config", str(conf), "--multipart-threshold", "6", "--part-size", "5", *FAST]
    if path == "boto3":
        args.append("--boto3-put")
    started(spool, *args)
    spool.drop("m1", bucket, "small.txt", b"secret-ish")
    spool.drop("m1", bucket, "large.bin", os.urandom(6 * MiB))
    spool.wait_done("m1", bucket, ["small.txt", "large.bin"], timeout=90)
    for key in ("small.txt", "large.bin"):
        found = head(client, bucket, key)
        assert (found["ServerSideEncryption"], found["SSEKMSKeyId"]) == (
            "aws:kms",
            "alias/flood-test",
        ), key
        grants = client.get_object_acl(Bucket=bucket, Key=key)["Grants"]
        public = [g for g in grants if g["Grantee"].get("URI", "").endswith("/AllUsers")]
        assert [g["Permission"] for g in public] == ["READ"], (key, grants)


def test_sse_s3_is_kept(spool: Spool, s3: LocalS3, client: Any, bucket: str) -> None:
    """sse = "AES256" is on the stored object's HEAD."""
    conf = write_config(spool, '[upload]\nsse = "AES256"\n')
    started(spool, "--config", str(conf))
    spool.drop("p1", bucket, "enc.txt", b"x")
    spool.wait_done("p1", bucket, ["enc.txt"])
    assert head(client, bucket, "enc.txt")["ServerSideEncryption"] == "AES256"


def test_a_files_own_options_survive_kill9_between_queueing_and_upload(
    spool: Spool, client: Any, bucket: str, tmp_path: Path
) -> None:
    """flood-copy's options ride on the file (an extended attribute): the whole tree killed
    with -9 right after an uploader claimed it, the restarted supervisor uploads the object
    with those options."""
    src = tmp_path / "note.bin"
    src.write_bytes(b"payload")
    result = copy(
        spool,
        "--content-type",
        "application/x-note",
        "--cache-control",
        "private",
        "--metadata",
        "who=copy",
        "--tag",
        "t=1",
        str(src),
        f"s3://p1/{bucket}/note.bin",
    )
    assert result.returncode == 0, result.stderr
    env = dict(
        FLOOD_CRASH_AT="after_claim",
        FLOOD_CRASH_TARGET="supervisor",
        FLOOD_CRASH_ONCE=str(spool.root / "crashed"),
    )
    spool.start(env=spool.env(**env))
    wait_for(lambda: (spool.root / "crashed").exists(), 60, "the crash after the claim")
    assert spool.where("p1", bucket, "note.bin") == ["processing"]
    started(spool, count=1, **env)
    spool.wait_done("p1", bucket, ["note.bin"])
    found = head(client, bucket, "note.bin")
    assert (found["ContentType"], found["CacheControl"]) == ("application/x-note", "private")
    assert found["Metadata"] == {"who": "copy"}
    assert tags(client, bucket, "note.bin") == {"t": "1"}


def test_sighup_rereads_the_object_options(spool: Spool, client: Any, bucket: str) -> None:
    """The config file changed and SIGHUP: files queued after the reload get the new options."""
    conf = write_config(spool, '[upload]\ncache_control = "max-age=1"\n')
    sup = started(spool, "--config", str(conf))
    spool.drop("p1", bucket, "before.txt", b"1")
    spool.wait_done("p1", bucket, ["before.txt"])
    conf.write_text('[upload]\ncache_control = "max-age=2"\n')
    os.kill(sup.pid, signal.SIGHUP)
    wait_for(lambda: len(spool.events("children_started")) >= 2, 60, "the reload")
    spool.drop("p1", bucket, "after.txt", b"2")
    spool.wait_done("p1", bucket, ["after.txt"])
    assert head(client, bucket, "before.txt")["CacheControl"] == "max-age=1"
    assert head(client, bucket, "after.txt")["CacheControl"] == "max-age=2"


# -- the config file: bad input ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[upload\n", "is not TOML"),
        ("[uplaod]\ncache_control = 'x'\n", "unknown table 'uplaod' (did you mean upload?)"),
        ("[upload]\ncache_contrl = 'x'\n", "unknown option cache_contrl"),
        ("[supervisor]\nworkres = 2\n", "unknown key 'workres' in [supervisor] (did you mean"),
        ("[supervisor]\nworkers = 'many'\n", "[supervisor] workers"),
        ("[upload]\nmetadata = 'x'\n", "metadata must be a table of strings"),
        ("[upload]\nstorage_class = 'GLACIER_INSTANT'\n", "storage_class 'GLACIER_INSTANT'"),
        ("[upload]\nacl = 'world-writable'\n", "acl 'world-writable' is not a canned ACL"),
        ("[upload]\nsse_kms_key_id = 'k'\n", 'sse_kms_key_id needs sse = "aws:kms"'),
        ("[lifecycle]\nkeep_completed = '7 weeks'\n", "keep_completed"),
        ("[lifecycle]\non_success = 'remove'\n", 'on_success must be "keep" or "delete"'),
        ("[[rules]]\nmatch = 'nobody/b/**'\n", "names no profile of the credentials file"),
        ("[[rules]]\nmatch = 'p1'\n", 'match must be "PROFILE/BUCKET/GLOB"'),
        ("[profiles.p2.upload]\nacl = 'private'\n", "no profile 'p2' in the credentials file"),
        ("[hooks]\non_complete = ['notify']\n", "'notify' is not an absolute path"),
        ("[hooks]\non_complete = ['/nonexistent/notify']\n", "/nonexistent/notify"),
        ("[hooks]\nhook_timeout = 'soon'\n", "hook_timeout"),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_78_touching_nothing(
    spool: Spool, bucket: str, text: str, expected: str
) -> None:
    """Each problem: exit 78, one line naming the file and what is wrong, nothing created."""
    conf = write_config(spool, text)
    before = sorted(os.listdir(spool.dir))
    result = spool.run(
        "flood-supervisor", "--credentials", str(spool.credentials), "--config", str(conf),
        str(spool.dir),
    )  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(conf) in result.stderr and expected in result.stderr, result.stderr
    assert sorted(os.listdir(spool.dir)) == before
    assert not spool.db.exists()


def test_the_config_file_may_come_from_the_environment(spool: Spool) -> None:
    """$FLOOD_CONFIG stands for --config (here with a typo, so it is seen being read)."""
    conf = write_config(spool, "[lifecycle]\nkeep_complete = '1d'\n")
    result = spool.run(
        "flood-supervisor",
        "--credentials",
        str(spool.credentials),
        str(spool.dir),
        env=spool.env(FLOOD_CONFIG=str(conf)),
    )
    assert result.returncode == 78
    assert "unknown key in [lifecycle] 'keep_complete' (did you mean keep_completed?)" in (
        result.stderr
    )


@pytest.mark.parametrize("mode", [0o664, 0o646])
def test_a_config_file_others_may_write_is_refused(spool: Spool, mode: int) -> None:
    """Hooks run with the daemon's rights: a group- or world-writable config is refused."""
    conf = write_config(spool, "[upload]\n", mode=mode)
    result = spool.run(
        "flood-supervisor", "--credentials", str(spool.credentials), "--config", str(conf),
        str(spool.dir),
    )  # fmt: skip
    assert result.returncode == 78
    assert result.stderr.strip() == (
        f"flood-supervisor: config file {conf} may be written by group or others (mode "
        f"{mode:o}): chmod go-w it"
    )


def test_a_hook_others_may_write_is_refused(spool: Spool) -> None:
    hook = hook_script(spool, "loose-hook", "pass\n")
    hook.chmod(0o777)
    conf = write_config(spool, f'[hooks]\non_complete = ["{hook}"]\n')
    result = spool.run(
        "flood-supervisor", "--credentials", str(spool.credentials), "--config", str(conf),
        str(spool.dir),
    )  # fmt: skip
    assert result.returncode == 78
    assert f"{hook} may be written by group or others" in result.stderr


@pytest.mark.parametrize(
    ("provider", "text", "expected"),
    [
        ("cloudflare", "[upload]\nacl = 'public-read'\n", "acl 'public-read' not supported by"),
        ("cloudflare", "[upload]\nstorage_class = 'GLACIER'\n", "storage_class 'GLACIER'"),
        ("cloudflare", "[upload]\ntags = { a = 'b' }\n", "tags (tags) not supported"),
        ("backblaze", "[upload]\nsse = 'aws:kms'\n", "sse 'aws:kms' not supported by"),
        ("backblaze", "[[rules]]\nmatch = '*/b/**'\nupload = { storage_class = 'STANDARD_IA' }\n",
         "rule 1 (*/b/**): storage_class 'STANDARD_IA' not supported by backblaze"),
    ],
)  # fmt: skip
def test_options_a_provider_refuses_are_refused_at_start(
    tmp_path: Path, s3: LocalS3, provider: str, text: str, expected: str
) -> None:
    """One line naming the option, the profile and the provider; exit 78."""
    spool = Spool(tmp_path, s3, {"p1": s3.credentials_ini("p1", provider=provider)})
    conf = write_config(spool, text)
    result = spool.run(
        "flood-supervisor", "--credentials", str(spool.credentials), "--config", str(conf),
        str(spool.dir),
    )  # fmt: skip
    assert result.returncode == 78, result.stderr
    assert expected in result.stderr and "profile 'p1'" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_supervisor_table_sets_flags_and_the_command_line_wins(
    spool: Spool, bucket: str
) -> None:
    """[supervisor] gives the server dir and --workers 1 (dashes or underscores); --workers 3
    on the command line wins; --retry-base from the file is used."""
    conf = write_config(
        spool,
        f"""\
        [supervisor]
        server_dir = "{spool.dir}"
        workers = 1
        retry-base = "0.5"
        credentials = "{spool.credentials}"
        """,
    )
    # Not spool.start(), which passes SERVER_DIR and --workers itself.
    proc = Supervisor(["--config", str(conf), "--workers", "3"], spool.env(), spool.log)
    spool.supervisors.append(proc)
    wait_for(lambda: spool.events("startup_drain_queued"), 60, "the start-up drain")
    [started_children] = spool.events("children_started")[:1]
    assert len(started_children["flood"]["pids"]) == 3 + 1  # three uploaders and the watcher
    spool.drop("p1", bucket, "x.txt", b"x")
    spool.wait_done("p1", bucket, ["x.txt"])


# -- flood-copy: bad options -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--metadata", "novalue"], "--metadata 'novalue' is not KEY=VALUE"),
        (["--metadata", "clé=v"], "key 'clé' is not an ASCII header name"),
        ([a for i in range(11) for a in ("--tag", f"k{i}=v")], "11 tags, S3 allows 10"),
        (["--tag", "k=" + "v" * 257], "outside S3's limits"),
        (["--tag", "k" * 129 + "=v"], "outside S3's limits"),
        (["--storage-class", "COLD"], "storage_class 'COLD' is not one of"),
        (["--acl", "everyone"], "acl 'everyone' is not a canned ACL"),
    ],
)
def test_flood_copy_refuses_bad_options_queueing_nothing(
    spool: Spool, bucket: str, tmp_path: Path, args: list[str], expected: str
) -> None:
    src = tmp_path / "f.txt"
    src.write_bytes(b"x")
    result = copy(spool, *args, str(src), f"s3://p1/{bucket}/f.txt")
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("flood-copy: ") and expected in result.stderr, result.stderr
    assert spool.files("incoming") == [] and spool.files("incoming_tmp") == []


def test_flood_copy_refuses_what_the_profiles_provider_does_not_support(
    tmp_path: Path, s3: LocalS3
) -> None:
    spool = Spool(tmp_path, s3, {"r2": s3.credentials_ini("r2", provider="cloudflare")})
    src = tmp_path / "f.txt"
    src.write_bytes(b"x")
    result = copy(spool, "--acl", "public-read", str(src), "s3://r2/bucket/f.txt")
    assert result.returncode != 0
    assert "acl 'public-read'" in result.stderr and "cloudflare" in result.stderr
    assert spool.files("incoming") == []


# -- the spool's lifecycle ---------------------------------------------------------------------
def test_delete_on_success_removes_the_file_after_its_record(
    spool: Spool, client: Any, bucket: str
) -> None:
    """on_success = "delete": the objects are up, the records completed, completed/ empty, and
    each removal recorded and logged. Other buckets keep theirs."""
    other = new_bucket(spool.s3)
    conf = write_config(spool, f'[buckets."p1/{bucket}".lifecycle]\non_success = "delete"\n')
    started(spool, "--config", str(conf))
    keys = [f"d/{i}.txt" for i in range(5)]
    for key in keys:
        spool.drop("p1", bucket, key, key.encode())
    spool.drop("p1", other, "kept.txt", b"kept")
    spool.wait_done("p1", other, ["kept.txt"])
    wait_for(lambda: len(spool.query("SELECT * FROM removals")) == 5, 60, "five recorded removals")
    assert [f for f in spool.files("completed") if f.startswith(f"p1/{bucket}/")] == []
    for key in keys:
        assert object_bytes(client, bucket, key) == key.encode()
        [row] = spool.records(key)
        assert row["current_state"] == "completed"
        assert spool.where("p1", bucket, key) == []
    assert spool.where("p1", other, "kept.txt") == ["completed"]
    removed = spool.events("file_removed")
    assert sorted(e["flood"]["key"] for e in removed) == keys
    assert {e["event"]["reason"] for e in removed} == {"on_success"}


def test_a_crash_between_the_record_and_the_unlink_is_finished_at_the_next_start(
    spool: Spool, client: Any, bucket: str
) -> None:
    """A kill -9 after the move to completed/ and before the unlink: the next start's sweep
    removes the file (its record says completed), never the other way round."""
    conf = write_config(spool, "[lifecycle]\non_success = 'delete'\n")
    env = dict(
        FLOOD_CRASH_AT="after_move_completed",
        FLOOD_CRASH_TARGET="supervisor",
        FLOOD_CRASH_ONCE=str(spool.root / "crashed"),
    )
    spool.start("--config", str(conf), env=spool.env(**env))
    spool.drop("p1", bucket, "c.txt", b"c")
    wait_for(lambda: (spool.root / "crashed").exists(), 60, "the crash after the move")
    assert spool.where("p1", bucket, "c.txt") == ["completed"]
    assert spool.records("c.txt")[0]["current_state"] == "completed"
    started(spool, "--config", str(conf), **env)
    wait_for(lambda: spool.where("p1", bucket, "c.txt") == [], 30, "the sweep's removal")
    [removal] = spool.query("SELECT * FROM removals")
    assert removal["reason"] == "on_success"
    assert object_bytes(client, bucket, "c.txt") == b"c"


def test_keep_completed_sweeps_old_files_and_nothing_else(
    spool: Spool, client: Any, bucket: str
) -> None:
    """keep_completed = "3s", swept every second: completed files go once older than that;
    files in failed/ and incoming/ (an ignored name) stay; each removal is recorded."""
    conf = write_config(spool, '[lifecycle]\nkeep_completed = "3s"\nsweep_interval = "1s"\n')
    failed = spool.path("failed", "p1", bucket, "bad.txt")
    failed.parent.mkdir(parents=True)
    failed.write_bytes(b"failed long ago")
    started(spool, "--config", str(conf))
    spool.drop("p1", bucket, "old.txt", b"old")
    spool.drop("p1", bucket, "skip.tmp", b"ignored")
    spool.wait_done("p1", bucket, ["old.txt"])
    done_at = time.monotonic()
    wait_for(lambda: spool.where("p1", bucket, "old.txt") == [], 30, "the retention sweep")
    assert time.monotonic() - done_at >= 2  # not at once: it waited for its age
    assert failed.exists()
    assert spool.where("p1", bucket, "skip.tmp") == ["incoming"]
    [removal] = spool.query("SELECT * FROM removals")
    assert removal["reason"] == "keep_completed" and removal["record_id"] is not None
    assert object_bytes(client, bucket, "old.txt") == b"old"


def test_transient_failures_are_requeued_up_to_the_limit_across_a_restart(
    spool: Spool, client: Any, bucket: str
) -> None:
    """Every attempt fails (injected, a transient error) with no retries: the file is sent
    back to incoming/ after a second, at most requeue_max = 2 times, counted across a restart,
    then stays in failed/. Without the injection a requeue completes it (a new linked
    record)."""
    conf = write_config(
        spool,
        '[lifecycle]\nrequeue_failed_after = "1s"\nrequeue_max = 2\nsweep_interval = "1s"\n',
    )
    args = ("--config", str(conf), "--max-retries", "0", "--inject-failures", "1")
    sup = started(spool, *args)
    spool.drop("p1", bucket, "flaky.txt", b"flaky")
    wait_for(lambda: len(spool.events("file_requeued")) >= 1, 60, "a first requeue")
    assert sup.terminate() == 0
    started(spool, *args, count=2)
    wait_for(lambda: len(spool.records("flaky.txt")) == 3, 60, "the third passage")
    spool.wait_done("p1", bucket, ["flaky.txt"], state="failed")
    time.sleep(3)  # three sweeps more: none requeues it
    rows = spool.records("flaky.txt")
    assert len(rows) == 3
    assert [r["current_state"] for r in rows] == ["failed"] * 3
    assert [r["requeued_from"] for r in rows] == [None, rows[0]["id"], rows[1]["id"]]
    assert {r["reason"] for r in rows} == {"injected"}
    assert spool.where("p1", bucket, "flaky.txt") == ["failed"]
    assert len(spool.events("file_requeued")) == 2
    spool.supervisors[-1].terminate()
    # The limit counts requeues of a chain; with the limit raised and no injection, it goes up.
    conf.write_text('[lifecycle]\nrequeue_failed_after = "1s"\nrequeue_max = 3\n')
    started(spool, "--config", str(conf), count=3)
    spool.wait_done("p1", bucket, ["flaky.txt"])
    assert object_bytes(client, bucket, "flaky.txt") == b"flaky"
    assert len(spool.records("flaky.txt")) == 4


# -- hooks -------------------------------------------------------------------------------------
def test_a_hook_that_fails_twice_is_delivered_at_least_once(spool: Spool, bucket: str) -> None:
    """on_complete fails twice for each file, then succeeds: retried with backoff, the receipt
    on stdin and FLOOD_* in the environment, hook_ran once per file, the delivery on record;
    on_failure runs for a file that failed."""
    hook = hook_script(
        spool,
        "notify",
        """\
        key = receipt["key"].replace("/", "_")
        tries = state / f"{key}.tries"
        n = int(tries.read_text()) + 1 if tries.exists() else 1
        tries.write_text(str(n))
        if n <= 2:
            sys.exit(f"failing on purpose, try {n}")
        env = {k: v for k, v in os.environ.items() if k.startswith("FLOOD_")}
        env.pop("FLOOD_DB", None)  # the test's own setting, passed through as any other
        for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            env[secret] = os.environ.get(secret, "absent")
        (state / f"{key}.json").write_text(json.dumps({"receipt": receipt, "env": env}))
        """,
    )
    failing = hook_script(
        spool,
        "on-failure",
        "(state / 'failed.json').write_text(json.dumps(receipt))\n",
    )
    conf = write_config(
        spool,
        f"""\
        [upload]
        metadata = {{ source = "hook-test" }}
        [hooks]
        on_complete = ["{hook}", "--quiet"]
        on_failure = ["{failing}"]
        hook_retries = 3
        """,
    )
    started(spool, "--config", str(conf), "--retry-base", "0.2", "--max-retries", "0",
            AWS_SESSION_TOKEN="daemon-token-not-for-hooks")  # fmt: skip
    spool.drop("p1", bucket, "a/one.txt", b"one")
    spool.drop("p1", bucket, "two.txt", b"two!")
    # A producer's own options, set on the file before its rename, that do not check.
    tmp = spool.path("incoming_tmp", "p1", bucket, "bad-options.txt")
    tmp.write_bytes(b"bad")
    os.setxattr(tmp, "user.flood.options", b'{"acl": "everyone"}')
    os.rename(tmp, spool.path("incoming", "p1", bucket, "bad-options.txt"))
    spool.wait_done("p1", bucket, ["a/one.txt", "two.txt"])
    spool.wait_done("p1", bucket, ["bad-options.txt"], state="failed")
    wait_for(lambda: len(spool.events("hook_ran")) == 3, 60, "three hooks delivered")
    failure = json.loads((spool.root / "on-failure.state" / "failed.json").read_text())
    assert (failure["event"], failure["key"], failure["reason"]) == (
        "failure", "bad-options.txt", "invalid_options",
    )  # fmt: skip
    assert "acl 'everyone' is not a canned ACL" in failure["error"]
    state = spool.root / "notify.state"
    seen = json.loads((state / "a_one.txt.json").read_text())
    r = seen["receipt"]
    assert set(r) == {
        "event", "profile", "bucket", "key", "size", "etag", "version_id", "checksum",
        "options", "reason", "error", "created", "ended", "record_id", "delivery",
    }  # fmt: skip
    assert (r["event"], r["profile"], r["bucket"], r["key"], r["size"]) == (
        "complete", "p1", bucket, "a/one.txt", 3,
    )  # fmt: skip
    assert r["etag"] == "f97c5d29941bfb1b2fdab0874906ab82"  # md5("one")
    assert r["options"]["metadata"] == {"source": "hook-test"}
    assert r["delivery"] == 3
    assert seen["env"] == {
        "FLOOD_EVENT": "complete",
        "FLOOD_PROFILE": "p1",
        "FLOOD_BUCKET": bucket,
        "FLOOD_KEY": "a/one.txt",
        "FLOOD_SIZE": "3",
        "FLOOD_ETAG": r["etag"],
        "AWS_SECRET_ACCESS_KEY": "absent",
        "AWS_SESSION_TOKEN": "absent",
    }
    retries = spool.events("hook_retry_scheduled")
    assert len(retries) == 4 and all("failing on purpose" in e["error"]["message"] for e in retries)
    deliveries = spool.query("SELECT * FROM deliveries ORDER BY id")
    assert sorted((d["event"], d["state"], d["attempts"]) for d in deliveries) == [
        ("complete", "done", 3),
        ("complete", "done", 3),
        ("failure", "done", 1),
    ]
    why = spool.run("flood-status", "--server-dir", str(spool.dir), "why", "two.txt")
    assert "hook on_complete: done after 3 attempts" in why.stdout, why.stdout


def test_hook_deliveries_survive_a_kill9_and_never_hold_uploads(spool: Spool, bucket: str) -> None:
    """A hook that takes 2 s per file: twelve files are all completed long before their hooks
    ran (uploads never wait for hooks); kill -9 of the whole tree with deliveries pending; the
    restarted supervisor delivers every one (at least once: none missing)."""
    hook = hook_script(
        spool,
        "slow",
        """\
        time.sleep(2)
        (state / (receipt["key"] + f".{os.getpid()}")).write_text("ran")
        """,
    )
    conf = write_config(spool, f'[hooks]\non_complete = ["{hook}"]\nhook_timeout = "20s"\n')
    sup = started(spool, "--config", str(conf))
    keys = [f"k{i}.txt" for i in range(12)]
    for key in keys:
        spool.drop("p1", bucket, key, key.encode())
    spool.wait_done("p1", bucket, keys, timeout=30)
    assert len(spool.events("hook_ran")) < 12  # the uploads did not wait for their hooks
    sup.kill9()
    pending = spool.query("SELECT COUNT(*) AS n FROM deliveries WHERE state = 'pending'")
    assert pending[0]["n"] >= 1
    started(spool, "--config", str(conf), count=2)
    wait_for(
        lambda: (
            spool.query("SELECT COUNT(*) AS n FROM deliveries WHERE state = 'done'")[0]["n"] == 12
        ),
        90,
        "every delivery done",
    )
    ran = {p.name.rsplit(".", 1)[0] for p in (spool.root / "slow.state").iterdir()}
    assert ran == set(keys)


def test_a_hook_that_never_succeeds_is_logged_and_the_file_stays_completed(
    spool: Spool, bucket: str
) -> None:
    """Timeouts count as failures: after hook_retries the delivery is failed and
    hook_failed logged; the file's own state never depends on it."""
    hook = hook_script(spool, "stuck", "time.sleep(30)\n")
    conf = write_config(
        spool, f'[hooks]\non_complete = ["{hook}"]\nhook_timeout = "1s"\nhook_retries = 1\n'
    )
    started(spool, "--config", str(conf), "--retry-base", "0.2")
    spool.drop("p1", bucket, "h.txt", b"h")
    spool.wait_done("p1", bucket, ["h.txt"])
    wait_for(lambda: spool.events("hook_failed"), 60, "hook_failed")
    [failed] = spool.events("hook_failed")
    assert "timed out after 1 s" in failed["error"]["message"]
    [delivery] = spool.query("SELECT * FROM deliveries")
    assert (delivery["state"], delivery["attempts"]) == ("failed", 2)
    assert spool.where("p1", bucket, "h.txt") == ["completed"]


# -- failure injection -------------------------------------------------------------------------
def test_injected_failures_at_a_rate_are_retried_and_never_hold_the_profile(
    spool: Spool, client: Any, bucket: str
) -> None:
    """--inject-failures 0.5: about half of the attempts fail before any request, each logged
    and each retry's on record (its retry_attempts row) with `injected` in its error; every
    file still completes; no outage hold; the start-up warns."""
    started(spool, "--inject-failures", "0.5", "--retry-base", "0.05", "--max-retries", "30",
            "--recheck-interval", "1")  # fmt: skip
    keys = [f"i/{n}.txt" for n in range(40)]
    for key in keys:
        spool.drop("p1", bucket, key, key.encode())
    spool.wait_done("p1", bucket, keys, timeout=120)
    [warning] = spool.events("failure_injection_on")
    assert warning["log.level"] == "warning"
    rows = spool.query("SELECT * FROM retry_attempts")
    failures = [r for r in rows if r["outcome"] == "failure"]
    assert all("injected by --inject-failures 0.5" in r["error"] for r in failures)
    assert all(r["error"] is None for r in rows if r["outcome"] == "success")
    # Each file with retries failed its first upload too (that one is not a retry: the log
    # has it, as it has every failed attempt).
    failed_attempts = len(failures) + len({r["file_record_id"] for r in rows})
    logged = spool.events("upload_retry_scheduled")
    assert failed_attempts == len(logged)
    assert all(e["event"]["reason"] == "injected" for e in logged)
    assert 8 <= failed_attempts <= 120, failed_attempts  # 40 expected; far tails excluded
    assert spool.events("profile_paused") == [] and spool.events("bucket_paused") == []
    for key in keys:
        assert object_bytes(client, bucket, key) == key.encode()


def test_injection_is_a_config_file_setting_too(spool: Spool, bucket: str) -> None:
    conf = write_config(spool, "[supervisor]\ninject_failures = 1\nmax_retries = 0\n")
    started(spool, "--config", str(conf))
    spool.drop("p1", bucket, "always.txt", b"x")
    spool.wait_done("p1", bucket, ["always.txt"], state="failed")
    [row] = spool.records("always.txt")
    assert row["reason"] == "injected" and "no request was sent" in row["error"]
    assert stat.S_ISREG(os.stat(spool.path("failed", "p1", bucket, "always.txt")).st_mode)
