"""Runs as text for a terminal: one line per run, or a run's task tree.

Lines carry ANSI styles from :func:`click.style`; :func:`click.echo` removes them when the
output is not a terminal, and the CLI removes them for ``NO_COLOR`` or ``--color never``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from xobackup_core.logs.records import Message, RunRecord, Status, TaskRecord

STATUS_STYLES: dict[Status, dict[str, Any]] = {
    Status.SUCCESS: {"fg": "green"},
    Status.FAILURE: {"fg": "red", "bold": True},
    Status.PENDING: {"fg": "yellow"},
    Status.INTERRUPTED: {"fg": "yellow", "bold": True},
    Status.SKIPPED: {"dim": True},
    Status.CANCELLED: {"fg": "magenta"},
}
"""Colour per status: green, red, orange-ish yellow for unfinished, dim for skipped."""

_STATUS_WIDTH = max(len(status.value) for status in Status)
_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(size: int | None) -> str:
    """``1.5 GiB``; ``-`` when unknown."""
    if size is None:
        return "-"
    value = float(size)
    for unit in _SIZE_UNITS:
        if value < 1024 or unit == _SIZE_UNITS[-1]:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_speed(bytes_per_second: float | None) -> str:
    """``112.4 MiB/s``; empty when unknown."""
    if bytes_per_second is None:
        return ""
    return format_size(int(bytes_per_second)) + "/s"


def format_duration(ms: int | None) -> str:
    """``850ms``, ``4.2s``, ``12m 03s``, ``2h 05m``; ``-`` when unknown (still running)."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def format_time(ms: int | None) -> str:
    """Local date and time to the second."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def styled_status(status: Status, width: int = 0) -> str:
    """The status word in its colour, padded to ``width`` outside the escape codes."""
    return click.style(status.value, **STATUS_STYLES[status]) + " " * (width - len(status.value))


def short_id(run_id: str) -> str:
    """The first 8 characters, enough for ``xobackup logs show`` in practice."""
    return run_id[:8]


def run_lines(runs: list[RunRecord]) -> list[str]:
    """One aligned line per run: start, id, job, status, duration, size."""
    if not runs:
        return []
    job_width = max(len(run.job_name) for run in runs)
    lines = []
    for run in runs:
        columns = [
            format_time(run.start),
            short_id(run.run_id),
            run.job_name.ljust(job_width),
            styled_status(run.status, _STATUS_WIDTH),
            format_duration(run.duration).rjust(8),
            format_size(run.size).rjust(10),
        ]
        lines.append("  ".join(columns).rstrip())
    return lines


def _target(data: Any) -> str:
    """What a task's data names: ``web01 (uuid)``, ``remote nas``, ``SR local``."""
    if not isinstance(data, dict):
        return ""
    kind = data.get("type")
    label = data.get("name_label") or data.get("name")
    ident = data.get("id")
    if kind == "VM":
        if label and ident:
            return f"{label} ({ident})"
        return str(label or ident or "")
    if kind:
        return " ".join(str(part) for part in (kind, label or ident) if part)
    return ""


def _figures(item: TaskRecord | RunRecord) -> str:
    parts = [format_duration(item.duration)]
    if item.size is not None:
        parts.append(format_size(item.size))
        speed = format_speed(item.speed)
        if speed:
            parts.append(speed)
    return "  ".join(parts)


def _message_lines(indent: str, warnings: list[Message], infos: list[Message]) -> list[str]:
    lines = [indent + click.style(f"warning: {w.message}", fg="yellow") for w in warnings]
    lines += [indent + f"info: {i.message}" for i in infos]
    return lines


def _task_lines(task: TaskRecord, depth: int) -> list[str]:
    indent = "  " * depth
    label = task.name
    target = _target(task.data)
    if target:
        label += f" {target}"
    lines = [f"{indent}- {label}  {styled_status(task.status)}  {_figures(task)}"]
    detail = indent + "    "
    if task.error and task.status is not Status.SUCCESS:
        colour = "red" if task.status is Status.FAILURE else None
        lines.append(detail + click.style(task.error, fg=colour))
    lines += _message_lines(detail, task.warnings, task.infos)
    for child in task.children:
        lines += _task_lines(child, depth + 1)
    return lines


def tree_lines(run: RunRecord) -> list[str]:
    """A run's header and its task tree, indented two spaces per level."""
    schedule = f"  schedule {run.schedule_id}" if run.schedule_id else ""
    lines = [
        f"run {run.run_id}  {styled_status(run.status)}",
        f"job {run.job_name} ({run.job_id}){schedule}",
        f"started {format_time(run.start)}  ended {format_time(run.end)}  {_figures(run)}",
        f"host {run.hostname or '-'}  pid {run.pid if run.pid is not None else '-'}",
    ]
    if run.error:
        colour = "red" if run.status is Status.FAILURE else "yellow"
        lines.append(click.style(run.error, fg=colour))
    lines += _message_lines("", run.warnings, run.infos)
    for task in run.tasks:
        lines += _task_lines(task, 0)
    return lines
