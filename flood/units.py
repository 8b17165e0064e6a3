"""Human quantities in settings, read one way everywhere: durations ("90s", "30m", "1h",
"7d" or plain seconds), sizes ("8MiB", "5MB" or plain bytes), rates ("50MB/s",
"400Mbit/s") and paces ("10/s", "600/m"). MB and Mbit are powers of ten, MiB powers of two."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?([bB]|bit)?\s*$")
_POWERS = {None: 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_PACE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|m|min|h))?\s*$")
_PER = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, None: 1}


def duration(text: str | float | int) -> float:
    """Seconds in a duration: 90s, 30m, 12h, 7d, 250ms or a plain number of seconds.
    ValueError (saying what is accepted) for anything else, or a negative or endless one."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _DURATION.match(str(text))
        if match is None:
            raise ValueError(f"{text!r} is not a duration (90s, 30m, 12h, 7d or seconds)")
        value = float(match.group(1)) * _SECONDS[match.group(2)]
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{text!r} is not a duration of 0 or more seconds")
    return value


def size(text: str | int) -> int:
    """Bytes in a size: 8MiB, 16MB, 1GiB, 500k or plain bytes (MB = 10^6, MiB = 2^20)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _SIZE.match(str(text))
        if match is None or match.group(3) == "bit":
            raise ValueError(f"{text!r} is not a size (8MiB, 16MB, 1GiB or bytes)")
        value = float(match.group(1)) * _multiplier(match.group(2))
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{text!r} is not a size of 0 or more bytes")
    return int(value)


def rate(text: str) -> float:
    """Bytes per second in a rate: 50MB/s, 400Mbit/s, 10MiB/s (bits are eighths of bytes)."""
    body, slash, per = str(text).strip().partition("/")
    if not slash or per.strip().lower() not in ("s", "sec"):
        raise ValueError(f"{text!r} is not a rate (50MB/s, 400Mbit/s, 10MiB/s)")
    match = _SIZE.match(body)
    if match is None or match.group(3) is None:
        raise ValueError(f"{text!r} is not a rate (50MB/s, 400Mbit/s, 10MiB/s)")
    value = float(match.group(1)) * _multiplier(match.group(2))
    if match.group(3) == "bit":
        value /= 8
    if value <= 0 or not math.isfinite(value):
        raise ValueError(f"{text!r} is not a rate above 0")
    return value


def per_second(text: str) -> float:
    """Events per second in a pace: 10/s, 600/m, 3600/h, or a plain number a second.
    ValueError (saying what is accepted) for anything else, or for a pace of 0."""
    match = _PACE.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a pace (10/s, 600/m, 3600/h)")
    value = float(match.group(1)) / _PER[match.group(2)]
    if value <= 0 or not math.isfinite(value):
        raise ValueError(f"{text!r} is not a pace above 0")
    return value


def _multiplier(prefix: str | None) -> int:
    if prefix is None:
        return 1
    lowered = prefix.lower()
    return _BINARY[lowered] if lowered.endswith("i") else _POWERS[lowered]


def shown_rate(value: float) -> str:
    """A rate as people read it: 50.0 MB/s."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B/s"
