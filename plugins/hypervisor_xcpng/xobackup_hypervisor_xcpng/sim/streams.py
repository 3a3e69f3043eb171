"""XAPI's streaming HTTP handlers: ``/export``, ``/export_raw_vdi``, ``/import``,
``/import_raw_vdi`` (xapi-protocol.md §4), with XAPI's framing and the stream faults of §8.3.

Framing as XAPI does it: authentication by ``session_id`` (query or cookie) or HTTP Basic, a
task driven by the handler (the client's ``task_id`` or one announced in ``task-id``), a 302
to the host that sees the SR, errors before the header as a 500 HTML page, then ``200 OK``
without Content-Length and a body delimited by closing the connection. The task, not the HTTP
status, says whether the transfer succeeded.
"""

from __future__ import annotations

import base64
import gzip
import io
import logging
import os
import socket
import tarfile
import time
import uuid as uuidlib
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import zstandard

from xobackup_core.errors import FormatError
from xobackup_core.formats.vhd_structs import (
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR_SIZE,
    UNUSED_BAT_ENTRY,
    bitmap_is_full,
    bitmap_runs,
    bitmap_size,
    build_footer,
    full_bitmap,
    parse_bat,
    parse_footer,
    parse_header,
)
from xobackup_core.formats.vhd_writer import ParentLink, plan_vhd_stream
from xobackup_core.formats.xva import OvaMetadata, XvaReader, XvaWriter
from xobackup_hypervisor_xcpng.sim.codec import NULL_REF, XapiError, now, xml_value
from xobackup_hypervisor_xcpng.sim.disks import (
    BLOCK_SIZE,
    ZERO_BLOCK,
    VdiData,
    VdiReader,
    VdiWriter,
)
from xobackup_hypervisor_xcpng.sim.faults import Fault
from xobackup_hypervisor_xcpng.sim.model import FIELD_TYPES, coerce

if TYPE_CHECKING:
    from xobackup_hypervisor_xcpng.sim.server import RequestHandler
    from xobackup_hypervisor_xcpng.sim.xapi import PoolXapi

log = logging.getLogger(__name__)

IMPORT_VERSION = (24, 19)
"""The XAPI version the simulator reports to importers: newer XVAs are refused."""
MAX_VHD_SIZE = 2040 * 1024**3
PROGRESS_STEP = 0.01


class StreamEnd(Exception):
    """The handler is done with the connection (redirected, refused, dropped...)."""


class StreamAborted(Exception):
    """The stream stopped early; the task gets ``error`` (None: task already settled)."""

    def __init__(self, error: XapiError | None, *, success: bool = False) -> None:
        self.error = error
        self.success = success
        super().__init__(error.code if error else "aborted")


class StreamRequest:
    """One streaming HTTP request: auth, task, faults, and the byte pipe to the client."""

    def __init__(
        self,
        handler: RequestHandler,
        path: str,
        query: dict[str, str],
        session: str,
        task: str,
        faults: list[Fault],
    ) -> None:
        self.handler = handler
        self.xapi: PoolXapi = handler.server.xapi
        self.path = path
        self.query = query
        self.session = session
        self.task = task
        self.faults = faults
        self.header_sent = False
        self.sent = 0
        self.received = 0
        self._started = time.monotonic()
        self._stalled: set[int] = set()
        self._progress = 0.0
        self.socket: socket.socket = handler.connection

    def fault(self, kind: str) -> Fault | None:
        """The armed fault of this kind for this request, if any."""
        return next((f for f in self.faults if f.kind == kind), None)

    # -- framing -------------------------------------------------------------------------------
    def redirect_if_not_visible(self, sr: str) -> None:
        """302 to a host that has a PBD for ``sr`` when this host does not (§4.1)."""
        db = self.xapi.db
        hosts = [db.record("PBD", pbd)["host"] for pbd in db.record("SR", sr)["PBDs"]]
        here = self.handler.server.host_ref
        if here in hosts or not hosts:
            return
        address, port = self.xapi.host_ports[hosts[0]]
        location = f"http://{address}:{port}{self.handler.path}"
        self.handler.send_response(302, "Found")
        self.handler.send_header("Location", location)
        self.handler.send_header("Content-Length", "0")
        self.handler.send_header("Connection", "close")
        self.handler.end_headers()
        self.handler.close_connection = True
        raise StreamEnd()

    def start(self, version: str, content_type: str, filename: str | None = None) -> None:
        """Write XAPI's ``200 OK`` header: no Content-Length, ``Connection: close``."""
        lines = [
            f"{version} 200 OK",
            "Connection: close",
            "Cache-Control: no-cache, no-store",
            f"task-id: {self.task}",
            f"Server: {self.handler.server_version}",
            f"content-type: {content_type}",
        ]
        if filename:
            lines.append(f'Content-Disposition: attachment; filename="{filename}"')
        self.handler.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.handler.close_connection = True
        self.header_sent = True

    def send(self, data: bytes | memoryview) -> None:
        """Send body bytes, applying throttle/stall/drop/truncate faults and cancellation."""
        if self.xapi.task_cancelled(self.task):
            raise StreamAborted(None)
        view = memoryview(data)
        for fault in self.faults:
            if fault.kind in ("drop", "truncate") and self.sent + len(view) >= fault.after_bytes:
                keep = max(0, fault.after_bytes - self.sent)
                self._raw_send(view[:keep])
                self._close(reset=fault.reset)
                if fault.kind == "truncate":
                    raise StreamAborted(None, success=True)
                raise StreamAborted(XapiError("VDI_IO_ERROR", "Device I/O errors"))
            if (
                fault.kind == "stall"
                and id(fault) not in self._stalled
                and self.sent + len(view) >= fault.after_bytes
            ):
                keep = max(0, fault.after_bytes - self.sent)
                self._raw_send(view[:keep])
                view = view[keep:]
                self._stalled.add(id(fault))
                if fault.seconds:
                    time.sleep(fault.seconds)
                else:
                    fault.wait(self.xapi.sim.stopping)
            if fault.kind == "corrupt" and self.sent <= fault.after_bytes < self.sent + len(view):
                damaged = bytearray(view)
                damaged[fault.after_bytes - self.sent] ^= 0xFF
                view = memoryview(bytes(damaged))
        throttle = self.fault("throttle")
        if throttle is not None and throttle.rate > 0:
            while view:
                piece = view[: max(1, throttle.rate // 20)]
                self._raw_send(piece)
                view = view[len(piece) :]
                ahead = self.sent / throttle.rate - (time.monotonic() - self._started)
                if ahead > 0:
                    time.sleep(ahead)
            return
        self._raw_send(view)

    def send_block(self, data: VdiData, index: int, length: int = BLOCK_SIZE) -> None:
        """Send ``length`` bytes of block ``index`` (zero-padded past the virtual size).

        Stored blocks go with ``sendfile`` straight from the data file when no stream fault
        needs to see the bytes: the download then runs at the speed of the loopback.
        """
        blob = data.blocks.get(index)
        tail = data.size - index * BLOCK_SIZE
        if blob is not None and blob >= 0 and not self.faults and tail >= length:
            if self.xapi.task_cancelled(self.task):
                raise StreamAborted(None)
            self._sendfile(data.store.fileno(), blob, length)
            return
        block = data.read_block(index) if blob is not None else None
        if block is None:
            self.send(ZERO_BLOCK if length == BLOCK_SIZE else ZERO_BLOCK[:length])
        elif tail >= length:
            self.send(block if length == BLOCK_SIZE else block[:length])
        else:
            self.send(block[:tail] + bytes(length - tail))

    def _sendfile(self, fd: int, offset: int, length: int) -> None:
        done = 0
        try:
            while done < length:
                sent = os.sendfile(self.socket.fileno(), fd, offset + done, length - done)
                if sent == 0:
                    raise OSError("sendfile sent nothing")
                done += sent
        except OSError as error:
            raise StreamAborted(
                XapiError("VDI_IO_ERROR", f"client connection lost: {error}")
            ) from None
        finally:
            self.sent += done

    def _raw_send(self, view: memoryview) -> None:
        if not view:
            return
        try:
            self.socket.sendall(view)
        except OSError as error:
            raise StreamAborted(
                XapiError("VDI_IO_ERROR", f"client connection lost: {error}")
            ) from None
        self.sent += len(view)

    def _close(self, *, reset: bool) -> None:
        self.handler.drop(reset)

    def progress(self, fraction: float) -> None:
        """Publish the task's progress when it moved by at least 1 %."""
        if fraction - self._progress >= PROGRESS_STEP or fraction >= 1.0:
            self._progress = fraction
            self.xapi.set_progress(self.task, min(fraction, 0.99))

    # -- uploads -------------------------------------------------------------------------------
    def body_length(self) -> int | None:
        """The upload's Content-Length, None when absent."""
        value = self.handler.headers.get("Content-Length")
        return int(value) if value is not None and value.strip().isdigit() else None

    def body_reader(self, length: int | None) -> _Body:
        """The upload body, with the ``drop`` fault applied after ``after_bytes``."""
        return _Body(self, length)


class _Body:
    """A readable view of the request body, bounded by Content-Length (or the connection)."""

    def __init__(self, request: StreamRequest, length: int | None) -> None:
        self.request = request
        self.remaining = length
        self.rfile = request.handler.rfile
        self.drop = request.fault("drop")

    def read(self, size: int = -1) -> bytes:
        if self.remaining is not None:
            if self.remaining <= 0:
                return b""
            size = self.remaining if size < 0 else min(size, self.remaining)
        elif size < 0:
            size = BLOCK_SIZE
        if self.request.xapi.task_cancelled(self.request.task):
            raise StreamAborted(None)
        if self.drop is not None and self.request.received + size >= self.drop.after_bytes:
            size = max(0, self.drop.after_bytes - self.request.received)
            data = self.rfile.read(size) if size else b""
            self.request.received += len(data)
            self.request._close(reset=self.drop.reset)
            raise StreamAborted(XapiError("VDI_IO_ERROR", "connection closed by the server"))
        data = self.rfile.read1(size) if hasattr(self.rfile, "read1") else self.rfile.read(size)
        if self.remaining is not None:
            if not data:
                raise StreamAborted(XapiError("VDI_IO_ERROR", "premature end of the upload"))
            self.remaining -= len(data)
        self.request.received += len(data)
        return data

    def read_exactly(self, size: int) -> bytes:
        parts = []
        while size > 0:
            piece = self.read(min(size, BLOCK_SIZE))
            if not piece:
                raise StreamAborted(XapiError("VDI_IO_ERROR", "premature end of the upload"))
            parts.append(piece)
            size -= len(piece)
        return b"".join(parts)

    def skip_to(self, position: int) -> None:
        while self.request.received < position:
            if not self.read(min(position - self.request.received, BLOCK_SIZE)):
                raise StreamAborted(XapiError("VDI_IO_ERROR", "premature end of the upload"))


# -- the request wrapper -------------------------------------------------------------------------
def _query(handler: RequestHandler) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}


def _cookies(handler: RequestHandler) -> dict[str, str]:
    cookie = SimpleCookie()
    try:
        cookie.load(handler.headers.get("Cookie", ""))
    except Exception:  # a malformed cookie header is ignored, as a browser would
        return {}
    return {k: m.value for k, m in cookie.items()}


def _authenticate(handler: RequestHandler, query: dict[str, str]) -> tuple[str, bool] | None:
    xapi = handler.server.xapi
    cookies = _cookies(handler)
    session = query.get("session_id") or cookies.get("session_id")
    if session:
        return (session, False) if session in xapi.sessions else None
    auth = handler.headers.get("Authorization", "")
    if auth.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            return xapi.login_with_password(user, password, "1.1", "http-basic"), True
        except (XapiError, ValueError):
            return None
    return None


def run(handler: RequestHandler, path: str, func: Callable[[StreamRequest], None]) -> None:
    """Authenticate, drive the task, apply faults and run a streaming handler."""
    xapi = handler.server.xapi
    query = _query(handler)
    auth = _authenticate(handler, query)
    if auth is None:
        handler.html_error(
            401,
            "Unauthorised",
            "session or credentials required",
            WWW_Authenticate='Basic realm="xapi"',
        )
        return
    session, temporary = auth
    task = query.get("task_id") or _cookies(handler).get("task_id")
    if task and not xapi.db.exists("task", task):
        handler.html_error(404, "Not Found", f"HANDLE_INVALID: [ task; {task} ]")
        return
    own_task = not task
    if not task:
        task = xapi.new_task(f"HTTP {path}", "")
    faults = xapi.sim.faults.match(xapi.index, (path,))
    request = StreamRequest(handler, path, query, session, task, faults)
    try:
        for fault in faults:
            if fault.kind == "error":
                raise XapiError(fault.code, *fault.params)
            if fault.kind == "delay":
                time.sleep(fault.seconds)
            if fault.kind == "hang":
                fault.wait(xapi.sim.stopping)
            if fault.kind == "drop" and fault.after_bytes == 0 and path.startswith("/export"):
                handler.drop(fault.reset)
                raise StreamAborted(XapiError("VDI_IO_ERROR", "connection dropped"))
        func(request)
    except StreamEnd:
        # redirected: the host the client goes to next drives the work, with its own task
        if own_task and xapi.db.exists("task", task):
            if xapi.db.record("task", task)["status"] == "pending":
                xapi.db.delete("task", task)
    except XapiError as error:
        xapi.finish_task(task, error=error)
        if not request.header_sent:
            detail = f"{error.code}: [ {'; '.join(error.params)} ]"
            status, reason = _STATUS.get(error.code, (500, "Internal Error"))
            handler.html_error(status, reason, detail)
        else:
            handler.drop()
    except StreamAborted as aborted:
        if aborted.success:
            xapi.finish_task(task, "")
        elif aborted.error is not None:
            xapi.finish_task(task, error=aborted.error)
        else:
            xapi.finish_task(task, error=XapiError("TASK_CANCELLED", task))
        handler.close_connection = True
    except FormatError as error:
        xapi.finish_task(task, error=XapiError("IMPORT_ERROR_GENERIC", str(error)))
        handler.drop()
    except OSError as error:  # the client went away (reset, broken pipe)
        xapi.finish_task(task, error=XapiError("VDI_IO_ERROR", f"connection lost: {error}"))
        handler.close_connection = True
    finally:
        if temporary:
            xapi.logout(session)


_STATUS = {
    "IMPORT_ERROR_CANNOT_HANDLE_CHUNKED": (403, "Forbidden"),
    "SR_OPERATION_NOT_SUPPORTED": (400, "Bad Request"),
    "VDI_MISSING": (400, "Bad Request"),
    "CHUNKED_REFUSED": (404, "Not Found"),
    "UNKNOWN_FORMAT": (404, "Not Found"),
}


def _finish_stream(request: StreamRequest, result: Any = "") -> None:
    """Settle the task at the end of a complete stream (or fail it: ``task_failure``)."""
    if request.fault("task_failure") is not None:
        request.xapi.finish_task(request.task, error=XapiError("VDI_IO_ERROR", "Device I/O errors"))
    else:
        request.xapi.finish_task(request.task, result)


# -- /export_raw_vdi -----------------------------------------------------------------------------
def export_raw_vdi(request: StreamRequest) -> None:
    """GET /export_raw_vdi?vdi=&format=raw|vhd[&base=] (§4.4)."""
    xapi = request.xapi
    db = xapi.db
    vdi = db.resolve("VDI", request.query.get("vdi", ""))
    record = db.record("VDI", vdi)
    fmt = request.query.get("format", "raw")
    if fmt not in ("raw", "vhd"):
        xapi.finish_task(request.task, error=XapiError("INTERNAL_ERROR", f"Unknown format {fmt}"))
        request.handler.html_error(404, "Not Found", f"Unknown format {fmt}")
        raise StreamEnd()
    base_ref = request.query.get("base")
    if base_ref and fmt != "vhd":
        raise XapiError("INTERNAL_ERROR", "base is only supported with format=vhd")
    request.redirect_if_not_visible(record["SR"])
    source = xapi.disks.get(vdi)
    if source is None:
        raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, record["type"])
    if fmt == "vhd" and record["virtual_size"] > MAX_VHD_SIZE:
        raise XapiError("VDI_TOO_LARGE", vdi, str(MAX_VHD_SIZE))
    base: VdiData | None = None
    if base_ref:
        base_vdi = db.resolve("VDI", base_ref)
        base = xapi.disks.get(base_vdi)
        if base is None:
            raise XapiError("VDI_INCOMPATIBLE_TYPE", base_vdi, "cbt_metadata")
        base = base.copy()
    data = source.copy()  # a consistent view even if the guest writes meanwhile
    with xapi.in_flight.track("disk_export"):
        content_type = "application/vhd" if fmt == "vhd" else "application/octet-stream"
        request.start("HTTP/1.1", content_type, f"{record['uuid']}.{fmt}")
        if request.fault("embedded500") is not None:
            _embedded_500(request, vdi)
        if request.fault("leak_vbd") is not None:
            _leak_vbd(request, vdi)
        if fmt == "raw":
            count = data.block_count
            for index in range(count):
                request.send_block(data, index, min(BLOCK_SIZE, data.size - index * BLOCK_SIZE))
                request.progress((index + 1) / count)
        else:
            _send_vhd(request, data, base, record)
    _finish_stream(request)


def _embedded_500(request: StreamRequest, vdi: str) -> None:
    """xen-api #4603: the VDI attach fails after the 200 header, the body is a 500 response."""
    error = XapiError(
        "SR_BACKEND_FAILURE_46",
        "",
        f"The VDI is not available [opterr=VDI {vdi} not detached cleanly]",
        "",
    )
    body = (
        "HTTP/1.1 500 Internal Error\r\ncontent-type: text/html\r\nConnection: close\r\n\r\n"
        f"<html><body><h1>HTTP 500 internal server error</h1>"
        f"{error.code}: [ {'; '.join(error.params)} ]</body></html>"
    ).encode()
    request.send(body)
    request.handler.drop()
    raise StreamAborted(error)


def _leak_vbd(request: StreamRequest, vdi: str) -> None:
    """A failed export that leaves the control domain's VBD on the VDI (``VDI_IN_USE`` next)."""
    xapi = request.xapi
    dom0 = xapi.db.record("host", request.handler.server.host_ref)["control_domain"]
    used = {xapi.db.record("VBD", b)["userdevice"] for b in xapi.db.record("VM", dom0)["VBDs"]}
    userdevice = str(next(i for i in range(1, 256) if str(i) not in used))
    xapi._create_vbd(
        {
            "VM": dom0,
            "VDI": vdi,
            "mode": "RO",
            "type": "Disk",
            "userdevice": userdevice,
            "device": f"xvd{chr(ord('a') + int(userdevice) % 26)}",
            "currently_attached": True,
            "other_config": {"task_id": request.task},
        }
    )
    request.handler.drop()
    raise StreamAborted(XapiError("VDI_IO_ERROR", "Device I/O errors"))


def _send_vhd(
    request: StreamRequest, data: VdiData, base: VdiData | None, record: dict[str, Any]
) -> None:
    if base is None:
        allocated = data.allocated()
        parent = None
    else:
        allocated = [i for i in data.changed_blocks(base) if i < data.block_count]
        # the parent is the base's VHD file on the SR: a uuid the client never sees (§6.5)
        parent = ParentLink(
            uuid=uuidlib.uuid4(),
            name=f"/var/run/sr-mount/{record['SR']}/{uuidlib.uuid4()}.vhd",
        )
    size = -(-data.size // SECTOR_SIZE) * SECTOR_SIZE
    # the format code lays the stream out; blocks are sent here so stored ones can go with
    # sendfile (vhd_stream would hand us every block as bytes)
    layout = plan_vhd_stream(size, allocated, parent=parent)
    bitmap = full_bitmap(layout.header.block_size)
    request.send(layout.metadata)
    total = len(allocated) or 1
    for position, index in enumerate(allocated):
        request.send(bitmap)
        request.send_block(data, index, layout.header.block_size)
        request.progress((position + 1) / total)
    request.send(build_footer(layout.footer))


# -- /export (XVA) -------------------------------------------------------------------------------
class _Sink:
    """A write-only file object sending to the client (what XvaWriter and codecs write to)."""

    def __init__(self, request: StreamRequest) -> None:
        self.request = request

    def write(self, data: bytes | memoryview) -> int:
        self.request.send(data)
        return len(data)

    def flush(self) -> None:
        pass


def _compression(request: StreamRequest) -> str:
    value = request.query.get("use_compression", "").lower()
    if value in ("true", "gzip"):
        return "gzip"
    if value == "zstd" and request.xapi.flavour == "xcp-ng":
        return "zstd"
    return "none"


def export_vm(request: StreamRequest) -> None:
    """GET /export?ref=|uuid=[&use_compression=][&preserve_power_state=] (§4.2)."""
    xapi = request.xapi
    db = xapi.db
    if "ref" in request.query:
        vm = db.resolve("VM", request.query["ref"])
    else:
        vm = db.by_uuid("VM", request.query.get("uuid", ""))
    record = db.record("VM", vm)
    if record["power_state"] not in ("Halted", "Suspended"):
        raise XapiError(
            "VM_BAD_POWER_STATE", vm, "halted, suspended", record["power_state"].lower()
        )
    reason = record["blocked_operations"].get("export")
    if reason is not None:
        raise XapiError("OPERATION_BLOCKED", vm, reason)
    preserve = request.query.get("preserve_power_state", "").lower() == "true"
    with db.lock:
        metadata, disks = build_ova(xapi, vm, preserve=preserve)
    for vdi, _ in disks.values():
        request.redirect_if_not_visible(db.record("VDI", vdi)["SR"])
    compression = _compression(request)
    operation = f"OpaqueRef:{uuidlib.uuid4()}"
    with db.lock:
        record["current_operations"][operation] = "export"
        db.touch("VM", vm)
    try:
        with xapi.in_flight.track("vm_export"):
            request.start("HTTP/1.0", "application/octet-stream", "export.xva")
            sink: Any = _Sink(request)
            compressor: Any = None
            if compression == "zstd":
                compressor = zstandard.ZstdCompressor(level=3).stream_writer(
                    sink, closefd=False, write_size=1024 * 1024
                )
            elif compression == "gzip":
                compressor = gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=1, mtime=0)
            target = compressor or sink
            total = sum(xapi.disks[vdi].size for vdi, _ in disks.values()) or 1
            done = 0
            writer = XvaWriter(target, keepalive_seconds=None)
            writer.add_ova_xml(metadata)
            for ref in sorted(disks):
                vdi, data = disks[ref]
                writer.add_disk(ref, VdiReader(data), data.size)
                done += data.size
                request.progress(done / total)
            writer.close()
            if compressor is not None:
                compressor.close()
    finally:
        with db.lock:
            if db.exists("VM", vm):
                record["current_operations"].pop(operation, None)
                db.touch("VM", vm)
    _finish_stream(request)


_CLEARED = {
    "current_operations": {},
    "allowed_operations": [],
    "consoles": [],
    "crash_dumps": [],
    "blobs": {},
}


def build_ova(
    xapi: PoolXapi, vm: str, *, preserve: bool, disks: bool = True
) -> tuple[bytes, dict[str, Any]]:
    """``ova.xml`` of a VM and its disks ``{Ref:n: (vdi ref, content copy)}`` (§5).

    ``disks=False`` (metadata exports) lists every VDI, snapshots the content of none.
    """
    db = xapi.db
    record = db.record("VM", vm)
    objects: list[tuple[str, str]] = [("VM", vm)]
    disk_vdis: list[str] = []
    for vbd in record["VBDs"]:
        objects.append(("VBD", vbd))
        vdi = db.record("VBD", vbd)["VDI"]
        if db.exists("VDI", vdi):
            sr = db.record("VDI", vdi)["SR"]
            if db.record("SR", sr)["content_type"] != "iso" and (vdi in xapi.disks or not disks):
                disk_vdis.append(vdi)
                objects.append(("VDI", vdi))
    suspend_vdi = record["suspend_VDI"]
    if preserve and record["power_state"] == "Suspended" and suspend_vdi in xapi.disks:
        disk_vdis.append(suspend_vdi)
        objects.append(("VDI", suspend_vdi))
    for sr in sorted({db.record("VDI", v)["SR"] for v in disk_vdis}):
        objects.append(("SR", sr))
    for vif in record["VIFs"]:
        objects.append(("VIF", vif))
        network = db.record("VIF", vif)["network"]
        if ("network", network) not in objects:
            objects.append(("network", network))
    ids = {ref: f"Ref:{position:04d}" for position, (_, ref) in enumerate(objects)}

    def rewrite(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("OpaqueRef:"):
            return ids.get(value, NULL_REF)
        if isinstance(value, list):
            return (
                [ids[v] for v in value if v in ids]
                if all(isinstance(v, str) and v.startswith("OpaqueRef:") for v in value) and value
                else list(value)
            )
        return value

    entries = []
    for cls, ref in objects:
        snapshot = {k: rewrite(v) for k, v in db.record(cls, ref).items()}
        for key, empty in _CLEARED.items():
            if key in snapshot:
                snapshot[key] = type(empty)()
        if cls in ("VBD", "VIF"):
            snapshot["metrics"] = NULL_REF
            if not preserve:
                snapshot["currently_attached"] = False
        if cls == "VM":
            snapshot.update(
                is_a_snapshot=False,
                snapshot_of=NULL_REF,
                snapshots=[],
                parent=NULL_REF,
                children=[],
            )
            if not preserve:
                snapshot.update(power_state="Halted", suspend_VDI=NULL_REF)
        if cls == "SR":
            snapshot["VDIs"] = [ids[v] for v in disk_vdis if db.record("VDI", v)["SR"] == ref]
            snapshot["PBDs"] = []
        entries.append({"class": cls, "id": ids[ref], "snapshot": snapshot})
    host = db.record("host", xapi.master)
    software = host["software_version"]
    version = {
        "hostname": host["hostname"],
        "date": str(now())[:8],
        "product_version": software.get("product_version", ""),
        "product_brand": software.get("product_brand", ""),
        "build_number": software.get("build_number", ""),
        "xapi_major": IMPORT_VERSION[0],
        "xapi_minor": IMPORT_VERSION[1],
        "export_vsn": 2,
    }
    metadata = xml_value({"version": version, "objects": entries}).encode()
    if not disks:
        return metadata, {}
    return metadata, {ids[vdi]: (vdi, xapi.disks[vdi].copy()) for vdi in disk_vdis}


# -- /import (XVA) -------------------------------------------------------------------------------
def _target_sr(request: StreamRequest) -> str:
    db = request.xapi.db
    if "sr_id" in request.query:
        return db.resolve("SR", request.query["sr_id"])
    if "sr_uuid" in request.query:
        return db.by_uuid("SR", request.query["sr_uuid"])
    default = db.record("pool", request.xapi.pool_ref)["default_SR"]
    if not db.exists("SR", default):
        raise XapiError("DEFAULT_SR_NOT_FOUND", default)
    return default


def import_vm(request: StreamRequest) -> None:
    """PUT /import[?sr_id=|sr_uuid=][&restore=true][&force=true] (§4.3)."""
    xapi = request.xapi
    db = xapi.db
    if request.handler.headers.get("Transfer-Encoding"):
        raise XapiError("IMPORT_ERROR_CANNOT_HANDLE_CHUNKED")
    sr = _target_sr(request)
    if db.record("SR", sr)["content_type"] == "iso":
        raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)
    request.redirect_if_not_visible(sr)
    restore = request.query.get("restore", "").lower() == "true"
    verify = request.query.get("force", "").lower() != "true"
    created: list[tuple[str, str]] = []
    with xapi.in_flight.track("vm_import"):
        request.start("HTTP/1.1", "text/plain")
        body = request.body_reader(request.body_length())
        try:
            reader = XvaReader(body, name="import", verify=verify)  # type: ignore[arg-type]
            metadata = reader.metadata
            version = (metadata.version.xapi_major, metadata.version.xapi_minor)
            if version > IMPORT_VERSION:
                raise XapiError("IMPORT_INCOMPATIBLE_VERSION")
            vms, vdis = _create_imported(xapi, metadata, sr, restore, request.task, created)
            db.record("task", request.task)["other_config"]["object_creation"] = "complete"
            db.touch("task", request.task)
            for disk in reader.disks():
                vdi = vdis.get(disk.ref)
                if vdi is None:
                    raise XapiError("IMPORT_ERROR_FAILED_TO_FIND_OBJECT", disk.ref)
                writer = VdiWriter(xapi.disks[vdi])
                for chunk in disk.chunks():
                    writer.write_at(chunk.offset, chunk.data)
                writer.flush()
        except FormatError as error:
            _undo(xapi, created)
            raise XapiError("IMPORT_ERROR_GENERIC", str(error)) from None
        except (XapiError, StreamAborted):
            _undo(xapi, created)
            raise
        except ValueError as error:
            _undo(xapi, created)
            raise XapiError("IMPORT_ERROR_GENERIC", str(error)) from None
    _finish_stream(request, vms)


def _undo(xapi: PoolXapi, created: list[tuple[str, str]]) -> None:
    """Destroy what a failed import created (XAPI's cleanup)."""
    for cls, ref in reversed(created):
        if not xapi.db.exists(cls, ref):
            continue
        if cls == "VDI":
            xapi._destroy_vdi(ref)
        elif cls == "VM":
            record = xapi.db.record("VM", ref)
            for vbd in list(record["VBDs"]):
                if xapi.db.exists("VBD", vbd):
                    xapi._destroy_vbd(vbd)
            for vif in list(record["VIFs"]):
                if xapi.db.exists("VIF", vif):
                    xapi._destroy_vif(vif)
            xapi.db.delete("VM", ref)


def _fields(cls: str, snapshot: dict[str, Any]) -> dict[str, Any]:
    return {k: coerce(cls, k, v) for k, v in snapshot.items() if k in FIELD_TYPES[cls]}


def _create_imported(
    xapi: PoolXapi,
    metadata: Any,
    sr: str,
    restore: bool,
    task: str,
    created: list[tuple[str, str]],
) -> tuple[list[str], dict[str, str]]:
    vdis = _create_vdis(xapi, metadata, sr, restore, created)
    return _create_vms(xapi, metadata, vdis, restore, task, created), vdis


def _create_vdis(
    xapi: PoolXapi, metadata: Any, sr: str, restore: bool, created: list[tuple[str, str]]
) -> dict[str, str]:
    """New empty VDIs for the archive's VDI objects: ``{Ref:n: new VDI ref}``."""
    db = xapi.db
    vdis: dict[str, str] = {}
    for obj in metadata.objects:
        if obj.cls != "VDI":
            continue
        fields = _fields("VDI", obj.snapshot)
        for key in (
            "SR",
            "VBDs",
            "snapshots",
            "snapshot_of",
            "parent",
            "crash_dumps",
            "current_operations",
            "allowed_operations",
            "location",
            "physical_utilisation",
            "metadata_of_pool",
        ):
            fields.pop(key, None)
        if not restore:
            fields.pop("uuid", None)
        elif "uuid" in fields and fields["uuid"] in db._by_uuid["VDI"]:
            fields.pop("uuid")
        size = fields.pop("virtual_size", 0)
        label = fields.pop("name_label", "")
        vdi_type = fields.pop("type", "user")
        vdis[obj.id] = xapi.create_vdi(sr, label, size, vdi_type=vdi_type, **fields)
        created.append(("VDI", vdis[obj.id]))
    return vdis


def _create_vms(
    xapi: PoolXapi,
    metadata: Any,
    vdis: dict[str, str],
    restore: bool,
    task: str,
    created: list[tuple[str, str]],
) -> list[str]:
    """The archive's VMs with their VBDs (on ``vdis``) and VIFs; returns the VM refs."""
    db = xapi.db
    by_id = {obj.id: obj for obj in metadata.objects}
    vms: list[str] = []
    networks = db.tables["network"]
    for obj in metadata.objects:
        if obj.cls != "VM":
            continue
        fields = _fields("VM", obj.snapshot)
        for key in (
            "VBDs",
            "VIFs",
            "snapshots",
            "children",
            "consoles",
            "crash_dumps",
            "current_operations",
            "allowed_operations",
            "resident_on",
            "metrics",
            "guest_metrics",
            "snapshot_of",
            "parent",
            "affinity",
            "VUSBs",
            "VTPMs",
            "VGPUs",
            "attached_PCIs",
            "suspend_SR",
            "appliance",
            "protection_policy",
            "snapshot_schedule",
            "scheduled_to_be_resident_on",
        ):
            fields.pop(key, None)
        if not restore or fields.get("uuid") in db._by_uuid["VM"]:
            fields.pop("uuid", None)
        suspend = fields.get("suspend_VDI", NULL_REF)
        fields["suspend_VDI"] = vdis.get(suspend, NULL_REF)
        if fields.get("power_state") not in ("Halted", "Suspended") or (
            fields.get("power_state") == "Suspended" and fields["suspend_VDI"] == NULL_REF
        ):
            fields["power_state"] = "Halted"
        fields["domid"] = -1
        fields["other_config"] = {**fields.get("other_config", {}), "import_task": task}
        fields["metrics"] = db.create("VM_metrics", {})
        vm = db.create("VM", fields)
        created.append(("VM", vm))
        for vbd_id in obj.snapshot.get("VBDs") or []:
            vbd_obj = by_id.get(vbd_id)
            if vbd_obj is None:
                continue
            vbd = _fields("VBD", vbd_obj.snapshot)
            for key in ("uuid", "metrics", "current_operations", "allowed_operations"):
                vbd.pop(key, None)
            vdi = vdis.get(str(vbd_obj.snapshot.get("VDI")), NULL_REF)
            vbd.update(VM=vm, VDI=vdi, currently_attached=False)
            if vdi == NULL_REF:
                vbd["empty"] = True
            xapi._create_vbd(vbd)
        for vif_id in obj.snapshot.get("VIFs") or []:
            vif_obj = by_id.get(vif_id)
            if vif_obj is None:
                continue
            vif = _fields("VIF", vif_obj.snapshot)
            for key in ("uuid", "metrics", "current_operations", "allowed_operations"):
                vif.pop(key, None)
            net_obj = by_id.get(str(vif_obj.snapshot.get("network")))
            network = None
            if net_obj is not None:
                wanted_uuid = net_obj.snapshot.get("uuid")
                wanted_name = net_obj.snapshot.get("name_label")
                network = next((r for r, n in networks.items() if n["uuid"] == wanted_uuid), None)
                network = network or next(
                    (r for r, n in networks.items() if n["name_label"] == wanted_name), None
                )
            network = network or next(iter(networks))
            vif.update(VM=vm, network=network, currently_attached=False)
            if not restore:
                # a plain import blanks the MAC, so VIF creation generates one as XAPI does
                vif["MAC"] = "02:" + ":".join(f"{b:02x}" for b in uuidlib.uuid4().bytes[:5])
                vif["MAC_autogenerated"] = True
            xapi._create_vif(vif)
        if not fields.get("is_a_snapshot"):
            vms.append(vm)
    return vms


# -- /export_metadata and /import_metadata (§4.6) ---------------------------------------------
MAX_METADATA = 64 * 1024 * 1024


def export_metadata(request: StreamRequest) -> None:
    """GET /export_metadata?ref=|uuid=: a tar holding only ``ova.xml``, with Content-Length."""
    db = request.xapi.db
    if "ref" in request.query:
        vm = db.resolve("VM", request.query["ref"])
    else:
        vm = db.by_uuid("VM", request.query.get("uuid", ""))
    with db.lock:
        ova_xml, _ = build_ova(request.xapi, vm, preserve=True, disks=False)
    info = tarfile.TarInfo("ova.xml")
    info.size = len(ova_xml)
    info.mode = 0o400
    archive = info.tobuf(tarfile.USTAR_FORMAT) + ova_xml + bytes(-len(ova_xml) % 512) + bytes(1024)
    handler = request.handler
    # built in memory and sent with its length, unlike every other download (§4.6)
    handler.wfile.write(
        (
            "HTTP/1.0 200 OK\r\nConnection: close\r\nCache-Control: no-cache, no-store\r\n"
            f"task-id: {request.task}\r\ncontent-type: application/octet-stream\r\n"
            f"Content-Length: {len(archive)}\r\n"
            'Content-Disposition: attachment; filename="export.xva"\r\n\r\n'
        ).encode()
        + archive
    )
    handler.close_connection = True
    request.header_sent = True
    request.xapi.finish_task(request.task, "")


def import_metadata(request: StreamRequest) -> None:
    """PUT /import_metadata[?restore=][&check_cpu=][&vdi:<Ref:n>=<uuid>]: VMs on existing VDIs."""
    xapi = request.xapi
    db = xapi.db
    length = request.body_length()
    if length is None or length > MAX_METADATA:
        raise XapiError("INTERNAL_ERROR", "a Content-Length of at most 64 MiB is required")
    restore = request.query.get("restore", "").lower() == "true"
    check_cpu = request.query.get("check_cpu", "").lower() == "true"
    created: list[tuple[str, str]] = []
    request.start("HTTP/1.1", "text/plain")
    data = request.body_reader(length).read_exactly(length)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            member = archive.next()
            if member is None or member.name != "ova.xml":
                raise XapiError(
                    "IMPORT_ERROR_UNEXPECTED_FILE", "ova.xml", member.name if member else ""
                )
            reader = archive.extractfile(member)
            assert reader is not None
            metadata = OvaMetadata.from_xml(reader.read())
    except (tarfile.TarError, FormatError) as error:
        raise XapiError("IMPORT_ERROR_GENERIC", str(error)) from None
    vdis: dict[str, str] = {}
    for obj in metadata.objects:
        if obj.cls != "VDI":
            continue
        wanted = request.query.get(f"vdi:{obj.id}") or str(obj.snapshot.get("uuid", ""))
        try:
            vdis[obj.id] = db.by_uuid("VDI", wanted)
        except XapiError:
            raise XapiError("IMPORT_ERROR_FAILED_TO_FIND_OBJECT", obj.id) from None
    try:
        vms = _create_vms(xapi, metadata, vdis, restore, request.task, created)
        if check_cpu:
            for vm in vms:
                if db.record("VM", vm)["power_state"] != "Halted":
                    try:
                        xapi.cpu_check(vm, xapi.master)
                    except XapiError as error:
                        # the VM does not exist yet as far as the client knows (§3.3)
                        raise XapiError(error.code, NULL_REF, *error.params[1:]) from None
    except XapiError:
        _undo(xapi, created)
        raise
    _finish_stream(request, vms)


# -- /import_raw_vdi -----------------------------------------------------------------------------
def import_raw_vdi(request: StreamRequest) -> None:
    """PUT /import_raw_vdi?vdi=&format=raw|vhd (§4.5)."""
    xapi = request.xapi
    db = xapi.db
    fmt = request.query.get("format", "raw")
    if request.handler.headers.get("Transfer-Encoding") or fmt not in ("raw", "vhd"):
        reason = (
            "Cannot handle encoding: chunked"
            if fmt in ("raw", "vhd")
            else (f"Unknown format {fmt}")
        )
        xapi.finish_task(request.task, error=XapiError("INTERNAL_ERROR", reason))
        request.handler.html_error(404, "Not Found", f"INTERNAL_ERROR: [ {reason} ]")
        raise StreamEnd()
    length = request.body_length()
    if "vdi" in request.query:
        vdi = db.resolve("VDI", request.query["vdi"])
    elif (
        fmt == "raw"
        and length is not None
        and ("sr_id" in request.query or "sr_uuid" in request.query)
    ):
        vdi = xapi.create_vdi(_target_sr(request), "Imported VDI", length)
    else:
        raise XapiError("VDI_MISSING", request.query.get("sr_id", NULL_REF), "")
    if length is None:
        raise XapiError("INTERNAL_ERROR", "a Content-Length is required")
    record = db.record("VDI", vdi)
    request.redirect_if_not_visible(record["SR"])
    data = xapi.disks.get(vdi)
    if data is None:
        raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, record["type"])
    with xapi.in_flight.track("disk_import"):
        request.start("HTTP/1.1", "text/plain")
        body = request.body_reader(length)
        writer = VdiWriter(data)
        try:
            if fmt == "raw":
                # written as it arrives: an upload announcing more than it sends (XO's 1 PiB
                # Content-Length for unknown sizes) keeps its data and fails with VDI_IO_ERROR
                position = 0
                while position < length:
                    piece = body.read(min(BLOCK_SIZE, length - position))
                    if position + len(piece) > data.size:
                        raise StreamAborted(
                            XapiError("VDI_IO_ERROR", "the upload is larger than the VDI")
                        )
                    writer.write_at(position, piece)
                    position += len(piece)
                    request.progress(position / length)
            else:
                _apply_vhd(request, body, writer, length)
        finally:
            writer.flush()
            db.update("VDI", vdi, physical_utilisation=len(data.blocks) * BLOCK_SIZE)
    _finish_stream(request, vdi)


def _apply_vhd(request: StreamRequest, body: _Body, writer: VdiWriter, length: int) -> None:
    """Read a VHD forward-only and write the sectors its bitmaps mark (§4.5)."""
    try:
        footer = parse_footer(body.read_exactly(FOOTER_SIZE), path="upload")
        body.skip_to(footer.data_offset)
        header = parse_header(body.read_exactly(HEADER_SIZE), path="upload")
        if footer.current_size > writer.data.size:
            raise StreamAborted(
                XapiError(
                    "VDI_IO_ERROR", f"the VHD ({footer.current_size} bytes) is larger than the VDI"
                )
            )
        body.skip_to(header.table_offset)
        entries = header.max_table_entries
        bat = parse_bat(
            body.read_exactly(-(-entries * 4 // SECTOR_SIZE) * SECTOR_SIZE), entries, path="upload"
        )
    except FormatError as error:
        raise StreamAborted(XapiError("VDI_IO_ERROR", str(error))) from None
    block_size = header.block_size
    bitmap_bytes = bitmap_size(block_size)
    order = sorted(
        (sector, index) for index, sector in enumerate(bat) if sector != UNUSED_BAT_ENTRY
    )
    for position, (sector, index) in enumerate(order):
        body.skip_to(sector * SECTOR_SIZE)
        bitmap = body.read_exactly(bitmap_bytes)
        block = body.read_exactly(block_size)
        start = index * block_size
        end = min(start + block_size, writer.data.size)
        if bitmap_is_full(bitmap, block_size):
            writer.write_at(start, memoryview(block)[: end - start])
        else:
            for first, count in bitmap_runs(bitmap, block_size):
                offset = start + first * SECTOR_SIZE
                stop = min(offset + count * SECTOR_SIZE, end)
                if stop > offset:
                    writer.write_at(offset, memoryview(block)[offset - start : stop - start])
        request.progress((position + 1) / max(1, len(order)))
    # the trailing footer sits at the last 512-aligned offset of the announced length
    body.skip_to((length // SECTOR_SIZE - 1) * SECTOR_SIZE)
    trailer = body.read(FOOTER_SIZE)
    try:
        parse_footer(trailer, path="upload (trailing footer)")
    except FormatError as error:
        raise StreamAborted(XapiError("VDI_IO_ERROR", str(error))) from None


DOWNLOADS: dict[str, Callable[[StreamRequest], None]] = {
    "/export": export_vm,
    "/export_metadata": export_metadata,
    "/export_raw_vdi": export_raw_vdi,
}
UPLOADS: dict[str, Callable[[StreamRequest], None]] = {
    "/import": import_vm,
    "/import_metadata": import_metadata,
    "/import_raw_vdi": import_raw_vdi,
}
