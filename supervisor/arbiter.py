"""The arbiter: the only place that creates processes; it spawns, reaps and restarts them."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from flood import config, crashpoints, credentials, logs, records
from flood.bandwidth import Bandwidth
from flood.checks import MISSING, OK, UNREACHABLE, ProfileCheck
from flood.errors import EX_SOFTWARE, DatabaseUnreachable, FloodError
from flood.jobs import Drained, Ready, Rescan
from flood.layout import Layout
from flood.notify import Notifier, Watchdog
from flood.settings import Settings
from flood.states import Reason
from flood.supervisor import startup
from flood.supervisor.hooks import HookRunner
from flood.supervisor.sweeper import Sweeper
from flood.workers import role

if TYPE_CHECKING:
    from flood.supervisor.audit import PeriodicAudit
    from flood.supervisor.janitor import Janitor

QUEUE_SIZE = 10_000  # jobs per uploader queue: bounded memory, back-pressure on scans
RECHECK_MAX = 600.0  # seconds between checks of a hold that wants a person, at most
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a generation that lived this long resets the restart backoff
EXTEND_EVERY = 10.0  # before READY=1, push systemd's start timeout on this often...
EXTEND_BY_USEC = 60_000_000  # ...by this much, while the children make progress
# The forkserver imports what every child needs once (flood.workers.preload): its pages are
# shared by the children forked from it.
PRELOAD = ["flood.workers.preload"]
ASK_TIMEOUT = 600.0  # a checker child that has not answered by then has failed


@dataclass
class Child:
    name: str
    process: Any
    conn: Connection
    ready: bool = False
    beat_at: float = field(default_factory=time.monotonic)  # its last report of progress


@dataclass
class Generation:
    """One set of children with their own queues: rebuilt whole when any child dies, since a
    child killed inside a queue operation can leave that queue's lock held for good."""

    children: list[Child] = field(default_factory=list)
    queues: list[Any] = field(default_factory=list)
    # Shared objects the children hold must outlive their start here: Process.start() drops
    # its arguments, and a lock collected here unlinks its semaphore before a child opens it.
    limits: list[Bandwidth] = field(default_factory=list)
    started: float = 0.0


class Arbiter:
    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        checked: dict[str, set[str]] | None,
        log: Any,
    ) -> None:
        self.settings = settings
        self.layout = layout
        self.checked = checked or {}
        self.check_first = checked is None  # the buckets are checked as run() starts
        self.log = log
        # forkserver: children start clean (no inherited threads, clients or db handles) but
        # share what flood.workers.preload loaded there (an uploader holds 8-11 MiB of its own).
        os.environ[crashpoints.SUPERVISOR_PID_ENV] = str(os.getpid())  # inherited by children
        # The forkserver starts as `python -c`, which would put the working directory first on
        # its sys.path: run from a directory holding a `flood/` folder (a spool named flood, a
        # source tree), children would import that. PYTHONSAFEPATH keeps it off; and like any
        # daemon we leave the working directory (every path in Settings is absolute).
        os.environ["PYTHONSAFEPATH"] = "1"
        os.chdir("/")
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.generation = Generation()
        self.stopping = False
        self.exit_code = 0
        self.restarts = 0
        self.signals: list[int] = []
        self.releases: queue.Queue[str] = queue.Queue()
        self.checker = HoldChecker(settings, layout, log, self.releases, self.probe)
        self.sweeper = Sweeper(settings, layout, log)
        self.hooks = HookRunner(settings, log)
        self.janitor: Janitor | None = None
        self.auditor: PeriodicAudit | None = None
        # Imported only when they are on: they call S3 from the supervisor (boto3, 30 MiB).
        if settings.janitor_interval:
            from flood.supervisor.janitor import Janitor

            self.janitor = Janitor(settings, layout, log, self.ask)
        if settings.audit_interval:
            from flood.supervisor.audit import PeriodicAudit

            self.auditor = PeriodicAudit(settings, layout, log)
        self.watcher_conn: Connection | None = None
        # systemd: READY=1 once the watcher's start-up drain is queued, WATCHDOG=1 only while
        # every child reports progress. Children must not inherit the socket.
        self.notifier = Notifier.from_environ(unset=True)
        interval = self.notifier.watchdog_interval
        self.watchdog = Watchdog(interval) if interval else None
        self.ready_pending = True
        self.ready_once = False
        self.withheld: list[str] = []
        self.restart_counts: dict[str, int] = {}  # child processes started again, by reason
        self.next_extend = 0.0

    # -- main loop -----------------------------------------------------------------------
    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda n, _: self.signals.append(n))
        try:
            if self.check_first:
                # Here, not before: the forkserver that runs the checks must start with the
                # environment set up above (and by the metrics) for every child.
                self.checked = startup.check_buckets(
                    self.settings, self.layout, self.log, self.probe
                )
            self.start_generation()
            for thread in self.threads():
                thread.start()  # the hooks also finish deliveries due from before a restart
            while not self.stopping:
                self.tick(wake_r)
            self.notifier.stopping("stopping: in-flight uploads get the grace period")
        except FloodError as exc:  # the start-up check's records could not be written
            self.log.error("startup_failed", error=str(exc))
            print(f"flood-supervisor: {exc}", file=sys.stderr, flush=True)
            self.exit_code = exc.exit_code
        except Exception:
            self.log.exception("supervisor_crashed")
            self.exit_code = EX_SOFTWARE
        finally:
            # Whatever happened above, no child outlives the arbiter's own stop.
            for thread in self.threads():
                thread.halt()
            self.stop_children("shutdown")
        self.log.info("supervisor_stopped", exit_code=self.exit_code)
        return self.exit_code

    def threads(self) -> list[HoldChecker | Sweeper | HookRunner | Janitor | PeriodicAudit]:
        """The supervisor's own threads: the hold checker, the lifecycle's sweeper, the hooks,
        and the janitor and the periodic audit where they are on."""
        found = (self.checker, self.sweeper, self.hooks, self.janitor, self.auditor)
        return [t for t in found if t is not None]

    def orphans_found(self) -> dict[tuple[str, str], int]:
        """Orphan multipart uploads per bucket in the janitor's last round (for the metrics)."""
        return dict(self.janitor.found) if self.janitor is not None else {}

    def tick(self, wake_r: int) -> None:
        gen = self.generation
        handles: list[Any] = [wake_r]
        handles += [c.process.sentinel for c in gen.children]
        handles += [c.conn for c in gen.children]
        ready = wait(handles, timeout=1.0)
        if wake_r in ready:
            _drain_pipe(wake_r)
        self.on_signals()
        for child in gen.children:
            if child.conn in ready:
                self.on_message(child)
        dead = [c for c in gen.children if c.process.sentinel in ready or not c.process.is_alive()]
        if dead and not self.stopping:
            self.on_deaths(dead)
        self.forward_releases()
        self.ping_watchdog()
        self.extend_start_timeout()

    def on_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                self.log.info(
                    "signal_received",
                    signal="SIGHUP",
                    reason="re-reading credentials; uploads in flight finish first",
                )
                if not self.stopping:
                    self.reload()
                continue
            self.log.info(
                "signal_received",
                signal=signal.Signals(signum).name,
                reason="stopping: in-flight uploads get the grace period",
            )
            self.stopping = True

    def on_message(self, child: Child) -> None:
        try:
            while child.conn.poll():
                message = child.conn.recv()
                child.beat_at = time.monotonic()  # any message is progress ("alive" says so)
                if isinstance(message, Ready):
                    child.ready = True
                elif isinstance(message, Drained):
                    self.log.info("startup_drain_queued", files=message.files)
                    self.on_drained()
        except (EOFError, OSError):
            pass

    def on_deaths(self, dead: list[Child]) -> None:
        for child in dead:
            child.process.join(timeout=1)
            code = child.process.exitcode
            if not child.ready and code is not None and code >= 0:
                # It exited by itself before it was ready (config, import, setup error):
                # restarting it would loop. Killed by a signal, it is a death like any other.
                self.log.error("child_boot_failed", child=child.name, exit_code=code)
                print(
                    f"flood-supervisor: {child.name} failed at start (exit code {code}); "
                    "see the log above",
                    flush=True,
                    file=sys.stderr,
                )
                self.exit_code = code if code == 78 else EX_SOFTWARE
                self.stopping = True
                return
            self.log.error("child_died", child=child.name, pid=child.process.pid, exit_code=code)
        self.count_restarts("child_died")
        self.restart_generation()

    def restart_generation(self) -> None:
        stable = time.monotonic() - self.generation.started > STABLE_AFTER
        self.restarts = 0 if stable else self.restarts + 1
        wait_s = 0.0
        if self.restarts:
            wait_s = min(RESTART_BACKOFF_MAX, 0.5 * 2 ** (self.restarts - 1))
        self.stop_children("restart")
        if wait_s:
            self.log.info("restart_backoff", delay=wait_s)
            time.sleep(wait_s)
        self.start_generation()

    def count_restarts(self, reason: str) -> None:
        count = len(self.generation.children)
        self.restart_counts[reason] = self.restart_counts.get(reason, 0) + count

    # -- systemd and SIGHUP --------------------------------------------------------------
    def on_drained(self) -> None:
        """The watcher's watch is live and what waited is queued: READY=1 (after a reload too)."""
        if not self.ready_pending:
            return
        self.ready_pending = False
        self.ready_once = True
        self.notifier.ready(
            f"uploading from {self.settings.server_dir} for "
            f"{', '.join(sorted(self.settings.profiles))}"
        )

    def ping_watchdog(self) -> None:
        """WATCHDOG=1 every half interval, only while every child reports progress."""
        now = time.monotonic()
        if self.watchdog is None or not self.ready_once or not self.watchdog.due(now):
            return
        stale = self.watchdog.stale(now, {c.name: c.beat_at for c in self.generation.children})
        if stale != self.withheld:
            if stale:
                self.log.warning(
                    "watchdog_withheld",
                    children=stale,
                    reason=f"no progress for {self.watchdog.stall_after:g} s",
                )
            else:
                self.log.info("watchdog_resumed")
            self.withheld = stale
        if not stale:
            self.notifier.watchdog()
            self.watchdog.pinged(now)

    def extend_start_timeout(self) -> None:
        """A long start-up drain (a backlog fills the queues) is not a hang: while the children
        make progress, systemd's start timeout is pushed on."""
        now = time.monotonic()
        if not self.ready_pending or not self.notifier.enabled or now < self.next_extend:
            return
        self.next_extend = now + EXTEND_EVERY
        stall = self.watchdog.stall_after if self.watchdog else 3 * EXTEND_EVERY
        if all(now - c.beat_at <= stall for c in self.generation.children):
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={EXTEND_BY_USEC}")

    def reload(self) -> None:
        """SIGHUP: re-read the credentials, re-check the buckets, restart the children (each
        finishes its current file first). A file that cannot be used keeps the old profiles."""
        self.notifier.reloading("re-reading the credentials file")
        try:
            creds = credentials.load(self.settings.credentials_path)
            path = self.settings.config.path
            conf = config.load(path, creds.profiles) if path is not None else config.EMPTY
            settings = dataclasses.replace(self.settings, profiles=creds.profiles, config=conf)
            self.layout.prepare(settings.profiles)
        except (FloodError, OSError) as exc:
            self.log.error(
                "reload_failed",
                error=str(exc),
                reason="keeping the profiles and the config loaded before",
            )
            self.notifier.ready("reload failed; running with the profiles loaded before")
            return
        if sorted(settings.secrets()) != sorted(self.settings.secrets()):
            logs.configure("supervisor", settings.log_level, settings.log_file, settings.secrets())
        self.log.info("credentials_reloaded", path=str(creds.path), profiles=sorted(creds.profiles))
        if creds.loose_permissions():
            self.log.warning(
                "credentials_file_exposed",
                path=str(creds.path),
                reason=f"mode {creds.mode & 0o777:o}: group or others can read it",
            )
        self.count_restarts("reload")
        self.stop_children("reload")
        self.settings = settings
        for thread in self.threads():
            thread.settings = settings
        self.checked = startup.check_buckets(settings, self.layout, self.log, self.probe)
        self.ready_pending = True
        self.start_generation()

    # -- children ------------------------------------------------------------------------
    def start_generation(self) -> None:
        gen = Generation(started=time.monotonic())
        queues: dict[str, list[Any]] = {}
        for profile in sorted(self.settings.profiles):
            queues[profile] = []
            rate = self.settings.profiles[profile].max_bandwidth
            # One bucket for all of the profile's uploaders, new with each generation (a child
            # killed holding its lock must not stall the next one).
            bandwidth = Bandwidth(rate, self.ctx) if rate else None
            if bandwidth is not None:
                gen.limits.append(bandwidth)
            checked = set(self.checked.get(profile, ()))
            for slot in range(self.settings.workers):
                jobs = self.ctx.Queue(QUEUE_SIZE)
                queues[profile].append(jobs)
                gen.queues.append(jobs)
                gen.children.append(
                    self.spawn(
                        f"uploader-{profile}-{slot}",
                        "uploader",
                        (self.settings, profile, slot, jobs, checked, bandwidth),
                    )
                )
        child = self.spawn("watcher", "watcher", (self.settings, queues))
        gen.children.append(child)
        self.watcher_conn = child.conn
        self.generation = gen
        self.log.info(
            "children_started", count=len(gen.children), pids=[c.process.pid for c in gen.children]
        )

    def spawn(self, name: str, module: str, args: tuple[Any, ...]) -> Child:
        """Start one child of role `module` (flood.workers.<module>); its entry point takes
        `args`, its end of a duplex pipe, our pid."""
        mine, theirs = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(
            target=role.run, name=name, args=(module, *args, theirs, os.getpid())
        )
        process.start()
        theirs.close()
        return Child(name, process, mine)

    def stop_children(self, why: str) -> None:
        """SIGTERM everyone (finish the current file), wait the grace period, then SIGKILL."""
        gen = self.generation
        for child in gen.children:
            if child.process.is_alive():
                child.process.terminate()
        deadline = time.monotonic() + self.settings.grace
        for child in gen.children:
            child.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for child in gen.children:
            if child.process.is_alive():
                self.log.warning("child_killed", child=child.name, reason=f"{why}: grace over")
                child.process.kill()
                child.process.join(timeout=5)
            child.conn.close()
        for jobs in gen.queues:
            jobs.cancel_join_thread()
            jobs.close()
        gen.children = []
        gen.queues = []
        gen.limits = []

    def ask(self, task: str, *args: Any) -> Any:
        """Run a task of flood.workers.checker (a server's check, the janitor's sweep) in a
        child and return its answer: boto3 and S3's model stay in the forkserver's children,
        out of the supervisor. RuntimeError when the child gives no answer."""
        mine, theirs = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(
            target=role.run,
            name=f"checker-{task}",
            args=("checker", task, args, theirs, os.getpid()),
        )
        process.start()
        theirs.close()
        try:
            if mine.poll(ASK_TIMEOUT):
                return mine.recv()
        except (EOFError, OSError):
            pass  # it died without an answer: below
        finally:
            mine.close()
            if process.is_alive():
                process.kill()
            process.join(5)
        raise RuntimeError(f"the checker's {task} gave no answer (exit {process.exitcode})")

    def probe(self, profile: str, buckets: list[str], whole: bool = True) -> ProfileCheck:
        """Ask the profile's server about its buckets (startup.Probe), from a child."""
        try:
            answer: ProfileCheck = self.ask("probe", self.settings, profile, buckets, whole)
        except RuntimeError as exc:
            return ProfileCheck(UNREACHABLE, str(exc))
        return answer

    def forward_releases(self) -> None:
        while True:
            try:
                profile = self.releases.get_nowait()
            except queue.Empty:
                return
            if self.watcher_conn is not None:
                with contextlib.suppress(OSError):
                    self.watcher_conn.send(Rescan(profile, "hold_released"))


class HoldChecker(threading.Thread):
    """Checks held profiles and buckets again, with backoff; a release triggers a rescan."""

    def __init__(
        self,
        settings: Settings,
        layout: Layout,
        log: Any,
        releases: queue.Queue[str],
        probe: startup.Probe,
    ):
        super().__init__(name="hold-checker", daemon=True)
        self.probe = probe
        self.settings = settings
        self.layout = layout
        self.log = log
        self.releases = releases
        self.halted = threading.Event()
        self.next_check: dict[tuple[str, str], tuple[float, float]] = {}

    def halt(self) -> None:
        self.halted.set()

    def run(self) -> None:
        while not self.halted.wait(min(1.0, self.settings.recheck_interval)):
            try:
                self.check_due(time.monotonic())
            except DatabaseUnreachable:
                pass  # the records' outage is said once, by the supervisor's watch
            except Exception:
                self.log.exception("hold_check_crashed")

    def check_due(self, now: float) -> None:
        for (profile, bucket), reason in records.holds().items():
            due, interval = self.next_check.get((profile, bucket), (0.0, 0.0))
            if now < due:
                continue
            if profile not in self.settings.profiles:
                continue
            released = self.check(profile, bucket)
            if released:
                self.next_check.pop((profile, bucket), None)  # the backoff starts afresh
                self.releases.put(profile)
            else:
                interval = self.backoff(reason, interval)
                self.next_check[(profile, bucket)] = (now + interval, interval)

    def backoff(self, reason: str, interval: float) -> float:
        """The wait before the next check: an unreachable server (or credentials endpoint) is
        probed from a second on, doubling up to --recheck-interval (an outage ends when it
        ends); a rejected key, a
        missing bucket or a certificate wants a person, so from --recheck-interval doubling
        up to ten minutes."""
        recheck = self.settings.recheck_interval
        if reason in (Reason.UNREACHABLE, Reason.CREDENTIALS):
            return min(recheck, interval * 2 if interval else min(1.0, recheck))
        return min(RECHECK_MAX, interval * 2 if interval else recheck)

    def check(self, profile: str, bucket: str) -> bool:
        if not bucket:
            ok = startup.check_one(self.settings, self.layout, profile, self.log, self.probe)
            held = records.holds()
            if (profile, "") not in held:
                self.log.info("profile_resumed", profile=profile, buckets=sorted(ok))
                return True
            return False
        result = self.probe(profile, [bucket], False)
        if result.status == OK and result.detail != MISSING:
            records.release(profile, bucket)
            self.log.info("bucket_resumed", profile=profile, bucket=bucket)
            return True
        return False


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
