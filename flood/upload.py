"""One file becomes one object: claim, PUT, verify, record, move."""

from __future__ import annotations

import base64
import collections
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
DONE = "done"  # completed/ or failed/: nothing more to do
SKIPPED = "skipped"  # not there any more (a duplicate event), or left waiting in incoming/
RETRY = "retry"  # transient failure or a retry not yet due: run again at `due`
BUSY = "busy"  # the same path is still in processing/: try again shortly, in order
CHANGED = "changed"  # the file changed while it was read: upload again once it settles
MOVE_RETRY = 5.0  # seconds before a file whose final move failed is tried again
BATCH = 32  # files an uploader takes from its queue at once
BATCH_MAX_BYTES = 1024 * 1024  # larger files are not held in memory for a batch
# Bytes of a batch's PUTs in flight at once (always at least one PUT). The next file is read
# and hashed while they are: 1 MiB keeps 32 small PUTs in flight, or one 1 MiB PUT while the
# next is staged, which measured faster on (b) than 2, 4, 8 or 16 MiB (the server is slower
# with more large bodies at once).
WINDOW_BYTES = 1024 * 1024


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

    def __init__(
        self,
        settings: Settings,
        profile: str,
        client: Any,
        log: Any,
        checked_buckets: set[str] | None = None,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.client = client
        self.log = log
        self.layout = Layout(settings.server_dir)
        self.dirs = _Dirs(self.layout)
        self.checked = set(checked_buckets or ())
        self.holds: dict[tuple[str, str], str] = {}
        self.holds_read_at = 0.0
        self.kernel_guards_hardlinks = _protected_hardlinks()
        account = settings.profiles[profile]
        # BATCH connections for the PUTs a batch keeps in flight, one more for the files
        # uploaded one at a time (LeanPut.put), which may come in the middle of a batch.
        self.lean = (
            LeanPut(account, connections=BATCH + 1)
            if settings.lean_put and account.endpoint
            else None
        )
        self.transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
            max_concurrency=settings.multipart_threads,
            use_threads=True,
        )

    # -- entry point ---------------------------------------------------------------------
    def run(self, job: Job, now: float) -> Result:
        ref = FileRef(self.profile, job.bucket, job.key)
        try:
            if job.state != INCOMING:
                return self.resume(ref, now)
            if self.held(ref.bucket, now):
                return Result(SKIPPED)
            taken = self.take(ref)
            if taken is None or isinstance(taken, Result):
                return taken or Result(SKIPPED)
            record_id = self.record_claims([(ref, *taken)])[0]
            return self.attempt(ref, record_id, 0, now)
        finally:
            self.dirs.close()

    # -- several small files at once -----------------------------------------------------
    def run_many(self, jobs: list[Job], now: float) -> list[Result | Exception]:
        """Incoming jobs handled together: the PUTs of the files among them up to
        BATCH_MAX_BYTES go out on separate kept-alive connections without waiting for
        answers, up to WINDOW_BYTES in flight, so the server has them in flight at once (it
        spends far less CPU per PUT then); their claims are recorded in one transaction and
        so are their completions, each written before the files move, as for a single file.
        Each file still has its own claim, proof, move and outcome (an Exception: it
        crashed)."""
        outcomes: list[Result | Exception] = [Result(SKIPPED)] * len(jobs)
        inflight: collections.deque[tuple[int, _Staged, PendingPut]] = collections.deque()
        fds: list[int] = []
        indexes: list[int] = []  # of the proven uploads, in the order of `proven`
        proven: list[tuple[FileRef, int, int, os.stat_result, str | None, float]] = []

        def conclude_oldest() -> None:
            index, staged, pending = inflight.popleft()
            verdict: Result | str | Exception
            try:
                verdict = self.conclude(staged, pending, now)
            except Exception as exc:
                verdict = exc
            if isinstance(verdict, str):
                indexes.append(index)
                proven.append(
                    (
                        staged.ref,
                        staged.record_id,
                        0,
                        staged.before,
                        verdict,
                        time.monotonic() - staged.started,
                    )
                )
            else:
                outcomes[index] = verdict

        assert self.lean is not None
        try:
            for index, ref, record_id in self.claim_all(jobs, now, outcomes):
                try:
                    staged = self.stage(ref, record_id, now)
                except Exception as exc:  # the per-file boundary, as in the role
                    outcomes[index] = exc
                    continue
                if isinstance(staged, Result):
                    outcomes[index] = staged
                    continue
                fds.append(staged.fd)
                while (
                    inflight
                    and len(staged.data) + sum(len(earlier.data) for _, earlier, _ in inflight)
                    > WINDOW_BYTES
                ):
                    conclude_oldest()
                crashpoints.point("after_put_start")
                # A job's index is below BATCH and unique in the batch: its own connection.
                pending = self.lean.start(
                    index, ref.bucket, ref.key, staged.data, staged.content_md5
                )
                inflight.append((index, staged, pending))
            while inflight:
                conclude_oldest()
            if proven:
                done: list[Result | Exception]
                try:
                    done = self.complete_all(proven)
                except Exception as exc:
                    done = [exc] * len(proven)
                for index, outcome in zip(indexes, done, strict=True):
                    outcomes[index] = outcome
        finally:
            for fd in fds:
                os.close(fd)
            self.dirs.close()
        return outcomes

    def claim_all(
        self, jobs: list[Job], now: float, outcomes: list[Result | Exception]
    ) -> list[tuple[int, FileRef, int]]:
        """Claim each incoming job's file, then record the claims in one transaction; the
        claimed ones as (index, ref, record id). Other outcomes go into `outcomes`."""
        taken: list[tuple[int, FileRef, os.stat_result, dt.datetime | None]] = []
        for index, job in enumerate(jobs):
            ref = FileRef(self.profile, job.bucket, job.key)
            try:
                if self.held(ref.bucket, now):
                    continue
                got = self.take(ref)
            except Exception as exc:
                outcomes[index] = exc
                continue
            if isinstance(got, Result):
                outcomes[index] = got
            elif got is not None:
                taken.append((index, ref, *got))
        if not taken:
            return []
        try:
            ids = self.record_claims([(ref, info, created) for _, ref, info, created in taken])
        except Exception as exc:
            for index, *_ in taken:
                outcomes[index] = exc
            return []
        return [
            (index, ref, record_id)
            for (index, ref, _, _), record_id in zip(taken, ids, strict=True)
        ]

    def stage(self, ref: FileRef, record_id: int, now: float) -> Result | _Staged:
        """Open a claimed file and read it if it is small; a Result if this pass ends here
        (failed, vanished, or a larger file uploaded on its own)."""
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
        return _Staged(
            ref,
            record_id,
            fd,
            before,
            data,
            digest.hexdigest(),
            base64.b64encode(digest.digest()).decode("ascii"),
            time.monotonic(),
        )

    def conclude(self, staged: _Staged, pending: PendingPut, now: float) -> Result | str:
        """A started PUT's answer: the proven ETag, or the Result that ends this pass."""
        try:
            etag = pending.result().strip('"')
        except (ClientError, BotoCoreError) as exc:
            return self.failed_attempt(staged.ref, staged.record_id, 0, exc, now)
        return (
            self.check(
                staged.ref,
                staged.record_id,
                0,
                staged.fd,
                staged.before,
                etag,
                etag == staged.md5_hex,
                now,
            )
            or etag
        )

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
            self.log.error(
                "profile_paused" if not bucket else "bucket_paused",
                profile=self.profile,
                bucket=bucket or None,
                reason=reason,
                error=detail,
            )
        self.holds[(self.profile, bucket)] = reason

    # -- claim ---------------------------------------------------------------------------
    def take(self, ref: FileRef) -> tuple[os.stat_result, dt.datetime | None] | Result | None:
        """Move incoming -> processing without overwriting; the file's stat and creation
        date (its claim is recorded next, by record_claims), None if it is not there."""
        parts, name = _split(ref)
        try:
            src = self.dirs.get(INCOMING, parts)
        except FileNotFoundError:
            return None
        except fsops.EscapesTree as exc:
            self.log.warning(
                "path_escapes", profile=ref.profile, bucket=ref.bucket, key=ref.key, reason=str(exc)
            )
            return None
        try:
            dst = self.dirs.get(PROCESSING, parts, create=True)
            fsops.renameat_noreplace(src, name, dst, name)
            info = os.stat(name, dir_fd=dst, follow_symlinks=False)
            created = fsops.creation_date(name, dst)
        except FileNotFoundError:
            return None
        except FileExistsError:
            return Result(BUSY)
        crashpoints.point("after_claim")
        return info, created

    def record_claims(
        self, taken: list[tuple[FileRef, os.stat_result, dt.datetime | None]]
    ) -> list[int]:
        """Record files just claimed (one transaction); their passages' record ids."""
        ids = records.record_claims([(ref, created, info.st_size) for ref, info, created in taken])
        for (ref, info, _), record_id in zip(taken, ids, strict=True):
            self.log.info(
                "file_claimed",
                profile=ref.profile,
                bucket=ref.bucket,
                key=ref.key,
                path=self.layout.path(PROCESSING, ref),
                size=info.st_size,
                record_id=record_id,
            )
        return ids

    def resume(self, ref: FileRef, now: float) -> Result:
        """A file found in processing/: continue its passage, honouring a retry's due time."""
        parts, name = _split(ref)
        try:
            folder = self.dirs.get(PROCESSING, parts)
            info = os.stat(name, dir_fd=folder, follow_symlinks=False)
            created = fsops.creation_date(name, folder)
        except (FileNotFoundError, fsops.EscapesTree):
            return Result(SKIPPED)
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

    def open_claimed(
        self, ref: FileRef, record_id: int, attempt: int
    ) -> tuple[int, os.stat_result] | Result:
        """The claimed file opened for reading (a regular file, checked names), or the Result
        that ends this pass (failed/, vanished)."""
        parts, name = _split(ref)
        try:
            check_bucket(ref.bucket)
            check_key(ref.key)
        except InvalidName as exc:
            return self.fail(ref, record_id, exc.reason, str(exc), attempt)
        try:
            fd, before = fsops.open_regular(name, dir_fd=self.dirs.get(PROCESSING, parts))
        except fsops.NotRegularFile as exc:
            return self.fail(
                ref, record_id, "not_regular_file", f"{exc.kind}, not a regular file", attempt
            )
        except (FileNotFoundError, fsops.EscapesTree):
            return self.vanished(ref, record_id)
        except PermissionError as exc:
            return self.fail(ref, record_id, "unreadable", str(exc), attempt)
        if before.st_nlink > 1 and not self.kernel_guards_hardlinks:
            os.close(fd)
            return self.fail(
                ref,
                record_id,
                "hard_link",
                "file has other hard links and fs.protected_hardlinks is off",
                attempt,
            )
        return fd, before

    def vanished(self, ref: FileRef, record_id: int) -> Result:
        self.log.warning(
            "file_vanished",
            profile=ref.profile,
            bucket=ref.bucket,
            key=ref.key,
            path=self.layout.path(PROCESSING, ref),
            record_id=record_id,
        )
        records.set_state(record_id, "failed", "vanished")
        return Result(SKIPPED)

    def _attempt_open(
        self,
        ref: FileRef,
        record_id: int,
        attempt: int,
        fd: int,
        before: os.stat_result,
        now: float,
    ) -> Result:
        started = time.monotonic()
        try:
            crashpoints.point("after_put_start")
            etag, proven = self.put(fd, before.st_size, ref)
        except (ClientError, BotoCoreError, _Mismatch, OSError) as exc:
            return self.failed_attempt(ref, record_id, attempt, exc, now)
        return self.settle(ref, record_id, attempt, fd, before, etag, proven, now, started)

    def settle(
        self,
        ref: FileRef,
        record_id: int,
        attempt: int,
        fd: int,
        before: os.stat_result,
        etag: str | None,
        proven: bool,
        now: float,
        started: float,
    ) -> Result:
        """After the PUT returned: check(), then record and move."""
        return self.check(ref, record_id, attempt, fd, before, etag, proven, now) or self.complete(
            ref, record_id, attempt, before, etag, time.monotonic() - started
        )

    def check(
        self,
        ref: FileRef,
        record_id: int,
        attempt: int,
        fd: int,
        before: os.stat_result,
        etag: str | None,
        proven: bool,
        now: float,
    ) -> Result | None:
        """After the PUT returned: the source must be unchanged, and the upload proven by its
        answer or by a HEAD. None if it may complete, else the Result that ends this pass."""
        try:
            crashpoints.point("after_put")
            after = os.fstat(fd)
            if _changed(before, after):
                self.log.warning(
                    "source_modified",
                    profile=ref.profile,
                    bucket=ref.bucket,
                    key=ref.key,
                    size=after.st_size,
                )
                return Result(CHANGED, now + self.settings.settle_seconds)
            if not proven or self.settings.verify == "head":
                self.verify(ref, before.st_size)
            crashpoints.point("after_head")
        except (ClientError, BotoCoreError, _Mismatch, OSError) as exc:
            return self.failed_attempt(ref, record_id, attempt, exc, now)
        return None

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
                answer = self.client.put_object(
                    Bucket=ref.bucket, Key=ref.key, Body=data, ContentMD5=content_md5
                )
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
            self.client.abort_multipart_upload(
                Bucket=ref.bucket, Key=ref.key, UploadId=upload["UploadId"]
            )
            self.log.info(
                "multipart_aborted",
                profile=ref.profile,
                bucket=ref.bucket,
                key=ref.key,
                upload_id=upload["UploadId"],
                reason="left by an interrupted attempt",
            )

    def verify(self, ref: FileRef, size: int) -> None:
        """HEAD the object: its size must be the file's. A denied HEAD is logged and accepted."""
        try:
            head = self.client.head_object(Bucket=ref.bucket, Key=ref.key)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (403, 405, 501):
                self.log.info(
                    "verify_skipped",
                    profile=ref.profile,
                    bucket=ref.bucket,
                    key=ref.key,
                    reason=f"http_{status}",
                )
                return
            raise
        if int(head.get("ContentLength", -1)) != size:
            raise _Mismatch(f"object has {head.get('ContentLength')} bytes, file has {size}")

    # -- endings -------------------------------------------------------------------------
    def complete(
        self,
        ref: FileRef,
        record_id: int,
        attempt: int,
        info: os.stat_result,
        etag: str | None,
        seconds: float,
    ) -> Result:
        result = self.complete_all([(ref, record_id, attempt, info, etag, seconds)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def complete_all(
        self, done: list[tuple[FileRef, int, int, os.stat_result, str | None, float]]
    ) -> list[Result | Exception]:
        """Proven uploads (ref, record id, retry number, stat, ETag, seconds): their records
        first (one transaction), then each file's move to completed/ and its outcome (an
        Exception: its move crashed; the others still move)."""
        records.record_completions(
            [
                (record_id, info.st_size, etag, attempt)
                for _, record_id, attempt, info, etag, _ in done
            ]
        )
        crashpoints.point("after_record")
        results: list[Result | Exception] = []
        for ref, record_id, attempt, info, etag, seconds in done:
            try:
                moved = self.finish_or_wait(COMPLETED, ref, record_id, info.st_ino)
            except Exception as exc:  # the per-file boundary
                results.append(exc)
                continue
            if not moved:
                results.append(Result(RETRY, time.time() + MOVE_RETRY))
                continue
            crashpoints.point("after_move_completed")
            self.log.info(
                "upload_succeeded",
                profile=ref.profile,
                bucket=ref.bucket,
                key=ref.key,
                path=self.layout.path(COMPLETED, ref),
                size=info.st_size,
                etag=etag,
                duration=seconds,
                attempt=attempt,
                record_id=record_id,
            )
            results.append(Result(DONE))
        return results

    def fail(self, ref: FileRef, record_id: int, reason: str, error: str, attempt: int) -> Result:
        records.record_failed(record_id, reason, error, attempt)
        crashpoints.point("after_fail_record")
        if not self.finish_or_wait(FAILED, ref, record_id):
            return Result(RETRY, time.time() + MOVE_RETRY)
        crashpoints.point("after_move_failed")
        self.log.error(
            "upload_failed",
            profile=ref.profile,
            bucket=ref.bucket,
            key=ref.key,
            path=self.layout.path(FAILED, ref),
            reason=reason,
            error=error,
            attempt=attempt,
            record_id=record_id,
        )
        return Result(DONE)

    def give_up(self, ref: FileRef, error: str) -> None:
        """A file whose handling keeps raising: failed/ with reason internal_error."""
        row = records.newest(ref, ("processing",))
        if row is not None:
            records.record_failed(int(row.id), "internal_error", error, 0)
        try:
            self.finish(FAILED, ref)
        finally:
            self.dirs.close()
        self.log.error(
            "upload_failed",
            profile=ref.profile,
            bucket=ref.bucket,
            key=ref.key,
            path=self.layout.path(FAILED, ref),
            reason="internal_error",
            error=error,
        )

    def failed_attempt(
        self, ref: FileRef, record_id: int, attempt: int, exc: BaseException, now: float
    ) -> Result:
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
            record_id,
            following,
            dt.datetime.fromtimestamp(due, dt.UTC).replace(tzinfo=None),
            error,
            attempt,
        )
        crashpoints.point("after_retry_record")
        self.log.warning(
            "upload_retry_scheduled",
            profile=ref.profile,
            bucket=ref.bucket,
            key=ref.key,
            reason=verdict.reason,
            error=error,
            attempt=attempt,
            next_attempt=following,
            delay=round(wait, 3),
            record_id=record_id,
        )
        return Result(RETRY, due)

    def finish_or_wait(
        self, state: str, ref: FileRef, record_id: int, inode: int | None = None
    ) -> bool:
        """finish(); if the move fails (disk full, say) the file stays in processing/ and so
        does its record, so the next pass continues this passage instead of starting one."""
        try:
            self.finish(state, ref, inode)
            return True
        except OSError as exc:
            records.set_state(record_id, PROCESSING)
            self.log.error(
                "move_failed",
                profile=ref.profile,
                bucket=ref.bucket,
                key=ref.key,
                path=self.layout.path(PROCESSING, ref),
                reason=state,
                error=f"{type(exc).__name__}: {exc}",
                record_id=record_id,
            )
            return False

    def finish(self, state: str, ref: FileRef, inode: int | None = None) -> None:
        """Move processing -> completed/ or failed/, keeping an older file of the same name as
        key.~N~ (mv --backup=numbered). With `inode`, only that file is moved (what we read)."""
        parts, name = _split(ref)
        src = self.dirs.get(PROCESSING, parts)
        if inode is not None and os.stat(name, dir_fd=src, follow_symlinks=False).st_ino != inode:
            raise _Mismatch(f"processing/{ref.key} is no longer the file that was uploaded")
        dst = self.dirs.get(state, parts, create=True)
        with contextlib.suppress(FileNotFoundError):
            os.stat(name, dir_fd=dst, follow_symlinks=False)
            backup = next_backup(os.listdir(dst), name)
            fsops.renameat_noreplace(dst, name, dst, backup)
        fsops.renameat_noreplace(src, name, dst, name)


class _Dirs:
    """Directory fds of one pass (a job or a batch of them): each chain of O_NOFOLLOW opens
    (fsops.open_dir) is walked once per pass instead of once per step and file. Closed at
    the end of every pass, so no fd outlives it and a directory removed or replaced between
    passes is opened afresh."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.fds: dict[tuple[str, tuple[str, ...]], int] = {}

    def get(self, state: str, parts: list[str], create: bool = False) -> int:
        key = (state, tuple(parts))
        fd = self.fds.get(key)
        if fd is None:
            fd = fsops.open_dir(self.layout.state_dir(state), parts, create=create)
            self.fds[key] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


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
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )


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
