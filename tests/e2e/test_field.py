"""Flood as it runs in the field, end to end against real servers: TLS verified on every path
(and a certificate that does not verify holding the profile), forward proxies (CONNECT,
absolute-form, credentials, NO_PROXY, tinyproxy), IPv6 endpoints, Amazon's virtual-hosted
addressing and regions, and an outage of one key that is not an outage of the profile."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultproxy import FaultProxy
from forwardproxy import Carry, ForwardProxy
from motoserver import MotoServer
from relay import Relay
from spool import Spool, new_bucket, object_bytes, wait_for
from tinyproxy import TinyProxy
from tlsca import CertAuthority

from flood.testing.localserver import REGION, LocalS3

pytestmark = pytest.mark.timeout(240)
SMALL = {f"small/{i}.txt": f"small file {i}\n".encode() * 50 for i in range(5)}
LARGE_KEY = "large/parts.bin"
LARGE = os.urandom(17 * 1024 * 1024)  # above the 16 MiB multipart threshold: boto3's path
NAME = "s3.flood.test"  # a name only the suite's proxy resolves
PATHS = {"lean": (), "boto3": ("--boto3-put",)}
Start = Callable[..., ForwardProxy]


def profile_ini(s3: Any, endpoint: str, *extra: str, profile: str = "p1") -> str:
    return s3.credentials_ini(profile, endpoint=endpoint) + "".join(f"{line}\n" for line in extra)


@pytest.fixture
def relay_to(s3: LocalS3) -> Iterator[Callable[..., Relay]]:
    """start(cert=None, listen_host=...): a relay in front of the local S3 server."""
    started: list[Relay] = []

    def start(**options: Any) -> Relay:
        relay = Relay(("127.0.0.1", s3.port), **options).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def new_spool(tmp_path: Path, s3: Any, ini: str) -> Spool:
    return Spool(tmp_path, s3, {"p1": ini})


def upload_all(spool: Spool, bucket: str, *args: str, large: bool = True, **env: str) -> None:
    """Start the supervisor, queue the small files (and the large one), see them completed
    with their bytes in the bucket."""
    spool.start(*args, env=spool.env(**env))
    wait_for(lambda: spool.events("startup_drain_queued"), 60, "the start-up drain")
    files = dict(SMALL, **({LARGE_KEY: LARGE} if large else {}))
    for key, data in files.items():
        spool.drop("p1", bucket, key, data)
    spool.wait_done("p1", bucket, list(files), timeout=120)
    client = spool.s3.client()
    assert {k: object_bytes(client, bucket, k) for k in files} == files
    assert spool.files("failed") == []


def status(spool: Spool, **env: str) -> dict[str, Any]:
    shown = spool.run(
        "flood-status", "--server-dir", str(spool.dir), "--json", env=spool.env(**env)
    )
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


def doctor(spool: Spool, *args: str, **env: str) -> Any:
    return spool.run(
        "flood-doctor",
        "--server-dir",
        str(spool.dir),
        "--credentials",
        str(spool.credentials),
        *args,
        env=spool.env(**env),
    )


# -- TLS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("where", ["profile", "AWS_CA_BUNDLE", "aws_config"])
def test_https_is_verified_with_the_ca_on_every_path(
    tmp_path: Path, s3_https: Any, path: str, where: str
) -> None:
    """An https endpoint verified against the CA given as the profile's ca_bundle, as
    $AWS_CA_BUNDLE, or as ca_bundle in the AWS config file (as boto3 reads them): small files
    (lean or boto3 PUT), a multipart file and the bucket checks all go up; flood-doctor's
    round trip takes the same path and says which."""
    server, bundle = s3_https.server, str(s3_https.ca_bundle)
    extra = [f"ca_bundle = {bundle}"] if where == "profile" else []
    spool = new_spool(tmp_path, server, profile_ini(server, s3_https.endpoint, *extra))
    env = {"AWS_CA_BUNDLE": bundle} if where == "AWS_CA_BUNDLE" else {}
    if where == "aws_config":
        (spool.home / ".aws").mkdir()
        (spool.home / ".aws" / "config").write_text(f"[default]\nca_bundle = {bundle}\n")
    bucket = new_bucket(server)
    upload_all(spool, bucket, *PATHS[path], large=path == "lean", **env)
    probe = doctor(spool, *PATHS[path], **env)
    assert probe.returncode == 0, probe.stdout
    named = "PUT (lean client)" if path == "lean" else "PUT (boto3 put_object)"
    assert named in probe.stdout


@pytest.mark.parametrize("fault", ["untrusted", "expired", "wrong_host"])
def test_a_certificate_that_does_not_verify_holds_the_profile_until_it_does(
    tmp_path: Path, s3: LocalS3, ca: CertAuthority, relay_to: Callable[..., Relay], fault: str
) -> None:
    """A certificate from an unknown CA, an expired one or one for another host: the profile
    is held (reason tls), its files stay in incoming/, one error line names the endpoint and
    the verification error, flood-doctor reports it as tls; once the certificate is right,
    the next check releases the profile and the files go up. Nothing is sent in the clear."""
    other = CertAuthority(tmp_path / "other-ca")
    bad = {"untrusted": other.localhost, "expired": ca.expired(), "wrong_host": ca.wrong_host()}
    relay = relay_to(cert=bad[fault])
    endpoint = f"https://localhost:{relay.port}"
    spool = new_spool(tmp_path, s3, profile_ini(s3, endpoint, f"ca_bundle = {ca.bundle}"))
    bucket = new_bucket(s3)
    spool.start("--recheck-interval", "1")
    wait_for(lambda: spool.events("profile_paused"), 60, "the profile held")
    [paused] = spool.events("profile_paused")
    assert paused["event"]["reason"] == "tls"
    assert f"localhost:{relay.port}" in paused["error"]["message"]
    assert "certificate verify failed" in paused["error"]["message"]
    spool.drop("p1", bucket, "waits.txt", b"until the certificate is right")
    wait_for(lambda: status(spool)["paused"], 30, "the hold in flood-status")
    assert [h["reason"] for h in status(spool)["paused"]] == ["tls"]
    probe = doctor(spool)
    assert probe.returncode == 1 and "tls:" in probe.stdout and "certificate" in probe.stdout
    assert spool.where("p1", bucket, "waits.txt") == ["incoming"]
    relay.use_cert(ca.localhost)
    spool.wait_done("p1", bucket, ["waits.txt"], timeout=90)
    assert spool.events("profile_resumed") and len(spool.events("profile_paused")) == 1


def test_a_certificate_gone_bad_mid_stream_holds_without_spending_retries(
    tmp_path: Path, s3: LocalS3, ca: CertAuthority, relay_to: Callable[..., Relay]
) -> None:
    """The certificate turns bad while files flow (the lean client's new connections fail
    to verify): the profile is held as tls, the files already claimed wait unspent in
    processing/ (none in failed/), and all complete once it verifies again."""
    relay = relay_to(cert=ca.localhost)
    endpoint = f"https://localhost:{relay.port}"
    spool = new_spool(tmp_path, s3, profile_ini(s3, endpoint, f"ca_bundle = {ca.bundle}"))
    bucket = new_bucket(s3)
    spool.start("--recheck-interval", "1", "--max-retries", "0")
    wait_for(lambda: spool.events("startup_drain_queued"), 60, "the start-up drain")
    spool.drop("p1", bucket, "before.txt", b"fine")
    spool.wait_done("p1", bucket, ["before.txt"])
    relay.use_cert(ca.expired())
    relay.drop_all()
    keys = [f"during/{i}.txt" for i in range(4)]
    for key in keys:
        spool.drop("p1", bucket, key, key.encode())
    wait_for(lambda: spool.events("upload_held"), 60, "a file held by the tls hold")
    assert spool.files("failed") == []
    relay.use_cert(ca.localhost)
    spool.wait_done("p1", bucket, keys, timeout=90)
    assert spool.files("failed") == []


def test_ca_bundle_insecure_skips_verification_and_says_so(
    tmp_path: Path, s3: LocalS3, ca: CertAuthority, relay_to: Callable[..., Relay]
) -> None:
    """Only `ca_bundle = insecure` accepts a certificate that does not verify, and the
    supervisor warns about it at start."""
    other = CertAuthority(tmp_path / "other-ca")
    relay = relay_to(cert=other.localhost)
    spool = new_spool(
        tmp_path, s3, profile_ini(s3, f"https://localhost:{relay.port}", "ca_bundle = insecure")
    )
    upload_all(spool, new_bucket(s3), large=False)
    [warned] = spool.events("tls_verification_off")
    assert warned["flood"]["profile"] == "p1"


@pytest.mark.parametrize(
    ("line", "names"),
    [
        ("aws_endpoint = s3.example.com", "aws_endpoint"),
        ("proxy = ftp://proxy:21", "proxy"),
        ("ca_bundle = /nonexistent/ca.pem", "ca_bundle"),
    ],
)
def test_bad_connection_settings_stop_the_supervisor_touching_nothing(
    tmp_path: Path, s3: LocalS3, line: str, names: str
) -> None:
    """A malformed endpoint, proxy or CA bundle: one line naming the profile and the key,
    exit 78, before the server dir is touched."""
    ini = s3.credentials_ini("p1").replace("aws_endpoint", "#aws_endpoint") + line + "\n"
    spool = new_spool(tmp_path, s3, ini)
    leftover = spool.dir / "incoming_tmp" / "p1" / "b" / "half"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x")
    sup = spool.start()
    assert sup.proc.wait(30) == 78
    errors = sup.stderr().strip().splitlines()
    assert len(errors) == 1 and "'p1'" in errors[0] and names in errors[0]
    assert leftover.exists() and not (spool.dir / ".flood.lock").exists()


# -- proxies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
def test_https_through_a_proxy_that_alone_knows_the_name(
    tmp_path: Path,
    s3: LocalS3,
    ca: CertAuthority,
    forward_proxy: Start,
    relay_to: Callable[..., Relay],
    path: str,
) -> None:
    """$HTTPS_PROXY: the endpoint's name resolves only inside the proxy, so every request of
    every path (bucket checks, small PUTs, parts, doctor) must go through its CONNECT
    tunnels, and does; TLS is verified end to end against the endpoint's own name."""
    relay = relay_to(cert=ca.issue(NAME))
    proxy = forward_proxy(hosts={NAME: ("127.0.0.1", relay.port)})
    endpoint = f"https://{NAME}:{relay.port}"
    spool = new_spool(tmp_path, s3, profile_ini(s3, endpoint, f"ca_bundle = {ca.bundle}"))
    bucket = new_bucket(s3)
    upload_all(spool, bucket, *PATHS[path], large=path == "lean", HTTPS_PROXY=proxy.url)
    assert doctor(spool, *PATHS[path], HTTPS_PROXY=proxy.url).returncode == 0
    connects = [e for e in proxy.log if e.kind == Carry.CONNECT]
    assert connects and {e.target for e in connects} == {f"{NAME}:{relay.port}"}
    assert all(e.status == 200 for e in connects)


@pytest.mark.parametrize("path", list(PATHS))
def test_http_through_a_proxy_goes_absolute_form(
    tmp_path: Path, s3: LocalS3, forward_proxy: Start, path: str
) -> None:
    """$HTTP_PROXY with an http endpoint: each request goes to the proxy in absolute form
    (`PUT http://name:port/bucket/key`), lower-case variable winning as for curl."""
    proxy = forward_proxy(hosts={NAME: ("127.0.0.1", s3.port)})
    endpoint = f"http://{NAME}:{s3.port}"
    spool = new_spool(tmp_path, s3, profile_ini(s3, endpoint))
    bucket = new_bucket(s3)
    env = {"http_proxy": proxy.url, "HTTP_PROXY": "http://127.0.0.1:9"}  # lower case wins
    upload_all(spool, bucket, *PATHS[path], large=path == "lean", **env)
    puts = [e for e in proxy.log if e.kind == Carry.HTTP and e.method == "PUT"]
    assert {e.target for e in puts if "small/" in e.target} == {
        f"http://{NAME}:{s3.port}/{bucket}/{key}" for key in SMALL
    }
    assert all(e.header("expect") is None for e in puts)


def test_proxy_credentials_of_the_profile_work_and_never_show(
    tmp_path: Path, s3: LocalS3, forward_proxy: Start
) -> None:
    """A profile's `proxy = http://user:password@host:port`: requests carry Basic proxy
    authentication; the password appears in no log line, error, record or doctor output."""
    password = "proxy-Pw-9f3e1c"
    proxy = forward_proxy(hosts={NAME: ("127.0.0.1", s3.port)}, auth=("flood", password))
    spool = new_spool(
        tmp_path, s3, profile_ini(s3, f"http://{NAME}:{s3.port}", f"proxy = {proxy.url}")
    )
    bucket = new_bucket(s3)
    upload_all(spool, bucket, large=False)
    shown = doctor(spool).stdout + doctor(spool, "--json").stdout
    texts = [spool.log.read_text(), shown, str(spool.query("SELECT * FROM file_records"))]
    texts += [sup.stderr() for sup in spool.supervisors]
    assert not [t for t in texts if password in t]
    assert all(e.status != 407 for e in proxy.log)


def test_no_proxy_keeps_a_host_direct(tmp_path: Path, s3: LocalS3, forward_proxy: Start) -> None:
    """$NO_PROXY naming the endpoint's address: nothing goes through the proxy set in
    $HTTP_PROXY, on either path."""
    proxy = forward_proxy()
    spool = new_spool(tmp_path, s3, profile_ini(s3, s3.endpoint))
    upload_all(spool, new_bucket(s3), HTTP_PROXY=proxy.url, NO_PROXY="10.0.0.0/8,127.0.0.1")
    assert proxy.log == []


def test_a_proxy_that_does_not_relay_100_continue_costs_no_stall(
    tmp_path: Path, s3: LocalS3, tinyproxy: TinyProxy
) -> None:
    """Through tinyproxy (which swallows the server's 100 Continue, making every botocore PUT
    that sends Expect wait a second), boto3's PUTs and parts send no Expect header at all."""
    with FaultProxy("127.0.0.1", s3.port, record=True) as relay:
        spool = new_spool(tmp_path, s3, profile_ini(s3, relay.endpoint))
        bucket = new_bucket(s3)
        upload_all(spool, bucket, "--boto3-put", HTTP_PROXY=tinyproxy.url)
        connections = [c for c in relay.received_by_connection if c]
    puts = [h for c in connections for h in c if h.method == "PUT"]
    assert len(puts) >= len(SMALL) + 3  # the small files, and the parts of the large one
    assert [h.target for h in puts if h.header("expect") is not None] == []
    # They did go through tinyproxy: it opened every connection the server saw, and the first
    # request of each came rewritten (a Via header). tinyproxy parses only that one: a later
    # request on a connection the client kept alive is piped on as it came (absolute-form,
    # no Via), so only the first of each connection can show it.
    assert [c[0].target for c in connections if not c[0].header("via")] == []


def test_a_proxy_that_refuses_connect_holds_the_profile_naming_it(
    tmp_path: Path, s3_https: Any, forward_proxy: Start
) -> None:
    """A proxy that refuses the CONNECT: the profile is held as unreachable and the error line
    says the proxy refused the tunnel."""
    proxy = forward_proxy(refuse_connect=True)
    server = s3_https.server
    ini = profile_ini(server, s3_https.endpoint, f"ca_bundle = {s3_https.ca_bundle}")
    spool = new_spool(tmp_path, server, ini)
    spool.start(env=spool.env(HTTPS_PROXY=proxy.url))
    wait_for(lambda: spool.events("profile_paused"), 60, "the profile held")
    [paused] = spool.events("profile_paused")
    assert paused["event"]["reason"] == "unreachable"
    assert "proxy refused CONNECT" in paused["error"]["message"]
    assert "403" in paused["error"]["message"]


# -- IPv6 --------------------------------------------------------------------------------------
def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.parametrize("path", list(PATHS))
def test_an_ipv6_endpoint_is_addressed_and_signed_with_brackets(
    tmp_path: Path, s3: LocalS3, relay_to: Callable[..., Relay], path: str
) -> None:
    """http://[::1]:PORT: the Host header and the signature carry the bracketed address (the
    server checks every signature), on both paths."""
    relay = relay_to(listen_host="::1")
    spool = new_spool(tmp_path, s3, profile_ini(s3, f"http://[::1]:{relay.port}"))
    upload_all(spool, new_bucket(s3), *PATHS[path], large=path == "lean")


# -- Amazon S3 ---------------------------------------------------------------------------------
AMAZON = "*.amazonaws.com"


@pytest.fixture
def amazon(tmp_path: Path, moto: MotoServer, forward_proxy: Start) -> Iterator[tuple[Spool, Any]]:
    """A profile of provider amazon with no endpoint: Amazon's own host names, reached through
    the suite's proxy, which terminates their TLS (a certificate from the suite's CA) and hands
    the requests to moto. `eu-bucket-*` lives in eu-west-1."""
    proxy = forward_proxy(
        terminate={AMAZON: ("127.0.0.1", moto.port)}, regions={"eu-bucket-one": "eu-west-1"}
    )
    ini = (
        "[p1]\nprovider = amazon\n"
        f"aws_access_key_id = {moto.admin.access_key}\n"
        f"aws_secret_access_key = {moto.admin.secret_key}\naws_region = {REGION}\n"
    )
    spool = Spool(tmp_path, moto, {"p1": ini})
    yield spool, proxy
    spool.close()


@pytest.mark.parametrize("path", list(PATHS))
def test_amazon_profiles_take_the_lean_path_virtual_hosted(
    amazon: tuple[Spool, ForwardProxy], moto: MotoServer, ca: CertAuthority, path: str
) -> None:
    """An amazon profile without aws_endpoint: small files go to BUCKET.s3.REGION.amazonaws.com
    over TLS verified with the bucket's host name, virtual-hosted, on the lean path as on
    boto3's; a bucket name with dots goes path-style to s3.REGION.amazonaws.com."""
    spool, proxy = amazon
    env = {"HTTPS_PROXY": proxy.url, "AWS_CA_BUNDLE": str(ca.bundle)}
    bucket = f"amz-{os.urandom(4).hex()}"
    dotted = f"dotted.{os.urandom(4).hex()}.name"
    for name in (bucket, dotted):
        moto.create_bucket(name)
    upload_all(spool, bucket, *PATHS[path], large=path == "lean", **env)
    spool.drop("p1", dotted, "d.txt", b"path-style")
    spool.wait_done("p1", dotted, ["d.txt"])
    puts = [e for e in proxy.log if e.kind == Carry.TLS and e.method == "PUT"]
    virtual = {e.target for e in puts if e.target.endswith(".txt") and bucket in e.target}
    assert virtual == {f"https://{bucket}.s3.{REGION}.amazonaws.com/{k}" for k in SMALL}
    host = f"s3.{REGION}.amazonaws.com"
    assert f"https://{host}/{dotted}/d.txt" in {e.target for e in puts}


def test_a_bucket_in_another_region_is_followed_there(
    amazon: tuple[Spool, ForwardProxy], moto: MotoServer, ca: CertAuthority
) -> None:
    """S3 answers 301 with x-amz-bucket-region for a bucket addressed in the wrong region: the
    lean path follows it there, signed for that region, and the file completes."""
    spool, proxy = amazon
    bucket = "eu-bucket-one"
    moto.create_bucket(bucket)
    spool.start(env=spool.env(HTTPS_PROXY=proxy.url, AWS_CA_BUNDLE=str(ca.bundle)))
    wait_for(lambda: spool.events("startup_drain_queued"), 60, "the start-up drain")
    spool.drop("p1", bucket, "far.txt", b"in Ireland")
    spool.wait_done("p1", bucket, ["far.txt"])
    puts = [e for e in proxy.log if e.kind == Carry.TLS and e.method == "PUT"]
    assert (f"https://{bucket}.s3.{REGION}.amazonaws.com/far.txt", 301) in [
        (e.target, e.status) for e in puts
    ]
    [there] = [
        e for e in puts if e.target == f"https://{bucket}.s3.eu-west-1.amazonaws.com/far.txt"
    ]
    assert there.status == 200 and "/eu-west-1/s3/aws4_request" in (
        there.header("authorization") or ""
    )


# -- outages -----------------------------------------------------------------------------------
def test_one_key_failing_spends_its_retries_while_the_profile_flows(
    tmp_path: Path, s3: LocalS3, forward_proxy: Start
) -> None:
    """A server that fails one key (503 for it alone) while others succeed: that file spends
    its retries and ends in failed/; the profile is never held, the others complete."""
    bucket = new_bucket(s3)
    proxy = forward_proxy(hosts={NAME: ("127.0.0.1", s3.port)}, faults={f"/{bucket}/bad.txt": 503})
    spool = new_spool(tmp_path, s3, profile_ini(s3, f"http://{NAME}:{s3.port}"))
    spool.start("--retry-base", "0.3", "--max-retries", "3", env=spool.env(HTTP_PROXY=proxy.url))
    wait_for(lambda: spool.events("startup_drain_queued"), 60, "the start-up drain")
    spool.drop("p1", bucket, "bad.txt", b"refused every time")
    deadline = time.monotonic() + 30
    good = []
    while not spool.path("failed", "p1", bucket, "bad.txt").exists():
        assert time.monotonic() < deadline, "bad.txt never failed"
        key = f"good/{len(good)}.txt"
        spool.drop("p1", bucket, key, b"fine")
        good.append(key)
        time.sleep(0.2)  # a steady trickle of other files between the bad one's retries
    spool.wait_done("p1", bucket, good, timeout=60)
    [record] = spool.records("bad.txt")
    assert (record["current_state"], record["reason"], record["retry_count"]) == (
        "failed",
        "SlowDown",
        3,
    )
    assert spool.events("profile_paused") == []
