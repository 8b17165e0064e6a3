"""Human quantities read one way everywhere: durations, sizes and rates; and how a large file
is cut into parts and what its parts add up to."""

from __future__ import annotations

import base64
import hashlib
import zlib

import pytest

from flood import checksums, units
from flood.multipart import plan

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("250ms", 0.25), ("45", 45),
     (" 1.5h ", 5400), (0, 0)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    """Durations as the config file and the flags take them."""
    assert units.duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "-3s", "1w", "nan"])
def test_what_is_no_duration(text: str) -> None:
    """Anything else is refused, saying what is accepted."""
    with pytest.raises(ValueError, match="duration"):
        units.duration(text)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("50MB/s", 50e6), ("400Mbit/s", 50e6), ("10MiB/s", 10 * MiB), ("1GB/s", 1e9),
     ("800kbit/s", 1e5), ("4MB/sec", 4e6)],
)  # fmt: skip
def test_rates_in_bytes_per_second(text: str, rate: float) -> None:
    """MB is 10^6 bytes, MiB 2^20, a bit an eighth of a byte."""
    assert units.rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["50MB", "fast", "0MB/s", "50/s", "50MB/h"])
def test_what_is_no_rate(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        units.rate(text)


def test_sizes() -> None:
    """Sizes in bytes, with decimal and binary prefixes."""
    assert (units.size("8MiB"), units.size("5MB"), units.size("1024")) == (8 * MiB, 5e6, 1024)
    with pytest.raises(ValueError):
        units.size("8Mbit")


def test_parts_are_equal_but_the_last_and_grow_past_ten_thousand() -> None:
    """A file is cut into parts of the part size, the last one shorter (R2 requires it); a
    file that would need more than 10,000 parts gets larger parts, in whole MiB."""
    cut = plan(21 * MiB, 8 * MiB)
    assert cut.count == 3 and [cut.extent(n) for n in (1, 2, 3)] == [
        (0, 8 * MiB),
        (8 * MiB, 8 * MiB),
        (16 * MiB, 5 * MiB),
    ]
    huge = plan(100_000 * MiB, 8 * MiB)
    assert huge.part_size == 10 * MiB and huge.count == 10_000
    assert plan(8 * MiB, 8 * MiB).count == 1


def test_the_composite_etag_and_checksum_are_s3s() -> None:
    """The multipart ETag is the MD5 of the parts' binary MD5s, then -N; a composite checksum
    is the checksum of the parts' binary checksums, then -N."""
    parts = [b"a" * 10, b"b" * 7]
    md5s = [hashlib.md5(p).hexdigest() for p in parts]
    joined = b"".join(hashlib.md5(p).digest() for p in parts)
    assert checksums.composite_etag(md5s) == f"{hashlib.md5(joined).hexdigest()}-2"
    crc = checksums.named("crc32")
    assert crc is not None and not crc.full_object and crc.field == "ChecksumCRC32"
    each = [crc.of(p) for p in parts]
    assert each[0] == base64.b64encode(zlib.crc32(parts[0]).to_bytes(4, "big")).decode()
    inner = b"".join(base64.b64decode(c) for c in each)
    expected = base64.b64encode(zlib.crc32(inner).to_bytes(4, "big")).decode()
    assert crc.composite(each) == f"{expected}-2"
    assert checksums.named("md5") is None
    full = checksums.named("crc64nvme")
    assert full is not None and full.full_object


def test_awscrt_checksums_are_the_known_values() -> None:
    """CRC32C and CRC64NVME (through awscrt) give the standard check values of b'123456789'."""
    pytest.importorskip("awscrt")
    crc32c, crc64 = checksums.named("crc32c"), checksums.named("crc64nvme")
    assert crc32c is not None and crc64 is not None
    assert base64.b64decode(crc32c.of(b"123456789")).hex() == "e3069283"
    assert base64.b64decode(crc64.of(b"123456789")).hex() == "ae8b14860a799888"
