"""Scheduling and run control: cron evaluation, the daemon, VM locks, timeouts, cancellation.

* :mod:`~xobackup_core.scheduler.cron` — when a schedule fires (IANA timezones, DST rules);
* :mod:`~xobackup_core.scheduler.daemon` — ``xobackup daemon``;
* :mod:`~xobackup_core.scheduler.locks` — :class:`VmLock`, per-VM locks on a remote;
* :mod:`~xobackup_core.scheduler.guard` — :class:`Deadline` and :class:`RunGuard`;
* :mod:`~xobackup_core.scheduler.cancel` — cancel requests in the run log;
* :mod:`~xobackup_core.scheduler.reporting` — what reporter plugins share (``reportWhen``).
"""

from xobackup_core.scheduler.cancel import CancelRequest, cancel_request, request_cancel
from xobackup_core.scheduler.clock import Clock, ManualClock, SystemClock
from xobackup_core.scheduler.cron import CronSchedule
from xobackup_core.scheduler.guard import Deadline, RunGuard, RunTimeoutError
from xobackup_core.scheduler.locks import (
    LockInfo,
    LockLostError,
    VmLock,
    VmLockedError,
    VmLocks,
)

__all__ = [
    "CancelRequest",
    "Clock",
    "CronSchedule",
    "Deadline",
    "LockInfo",
    "LockLostError",
    "ManualClock",
    "RunGuard",
    "RunTimeoutError",
    "SystemClock",
    "VmLock",
    "VmLockedError",
    "VmLocks",
    "cancel_request",
    "request_cancel",
]
