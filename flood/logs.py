"""Logging: one ECS JSON object per line, configured once in every process, secrets scrubbed."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import ecs_logging
import structlog

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
}
_KEEP = ("event", "exception", "exc_info", "level", "@timestamp")
_SIGNATURE_RE = re.compile(
    r"(AWS4-HMAC-SHA256\s+Credential=\S+|X-Amz-Signature=[0-9a-fA-F]+|X-Amz-Security-Token=[^&\s]+"
    r"|Signature=[0-9a-fA-F]{16,})")
_SIGNATURE_MARKERS = ("AWS4-HMAC-SHA256", "Signature=", "X-Amz-Security-Token=")
REDACTED = "[REDACTED]"
_FD: int | None = None
_ROLE = "flood"


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
            if any(marker in value for marker in _SIGNATURE_MARKERS):
                value = _SIGNATURE_RE.sub(REDACTED, value)
            return value
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value

    def __call__(self, _: Any, __: str, event_dict: MutableMapping[str, Any]) -> Any:
        return {k: self.scrub(v) for k, v in event_dict.items()}


def _ecs_fields(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Any:
    """Our keywords under their ECS names, already nested ({"flood": {"profile": ...}}): the
    ECS formatter would otherwise de-dot key by key, the costliest step of a line. The
    event.* fields stay dotted: the formatter takes `event` as the message first."""
    out: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in event_dict.items():
        if name in _KEEP:
            out[name] = value
            continue
        if name == "duration":
            dotted, value = "event.duration", int(float(value) * 1e9)  # ECS: nanoseconds
        else:
            dotted = name if "." in name else _FIELDS.get(name, f"flood.{name}")
        top, _, rest = dotted.partition(".")
        if top == "event" or "." in rest:
            out[dotted] = value
        else:
            nested.setdefault(top, {})[rest] = value
    out["event.action"] = str(event_dict.get("event", ""))
    out.update(nested)
    return out


class _StdlibBridge(logging.Handler):
    """Sends records of libraries (botocore, pyinotify, peewee) through the same JSON pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger()
        level = record.levelname.lower() if record.levelname.lower() in LEVELS else "info"
        getattr(log, level)("library_log", logger=record.name, text=record.getMessage())


def configure(role: str, level: str = "info", log_file: str | None = None,
              secrets: Iterable[str] = ()) -> structlog.stdlib.BoundLogger:
    """Set up logging for this process (call once, in the process itself) and return its logger."""
    global _FD
    level_no = logging.getLevelNamesMapping()[level.upper()]
    fd = (os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
          if log_file else sys.stdout.fileno())
    if _FD is not None and sys.stdout.fileno() != _FD:
        os.close(_FD)  # configured again (a reload): the old log file fd goes
    _FD = fd
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _ecs_fields,
            _Redactor(secrets),
            structlog.processors.format_exc_info,
            ecs_logging.StructlogFormatter(),  # type: ignore[list-item]
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
    global _ROLE
    _ROLE = role
    bind_thread()
    return structlog.get_logger()  # type: ignore[no-any-return]


def bind_thread() -> None:
    """Give this thread the process's log context (contextvars do not cross threads)."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        **{"process.pid": os.getpid(), "flood.role": _ROLE, "service.name": "flood"})
