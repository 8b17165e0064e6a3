"""Names the layout accepts and refuses, and numbered backups."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flood.errors import InvalidName
from flood.jobs import FileRef
from flood.layout import Layout, check_bucket, check_key, next_backup


@pytest.mark.parametrize("name", ["abc", "my.bucket-1", "a" * 63, "0ab"])
def test_bucket_names_s3_accepts(name: str) -> None:
    """S3-valid bucket names pass."""
    assert check_bucket(name) == name


@pytest.mark.parametrize(
    "name", ["ab", "a" * 64, "Upper", "under_score", "-lead", "trail-", "dots..twice", "sp ace"]
)
def test_bucket_names_s3_refuses(name: str) -> None:
    """Bucket names S3 would refuse raise InvalidName with reason invalid_bucket."""
    with pytest.raises(InvalidName) as err:
        check_bucket(name)
    assert err.value.reason == "invalid_bucket"


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("a/../b", "invalid_key"),
        ("./a", "invalid_key"),
        ("a//b", "invalid_key"),
        ("a\x01b", "invalid_key"),
        ("line\nbreak", "invalid_key"),
        ("x" * 1025, "key_too_long"),
        ("bad\udcffname", "invalid_utf8"),
    ],
)
def test_keys_refused_with_reason(key: str, reason: str) -> None:
    """Dot segments, empty segments, control characters, over-long and non-UTF-8 keys."""
    with pytest.raises(InvalidName) as err:
        check_key(key)
    assert err.value.reason == reason


def test_key_of_1024_bytes_is_fine() -> None:
    """A key of exactly 1,024 UTF-8 bytes is accepted (S3's limit)."""
    assert check_key("é" * 512)


def test_parse_maps_paths_to_profile_bucket_key(tmp_path: Path) -> None:
    """A path below STATE/P/B/ maps to its key; a shallower one is misplaced (None)."""
    layout = Layout(tmp_path)
    assert layout.parse("incoming", str(tmp_path / "incoming/p/b/x/y.txt")) == FileRef(
        "p", "b", "x/y.txt"
    )
    assert layout.parse("incoming", str(tmp_path / "incoming/p/loose.txt")) is None


def test_backup_name_numbers_like_mv(tmp_path: Path) -> None:
    """The next backup is key.~N~ with N one above the highest taken."""
    (tmp_path / "k").write_text("x")
    assert next_backup(os.listdir(tmp_path), "k") == "k.~1~"
    (tmp_path / "k.~1~").write_text("x")
    (tmp_path / "k.~7~").write_text("x")
    (tmp_path / "kk.~9~").write_text("x")
    assert next_backup(os.listdir(tmp_path), "k") == "k.~8~"
