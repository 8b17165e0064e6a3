"""The embedded SeaweedFS server: lifecycle, authentication answers, restarts, capacity."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from botocore.exceptions import ClientError  # noqa: E402 - after the sys.path insertion

from flood.testing.localserver import (  # noqa: E402 - after the sys.path insertion
    ADMIN_ACTIONS,
    READONLY_ACTIONS,
    Identity,
    LocalS3,
    find_weed,
    random_identity,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """One server shared by the tests that do not stop or restart it."""
    with LocalS3(tmp_path_factory.mktemp("localserver")) as s3:
        yield s3


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[LocalS3]:
    """A server of the test's own, for tests that stop or restart it."""
    with LocalS3(tmp_path / "s3") as s3:
        yield s3


def fresh_bucket(s3: LocalS3) -> str:
    """Create a uniquely named bucket and return its name."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name)
    return name


def error_code(call: Any, **kwargs: Any) -> str:
    """The S3 error code that `call(**kwargs)` answers with."""
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    return str(info.value.response["Error"]["Code"])


def process_alive(pid: int) -> bool:
    """Whether a process with this pid still exists and is not a zombie."""
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip().startswith("Z")


def test_identity_repr_hides_secret() -> None:
    """An identity's repr shows its name and access key but never its secret."""
    ident = random_identity("flood", ADMIN_ACTIONS)
    assert ident.access_key.startswith("AK") and len(ident.access_key) == 20
    assert ident.access_key.isupper() and ident.access_key.isalnum()
    assert len(ident.secret_key) == 40
    assert ident.secret_key not in repr(ident) and ident.access_key in repr(ident)
    assert ident.secret_key not in str(ident)


def test_find_weed_prefers_the_interpreter_bin() -> None:
    """The weed binary is found beside the running interpreter (the venv's bin/)."""
    assert Path(find_weed()).parent == Path(sys.executable).parent


def test_needs_an_admin_identity(tmp_path: Path) -> None:
    """A server without any Admin identity is rejected before anything starts."""
    with pytest.raises(ValueError, match="Admin"):
        LocalS3(tmp_path, [random_identity("ro", READONLY_ACTIONS)])


def test_default_identities_and_private_config(server: LocalS3) -> None:
    """The default server has an admin and a read-only identity, in a config file of mode 0600."""
    assert server.admin.name == "flood" and "Admin" in server.admin.actions
    assert server.readonly is not None and server.readonly.actions == READONLY_ACTIONS
    assert stat.S_IMODE(os.stat(server.config_path).st_mode) == 0o600
    assert server.endpoint == f"http://127.0.0.1:{server.port}"


def test_put_and_get_object(server: LocalS3) -> None:
    """An object put into a new bucket comes back byte for byte."""
    bucket = fresh_bucket(server)
    client = server.client()
    client.put_object(Bucket=bucket, Key="a/b.txt", Body=b"hello flood")
    assert client.get_object(Bucket=bucket, Key="a/b.txt")["Body"].read() == b"hello flood"
    assert bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]


def test_wrong_secret_is_signature_mismatch(server: LocalS3) -> None:
    """A request signed with a wrong secret is answered SignatureDoesNotMatch."""
    bucket = fresh_bucket(server)
    wrong = Identity("flood", server.admin.access_key, "x" * 40, ADMIN_ACTIONS)
    client = server.client(wrong)
    code = error_code(client.put_object, Bucket=bucket, Key="k", Body=b"1")
    assert code == "SignatureDoesNotMatch"


def test_readonly_identity_cannot_put(server: LocalS3) -> None:
    """The read-only identity may read but its PutObject is AccessDenied."""
    bucket = fresh_bucket(server)
    server.client().put_object(Bucket=bucket, Key="k", Body=b"1")
    readonly = server.client(server.readonly)
    assert readonly.get_object(Bucket=bucket, Key="k")["Body"].read() == b"1"
    assert error_code(readonly.put_object, Bucket=bucket, Key="k2", Body=b"2") == "AccessDenied"


def test_missing_bucket_is_not_created(server: LocalS3) -> None:
    """A PUT into a missing bucket is NoSuchBucket, even for the admin (no auto-create)."""
    client = server.client()
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    assert error_code(client.put_object, Bucket=missing, Key="k", Body=b"1") == "NoSuchBucket"
    assert error_code(client.head_bucket, Bucket=missing) == "404"


def test_credentials_ini(server: LocalS3) -> None:
    """The INI section names the profile, provider, key pair, region and endpoint."""
    text = server.credentials_ini("p1", server.readonly, provider="wasabi", endpoint="http://x:1")
    assert server.readonly is not None
    assert text == (
        "[p1]\nprovider = wasabi\n"
        f"aws_access_key_id = {server.readonly.access_key}\n"
        f"aws_secret_access_key = {server.readonly.secret_key}\n"
        "aws_region = us-east-1\naws_endpoint = http://x:1\n"
    )
    assert f"aws_endpoint = {server.endpoint}\n" in server.credentials_ini("p2")


def test_two_servers_at_once(server: LocalS3, tmp_path: Path) -> None:
    """A second server runs beside the first on its own ports with its own data."""
    with LocalS3(tmp_path / "second") as other:
        assert other.port != server.port
        bucket = fresh_bucket(other)
        other.client().put_object(Bucket=bucket, Key="k", Body=b"other")
        names = [b["Name"] for b in server.client().list_buckets()["Buckets"]]
        assert bucket not in names


def test_restart_keeps_buckets_and_objects(own_server: LocalS3) -> None:
    """After a restart the server is on the same port and still holds its buckets and objects."""
    bucket = fresh_bucket(own_server)
    own_server.client().put_object(Bucket=bucket, Key="k", Body=b"kept")
    port, data_dir = own_server.port, own_server.data_dir
    own_server.restart()
    assert (own_server.port, own_server.data_dir) == (port, data_dir)
    assert own_server.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"kept"


def test_restart_can_revoke_and_restore_a_key(own_server: LocalS3) -> None:
    """Restarting without the read-only identity makes its key unknown; restoring it works again."""
    bucket = fresh_bucket(own_server)
    readonly, everyone = own_server.readonly, list(own_server.identities)
    assert readonly is not None
    own_server.restart(identities=[own_server.admin])
    assert own_server.readonly is None
    revoked = own_server.client(readonly)
    assert error_code(revoked.list_objects_v2, Bucket=bucket) == "InvalidAccessKeyId"
    own_server.restart(identities=everyone)
    assert own_server.client(readonly).list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_stop_leaves_no_process_or_socket(tmp_path: Path) -> None:
    """After stop() the weed process is gone, no socket of its ports is left in /tmp."""
    s3 = LocalS3(tmp_path)
    s3.start()
    pid, ports = s3.pid, list(s3.ports.values())
    assert pid is not None and process_alive(pid)
    s3.stop()
    s3.stop()  # idempotent
    assert s3.pid is None and not process_alive(pid)
    leftovers = [
        p.name
        for p in Path(tempfile.gettempdir()).glob("seaweedfs-*.sock")
        if any(str(port) in p.name or str(port + 10000) in p.name for port in ports)
    ]
    assert leftovers == []


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    """A server that cannot start raises RuntimeError quoting the end of its log."""
    s3 = LocalS3(tmp_path, volume_size_limit_mb=-1)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="weed"):
        s3.start(timeout=30)
    assert time.monotonic() - started < 30
    assert s3.pid is None


@pytest.mark.slow
def test_hundred_buckets_take_puts(own_server: LocalS3) -> None:
    """Bucket number 100 of one server still accepts a PUT (volume.max is high enough)."""
    client = own_server.client()
    for i in range(100):
        bucket = f"many-{i:03d}"
        own_server.create_bucket(bucket)
        client.put_object(Bucket=bucket, Key="k", Body=b"x" * 4096)
    assert client.get_object(Bucket="many-099", Key="k")["Body"].read() == b"x" * 4096
