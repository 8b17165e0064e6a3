"""The watcher role: inotify on incoming/ (plus scans) turned into jobs on the uploaders' queues."""

from __future__ import annotations

import fnmatch
import os
import queue
import stat
import time
import zlib
from multiprocessing.connection import Connection
from typing import Any

import pyinotify

from flood import crashpoints, logs, metrics
from flood.jobs import Drained, Job, Rescan
from flood.layout import Layout
from flood.notify import Heartbeat
from flood.settings import Settings
from flood.states import State
from flood.workers.role import send, serve

MASK = (
    pyinotify.IN_MOVED_TO
    | pyinotify.IN_CLOSE_WRITE
    | pyinotify.IN_CREATE
    | pyinotify.IN_DONT_FOLLOW
)
FALLBACK_RESCAN = 10.0  # seconds between rescans while some directory could not be watched
SETTLE_CHECK = 0.25
_ONCE_LIMIT = 10_000


def slot_of(bucket: str, key: str, workers: int) -> int:
    """The uploader that owns a path: always the same one, so one path is handled in order."""
    return zlib.crc32(f"{bucket}/{key}".encode("utf-8", "surrogateescape")) % workers


class WatcherRole:
    """Watches incoming/ recursively and dispatches every file to its uploader's queue."""

    def __init__(
        self, settings: Settings, queues: dict[str, list[Any]], conn: Connection | None
    ) -> None:
        self.settings = settings
        self.queues = queues
        self.conn = conn
        self.heartbeat = Heartbeat(conn)
        self.metrics = metrics.Recorder()
        self.layout = Layout(settings.server_dir)
        self.drained = False  # the start-up drain runs in the first loop, after "ready"
        self.alive = True
        self.log: Any = None
        self.pending: dict[str, float] = {}  # found by a scan, not settled yet: path -> mtime
        self.told: set[tuple[str, str]] = set()
        self.recent: set[str] = set()  # dispatched by the start-up drain, arrived during it
        self.watch_failed = False
        self.next_rescan = 0.0
        self.next_settle_check = 0.0
        self.wm: Any = None
        self.notifier: Any = None

    # -- lifecycle -----------------------------------------------------------------------
    def setup(self) -> None:
        self.log = logs.configure(
            "watcher", self.settings.log_level, self.settings.log_file, self.settings.secrets()
        )
        self.metrics = metrics.recorder()
        self.wm = pyinotify.WatchManager()
        self.notifier = pyinotify.Notifier(self.wm, default_proc_fun=self.on_event, timeout=200)
        self.add_watch(self.layout.state_dir(State.INCOMING), rec=True)

    def stop(self) -> None:
        self.alive = False

    def teardown(self) -> None:
        if self.notifier is not None:
            self.notifier.stop()
        self.log.info("watcher_stopped")

    def loop(self, now: float) -> None:
        self.heartbeat.beat()
        if not self.drained:
            # After "ready": a long drain is work, not boot; a kill during it is a death the
            # supervisor answers with a restart, not a failure at start.
            self.drained = True
            self.drain()
        self.read_events()
        # Events queued during the drain have now been read: forget which paths it sent.
        self.recent.clear()
        self.control()
        if now >= self.next_settle_check:
            self.check_pending(now)
            self.next_settle_check = now + SETTLE_CHECK
        if now >= self.next_rescan:
            if self.next_rescan:
                self.rescan("periodic")
            interval = FALLBACK_RESCAN if self.watch_failed else self.settings.rescan_interval
            self.next_rescan = now + interval

    # -- start-up drain ------------------------------------------------------------------
    def drain(self) -> None:
        """processing/ first, then incoming/, with the watch already in place: nothing missed."""
        started = time.time()
        count = 0
        for path in self.layout.walk_files(State.PROCESSING):
            count += self.dispatch(State.PROCESSING, path)
        crashpoints.point("after_drain_processing")
        for path in self.layout.walk_files(State.INCOMING):
            count += self.dispatch_found(path, started)
        crashpoints.point("after_drain_incoming")
        self.log.info("startup_drain_dispatched", files=count)
        send(self.conn, Drained(count))

    # -- inotify -------------------------------------------------------------------------
    def add_watch(self, path: str, rec: bool) -> None:
        # No auto_add: pyinotify's fakes events for a new directory's contents, testing
        # entries with os.path.isdir, which follows a symlink (`up -> ..`) into a watch loop.
        # The kernel marks only real directories IN_ISDIR; on_event adds those itself.
        result = self.wm.add_watch(path, MASK, rec=rec, auto_add=False)
        failed = [p for p, wd in result.items() if wd < 0]
        if failed:
            self.watch_failed = True
            self.log.error(
                "watch_failed",
                path=failed[0],
                count=len(failed),
                error="inotify could not watch these directories (is "
                "fs.inotify.max_user_watches too low?); rescanning every "
                f"{FALLBACK_RESCAN:g} s instead",
            )

    def read_events(self) -> None:
        try:
            if self.notifier.check_events():
                self.notifier.read_events()
                self.notifier.process_events()
        except (UnicodeDecodeError, pyinotify.NotifierError) as exc:
            # pyinotify decodes names as strict UTF-8; the events of this read are lost.
            self.log.warning("inotify_read_failed", error=f"{type(exc).__name__}: {exc}")
            self.rescan("undecodable_event")

    def on_event(self, event: Any) -> None:
        self.metrics.watcher_event()
        if event.mask & pyinotify.IN_Q_OVERFLOW:
            self.metrics.watcher_overflow()
            self.log.warning("inotify_overflow")
            self.rescan("overflow")
            return
        path = event.pathname
        if event.mask & pyinotify.IN_ISDIR:
            if event.mask & (pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO):
                # Watch it (and what is below it already, links not followed) first; what
                # landed before the watch is only found by the scan after it.
                self.add_watch(path, rec=True)
                self.scan_dir(path, recursive=True)
            return
        if event.mask & pyinotify.IN_CREATE:
            self.on_create(path)
            return
        if path in self.recent:
            self.recent.discard(path)
            return
        self.pending.pop(path, None)
        self.dispatch(State.INCOMING, path)

    def on_create(self, path: str) -> None:
        """A new name that is not a regular file (symlink, FIFO) gets no close event: send it
        on now so that it ends in failed/. Regular files wait for their close or rename."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            self.dispatch(State.INCOMING, path)

    # -- scans ---------------------------------------------------------------------------
    def scan_dir(self, top: str, recursive: bool) -> None:
        try:
            entries = list(os.scandir(top))
        except OSError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if recursive:
                    self.scan_dir(entry.path, True)
            else:
                self.dispatch_found(entry.path)

    def rescan(self, why: str, profile: str | None = None) -> None:
        self.log.info("rescan_started", reason=why, profile=profile)
        self.metrics.watcher_rescan(why)
        count = sum(self.dispatch_found(p) for p in self.layout.walk_files(State.INCOMING, profile))
        self.log.info("rescan_finished", reason=why, profile=profile, files=count)

    def dispatch_found(self, path: str, drain_started: float | None = None) -> int:
        """A file found by a scan may still be open for writing: send it once it has settled
        (mtime a settle period old) or when its own close/rename event comes."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return 0
        now = time.time()
        if stat.S_ISREG(info.st_mode) and now - info.st_mtime < self.settings.settle_seconds:
            self.pending[path] = info.st_mtime
            return 0
        if drain_started is not None and info.st_ctime >= drain_started:
            self.recent.add(path)
        return self.dispatch(State.INCOMING, path)

    def check_pending(self, now: float) -> None:
        for path, mtime in list(self.pending.items()):
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                del self.pending[path]
                continue
            if info.st_mtime != mtime:
                self.pending[path] = info.st_mtime
            elif now - info.st_mtime >= self.settings.settle_seconds:
                del self.pending[path]
                self.dispatch(State.INCOMING, path)

    # -- dispatch ------------------------------------------------------------------------
    def dispatch(self, state: str, path: str) -> int:
        """Put one file on the queue of the uploader that owns it; 1 if it was sent."""
        ref = self.layout.parse(state, path)
        if ref is None:
            self.once("file_misplaced", path, "files belong below PROFILE/BUCKET/")
            return 0
        jobs = self.queues.get(ref.profile)
        if jobs is None:
            self.once(
                "profile_unknown",
                ref.profile,
                f"profile {ref.profile!r} is not in the credentials file; files left alone",
            )
            return 0
        name = os.path.basename(path)
        for pattern in self.settings.ignore:
            if fnmatch.fnmatchcase(name, pattern):
                self.once("file_ignored", path, f"name matches ignore pattern {pattern!r}")
                return 0
        target = jobs[slot_of(ref.bucket, ref.key, len(jobs))]
        job = Job(state, ref.bucket, ref.key)
        while self.alive:
            self.heartbeat.beat()  # a long scan, or a full queue behind uploaders that move
            try:
                target.put(job, timeout=0.5)
                return 1
            except queue.Full:
                continue
        return 0

    def once(self, action: str, subject: str, why: str) -> None:
        if (action, subject) in self.told:
            return
        if len(self.told) > _ONCE_LIMIT:
            self.told.clear()
        self.told.add((action, subject))
        self.log.warning(action, path=subject, reason=why)

    def control(self) -> None:
        """Requests from the supervisor (Rescan)."""
        while self.conn is not None and self.conn.poll():
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.alive = False
                return
            if isinstance(message, Rescan):
                self.rescan(message.reason, message.profile)


def main(
    settings: Settings, queues: dict[str, list[Any]], conn: Connection, supervisor_pid: int
) -> None:
    """Process entry point (started by the supervisor's arbiter)."""
    serve(WatcherRole(settings, queues, conn), conn, supervisor_pid)
