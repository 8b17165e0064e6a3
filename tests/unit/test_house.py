"""The house rules, checked on the source: one door per concern. Core modules never import
the commands or the test harness; only records touches the database; only the lean client
speaks HTTP on raw sockets; only flood.verdict decides what an S3 error means."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent.parent
CORE = sorted((TOP / "flood").glob("*.py"))
ROLES = sorted((TOP / "workers").glob("*.py")) + sorted((TOP / "supervisor").glob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; `from a import b` gives a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def named(path: Path) -> str:
    return str(path.relative_to(TOP))


@pytest.mark.parametrize("path", CORE + ROLES, ids=named)
def test_core_and_roles_never_import_the_commands_or_the_harness(path: Path) -> None:
    """flood/commands and flood/testing sit on top of the core: nothing below imports them
    (supervisor/cli.py may use the shared argument helpers, as every command does)."""
    allowed = {"flood.commands", "flood.commands.common"} if path.name == "cli.py" else set()
    bad = {m for m in imports(path) - allowed if m.startswith(("flood.commands", "flood.testing"))}
    assert not bad, f"{named(path)} imports {sorted(bad)}"


@pytest.mark.parametrize(
    ("modules", "owners"),
    [
        (("peewee", "playhouse", "sqlite3", "psycopg"), {"flood/records.py"}),
        (("http.client",), {"flood/lean.py"}),
        # sd_notify's datagrams are the only other socket of the core (not HTTP)
        (("socket",), {"flood/lean.py", "flood/notify.py"}),
    ],
)
def test_one_door_per_concern(modules: tuple[str, ...], owners: set[str]) -> None:
    """The database is records.py's alone; HTTP on raw sockets is the lean client's alone."""
    users = {
        named(path)
        for path in CORE + ROLES
        if any(m == want or m.startswith(want + ".") for m in imports(path) for want in modules)
    }
    assert users == owners


def test_error_meanings_live_in_verdict() -> None:
    """No module but flood/verdict.py holds a table of S3 error codes."""
    codes = ("SlowDown", "InvalidAccessKeyId", "NotImplemented")
    holders = {
        named(path)
        for path in CORE + ROLES + sorted((TOP / "flood" / "commands").glob("*.py"))
        if all(f'"{code}"' in path.read_text() for code in codes)
    }
    assert holders == {"flood/verdict.py"}
