"""Large files in parts, driven by Flood through boto3's client: every part carries a check
the server verifies, every finished part is on record at once (a restart sends only what is
missing), and the completed object is proven against what was sent before it counts."""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from flood import checksums, records
from flood.credentials import Profile
from flood.jobs import FileRef
from flood.moves import read_all
from flood.options import NONE, ObjectOptions
from flood.records import Part, Upload
from flood.settings import Settings
from flood.verdict import Mismatch, classify

MAX_PARTS = 10_000


class FileChanged(Exception):
    """The file is shorter than when it was opened (truncated while it was read): it is
    uploaded again once it settles, never completed with other bytes."""


_COMPOSITE = re.compile(r"^[0-9a-f]{32}-\d+$")
_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Plan:
    """How a file is cut: parts of equal size but the last (R2 requires it)."""

    size: int
    part_size: int

    @property
    def count(self) -> int:
        return max(1, math.ceil(self.size / self.part_size))

    def extent(self, number: int) -> tuple[int, int]:
        """Offset and length of part `number` (from 1)."""
        offset = (number - 1) * self.part_size
        return offset, min(self.part_size, self.size - offset)


def plan(size: int, part_size: int) -> Plan:
    """Parts of `part_size`, grown to whole MiB where the file would need more than 10,000."""
    if math.ceil(size / part_size) > MAX_PARTS:
        mib = 1024 * 1024
        part_size = math.ceil(size / MAX_PARTS / mib) * mib
    return Plan(size, part_size)


@dataclass(frozen=True)
class Sent:
    """Every part on the server, and the whole object's checksum where one runs over it."""

    parts: list[Part]
    whole: str | None


@dataclass(frozen=True)
class Outcome:
    """A completed multipart upload, proven: its ETag and the checksum the records keep."""

    etag: str
    checksum: str | None
    version_id: str | None = None


class Multipart:
    """The multipart uploads of one uploader (one profile). Parts are read in order by the
    calling thread (so a whole-object checksum can run over them) and sent by up to
    `parts_in_flight` threads; at most that many parts are in memory at once."""

    def __init__(
        self,
        settings: Settings,
        profile: Profile,
        client: Any,
        log: Any,
    ) -> None:
        self.client = client
        self.log = log
        self.part_size = profile.part_size or settings.part_size
        self.in_flight = profile.parts_in_flight or settings.parts_in_flight
        self.algorithm = profile.checksum
        self.checksum = checksums.named(profile.checksum)
        self.pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="part")

    def upload(
        self,
        fd: int,
        info: os.stat_result,
        ref: FileRef,
        record_id: int,
        options: ObjectOptions = NONE,
    ) -> Outcome:
        """Upload the open file as ref's object (with `options` set on it), continuing the
        passage's upload on record when it is still this file's; the proven outcome, or what
        the failing call raised."""
        cut = plan(info.st_size, self.part_size)
        upload = self.resumable(ref, record_id, info, cut)
        if upload is None:
            upload = self.start(ref, record_id, info, cut, options)
        try:
            sent = self.send(fd, upload, cut)
            return self.complete(ref, upload, sent, info.st_size)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                records.multipart_forget(record_id)  # the server dropped it: start over
            elif not classify(exc).transient:
                self.abort(ref, upload)
            raise

    # -- the upload on record --------------------------------------------------------------
    def resumable(
        self, ref: FileRef, record_id: int, info: os.stat_result, cut: Plan
    ) -> Upload | None:
        """The passage's upload on record, if it is this file's (size, mtime, inode) cut the
        same way with the same checksum, and the server still has it; its parts are those the
        server and the records agree on. A stale one is aborted."""
        found = records.multipart_of(record_id)
        if found is None:
            return None
        same = (found.file_size, found.mtime_ns, found.inode, found.part_size, found.checksum) == (
            info.st_size,
            info.st_mtime_ns,
            info.st_ino,
            cut.part_size,
            self.algorithm,
        )
        if not same:
            self.log.info(
                "multipart_restarted",
                profile=ref.profile,
                bucket=ref.bucket,
                key=ref.key,
                upload_id=found.upload_id,
                reason="the file changed",
            )
            self.abort(ref, found)
            return None
        try:
            listed = dict(self.listed(ref, found.upload_id))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            records.multipart_forget(record_id)
            return None
        kept = {
            n: part
            for n, part in found.parts.items()
            if n in listed and listed[n] == (part.size, part.etag)
        }
        self.log.info(
            "multipart_resumed",
            profile=ref.profile,
            bucket=ref.bucket,
            key=ref.key,
            upload_id=found.upload_id,
            parts_done=len(kept),
            parts=cut.count,
        )
        return Upload(**{**found.__dict__, "parts": kept})

    def listed(self, ref: FileRef, upload_id: str) -> Iterator[tuple[int, tuple[int, str]]]:
        """The parts the server holds: number -> (size, ETag)."""
        marker = 0
        while True:
            answer = self.client.list_parts(
                Bucket=ref.bucket, Key=ref.key, UploadId=upload_id, PartNumberMarker=marker
            )
            for part in answer.get("Parts", []):
                yield int(part["PartNumber"]), (int(part["Size"]), part["ETag"].strip('"'))
            if not answer.get("IsTruncated"):
                return
            marker = int(answer["NextPartNumberMarker"])

    def start(
        self,
        ref: FileRef,
        record_id: int,
        info: os.stat_result,
        cut: Plan,
        options: ObjectOptions = NONE,
    ) -> Upload:
        """A new upload: earlier incomplete uploads of this very key that no record knows are
        aborted first (the file is in our processing/: they are ours, interrupted)."""
        self.abort_leftovers(ref)
        extra: dict[str, Any] = options.params()
        if self.checksum is not None:
            extra["ChecksumAlgorithm"] = self.checksum.s3_name
            if self.checksum.full_object:
                extra["ChecksumType"] = "FULL_OBJECT"
        answer = self.client.create_multipart_upload(Bucket=ref.bucket, Key=ref.key, **extra)
        upload = Upload(
            record_id=record_id,
            bucket=ref.bucket,
            key=ref.key,
            upload_id=answer["UploadId"],
            part_size=cut.part_size,
            file_size=info.st_size,
            mtime_ns=info.st_mtime_ns,
            inode=info.st_ino,
            checksum=self.algorithm,
            parts={},
        )
        records.multipart_started(upload)
        return upload

    # -- the parts -------------------------------------------------------------------------
    def send(self, fd: int, upload: Upload, cut: Plan) -> Sent:
        """Every part on the server, in order: those kept from before (read again to check
        they are still the file's bytes) and the rest, sent `in_flight` at a time, each
        recorded as its answer arrives."""
        whole = self.checksum.hasher() if self.checksum and self.checksum.full_object else None
        done: dict[int, Part] = {}
        running: dict[Future[Part], int] = {}
        for number in range(1, cut.count + 1):
            offset, length = cut.extent(number)
            body = read_all(fd, length, offset) if length else b""
            if len(body) != length:
                raise FileChanged(f"the file ended at part {number} of {cut.count}")
            if whole is not None:
                whole.update(body)
            md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
            kept = upload.parts.get(number)
            if kept is not None and kept.etag == md5:
                done[number] = kept
                continue
            while len(running) >= self.in_flight:
                self.collect(running, done, upload, block=True)
            running[self.pool.submit(self.put, upload, number, body, md5)] = number
            self.collect(running, done, upload, block=False)
        while running:
            self.collect(running, done, upload, block=True)
        parts = [done[n] for n in range(1, cut.count + 1)]
        digest = base64.b64encode(whole.digest()).decode("ascii") if whole is not None else None
        return Sent(parts, digest)

    def collect(
        self, running: dict[Future[Part], int], done: dict[int, Part], upload: Upload, block: bool
    ) -> None:
        """Record the parts whose answers came; the first failure raises (the others finish
        first, so nothing is left sending)."""
        if not running:
            return
        finished, _ = wait(list(running), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        failure: BaseException | None = None
        for future in finished:
            del running[future]
            try:
                part = future.result()
            except BaseException as exc:
                failure = failure or exc
                continue
            records.part_done(upload.record_id, part)
            done[part.number] = part
        if failure is not None:
            for future in list(running):
                future.exception()  # let the rest finish, so no thread still sends
                if future.exception() is None:
                    part = future.result()
                    records.part_done(upload.record_id, part)
                    done[part.number] = part
                del running[future]
            raise failure

    def put(self, upload: Upload, number: int, body: bytes, md5: str) -> Part:
        """One part, with Content-MD5 (and the profile's checksum) for the server to verify;
        an answered ETag that is an MD5 must be the part's."""
        extra: dict[str, Any] = {"ContentMD5": base64.b64encode(bytes.fromhex(md5)).decode()}
        value = None
        if self.checksum is not None:
            value = self.checksum.of(body)
            extra[self.checksum.field] = value
        answer = self.client.upload_part(
            Bucket=upload.bucket,
            Key=upload.key,
            UploadId=upload.upload_id,
            PartNumber=number,
            Body=body,
            **extra,
        )
        etag = str(answer.get("ETag", "")).strip('"')
        if _MD5.match(etag) and etag != md5:
            raise Mismatch(f"part {number}: the server answered ETag {etag}, the part's MD5 {md5}")
        return Part(number, len(body), etag or md5, value)

    # -- the end ---------------------------------------------------------------------------
    def complete(self, ref: FileRef, upload: Upload, sent: Sent, size: int) -> Outcome:
        """Complete, then prove: the composite ETag where the server answers one, the
        checksum where the parts carried one, and the size always (a HEAD)."""
        parts = sent.parts
        listing: list[dict[str, Any]] = []
        for part in parts:
            entry: dict[str, Any] = {"PartNumber": part.number, "ETag": part.etag}
            if self.checksum is not None and part.checksum and not self.checksum.full_object:
                entry[self.checksum.field] = part.checksum
            listing.append(entry)
        extra: dict[str, Any] = {}
        if self.checksum is not None and self.checksum.full_object:
            extra[self.checksum.field] = sent.whole
            extra["ChecksumType"] = "FULL_OBJECT"
        answer = self.client.complete_multipart_upload(
            Bucket=ref.bucket,
            Key=ref.key,
            UploadId=upload.upload_id,
            MultipartUpload={"Parts": listing},
            **extra,
        )
        records.multipart_forget(upload.record_id)
        etag = str(answer.get("ETag", "")).strip('"')
        if _COMPOSITE.match(etag):
            expected = checksums.composite_etag([p.etag for p in parts])
            if etag != expected:
                raise Mismatch(f"the object's ETag is {etag}, its parts make {expected}")
        checksum = self.prove(ref, sent, answer, size)
        return Outcome(etag, checksum, answer.get("VersionId"))

    def prove(self, ref: FileRef, sent: Sent, answer: Any, size: int) -> str | None:
        """The size by HEAD, and the object's checksum against what the parts carried."""
        extra = {"ChecksumMode": "ENABLED"} if self.checksum is not None else {}
        head = self.client.head_object(Bucket=ref.bucket, Key=ref.key, **extra)
        if int(head.get("ContentLength", -1)) != size:
            raise Mismatch(f"object has {head.get('ContentLength')} bytes, file has {size}")
        if self.checksum is None:
            return None
        expected = (
            sent.whole or ""
            if self.checksum.full_object
            else self.checksum.composite([p.checksum or "" for p in sent.parts])
        )
        told = answer.get(self.checksum.field) or head.get(self.checksum.field)
        if told and told.split("-")[0] != expected.split("-")[0]:
            raise Mismatch(f"the object's {self.checksum.name} is {told}, expected {expected}")
        return f"{self.checksum.name}:{expected}"

    def abort(self, ref: FileRef, upload: Upload) -> None:
        """Abort an upload that will not be continued (best effort: the janitor finishes it)."""
        try:
            self.client.abort_multipart_upload(
                Bucket=ref.bucket, Key=ref.key, UploadId=upload.upload_id
            )
        except ClientError as exc:
            self.log.warning(
                "multipart_abort_failed",
                profile=ref.profile,
                bucket=ref.bucket,
                key=ref.key,
                upload_id=upload.upload_id,
                error=str(exc),
            )
        records.multipart_forget(upload.record_id)

    def abort_leftovers(self, ref: FileRef) -> None:
        """Abort incomplete uploads of this very key that no record of Flood's knows."""
        known = records.upload_ids(ref.bucket)
        answer = self.client.list_multipart_uploads(Bucket=ref.bucket, Prefix=ref.key)
        for found in answer.get("Uploads", []):
            if found.get("Key") != ref.key or found["UploadId"] in known:
                continue
            self.client.abort_multipart_upload(
                Bucket=ref.bucket, Key=ref.key, UploadId=found["UploadId"]
            )
            self.log.info(
                "multipart_aborted",
                profile=ref.profile,
                bucket=ref.bucket,
                key=ref.key,
                upload_id=found["UploadId"],
                reason="left by an interrupted attempt",
            )

    def close(self) -> None:
        self.pool.shutdown(wait=True)
