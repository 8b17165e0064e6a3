"""One file becomes one object: claim, PUT, verify, record, move."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from flood import crashpoints, fsops, records, retry
from flood.errors import InvalidName
from flood.jobs import FileRef, Job
from flood.layout import (
    COMPLETED,
    FAILED,
    INCOMING,
    PROCESSING,
    Layout,
    check_bucket,
    check_key,
    next_backup,
)
from flood.s3 import MISSING, REJECTED, LeanPut, PendingPut
from flood.s3 import check_bucket as head_bucket
from flood.settings import Settings

# Outcomes of one pass over a job, for the uploader role to act on.
DONE = "done"          # completed/ or failed/: nothing more to do
SKIPPED = "skipped"    # not there any more (a duplicate event), or left waiting in incoming/
RETRY = "retry"        # transient failure or a retry not yet due: run again at `due`
BUSY = "busy"          # the same path is still in processing/: try again shortly, in order
CHANGED = "changed"    # the file changed while it was read: upload again once it settles
MOVE_RETRY = 5.0       # seconds before a file whose final move failed is tried again
BATCH_MAX_BYTES = 256 * 1024  # larger files are not held in memory for a batch
BATCH = 8                     # small files an uploader keeps in flight at once


@dataclass(frozen=True)
class _Staged:
    """A claimed small file, read and hashed, waiting for its PUT to be sent."""

    ref: FileRef
    record_id: int
    fd: int
    before: os.stat_result
    data: bytes
    md5_hex: str
    content_md5: str
    started: float


@dataclass(frozen=True)
class Result:
    outcome: str
    due: float = 0.0


def _protected_hardlinks() -> bool:
    try:
        with open("/proc/sys/fs/protected_hardlinks") as handle:
            return handle.read().strip() == "1"
    except OSError:
        return False


class FileUploader:
    """Uploads the files of one profile; one per uploader process, holding its client."""

    def __init__(self, settings: Settings, profile: str, client: Any, log: Any,
                 checked_buckets: set[str] | None = None) -> None:
        self.settings = settings
        self.profile = profile
        self.client = client
        self.log = log
        self.layout = Layout(settings.server_dir)
        self.checked = set(checked_buckets or ())
        self.holds: dict[tuple[str, str], str] = {}
        self.holds_read_at = 0.0
        self.kernel_guards_hardlinks = _protected_hardlinks()
        account = settings.profiles[profile]
        self.lean = (LeanPut(account, connections=BATCH)
                     if settings.lean_put and account.endpoint else None)
        self.transfer = TransferConfig(multipart_threshold=settings.multipart_threshold,
                                       multipart_chunksize=settings.multipart_chunksize,
                                       max_concurrency=4, use_threads=True)

    # -- entry point ---------------------------------------------------------------------
    def run(self, job: Job, now: float) -> Result:
        ref = FileRef(self.profile, job.bucket, job.key)
        if job.state == INCOMING:
            if self.held(ref.bucket, now):
                return Result(SKIPPED)
            record_id = self.claim(ref)
            if record_id is None or isinstance(record_id, Result):
                return record_id or Result(SKIPPED)
            return self.attempt(ref, record_id, 0, now)
        return self.resume(ref, now)

    # -- several small files at once -----------------------------------------------------
    def run_many(self, jobs: list[Job], now: float) -> list[Result | Exception]:
        """Incoming jobs handled together: the PUTs of the small files among them go out on
        separate kept-alive connections before any answer is read, so the server has them in
        flight at once (it spends far less CPU per PUT then). Each file still has its own
        claim, proof, record and move, and its own outcome (an Exception: it crashed)."""
        outcomes: list[Result | Exception] = [Result(SKIPPED)] * len(jobs)
        inflight: list[tuple[int, _Staged, PendingPut]] = []
        assert self.lean is not None
        for index, job in enumerate(jobs):
            try:
                staged = self.stage(job, now)
            except Exception as exc:  # the per-file boundary, as in the role
                outcomes[index] = exc
                continue
            if isinstance(staged, Result):
                outcomes[index] = staged
                continue
            crashpoints.point("after_put_start")
            pending = self.lean.start(len(inflight), staged.ref.bucket, staged.ref.key,
                                      staged.data, staged.content_md5)
            inflight.append((index, staged, pending))
        for index, staged, pending in inflight:
            try:
                outcomes[index] = self.conclude(staged, pending, now)
            except Exception as exc:
                outcomes[index] = exc
            finally:
                os.close(staged.fd)
        return outcomes

    def stage(self, job: Job, now: float) -> Result | _Staged:
        """Claim and open one incoming file, read it if it is small; a Result if this pass
        ends here (held, gone, failed, or a larger file uploaded on its own)."""
        ref = FileRef(self.profile, job.bucket, job.key)
        if job.state != INCOMING or self.lean is None:
            return self.run(job, now)
        if self.held(ref.bucket, now):
            return Result(SKIPPED)
        record_id = self.claim(ref)
        if record_id is None or isinstance(record_id, Result):
            return record_id or Result(SKIPPED)
        opened = self.open_claimed(ref, record_id, 0)
        if isinstance(opened, Result):
            return opened
        fd, before = opened
        if before.st_size > BATCH_MAX_BYTES:
            try:
                return self._attempt_open(ref, record_id, 0, fd, before, now)
            finally:
                os.close(fd)
        try:
            data = _read_all(fd, before.st_size)
        except BaseException:
            os.close(fd)
            raise
        digest = hashlib.md5(data, usedforsecurity=False)
        return _Staged(ref, record_id, fd, before, data, digest.hexdigest(),
                       base64.b64encode(digest.digest()).decode("ascii"), time.monotonic())

    def conclude(self, staged: _Staged, pending: PendingPut, now: float) -> Result:
        try:
            etag = pending.result().strip('"')
        except (ClientError, BotoCoreError) as exc:
            return self.failed_attempt(staged.ref, staged.record_id, 0, exc, now)
        return self.settle(staged.ref, staged.record_id, 0, staged.fd, staged.before, etag,
                           etag == staged.md5_hex, now, staged.started)

    # -- holds ---------------------------------------------------------------------------
    def held(self, bucket: str, now: float) -> bool:
        """True if the profile or bucket is paused (files stay in incoming/)."""
        if now - self.holds_read_at > 1.0:
            self.holds = records.holds()
            self.holds_read_at = now
        if (self.profile, "") in self.holds or (self.profile, bucket) in self.holds:
            # A cached "held" is read again: the rescan that follows a release must not be
            # skipped on a stale answer (only "not held" is cached, the common case).
            self.holds = records.holds()
            self.holds_read_at = now
            if (self.profile, "") in self.holds or (self.profile, bucket) in self.holds:
                return True
        if bucket not in self.checked:
            return not self.check_new_bucket(bucket)
        return False

    def check_new_bucket(self, bucket: str) -> bool:
        """A bucket directory seen for the first time: HeadBucket it before claiming files.

        Only a definite answer holds files back (missing bucket, rejected key). A server that
        cannot be reached now is no reason to leave files unclaimed: their uploads meet the
        same error and go through the retry schedule, on record."""
        try:
            check_bucket(bucket)
        except InvalidName:
            self.checked.add(bucket)  # its files fail one by one with the reason
            return True
        verdict = head_bucket(self.client, bucket)
        if verdict.status == REJECTED:
            self.pause("", verdict.detail, f"the server refused profile {self.profile}'s key")
            return False
        if verdict.detail == MISSING:
            self.pause(bucket, "NoSuchBucket", f"bucket {bucket} does not exist")
            return False
        self.checked.add(bucket)
        return True

    def pause(self, bucket: str, reason: str, detail: str) -> None:
        if records.hold(self.profile, bucket, reason, detail):
            self.log.error("profile_paused" if not bucket else "bucket_paused",
                           profile=self.profile, bucket=bucket or None, reason=reason, error=detail)
        self.holds[(self.profile, bucket)] = reason

    # -- claim ---------------------------------------------------------------------------
    def claim(self, ref: FileRef) -> int | Result | None:
        """Move incoming -> processing without overwriting; the passage's record id."""
        parts, name = _split(ref)
        try:
            src = fsops.open_dir(self.layout.state_dir(INCOMING), parts)
        except FileNotFoundError:
            return None
        except fsops.EscapesTree as exc:
            self.log.warning("path_escapes", profile=ref.profile, bucket=ref.bucket,
                             key=ref.key, reason=str(exc))
            return None
        try:
            dst = fsops.open_dir(self.layout.state_dir(PROCESSING), parts, create=True)
            try:
                fsops.renameat_noreplace(src, name, dst, name)
                info = os.stat(name, dir_fd=dst, follow_symlinks=False)
                created = fsops.creation_date(name, dst)
            finally:
                os.close(dst)
        except FileNotFoundError:
            return None
        except FileExistsError:
            return Result(BUSY)
        finally:
            os.close(src)
        crashpoints.point("after_claim")
        record_id = records.record_claimed(ref, created, info.st_size)
        self.log.info("file_claimed", profile=ref.profile, bucket=ref.bucket, key=ref.key,
                      path=self.layout.path(PROCESSING, ref), size=info.st_size,
                      record_id=record_id)
        return record_id

    def resume(self, ref: FileRef, now: float) -> Result:
        """A file found in processing/: continue its passage, honouring a retry's due time."""
        parts, name = _split(ref)
        try:
            folder = fsops.open_dir(self.layout.state_dir(PROCESSING), parts)
        except (FileNotFoundError, fsops.EscapesTree):
            return Result(SKIPPED)
        try:
            info = os.stat(name, dir_fd=folder, follow_symlinks=False)
            created = fsops.creation_date(name, folder)
        except FileNotFoundError:
            return Result(SKIPPED)
        finally:
            os.close(folder)
        row = records.record_resumed(ref, created, info.st_size)
        retries = int(row.retry_count or 0)
        if row.next_attempt_at is not None:
            due = row.next_attempt_at.replace(tzinfo=dt.UTC).timestamp()
            if due > now:
                return Result(RETRY, due)
        return self.attempt(ref, int(row.id), retries, now)

    # -- one attempt ---------------------------------------------------------------------
    def attempt(self, ref: FileRef, record_id: int, attempt: int, now: float) -> Result:
        """Upload processing/P/B/key once; `attempt` is the retry number (0: first upload)."""
        opened = self.open_claimed(ref, record_id, attempt)
        if isinstance(opened, Result):
            return opened
        fd, before = opened
        try:
            return self._attempt_open(ref, record_id, attempt, fd, before, now)
        finally:
            os.close(fd)

    def open_claimed(self, ref: FileRef, record_id: int,
                     attempt: int) -> tuple[int, os.stat_result] | Result:
        """The claimed file opened for reading (a regular file, checked names), or the Result
        that ends this pass (failed/, vanished)."""
        parts, name = _split(ref)
        try:
            check_bucket(ref.bucket)
            check_key(ref.key)
        except InvalidName as exc:
            return self.fail(ref, record_id, exc.reason, str(exc), attempt)
        try:
            folder = fsops.open_dir(self.layout.state_dir(PROCESSING), parts)
        except (FileNotFoundError, fsops.EscapesTree):
            return self.vanished(ref, record_id)
        try:
            fd, before = fsops.open_regular(name, dir_fd=folder)
        except fsops.NotRegularFile as exc:
            return self.fail(ref, record_id, "not_regular_file",
                             f"{exc.kind}, not a regular file", attempt)
        except FileNotFoundError:
            return self.vanished(ref, record_id)
        except PermissionError as exc:
            return self.fail(ref, record_id, "unreadable", str(exc), attempt)
        finally:
            os.close(folder)
        if before.st_nlink > 1 and not self.kernel_guards_hardlinks:
            os.close(fd)
            return self.fail(ref, record_id, "hard_link",
                             "file has other hard links and fs.protected_hardlinks is off",
                             attempt)
        return fd, before

    def vanished(self, ref: FileRef, record_id: int) -> Result:
        self.log.warning("file_vanished", profile=ref.profile, bucket=ref.bucket, key=ref.key,
                         path=self.layout.path(PROCESSING, ref), record_id=record_id)
        records.set_state(record_id, "failed", "vanished")
        return Result(SKIPPED)

    def _attempt_open(self, ref: FileRef, record_id: int, attempt: int, fd: int,
                      before: os.stat_result, now: float) -> Result:
        started = time.monotonic()
        try:
            crashpoints.point("after_put_start")
            etag, proven = self.put(fd, before.st_size, ref)
        except (ClientError, BotoCoreError, _Mismatch, OSError) as exc:
            return self.failed_attempt(ref, record_id, attempt, exc, now)
        return self.settle(ref, record_id, attempt, fd, before, etag, proven, now, started)

    def settle(self, ref: FileRef, record_id: int, attempt: int, fd: int,
               before: os.stat_result, etag: str | None, proven: bool, now: float,
               started: float) -> Result:
        """After the PUT returned: unchanged source, proof or HEAD, then record and move."""
        try:
            crashpoints.point("after_put")
            after = os.fstat(fd)
            if _changed(before, after):
                self.log.warning("source_modified", profile=ref.profile, bucket=ref.bucket,
                                 key=ref.key, size=after.st_size)
                return Result(CHANGED, now + self.settings.settle_seconds)
            if not proven or self.settings.verify == "head":
                self.verify(ref, before.st_size)
            crashpoints.point("after_head")
        except (ClientError, BotoCoreError, _Mismatch, OSError) as exc:
            return self.failed_attempt(ref, record_id, attempt, exc, now)
        return self.complete(ref, record_id, attempt, before, etag, time.monotonic() - started)

    def put(self, fd: int, size: int, ref: FileRef) -> tuple[str | None, bool]:
        """PUT the bytes read from fd; the ETag, and whether the answer itself proves the bytes.

        Below the multipart size: one request with Content-MD5, which the server checks
        against what it received (refusing a difference with BadDigest); its ETag must then be
        the MD5 Flood computed from the bytes it read. An ETag that is not an MD5 (SSE-KMS,
        some providers) proves nothing and the caller HEADs the object."""
        if size < self.settings.multipart_threshold:
            data = _read_all(fd, size)
            digest = hashlib.md5(data, usedforsecurity=False)
            content_md5 = base64.b64encode(digest.digest()).decode("ascii")
            if self.lean is not None:
                etag = self.lean.put(ref.bucket, ref.key, data, content_md5)
            else:
                answer = self.client.put_object(Bucket=ref.bucket, Key=ref.key, Body=data,
                                                ContentMD5=content_md5)
                etag = str(answer.get("ETag", ""))
            etag = etag.strip('"')
            return etag, etag == digest.hexdigest()
        self.abort_leftovers(ref)
        with os.fdopen(os.dup(fd), "rb") as handle:
            self.client.upload_fileobj(handle, ref.bucket, ref.key, Config=self.transfer)
        return None, False

    def abort_leftovers(self, ref: FileRef) -> None:
        """Abort incomplete multipart uploads of this very key: the file is in our processing/,
        so they are earlier attempts of ours that a kill or crash interrupted."""
        answer = self.client.list_multipart_uploads(Bucket=ref.bucket, Prefix=ref.key)
        for upload in answer.get("Uploads", []):
            if upload.get("Key") != ref.key:
                continue
            self.client.abort_multipart_upload(Bucket=ref.bucket, Key=ref.key,
                                               UploadId=upload["UploadId"])
            self.log.info("multipart_aborted", profile=ref.profile, bucket=ref.bucket,
                          key=ref.key, upload_id=upload["UploadId"],
                          reason="left by an interrupted attempt")

    def verify(self, ref: FileRef, size: int) -> None:
        """HEAD the object: its size must be the file's. A denied HEAD is logged and accepted."""
        try:
            head = self.client.head_object(Bucket=ref.bucket, Key=ref.key)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (403, 405, 501):
                self.log.info("verify_skipped", profile=ref.profile, bucket=ref.bucket,
                              key=ref.key, reason=f"http_{status}")
                return
            raise
        if int(head.get("ContentLength", -1)) != size:
            raise _Mismatch(f"object has {head.get('ContentLength')} bytes, file has {size}")

    # -- endings -------------------------------------------------------------------------
    def complete(self, ref: FileRef, record_id: int, attempt: int, info: os.stat_result,
                 etag: str | None, seconds: float) -> Result:
        records.record_completed(record_id, info.st_size, etag, attempt)
        crashpoints.point("after_record")
        if not self.finish_or_wait(COMPLETED, ref, record_id, info.st_ino):
            return Result(RETRY, time.time() + MOVE_RETRY)
        crashpoints.point("after_move_completed")
        self.log.info("upload_succeeded", profile=ref.profile, bucket=ref.bucket, key=ref.key,
                      path=self.layout.path(COMPLETED, ref), size=info.st_size, etag=etag,
                      duration=seconds, attempt=attempt, record_id=record_id)
        return Result(DONE)

    def fail(self, ref: FileRef, record_id: int, reason: str, error: str, attempt: int) -> Result:
        records.record_failed(record_id, reason, error, attempt)
        crashpoints.point("after_fail_record")
        if not self.finish_or_wait(FAILED, ref, record_id):
            return Result(RETRY, time.time() + MOVE_RETRY)
        crashpoints.point("after_move_failed")
        self.log.error("upload_failed", profile=ref.profile, bucket=ref.bucket, key=ref.key,
                       path=self.layout.path(FAILED, ref), reason=reason, error=error,
                       attempt=attempt, record_id=record_id)
        return Result(DONE)

    def give_up(self, ref: FileRef, error: str) -> None:
        """A file whose handling keeps raising: failed/ with reason internal_error."""
        row = records.newest(ref, ("processing",))
        if row is not None:
            records.record_failed(int(row.id), "internal_error", error, 0)
        self.finish(FAILED, ref)
        self.log.error("upload_failed", profile=ref.profile, bucket=ref.bucket, key=ref.key,
                       path=self.layout.path(FAILED, ref), reason="internal_error", error=error)

    def failed_attempt(self, ref: FileRef, record_id: int, attempt: int, exc: BaseException,
                       now: float) -> Result:
        """Classify an error: fail now, pause the profile or bucket too, or schedule a retry."""
        verdict = _Mismatch.verdict(exc) or retry.classify(exc)
        error = f"{type(exc).__name__}: {exc}"
        if not verdict.transient:
            if verdict.scope == "profile":
                self.pause("", verdict.reason, f"the server refused profile {self.profile}'s key")
            elif verdict.scope == "bucket":
                self.pause(ref.bucket, verdict.reason, f"bucket {ref.bucket} does not exist")
            return self.fail(ref, record_id, verdict.reason, error, attempt)
        following = attempt + 1
        if following > self.settings.max_retries:
            return self.fail(ref, record_id, verdict.reason, error, attempt)
        wait = retry.delay(following, self.settings.retry_base, self.settings.retry_max_delay)
        due = now + wait
        records.record_retry_scheduled(
            record_id, following, dt.datetime.fromtimestamp(due, dt.UTC).replace(tzinfo=None),
            error, attempt)
        crashpoints.point("after_retry_record")
        self.log.warning("upload_retry_scheduled", profile=ref.profile, bucket=ref.bucket,
                         key=ref.key, reason=verdict.reason, error=error, attempt=attempt,
                         next_attempt=following, delay=round(wait, 3), record_id=record_id)
        return Result(RETRY, due)

    def finish_or_wait(self, state: str, ref: FileRef, record_id: int,
                       inode: int | None = None) -> bool:
        """finish(); if the move fails (disk full, say) the file stays in processing/ and so
        does its record, so the next pass continues this passage instead of starting one."""
        try:
            self.finish(state, ref, inode)
            return True
        except OSError as exc:
            records.set_state(record_id, PROCESSING)
            self.log.error("move_failed", profile=ref.profile, bucket=ref.bucket, key=ref.key,
                           path=self.layout.path(PROCESSING, ref), reason=state,
                           error=f"{type(exc).__name__}: {exc}", record_id=record_id)
            return False

    def finish(self, state: str, ref: FileRef, inode: int | None = None) -> None:
        """Move processing -> completed/ or failed/, keeping an older file of the same name as
        key.~N~ (mv --backup=numbered). With `inode`, only that file is moved (what we read)."""
        parts, name = _split(ref)
        src = fsops.open_dir(self.layout.state_dir(PROCESSING), parts)
        try:
            if inode is not None and os.stat(name, dir_fd=src,
                                             follow_symlinks=False).st_ino != inode:
                raise _Mismatch(f"processing/{ref.key} is no longer the file that was uploaded")
            dst = fsops.open_dir(self.layout.state_dir(state), parts, create=True)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.stat(name, dir_fd=dst, follow_symlinks=False)
                    backup = next_backup(os.listdir(dst), name)
                    fsops.renameat_noreplace(dst, name, dst, backup)
                fsops.renameat_noreplace(src, name, dst, name)
            finally:
                os.close(dst)
        finally:
            os.close(src)


def _split(ref: FileRef) -> tuple[list[str], str]:
    """The directories below STATE/ leading to a file, and its name."""
    *dirs, name = ref.key.split("/")
    return [ref.profile, ref.bucket, *dirs], name


class _Mismatch(Exception):
    """The server holds other bytes than the file: never completed/."""

    @staticmethod
    def verdict(exc: BaseException) -> retry.Verdict | None:
        if isinstance(exc, _Mismatch):
            return retry.Verdict(True, "file", "verify_mismatch")
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
            return retry.Verdict(True, "file", "read_error")
        return None


def _changed(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
        after.st_size, after.st_mtime_ns, after.st_ctime_ns)


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
