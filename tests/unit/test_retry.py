"""The error classification table, row by row, and the retry schedule."""

from __future__ import annotations

import random

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from flood import retry


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "transient", "scope"),
    [
        ("SlowDown", 503, True, "file"),
        ("RequestTimeout", 400, True, "file"),
        ("InternalError", 500, True, "file"),
        ("ServiceUnavailable", 503, True, "file"),
        ("Throttling", 400, True, "file"),
        ("InvalidAccessKeyId", 403, False, "profile"),
        ("SignatureDoesNotMatch", 403, False, "profile"),
        ("AccessDenied", 403, False, "file"),
        ("NoSuchBucket", 404, False, "bucket"),
        ("NotImplemented", 501, False, "file"),
        ("InvalidArgument", 400, False, "file"),
        ("EntityTooLarge", 400, False, "file"),
        ("KeyTooLongError", 400, False, "file"),
        ("SomethingNew", 400, False, "file"),
        ("SomethingNew", 409, False, "file"),
    ],
)
def test_codes_are_classified_before_status(
    code: str, status: int, transient: bool, scope: str
) -> None:
    """Each error code of the table gets its verdict, whatever its HTTP status."""
    verdict = retry.classify(client_error(code, status))
    assert (verdict.transient, verdict.scope, verdict.reason) == (transient, scope, code)


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (429, True),
        (400, False),
        (501, False),
    ],
)
def test_unknown_codes_fall_back_to_the_status(status: int, transient: bool) -> None:
    """A code the table does not know is retried only for 500, 502, 503, 504 and 429."""
    assert retry.classify(client_error("Odd", status)).transient is transient


@pytest.mark.parametrize(("code", "reason"), [("403", "AccessDenied"), ("404", "NotFound")])
def test_head_answers_without_body_are_read_by_status(code: str, reason: str) -> None:
    """HEAD errors carry only '403'/'404' as code: the status decides, never retried."""
    verdict = retry.classify(client_error(code, int(code)))
    assert (verdict.transient, verdict.reason) == (False, reason)


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ],
)
def test_connection_failures_are_transient(exc: Exception) -> None:
    """Refused, reset and timed-out connections are retried."""
    assert retry.classify(exc).transient


def test_wrapped_errors_are_unwrapped() -> None:
    """boto3's S3UploadFailedError (multipart) is classified by the error behind it."""
    try:
        try:
            raise client_error("SlowDown", 503)
        except ClientError as inner:
            raise S3UploadFailedError("Failed to upload") from inner
    except S3UploadFailedError as outer:
        assert retry.classify(outer).reason == "SlowDown"


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
