"""What reporter plugins share: the ``reportWhen`` rule and a plain-text rendering of a run.

A reporter implements ``xobackup_run_finished(run)`` and calls :func:`should_report` first.
The run's ``data.reportWhen`` is the job's effective ``reportWhen`` setting, recorded by the
engine when the run starts (xo-backups.md §3.2, §8.4):

========== ================================================================
``always`` every run
``failure`` runs that did not succeed: failure, interrupted, skipped, cancelled (default)
``error``  runs that failed: failure, interrupted
``never``  none
========== ================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

REPORT_WHEN_VALUES = ("always", "failure", "error", "never")
DEFAULT_REPORT_WHEN = "failure"
ERROR_STATUSES = frozenset({"failure", "interrupted"})
NOT_SUCCESS_STATUSES = ERROR_STATUSES | {"skipped", "cancelled"}


def report_when(run: Mapping[str, Any]) -> str:
    """The run's ``reportWhen`` (the default when the run did not record one)."""
    data = run.get("data")
    value = data.get("reportWhen") if isinstance(data, Mapping) else None
    return value if value in REPORT_WHEN_VALUES else DEFAULT_REPORT_WHEN


def should_report(run: Mapping[str, Any]) -> bool:
    """True when a report of ``run`` must be sent under its ``reportWhen``."""
    when = report_when(run)
    status = str(run.get("status"))
    if when == "always":
        return True
    if when == "failure":
        return status in NOT_SUCCESS_STATUSES
    if when == "error":
        return status in ERROR_STATUSES
    return False


def _when(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(size: Any) -> str:
    if not isinstance(size, int | float) or size <= 0:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f" {value:.1f} {unit}" if unit != "B" else f" {int(value)} B"
        value /= 1024
    return ""


def _label(task: Mapping[str, Any]) -> str:
    data = task.get("data")
    name = str(task.get("name", "task"))
    if isinstance(data, Mapping):
        what = data.get("name_label") or data.get("id")
        if what:
            name += f" {what}"
    return name


def _message(item: Mapping[str, Any]) -> str:
    result = item.get("result")
    if isinstance(result, Mapping) and result.get("message"):
        return f": {result['message']}"
    return ""


def subject(run: Mapping[str, Any]) -> str:
    """One line: job, status and run id."""
    return (
        f"[xobackup] {run.get('jobName', '?')}: {run.get('status', '?')} "
        f"(run {str(run.get('runId', '?'))[:8]})"
    )


def render_text(run: Mapping[str, Any]) -> str:
    """The run as text: header, then its task tree with statuses, sizes, errors, warnings."""
    lines = [
        f"Job:      {run.get('jobName', '?')} ({run.get('jobId', '?')})",
        f"Schedule: {run.get('scheduleId') or '-'}",
        f"Run:      {run.get('runId', '?')}",
        f"Status:   {run.get('status', '?')}{_message(run)}",
        f"Start:    {_when(run.get('start'))}",
        f"End:      {_when(run.get('end'))}",
        "",
    ]
    for warning in run.get("warnings") or []:
        lines.append(f"warning: {warning.get('message')}")

    def walk(tasks: Any, depth: int) -> None:
        for task in tasks or []:
            size = _size(task.get("size"))
            lines.append(
                f"{'  ' * depth}- {_label(task)}: {task.get('status')}{size}{_message(task)}"
            )
            for warning in task.get("warnings") or []:
                lines.append(f"{'  ' * depth}  warning: {warning.get('message')}")
            walk(task.get("tasks"), depth + 1)

    walk(run.get("tasks"), 0)
    return "\n".join(lines) + "\n"
