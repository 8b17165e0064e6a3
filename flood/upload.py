"""The upload pipeline: jobs become claimed passages, their bytes go up and are proven, and
each passage ends. A single file is a batch of one; small files share the batch's PUTs."""

from __future__ import annotations

import base64
import collections
import datetime as dt
import errno
import hashlib
import os
import random
import time
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from flood import crashpoints, fsops, options, records, transfer
from flood.endings import HELD_WAIT, Endings
from flood.errors import ConfigError, InvalidName
from flood.holds import Holds
from flood.jobs import FileRef, Job
from flood.layout import Layout, check_bucket, check_key
from flood.moves import Busy, Claimed, Moves, changed, read_all
from flood.multipart import FileChanged, Multipart
from flood.options import OPTIONS_XATTR
from flood.passage import Passage, Result, regular_size
from flood.records import Claim
from flood.settings import Settings
from flood.states import Reason, State, Step
from flood.transfer import Pending, Sender
from flood.verdict import Injected, Mismatch

BATCH = 32  # jobs an uploader takes from its queue at once
BATCH_MAX_BYTES = 1024 * 1024  # larger files are not held in memory beside a batch's PUTs
# What one attempt's upload may raise and still be an answer about this file.
_UPLOAD_ERRORS = (ClientError, BotoCoreError, Mismatch, OSError)


class Uploads:
    """Uploads the files of one profile; one per uploader process, holding its clients."""

    def __init__(
        self,
        settings: Settings,
        profile: str,
        client: Any,
        log: Any,
        *,
        sender: Sender,
        checked_buckets: set[str] | None = None,
    ) -> None:
        self.settings = settings
        self.profile = profile
        self.client = client
        self.log = log
        self.sender = sender
        self.moves = Moves(Layout(settings.server_dir))
        self.holds = Holds(profile, client, log, checked_buckets or set())
        self.endings = Endings(settings, profile, self.moves, self.holds, log)
        self.multipart = Multipart(settings, settings.profiles[profile], client, log)
        self.provider = settings.profiles[profile].provider
        self.random = random.Random().random

    def run(self, jobs: list[Job], now: float) -> list[Result | Exception]:
        """One pass over jobs (files seen in incoming/ or waiting in processing/): each ends in
        a Result, or an Exception where its handling crashed (the others go on)."""
        outcomes: list[Result | Exception] = [Result(Step.SKIPPED)] * len(jobs)
        try:
            started = self.begin(jobs, now, outcomes)
            self.upload_all(started, now, outcomes)
        finally:
            self.moves.end_pass()
        return outcomes

    # -- claims and resumes ----------------------------------------------------------------
    def begin(
        self, jobs: list[Job], now: float, outcomes: list[Result | Exception]
    ) -> list[tuple[int, Passage]]:
        """Claim the incoming jobs' files (their claims recorded in one transaction) and take up
        the due passages of those in processing/: the passages to upload, by job index."""
        started: list[tuple[int, Passage]] = []
        claims: list[tuple[int, FileRef, Claimed]] = []
        for index, job in enumerate(jobs):
            ref = FileRef(self.profile, job.bucket, job.key)
            try:
                if job.state == State.INCOMING:
                    claimed = self.claim(ref, now)
                    if isinstance(claimed, Result):
                        outcomes[index] = claimed
                    elif claimed is not None:
                        claims.append((index, ref, claimed))
                    continue
                resumed = self.resume(ref, now)
            except Exception as exc:  # the per-file boundary, as in the role
                outcomes[index] = exc
                continue
            if isinstance(resumed, Result):
                outcomes[index] = resumed
            else:
                started.append((index, resumed))
        started += self.record_claims(claims, outcomes)
        return sorted(started, key=lambda item: item[0])

    def claim(self, ref: FileRef, now: float) -> Claimed | Result | None:
        """The file moved into processing/, or why not (held, busy, gone, a link on the way)."""
        if self.holds.held(ref.bucket, now):
            return Result(Step.SKIPPED)
        try:
            return self.moves.claim(ref)
        except Busy:
            return Result(Step.BUSY)
        except fsops.EscapesTree as exc:
            self.log.warning(
                "path_escapes", profile=ref.profile, bucket=ref.bucket, key=ref.key, reason=str(exc)
            )
            return None

    def record_claims(
        self, claims: list[tuple[int, FileRef, Claimed]], outcomes: list[Result | Exception]
    ) -> list[tuple[int, Passage]]:
        if not claims:
            return []
        try:
            ids = records.record_claims([Claim(r, c.created, c.info.st_size) for _, r, c in claims])
        except Exception as exc:
            for index, _, _ in claims:
                outcomes[index] = exc
            return []
        started = []
        for (index, ref, claimed), record_id in zip(claims, ids, strict=True):
            self.log.info(
                "file_claimed",
                profile=ref.profile,
                bucket=ref.bucket,
                key=ref.key,
                path=self.moves.layout.path(State.PROCESSING, ref),
                size=claimed.info.st_size,
                record_id=record_id,
            )
            started.append((index, Passage(ref, record_id, 0, regular_size(claimed.info))))
        return started

    def resume(self, ref: FileRef, now: float) -> Passage | Result:
        """A file in processing/: its open passage, unless its next retry is not due yet."""
        if self.holds.waiting(ref.bucket, now):
            return Result(Step.RETRY, now + HELD_WAIT)  # taken up again when the hold lifts
        claimed = self.moves.claimed(ref)
        if claimed is None:
            return Result(Step.SKIPPED)
        row = records.record_resumed(ref, claimed.created, claimed.info.st_size)
        if row.due is not None:
            due = row.due.replace(tzinfo=dt.UTC).timestamp()
            if due > now:
                return Result(Step.RETRY, due)
        return Passage(ref, row.id, row.retries, regular_size(claimed.info))

    # -- the uploads -----------------------------------------------------------------------
    def upload_all(
        self, started: list[tuple[int, Passage]], now: float, outcomes: list[Result | Exception]
    ) -> None:
        """Send each passage's bytes: small files as PUTs kept in flight together (up to the
        sender's window; the next file is read and hashed meanwhile), larger ones alone. Then
        the proven ones complete together."""
        inflight: collections.deque[tuple[int, Passage, Pending]] = collections.deque()
        proven: list[tuple[int, Passage]] = []

        def conclude_oldest() -> None:
            index, p, pending = inflight.popleft()
            self.settle(index, p, self.answered(p, pending, now), now, proven, outcomes)

        try:
            for index, p in started:
                try:
                    ended = self.open(p)
                    if ended is not None:
                        outcomes[index] = ended
                        continue
                    if not self.stage(p):  # a larger file: uploaded on its own, now
                        self.settle(index, p, self.alone(p, now), now, proven, outcomes)
                        continue
                    while inflight and not self.room(inflight, len(p.body)):
                        conclude_oldest()
                    injected = self.inject(p, now)
                    if injected is not None:
                        outcomes[index] = injected
                        continue
                    crashpoints.point("after_put_start")
                    p.started = time.monotonic()
                    pending = self.send(p)
                    inflight.append((index, p, pending))
                except Exception as exc:  # the per-file boundary, as in the role
                    outcomes[index] = exc
            while inflight:
                conclude_oldest()
            self.complete(proven, outcomes)
        finally:
            for _, p in started:
                if p.fd >= 0:
                    os.close(p.fd)

    def room(self, inflight: collections.deque[tuple[int, Passage, Pending]], size: int) -> bool:
        window = self.sender.window
        return bool(window) and size + sum(len(p.body) for _, p, _ in inflight) <= window

    def open(self, p: Passage) -> Result | None:
        """Open the claimed file (a regular file, checked names), or the Result that ends this
        pass (failed/, vanished)."""
        try:
            check_bucket(p.ref.bucket)
            check_key(p.ref.key)
        except InvalidName as exc:
            return self.endings.fail(p, exc.reason, str(exc))
        try:
            p.fd, p.before = self.moves.open(p.ref)
        except fsops.NotRegularFile as exc:
            return self.endings.fail(p, Reason.NOT_REGULAR_FILE, f"{exc.kind}, not a regular file")
        except (FileNotFoundError, fsops.EscapesTree):
            return self.endings.vanished(p)
        except PermissionError as exc:
            return self.endings.fail(p, Reason.UNREADABLE, str(exc))
        p.size = p.before.st_size
        if p.before.st_nlink > 1 and not self.moves.kernel_guards_hardlinks:
            return self.endings.fail(
                p, Reason.HARD_LINK, "file has other hard links and fs.protected_hardlinks is off"
            )
        return self.resolve_options(p)

    def resolve_options(self, p: Passage) -> Result | None:
        """The object's options: the config file's levels and rules, then the file's own (an
        extended attribute, as flood-copy writes it). Options that cannot be used fail the file
        with the reason; they never reach the server."""
        try:
            own = options.from_json(_own_options(p.fd))
            if own is not None:
                refused = options.refused_by(self.provider, own)
                if refused:
                    why = f"{', '.join(refused)} not supported by {self.provider}"
                    return self.endings.fail(p, Reason.UNSUPPORTED_OPTION, why)
        except (ValueError, ConfigError) as exc:
            return self.endings.fail(p, Reason.INVALID_OPTIONS, f"its {OPTIONS_XATTR}: {exc}")
        levels = self.settings.config.levels
        p.options = levels.resolve(p.ref.profile, p.ref.bucket, p.ref.key, own)
        return None

    def stage(self, p: Passage) -> bool:
        """Read and hash a small file for the batch's PUTs; False for a larger one."""
        size = p.size or 0
        if size > BATCH_MAX_BYTES or size >= self.settings.multipart_threshold:
            return False
        self.read(p)
        return True

    def alone(self, p: Passage, now: float) -> Result | None:
        """Upload a larger file by itself: one PUT below the multipart threshold, else parts.
        None once the server has it, else the Result that ends this pass."""
        p.started = time.monotonic()
        injected = self.inject(p, now)
        if injected is not None:
            return injected
        try:
            crashpoints.point("after_put_start")
            if (p.size or 0) < self.settings.multipart_threshold:
                self.read(p)
                sent = self.send(p)
                p.etag = sent.result()
                p.version_id = sent.version_id
                p.body = b""
                p.proven = _proves(p)
            else:
                assert p.before is not None
                done = self.multipart.upload(p.fd, p.before, p.ref, p.record_id, p.options)
                p.etag, p.checksum, p.proven = done.etag, done.checksum, True
                p.version_id = done.version_id
        except FileChanged:
            return self.changed(p, now)
        except _UPLOAD_ERRORS as exc:
            return self.endings.failed_attempt(p, exc, now)
        return None

    def send(self, p: Passage) -> Pending:
        return self.sender.start(p.ref.bucket, p.ref.key, p.body, _b64(p.md5), p.options)

    def inject(self, p: Passage, now: float) -> Result | None:
        """--inject-failures: this share of attempts fails, before any request is sent, as a
        transient error of the file (its retries and the lifecycle then run as in production;
        it is no answer of the server, so no outage hold)."""
        rate = self.settings.inject_failures
        if not rate or self.random() >= rate:
            return None
        failure = Injected(f"injected by --inject-failures {rate:g}, no request was sent")
        return self.endings.failed_attempt(p, failure, now)

    def changed(self, p: Passage, now: float) -> Result:
        """The file changed while it was read: upload it again once it settles."""
        size = os.fstat(p.fd).st_size
        self.log.warning(
            "source_modified", profile=p.ref.profile, bucket=p.ref.bucket, key=p.ref.key, size=size
        )
        return Result(Step.CHANGED, now + self.settings.settle_seconds)

    def read(self, p: Passage) -> None:
        p.body = read_all(p.fd, p.size or 0)
        p.md5 = hashlib.md5(p.body, usedforsecurity=False).hexdigest()

    def answered(self, p: Passage, pending: Pending, now: float) -> Result | None:
        """A started PUT's answer: None once the server has the bytes, else the Result."""
        try:
            p.etag = pending.result()
            p.version_id = pending.version_id
        except (ClientError, BotoCoreError) as exc:
            return self.endings.failed_attempt(p, exc, now)
        finally:
            p.body = b""
        p.proven = _proves(p)
        return None

    def settle(
        self,
        index: int,
        p: Passage,
        failed: Result | None,
        now: float,
        proven: list[tuple[int, Passage]],
        outcomes: list[Result | Exception],
    ) -> None:
        """After the upload returned: a proven passage joins `proven`, else its Result stands."""
        ended = failed or self.check(p, now)
        if ended is not None:
            outcomes[index] = ended
        else:
            p.seconds = time.monotonic() - p.started
            proven.append((index, p))

    def check(self, p: Passage, now: float) -> Result | None:
        """The source must be unchanged since it was opened, and the upload proven: a single
        PUT by its answer (the server checked Content-MD5 and answered the MD5 Flood computed
        as its ETag), anything else (parts, an ETag that is not an MD5) by a HEAD. None if
        it may complete, else the Result that ends this pass."""
        assert p.before is not None
        try:
            crashpoints.point("after_put")
            after = os.fstat(p.fd)
            if changed(p.before, after):
                return self.changed(p, now)
            if not p.proven or self.settings.verify == "head":
                transfer.verify(self.client, p.ref, p.before.st_size, self.log)
            crashpoints.point("after_head")
        except _UPLOAD_ERRORS as exc:
            return self.endings.failed_attempt(p, exc, now)
        return None

    def complete(
        self, proven: list[tuple[int, Passage]], outcomes: list[Result | Exception]
    ) -> None:
        """Record the proven uploads (one transaction), then move each to completed/."""
        if not proven:
            return
        done: list[Result | Exception]
        try:
            done = self.endings.complete_all([p for _, p in proven])
        except Exception as exc:
            done = [exc] * len(proven)
        for (index, _), outcome in zip(proven, done, strict=True):
            outcomes[index] = outcome

    def close(self) -> None:
        self.multipart.close()

    def give_up(self, ref: FileRef, error: str) -> None:
        """A file whose handling keeps raising: failed/ with reason internal_error."""
        self.endings.give_up(ref, error)


def _own_options(fd: int) -> bytes | None:
    """A file's own object options (flood-copy --content-type ...), if it carries them."""
    try:
        return os.getxattr(fd, OPTIONS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def _proves(p: Passage) -> bool:
    """A single PUT's answer proves the bytes when its ETag is the MD5 Flood computed (the
    server checked Content-MD5 against what it received)."""
    p.etag = p.etag.strip('"') if p.etag is not None else None
    return bool(p.md5) and p.etag == p.md5


def _b64(md5_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(md5_hex)).decode("ascii")
