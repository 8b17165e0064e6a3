"""The credentials file into Profiles: the keys of the field (tokens, CAs, proxies, roles),
the AWS CLI's spellings, and one clear line for everything that cannot be used."""

from __future__ import annotations

from pathlib import Path

import pytest

from flood import credentials
from flood.errors import ConfigError

BASE = "provider = amazon\naws_access_key_id = AK\naws_secret_access_key = SECRET\naws_region = r\n"


def load(tmp_path: Path, text: str) -> credentials.CredentialsFile:
    path = tmp_path / "credentials"
    path.write_text(text)
    path.chmod(0o600)
    return credentials.load(str(path), environ={"HOME": str(tmp_path / "nohome")})


def refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_field_keys_are_read(tmp_path: Path) -> None:
    """Session token, CA bundle, proxy and endpoint are read; provider names and the AWS
    CLI's region/endpoint_url spellings in any case."""
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    found = load(
        tmp_path,
        "[p]\nprovider = Cloudflare\naws_access_key_id = AK\naws_secret_access_key = S\n"
        "Region = auto\nendpoint_url = https://x.r2.cloudflarestorage.com/\n"
        f"aws_session_token = TOK\nca_bundle = {pem}\nproxy = proxy.lan:3128\n",
    ).profiles["p"]
    assert found.provider == "cloudflare" and found.region == "auto"
    assert found.endpoint == "https://x.r2.cloudflarestorage.com"
    assert found.session_token == "TOK" and found.ca_bundle == str(pem)
    assert found.proxy == "http://proxy.lan:3128"
    assert "TOK" not in repr(found) and "TOK" in found.secrets()


def test_a_role_needs_no_keys_of_its_own(tmp_path: Path) -> None:
    """role_arn with source_profile, or credential_source alone, stand in for the keys."""
    found = load(
        tmp_path,
        f"[src]\n{BASE}"
        "[role]\nprovider = amazon\naws_region = r\nrole_arn = arn:aws:iam::1:role/x\n"
        "source_profile = src\nduration_seconds = 1800\n"
        "[box]\nprovider = amazon\naws_region = r\ncredential_source = EcsContainer\n",
    ).profiles
    assert found["role"].role_arn and not found["role"].static_keys
    assert found["role"].duration_seconds == 1800
    assert found["box"].credential_source == "EcsContainer"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (f"[p]\n{BASE}aws_endpont = https://x\n", ["unknown key aws_endpont", "aws_endpoint?"]),
        (f"[p]\n{BASE}aws_endpoint = s3.example.com\n", ["'p'", "aws_endpoint"]),
        (
            "[p]\nprovider = backblaze\naws_access_key_id = a\naws_secret_access_key = s\n"
            "aws_region = eu west/1\naws_endpoint = https://b\n",
            ["'p'", "aws_region 'eu west/1' is not a region name"],
        ),
        (
            f"[p]\n{BASE}aws_endpoint = https://ACCOUNT_ID.r2.cloudflarestorage.com\n",
            ["'p'", "aws_endpoint", "'account_id.r2.cloudflarestorage.com' is not a host name"],
        ),
        (f"[p]\n{BASE}proxy = socks5://h:1\n", ["'p'", "proxy", "socks5"]),
        (f"[p]\n{BASE}proxy = http://u:pw@h:notaport\n", ["'p'", "proxy"]),
        (f"[p]\n{BASE}ca_bundle = /nonexistent/ca.pem\n", ["'p'", "ca_bundle", "cannot be read"]),
        (
            "[p]\nprovider = amazon\naws_region = r\nrole_arn = arn:aws:iam::1:role/x\n",
            ["'p'", "role_arn", "source_profile"],
        ),
        (
            "[p]\nprovider = amazon\naws_region = r\nrole_arn = a\nsource_profile = nobody\n",
            ["'p'", "source_profile 'nobody'"],
        ),
        (
            "[p]\nprovider = amazon\naws_region = r\ncredential_source = Laptop\n",
            ["'p'", "credential_source"],
        ),
        (
            "[p]\nprovider = backblaze\naws_region = r\naws_endpoint = https://b\n"
            "credential_source = Environment\n",
            ["'p'", "provider = amazon"],
        ),
        ("[p]\nprovider = amazon\naws_region = r\n", ["'p'", "aws_access_key_id"]),
        (f"[p]\n{BASE}duration_seconds = 60\n", ["'p'", "duration_seconds"]),
        (f"[p]\n{BASE}checksum = crc99\n", ["'p'", "checksum", "crc99"]),
        (
            "[p]\nprovider = backblaze\naws_access_key_id = A\naws_secret_access_key = S\n"
            "aws_region = r\naws_endpoint = https://b\nchecksum = crc32\n",
            ["'p'", "checksum crc32 is not supported by backblaze"],
        ),
        (f"[p]\n{BASE}part_size = 1\n", ["'p'", "part_size"]),
        (f"[p]\n{BASE}parts_in_flight = 0\n", ["'p'", "parts_in_flight"]),
        (f"[p]\n{BASE}max_bandwidth = fast\n", ["'p'", "max_bandwidth"]),
    ],
)
def test_what_cannot_be_used_is_one_line_naming_profile_and_key(
    tmp_path: Path, text: str, names: list[str]
) -> None:
    """Each bad value is refused in one line that names the profile and the key."""
    message = refusal(tmp_path, text)
    for name in names:
        assert name in message, message


def test_a_ca_bundle_that_is_not_pem_and_a_proxy_password_never_quoted(tmp_path: Path) -> None:
    """A file that holds no certificate is refused; a refusal never quotes a password."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    assert "holds no PEM certificate" in refusal(tmp_path, f"[p]\n{BASE}ca_bundle = {junk}\n")
    message = refusal(tmp_path, f"[p]\n{BASE}proxy = https://u:hunter2@h:3128\n")
    assert "hunter2" not in message


# -- which file ----------------------------------------------------------------------------------
AWS_CLI_FILE = "[default]\naws_access_key_id = AK\naws_secret_access_key = SECRET\nregion = r\n"


def search(
    tmp_path: Path, env_file: str | None, home_file: str | None
) -> credentials.CredentialsFile:
    """load() with a file at $AWS_SHARED_CREDENTIALS_FILE and/or ~/.aws/credentials, and a
    Flood file at --credentials."""
    env = {"HOME": str(tmp_path / "home")}
    if env_file is not None:
        (tmp_path / "env-file").write_text(env_file)
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "env-file")
    if home_file is not None:
        (tmp_path / "home" / ".aws").mkdir(parents=True)
        (tmp_path / "home" / ".aws" / "credentials").write_text(home_file)
    option = tmp_path / "flood-credentials"
    option.write_text("[flood]\n" + BASE)
    return credentials.load(str(option), environ=env)


def test_an_aws_cli_file_without_providers_is_skipped(tmp_path: Path) -> None:
    """Files of the AWS CLI's search none of whose profiles has a provider key are not Flood's:
    passed over, named, and --credentials is used."""
    found = search(tmp_path, AWS_CLI_FILE, "[work]\nAWS_ACCESS_KEY_ID = AK\n")
    assert found.path == tmp_path / "flood-credentials"
    assert found.source == "--credentials"
    assert sorted(found.profiles) == ["flood"]
    assert found.skipped == (
        f"$AWS_SHARED_CREDENTIALS_FILE ({tmp_path}/env-file: no profile has a provider key, "
        "not Flood's)",
        f"~/.aws/credentials ({tmp_path}/home/.aws/credentials: no profile has a provider key, "
        "not Flood's)",
    )
    assert found.chosen().startswith("first that is Flood's: --credentials; skipped $AWS_SHARED")


def test_a_flood_file_found_by_the_aws_search_still_wins(tmp_path: Path) -> None:
    """~/.aws/credentials with a provider key (any case) is Flood's: used before --credentials."""
    found = search(tmp_path, None, "[home]\nPROVIDER = Amazon\n" + BASE.split("\n", 1)[1])
    assert (found.source, sorted(found.profiles), found.skipped) == (
        "~/.aws/credentials",
        ["home"],
        (),
    )
    assert found.chosen() == "first that exists: ~/.aws/credentials"


def test_a_file_of_flood_and_aws_cli_profiles_is_refused_naming_them(tmp_path: Path) -> None:
    """Some profiles with provider and some without: the search stops there, naming each."""
    mixed = "[flood]\n" + BASE + "[default]\naws_access_key_id = A\n[other]\nregion = r\n"
    with pytest.raises(ConfigError) as info:
        search(tmp_path, mixed, None)
    text = str(info.value)
    assert text.startswith(f"credentials file {tmp_path}/env-file ($AWS_SHARED_CREDENTIALS_FILE)")
    assert "profile 'default' has no 'provider' key" in text
    assert "profile 'other' has no 'provider' key" in text


def test_only_aws_cli_files_and_no_option_is_no_file_found(tmp_path: Path) -> None:
    """Nothing but the AWS CLI's own file: no credentials file found, naming why each was not."""
    (tmp_path / "home" / ".aws").mkdir(parents=True)
    (tmp_path / "home" / ".aws" / "credentials").write_text(AWS_CLI_FILE)
    with pytest.raises(ConfigError) as info:
        credentials.load(None, environ={"HOME": str(tmp_path / "home")})
    assert str(info.value) == (
        "no credentials file found; looked at $AWS_SHARED_CREDENTIALS_FILE (not set), "
        f"~/.aws/credentials ({tmp_path}/home/.aws/credentials: no profile has a provider key, "
        "not Flood's), --credentials (not set)"
    )
