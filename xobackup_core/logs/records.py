"""What the log store gives back: runs and their task trees, as plain data.

Times are milliseconds since the Unix epoch (UTC), as in Xen Orchestra's logs, so a record
converts to JSON without loss. Sizes are bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


def now_ms() -> int:
    """The current time in ms since epoch, the unit of every time in the log."""
    return int(time.time() * 1000)


class Status(StrEnum):
    """The state of a run or a task (reference: xo-backups.md §8.2)."""

    PENDING = "pending"
    """Started and not ended yet."""
    SUCCESS = "success"
    FAILURE = "failure"
    SKIPPED = "skipped"
    """Nothing to do, or not done on purpose (no disks, unhealthy VDI chain...)."""
    INTERRUPTED = "interrupted"
    """The process running it died or was stopped before it ended."""
    CANCELLED = "cancelled"
    """Stopped on a user's request."""


STATUSES = tuple(status.value for status in Status)


@dataclass(frozen=True)
class Message:
    """A warning or an info attached to a run or a task."""

    message: str
    data: Any = None
    time: int = 0
    """When it was recorded (ms since epoch)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out


def _duration(start: int | None, end: int | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, end - start)


def _speed(size: int | None, duration_ms: int | None) -> float | None:
    if not size or not duration_ms:
        return None
    return size * 1000 / duration_ms


@dataclass
class TaskRecord:
    """One task of a run: a VM, a snapshot, an export to one target, a transfer, a merge..."""

    id: str
    run_id: str
    parent_id: str | None
    name: str
    data: Any
    status: Status
    start: int
    end: int | None
    result: Any
    warnings: list[Message] = field(default_factory=list)
    infos: list[Message] = field(default_factory=list)
    children: list[TaskRecord] = field(default_factory=list)

    @property
    def duration(self) -> int | None:
        """Milliseconds between start and end; None while pending."""
        return _duration(self.start, self.end)

    @property
    def own_size(self) -> int | None:
        """The ``size`` the task itself recorded in its result, if any."""
        if isinstance(self.result, dict):
            size = self.result.get("size")
            if isinstance(size, int) and not isinstance(size, bool):
                return size
        return None

    @property
    def size(self) -> int | None:
        """Bytes moved: the task's own result ``size``, else the sum of its children's.

        A task that reports a size speaks for its whole subtree, so nothing is counted twice
        (an export reporting its size is not added to its transfer's).
        """
        own = self.own_size
        if own is not None:
            return own
        sizes = [s for s in (child.size for child in self.children) if s is not None]
        return sum(sizes) if sizes else None

    @property
    def speed(self) -> float | None:
        """Bytes per second over the task's duration."""
        return _speed(self.size, self.duration)

    @property
    def error(self) -> str | None:
        """The failure or skip message, if the task recorded one."""
        if isinstance(self.result, dict) and isinstance(self.result.get("message"), str):
            return self.result["message"]
        return None

    def walk(self) -> Iterator[TaskRecord]:
        """This task and all its descendants, depth first, in start order."""
        yield self
        for child in self.children:
            yield from child.walk()

    def to_dict(self, *, children: bool = True) -> dict[str, Any]:
        """JSON-ready form (the shape plugins receive in ``xobackup_task_finished``)."""
        out: dict[str, Any] = {
            "id": self.id,
            "runId": self.run_id,
            "parentId": self.parent_id,
            "name": self.name,
            "data": self.data,
            "status": self.status.value,
            "start": self.start,
            "end": self.end,
            "duration": self.duration,
            "size": self.size,
            "result": self.result,
            "warnings": [w.to_dict() for w in self.warnings],
            "infos": [i.to_dict() for i in self.infos],
        }
        if children:
            out["tasks"] = [child.to_dict() for child in self.children]
        return out


@dataclass
class RunRecord:
    """One run of a job, with its task tree when read with :meth:`LogStore.get_run`."""

    run_id: str
    job_id: str
    job_name: str
    schedule_id: str | None
    start: int
    end: int | None
    status: Status
    pid: int | None
    hostname: str | None
    heartbeat: int | None
    data: Any = None
    result: Any = None
    warnings: list[Message] = field(default_factory=list)
    infos: list[Message] = field(default_factory=list)
    tasks: list[TaskRecord] = field(default_factory=list)
    """Top-level tasks (each with its children); empty in summaries from ``list_runs``."""
    total_size: int | None = None
    """Bytes moved by the run (see :attr:`TaskRecord.size`); set in summaries too."""

    @property
    def duration(self) -> int | None:
        return _duration(self.start, self.end)

    @property
    def size(self) -> int | None:
        if self.tasks:
            sizes = [s for s in (task.size for task in self.tasks) if s is not None]
            return sum(sizes) if sizes else None
        return self.total_size

    @property
    def speed(self) -> float | None:
        return _speed(self.size, self.duration)

    @property
    def error(self) -> str | None:
        if isinstance(self.result, dict) and isinstance(self.result.get("message"), str):
            return self.result["message"]
        return None

    def walk(self) -> Iterator[TaskRecord]:
        """Every task of the run, depth first."""
        for task in self.tasks:
            yield from task.walk()

    def to_dict(self, *, tasks: bool = True) -> dict[str, Any]:
        """JSON-ready form (the shape plugins receive in ``xobackup_run_finished``)."""
        out: dict[str, Any] = {
            "runId": self.run_id,
            "jobId": self.job_id,
            "jobName": self.job_name,
            "scheduleId": self.schedule_id,
            "start": self.start,
            "end": self.end,
            "duration": self.duration,
            "status": self.status.value,
            "size": self.size,
            "pid": self.pid,
            "hostname": self.hostname,
            "heartbeat": self.heartbeat,
            "data": self.data,
            "result": self.result,
            "warnings": [w.to_dict() for w in self.warnings],
            "infos": [i.to_dict() for i in self.infos],
        }
        if tasks:
            out["tasks"] = [task.to_dict() for task in self.tasks]
        return out
