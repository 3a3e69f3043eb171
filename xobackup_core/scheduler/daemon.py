"""``xobackup daemon``: run every enabled schedule of the config, in the foreground.

One thread waits for the next schedule to fire; each run executes in its own thread through
the backup engine. The daemon:

* at start-up, marks the runs of dead processes interrupted (xo-backups.md §12.4), so nothing
  stays pending forever and no ghost blocks a job (§12.5);
* never runs a job twice at once: a schedule that fires while its job runs (here or in another
  process on the same log) records a **skipped** run saying "the job is already running
  (run <id>)", as Xen Orchestra does (§4.1);
* reloads its config on SIGHUP (a bad config is logged and the old one kept);
* stops on SIGTERM / SIGINT: no new run starts, running ones get ``shutdown_grace`` seconds to
  end, and those still going are then marked interrupted in the log.

Time comes from an injectable :class:`~xobackup_core.scheduler.clock.Clock`, so tests drive a
day of schedules in milliseconds.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from xobackup_core.config import Config
from xobackup_core.errors import ConfigError, UsageError, XobackupError
from xobackup_core.logs.process import hostname
from xobackup_core.logs.records import RunRecord, Status, now_ms
from xobackup_core.logs.store import LogStore
from xobackup_core.plugins import Plugins
from xobackup_core.scheduler.clock import Clock, SystemClock
from xobackup_core.scheduler.cron import CronSchedule

_log = logging.getLogger("xobackup.daemon")

ALREADY_RUNNING = "the job is already running (run {run_id})"
"""Reason recorded on a skipped run whose job was still running."""


class Runner(Protocol):
    """What the daemon needs from the engine (:class:`~xobackup_core.engine.runner.JobRunner`)."""

    def run(self, job_key: str, schedule_key: str | None = None) -> Any: ...

    def close(self) -> None: ...


RunnerFactory = Callable[[Config, Plugins, LogStore], Runner]


def default_runner_factory(config: Config, plugins: Plugins, store: LogStore) -> Runner:
    """One :class:`~xobackup_core.engine.runner.JobRunner` per config generation."""
    from xobackup_core.engine.runner import JobRunner

    return JobRunner(config, plugins, store)


def schedule_timezone(config: Config, schedule_key: str) -> str:
    """The timezone a schedule's cron is read in: the ``timezone`` setting, layered."""
    schedule = config.schedules[schedule_key]
    settings = config.effective_settings(schedule.job, schedule_key=schedule_key)
    return str(settings["timezone"])


def cron_of(config: Config, schedule_key: str) -> CronSchedule:
    """The evaluated cron of a schedule (ConfigError naming the key if it is invalid)."""
    schedule = config.schedules[schedule_key]
    try:
        return CronSchedule(schedule.cron, schedule_timezone(config, schedule_key))
    except ConfigError as error:
        raise ConfigError(
            str(error), key=f"schedules.{schedule_key}", source=config.source
        ) from None


def running_run_of(store: LogStore, job_id: str) -> str | None:
    """The id of a run of the job in progress in any live process, or None.

    Runs of dead processes are marked interrupted first, so they never count.
    """
    running = store.running_runs(job_id)
    return running[0].run_id if running else None


def record_already_running(
    store: LogStore,
    plugins: Plugins | None,
    config: Config,
    job_key: str,
    schedule_key: str | None,
    running_run_id: str,
) -> RunRecord:
    """Log a skipped run of ``job_key``: "the job is already running (run <id>)".

    The skipped run is reported like any other (``plugins`` hear it). ``xobackup run`` can
    use it too, so a manual run never overlaps a scheduled one.
    """
    job = config.jobs[job_key]
    settings = config.effective_settings(job_key, schedule_key=schedule_key)
    recorder = store.start_run(
        config.job_id(job_key),
        job.name or job_key,
        schedule_id=schedule_key,
        data={"mode": job.mode, "reportWhen": settings["reportWhen"]},
        listener=plugins,
        heartbeat_interval=None,
    )
    return recorder.finish(ALREADY_RUNNING.format(run_id=running_run_id), status=Status.SKIPPED)


@dataclass
class _Planned:
    key: str
    job: str
    cron: CronSchedule
    next_at: float


@dataclass
class _Active:
    """A run this daemon started and that has not returned yet."""

    job_id: str
    schedule_key: str
    thread: threading.Thread


class Daemon:
    """The scheduler loop. Create it, then call :meth:`run` (blocks until stopped).

    ``load_config`` reads the config (at start unless ``config`` is given, and on each
    reload); ``runner_factory`` makes the engine for a config; ``clock`` tells the time.
    """

    def __init__(
        self,
        load_config: Callable[[], Config],
        plugins: Plugins,
        store: LogStore,
        *,
        config: Config | None = None,
        clock: Clock | None = None,
        runner_factory: RunnerFactory = default_runner_factory,
        shutdown_grace: float = 300.0,
    ) -> None:
        self._load_config = load_config
        self.plugins = plugins
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self._runner_factory = runner_factory
        self.shutdown_grace = shutdown_grace
        self.config = config if config is not None else load_config()
        self._plan = self._make_plan(self.config, {})
        self._runner = runner_factory(self.config, plugins, store)
        self._runners = [self._runner]
        self._wake = threading.Event()
        self._stop = False
        self._force = threading.Event()
        self._reload = False
        self._active: dict[str, _Active] = {}  # job id -> its run in this process
        self._jobs_lock = threading.Lock()
        self.abandoned: list[str] = []
        """Runs still going when the grace period ended, marked interrupted."""

    # -- control (signal handlers call these) -----------------------------------------------
    def request_stop(self) -> None:
        """Stop starting runs and leave :meth:`run` (after the grace period).

        A second request while stopping ends the grace period at once.
        """
        if self._stop:
            self._force.set()
        self._stop = True
        self._wake.set()

    def request_reload(self) -> None:
        """Re-read the config before the next schedule fires."""
        self._reload = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads, SIGTERM and SIGINT stop (main thread only)."""
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())

    # -- planning ----------------------------------------------------------------------------
    def _make_plan(self, config: Config, previous: dict[str, _Planned]) -> dict[str, _Planned]:
        now = self.clock.now()
        plan = {}
        for key, schedule in config.schedules.items():
            if not schedule.enabled:
                continue
            cron = cron_of(config, key)
            old = previous.get(key)
            if old is not None and old.cron == cron and old.job == schedule.job:
                plan[key] = old  # unchanged: keep its next instant
            else:
                plan[key] = _Planned(key, schedule.job, cron, cron.next_after_epoch(now))
        return plan

    @property
    def running_jobs(self) -> list[str]:
        """Ids of the jobs this daemon is running now."""
        with self._jobs_lock:
            return list(self._active)

    def next_runs(self) -> dict[str, float]:
        """Each enabled schedule's next firing instant (Unix time)."""
        return {key: planned.next_at for key, planned in self._plan.items()}

    def _reload_config(self) -> None:
        self._reload = False
        try:
            config = self._load_config()
            plan = self._make_plan(config, self._plan)
        except XobackupError as error:
            _log.error("config reload rejected, keeping the running config: %s", error)
            return
        self.config = config
        self._plan = plan
        self._runner = self._runner_factory(config, self.plugins, self.store)
        self._runners.append(self._runner)
        _log.info("config reloaded: %d enabled schedule(s)", len(plan))
        self._log_plan()

    def _log_plan(self) -> None:
        for key, planned in sorted(self._plan.items(), key=lambda item: item[1].next_at):
            moment = datetime.fromtimestamp(planned.next_at, UTC).astimezone(planned.cron.zone)
            _log.info("schedule %s (job %s) next runs at %s", key, planned.job, moment.isoformat())

    # -- the loop ----------------------------------------------------------------------------
    def run(self, run_now: Sequence[str] = ()) -> None:
        """Run schedules until :meth:`request_stop`; then wind down (see the module doc).

        ``run_now``: schedules to run once at start-up, besides their cron.
        """
        for key in run_now:
            if key not in self.config.schedules:
                known = ", ".join(sorted(self.config.schedules)) or "none defined"
                raise UsageError(f"unknown schedule {key!r}; schedules in the config: {known}")
        swept = self.store.mark_interrupted()
        for run_id in swept:
            _log.warning("run %s was left pending by a dead process: marked interrupted", run_id)
            self._report(run_id)
        _log.info("daemon started (pid %d): %d enabled schedule(s)", os.getpid(), len(self._plan))
        self._log_plan()
        for key in run_now:
            self.start_run(key)
        while not self._stop:
            if self._reload:
                self._reload_config()
                continue
            now = self.clock.now()
            due = sorted(
                (p for p in self._plan.values() if p.next_at <= now), key=lambda p: p.next_at
            )
            for planned in due:
                self.start_run(planned.key)
                # a daemon that was suspended fires a missed schedule once, not once per miss
                planned.next_at = planned.cron.next_after_epoch(max(planned.next_at, now))
            if due:
                continue
            upcoming = min((p.next_at for p in self._plan.values()), default=now + 3600)
            if self.clock.sleep_until(upcoming, self._wake):
                self._wake.clear()
        self._shutdown()

    def start_run(self, schedule_key: str) -> str | None:
        """Start one run of a schedule's job in a thread; None when the job was skipped."""
        config = self.config
        job_key = config.schedules[schedule_key].job
        job_id = config.job_id(job_key)
        with self._jobs_lock:
            busy = self._busy_run(job_id)
            if busy is not None:
                self._record_skip(config, job_key, schedule_key, busy)
                return None
            runner = self._runner
            thread = threading.Thread(
                target=self._execute,
                args=(runner, job_key, schedule_key, job_id),
                name=f"run-{job_key}",
                daemon=True,  # a run still going after the grace period must not hold exit
            )
            self._active[job_id] = _Active(job_id, schedule_key, thread)
        _log.info("schedule %s fired: starting job %s", schedule_key, job_key)
        thread.start()
        return job_id

    def _busy_run(self, job_id: str) -> str | None:
        """The id of a run of the job in progress, here or elsewhere; None if there is none."""
        running = running_run_of(self.store, job_id)
        if running is not None:
            return running
        if job_id in self._active:
            return "being started"
        return None

    def _record_skip(self, config: Config, job_key: str, schedule_key: str, busy: str) -> None:
        record = record_already_running(
            self.store, self.plugins, config, job_key, schedule_key, busy
        )
        _log.warning(
            "schedule %s fired but %s: run %s skipped",
            schedule_key,
            record.result["message"],
            record.run_id,
        )

    def _execute(self, runner: Runner, job_key: str, schedule_key: str, job_id: str) -> None:
        try:
            outcome = runner.run(job_key, schedule_key)
            run_id = getattr(outcome, "run_id", "?")
            status = getattr(outcome, "status", "?")
            _log.info(
                "job %s (schedule %s): run %s ended %s", job_key, schedule_key, run_id, status
            )
        except XobackupError as error:
            _log.error("job %s (schedule %s) could not run: %s", job_key, schedule_key, error)
        except Exception:
            _log.exception("job %s (schedule %s) crashed", job_key, schedule_key)
        finally:
            with self._jobs_lock:
                self._active.pop(job_id, None)

    # -- stopping ----------------------------------------------------------------------------
    def _shutdown(self) -> None:
        with self._jobs_lock:
            active = list(self._active.values())
        if active:
            _log.info(
                "stopping: waiting up to %g s for %d running job(s) (stop again to end now)",
                self.shutdown_grace,
                len(active),
            )
        deadline = time.monotonic() + self.shutdown_grace
        for item in active:
            while item.thread.is_alive() and not self._force.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                item.thread.join(min(left, 0.1))
        self.abandoned = self._interrupt_own_runs()
        if not self.abandoned:
            for runner in self._runners:
                try:
                    runner.close()
                except Exception:
                    _log.exception("closing the engine failed")
        _log.info("daemon stopped")

    def _interrupt_own_runs(self) -> list[str]:
        """Mark this process's runs still pending as interrupted; their ids."""
        pid = os.getpid()
        marked = []
        for run in self.store.running_runs():
            if run.pid != pid or run.hostname != hostname():
                continue
            end = now_ms()
            self.store.close_pending_tasks(run.run_id, Status.INTERRUPTED, end)
            message = (
                "interrupted: the daemon was stopped and the run did not end within the "
                f"{self.shutdown_grace:g} s grace period"
            )
            if self.store.end_run(run.run_id, Status.INTERRUPTED, end, {"message": message}):
                _log.warning("run %s (job %s) marked interrupted", run.run_id, run.job_name)
                marked.append(run.run_id)
                self._report(run.run_id)
        return marked

    def _report(self, run_id: str) -> None:
        """Tell the reporters about a run that ended without its process saying so (the
        process died, or was stopped): Xen Orchestra reports those too (xo-backups.md §8.3)."""
        record = self.store.get_run(run_id)
        if record is None:
            return
        try:
            self.plugins.run_finished(record.to_dict())
        except Exception:  # a reporter must not stop the daemon
            _log.exception("a reporter failed on run %s", run_id)
