"""The retry schedule: retry n waits within [d, 2d), d doubling from --retry-base."""

from __future__ import annotations

import random

from flood import retry


def test_delays_lie_in_d_to_2d_and_double() -> None:
    """Retry n waits within [d, 2d) with d = base * 2^(n-1), for many seeded draws."""
    random.seed(1234)
    for n in range(1, 11):
        d = 30.0 * 2 ** (n - 1)
        assert retry.base_delay(n, 30.0) == d
        for _ in range(200):
            assert d <= retry.delay(n, 30.0) < 2 * d


def test_delay_cap_bounds_one_wait() -> None:
    """--retry-max-delay caps a single wait."""
    random.seed(7)
    assert retry.delay(10, 30.0, max_delay=3600.0) == 3600.0
    assert retry.delay(1, 30.0, max_delay=3600.0) < 60.0
