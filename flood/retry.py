"""How long to wait before retry n: backoff's exponential schedule with full jitter."""

from __future__ import annotations

import itertools

import backoff


def base_delay(retry: int, retry_base: float) -> float:
    """d for retry n (from 1): retry_base * 2^(n-1), read off backoff's own generator."""
    wait = backoff.expo(base=2, factor=retry_base)
    next(wait)  # backoff's generators yield once before the sequence starts
    return float(next(itertools.islice(wait, retry - 1, None)))


def delay(retry: int, retry_base: float, max_delay: float | None = None) -> float:
    """Seconds to wait before retry n: d + full_jitter(d), within [d, 2d), capped if asked."""
    d = base_delay(retry, retry_base)
    total = d + backoff.full_jitter(d)
    return min(total, max_delay) if max_delay else total
