"""The run log: every backup run with its task tree, in SQLite (see docs/logs.md).

The engine records with :meth:`LogStore.start_run` and the returned :class:`RunRecorder`;
``xobackup logs`` reads with :meth:`LogStore.list_runs` and :meth:`LogStore.get_run`. At
start-up, :meth:`LogStore.mark_interrupted` closes the runs of processes that died.
"""

from xobackup_core.logs.filters import RunFilter, parse_since
from xobackup_core.logs.recorder import (
    RunListener,
    RunRecorder,
    TaskHandle,
    TaskSkipped,
    error_message,
    run_status,
)
from xobackup_core.logs.records import STATUSES, Message, RunRecord, Status, TaskRecord
from xobackup_core.logs.store import (
    SCHEMA_VERSION,
    LogStore,
    default_log_path,
    log_path_from_config,
)

__all__ = [
    "SCHEMA_VERSION",
    "STATUSES",
    "LogStore",
    "Message",
    "RunFilter",
    "RunListener",
    "RunRecord",
    "RunRecorder",
    "Status",
    "TaskHandle",
    "TaskRecord",
    "TaskSkipped",
    "default_log_path",
    "error_message",
    "log_path_from_config",
    "parse_since",
    "run_status",
]
