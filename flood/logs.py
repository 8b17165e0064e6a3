"""Logging: one ECS JSON object per line (or one readable text line), configured once in every
process, secrets scrubbed in both."""

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

from flood.messages import message

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "text")
# The supervisor's choices, for its children (they call configure() with the settings' level
# and file only): set in the environment before the forkserver starts, as metrics' dir is.
FORMAT_ENV = "FLOOD_LOG_FORMAT"
SUCCESSES_ENV = "FLOOD_LOG_SUCCESSES"
# The libraries whose standard-library loggers Flood's own log takes in.
LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "pyinotify", "peewee")
# The two info lines every file makes; --no-log-successes leaves them out (failures, retries
# and holds are always written).
SUCCESS_EVENTS = frozenset({"file_claimed", "upload_succeeded"})
# Fields a text line shows first, in this order; the rest follow sorted.
_TEXT_FIRST = ("profile", "bucket", "key", "path", "size", "duration", "reason", "error")
_COLOURS = {
    "debug": "\x1b[2m",
    "info": "\x1b[32m",
    "warning": "\x1b[33m",
    "error": "\x1b[31m",
    "critical": "\x1b[1;31m",
}
_DIM, _RESET = "\x1b[2m", "\x1b[0m"

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
        action = str(event_dict.pop("event", ""))
        sentence = message(action, event_dict)
        doc: dict[str, Any] = {"event": {"action": action}}
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
            f'{self._encode(self._scrub(sentence))},"ecs.version":"{ECS_VERSION}",'
            f"{body[1:]}"
        )

    def path(self, name: str) -> tuple[str, ...]:
        """Where a keyword goes: its ECS name, or below flood., split at the dots."""
        found = self._paths.get(name)
        if found is None:
            dotted = name if "." in name else _FIELDS.get(name, f"flood.{name}")
            found = self._paths[name] = tuple(dotted.split("."))
        return found


class _TextRenderer:
    """A line for a person: time, level, the sentence, then the event's fields as key=value
    (the key fields first, durations in seconds), secrets scrubbed; colours on a terminal."""

    def __init__(self, redactor: _Redactor, context: dict[str, Any], colours: bool) -> None:
        self._scrub = redactor.scrub
        self._who = f"{context['flood.role']}[{context['process.pid']}]"
        self._colours = colours

    def __call__(self, _: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        action = str(event_dict.pop("event", ""))
        stack = event_dict.pop("exception", None)
        level = _LEVEL_NAMES.get(method, method)
        sentence = self._scrub(message(action, event_dict))
        sentence = sentence.replace("\r", "\\r").replace("\n", "\\n")  # one event, one line
        names = [n for n in _TEXT_FIRST if n in event_dict]
        names += sorted(n for n in event_dict if n not in _TEXT_FIRST)
        fields = " ".join(f"{n}={_text_value(n, self._scrub(event_dict[n]))}" for n in names)
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        stamp += f".{int((now - int(now)) * 1000):03d}Z"
        head, tail = f"{level:<8}", f"[{action}] {fields}".rstrip()
        if self._colours:
            head = f"{_COLOURS.get(level, '')}{head}{_RESET}"
            tail = f"{_DIM}{tail}{_RESET}"
        line = f"{stamp} {head} {self._who} {sentence}  {tail}"
        if stack:
            line += "\n" + "\n".join(f"    {row}" for row in str(self._scrub(stack)).splitlines())
        return line


def _text_value(name: str, value: Any) -> str:
    """One field's value on a text line: seconds for durations, lists joined, quoted when it
    holds spaces or quotes, newlines escaped (one event, one line)."""
    if value is None:
        return "-"
    if name == "duration" or name.endswith("_seconds"):
        try:
            return f"{float(value):.3f}s"
        except (TypeError, ValueError):
            pass
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))
    text = str(value)
    if not text or any(c in text for c in ' "=\n\r\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _drop(names: frozenset[str]) -> Any:
    """A processor that drops the events named (before any rendering work)."""

    def drop(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event_dict.get("event") in names:
            raise structlog.DropEvent
        return event_dict

    return drop


def resolve_format(fmt: str, log_file: str | None) -> str:
    """auto: text when the lines go to a terminal, JSON otherwise (a file, a pipe, journald)."""
    if fmt != "auto":
        return fmt
    return "text" if log_file is None and sys.stdout.isatty() else "json"


def export_options(fmt: str, successes: bool) -> None:
    """The supervisor's format and --log-successes, for the children it is about to start."""
    os.environ[FORMAT_ENV] = fmt
    os.environ[SUCCESSES_ENV] = "1" if successes else "0"


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
    role: str,
    level: str = "info",
    log_file: str | None = None,
    secrets: Iterable[str] = (),
    fmt: str | None = None,
    successes: bool | None = None,
) -> structlog.stdlib.BoundLogger:
    """Set up logging for this process (call once, in the process itself) and return its logger.
    `fmt` (json, text or auto) and `successes` default to what the supervisor exported for its
    children, else auto and on."""
    global _FD
    fmt = resolve_format(fmt or os.environ.get(FORMAT_ENV) or "auto", log_file)
    if successes is None:
        successes = os.environ.get(SUCCESSES_ENV, "1") != "0"
    level_no = logging.getLevelNamesMapping()[level.upper()]
    fd = (
        os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if log_file
        else sys.stdout.fileno()
    )
    if _FD is not None and sys.stdout.fileno() != _FD:
        os.close(_FD)  # configured again (a reload): the old log file fd goes
    _FD = fd
    context = {"process.pid": os.getpid(), "flood.role": role, "service.name": "flood"}
    renderer: Any = (
        _TextRenderer(_Redactor(secrets), context, colours=os.isatty(fd))
        if fmt == "text"
        else _EcsRenderer(_Redactor(secrets), context)
    )
    processors: list[Any] = [] if successes else [_drop(SUCCESS_EVENTS)]
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=lambda *_: _LineWriter(fd),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [_StdlibBridge()]
    quiet_libraries(max(level_no, logging.INFO))
    return structlog.get_logger()  # type: ignore[no-any-return]


def quiet_libraries(level: int = logging.INFO) -> None:
    """The standard library's loggers at `level`: the root and the libraries', whose handlers
    go (they reach ours through the root). botocore's DEBUG output carries the Authorization
    header, so `level` is never below INFO. A level already set is left alone: setLevel clears
    the cache of every logger there is, which in a child of the forkserver copies the pages
    that hold them (flood.workers.preload sets INFO there, once)."""
    for name in ("", *LIBRARIES):
        lib = logging.getLogger(name)
        if name:
            lib.handlers[:] = []
            lib.propagate = True
        if lib.level != level:
            lib.setLevel(level)
