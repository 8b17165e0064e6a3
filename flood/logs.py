"""Logging: one ECS JSON object per line, configured once in every process, secrets scrubbed."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog
from ecs_logging import ECS_VERSION

LEVELS = ("debug", "info", "warning", "error", "critical")

# Our keyword names -> ECS field names. Everything else goes below `flood.` so that no key of
# ours can collide with an ECS object (a string `host` against ECS's `host.*`, say).
_FIELDS = {
    "profile": "flood.profile",
    "bucket": "flood.bucket",
    "key": "flood.key",
    "path": "file.path",
    "size": "file.size",
    "error": "error.message",
    "error_type": "error.type",
    "reason": "event.reason",
    "pid": "process.pid",
    "duration": "event.duration",  # in nanoseconds (ECS)
    "exception": "error.stack_trace",  # structlog's format_exc_info
}
_LEVEL_NAMES = {"warn": "warning", "exception": "error", "err": "error", "fatal": "critical"}
_SIGNATURE_RE = re.compile(
    r"(AWS4-HMAC-SHA256\s+Credential=\S+|X-Amz-Signature=[0-9a-fA-F]+|X-Amz-Security-Token=[^&\s]+"
    r"|Signature=[0-9a-fA-F]{16,})"
)
_SIGNATURE_MARKERS = ("AWS4-HMAC-SHA256", "Signature=", "X-Amz-Security-Token=")
REDACTED = "[REDACTED]"
_FD: int | None = None


class _LineWriter:
    """Writes each line with one write(2) on an O_APPEND fd, so processes never interleave."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8", "backslashreplace")
        while data:
            written = os.write(self._fd, data)
            data = data[written:]

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class _Redactor:
    """Replaces every known secret and any request signature with [REDACTED], at any depth."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            for marker in _SIGNATURE_MARKERS:
                if marker in value:
                    return _SIGNATURE_RE.sub(REDACTED, value)
            return value
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value


class _EcsRenderer:
    """The last step of every line: our keywords under their ECS names, nested the way
    Filebeat expands dotted names, secrets scrubbed, the process's own fields added, one JSON
    object out. The layout and ECS version are ecs-logging's (`@timestamp`, `log.level`,
    `message`, `ecs.version` first); built in one pass because it runs for every file
    (ecs-logging's StructlogFormatter, key by key de-dotting, cost about five times as much
    per line)."""

    def __init__(self, redactor: _Redactor, context: dict[str, Any]) -> None:
        self._scrub = redactor.scrub
        self._context = context
        self._second = -1
        self._stamp = ""
        self._paths: dict[str, tuple[str, ...]] = {}  # keyword -> where it goes in the doc
        self._encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str).encode

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    def __call__(self, _: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        message = str(event_dict.pop("event", ""))
        doc: dict[str, Any] = {"event": {"action": message}}
        for name, value in self._context.items():
            _put(doc, self.path(name), value)
        for name, value in event_dict.items():
            if name == "duration":
                value = int(float(value) * 1e9)  # ECS: nanoseconds
            _put(doc, self.path(name), self._scrub(value))
        level = _LEVEL_NAMES.get(method, method)
        body = self._encode(doc)
        return (
            f'{{"@timestamp":"{self._timestamp()}","log.level":"{level}","message":'
            f'{self._encode(self._scrub(message))},"ecs.version":"{ECS_VERSION}",'
            f"{body[1:]}"
        )

    def path(self, name: str) -> tuple[str, ...]:
        """Where a keyword goes: its ECS name, or below flood., split at the dots."""
        found = self._paths.get(name)
        if found is None:
            dotted = name if "." in name else _FIELDS.get(name, f"flood.{name}")
            found = self._paths[name] = tuple(dotted.split("."))
        return found


def _put(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """doc[a][b][c] = value for ("a", "b", "c"); a plain value met on the way is kept."""
    for part in path[:-1]:
        inner = doc.setdefault(part, {})
        if not isinstance(inner, dict):
            return
        doc = inner
    doc[path[-1]] = value


class _StdlibBridge(logging.Handler):
    """Sends records of libraries (botocore, pyinotify, peewee) through the same JSON pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger()
        level = record.levelname.lower() if record.levelname.lower() in LEVELS else "info"
        getattr(log, level)("library_log", logger=record.name, text=record.getMessage())


def configure(
    role: str, level: str = "info", log_file: str | None = None, secrets: Iterable[str] = ()
) -> structlog.stdlib.BoundLogger:
    """Set up logging for this process (call once, in the process itself) and return its logger."""
    global _FD
    level_no = logging.getLevelNamesMapping()[level.upper()]
    fd = (
        os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if log_file
        else sys.stdout.fileno()
    )
    if _FD is not None and sys.stdout.fileno() != _FD:
        os.close(_FD)  # configured again (a reload): the old log file fd goes
    _FD = fd
    structlog.configure(
        processors=[
            structlog.processors.format_exc_info,
            _EcsRenderer(
                _Redactor(secrets),
                {"process.pid": os.getpid(), "flood.role": role, "service.name": "flood"},
            ),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=lambda *_: _LineWriter(fd),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [_StdlibBridge()]
    root.setLevel(max(level_no, logging.INFO))
    # botocore's DEBUG output carries the Authorization header: never below INFO.
    for name in ("botocore", "boto3", "s3transfer", "urllib3", "pyinotify", "peewee"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
        lib.setLevel(max(level_no, logging.INFO))
    return structlog.get_logger()  # type: ignore[no-any-return]
