"""The run log: runs and their task trees in one SQLite file.

One file serves every xobackup process of a host (the daemon, a manual ``xobackup run``, the
``xobackup logs`` reader): SQLite in WAL mode lets readers go on while one writer commits, and
a busy timeout makes writers of other processes wait their turn instead of failing. Within a
process one connection is shared by all threads behind a lock; each write is one short
transaction, so recording a task costs well under a millisecond.

The schema version is SQLite's ``user_version``; :data:`MIGRATIONS` brings an older file up
to date when it is opened, under a write lock so that two processes never migrate twice.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xobackup_core.config import Config, default_state_dir
from xobackup_core.errors import UsageError
from xobackup_core.logs.filters import RunFilter
from xobackup_core.logs.process import hostname, process_alive, process_identity
from xobackup_core.logs.recorder import RunListener, RunRecorder
from xobackup_core.logs.records import Message, RunRecord, Status, TaskRecord, now_ms

DEFAULT_STALE_AFTER = 900.0
"""Seconds without a heartbeat after which a pending run of another host is interrupted."""
DEFAULT_HEARTBEAT_INTERVAL = 60.0
"""Seconds between two heartbeats of a running run."""


def default_log_path() -> Path:
    """Where the log lives when the config does not say: ``<state dir>/logs.sqlite``."""
    return default_state_dir() / "logs.sqlite"


def log_path_from_config(config: Config | None) -> Path:
    """The config's ``log_db`` (``~`` expanded, relative to the config file), or the default."""
    if config is None or not config.log_db:
        return default_log_path()
    path = Path(config.log_db).expanduser()
    if not path.is_absolute() and config.source and not config.source.startswith("<"):
        path = Path(config.source).parent / path
    return path


def _schema_v1(db: sqlite3.Connection) -> None:
    statements = [
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL,
            job_name TEXT NOT NULL,
            schedule_id TEXT,
            start_time INTEGER NOT NULL,
            end_time INTEGER,
            status TEXT NOT NULL,
            pid INTEGER,
            process TEXT,
            hostname TEXT,
            heartbeat INTEGER,
            data TEXT,
            result TEXT
        )""",
        "CREATE INDEX runs_start ON runs (start_time)",
        "CREATE INDEX runs_job ON runs (job_id)",
        "CREATE INDEX runs_status ON runs (status)",
        """CREATE TABLE tasks (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
            parent_id TEXT,
            name TEXT NOT NULL,
            data TEXT,
            status TEXT NOT NULL,
            start_time INTEGER NOT NULL,
            end_time INTEGER,
            result TEXT
        )""",
        "CREATE INDEX tasks_run ON tasks (run_id)",
        """CREATE TABLE messages (
            seq INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
            task_id TEXT,
            level TEXT NOT NULL CHECK (level IN ('warning', 'info')),
            message TEXT NOT NULL,
            data TEXT,
            time INTEGER NOT NULL
        )""",
        "CREATE INDEX messages_run ON messages (run_id)",
    ]
    for statement in statements:
        db.execute(statement)


def _schema_v2(db: sqlite3.Connection) -> None:
    """Cancel requests (``xobackup cancel``), polled by the running engine."""
    db.execute(
        """CREATE TABLE cancel_requests (
            run_id TEXT PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
            requested_at INTEGER NOT NULL,
            requested_by TEXT
        )"""
    )


def _schema_v3(db: sqlite3.Connection) -> None:
    """Live progress of each VM of a run (stage, bytes), for readers in other processes."""
    db.execute(
        """CREATE TABLE progress (
            run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
            vm_uuid TEXT NOT NULL,
            name TEXT NOT NULL,
            stage TEXT NOT NULL,
            status TEXT,
            transferred INTEGER NOT NULL,
            start_time INTEGER NOT NULL,
            update_time INTEGER NOT NULL,
            updates INTEGER NOT NULL DEFAULT 1,
            PRIMARY KEY (run_id, vm_uuid)
        )"""
    )


SCHEMA_VERSION = 3
"""The schema this code writes (SQLite ``PRAGMA user_version``)."""

MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _schema_v1,
    2: _schema_v2,
    3: _schema_v3,
}
"""Version ``n`` → the function that turns a version ``n - 1`` database into version ``n``.
Each runs inside the opening transaction; add one per schema change, never edit an old one."""


def _dump(value: Any) -> str | None:
    if value is None:
        return None
    # default=str: a stray object (a Secret prints as '***') must not lose the whole record
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere (its own % and _ taken literally)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@dataclass
class VmProgressRecord:
    """The last recorded progress of one VM of a run (see :meth:`LogStore.record_progress`)."""

    vm_uuid: str
    name: str
    stage: str
    status: str | None
    """``success`` or ``failure`` once the VM's backup ended, else None."""
    transferred: int
    """Bytes exported so far."""
    start: int
    """When the VM's backup started (ms)."""
    updated: int
    """When this was recorded (ms)."""
    updates: int
    """How many times the row was written (the writer throttles: about once a second)."""

    @property
    def speed(self) -> float | None:
        """Average bytes per second from the VM's start to the last record; None before any."""
        if not self.transferred:
            return None
        return self.transferred * 1000 / max(self.updated - self.start, 1)


class LogStore:
    """The SQLite run log at ``path`` (created with its parent folders if missing)."""

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(
                f"log database {self.path}: cannot create its folder ({error.strerror}); "
                "set 'log_db' in the config to a writable place"
            ) from None
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(
                str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise UsageError(f"log database {self.path}: cannot open it ({error})") from None
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL survives a process crash (only a power cut may lose the last commits)
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise UsageError(
                f"log database {self.path}: not a usable SQLite database ({error}); "
                "move the file away or set 'log_db' in the config to another path"
            ) from None

    # -- plumbing ----------------------------------------------------------------------------
    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]  # another process?
            if version > SCHEMA_VERSION:
                raise UsageError(
                    f"log database {self.path} has schema version {version}, newer than this "
                    f"xobackup's ({SCHEMA_VERSION}); upgrade xobackup to read it"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[target](db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one write transaction, committed unless an exception leaves."""
        with self._lock:
            # IMMEDIATE takes the write lock now: a read-then-write transaction that upgraded
            # later could fail with SQLITE_BUSY without waiting for the busy timeout
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, params).rowcount

    def _query(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    def close(self) -> None:
        """Close the connection (runs still recording fail afterwards)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recording ---------------------------------------------------------------------------
    def start_run(
        self,
        job_id: str,
        job_name: str,
        schedule_id: str | None = None,
        data: Any = None,
        *,
        listener: RunListener | None = None,
        heartbeat_interval: float | None = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> RunRecorder:
        """Record a new pending run of this process and return its recorder.

        ``listener`` (for instance :class:`xobackup_core.plugins.Plugins`) hears
        ``run_started``, ``task_finished`` and ``run_finished``. A daemon thread refreshes the
        run's heartbeat every ``heartbeat_interval`` seconds (None: only explicit
        :meth:`RunRecorder.heartbeat` calls) so other hosts can tell it is alive.
        """
        run_id = str(uuid.uuid4())
        start = now_ms()
        pid = os.getpid()
        self._execute(
            "INSERT INTO runs (run_id, job_id, job_name, schedule_id, start_time, status, pid,"
            " process, hostname, heartbeat, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                job_id,
                job_name,
                schedule_id,
                start,
                Status.PENDING.value,
                pid,
                process_identity(pid),
                hostname(),
                start,
                _dump(data),
            ),
        )
        return RunRecorder(
            self,
            run_id=run_id,
            job_id=job_id,
            job_name=job_name,
            schedule_id=schedule_id,
            start=start,
            data=data,
            listener=listener,
            heartbeat_interval=heartbeat_interval,
        )

    def insert_task(
        self, run_id: str, task_id: str, parent_id: str | None, name: str, data: Any, start: int
    ) -> None:
        """Record a pending task (used by :class:`~xobackup_core.logs.recorder.RunRecorder`)."""
        self._execute(
            "INSERT INTO tasks (id, run_id, parent_id, name, data, status, start_time)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (task_id, run_id, parent_id, name, _dump(data), Status.PENDING.value, start),
        )

    def set_task_result(self, task_id: str, result: Any) -> None:
        self._execute("UPDATE tasks SET result = ? WHERE id = ?", (_dump(result), task_id))

    def end_task(self, task_id: str, status: Status, end: int, result: Any) -> bool:
        """Close a pending task; False if it was already closed (the first ending wins)."""
        changed = self._execute(
            "UPDATE tasks SET status = ?, end_time = ?, result = ? WHERE id = ? AND status = ?",
            (status.value, end, _dump(result), task_id, Status.PENDING.value),
        )
        return changed > 0

    def add_message(
        self, run_id: str, task_id: str | None, level: str, message: str, data: Any, at: int
    ) -> None:
        """Attach a warning or an info to a task, or to the run when ``task_id`` is None."""
        self._execute(
            "INSERT INTO messages (run_id, task_id, level, message, data, time)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, task_id, level, message, _dump(data), at),
        )

    def heartbeat(self, run_id: str, at: int | None = None) -> None:
        """Note that the run's process is alive."""
        self._execute(
            "UPDATE runs SET heartbeat = ? WHERE run_id = ?",
            (now_ms() if at is None else at, run_id),
        )

    def close_pending_tasks(self, run_id: str, status: Status, end: int) -> int:
        """End every still-pending task of a run with ``status``; how many there were."""
        return self._execute(
            "UPDATE tasks SET status = ?, end_time = ? WHERE run_id = ? AND status = ?",
            (status.value, end, run_id, Status.PENDING.value),
        )

    def end_run(self, run_id: str, status: Status, end: int, result: Any) -> bool:
        """Close a pending run; False if it was already closed."""
        changed = self._execute(
            "UPDATE runs SET status = ?, end_time = ?, result = ?, heartbeat = ?"
            " WHERE run_id = ? AND status = ?",
            (status.value, end, _dump(result), end, run_id, Status.PENDING.value),
        )
        return changed > 0

    def record_progress(
        self,
        run_id: str,
        vm_uuid: str,
        *,
        name: str,
        stage: str,
        transferred: int,
        start: int,
        status: str | None = None,
        at: int | None = None,
    ) -> None:
        """Set the live progress of one VM of a run (one row per VM, overwritten).

        Callers throttle (:class:`xobackup_core.engine.progress.StoredProgress`): this is one
        write transaction.
        """
        self._execute(
            "INSERT INTO progress (run_id, vm_uuid, name, stage, status, transferred,"
            " start_time, update_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (run_id, vm_uuid) DO UPDATE SET name = excluded.name,"
            " stage = excluded.stage, status = excluded.status,"
            " transferred = excluded.transferred, update_time = excluded.update_time,"
            " updates = updates + 1",
            (
                run_id,
                vm_uuid,
                name,
                stage,
                status,
                transferred,
                start,
                now_ms() if at is None else at,
            ),
        )

    # -- runs whose process died -------------------------------------------------------------
    def _run_alive(self, row: sqlite3.Row, now: int, stale_after: float) -> bool:
        if row["hostname"] == hostname():
            return row["pid"] is not None and process_alive(row["pid"], row["process"])
        # another host's process cannot be probed: trust its heartbeat
        last = row["heartbeat"] or row["start_time"]
        return last >= now - stale_after * 1000

    def mark_interrupted(
        self, *, stale_after: float = DEFAULT_STALE_AFTER, now: int | None = None
    ) -> list[str]:
        """Mark pending runs whose process is gone as interrupted, with their pending tasks.

        A run of this host is gone when its process no longer exists (or the PID now belongs
        to another process); a run of another host when its last heartbeat is older than
        ``stale_after`` seconds. Its end time is the last sign of life seen in the log.
        Returns the ids of the runs marked. Call it at start-up, before starting runs.
        """
        current = now_ms() if now is None else now
        rows = self._query(
            "SELECT run_id, pid, process, hostname, heartbeat, start_time FROM runs"
            " WHERE status = ?",
            (Status.PENDING.value,),
        )
        marked = []
        for row in rows:
            if self._run_alive(row, current, stale_after):
                continue
            with self.transaction() as db:
                last = db.execute(
                    "SELECT max(coalesce(r.heartbeat, r.start_time),"
                    " coalesce((SELECT max(max(start_time, coalesce(end_time, 0))) FROM tasks"
                    "  WHERE run_id = r.run_id), 0),"
                    " coalesce((SELECT max(time) FROM messages WHERE run_id = r.run_id), 0))"
                    " FROM runs r WHERE r.run_id = ?",
                    (row["run_id"],),
                ).fetchone()[0]
                if row["hostname"] == hostname():
                    why = (
                        f"the process running it (pid {row['pid']} on {row['hostname']}) "
                        "stopped before the run ended"
                    )
                else:
                    why = (
                        f"no sign of life from {row['hostname']} for more than "
                        f"{stale_after:g} s; its process is presumed gone"
                    )
                db.execute(
                    "UPDATE tasks SET status = ?, end_time = ? WHERE run_id = ? AND status = ?",
                    (Status.INTERRUPTED.value, last, row["run_id"], Status.PENDING.value),
                )
                changed = db.execute(
                    "UPDATE runs SET status = ?, end_time = ?, result = ?"
                    " WHERE run_id = ? AND status = ?",
                    (
                        Status.INTERRUPTED.value,
                        last,
                        _dump({"message": f"interrupted: {why}"}),
                        row["run_id"],
                        Status.PENDING.value,
                    ),
                ).rowcount
            if changed:
                marked.append(row["run_id"])
        return marked

    def running_runs(
        self, job_id: str | None = None, *, stale_after: float = DEFAULT_STALE_AFTER
    ) -> list[RunRecord]:
        """Runs really in progress (of one job, or all), after clearing the dead ones.

        This is the check for "is this job already running?": a run whose process died never
        blocks the next one.
        """
        self.mark_interrupted(stale_after=stale_after)
        sql = "SELECT * FROM runs WHERE status = ?"
        params: list[Any] = [Status.PENDING.value]
        if job_id is not None:
            sql += " AND job_id = ?"
            params.append(job_id)
        return [
            self._run_from_row(row) for row in self._query(sql + " ORDER BY start_time", params)
        ]

    def delete_runs(self, *, before: int) -> int:
        """Delete the ended runs started before ``before`` (ms) with their tasks; how many."""
        with self.transaction() as db:
            return db.execute(
                "DELETE FROM runs WHERE start_time < ? AND status != ?",
                (before, Status.PENDING.value),
            ).rowcount

    # -- reading -----------------------------------------------------------------------------
    @staticmethod
    def _run_from_row(row: sqlite3.Row) -> RunRecord:
        return RunRecord(
            run_id=row["run_id"],
            job_id=row["job_id"],
            job_name=row["job_name"],
            schedule_id=row["schedule_id"],
            start=row["start_time"],
            end=row["end_time"],
            status=Status(row["status"]),
            pid=row["pid"],
            hostname=row["hostname"],
            heartbeat=row["heartbeat"],
            data=_load(row["data"]),
            result=_load(row["result"]),
        )

    def find_run(self, prefix: str) -> str | None:
        """The full id of the run whose id is or starts with ``prefix``; None if none.

        UsageError when several runs share the prefix.
        """
        prefix = prefix.strip().lower()
        if not prefix:
            return None
        rows = self._query(
            "SELECT run_id FROM runs WHERE run_id LIKE ? ESCAPE '\\' ORDER BY start_time DESC"
            " LIMIT 6",
            (_like(prefix)[1:],),
        )
        ids = [row["run_id"] for row in rows]
        if prefix in ids:
            return prefix
        if len(ids) > 1:
            shown = ", ".join(ids[:5])
            raise UsageError(
                f"run id prefix {prefix!r} matches several runs ({shown}); give more characters"
            )
        return ids[0] if ids else None

    def get_run(self, run_id: str) -> RunRecord | None:
        """One run with its whole task tree, warnings and infos; None if unknown."""
        rows = self._query("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            return None
        run = self._run_from_row(rows[0])
        tasks: dict[str, TaskRecord] = {}
        for row in self._query("SELECT * FROM tasks WHERE run_id = ? ORDER BY seq", (run_id,)):
            tasks[row["id"]] = TaskRecord(
                id=row["id"],
                run_id=run_id,
                parent_id=row["parent_id"],
                name=row["name"],
                data=_load(row["data"]),
                status=Status(row["status"]),
                start=row["start_time"],
                end=row["end_time"],
                result=_load(row["result"]),
            )
        for task in tasks.values():
            parent = tasks.get(task.parent_id) if task.parent_id else None
            (parent.children if parent else run.tasks).append(task)
        for row in self._query("SELECT * FROM messages WHERE run_id = ? ORDER BY seq", (run_id,)):
            message = Message(row["message"], _load(row["data"]), row["time"])
            owner: RunRecord | TaskRecord = tasks.get(row["task_id"], run)
            (owner.warnings if row["level"] == "warning" else owner.infos).append(message)
        return run

    def run_progress(
        self, run_id: str, *, pending_only: bool = False
    ) -> dict[str, VmProgressRecord]:
        """VM uuid → last recorded progress of a run, in the order the VMs started.

        Rows stay after the run ends (they go with the run); ``pending_only`` returns nothing
        for a run that is no longer pending.
        """
        sql = "SELECT p.* FROM progress p"
        params: list[Any] = []
        if pending_only:
            sql += " JOIN runs r ON r.run_id = p.run_id AND r.status = ?"
            params.append(Status.PENDING.value)
        sql += " WHERE p.run_id = ? ORDER BY p.start_time, p.rowid"
        rows = self._query(sql, [*params, run_id])
        return {
            row["vm_uuid"]: VmProgressRecord(
                vm_uuid=row["vm_uuid"],
                name=row["name"],
                stage=row["stage"],
                status=row["status"],
                transferred=row["transferred"],
                start=row["start_time"],
                updated=row["update_time"],
                updates=row["updates"],
            )
            for row in rows
        }

    def list_runs(self, run_filter: RunFilter | None = None) -> list[RunRecord]:
        """Runs matching ``run_filter``, newest first, without their task trees.

        Each summary carries :attr:`RunRecord.total_size`.
        """
        wanted = run_filter or RunFilter()
        where: list[str] = []
        params: list[Any] = []
        if wanted.job:
            where.append("(r.job_id = ? OR r.job_name = ? COLLATE NOCASE)")
            params += [wanted.job, wanted.job]
        if wanted.statuses:
            where.append(f"r.status IN ({', '.join('?' * len(wanted.statuses))})")
            params += wanted.statuses
        if wanted.since is not None:
            where.append("r.start_time >= ?")
            params.append(wanted.since)
        if wanted.vm:
            where.append(
                "EXISTS (SELECT 1 FROM tasks t WHERE t.run_id = r.run_id"
                " AND json_extract(t.data, '$.type') = 'VM'"
                " AND (json_extract(t.data, '$.id') = ? COLLATE NOCASE"
                "  OR json_extract(t.data, '$.name_label') = ? COLLATE NOCASE))"
            )
            params += [wanted.vm, wanted.vm]
        if wanted.search:
            pattern = _like(wanted.search)
            like = "LIKE ? ESCAPE '\\'"
            clause = (
                f"(r.job_name {like} OR r.data {like} OR r.result {like}"
                " OR EXISTS (SELECT 1 FROM tasks t WHERE t.run_id = r.run_id AND"
                f"  (t.name {like} OR t.data {like} OR t.result {like}))"
                " OR EXISTS (SELECT 1 FROM messages m WHERE m.run_id = r.run_id AND"
                f"  (m.message {like} OR m.data {like})))"
            )
            where.append(clause)
            params += [pattern] * clause.count("?")
        sql = "SELECT * FROM runs r"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY r.start_time DESC, r.rowid DESC"
        if wanted.limit is not None:
            sql += " LIMIT ?"
            params.append(wanted.limit)
        runs = [self._run_from_row(row) for row in self._query(sql, params)]
        self._add_sizes(runs)
        return runs

    def _add_sizes(self, runs: list[RunRecord]) -> None:
        if not runs:
            return
        by_id = {run.run_id: run for run in runs}
        marks = ", ".join("?" * len(by_id))
        rows = self._query(
            "SELECT run_id, id, parent_id, json_extract(result, '$.size') AS size FROM tasks"
            f" WHERE run_id IN ({marks})",
            list(by_id),
        )
        # a task's size speaks for its subtree (TaskRecord.size): count the highest ones only
        sized = {row["id"]: row for row in rows if isinstance(row["size"], int)}
        parents = {row["id"]: row["parent_id"] for row in rows}
        for task_id, row in sized.items():
            ancestor = parents.get(task_id)
            covered = False
            while ancestor:
                if ancestor in sized:
                    covered = True
                    break
                ancestor = parents.get(ancestor)
            if not covered:
                run = by_id[row["run_id"]]
                run.total_size = (run.total_size or 0) + row["size"]
