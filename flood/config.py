"""The config file (TOML, read with the standard tomllib and validated whole: a typo is an
error, not a silent default): the supervisor's settings, object options by level and rule,
the spool's lifecycle, and hooks. Secrets stay in the credentials file."""

from __future__ import annotations

import difflib
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flood import options, units
from flood.credentials import Profile
from flood.errors import ConfigError
from flood.options import Levels, ObjectOptions, Rule

TABLES = ("supervisor", "upload", "profiles", "buckets", "rules", "lifecycle", "hooks")
LIFECYCLE_KEYS = (
    "on_success",
    "keep_completed",
    "sweep_interval",
    "requeue_failed_after",
    "requeue_max",
)
HOOK_KEYS = ("on_complete", "on_failure", "hook_timeout", "hook_retries")


@dataclass(frozen=True)
class Lifecycle:
    """What becomes of files once they are done (a bucket's own table overrides keys)."""

    on_success: str = "keep"  # keep | delete: remove the file once its completed record is in
    keep_completed: float | None = None  # seconds a file stays in completed/
    sweep_interval: float = 60.0
    requeue_failed_after: float | None = None  # seconds in failed/ before a transient failure
    requeue_max: int = 3  # ...goes back to incoming/, at most this many times per file


@dataclass(frozen=True)
class Hooks:
    """Commands run after a file completes or fails, with its receipt on stdin."""

    on_complete: tuple[str, ...] = ()
    on_failure: tuple[str, ...] = ()
    timeout: float = 30.0
    retries: int = 5

    @property
    def any(self) -> bool:
        return bool(self.on_complete or self.on_failure)


@dataclass(frozen=True)
class Config:
    """A config file, read and checked."""

    path: Path | None = None
    supervisor: Mapping[str, Any] = field(default_factory=dict)  # [supervisor], as written
    levels: Levels = field(default_factory=Levels)
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    bucket_lifecycle: Mapping[tuple[str, str], Lifecycle] = field(default_factory=dict)
    hooks: Hooks = field(default_factory=Hooks)

    def lifecycle_of(self, profile: str, bucket: str) -> Lifecycle:
        return self.bucket_lifecycle.get((profile, bucket), self.lifecycle)


EMPTY = Config()


def locate(option: str | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """--config, else $FLOOD_CONFIG, else none (every setting from the flags)."""
    env = os.environ if environ is None else environ
    chosen = option or env.get("FLOOD_CONFIG")
    return Path(os.path.abspath(os.path.expanduser(chosen))) if chosen else None


def load(path: Path, profiles: Mapping[str, Profile]) -> Config:
    """Read and check the config file; ConfigError in one line naming the file, the key and
    what is wrong, for anything that cannot be used."""
    return build(path, read(path), profiles)


def read(path: Path) -> dict[str, Any]:
    """The file's TOML, its permissions checked (the [supervisor] table is needed before the
    credentials are read: it may name them)."""
    check_permissions(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not TOML: {exc}") from None
    try:
        _known(data, TABLES, "table")
        _table(data, "supervisor")
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return data


def build(path: Path, data: Mapping[str, Any], profiles: Mapping[str, Profile]) -> Config:
    """The config of a file's TOML, checked against the credentials file's profiles."""
    try:
        return _config(path, data, profiles)
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def check_permissions(path: Path) -> None:
    """Hooks run commands with the daemon's rights: a config file that group or others may
    write, or that neither root nor this user owns, is refused (as sshd refuses loose keys)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"config file {path} may be written by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):o}): chmod go-w it"
        )
    if info.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"config file {path} is owned by uid {info.st_uid}, neither root nor this user "
            f"({os.geteuid()})"
        )


def _config(path: Path, data: Mapping[str, Any], profiles: Mapping[str, Profile]) -> Config:
    _known(data, TABLES, "table")
    supervisor = _table(data, "supervisor")
    everywhere = options.parse(_table(data, "upload"), "[upload]")
    per_profile: dict[str, ObjectOptions] = {}
    for name, table in _table(data, "profiles").items():
        if name not in profiles:
            raise ConfigError(f"[profiles.{name}]: no profile {name!r} in the credentials file")
        _known(_mapping(table, f"[profiles.{name}]"), ("upload",), f"key in [profiles.{name}]")
        per_profile[name] = options.parse(_table(table, "upload"), f"[profiles.{name}.upload]")
    per_bucket: dict[tuple[str, str], ObjectOptions] = {}
    bucket_lifecycle: dict[tuple[str, str], Lifecycle] = {}
    lifecycle = _lifecycle(_table(data, "lifecycle"), "[lifecycle]", Lifecycle())
    for where, table in _table(data, "buckets").items():
        profile, _, bucket = where.partition("/")
        name = f'[buckets."{where}"]'
        if not bucket or "/" in bucket:
            raise ConfigError(f"{name}: a bucket is named PROFILE/BUCKET")
        if profile not in profiles:
            raise ConfigError(f"{name}: no profile {profile!r} in the credentials file")
        _known(_mapping(table, name), ("upload", "lifecycle"), f"key in {name}")
        if "upload" in table:
            upload = _mapping(table["upload"], f"{name[:-1]}.upload]")
            per_bucket[(profile, bucket)] = options.parse(upload, f"{name[:-1]}.upload]")
        if "lifecycle" in table:
            bucket_lifecycle[(profile, bucket)] = _lifecycle(
                table["lifecycle"], f"{name[:-1]}.lifecycle]", lifecycle
            )
    levels = Levels(everywhere, per_profile, per_bucket, _rules(data.get("rules", []), profiles))
    for name, account in profiles.items():
        for where, level in levels.of_profile(name):
            refused = options.refused_by(account.provider, level)
            if refused:
                raise ConfigError(
                    f"{where}: {', '.join(refused)} not supported by {account.provider} "
                    f"(profile {name!r}; see the README's table of object options)"
                )
    return Config(
        path=path,
        supervisor=supervisor,
        levels=levels,
        lifecycle=lifecycle,
        bucket_lifecycle=bucket_lifecycle,
        hooks=_hooks(_table(data, "hooks")),
    )


def _rules(value: Any, profiles: Mapping[str, Profile]) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        raise ConfigError("rules must be an array of tables ([[rules]])")
    found = []
    for n, rule in enumerate(value, 1):
        where = f"[[rules]] {n}"
        if not isinstance(rule, dict):
            raise ConfigError(f"{where} is not a table")
        _known(rule, ("match", "upload"), f"key in {where}")
        match = rule.get("match")
        if not isinstance(match, str) or match.count("/") < 2:
            raise ConfigError(f'{where}: match must be "PROFILE/BUCKET/GLOB", not {match!r}')
        profile = match.split("/", 1)[0]
        if not any(options.glob(profile).match(name) for name in profiles):
            raise ConfigError(f"{where}: match {match!r} names no profile of the credentials file")
        upload = options.parse(_table(rule, "upload"), f"{where} upload")
        found.append(Rule(match, options.glob(match), upload))
    return tuple(found)


def _lifecycle(table: Any, where: str, base: Lifecycle) -> Lifecycle:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    _known(table, LIFECYCLE_KEYS, f"key in {where}")
    changes: dict[str, Any] = {}
    if "on_success" in table:
        if table["on_success"] not in ("keep", "delete"):
            raise ConfigError(
                f'{where}: on_success must be "keep" or "delete", not {table["on_success"]!r}'
            )
        changes["on_success"] = table["on_success"]
    for key in ("keep_completed", "sweep_interval", "requeue_failed_after"):
        if key in table:
            changes[key] = _duration(table[key], f"{where}: {key}")
    if "requeue_max" in table:
        changes["requeue_max"] = _count(table["requeue_max"], f"{where}: requeue_max")
    if changes.get("sweep_interval", 1) == 0:
        raise ConfigError(f"{where}: sweep_interval must be above 0")
    return Lifecycle(**{**base.__dict__, **changes})


def _hooks(table: Mapping[str, Any]) -> Hooks:
    _known(table, HOOK_KEYS, "key in [hooks]")
    commands: dict[str, tuple[str, ...]] = {}
    for key in ("on_complete", "on_failure"):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"[hooks]: {key} must be an array of strings (the command)")
        if value:
            check_executable(value[0], f"[hooks]: {key}")
        commands[key] = tuple(value)
    timeout = _duration(table.get("hook_timeout", 30), "[hooks]: hook_timeout")
    retries = _count(table.get("hook_retries", 5), "[hooks]: hook_retries")
    return Hooks(commands["on_complete"], commands["on_failure"], timeout, retries)


def check_executable(command: str, where: str) -> None:
    """A hook is an absolute path to an executable that group and others may not write."""
    if not os.path.isabs(command):
        raise ConfigError(f"{where}: {command!r} is not an absolute path")
    try:
        info = os.stat(command)
    except OSError as exc:
        raise ConfigError(f"{where}: {command}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode) or not os.access(command, os.X_OK):
        raise ConfigError(f"{where}: {command} is not an executable file")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{where}: {command} may be written by group or others: chmod go-w it")


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return _mapping(data.get(name, {}), name)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a table, not {type(value).__name__}")
    return value


def _known(table: Mapping[str, Any], known: tuple[str, ...], what: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown {what} {key!r}{hint}")


def _duration(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f'{where} must be a duration like "90s", "30m", "12h", "7d"')
    try:
        return units.duration(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where} must be a whole number of 0 or more, not {value!r}")
    return value
