"""Recording a run as it happens: the API the backup engine writes its task tree with.

::

    recorder = store.start_run(job_id, "nightly", listener=plugins)
    with recorder:                                   # failure if an exception escapes
        with recorder.task("backup VM", {"type": "VM", "id": uuid, "name_label": name}) as vm:
            with vm.task("snapshot") as snapshot:
                snapshot.set_result(id=snapshot_uuid)
            with vm.task("export", {"type": "remote", "id": remote_id}) as export:
                with export.task("transfer") as transfer:
                    transfer.set_result(size=written)
    # recorder.record: the closed run with its tree and its status

Every method is thread-safe: the engine backs up several VMs at once. Each event is written
to the store at once, so the log of a process killed mid-run shows how far it went.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from xobackup_core.errors import XobackupError
from xobackup_core.logs.records import Message, RunRecord, Status, TaskRecord, now_ms

if TYPE_CHECKING:
    from xobackup_core.logs.store import LogStore

_log = logging.getLogger(__name__)


class RunListener(Protocol):
    """Hears a run's events; :class:`xobackup_core.plugins.Plugins` is one.

    ``task_finished`` is called from the thread that ended the task. An exception a listener
    raises is logged and otherwise ignored: a reporter must not break a backup.
    """

    def run_started(self, run: Mapping[str, Any]) -> None: ...

    def task_finished(self, run_id: str, task: Mapping[str, Any]) -> None: ...

    def run_finished(self, run: Mapping[str, Any]) -> None: ...


class TaskSkipped(Exception):
    """Raised inside a task's ``with`` block: the task ends ``skipped`` with this reason.

    The exception does not go further than that task's ``with``, so the engine moves on to the
    next VM (xo-backups.md §8.2: "no disks found", "unhealthy VDI chain"...).
    """


def error_message(error: BaseException) -> str:
    """What the log says about an exception.

    An :class:`~xobackup_core.errors.XobackupError` message is written for users and never
    holds a secret, so it is kept; any other exception is a bug whose text may hold anything
    (a URL with a password...), so only its type is recorded.
    """
    if isinstance(error, XobackupError):
        return str(error)
    return f"internal error: {type(error).__name__}"


def error_result(error: BaseException) -> dict[str, Any]:
    """The result fields of a task that failed with ``error``."""
    result: dict[str, Any] = {"message": error_message(error), "name": type(error).__name__}
    code = getattr(error, "code", None)
    if isinstance(error, XobackupError) and isinstance(code, str | int):
        result["code"] = code
    return result


def run_status(tasks: list[TaskRecord], *, failed: bool = False) -> Status:
    """The status of a run from its task tree (documented in docs/logs.md).

    The tasks that count are the top-level tasks and every VM task (data ``type: "VM"``) at
    any depth; a transfer that failed on one target while the VM succeeded elsewhere does not
    fail the run. The run is:

    * ``failure`` if the run itself failed (``failed``) or a counted task failed or was
      interrupted;
    * ``cancelled`` if a counted task was cancelled;
    * ``skipped`` if no counted task succeeded (nothing ran, or every VM was skipped);
    * ``success`` otherwise.
    """
    counted: dict[str, TaskRecord] = {task.id: task for task in tasks}
    for top in tasks:
        for task in top.walk():
            if isinstance(task.data, dict) and task.data.get("type") == "VM":
                counted[task.id] = task
    statuses = {task.status for task in counted.values()}
    if failed or statuses & {Status.FAILURE, Status.INTERRUPTED}:
        return Status.FAILURE
    if Status.CANCELLED in statuses:
        return Status.CANCELLED
    if Status.SUCCESS not in statuses:
        return Status.SKIPPED
    return Status.SUCCESS


class _Events:
    """Warnings and infos of a run or a task, kept in memory for the listener's records."""

    def __init__(self, store: LogStore, run_id: str, task_id: str | None) -> None:
        self._store = store
        self._run_id = run_id
        self._task_id = task_id
        self.warnings: list[Message] = []
        self.infos: list[Message] = []

    def add(self, level: str, message: str, data: Any) -> None:
        at = now_ms()
        self._store.add_message(self._run_id, self._task_id, level, message, data, at)
        (self.warnings if level == "warning" else self.infos).append(Message(message, data, at))


class TaskHandle:
    """A pending task; a context manager that ends it (see :meth:`RunRecorder.task`)."""

    def __init__(
        self,
        recorder: RunRecorder,
        name: str,
        data: Any = None,
        parent: TaskHandle | None = None,
    ) -> None:
        self.recorder = recorder
        self.id = str(uuid.uuid4())
        self.name = name
        self.data = data
        self.parent = parent
        self.start = now_ms()
        self.end: int | None = None
        self.status = Status.PENDING
        self.result: Any = None
        self._lock = threading.Lock()
        self._events = _Events(recorder.store, recorder.run_id, self.id)
        recorder.store.insert_task(
            recorder.run_id, self.id, parent.id if parent else None, name, data, self.start
        )

    def task(self, name: str, data: Any = None) -> TaskHandle:
        """Start a child task."""
        return self.recorder.task(name, data, parent=self)

    def warning(self, message: str, data: Any = None) -> None:
        """Attach a warning (shown in yellow; the task's status is not changed)."""
        self._events.add("warning", message, data)

    def info(self, message: str, data: Any = None) -> None:
        """Attach an informational message."""
        self._events.add("info", message, data)

    def set_result(self, **fields: Any) -> None:
        """Merge ``fields`` into the task's result (``size`` in bytes counts as moved data)."""
        with self._lock:
            self.result = {**(self.result if isinstance(self.result, dict) else {}), **fields}
            result = self.result
        self.recorder.store.set_task_result(self.id, result)

    def skip(self, reason: str) -> None:
        """End the task as ``skipped`` with ``reason``."""
        self.finish(Status.SKIPPED, message=reason)

    def fail(self, message: str, code: str | int | None = None) -> None:
        """End the task as ``failure`` without raising (a target dropped, the others go on)."""
        self.finish(Status.FAILURE, message=message, code=code)

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """End the task as ``cancelled``."""
        self.finish(Status.CANCELLED, message=reason)

    def finish(self, status: Status = Status.SUCCESS, **result: Any) -> bool:
        """End the task with ``status``, merging ``result`` (None values dropped) into its result.

        Only the first ending counts; returns False for later ones.
        """
        extra = {key: value for key, value in result.items() if value is not None}
        with self._lock:
            if self.status is not Status.PENDING:
                return False
            if extra:
                self.result = {**(self.result if isinstance(self.result, dict) else {}), **extra}
            self.status = status
            self.end = now_ms()
        if not self.recorder.store.end_task(self.id, status, self.end, self.result):
            # the run was closed first and closed this task as interrupted with it
            self.status = Status.INTERRUPTED
            return False
        self.recorder.task_ended(self)
        return True

    def record(self) -> TaskRecord:
        """The task as it stands (without children)."""
        return TaskRecord(
            id=self.id,
            run_id=self.recorder.run_id,
            parent_id=self.parent.id if self.parent else None,
            name=self.name,
            data=self.data,
            status=self.status,
            start=self.start,
            end=self.end,
            result=self.result,
            warnings=list(self._events.warnings),
            infos=list(self._events.infos),
        )

    def __enter__(self) -> TaskHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.finish(Status.SUCCESS)
            return False
        if isinstance(exc, TaskSkipped):
            self.skip(str(exc) or "skipped")
            return True
        if isinstance(exc, Exception):
            self.finish(Status.FAILURE, **error_result(exc))
        else:  # KeyboardInterrupt, SystemExit: the process is being stopped
            self.finish(Status.INTERRUPTED, message="interrupted", name=type(exc).__name__)
        return False


class RunRecorder:
    """A pending run of this process: start tasks, then :meth:`finish` (or use ``with``)."""

    def __init__(
        self,
        store: LogStore,
        *,
        run_id: str,
        job_id: str,
        job_name: str,
        schedule_id: str | None,
        start: int,
        data: Any,
        listener: RunListener | None,
        heartbeat_interval: float | None,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.job_id = job_id
        self.job_name = job_name
        self.schedule_id = schedule_id
        self.start = start
        self.data = data
        self.listener = listener
        self.record: RunRecord | None = None
        """The closed run with its tree, once :meth:`finish` has run."""
        self._events = _Events(store, run_id, None)
        self._finish_lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        if heartbeat_interval:
            self._heartbeat_thread = threading.Thread(
                target=self._beat,
                args=(heartbeat_interval,),
                name="xobackup-heartbeat",
                daemon=True,
            )
            self._heartbeat_thread.start()
        self._notify(
            "run_started",
            {
                "runId": run_id,
                "jobId": job_id,
                "jobName": job_name,
                "scheduleId": schedule_id,
                "start": start,
                "data": data,
            },
        )

    def _notify(self, event: str, *args: Any) -> None:
        if self.listener is None:
            return
        try:
            getattr(self.listener, event)(*args)
        except Exception:
            _log.exception("a listener failed on %s of run %s", event, self.run_id)

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.store.heartbeat(self.run_id)
            except Exception:  # a locked or closed database must not kill the backup
                _log.warning("could not record the heartbeat of run %s", self.run_id)

    @property
    def status(self) -> Status:
        return self.record.status if self.record else Status.PENDING

    def task(self, name: str, data: Any = None, parent: TaskHandle | None = None) -> TaskHandle:
        """Start a task (under ``parent``, or at the top of the run); use it with ``with``.

        Leaving the ``with`` normally ends it ``success``; an exception ends it ``failure``
        with the exception's message (see :func:`error_message`) and goes on; a
        :class:`TaskSkipped` ends it ``skipped`` and stops there.
        """
        if self.record is not None:
            raise RuntimeError(f"run {self.run_id} is finished: no task can start in it")
        return TaskHandle(self, name, data, parent)

    def task_ended(self, task: TaskHandle) -> None:
        """Called by a task when it ends: tells the listener."""
        self._notify("task_finished", self.run_id, task.record().to_dict(children=False))

    def warning(self, message: str, data: Any = None) -> None:
        """Attach a warning to the run itself."""
        self._events.add("warning", message, data)

    def info(self, message: str, data: Any = None) -> None:
        """Attach an info to the run itself (e.g. the list of VMs selected)."""
        self._events.add("info", message, data)

    def heartbeat(self) -> None:
        """Note that this run's process is alive (done every minute by a thread by default)."""
        self.store.heartbeat(self.run_id)

    def finish(
        self, error: BaseException | str | None = None, *, status: Status | None = None
    ) -> RunRecord:
        """Close the run; its status follows :func:`run_status` unless ``status`` is given.

        ``error`` (an exception or a message) means the run itself failed. Tasks still
        pending are closed as ``interrupted``. Calling it again returns the same record.
        """
        with self._finish_lock:
            if self.record is not None:
                return self.record
            self._stop.set()
            end = now_ms()
            self.store.close_pending_tasks(self.run_id, Status.INTERRUPTED, end)
            run = self.store.get_run(self.run_id)
            assert run is not None, "the run's own record disappeared"
            result: dict[str, Any] | None = None
            if isinstance(error, BaseException):
                result = error_result(error)
            elif error is not None:
                result = {"message": error}
            final = status or run_status(run.tasks, failed=error is not None)
            if self.store.end_run(self.run_id, final, end, result):
                run.status, run.end, run.result, run.heartbeat = final, end, result, end
            else:  # already closed, as interrupted, by another process's start-up sweep
                run = self.store.get_run(self.run_id) or run
            self.record = run
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join()
        self._notify("run_finished", run.to_dict())
        return run

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, Exception):
            self.finish(exc, status=Status.INTERRUPTED)
        else:
            self.finish(exc)
