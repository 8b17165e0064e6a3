"""The audit's pure parts: the token bucket's pace on a fake clock, what counts as a
difference between a record and an object, and the pace option's spelling."""

from __future__ import annotations

import pytest

from flood import units
from flood.audit import Seen, TokenBucket, compare
from flood.states import Field


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return False


def test_token_bucket_spaces_takes_by_one_over_the_rate() -> None:
    """At 4 a second, 9 takes in a row last exactly 2 s: the first goes at once, each next
    one waits a quarter second."""
    clock = FakeClock()
    bucket = TokenBucket(4.0, clock=clock, wait=clock.wait)
    assert all(bucket.take() for _ in range(9))
    assert clock.now - 100.0 == pytest.approx(2.0)
    assert clock.waits == pytest.approx([0.25] * 8)


def test_token_bucket_does_not_save_up_more_than_its_burst() -> None:
    """After a long idle spell only `burst` takes go at once; the next waits again."""
    clock = FakeClock()
    bucket = TokenBucket(2.0, burst=1, clock=clock, wait=clock.wait)
    bucket.take()
    clock.now += 60
    assert bucket.take() and clock.waits == []
    assert bucket.take() and clock.waits == pytest.approx([0.5])


def test_token_bucket_take_is_false_when_its_wait_is_interrupted() -> None:
    """A wait that returns True (the supervisor stopping) ends the take without a token."""
    clock = FakeClock()
    bucket = TokenBucket(1.0, clock=clock, wait=lambda seconds: True)
    assert bucket.take() is True
    assert bucket.take() is False


@pytest.mark.parametrize(
    ("was", "now", "differs"),
    [
        (Seen(5, "abc", None), Seen(5, "abc", None), ()),
        (Seen(5, "abc", None), Seen(6, "abc", None), (Field.SIZE,)),
        (Seen(5, "abc", None), Seen(5, "def", None), (Field.ETAG,)),
        (Seen(5, None, None), Seen(5, "def", None), ()),  # no ETag on record: not compared
        (Seen(5, "a-2", "crc32:AAAA-2"), Seen(5, "a-2", "crc32:AAAA"), ()),  # -N ignored
        (Seen(5, "a-2", "crc32:AAAA-2"), Seen(5, "a-2", "crc32:BBBB-2"), (Field.CHECKSUM,)),
        (Seen(5, "a-2", "crc32:AAAA-2"), Seen(5, "a-2", None), ()),  # not reported: not compared
        (Seen(5, "abc", None), Seen(7, "def", None), (Field.SIZE, Field.ETAG)),
    ],
)
def test_compare_names_what_differs_of_what_both_sides_know(
    was: Seen, now: Seen, differs: tuple[Field, ...]
) -> None:
    """Size, ETag and checksum differ only where the record has the value and the server
    reports it; a checksum's -N part count does not count."""
    assert compare(was, now) == differs


def test_seen_text_leaves_out_what_is_unknown() -> None:
    """An object's one-line form names size, ETag and checksum where known."""
    assert Seen(5, "abc", "crc32:AAAA-1").text() == "size 5, ETag abc, crc32 AAAA-1"
    assert Seen(None, None, None).text() == "-"


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("10/s", 10.0), ("10", 10.0), ("0.5/s", 0.5), ("600/m", 10.0), ("3600/h", 1.0)],
)
def test_paces_are_read_per_second(text: str, per_second: float) -> None:
    """A pace is N/s, N/m, N/h or a plain number a second."""
    assert units.per_second(text) == per_second


@pytest.mark.parametrize("text", ["0/s", "fast", "10/d", "-1/s", ""])
def test_a_pace_that_is_not_one_is_refused(text: str) -> None:
    """Zero, a word, an unknown unit or a negative pace is a ValueError naming the forms."""
    with pytest.raises(ValueError, match="pace"):
        units.per_second(text)
