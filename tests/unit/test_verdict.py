"""The error taxonomy (flood.verdict), row by row: transient or permanent, scope, reason, kind."""

from __future__ import annotations

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from flood import verdict as taxonomy
from flood.verdict import Kind, Mismatch, Scope


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
    verdict = taxonomy.classify(client_error(code, status))
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
    assert taxonomy.classify(client_error("Odd", status)).transient is transient


@pytest.mark.parametrize(("code", "reason"), [("403", "AccessDenied"), ("404", "NotFound")])
def test_head_answers_without_body_are_read_by_status(code: str, reason: str) -> None:
    """HEAD errors carry only '403'/'404' as code: the status decides, never retried."""
    verdict = taxonomy.classify(client_error(code, int(code)))
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
    assert taxonomy.classify(exc).transient


def test_wrapped_errors_are_unwrapped() -> None:
    """boto3's S3UploadFailedError (multipart) is classified by the error behind it."""
    try:
        try:
            raise client_error("SlowDown", 503)
        except ClientError as inner:
            raise S3UploadFailedError("Failed to upload") from inner
    except S3UploadFailedError as outer:
        assert taxonomy.classify(outer).reason == "SlowDown"


def test_head_bucket_404_is_a_missing_bucket() -> None:
    """A 404 to HeadBucket condemns the bucket; the same 404 to HeadObject only the object."""
    bucket = taxonomy.classify(client_error("404", 404), "HeadBucket")
    assert (bucket.scope, bucket.reason, bucket.kind) == (
        Scope.BUCKET,
        "NoSuchBucket",
        Kind.MISSING_BUCKET,
    )
    assert taxonomy.classify(client_error("404", 404), "HeadObject").kind == Kind.MISSING_OBJECT


@pytest.mark.parametrize("code", ["403", "405", "501", "400"])
def test_a_head_the_key_may_not_make_is_skippable(code: str) -> None:
    """Verification accepts a HEAD that is denied or not offered; a 404 or 503 it does not."""
    assert taxonomy.classify(client_error(code, int(code))).object_not_readable
    for other in ("404", "503"):
        assert not taxonomy.classify(client_error(other, int(other))).object_not_readable


def test_own_mismatch_and_local_read_errors_are_transient_for_the_file() -> None:
    """A verification mismatch and a failed read of the file are retried, for that file only."""
    mismatch = taxonomy.classify(Mismatch("object has 3 bytes, file has 4"))
    assert (mismatch.transient, mismatch.scope, mismatch.reason) == (
        True,
        Scope.FILE,
        "verify_mismatch",
    )
    read = taxonomy.classify(OSError(5, "Input/output error"))
    assert (read.transient, read.reason, read.kind) == (True, "read_error", Kind.LOCAL)
    assert taxonomy.classify(BrokenPipeError()).kind == Kind.NETWORK
