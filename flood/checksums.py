"""The integrity checks a part (or an object) carries for the server to verify, and the values
Flood expects back: Content-MD5 always, and one of S3's flexible checksums where a profile's
`checksum` key asks for it (CRC32C and CRC64NVME through awscrt)."""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

ALGORITHMS = ("md5", "crc32", "crc32c", "crc64nvme", "sha256")
# Which each provider verifies, from its documentation (README, "Per-part checksums"):
# B2 refuses every x-amz-checksum-* header with 400; R2 takes CRC32, CRC32C and SHA-256 per
# part (composite) and CRC64NVME for the whole object; Amazon takes them all.
SUPPORTED = {
    "amazon": ALGORITHMS,
    "cloudflare": ALGORITHMS,
    "backblaze": ("md5",),
}
_NEEDS_CRT = ("crc32c", "crc64nvme")


class Hasher(Protocol):
    def update(self, data: bytes) -> None: ...
    def digest(self) -> bytes: ...


@dataclass(frozen=True)
class Checksum:
    """One flexible checksum algorithm as S3 names it."""

    name: str  # md5 | crc32 | ...
    s3_name: str  # CRC32, CRC32C, CRC64NVME, SHA256 (ChecksumAlgorithm)
    full_object: bool  # the object's checksum is of its whole bytes, not of the parts'

    @property
    def field(self) -> str:
        """boto3's parameter and answer key: ChecksumCRC32C, ..."""
        return f"Checksum{self.s3_name}"

    def hasher(self) -> Hasher:
        return _hasher(self.name)

    def of(self, data: bytes) -> str:
        """The base64 checksum of these bytes, as the x-amz-checksum-* header carries it."""
        hasher = self.hasher()
        hasher.update(data)
        return base64.b64encode(hasher.digest()).decode("ascii")

    def composite(self, parts: Sequence[str]) -> str:
        """What S3 answers for an object whose parts had these checksums: for a composite type
        the checksum of the parts' binary checksums, then -N."""
        hasher = self.hasher()
        for part in parts:
            hasher.update(base64.b64decode(part))
        return f"{base64.b64encode(hasher.digest()).decode('ascii')}-{len(parts)}"


def named(name: str) -> Checksum | None:
    """The flexible checksum for a profile's `checksum` value (None for md5: Content-MD5 only)."""
    if name == "md5":
        return None
    return Checksum(name, name.upper(), full_object=name == "crc64nvme")


def unavailable(name: str) -> str | None:
    """Why this machine cannot compute the algorithm (None when it can)."""
    if name not in _NEEDS_CRT:
        return None
    try:
        import awscrt.checksums  # noqa: F401 - only whether it imports
    except ImportError:
        return f"checksum {name} needs awscrt (pip install 'flood-s3[crt]', or awscrt)"
    return None


def composite_etag(md5s: Sequence[str]) -> str:
    """The multipart ETag S3 (and R2, SeaweedFS, moto) answer: the MD5 of the parts' binary
    MD5s, then -N."""
    digest = hashlib.md5(usedforsecurity=False)
    for part in md5s:
        digest.update(bytes.fromhex(part))
    return f"{digest.hexdigest()}-{len(md5s)}"


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


class _Crt:
    """CRC32C and CRC64NVME from awscrt, incremental."""

    def __init__(self, name: str) -> None:
        from awscrt import checksums

        self.function: Any = getattr(checksums, name)
        self.width = 8 if name == "crc64nvme" else 4
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = self.function(data, self.value)

    def digest(self) -> bytes:
        return int(self.value).to_bytes(self.width, "big")


def _hasher(name: str) -> Hasher:
    if name == "crc32":
        return _Crc32()
    if name in _NEEDS_CRT:
        return _Crt(name)
    if name == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum {name!r}")
