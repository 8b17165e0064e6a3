"""How a profile reaches its server, decided once for every path: the CA, the proxy and
$NO_PROXY, and the renewal of refreshing credentials by their own lifetime."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import ReadOnlyCredentials

from flood import connection
from flood.connection import Connection, bypassed, proxy_for, shown_url, verify_for
from flood.credentials import Profile
from flood.errors import ConfigError


def profile(**options: Any) -> Profile:
    base: dict[str, Any] = dict(
        name="p",
        provider="amazon",
        access_key_id="AK",
        secret_access_key="SECRET",
        region="eu-west-1",
        endpoint="https://s3.example.com",
    )
    base.update(options)
    return Profile(**base)


@pytest.mark.parametrize(
    ("host", "no_proxy", "expected"),
    [
        ("s3.example.com", "example.com", True),
        ("s3.example.com", ".example.com", True),
        ("example.com", ".example.com", True),
        ("badexample.com", "example.com", False),
        ("s3.example.com", "other.org, example.com", True),
        ("s3.example.com", "*", True),
        ("10.1.2.3", "10.0.0.0/8", True),
        ("10.1.2.3", "10.1.2.3", True),
        ("11.1.2.3", "10.0.0.0/8", False),
        ("::1", "::1", True),
        ("[::1]", "[::1]", True),
        ("127.0.0.1", "localhost", False),  # no name lookups: botocore and curl agree
        ("s3.example.com", "", False),
        ("s3.example.com", "s3.example.com:9000", True),  # a port in an entry is ignored
    ],
)
def test_no_proxy_names_hosts_domains_addresses_and_networks(
    host: str, no_proxy: str, expected: bool
) -> None:
    """$NO_PROXY as curl reads it: names and domains (leading dot or not), `*`, addresses
    and CIDR networks."""
    assert bypassed(host, no_proxy) is expected


def test_the_proxy_follows_the_scheme_lower_case_first() -> None:
    """$https_proxy wins over $HTTPS_PROXY for an https endpoint, $HTTP_PROXY serves http
    ones, a proxy without a scheme is http://, and the profile's key beats them all."""
    env = {"https_proxy": "low:3128", "HTTPS_PROXY": "http://up:3128", "HTTP_PROXY": "h:8080"}
    assert proxy_for(profile(), "https://s3.example.com", env) == "http://low:3128"
    assert proxy_for(profile(), "http://s3.example.com", env) == "http://h:8080"
    own = profile(proxy="http://mine:1")
    assert proxy_for(own, "https://s3.example.com", env) == "http://mine:1"
    assert (
        proxy_for(profile(), "https://s3.example.com", {**env, "NO_PROXY": "example.com"}) is None
    )


@pytest.mark.parametrize("bad", ["socks5://h:1080", "http://h:port", "http://h:1/path"])
def test_a_proxy_that_is_not_a_url_is_refused_naming_the_variable(bad: str) -> None:
    """A malformed $HTTPS_PROXY is a configuration error that names the variable."""
    with pytest.raises(ConfigError) as info:
        proxy_for(profile(), "https://s3.example.com", {"HTTPS_PROXY": bad})
    assert "$HTTPS_PROXY" in str(info.value)


def test_a_proxy_password_never_shows() -> None:
    """shown_url drops user and password; the profile names the password as a secret."""
    url = "http://flood:s3cr3t-pass@proxy.example.com:3128"
    assert "s3cr3t" not in shown_url(url) and shown_url(url).endswith("proxy.example.com:3128")
    assert "s3cr3t-pass" in profile(proxy=url).secrets()
    assert "s3cr3t" not in repr(profile(proxy=url))


def test_the_ca_comes_from_the_profile_the_environment_or_the_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify_for reads what botocore reads, in its order, and `insecure` turns it off."""
    monkeypatch.setattr(connection, "_aws_config_value", lambda name: None)
    assert verify_for(profile(ca_bundle="/etc/mine.pem"), {"AWS_CA_BUNDLE": "/x"}) == (
        "/etc/mine.pem"
    )
    assert verify_for(profile(ca_bundle="insecure"), {}) is False
    assert verify_for(profile(), {"AWS_CA_BUNDLE": "/x", "REQUESTS_CA_BUNDLE": "/y"}) == "/x"
    assert verify_for(profile(), {"REQUESTS_CA_BUNDLE": "/y"}) == "/y"
    monkeypatch.setattr(connection, "_aws_config_value", lambda name: "/from/config")
    assert verify_for(profile(), {"REQUESTS_CA_BUNDLE": "/y"}) == "/from/config"
    monkeypatch.setattr(connection, "_aws_config_value", lambda name: None)
    assert verify_for(profile(), {}) == connection.system_store()


def test_rotating_credentials_renew_by_their_own_lifetime() -> None:
    """A 15-minute STS session is renewed with a quarter left (not before every request, as
    botocore's 15-minute window would), and blocking only in its last eighth, under a
    minute; a 30-second one renews in its last 7.5 s."""
    calls: list[int] = []

    def fetch(lifetime: float) -> Any:
        def refresh() -> dict[str, Any]:
            calls.append(1)
            expiry = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lifetime)
            return {
                "access_key": f"ASIA{len(calls)}",
                "secret_key": "s",
                "token": "t",
                "expiry_time": expiry.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            }

        return refresh

    creds = connection._Rotating(refresh_using=fetch(900), method="assume-role")
    for _ in range(5):
        assert isinstance(creds.get_frozen_credentials(), ReadOnlyCredentials)
    assert len(calls) == 1
    assert creds._advisory_refresh_timeout == pytest.approx(225, abs=2)
    assert creds._mandatory_refresh_timeout == 60
    short = connection._Rotating(refresh_using=fetch(30), method="assume-role")
    short.get_frozen_credentials()
    assert short._advisory_refresh_timeout == pytest.approx(7.5, abs=0.5)
    assert short._mandatory_refresh_timeout == pytest.approx(3.75, abs=0.5)


def test_static_keys_and_a_token_are_what_both_paths_sign_with() -> None:
    """A profile's keys and session token come out of the connection as frozen credentials,
    the ones the lean client signs with and boto3's session holds."""
    conn = Connection(profile(session_token="TOKEN"), environ={})
    keys = conn.frozen()
    assert (keys.access_key, keys.secret_key, keys.token) == ("AK", "SECRET", "TOKEN")
    boto_keys = conn.boto3_session().get_credentials().get_frozen_credentials()
    assert boto_keys == keys
