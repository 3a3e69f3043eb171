"""One simulated pool's XAPI: sessions, the API calls of §3, tasks and events.

:meth:`PoolXapi.call` is the dispatcher both transports use. Explicit handlers implement the
calls a backup tool makes, with XAPI's power-state rules and error codes; every class also
gets the generated calls of §1.6 (getters, setters, ``get_all_records_where``...). Calls that
change state exist as ``Async.<Class>.<method>`` and then run in a task.
"""

from __future__ import annotations

import base64
import inspect
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xobackup_hypervisor_xcpng.sim.codec import (
    NULL_REF,
    DateTime,
    Int32,
    XapiError,
    now,
    xml_value,
)
from xobackup_hypervisor_xcpng.sim.disks import BLOCK_SIZE, VdiData, derive_seed
from xobackup_hypervisor_xcpng.sim.faults import InFlight
from xobackup_hypervisor_xcpng.sim.model import (
    CLASSES,
    FIELD_TYPES,
    WRITABLE,
    Database,
    coerce,
    is_named,
    lower_class,
    new_ref,
)
from xobackup_hypervisor_xcpng.sim.where import compile_filter

if TYPE_CHECKING:
    from xobackup_hypervisor_xcpng.sim.simulator import Simulator

COMPLETED_TASK_TIMEOUT = 3900.0
"""Seconds a finished task stays visible (XAPI's ``completed_task_timeout``)."""
CBT_BLOCK = 64 * 1024

_SNAPSHOT_METHODS = {"VM.snapshot", "VM.checkpoint", "VM.snapshot_with_quiesce"}
QUIESCE_MODES = ("removed", "not_supported", "failed", "timeout", "success")
GUEST_SHUTDOWN_MODES = ("normal", "ignore", "no_pv_drivers")
"""How a guest answers ``VM.clean_shutdown``: halts at once, never halts (the call waits for
its task to be cancelled or a hard shutdown), or cannot be asked (``VM_MISSING_PV_DRIVERS``)."""


class DropConnection(Exception):
    """Close the client's connection without any answer (fault ``drop``)."""

    def __init__(self, reset: bool = False) -> None:
        self.reset = reset
        super().__init__("connection dropped")


class Http500(Exception):
    """Answer the RPC with an HTTP 500 HTML page (fault ``http500``)."""


@dataclass
class Records:
    """A ``get_all_records`` result, encoded lazily (XML reuses cached record encodings)."""

    db: Database
    cls: str
    refs: list[str] | None = None

    def to_python(self) -> dict[str, Any]:
        """Copies of the records, for JSON-RPC."""
        with self.db.lock:
            table = self.db.tables[self.cls]
            refs = list(table) if self.refs is None else self.refs
            return {ref: _copy_record(table[ref]) for ref in refs}

    def to_xml(self) -> str:
        """The encoded XML-RPC struct."""
        return self.db.encoded_records(self.cls, self.refs)


@dataclass
class Method:
    """One API method: its handler, how many arguments it takes after the session."""

    func: Callable[..., Any]
    min_args: int
    max_args: int
    session: bool = True
    asyncable: bool = False


def _copy_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v.copy() if type(v) in (dict, list) else v for k, v in record.items()}


def _api(name: str, *, session: bool = True, asyncable: bool = True) -> Callable[..., Any]:
    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        func._xapi = (name, session, asyncable)  # type: ignore[attr-defined]
        return func

    return mark


def _known_fields(cls: str, record: Any) -> dict[str, Any]:
    """The fields of a client-supplied record that the class has, coerced to their types."""
    return {k: coerce(cls, k, v) for k, v in dict(record).items() if k in FIELD_TYPES[cls]}


def parse_features(text: str) -> list[int]:
    """A feature mask ``xxxxxxxx-xxxxxxxx-...`` as 32-bit words."""
    return [int(word, 16) for word in text.split("-") if word]


class PoolXapi:
    """The XAPI of one pool (its master and members share this state)."""

    def __init__(self, sim: Simulator, index: int, flavour: str) -> None:
        self.sim = sim
        self.index = index
        self.flavour = flavour
        self.db = Database()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.in_flight = InFlight()
        self.disks: dict[str, VdiData] = {}
        """VDI ref -> content."""
        self._running = threading.local()
        """``task``: the task the calling thread runs (None for a synchronous call)."""
        self.guest_shutdown: dict[str, str] = {}
        """VM ref -> how its guest answers a clean shutdown (:data:`GUEST_SHUTDOWN_MODES`);
        absent: it shuts down at once."""
        self.checkpoint_failure: str | None = None
        """``suspend`` or ``resume``: how the next ``VM.checkpoint`` fails (then None)."""
        self.quiesce_mode = "removed"
        """How ``VM.snapshot_with_quiesce`` answers: one of :data:`QUIESCE_MODES`."""
        self.host_ports: dict[str, tuple[str, int]] = {}
        """host ref -> (address, port) of its listener."""
        self.methods = self._build_methods()
        self._task_done: dict[str, float] = {}

    # -- helpers -------------------------------------------------------------------------------
    @property
    def pool_ref(self) -> str:
        """The ref of the pool object (there is exactly one)."""
        return next(iter(self.db.tables["pool"]))

    @property
    def master(self) -> str:
        """The master host's ref."""
        return self.db.record("pool", self.pool_ref)["master"]

    def rec(self, cls: str, ref: str) -> dict[str, Any]:
        """A live record (HANDLE_INVALID when absent)."""
        return self.db.record(cls, ref)

    def _check_ref(self, cls: str, ref: str) -> dict[str, Any]:
        if not isinstance(ref, str):
            raise XapiError("HANDLE_INVALID", cls, str(ref))
        return self.db.record(cls, ref)

    # -- dispatch ------------------------------------------------------------------------------
    def call(self, method: str, params: list[Any], host: str) -> Any:
        """Run one API call as received by ``host``'s listener; XapiError on failure."""
        is_async = method.startswith("Async.")
        base = method[6:] if is_async else method
        calls = self.sim.calls
        if calls is not None:
            # what a client asked, without the session (a test reads the order of operations)
            calls.append((self.index, method, tuple(params[1:])))
        if method != "system.listMethods" and host != self.master:
            master = self.rec("host", self.master)["address"]
            raise XapiError("HOST_IS_SLAVE", master)
        entry = self.methods.get(base)
        if entry is None or (is_async and not entry.asyncable):
            raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
        if is_async:
            self._apply_faults(method, task=None)
            self._check_args(method, entry, params)
            session = self._session(params[0])
            return self._start_task(method, base, entry, params, session)
        return self._invoke(base, entry, params, task=None)

    def _check_args(self, method: str, entry: Method, params: list[Any]) -> None:
        given = len(params) - (1 if entry.session else 0)
        if not entry.min_args <= given <= entry.max_args:
            expected = entry.max_args + (1 if entry.session else 0)
            raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, expected, len(params))

    def _session(self, ref: Any) -> str:
        session = self.sessions.get(ref) if isinstance(ref, str) else None
        if session is None:
            raise XapiError("SESSION_INVALID", str(ref))
        session["last_active"] = time.time()
        return ref

    def _apply_faults(self, method: str, *, task: str | None) -> None:
        """Apply the faults armed on ``method``; ``task`` is set when it runs in a task."""
        in_task = task is not None
        for fault in self.sim.faults.match(self.index, (method,)):
            if fault.kind == "delay" and task is not None:
                # a slow operation: the task's progress moves in steps meanwhile
                for step in range(1, 11):
                    time.sleep(fault.seconds / 10)
                    self.set_progress(task, step / 11)
            elif fault.kind == "delay":
                time.sleep(fault.seconds)
            elif fault.kind == "hang":
                fault.wait(self.sim.stopping)
            elif fault.kind == "error":
                raise XapiError(fault.code, *fault.params)
            elif fault.kind == "drop":
                if in_task:
                    raise XapiError("INTERNAL_ERROR", "connection to the storage manager lost")
                raise DropConnection(fault.reset)
            elif fault.kind == "http500":
                if in_task:
                    raise XapiError("INTERNAL_ERROR", "internal server error")
                raise Http500(fault.code)

    def _invoke(self, method: str, entry: Method, params: list[Any], *, task: str | None) -> Any:
        if method in _SNAPSHOT_METHODS:
            with self.in_flight.track("snapshot"):
                return self._run(method, entry, params, task=task)
        return self._run(method, entry, params, task=task)

    def _run(self, method: str, entry: Method, params: list[Any], *, task: str | None) -> Any:
        self._running.task = task
        self._apply_faults(method, task=task)
        self._check_args(method, entry, params)
        if not entry.session:
            return entry.func(*params)
        session = self._session(params[0])
        return entry.func(session, *params[1:])

    def restart(self) -> dict[str, str]:
        """What a XAPI restart does to clients: sessions and tasks are gone, every ref changes.

        Returns the mapping old ref -> new ref (listeners must follow their host's).
        """
        db = self.db
        with db.lock:
            self.sessions.clear()
            db.tables["task"].clear()
            self._task_done.clear()
            mapping = {ref: new_ref() for table in db.tables.values() for ref in table}

            def remap(value: Any) -> Any:
                kind = type(value)
                if kind is str:
                    return mapping.get(value, value)
                if kind is list:
                    return [mapping.get(v, v) if type(v) is str else v for v in value]
                if kind is dict:
                    return {
                        mapping.get(k, k): mapping.get(v, v) if type(v) is str else v
                        for k, v in value.items()
                    }
                return value

            for cls, table in db.tables.items():
                renumbered = {
                    mapping[ref]: {k: remap(v) for k, v in record.items()}
                    for ref, record in table.items()
                }
                # in place: the generated getters hold on to the table objects
                table.clear()
                table.update(renumbered)
                db.rebuild_index(cls)
            self.disks = {mapping.get(ref, ref): data for ref, data in self.disks.items()}
            self.host_ports = {mapping[ref]: where for ref, where in self.host_ports.items()}
            db.forget_history()
        return mapping

    # -- tasks ---------------------------------------------------------------------------------
    def new_task(self, label: str, description: str = "", **fields: Any) -> str:
        """Create a pending task (also used by the HTTP handlers)."""
        self._gc_tasks()
        return self.db.create(
            "task",
            {
                "name_label": label,
                "name_description": description,
                "created": now(),
                "resident_on": self.master,
                "allowed_operations": ["cancel"],
                **fields,
            },
        )

    def finish_task(self, task: str, result: Any = None, error: XapiError | None = None) -> None:
        """Settle a task: success with ``result`` (encoded as an XML-RPC fragment) or failure."""
        self._task_done[task] = time.time()
        with self.db.lock:
            if not self.db.exists("task", task):
                return
            record = self.rec("task", task)
            if record["status"] in ("cancelled", "cancelling"):
                self.db.update("task", task, status="cancelled", finished=now())
                return
            if error is not None:
                self.db.update(
                    "task",
                    task,
                    status="failure",
                    error_info=error.description,
                    finished=now(),
                    allowed_operations=[],
                )
            else:
                encoded = "" if result is None or result == "" else xml_value(result)
                self.db.update(
                    "task",
                    task,
                    status="success",
                    result=encoded,
                    progress=1.0,
                    finished=now(),
                    allowed_operations=[],
                )

    def task_cancelled(self, task: str | None) -> bool:
        """Whether a client asked to cancel this task."""
        if not task or not self.db.exists("task", task):
            return False
        return self.rec("task", task)["status"] in ("cancelling", "cancelled")

    def set_progress(self, task: str, progress: float) -> None:
        """Publish a task's progress (0..1)."""
        with self.db.lock:
            if self.db.exists("task", task) and self.rec("task", task)["status"] == "pending":
                self.db.update("task", task, progress=round(progress, 4))

    def _gc_tasks(self) -> None:
        limit = time.time() - COMPLETED_TASK_TIMEOUT
        with self.db.lock:
            for ref, record in list(self.db.tables["task"].items()):
                if record["status"] != "pending" and self._task_done.get(ref, limit) < limit:
                    self.db.delete("task", ref)
                    self._task_done.pop(ref, None)

    def _start_task(
        self, method: str, base: str, entry: Method, params: list[Any], session: str
    ) -> str:
        task = self.new_task(method, "")

        def work() -> None:
            try:
                result = self._invoke(base, entry, params, task=task)
            except XapiError as error:
                self.finish_task(task, error=error)
            except Exception as error:  # a simulator bug must still settle the task
                self.finish_task(task, error=XapiError("INTERNAL_ERROR", repr(error)))
            else:
                self.finish_task(task, result)

        threading.Thread(target=work, name=f"sim-{method}", daemon=True).start()
        return task

    # -- method table --------------------------------------------------------------------------
    def _build_methods(self) -> dict[str, Method]:
        methods: dict[str, Method] = {}
        for cls in CLASSES:
            self._generic(cls, methods)
        for attribute in vars(type(self)).values():
            spec = getattr(attribute, "_xapi", None)
            if spec is None:
                continue
            func = attribute.__get__(self)
            name, session, asyncable = spec
            parameters = list(inspect.signature(func).parameters.values())
            if session:
                parameters = parameters[1:]
            required = sum(1 for p in parameters if p.default is inspect.Parameter.empty)
            methods[name] = Method(func, required, len(parameters), session, asyncable)
        return methods

    def _generic(self, cls: str, methods: dict[str, Method]) -> None:
        db = self.db
        table = db.tables[cls]

        def add(name: str, func: Callable[..., Any], args: int) -> None:
            methods[f"{cls}.{name}"] = Method(func, args, args)

        add("get_all", lambda s: list(table), 0)
        add("get_all_records", lambda s: Records(db, cls), 0)

        def where(s: str, expr: str) -> Records:
            predicate = compile_filter(expr)
            with db.lock:
                return Records(db, cls, [r for r, rec in table.items() if predicate(rec)])

        add("get_all_records_where", where, 1)

        def get_record(s: str, ref: str) -> dict[str, Any]:
            with db.lock:
                return _copy_record(self._check_ref(cls, ref))

        add("get_record", get_record, 1)
        add("get_by_uuid", lambda s, uuid: db.by_uuid(cls, uuid), 1)
        if is_named(cls):
            add(
                "get_by_name_label",
                lambda s, label: [r for r, v in list(table.items()) if v["name_label"] == label],
                1,
            )
        writable = WRITABLE.get(cls, set())
        for field, kind in FIELD_TYPES[cls].items():
            add(f"get_{field}", self._getter(cls, field), 1)
            if field not in writable:
                continue
            add(f"set_{field}", self._setter(cls, field), 2)
            if kind is dict:
                add(f"add_to_{field}", self._map_add(cls, field), 3)
                add(f"remove_from_{field}", self._map_remove(cls, field), 2)
            elif kind is list:
                add(f"add_{field}", self._set_add(cls, field), 2)
                add(f"remove_{field}", self._set_remove(cls, field), 2)

    def _getter(self, cls: str, field: str) -> Callable[..., Any]:
        def get(s: str, ref: str) -> Any:
            value = self._check_ref(cls, ref)[field]
            return value.copy() if type(value) in (dict, list) else value

        return get

    def _setter(self, cls: str, field: str) -> Callable[..., Any]:
        special = getattr(self, f"_set_{cls}_{field}", None)

        def set_(s: str, ref: str, value: Any) -> str:
            self._check_ref(cls, ref)
            value = coerce(cls, field, value)
            if special is not None:
                special(ref, value)
            self.db.update(cls, ref, **{field: value})
            return ""

        return set_

    def _map_add(self, cls: str, field: str) -> Callable[..., Any]:
        def add(s: str, ref: str, key: str, value: str) -> str:
            with self.db.lock:
                record = self._check_ref(cls, ref)
                if key in record[field]:
                    raise XapiError("MAP_DUPLICATE_KEY", cls, field, record["uuid"], key)
                record[field][key] = str(value)
                self.db.touch(cls, ref)
            return ""

        return add

    def _map_remove(self, cls: str, field: str) -> Callable[..., Any]:
        def remove(s: str, ref: str, key: str) -> str:
            with self.db.lock:
                record = self._check_ref(cls, ref)
                if record[field].pop(key, None) is not None:
                    self.db.touch(cls, ref)
            return ""

        return remove

    def _set_add(self, cls: str, field: str) -> Callable[..., Any]:
        def add(s: str, ref: str, value: str) -> str:
            self._check_ref(cls, ref)
            self.db.add_to_set(cls, ref, field, value)
            return ""

        return add

    def _set_remove(self, cls: str, field: str) -> Callable[..., Any]:
        def remove(s: str, ref: str, value: str) -> str:
            self._check_ref(cls, ref)
            self.db.remove_from_set(cls, ref, field, value)
            return ""

        return remove

    def _set_VM_suspend_VDI(self, vm: str, vdi: str) -> None:
        record = self.rec("VM", vm)
        if record["power_state"] != "Suspended":
            raise XapiError("VM_BAD_POWER_STATE", vm, "suspended", record["power_state"].lower())
        new = self._check_ref("VDI", vdi)
        if new["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        old = record["suspend_VDI"]
        if old != NULL_REF and self.disks[old].blocks != self.disks[vdi].blocks:
            old_uuid = self.rec("VDI", old)["uuid"]
            raise XapiError(
                "SUSPEND_VDI_REPLACEMENT_IS_NOT_IDENTICAL", f"{old_uuid}", f"{new['uuid']}"
            )

    # -- session, system -----------------------------------------------------------------------
    @_api("session.login_with_password", session=False, asyncable=False)
    def login_with_password(
        self, uname: str, pwd: str, version: str = "1.1", originator: str = ""
    ) -> str:
        if uname != self.sim.username or pwd != self.sim.password:
            raise XapiError("SESSION_AUTHENTICATION_FAILED", uname, "Authentication failure")
        ref = f"OpaqueRef:{uuidlib.uuid4()}"
        self.sessions[ref] = {
            "user": uname,
            "originator": originator,
            "last_active": time.time(),
        }
        return ref

    @_api("session.logout", asyncable=False)
    def logout(self, session: str) -> str:
        self.sessions.pop(session, None)
        return ""

    @_api("session.get_this_host", asyncable=False)
    def get_this_host(self, session: str, self_session: str) -> str:
        return self.master

    @_api("host.get_servertime", asyncable=False)
    def host_get_servertime(self, session: str, host: str) -> DateTime:
        self._check_ref("host", host)
        return now()

    @_api("SR.scan")
    def sr_scan(self, session: str, sr: str) -> str:
        self._check_ref("SR", sr)
        return ""

    @_api("system.listMethods", session=False, asyncable=False)
    def list_methods(self) -> list[str]:
        names = sorted(self.methods)
        return names + [f"Async.{n}" for n in names if self.methods[n].asyncable]

    # -- events --------------------------------------------------------------------------------
    @_api("event.from", asyncable=False)
    def event_from(self, session: str, classes: list[str], token: str, timeout: Any) -> Any:
        wanted = {c.lower() for c in classes}
        every = "*" in wanted
        by_lower = {lower_class(c): c for c in CLASSES}
        db = self.db
        if token == "":
            with db.lock:
                events = []
                for lower, cls in by_lower.items():
                    if not (every or lower in wanted):
                        continue
                    for ref, record in db.tables[cls].items():
                        events.append(self._event_record(db.generation, lower, "add", ref, record))
                return self._event_batch(events, wanted, every, by_lower)
        try:
            since = int(str(token).split(",")[0])
        except ValueError:
            raise XapiError("EVENT_FROM_TOKEN_PARSE_FAILURE", str(token)) from None
        deadline = time.monotonic() + float(timeout)
        with db.changed:
            while True:
                latest: dict[tuple[str, str], tuple[int, str]] = {}
                for event_id, lower, operation, ref, _ in reversed(db.events):
                    if event_id <= since:
                        break
                    if (every or lower in wanted) and (lower, ref) not in latest:
                        latest[(lower, ref)] = (event_id, operation)
                remaining = deadline - time.monotonic()
                if latest or remaining <= 0 or self.sim.stopping.is_set():
                    break
                db.changed.wait(min(remaining, 0.5))
            events = []
            for (lower, ref), (event_id, operation) in sorted(
                latest.items(), key=lambda item: item[1][0]
            ):
                record = db.tables[by_lower[lower]].get(ref)
                if record is None:
                    operation = "del"
                events.append(self._event_record(event_id, lower, operation, ref, record))
            return self._event_batch(events, wanted, every, by_lower)

    @staticmethod
    def _event_record(
        event_id: int, lower: str, operation: str, ref: str, record: dict[str, Any] | None
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": str(event_id),
            "timestamp": f"{time.time():.6f}",
            "class": lower,
            "operation": operation,
            "ref": ref,
        }
        if operation != "del" and record is not None:
            event["snapshot"] = _copy_record(record)
        return event

    def _event_batch(
        self, events: list[dict[str, Any]], wanted: set[str], every: bool, by_lower: dict
    ) -> dict[str, Any]:
        counts = {
            lower: Int32(len(self.db.tables[cls]))
            for lower, cls in by_lower.items()
            if every or lower in wanted
        }
        return {"events": events, "valid_ref_counts": counts, "token": self.db.token()}

    @_api("event.inject", asyncable=False)
    def event_inject(self, session: str, cls: str, ref: str) -> str:
        self.db.touch(self._class_name(cls), ref)
        return self.db.token()

    @staticmethod
    def _class_name(name: str) -> str:
        for cls in CLASSES:
            if cls.lower() == name.lower():
                return cls
        raise XapiError("HANDLE_INVALID", name, "")

    # -- tasks ---------------------------------------------------------------------------------
    @_api("task.create", asyncable=False)
    def task_create(self, session: str, label: str, description: str) -> str:
        return self.new_task(label, description)

    @_api("task.destroy", asyncable=False)
    def task_destroy(self, session: str, task: str) -> str:
        self._check_ref("task", task)
        self.db.delete("task", task)
        return ""

    @_api("task.cancel")
    def task_cancel(self, session: str, task: str) -> str:
        with self.db.lock:
            if self._check_ref("task", task)["status"] == "pending":
                self.db.update(
                    "task",
                    task,
                    status="cancelled",
                    finished=now(),
                    error_info=["TASK_CANCELLED", task],
                )
        return ""

    # -- VM power cycle ------------------------------------------------------------------------
    def _power_check(self, vm: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        record = self._check_ref("VM", vm)
        if record["power_state"] not in allowed:
            raise XapiError(
                "VM_BAD_POWER_STATE",
                vm,
                ", ".join(s.lower() for s in allowed),
                record["power_state"].lower(),
            )
        return record

    def _blocked(self, vm: str, operation: str) -> None:
        reason = self.rec("VM", vm)["blocked_operations"].get(operation)
        if reason is not None:
            raise XapiError("OPERATION_BLOCKED", vm, reason)

    def _attach_disks(self, vm: str, attached: bool) -> None:
        for vbd in self.rec("VM", vm)["VBDs"]:
            self.db.update("VBD", vbd, currently_attached=attached)
        for vif in self.rec("VM", vm)["VIFs"]:
            self.db.update("VIF", vif, currently_attached=attached)

    def _boot(self, vm: str, host: str, paused: bool) -> None:
        host_cpu = self.rec("host", host)["cpu_info"]
        pool_cpu = self.rec("pool", self.pool_ref)["cpu_info"]
        record = self.rec("VM", vm)
        key = "features_pv_host" if record["domain_type"] == "pv" else "features_hvm_host"
        self.db.update(
            "VM",
            vm,
            power_state="Paused" if paused else "Running",
            resident_on=host,
            domid=len(self.rec("host", host)["resident_VMs"]) + 1,
            last_boot_CPU_flags={
                "vendor": host_cpu.get("vendor", ""),
                "features": pool_cpu.get(key, ""),
            },
        )
        self.db.add_to_set("host", host, "resident_VMs", vm)
        self._attach_disks(vm, True)

    def _halt(self, vm: str) -> None:
        host = self.rec("VM", vm)["resident_on"]
        if self.db.exists("host", host):
            self.db.remove_from_set("host", host, "resident_VMs", vm)
        self.db.update("VM", vm, power_state="Halted", resident_on=NULL_REF, domid=-1)
        self._attach_disks(vm, False)

    @_api("VM.start")
    def vm_start(self, session: str, vm: str, start_paused: bool, force: bool) -> str:
        return self.vm_start_on(session, vm, self.master, start_paused, force)

    @_api("VM.start_on")
    def vm_start_on(self, session: str, vm: str, host: str, paused: bool, force: bool) -> str:
        record = self._check_ref("VM", vm)
        self._check_ref("host", host)
        if record["is_a_template"]:
            raise XapiError("VM_IS_TEMPLATE", vm, "start")
        self._power_check(vm, ("Halted",))
        self._blocked(vm, "start")
        self._boot(vm, host, bool(paused))
        return ""

    def cpu_check(self, vm: str, host: str) -> None:
        """XAPI's own CPU compatibility test for non-halted VMs (§3.3)."""
        record = self.rec("VM", vm)
        cpu = self.rec("host", host)["cpu_info"]
        key = "features_pv" if record["domain_type"] == "pv" else "features_hvm"
        if "vendor" not in cpu or key not in cpu:
            raise XapiError(
                "VM_INCOMPATIBLE_WITH_THIS_HOST",
                vm,
                host,
                "Host does not have new leveling feature keys",
            )
        flags = record["last_boot_CPU_flags"]
        if "vendor" in flags and flags["vendor"] != cpu["vendor"]:
            raise XapiError(
                "VM_INCOMPATIBLE_WITH_THIS_HOST",
                vm,
                host,
                f"VM last booted on a CPU from vendor {flags['vendor']}, "
                f"this host has {cpu['vendor']}",
            )
        if flags.get("features"):
            host_words = parse_features(cpu[key])
            vm_words = parse_features(flags["features"])
            vm_words = (vm_words + [0] * len(host_words))[: len(host_words)]
            missing = [v & ~h for v, h in zip(vm_words, host_words, strict=True)]
            if any(missing):
                raise XapiError(
                    "VM_INCOMPATIBLE_WITH_THIS_HOST",
                    vm,
                    host,
                    "VM last booted on a CPU with features this host's CPU does not have: "
                    + "-".join(f"{w:08x}" for w in missing),
                )

    @_api("VM.resume")
    def vm_resume(self, session: str, vm: str, start_paused: bool, force: bool) -> str:
        return self.vm_resume_on(session, vm, self.master, start_paused, force)

    @_api("VM.resume_on")
    def vm_resume_on(self, session: str, vm: str, host: str, paused: bool, force: bool) -> str:
        record = self._power_check(vm, ("Suspended",))
        self._check_ref("host", host)
        self._blocked(vm, "resume")
        if not force:
            self.cpu_check(vm, host)
        flags = dict(record["last_boot_CPU_flags"])
        suspend_vdi = record["suspend_VDI"]
        self._boot(vm, host, bool(paused))
        # resuming keeps the flags the VM booted with, and consumes the memory image
        self.db.update("VM", vm, last_boot_CPU_flags=flags, suspend_VDI=NULL_REF)
        if record["ha_restart_priority"] == "restart":
            self.db.update("VM", vm, ha_always_run=True)
        if self.db.exists("VDI", suspend_vdi):
            self._destroy_vdi(suspend_vdi)
        return ""

    @_api("VM.assert_can_boot_here", asyncable=True)
    def vm_assert_can_boot_here(self, session: str, vm: str, host: str) -> str:
        self._check_ref("host", host)
        if self._check_ref("VM", vm)["power_state"] != "Halted":
            self.cpu_check(vm, host)
        return ""

    @_api("VM.clean_shutdown")
    def vm_clean_shutdown(self, session: str, vm: str) -> str:
        self._power_check(vm, ("Running",))
        self._blocked(vm, "clean_shutdown")
        mode = self.guest_shutdown.get(vm, "normal")
        if mode == "no_pv_drivers":
            # an HVM guest without PV drivers cannot be asked to shut down (§3.1)
            raise XapiError("VM_MISSING_PV_DRIVERS", vm)
        if mode == "ignore":
            # the request is sent but the guest never halts: the call waits until its task
            # is cancelled or something else (a hard shutdown) halts the VM
            while not self.sim.stopping.is_set():
                task = getattr(self._running, "task", None)
                if self.task_cancelled(task):
                    raise XapiError("TASK_CANCELLED", task or "")
                if self.rec("VM", vm)["power_state"] != "Running":
                    return ""
                time.sleep(0.02)
            raise XapiError("INTERNAL_ERROR", "the simulator is stopping")
        self._halt(vm)
        return ""

    @_api("VM.hard_shutdown")
    def vm_hard_shutdown(self, session: str, vm: str) -> str:
        record = self._power_check(vm, ("Running", "Paused", "Suspended"))
        self._blocked(vm, "hard_shutdown")
        suspend_vdi = record["suspend_VDI"]
        self._halt(vm)
        if suspend_vdi != NULL_REF and self.db.exists("VDI", suspend_vdi):
            self.db.update("VM", vm, suspend_VDI=NULL_REF)
            self._destroy_vdi(suspend_vdi)
        return ""

    @_api("VM.suspend")
    def vm_suspend(self, session: str, vm: str) -> str:
        self._power_check(vm, ("Running",))
        self._blocked(vm, "suspend")
        memory = self._memory_image(vm, f"Suspend image of {self.rec('VM', vm)['name_label']}")
        host = self.rec("VM", vm)["resident_on"]
        if self.db.exists("host", host):
            self.db.remove_from_set("host", host, "resident_VMs", vm)
        self.db.update(
            "VM", vm, power_state="Suspended", suspend_VDI=memory, resident_on=NULL_REF, domid=-1
        )
        return ""

    def _memory_image(self, vm: str, label: str) -> str:
        """A suspend VDI holding the VM's (generated) memory image."""
        record = self.rec("VM", vm)
        pool = self.rec("pool", self.pool_ref)
        sr = pool["suspend_image_SR"]
        if not self.db.exists("SR", sr):
            sr = pool["default_SR"]
        size = -(-record["memory_static_max"] // BLOCK_SIZE) * BLOCK_SIZE + BLOCK_SIZE
        vdi = self.create_vdi(sr, label, size, vdi_type="suspend")
        data = self.disks[vdi]
        seed = derive_seed("memory", record["uuid"], time.time_ns())
        for index in range(0, data.block_count, max(1, data.block_count // 8)):
            data.set_generated(index, derive_seed(seed, index))
        return vdi

    # -- disks ---------------------------------------------------------------------------------
    def create_vdi(
        self,
        sr: str,
        label: str,
        size: int,
        *,
        vdi_type: str = "user",
        data: VdiData | None = None,
        **fields: Any,
    ) -> str:
        """Create a VDI record with its content (empty unless ``data`` is given)."""
        self._check_ref("SR", sr)
        size = int(size)
        if size < 0:
            raise XapiError("INTERNAL_ERROR", "negative virtual_size")
        if data is None:
            data = VdiData(self.sim.store, size)
        vdi_uuid = fields.pop("uuid", None) or str(uuidlib.uuid4())
        ref = self.db.create(
            "VDI",
            {
                "uuid": vdi_uuid,
                "name_label": label,
                "SR": sr,
                "virtual_size": size,
                "physical_utilisation": len(data.blocks) * BLOCK_SIZE,
                "type": vdi_type,
                "location": vdi_uuid,
                "sm_config": {"vhd-blocks": "", "image-format": "vhd"},
                **fields,
            },
        )
        self.disks[ref] = data
        self.db.add_to_set("SR", sr, "VDIs", ref)
        return ref

    def _vdi_in_use(self, vdi: str, operation: str) -> None:
        for vbd in self.rec("VDI", vdi)["VBDs"]:
            if self.db.exists("VBD", vbd) and self.rec("VBD", vbd)["currently_attached"]:
                raise XapiError("VDI_IN_USE", vdi, operation)

    def _destroy_vdi(self, vdi: str) -> None:
        record = self.rec("VDI", vdi)
        for vbd in list(record["VBDs"]):
            if self.db.exists("VBD", vbd):
                self._destroy_vbd(vbd)
        origin = record["snapshot_of"]
        if self.db.exists("VDI", origin):
            self.db.remove_from_set("VDI", origin, "snapshots", vdi)
        self.db.remove_from_set("SR", record["SR"], "VDIs", vdi)
        self.db.delete("VDI", vdi)
        self.disks.pop(vdi, None)

    def _copy_vdi(self, vdi: str, *, snapshot: bool, sr: str | None = None) -> str:
        record = self.rec("VDI", vdi)
        fields: dict[str, Any] = {
            "name_description": record["name_description"],
            "other_config": dict(record["other_config"]),
            "sm_config": {**record["sm_config"], "vhd-parent": record["uuid"]},
            "cbt_enabled": record["cbt_enabled"] if snapshot else False,
            "tags": list(record["tags"]),
        }
        if snapshot:
            fields.update(is_a_snapshot=True, snapshot_of=vdi, snapshot_time=now(), read_only=False)
        new = self.create_vdi(
            sr or record["SR"],
            record["name_label"],
            record["virtual_size"],
            vdi_type=record["type"],
            data=self.disks[vdi].copy(),
            **fields,
        )
        if snapshot:
            self.db.add_to_set("VDI", vdi, "snapshots", new)
        return new

    @_api("VDI.create")
    def vdi_create(self, session: str, record: dict[str, Any]) -> str:
        fields = _known_fields("VDI", record)
        for key in ("SR", "virtual_size", "type"):
            if key not in fields:
                raise XapiError("FIELD_TYPE_ERROR", key)
        sr = fields.pop("SR")
        size = fields.pop("virtual_size")
        label = fields.pop("name_label", "")
        vdi_type = fields.pop("type")
        for key in (
            "VBDs",
            "snapshots",
            "crash_dumps",
            "snapshot_of",
            "is_a_snapshot",
            "parent",
            "physical_utilisation",
            "uuid",
            "location",
        ):
            fields.pop(key, None)
        self._check_ref("SR", sr)
        if self.rec("SR", sr)["content_type"] == "iso":
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)
        return self.create_vdi(sr, label, size, vdi_type=vdi_type, **fields)

    @_api("VDI.destroy")
    def vdi_destroy(self, session: str, vdi: str) -> str:
        self._check_ref("VDI", vdi)
        self._vdi_in_use(vdi, "destroy")
        self._destroy_vdi(vdi)
        return ""

    @_api("VDI.snapshot")
    def vdi_snapshot(self, session: str, vdi: str, driver_params: dict | None = None) -> str:
        self._check_ref("VDI", vdi)
        return self._copy_vdi(vdi, snapshot=True)

    @_api("VDI.clone")
    def vdi_clone(self, session: str, vdi: str, driver_params: dict | None = None) -> str:
        self._check_ref("VDI", vdi)
        return self._copy_vdi(vdi, snapshot=False)

    @_api("VDI.copy")
    def vdi_copy(self, session: str, vdi: str, sr: str) -> str:
        self._check_ref("VDI", vdi)
        target = sr if self.db.exists("SR", sr) else self.rec("VDI", vdi)["SR"]
        return self._copy_vdi(vdi, snapshot=False, sr=target)

    @_api("VDI.resize")
    def vdi_resize(self, session: str, vdi: str, size: Any) -> str:
        self._check_ref("VDI", vdi)
        size = int(size)
        self.disks[vdi].resize(size)
        self.db.update("VDI", vdi, virtual_size=size)
        return ""

    @_api("VDI.enable_cbt")
    def vdi_enable_cbt(self, session: str, vdi: str) -> str:
        self._check_ref("VDI", vdi)
        self.db.update("VDI", vdi, cbt_enabled=True)
        return ""

    @_api("VDI.disable_cbt")
    def vdi_disable_cbt(self, session: str, vdi: str) -> str:
        self._check_ref("VDI", vdi)
        self.db.update("VDI", vdi, cbt_enabled=False)
        return ""

    @_api("VDI.list_changed_blocks")
    def vdi_list_changed_blocks(self, session: str, vdi_from: str, vdi_to: str) -> str:
        old = self._check_ref("VDI", vdi_from)
        new = self._check_ref("VDI", vdi_to)
        for ref, record in ((vdi_from, old), (vdi_to, new)):
            if not record["cbt_enabled"]:
                raise XapiError("VDI_NO_CBT_METADATA", ref)
        self._vdi_in_use(vdi_to, "list_changed_blocks")
        size = new["virtual_size"]
        bitmap = bytearray(-(-size // CBT_BLOCK // 8))
        old_data = self.disks.get(vdi_from) or VdiData(self.sim.store, old["virtual_size"])
        # content is tracked per 2 MiB block: mark its 32 bits of 64 KiB (one 32-bit word)
        for index in self.disks[vdi_to].changed_blocks(old_data):
            start = index * 4
            bitmap[start : start + 4] = b"\xff" * len(bitmap[start : start + 4])
        return base64.b64encode(bytes(bitmap)).decode()

    @_api("VDI.data_destroy")
    def vdi_data_destroy(self, session: str, vdi: str) -> str:
        record = self._check_ref("VDI", vdi)
        if not record["cbt_enabled"]:
            raise XapiError("VDI_NO_CBT_METADATA", vdi)
        self._vdi_in_use(vdi, "data_destroy")
        self.disks.pop(vdi, None)
        self.db.update("VDI", vdi, type="cbt_metadata", physical_utilisation=0)
        return ""

    @_api("VDI.get_nbd_info", asyncable=False)
    def vdi_get_nbd_info(self, session: str, vdi: str) -> list[Any]:
        if self._check_ref("VDI", vdi)["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        return []

    # -- devices -------------------------------------------------------------------------------
    @_api("VBD.create")
    def vbd_create(self, session: str, record: dict[str, Any]) -> str:
        fields = _known_fields("VBD", record)
        vm = fields.get("VM", NULL_REF)
        self._check_ref("VM", vm)
        vdi = fields.get("VDI", NULL_REF)
        if vdi != NULL_REF:
            self._check_ref("VDI", vdi)
        fields.pop("uuid", None)
        fields["currently_attached"] = False
        if fields.get("userdevice") in (None, "", "autodetect"):
            used = {self.rec("VBD", b)["userdevice"] for b in self.rec("VM", vm)["VBDs"]}
            fields["userdevice"] = str(next(i for i in range(64) if str(i) not in used))
        fields.setdefault("device", "")
        return self._create_vbd(fields)

    def _create_vbd(self, fields: dict[str, Any]) -> str:
        vbd = self.db.create("VBD", fields)
        self.db.add_to_set("VM", fields["VM"], "VBDs", vbd)
        if fields.get("VDI", NULL_REF) != NULL_REF:
            self.db.add_to_set("VDI", fields["VDI"], "VBDs", vbd)
        return vbd

    def _destroy_vbd(self, vbd: str) -> None:
        record = self.rec("VBD", vbd)
        self.db.remove_from_set("VM", record["VM"], "VBDs", vbd)
        self.db.remove_from_set("VDI", record["VDI"], "VBDs", vbd)
        self.db.delete("VBD", vbd)

    @_api("VBD.plug")
    def vbd_plug(self, session: str, vbd: str) -> str:
        record = self._check_ref("VBD", vbd)
        if record["currently_attached"]:
            raise XapiError("DEVICE_ALREADY_ATTACHED", vbd)
        self._power_check(record["VM"], ("Running",))
        self.db.update("VBD", vbd, currently_attached=True)
        return ""

    @_api("VBD.unplug")
    def vbd_unplug(self, session: str, vbd: str) -> str:
        if not self._check_ref("VBD", vbd)["currently_attached"]:
            raise XapiError("DEVICE_ALREADY_DETACHED", vbd)
        self.db.update("VBD", vbd, currently_attached=False)
        return ""

    @_api("VBD.unplug_force")
    def vbd_unplug_force(self, session: str, vbd: str) -> str:
        self._check_ref("VBD", vbd)
        self.db.update("VBD", vbd, currently_attached=False)
        return ""

    @_api("VBD.destroy")
    def vbd_destroy(self, session: str, vbd: str) -> str:
        if self._check_ref("VBD", vbd)["currently_attached"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "VBD is currently attached")
        self._destroy_vbd(vbd)
        return ""

    @_api("VIF.create")
    def vif_create(self, session: str, record: dict[str, Any]) -> str:
        fields = _known_fields("VIF", record)
        self._check_ref("VM", fields.get("VM", NULL_REF))
        self._check_ref("network", fields.get("network", NULL_REF))
        fields.pop("uuid", None)
        if not fields.get("MAC"):
            fields["MAC"] = "02:" + ":".join(f"{b:02x}" for b in uuidlib.uuid4().bytes[:5])
            fields["MAC_autogenerated"] = True
        fields["currently_attached"] = False
        return self._create_vif(fields)

    def _create_vif(self, fields: dict[str, Any]) -> str:
        vif = self.db.create("VIF", fields)
        self.db.add_to_set("VM", fields["VM"], "VIFs", vif)
        self.db.add_to_set("network", fields["network"], "VIFs", vif)
        return vif

    def _destroy_vif(self, vif: str) -> None:
        record = self.rec("VIF", vif)
        self.db.remove_from_set("VM", record["VM"], "VIFs", vif)
        self.db.remove_from_set("network", record["network"], "VIFs", vif)
        self.db.delete("VIF", vif)

    @_api("VIF.destroy")
    def vif_destroy(self, session: str, vif: str) -> str:
        self._check_ref("VIF", vif)
        self._destroy_vif(vif)
        return ""

    # -- VM lifecycle --------------------------------------------------------------------------
    @_api("VM.create")
    def vm_create(self, session: str, record: dict[str, Any]) -> str:
        fields = _known_fields("VM", record)
        for key in (
            "VBDs",
            "VIFs",
            "snapshots",
            "children",
            "consoles",
            "crash_dumps",
            "VUSBs",
            "VTPMs",
            "VGPUs",
            "attached_PCIs",
            "current_operations",
            "allowed_operations",
            "uuid",
            "resident_on",
            "metrics",
            "guest_metrics",
            "snapshot_of",
            "parent",
            "is_a_snapshot",
            "domid",
        ):
            fields.pop(key, None)
        state = fields.pop("power_state", "Halted")
        suspend_vdi = fields.pop("suspend_VDI", NULL_REF)
        # XCP-ng can create a VM straight in the Suspended state, so a memory backup restores
        # with its RAM; Citrix Hypervisor (like XAPI upstream) creates every VM Halted
        if state == "Suspended" and self.flavour == "xcp-ng":
            vdi = self._check_ref("VDI", suspend_vdi)
            if vdi["type"] == "cbt_metadata":
                raise XapiError("VDI_INCOMPATIBLE_TYPE", suspend_vdi, "cbt_metadata")
            fields.update(power_state="Suspended", suspend_VDI=suspend_vdi)
        else:
            fields["power_state"] = "Halted"
        metrics = self.db.create("VM_metrics", {})
        return self.db.create("VM", {**fields, "metrics": metrics})

    @_api("VM.provision")
    def vm_provision(self, session: str, vm: str) -> str:
        self._check_ref("VM", vm)
        return ""

    @_api("VM.set_memory_limits")
    def vm_set_memory_limits(
        self,
        session: str,
        vm: str,
        static_min: Any,
        static_max: Any,
        dynamic_min: Any,
        dynamic_max: Any,
    ) -> str:
        self._power_check(vm, ("Halted",))
        values = [int(v) for v in (static_min, dynamic_min, dynamic_max, static_max)]
        if values != sorted(values):
            raise XapiError(
                "MEMORY_CONSTRAINT_VIOLATION",
                "Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max "
                "<= static_max",
            )
        self.db.update(
            "VM",
            vm,
            memory_static_min=values[0],
            memory_dynamic_min=values[1],
            memory_dynamic_max=values[2],
            memory_static_max=values[3],
        )
        return ""

    @_api("VM.destroy")
    def vm_destroy(self, session: str, vm: str) -> str:
        record = self._check_ref("VM", vm)
        if record["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "cannot destroy the control domain")
        self._power_check(vm, ("Halted", "Suspended"))
        self._blocked(vm, "destroy")
        with self.db.lock:
            for vbd in list(record["VBDs"]):
                self._destroy_vbd(vbd)
            for vif in list(record["VIFs"]):
                self._destroy_vif(vif)
            if self.db.exists("VM_metrics", record["metrics"]):
                self.db.delete("VM_metrics", record["metrics"])
            origin = record["snapshot_of"]
            if self.db.exists("VM", origin):
                self.db.remove_from_set("VM", origin, "snapshots", vm)
                if self.rec("VM", origin)["parent"] == vm:
                    self.db.update("VM", origin, parent=record["parent"])
            for snapshot in record["snapshots"]:
                if self.db.exists("VM", snapshot):
                    self.db.update("VM", snapshot, snapshot_of=NULL_REF)
            self.db.delete("VM", vm)
        return ""

    def _copy_vm(self, vm: str, name: str, *, kind: str, ignore: set[str], sr: str | None) -> str:
        """Snapshot, checkpoint, clone or copy a VM with its disks and VIFs."""
        source = self.rec("VM", vm)
        record = _copy_record(source)
        for key in (
            "uuid",
            "VBDs",
            "VIFs",
            "snapshots",
            "children",
            "consoles",
            "current_operations",
            "allowed_operations",
            "crash_dumps",
            "VUSBs",
            "VTPMs",
            "VGPUs",
            "attached_PCIs",
        ):
            record.pop(key, None)
        record.update(
            name_label=name,
            resident_on=NULL_REF,
            domid=-1,
            suspend_VDI=NULL_REF,
            metrics=self.db.create("VM_metrics", {}),
            parent=NULL_REF,
        )
        snapshot = kind in ("snapshot", "checkpoint", "quiesced")
        if snapshot:
            record.update(
                is_a_snapshot=True,
                is_a_template=True,
                snapshot_of=vm,
                snapshot_time=now(),
                snapshot_info={
                    "power-state-at-snapshot": source["power_state"],
                    "disk-snapshot-type": "quiesced" if kind == "quiesced" else "crash_consistent",
                },
                blocked_operations={},
                ha_always_run=False,
                start_delay=0,
                shutdown_delay=0,
                order=0,
                appliance=NULL_REF,
                power_state="Halted",
            )
        else:
            record.update(
                is_a_snapshot=False,
                snapshot_of=NULL_REF,
                snapshot_time=DateTime("19700101T00:00:00Z"),
                snapshot_info={},
                power_state="Halted",
            )
            if source["is_a_snapshot"]:
                record["is_a_template"] = False
        if kind == "checkpoint":
            memory = self._memory_image(vm, f"Suspend image of {name}")
            record.update(power_state="Suspended", suspend_VDI=memory)
        elif (
            source["power_state"] == "Suspended"
            and source["suspend_VDI"] != NULL_REF
            and self.db.exists("VDI", source["suspend_VDI"])
            and not snapshot
        ):
            record.update(
                power_state="Suspended",
                suspend_VDI=self._copy_vdi(source["suspend_VDI"], snapshot=False, sr=sr),
            )
        new = self.db.create("VM", record)
        for vbd in list(source["VBDs"]):
            vbd_record = self.rec("VBD", vbd)
            fields = _copy_record(vbd_record)
            for key in ("uuid", "metrics", "current_operations", "allowed_operations"):
                fields.pop(key, None)
            fields.update(VM=new, currently_attached=False)
            vdi = vbd_record["VDI"]
            if vbd_record["type"] == "Disk" and self.db.exists("VDI", vdi):
                if vdi in ignore:
                    continue
                fields["VDI"] = self._copy_vdi(vdi, snapshot=snapshot, sr=sr)
            self._create_vbd(fields)
        for vif in list(source["VIFs"]):
            fields = _copy_record(self.rec("VIF", vif))
            for key in ("uuid", "metrics", "current_operations", "allowed_operations"):
                fields.pop(key, None)
            fields.update(VM=new, currently_attached=False)
            self._create_vif(fields)
        if snapshot:
            self.db.add_to_set("VM", vm, "snapshots", new)
            self.db.update("VM", new, parent=source["parent"])
            self.db.update("VM", vm, parent=new)
        return new

    def _snapshot_common(self, vm: str, operation: str) -> dict[str, Any]:
        record = self._check_ref("VM", vm)
        if record["is_a_snapshot"] or record["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", f"cannot {operation} this VM")
        self._blocked(vm, operation)
        return record

    def _with_operation(self, vm: str, operation: str, work: Callable[[], str]) -> str:
        key = f"OpaqueRef:{uuidlib.uuid4()}"
        with self.db.lock:
            self.rec("VM", vm)["current_operations"][key] = operation
            self.db.touch("VM", vm)
        try:
            return work()
        finally:
            with self.db.lock:
                if self.db.exists("VM", vm):
                    self.rec("VM", vm)["current_operations"].pop(key, None)
                    self.db.touch("VM", vm)

    @_api("VM.snapshot")
    def vm_snapshot(
        self, session: str, vm: str, new_name: str, ignore_vdis: list[str] | None = None
    ) -> str:
        self._snapshot_common(vm, "snapshot")
        ignore = set(ignore_vdis or ())
        return self._with_operation(
            vm,
            "snapshot",
            lambda: self._copy_vm(vm, new_name, kind="snapshot", ignore=ignore, sr=None),
        )

    @_api("VM.snapshot_with_quiesce")
    def vm_snapshot_with_quiesce(self, session: str, vm: str, new_name: str) -> str:
        self._check_ref("VM", vm)
        mode = self.quiesce_mode
        if mode == "removed":
            raise XapiError("MESSAGE_REMOVED")
        if mode == "not_supported":
            raise XapiError(
                "VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED", vm, "VSS plugin not installed"
            )
        if mode == "failed":
            raise XapiError("VM_SNAPSHOT_WITH_QUIESCE_FAILED", vm)
        if mode == "timeout":
            raise XapiError("VM_SNAPSHOT_WITH_QUIESCE_TIMEOUT", vm)
        self._snapshot_common(vm, "snapshot_with_quiesce")
        return self._with_operation(
            vm,
            "snapshot_with_quiesce",
            lambda: self._copy_vm(vm, new_name, kind="quiesced", ignore=set(), sr=None),
        )

    @_api("VM.checkpoint")
    def vm_checkpoint(self, session: str, vm: str, new_name: str) -> str:
        self._snapshot_common(vm, "checkpoint")
        record = self._power_check(vm, ("Running", "Paused", "Suspended"))
        failure, self.checkpoint_failure = self.checkpoint_failure, None
        if failure == "suspend":
            raise XapiError("VM_CHECKPOINT_SUSPEND_FAILED", vm)
        if failure == "resume" and record["power_state"] == "Running":
            # the memory went to disk but the VM did not come back: it is left Suspended
            self.vm_suspend(session, vm)
            raise XapiError("VM_CHECKPOINT_RESUME_FAILED", vm)
        return self._with_operation(
            vm,
            "checkpoint",
            lambda: self._copy_vm(vm, new_name, kind="checkpoint", ignore=set(), sr=None),
        )

    @_api("VM.clone")
    def vm_clone(self, session: str, vm: str, new_name: str) -> str:
        record = self._check_ref("VM", vm)
        allowed = ("Halted", "Suspended") if record["is_a_snapshot"] else ("Halted",)
        self._power_check(vm, allowed)
        self._blocked(vm, "clone")
        return self._copy_vm(vm, new_name, kind="clone", ignore=set(), sr=None)

    @_api("VM.copy")
    def vm_copy(self, session: str, vm: str, new_name: str, sr: str) -> str:
        record = self._check_ref("VM", vm)
        allowed = ("Halted", "Suspended") if record["is_a_snapshot"] else ("Halted",)
        self._power_check(vm, allowed)
        self._blocked(vm, "copy")
        target = sr if self.db.exists("SR", sr) else None
        return self._copy_vm(vm, new_name, kind="copy", ignore=set(), sr=target)
