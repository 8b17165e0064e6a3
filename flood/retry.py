"""Which errors are transient and which permanent, and how long to wait before retry n."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import cast

import backoff
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    HTTPClientError,
)

# scope: what an error condemns. "file": this file only; "profile": the profile's key;
# "bucket": the bucket. Code first, status second (HEAD answers carry no code of their own).
_BY_CODE: dict[str, tuple[bool, str]] = {
    "SlowDown": (True, "file"),
    "RequestTimeout": (True, "file"),
    "InternalError": (True, "file"),
    "ServiceUnavailable": (True, "file"),
    "Throttling": (True, "file"),
    "ThrottlingException": (True, "file"),
    "RequestTimeTooSkewed": (True, "file"),
    "InvalidAccessKeyId": (False, "profile"),
    "SignatureDoesNotMatch": (False, "profile"),
    "AccessDenied": (False, "file"),
    "NoSuchBucket": (False, "bucket"),
    "NotImplemented": (False, "file"),
    "InvalidArgument": (False, "file"),
    "EntityTooLarge": (False, "file"),
    "KeyTooLongError": (False, "file"),
    "BadDigest": (True, "file"),
    "InvalidDigest": (False, "file"),
}
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Verdict:
    """What to do about one error: retry it or not, whom it condemns, and a stable reason code."""

    transient: bool
    scope: str
    reason: str


def classify(exc: BaseException) -> Verdict:
    """The verdict for an exception raised by an S3 call (walking wrapped causes)."""
    root = _root(exc)
    if isinstance(root, ClientError):
        error = root.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(root.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _BY_CODE:
            transient, scope = _BY_CODE[code]
            return Verdict(transient, scope, code)
        if not status and code.isdigit():
            status = int(code)
        if status in _TRANSIENT_STATUS:
            return Verdict(True, "file", code if not code.isdigit() else f"http_{status}")
        if status == 403:
            return Verdict(False, "file", "AccessDenied")
        if status == 404:
            return Verdict(False, "file", code if not code.isdigit() else "NotFound")
        return Verdict(False, "file", code or f"http_{status}")
    if isinstance(root, ConnectionError | HTTPClientError):
        return Verdict(True, "file", type(root).__name__)
    if isinstance(root, TimeoutError | ConnectionResetError | ConnectionRefusedError):
        return Verdict(True, "file", type(root).__name__)
    return Verdict(False, "file", type(root).__name__)


def _root(exc: BaseException) -> BaseException:
    """The S3 or connection error behind a wrapper such as boto3's S3UploadFailedError."""
    seen: BaseException = exc
    for _ in range(8):
        if isinstance(seen, ClientError | ConnectionError | HTTPClientError):
            return cast(BaseException, seen)  # botocore's classes are untyped (Any)
        following = seen.__cause__ or seen.__context__
        if following is None:
            break
        seen = following
    return exc


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
