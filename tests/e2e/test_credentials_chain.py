"""Where a profile's keys come from, end to end on both upload paths: a session token in the
file, a role assumed with STS, the container and instance endpoints, the environment; what
the servers received, that no secret shows anywhere, and what an endpoint that does not
answer does to the files."""

from __future__ import annotations

import calendar
import hashlib
import json
import os
import re
import secrets
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from credserver import CredentialsServer, Keys, Rotation
from faultproxy import FaultProxy
from httpwire import RequestHead
from motoserver import MotoServer
from spool import Spool, Supervisor, new_bucket, object_bytes, wait_for

from flood.testing.localserver import ADMIN_ACTIONS, REGION, Identity, LocalS3, random_identity

pytestmark = pytest.mark.timeout(240)

MiB = 1024 * 1024
# The small files go up by the lean PUT (the default) or by boto3's put_object; a file at
# the default multipart threshold (16 MiB) goes up in parts on the boto3 path.
PATHS = {"lean": (), "boto3": ("--boto3-put",)}
SMALL_SIZES = (0, 1, 1000, 64 * 1024, MiB)
BIG_SIZE = 16 * MiB
ACCOUNT = "123456789012"  # moto's default account
# A container or instance role's keys change every PERIOD seconds; each set is good for
# LIFETIME seconds from its period's start, so the old one is still valid a while after the
# switch, as on AWS.
PERIOD = 3.0
LIFETIME = 5.5
AUTH_FAILURES = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "AccessDenied")

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/(\d{8})/([^/,\s]+)/([^/,\s]+)/aws4_request")
_SIGNED_HEADERS = re.compile(r"SignedHeaders=([^,\s]+)")


# -- what the servers received ---------------------------------------------------------------
@dataclass(frozen=True)
class Signed:
    """One request as the relay saw it, with what its SigV4 Authorization header says."""

    operation: str
    access_key: str
    region: str
    service: str
    signed_headers: frozenset[str]
    token: str | None  # the X-Amz-Security-Token header
    signed_at: int  # X-Amz-Date as epoch seconds (the signature's own clock, whole seconds)
    user_agent: str


def operation(head: RequestHead) -> str:
    """The S3 operation of a request, by method, path and query."""
    path, _, query = head.target.partition("?")
    names = {part.split("=")[0] for part in query.split("&") if part}
    is_object = "/" in path.strip("/")
    if head.method == "PUT":
        return "UploadPart" if "partNumber" in names else "PutObject" if is_object else "PUT?"
    if head.method == "POST":
        return "CreateMultipartUpload" if "uploads" in names else "CompleteMultipartUpload"
    if head.method == "HEAD":
        return "HeadObject" if is_object else "HeadBucket"
    if head.method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in names else "DeleteObject"
    if path in ("", "/"):
        return "ListBuckets"
    if is_object:
        return "GetObject"
    return "ListMultipartUploads" if "uploads" in names else "ListObjects"


def signed(head: RequestHead) -> Signed:
    """The request's signature fields; an unsigned request fails the test, naming it."""
    authorization = head.header("Authorization") or ""
    credential = _CREDENTIAL.search(authorization)
    headers = _SIGNED_HEADERS.search(authorization)
    stamp = head.header("X-Amz-Date") or ""
    assert authorization.startswith("AWS4-HMAC-SHA256 ") and credential and headers and stamp, (
        f"{head.method} {head.target} is not SigV4-signed: {authorization[:60]!r}"
    )
    return Signed(
        operation=operation(head),
        access_key=credential.group(1),
        region=credential.group(3),
        service=credential.group(4),
        signed_headers=frozenset(headers.group(1).split(";")),
        token=head.header("X-Amz-Security-Token"),
        signed_at=calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ")),
        user_agent=head.header("User-Agent") or "",
    )


def signed_requests(relay: FaultProxy) -> list[Signed]:
    return [signed(head) for head in relay.received]


def assert_both_paths_seen(requests: Sequence[Signed], path: str) -> None:
    """The small files went up by the path under test, the big one (boto3) in parts."""
    puts = [r for r in requests if r.operation == "PutObject"]
    agent = "flood/" if path == "lean" else "Boto3/"
    assert puts and all(r.user_agent.startswith(agent) for r in puts), {r.user_agent for r in puts}
    if path == "boto3":
        ops = {r.operation for r in requests}
        assert {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"} <= ops, ops


# -- files and spools ------------------------------------------------------------------------
def payloads(path: str, prefix: str = "f") -> dict[str, bytes]:
    """Small files of a few sizes (the empty file too); on the boto3 path one at the
    multipart threshold as well."""
    files = {f"{prefix}/small-{size}.bin": os.urandom(size) for size in SMALL_SIZES}
    if path == "boto3":
        files[f"{prefix}/big.bin"] = os.urandom(BIG_SIZE)
    return files


def running(sp: Spool, *args: str, env: dict[str, str] | None = None) -> Supervisor:
    """Start the supervisor and wait for its start-up drain: it wipes incoming_tmp first, so
    a file dropped before then can vanish between its write and its rename."""
    sup = sp.start(*args, env=env)
    wait_for(
        lambda: sp.events("startup_drain_queued") or sup.proc.poll() is not None,
        60,
        "the start-up drain",
    )
    assert sup.proc.poll() is None, sup.stderr()
    return sup


def upload(
    sp: Spool, profile: str, bucket: str, files: dict[str, bytes], timeout: float = 120
) -> None:
    for key, data in files.items():
        sp.drop(profile, bucket, key, data)
    sp.wait_done(profile, bucket, list(files), timeout=timeout)


def assert_objects(client: Any, bucket: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        stored = object_bytes(client, bucket, key)
        assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest(), key


def assert_clean_run(sp: Spool) -> None:
    """No file failed, none waited for a retry, and no log line speaks of a refused key."""
    assert sp.files("failed") == []
    assert not sp.events("upload_failed") and not sp.events("upload_retry_scheduled")
    assert not sp.events("profile_paused")
    text = sp.log.read_text()
    assert not [code for code in AUTH_FAILURES if code in text]


def amazon_profile(name: str, endpoint: str, **keys: str) -> str:
    """An amazon profile addressed at `endpoint` (path-style), with the keys given."""
    lines = [
        f"[{name}]",
        "provider = amazon",
        f"aws_region = {REGION}",
        f"aws_endpoint = {endpoint}",
    ]
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def relays() -> Iterator[Any]:
    """relay(port): a recording FaultProxy to 127.0.0.1:port, stopped after the test."""
    started: list[FaultProxy] = []

    def relay(port: int) -> FaultProxy:
        proxy = FaultProxy("127.0.0.1", port, record=True)
        proxy.start()
        started.append(proxy)
        return proxy

    yield relay
    for proxy in started:
        proxy.stop()


@pytest.fixture
def credserver() -> Iterator[Any]:
    """start(rotation, **options): a CredentialsServer, stopped after the test."""
    started: list[CredentialsServer] = []

    def start(rotation: Rotation, **options: Any) -> CredentialsServer:
        server = CredentialsServer(rotation, **options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass(frozen=True)
class Seaweed:
    """A SeaweedFS server of this module with two more identities than its admin: the keys a
    container or instance role hands out (the server checks every signature they make)."""

    server: LocalS3
    first: Identity
    second: Identity

    def keys(self, identity: Identity) -> Keys:
        return Keys(identity.access_key, identity.secret_key, "")


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    first = random_identity("role-first", ADMIN_ACTIONS)
    second = random_identity("role-second", ADMIN_ACTIONS)
    admin = random_identity("flood", ADMIN_ACTIONS)
    server = LocalS3(tmp_path_factory.mktemp("s3-roles"), [admin, first, second])
    server.start()
    yield Seaweed(server, first, second)
    server.stop()


@pytest.fixture(scope="module")
def sts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto server of its own for STS, whose model data (/moto-api/data.json) tells what it
    issued: the S3 server's answers 500 once it has held a multipart part (moto 5.2)."""
    server = MotoServer(tmp_path_factory.mktemp("moto-sts"))
    server.start()
    yield server
    server.stop()


def moto_bucket(moto: MotoServer) -> str:
    name = f"creds-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(name)
    return name


def assumed_roles(sts: MotoServer, role_arn: str) -> list[dict[str, Any]]:
    """What moto's STS handed out for this role (keys, token, session name, external id)."""
    with urllib.request.urlopen(f"{sts.endpoint}/moto-api/data.json", timeout=30) as answer:
        data = json.load(answer)
    return [r for r in data.get("sts", {}).get("AssumedRole", []) if r["role_arn"] == role_arn]


# -- 1. a session token in the file ----------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_a_session_token_in_the_profile_is_sent_and_signed_on_every_request(
    tmp_path: Path, moto: MotoServer, relays: Any, path: str
) -> None:
    """aws_session_token is sent as X-Amz-Security-Token, and signed, on every request of the
    bucket check, the small PUTs and the multipart upload, with the profile's key id."""
    bucket = moto_bucket(moto)
    relay = relays(moto.port)
    token = "FwoGZXIvYXdzE" + secrets.token_urlsafe(96)
    ini = moto.credentials_ini("tok", endpoint=relay.endpoint) + f"aws_session_token = {token}\n"
    sp = Spool(tmp_path, moto, {"tok": ini})
    try:
        running(sp, *PATHS[path])
        files = payloads(path)
        upload(sp, "tok", bucket, files)
        assert_objects(moto.client(), bucket, files)
        requests = signed_requests(relay)
        assert_both_paths_seen(requests, path)
        assert "ListBuckets" in {r.operation for r in requests}
        for r in requests:
            assert (r.access_key, r.service, r.region) == (moto.admin.access_key, "s3", REGION)
            assert "x-amz-security-token" in r.signed_headers, r
            assert r.token == token, r.operation
        assert_clean_run(sp)
    finally:
        sp.close()


# -- 2. a role assumed with STS --------------------------------------------------------------
ROLE_SOURCES = ("source_profile", "Environment")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("origin", ROLE_SOURCES)
def test_a_role_is_assumed_at_sts_and_its_keys_sign_every_request(
    tmp_path: Path, moto: MotoServer, sts: MotoServer, relays: Any, origin: str, path: str
) -> None:
    """role_arn with source_profile (or credential_source = Environment): STS AssumeRole at
    $AWS_ENDPOINT_URL_STS (a moto of its own) with the external id and session name; every
    S3 request is signed with a key and token STS issued for that role, never with the
    source's key; no STS request goes to the profile's aws_endpoint."""
    bucket = moto_bucket(moto)
    relay = relays(moto.port)
    source = random_identity("source", ADMIN_ACTIONS)
    role_arn = f"arn:aws:iam::{ACCOUNT}:role/flood-{uuid.uuid4().hex[:8]}"
    external_id = "ext-" + secrets.token_hex(16)
    role = dict(
        role_arn=role_arn,
        external_id=external_id,
        role_session_name="flood-e2e",
        duration_seconds="900",
    )
    profiles: dict[str, str] = {}
    env = {"AWS_ENDPOINT_URL_STS": sts.endpoint}
    if origin == "source_profile":
        profiles["src"] = moto.credentials_ini("src", source)  # moto directly, not the relay
        role["source_profile"] = "src"
    else:
        env.update(AWS_ACCESS_KEY_ID=source.access_key, AWS_SECRET_ACCESS_KEY=source.secret_key)
        role["credential_source"] = "Environment"
    profiles["role"] = amazon_profile("role", relay.endpoint, **role)
    sp = Spool(tmp_path, moto, profiles)
    try:
        running(sp, *PATHS[path], env=sp.env(**env))
        files = payloads(path)
        upload(sp, "role", bucket, files)
        assert_objects(moto.client(), bucket, files)
        issued = assumed_roles(sts, role_arn)
        assert issued, "no AssumeRole reached moto's STS"
        assert {(r["session_name"], r["external_id"]) for r in issued} == {
            ("flood-e2e", external_id)
        }
        tokens = {r["access_key_id"]: r["session_token"] for r in issued}
        requests = signed_requests(relay)
        assert_both_paths_seen(requests, path)
        for r in requests:
            assert r.service == "s3", f"{r.operation} for {r.service} at the S3 endpoint"
            assert r.access_key in tokens and r.access_key != source.access_key, r
            assert "x-amz-security-token" in r.signed_headers, r
            assert r.token == tokens[r.access_key], r.operation
        # A 900 s session outlasts the test: one AssumeRole per process that signs (the
        # supervisor's bucket check and each of the two uploaders), not one per request.
        assert len(issued) <= 3, len(issued)
        assert_clean_run(sp)
    finally:
        sp.close()


# -- 3. container credentials that rotate ----------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_container_credentials_rotate_under_a_stream_of_uploads(
    tmp_path: Path, seaweed: Seaweed, relays: Any, credserver: Any, path: str
) -> None:
    """credential_source = EcsContainer while the endpoint rotates between two identities
    every few seconds (short expiry with fractional seconds, empty token): a stream of
    uploads spanning two rotations lands whole, signed by both keys and never by an expired
    one, and the server, which checks every signature, refuses nothing."""
    server = seaweed.server
    bucket = new_bucket(server)
    relay = relays(server.port)
    rotation = Rotation(
        [seaweed.keys(seaweed.first), seaweed.keys(seaweed.second)], PERIOD, LIFETIME
    )
    authorization = "container-auth-" + secrets.token_hex(12)
    endpoint = credserver(rotation, authorization=authorization)
    ini = amazon_profile("ecs", relay.endpoint, credential_source="EcsContainer")
    sp = Spool(tmp_path, server, {"ecs": ini})
    env = sp.env(
        AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.container_uri,
        AWS_CONTAINER_AUTHORIZATION_TOKEN=authorization,
    )
    try:
        running(sp, *PATHS[path], env=env)
        files = stream(sp, "ecs", bucket, rotation, endpoint, path)
        sp.wait_done("ecs", bucket, list(files), timeout=120)
        assert_objects(server.client(), bucket, files)
        requests = signed_requests(relay)
        assert_both_paths_seen(requests, path)
        assert {r.access_key for r in requests} == {
            seaweed.first.access_key,
            seaweed.second.access_key,
        }
        assert all(r.token is None for r in requests)
        assert_never_expired(requests, endpoint)
        assert endpoint.refused == []
        assert_clean_run(sp)
    finally:
        sp.close()


def periods_served(rotation: Rotation, endpoint: CredentialsServer) -> int:
    return len({int((s.at - rotation.start) // rotation.period) for s in endpoint.served})


def stream(
    sp: Spool,
    profile: str,
    bucket: str,
    rotation: Rotation,
    endpoint: CredentialsServer,
    path: str,
) -> dict[str, bytes]:
    """Drop small files at a steady pace until the keys were handed out in three periods
    (two rotations); on the boto3 path the big file goes in after the first rotation."""
    files: dict[str, bytes] = {}
    deadline = time.monotonic() + 60
    big = path == "boto3"
    while periods_served(rotation, endpoint) < 3 or len(files) < 20:
        assert time.monotonic() < deadline, f"no two rotations in 60 s: {sp.pending_summary()}"
        key = f"stream/{len(files):04d}.bin"
        files[key] = os.urandom(100 + len(files) * 97)
        sp.drop(profile, bucket, key, files[key])
        if big and periods_served(rotation, endpoint) >= 2:
            files["stream/big.bin"] = os.urandom(BIG_SIZE)
            sp.drop(profile, bucket, "stream/big.bin", files["stream/big.bin"])
            big = False
        time.sleep(0.1)  # the producer's pace: the stream must span the rotations
    return files


def assert_never_expired(requests: Sequence[Signed], endpoint: CredentialsServer) -> None:
    """Each request was signed while the keys it used were valid: some hand-out of that key
    had expired neither before nor within the second of the request's X-Amz-Date."""
    served = endpoint.served
    for r in requests:
        valid = [
            s
            for s in served
            if s.keys.access_key == r.access_key and s.at < r.signed_at + 1 <= s.expires
        ]
        assert valid, f"{r.operation} signed at {r.signed_at} with {r.access_key}, not valid then"


# -- 4. an instance role and the environment -------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_an_instance_role_from_imdsv2_uploads(
    tmp_path: Path, seaweed: Seaweed, relays: Any, credserver: Any, path: str
) -> None:
    """credential_source = Ec2InstanceMetadata: the keys come from the metadata service at
    $AWS_EC2_METADATA_SERVICE_ENDPOINT with an IMDSv2 token, and sign every request."""
    server = seaweed.server
    bucket = new_bucket(server)
    relay = relays(server.port)
    endpoint = credserver(Rotation([seaweed.keys(seaweed.first)], 3600.0, 6 * 3600.0))
    ini = amazon_profile("imds", relay.endpoint, credential_source="Ec2InstanceMetadata")
    sp = Spool(tmp_path, server, {"imds": ini})
    try:
        running(sp, *PATHS[path], env=sp.env(AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint.endpoint))
        files = payloads(path)
        upload(sp, "imds", bucket, files)
        assert_objects(server.client(), bucket, files)
        requests = signed_requests(relay)
        assert_both_paths_seen(requests, path)
        assert {r.access_key for r in requests} == {seaweed.first.access_key}
        assert endpoint.tokens_issued and endpoint.refused == []
        assert {s.endpoint for s in endpoint.served} == {"imds"}
        assert_clean_run(sp)
    finally:
        sp.close()


@pytest.mark.parametrize("path", PATHS)
def test_keys_from_the_environment_upload(
    tmp_path: Path, seaweed: Seaweed, relays: Any, path: str
) -> None:
    """credential_source = Environment: the supervisor's AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY sign every request."""
    server = seaweed.server
    bucket = new_bucket(server)
    relay = relays(server.port)
    ini = amazon_profile("env", relay.endpoint, credential_source="Environment")
    sp = Spool(tmp_path, server, {"env": ini})
    keys = seaweed.second
    env = sp.env(AWS_ACCESS_KEY_ID=keys.access_key, AWS_SECRET_ACCESS_KEY=keys.secret_key)
    try:
        running(sp, *PATHS[path], env=env)
        files = payloads(path)
        upload(sp, "env", bucket, files)
        assert_objects(server.client(), bucket, files)
        requests = signed_requests(relay)
        assert_both_paths_seen(requests, path)
        assert {r.access_key for r in requests} == {keys.access_key}
        assert all(r.token is None for r in requests)
        assert_clean_run(sp)
    finally:
        sp.close()


# -- 5. what cannot be used ------------------------------------------------------------------
BAD_PROFILES = {
    "role without a source": (
        "[r]\nprovider = amazon\naws_region = us-east-1\n"
        "role_arn = arn:aws:iam::123456789012:role/x\n",
        "role_arn needs exactly one of source_profile and credential_source",
    ),
    "a source profile that does not exist": (
        "[r]\nprovider = amazon\naws_region = us-east-1\n"
        "role_arn = arn:aws:iam::123456789012:role/x\nsource_profile = nobody\n",
        "source_profile 'nobody' is not a profile of this file",
    ),
    "credential_source on cloudflare": (
        "[r]\nprovider = cloudflare\naws_region = auto\n"
        "aws_endpoint = https://account.r2.cloudflarestorage.com\n"
        "credential_source = Environment\n",
        "need provider = amazon",
    ),
    "both a source profile and a credential source": (
        "[s]\nprovider = amazon\naws_region = us-east-1\naws_access_key_id = AKS\n"
        "aws_secret_access_key = never-shown-secret\n"
        "[r]\nprovider = amazon\naws_region = us-east-1\n"
        "role_arn = arn:aws:iam::123456789012:role/x\nsource_profile = s\n"
        "credential_source = Environment\n",
        "role_arn needs exactly one of source_profile and credential_source",
    ),
    "an unknown credential source": (
        "[r]\nprovider = amazon\naws_region = us-east-1\ncredential_source = Ec2\n",
        "credential_source 'Ec2' is not one of",
    ),
    "a container source outside a container": (
        "[r]\nprovider = amazon\naws_region = us-east-1\ncredential_source = EcsContainer\n",
        "credential_source EcsContainer, but neither $AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ),
    "the environment's keys without keys in the environment": (
        "[r]\nprovider = amazon\naws_region = us-east-1\ncredential_source = Environment\n",
        "credential_source Environment, but $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY",
    ),
    "an endpoint whose host is a placeholder": (
        "[r]\nprovider = cloudflare\naws_region = auto\naws_access_key_id = AK\n"
        "aws_secret_access_key = never-shown-secret\n"
        "aws_endpoint = https://ACCOUNT_ID.r2.cloudflarestorage.com\n",
        "'account_id.r2.cloudflarestorage.com' is not a host name",
    ),
}


@pytest.mark.parametrize("case", BAD_PROFILES)
def test_a_profile_whose_keys_cannot_come_from_anywhere_is_refused_untouched(
    tmp_path: Path, case: str
) -> None:
    """A role or credential source that cannot work is one line on stderr naming the profile
    and exit 78, before anything is touched: no lock file, no database, incoming_tmp kept."""
    text, message = BAD_PROFILES[case]
    sp = Spool(tmp_path, None, {"bad": text})
    half = sp.path("incoming_tmp", "r", "b", "half.bin")
    half.parent.mkdir(parents=True)
    half.write_bytes(b"half written")
    refused = sp.run("flood-supervisor", "--credentials", str(sp.credentials), str(sp.dir))
    assert refused.returncode == 78, refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0] and "'r'" in lines[0], refused.stderr
    assert refused.stdout == ""
    assert "never-shown-secret" not in refused.stderr
    assert not (sp.dir / ".flood.lock").exists()
    assert half.read_bytes() == b"half written"
    assert not sp.db.exists()


# -- 6. secrets never show -------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_no_key_secret_token_or_external_id_shows_anywhere(
    tmp_path: Path,
    moto: MotoServer,
    sts: MotoServer,
    seaweed: Seaweed,
    credserver: Any,
    path: str,
) -> None:
    """With every kind of profile at work at DEBUG (a token in the file, an assumed role with
    an external id, container, instance and environment keys), no secret key, session token,
    external id or container authorization shows in the log, stderr, the database or
    flood-doctor's output."""
    server = seaweed.server
    moto_b, ecs_b, imds_b, env_b = moto_bucket(moto), *(new_bucket(server) for _ in range(3))
    source = random_identity("source", ADMIN_ACTIONS)
    token = "FwoGZXIvYXdzE" + secrets.token_urlsafe(96)
    role_arn = f"arn:aws:iam::{ACCOUNT}:role/flood-{uuid.uuid4().hex[:8]}"
    external_id = "ext-" + secrets.token_hex(16)
    authorization = "container-auth-" + secrets.token_hex(12)
    rotation = Rotation(
        [seaweed.keys(seaweed.first), seaweed.keys(seaweed.second)], PERIOD, LIFETIME
    )
    endpoint = credserver(rotation, authorization=authorization)
    profiles = {
        "tok": moto.credentials_ini("tok") + f"aws_session_token = {token}\n",
        "src": moto.credentials_ini("src", source),
        "role": amazon_profile(
            "role", moto.endpoint, role_arn=role_arn, source_profile="src", external_id=external_id
        ),
        "ecs": amazon_profile("ecs", server.endpoint, credential_source="EcsContainer"),
        "imds": amazon_profile("imds", server.endpoint, credential_source="Ec2InstanceMetadata"),
        "env": amazon_profile("env", server.endpoint, credential_source="Environment"),
    }
    sp = Spool(tmp_path, moto, profiles)
    env = sp.env(
        AWS_ENDPOINT_URL_STS=sts.endpoint,
        AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.container_uri,
        AWS_CONTAINER_AUTHORIZATION_TOKEN=authorization,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=endpoint.endpoint,
        AWS_ACCESS_KEY_ID=seaweed.second.access_key,
        AWS_SECRET_ACCESS_KEY=seaweed.second.secret_key,
    )
    targets = {"tok": moto_b, "role": moto_b, "ecs": ecs_b, "imds": imds_b, "env": env_b}
    try:
        sup = running(sp, *PATHS[path], env=env)
        queued = {profile: payloads(path, prefix=profile) for profile in targets}
        for profile, files in queued.items():
            for key, data in files.items():
                sp.drop(profile, targets[profile], key, data)
        for profile, files in queued.items():
            sp.wait_done(profile, targets[profile], list(files), timeout=120)
        doctor = [
            sp.run(
                "flood-doctor",
                "--server-dir",
                str(sp.dir),
                "--credentials",
                str(sp.credentials),
                *extra,
                env=env,
            )
            for extra in ((), ("--json",), ("--boto3-put",))
        ]
        for run in doctor:
            assert run.returncode == 0, run.stdout + run.stderr
        assert sup.terminate() == 0
        issued = assumed_roles(sts, role_arn)
        assert issued
        hidden = {
            "the source profile's secret": source.secret_key,
            "moto's secret (tok)": moto.admin.secret_key,
            "the session token": token,
            "the external id": external_id,
            "the container authorization": authorization,
            "the first role key's secret": seaweed.first.secret_key,
            "the second role key's secret": seaweed.second.secret_key,
        }
        for n, role in enumerate(issued):
            hidden[f"assumed secret {n}"] = role["secret_access_key"]
            hidden[f"assumed token {n}"] = role["session_token"]
        places = {
            "the log": sp.log.read_text(errors="replace"),
            "stderr": sp.log.with_suffix(".stderr").read_text(errors="replace"),
            "the database": database_text(sp),
            **{f"flood-doctor run {n}": run.stdout + run.stderr for n, run in enumerate(doctor)},
        }
        assert sp.log_lines()
        leaks = [
            f"{what} in {where}"
            for what, secret in hidden.items()
            for where, text in places.items()
            if secret in text
        ]
        assert leaks == []
    finally:
        sp.close()


def database_text(sp: Spool) -> str:
    """Every byte of the database and its WAL and shared-memory files, as text."""
    return "".join(
        p.read_bytes().decode("latin-1") for p in sp.db.parent.glob(sp.db.name + "*") if p.is_file()
    )


# -- 7. a credentials endpoint that does not answer, and how often it is asked -----------------
SOURCES = {
    "EcsContainer": "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "Ec2InstanceMetadata": "AWS_EC2_METADATA_SERVICE_ENDPOINT",
}


def sourced_spool(
    tmp_path: Path, seaweed: Seaweed, endpoint: CredentialsServer, source: str
) -> tuple[Spool, dict[str, str]]:
    """A spool whose one profile `cs` takes its keys from `endpoint` as `source`, and the
    supervisor's environment that points there."""
    ini = amazon_profile("cs", seaweed.server.endpoint, credential_source=source)
    sp = Spool(tmp_path, seaweed.server, {"cs": ini})
    url = endpoint.container_uri if source == "EcsContainer" else endpoint.endpoint
    return sp, sp.env(**{SOURCES[source]: url})


def failed_reasons(sp: Spool) -> dict[str, str]:
    """The files in failed/ by key, with the reason their record gives."""
    return {r["filepath"]: r["reason"] for r in sp.records() if r["current_state"] == "failed"}


@pytest.mark.parametrize(
    "source",
    ["EcsContainer", "Ec2InstanceMetadata"],
)
def test_a_credentials_endpoint_down_at_start_holds_the_profile_until_it_answers(
    tmp_path: Path, seaweed: Seaweed, credserver: Any, source: str
) -> None:
    """A container or instance endpoint that answers 503 when Flood starts holds the profile
    (the supervisor keeps running, no file fails); once it answers, the files go up."""
    server = seaweed.server
    bucket = new_bucket(server)
    endpoint = credserver(Rotation([seaweed.keys(seaweed.first)], 3600.0, 6 * 3600.0))
    endpoint.available = False
    sp, env = sourced_spool(tmp_path, seaweed, endpoint, source)
    try:
        files = payloads("lean")
        for key, data in files.items():
            sp.drop("cs", bucket, key, data)
        sup = sp.start("--recheck-interval", "1", "--retry-base", "1", env=env)
        wait_for(
            lambda: sup.proc.poll() is not None or sp.events("profile_paused"),
            60,
            "the profile held (or the supervisor gone)",
        )
        assert sup.proc.poll() is None, (
            f"supervisor exited {sup.proc.returncode}: {sup.stderr().splitlines()[-1:]}"
        )
        assert sp.files("failed") == []
        endpoint.available = True
        sp.wait_done("cs", bucket, list(files), timeout=90)
        assert_objects(server.client(), bucket, files)
        assert sp.files("failed") == []
    finally:
        sp.close()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("source", SOURCES)
def test_a_credentials_endpoint_outage_mid_stream_fails_no_file(
    tmp_path: Path, seaweed: Seaweed, credserver: Any, source: str, path: str
) -> None:
    """Short-lived container or instance keys whose endpoint stops answering for longer than
    they last: the files queued once they expired wait (none in failed/, the profile held)
    and go up once it answers again."""
    server = seaweed.server
    bucket = new_bucket(server)
    rotation = Rotation([seaweed.keys(seaweed.first)], PERIOD, LIFETIME)
    endpoint = credserver(rotation)
    sp, env = sourced_spool(tmp_path, seaweed, endpoint, source)
    try:
        running(sp, *PATHS[path], "--recheck-interval", "1", "--retry-base", "1", env=env)
        before = payloads("lean", prefix="before")
        upload(sp, "cs", bucket, before)
        endpoint.available = False
        time.sleep(LIFETIME + 0.5)  # every key handed out has expired: none is left to sign with
        during = payloads(path, prefix="during")
        for key, data in during.items():
            sp.drop("cs", bucket, key, data)
        wait_for(
            lambda: (
                endpoint.refused
                and (
                    sp.files("failed")
                    or sp.events("upload_retry_scheduled")
                    or sp.events("profile_paused")
                )
            ),
            60,
            "the outage to be noticed",
        )
        assert failed_reasons(sp) == {}
        endpoint.available = True
        sp.wait_done("cs", bucket, list(during), timeout=90)
        assert_objects(server.client(), bucket, {**before, **during})
        assert sp.files("failed") == []
    finally:
        sp.close()


def test_container_keys_are_fetched_when_due_not_before_every_request(
    tmp_path: Path, seaweed: Seaweed, relays: Any, credserver: Any
) -> None:
    """Container keys good for two minutes are fetched once per process that signs (the
    supervisor and two uploaders), not again for each of the requests made with them."""
    server = seaweed.server
    bucket = new_bucket(server)
    relay = relays(server.port)
    endpoint = credserver(Rotation([seaweed.keys(seaweed.first)], 3600.0, 120.0))
    ini = amazon_profile("ecs", relay.endpoint, credential_source="EcsContainer")
    sp = Spool(tmp_path, server, {"ecs": ini})
    try:
        running(sp, env=sp.env(AWS_CONTAINER_CREDENTIALS_FULL_URI=endpoint.container_uri))
        files = {f"due/{i:02d}.bin": os.urandom(100 + i) for i in range(30)}
        upload(sp, "ecs", bucket, files)
        requests = signed_requests(relay)
        assert len(requests) > len(files)
        assert len(endpoint.served) <= 3, (
            f"{len(endpoint.served)} container GETs for {len(requests)} S3 requests"
        )
        assert_clean_run(sp)
    finally:
        sp.close()


@pytest.mark.parametrize(
    "source",
    [
        "EcsContainer",
        "Ec2InstanceMetadata",
    ],
)
def test_doctor_reports_a_credentials_endpoint_that_does_not_answer(
    tmp_path: Path, seaweed: Seaweed, credserver: Any, source: str
) -> None:
    """flood-doctor with a container or instance endpoint answering 503 reports that
    profile FAIL (exit 1, its JSON document) and still checks the other profiles."""
    server = seaweed.server
    bucket = new_bucket(server)
    endpoint = credserver(Rotation([seaweed.keys(seaweed.first)], 3600.0, 6 * 3600.0))
    ini = amazon_profile("cs", server.endpoint, credential_source=source)
    sp = Spool(tmp_path, server, {"cs": ini, "good": server.credentials_ini("good")})
    url = endpoint.container_uri if source == "EcsContainer" else endpoint.endpoint
    env = sp.env(**{SOURCES[source]: url})
    for profile in ("cs", "good"):
        (sp.dir / "incoming" / profile / bucket).mkdir(parents=True)
    try:
        running(sp, env=env)
        endpoint.available = False
        where = ("--server-dir", str(sp.dir), "--credentials", str(sp.credentials))
        run = sp.run("flood-doctor", *where, "--json", env=env)
        assert run.returncode == 1 and run.stdout.startswith("{"), (
            f"exit {run.returncode}: {run.stderr.splitlines()[-1:]}"
        )
        checks = json.loads(run.stdout)["checks"]
        status = {c["subject"]: c["status"] for c in checks}
        assert status[f"good/{bucket}"] == "ok", checks
        assert [c for c in checks if c["subject"].startswith("cs") and c["status"] == "FAIL"]
    finally:
        sp.close()
