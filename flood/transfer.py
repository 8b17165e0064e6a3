"""How a claimed file's bytes reach S3 in one request and are proven there: single PUTs (the
lean client or boto3's put_object, behind one interface), and the verifying HEAD."""

from __future__ import annotations

from typing import Any, Protocol

from botocore.exceptions import ClientError

from flood.bandwidth import Bandwidth
from flood.connection import Connection
from flood.jobs import FileRef
from flood.lean import LeanClient
from flood.options import NONE, ObjectOptions
from flood.settings import Settings
from flood.verdict import Mismatch, classify, status_of

# Bytes of single PUTs the lean client keeps in flight at once (always at least one PUT). The
# next file is read and hashed while they are: 1 MiB keeps 32 small PUTs in flight, or one
# 1 MiB PUT while the next is staged, which measured faster on (b) than 2, 4, 8 or 16 MiB
# (the server is slower with more large bodies at once).
WINDOW_BYTES = 1024 * 1024


class Pending(Protocol):
    """A PUT on its way; result() is its ETag, or raises what the call raised; version_id is
    the object's version once answered (where the bucket keeps versions)."""

    version_id: str | None

    def result(self) -> str: ...


class Sender(Protocol):
    """Single PUTs with Content-MD5 and the object's options. `window`: bytes of PUTs it may
    keep in flight at once (0: one at a time, each answered before the next is started)."""

    window: int

    def start(
        self, bucket: str, key: str, body: bytes, content_md5: str, options: ObjectOptions = NONE
    ) -> Pending: ...


class LeanSender:
    """The lean client's PUTs: many in flight on kept-alive connections of its own."""

    window = WINDOW_BYTES

    def __init__(self, client: LeanClient) -> None:
        self.client = client

    def start(
        self, bucket: str, key: str, body: bytes, content_md5: str, options: ObjectOptions = NONE
    ) -> Pending:
        return self.client.start(bucket, key, body, content_md5, options.headers())


class Boto3Sender:
    """boto3's put_object, one at a time (its client is not made to pipeline)."""

    window = 0

    def __init__(self, client: Any) -> None:
        self.client = client  # paced by the profile's Bandwidth.attach(), when it has one

    def start(
        self, bucket: str, key: str, body: bytes, content_md5: str, options: ObjectOptions = NONE
    ) -> Pending:
        return _Boto3Put(self.client, bucket, key, body, content_md5, options)


class _Boto3Put:
    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        body: Any,
        content_md5: str,
        options: ObjectOptions,
    ) -> None:
        self.call = dict(
            Bucket=bucket, Key=key, Body=body, ContentMD5=content_md5, **options.params()
        )
        self.client = client
        self.version_id: str | None = None

    def result(self) -> str:
        answer = self.client.put_object(**self.call)
        self.version_id = answer.get("VersionId")
        return str(answer.get("ETag", ""))


def sender_for(
    settings: Settings, connection: Connection, client: Any, bandwidth: Bandwidth | None = None
) -> Sender:
    """The lean client (unless --boto3-put), else boto3's put_object on `client`."""
    if settings.lean_put:
        return LeanSender(LeanClient(connection, bandwidth))
    return Boto3Sender(client)


def verify(client: Any, ref: FileRef, size: int, log: Any) -> None:
    """HEAD the object: its size must be the file's (Mismatch otherwise). A HEAD the key may
    not make, or the server does not offer, is logged and accepted."""
    try:
        head = client.head_object(Bucket=ref.bucket, Key=ref.key)
    except ClientError as exc:
        if classify(exc, "HeadObject").object_not_readable:
            log.info(
                "verify_skipped",
                profile=ref.profile,
                bucket=ref.bucket,
                key=ref.key,
                reason=f"http_{status_of(exc)}",
            )
            return
        raise
    if int(head.get("ContentLength", -1)) != size:
        raise Mismatch(f"object has {head.get('ContentLength')} bytes, file has {size}")
