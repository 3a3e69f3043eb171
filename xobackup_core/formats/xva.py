"""XVA: the VM export format of XAPI (``export_vsn`` 2), read and written as a forward-only stream.

An XVA is a POSIX tar stream (xapi-protocol.md §5):

- member 1 is ``ova.xml``, one XML-RPC ``<value>`` describing the VM and its devices
  (see :class:`OvaMetadata`);
- then, for each VDI in lexicographic order of its ``Ref:<n>`` id, its data as files
  ``Ref:<n>/<8-digit counter>`` of at most 1 MiB, each immediately followed by a checksum file
  ``….xxhash`` (XXH64, 16 hex digits) or ``….checksum`` (SHA-1, 40 hex digits);
- all-zero chunks are left out, except the first and the last chunk of each disk;
- two zero blocks of 512 bytes end the archive (no 10 KiB record padding, unlike GNU tar).

When the host compresses the export, the whole tar is one gzip or zstd stream; the reader
detects it from the magic bytes.

Neither side ever seeks nor holds more than one chunk in memory. Tar headers are built and
parsed by :class:`tarfile.TarInfo`; the framing (data, padding, end blocks) is done here so that
the written stream ends exactly like XAPI's, and so that a truncated or corrupt stream is
reported with the entry and the field at fault instead of a generic tar error.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import io
import re
import tarfile
import time
import xml.etree.ElementTree as ElementTree
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from xobackup_core.errors import FormatError, RemoteError
from xobackup_core.remote import Remote

CHUNK_SIZE = 1024 * 1024
"""Size of a full data chunk (the last chunk of a disk may be shorter)."""

BLOCK = 512
"""Tar block size."""

OVA_XML = "ova.xml"
"""Name of the first member, the VM description."""

MAX_OVA_XML_SIZE = 64 * 1024 * 1024
"""Largest ``ova.xml`` accepted: far above any real VM, low enough to bound memory."""

KEEPALIVE_SECONDS = 60.0
"""A writer emits a chunk (even an all-zero one) at least this often, so that a slow source
does not leave a consumer (XAPI import, HTTP proxy) without data long enough to time out."""

ChecksumKind = Literal["xxhash", "sha1"]
Compression = Literal["gzip", "zstd"]

_CHUNK_NAME = re.compile(r"^(Ref:[^/]+)/(\d+)$")
_CHECKSUM_SUFFIX = {".xxhash": "xxhash", ".checksum": "sha1"}
_ZERO_CHUNK = bytes(CHUNK_SIZE)
_END_OF_ARCHIVE = bytes(2 * BLOCK)
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# -- checksums ---------------------------------------------------------------------------------
def _xxhash64(data: bytes | memoryview) -> str:
    try:
        import xxhash
    except ImportError as error:  # pragma: no cover - a packaging error, not a user one
        raise FormatError("the Python package 'xxhash' is required for XVA checksums") from error
    return xxhash.xxh64_hexdigest(data).upper()


def chunk_checksum(kind: ChecksumKind, data: bytes | memoryview) -> str:
    """The checksum text XAPI stores for a chunk: XXH64 as 16 uppercase hex digits (seed 0), or
    SHA-1 as 40 lowercase hex digits."""
    if kind == "xxhash":
        return _xxhash64(data)
    if kind == "sha1":
        return hashlib.sha1(data).hexdigest()
    raise ValueError(f"unknown XVA checksum kind {kind!r}")


def _checksum_suffix(kind: ChecksumKind) -> str:
    return ".xxhash" if kind == "xxhash" else ".checksum"


# -- ova.xml: XAPI's XML-RPC value encoding -----------------------------------------------------
def _format_datetime(value: _dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(_dt.UTC)
    return value.strftime("%Y%m%dT%H:%M:%SZ")


def _parse_datetime(text: str) -> _dt.datetime:
    text = text.strip()
    for pattern in ("%Y%m%dT%H:%M:%SZ", "%Y%m%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return _dt.datetime.strptime(text, pattern).replace(tzinfo=_dt.UTC)
        except ValueError:
            continue
    raise ValueError(f"bad dateTime.iso8601 value {text!r}")


def _encode_value(value: Any, out: list[str]) -> None:
    """Append the XML-RPC encoding of ``value`` as XAPI emits it (§1.2): ints untyped."""
    out.append("<value>")
    if isinstance(value, bool):
        out.append(f"<boolean>{int(value)}</boolean>")
    elif isinstance(value, int):
        # XAPI writes int64 fields as untyped digit strings; <int> would overflow above 2^31.
        out.append(str(value))
    elif isinstance(value, float):
        out.append(f"<double>{value:.16g}</double>")
    elif isinstance(value, str):
        out.append(_xml_escape(value))
    elif isinstance(value, _dt.datetime):
        out.append(f"<dateTime.iso8601>{_format_datetime(value)}</dateTime.iso8601>")
    elif isinstance(value, Mapping):
        out.append("<struct>")
        for key, item in value.items():
            out.append(f"<member><name>{_xml_escape(str(key))}</name>")
            _encode_value(item, out)
            out.append("</member>")
        out.append("</struct>")
    elif isinstance(value, list | tuple | set | frozenset):
        out.append("<array><data>")
        for item in value:
            _encode_value(item, out)
        out.append("</data></array>")
    elif value is None:
        out.append("")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} in ova.xml")
    out.append("</value>")


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _decode_value(element: ElementTree.Element, where: str) -> Any:
    if element.tag != "value":
        raise FormatError(f"expected <value>, found <{element.tag}>", path=OVA_XML, field=where)
    children = list(element)
    if not children:
        return element.text or ""
    if len(children) != 1:
        raise FormatError("a <value> holds more than one element", path=OVA_XML, field=where)
    typed = children[0]
    tag, text = typed.tag, (typed.text or "")
    try:
        if tag == "string":
            return text
        if tag in ("int", "i4", "i8"):
            return int(text.strip())
        if tag == "boolean":
            if text.strip() not in ("0", "1"):
                raise ValueError(f"bad boolean {text!r}")
            return text.strip() == "1"
        if tag == "double":
            return float(text.strip())
        if tag == "dateTime.iso8601":
            return _parse_datetime(text)
        if tag == "nil":
            return None
    except ValueError as error:
        raise FormatError(str(error), path=OVA_XML, field=where) from None
    if tag == "struct":
        result: dict[str, Any] = {}
        for member in typed:
            name = member.find("name")
            value = member.find("value")
            if member.tag != "member" or name is None or value is None:
                raise FormatError("malformed struct member", path=OVA_XML, field=where)
            key = name.text or ""
            result[key] = _decode_value(value, f"{where}.{key}" if where else key)
        return result
    if tag == "array":
        data = typed.find("data")
        if data is None:
            raise FormatError("array without <data>", path=OVA_XML, field=where)
        return [_decode_value(item, f"{where}[{i}]") for i, item in enumerate(data)]
    raise FormatError(f"unknown XML-RPC type <{tag}>", path=OVA_XML, field=where)


def encode_xmlrpc_value(value: Any) -> bytes:
    """Encode ``value`` as one XML-RPC ``<value>`` the way XAPI writes ``ova.xml``.

    ``int`` becomes an untyped digit string (XAPI's int64 encoding), ``bool`` a ``<boolean>``,
    ``float`` a ``<double>``, ``datetime`` a basic ISO ``<dateTime.iso8601>`` with ``Z``, mappings
    structs and sequences arrays.
    """
    out: list[str] = []
    _encode_value(value, out)
    return "".join(out).encode("utf-8")


def decode_xmlrpc_value(data: bytes) -> Any:
    """Decode one XML-RPC ``<value>``. Untyped values are returned as ``str``, as XAPI means
    them (int64 fields must be coerced by the caller, e.g. :meth:`OvaMetadata.disks`)."""
    try:
        root = ElementTree.fromstring(data)
    except (ElementTree.ParseError, ValueError) as error:
        raise FormatError(f"not well-formed XML: {error}", path=OVA_XML) from None
    return _decode_value(root, "")


def _as_int(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise FormatError(
            f"expected an integer, found {value!r}", path=OVA_XML, field=where
        ) from None


@dataclass
class OvaVersion:
    """The ``version`` struct of ``ova.xml``.

    The importer refuses exports whose ``(xapi_major, xapi_minor)`` is newer than its own, so the
    defaults are deliberately old (those XO writes).
    """

    hostname: str = "xobackup"
    date: str = "2020-01-01"
    product_version: str = "8.2.1"
    product_brand: str = "XCP-ng"
    build_number: str = "release/yangtze/master/58"
    xapi_major: int = 1
    xapi_minor: int = 20
    export_vsn: int = 2

    def to_record(self) -> dict[str, Any]:
        """The XML-RPC struct."""
        return {
            "hostname": self.hostname,
            "date": self.date,
            "product_version": self.product_version,
            "product_brand": self.product_brand,
            "build_number": self.build_number,
            "xapi_major": self.xapi_major,
            "xapi_minor": self.xapi_minor,
            "export_vsn": self.export_vsn,
        }

    @classmethod
    def from_record(cls, record: Any) -> OvaVersion:
        """Parse the ``version`` struct."""
        if not isinstance(record, dict):
            raise FormatError("version is not a struct", path=OVA_XML, field="version")
        return cls(
            hostname=str(record.get("hostname", "")),
            date=str(record.get("date", "")),
            product_version=str(record.get("product_version", "")),
            product_brand=str(record.get("product_brand", "")),
            build_number=str(record.get("build_number", "")),
            xapi_major=_as_int(record.get("xapi_major", 0), "version.xapi_major"),
            xapi_minor=_as_int(record.get("xapi_minor", 0), "version.xapi_minor"),
            export_vsn=_as_int(record.get("export_vsn", 0), "version.export_vsn"),
        )


@dataclass
class OvaObject:
    """One exported object: its datamodel class, its ``Ref:<n>`` id and its full record."""

    cls: str
    id: str
    snapshot: dict[str, Any]


@dataclass(frozen=True)
class XvaDiskInfo:
    """A disk of the exported VM, as ``ova.xml`` describes it."""

    ref: str
    """The VDI's ``Ref:<n>``: its chunks are ``<ref>/<counter>``."""
    vdi_uuid: str
    virtual_size: int
    name_label: str
    userdevice: str
    """The VBD's position (``"0"``, ``"1"``…); empty for a VDI no VBD of the VM uses."""
    vbd_ref: str | None


@dataclass
class OvaMetadata:
    """The content of ``ova.xml``: a :class:`OvaVersion` and the exported objects."""

    version: OvaVersion = field(default_factory=OvaVersion)
    objects: list[OvaObject] = field(default_factory=list)

    def to_xml(self) -> bytes:
        """Encode as XAPI does: one XML-RPC ``<value>`` holding ``{version, objects}``."""
        return encode_xmlrpc_value(
            {
                "version": self.version.to_record(),
                "objects": [
                    {"class": obj.cls, "id": obj.id, "snapshot": obj.snapshot}
                    for obj in self.objects
                ],
            }
        )

    @classmethod
    def from_xml(cls, data: bytes) -> OvaMetadata:
        """Parse ``ova.xml``; raises :class:`FormatError` naming the offending field."""
        root = decode_xmlrpc_value(data)
        if not isinstance(root, dict):
            raise FormatError("the top-level value is not a struct", path=OVA_XML)
        if "version" not in root:
            raise FormatError("missing", path=OVA_XML, field="version")
        objects_value = root.get("objects")
        if not isinstance(objects_value, list):
            raise FormatError("missing or not an array", path=OVA_XML, field="objects")
        objects = []
        for index, item in enumerate(objects_value):
            where = f"objects[{index}]"
            if not isinstance(item, dict):
                raise FormatError("not a struct", path=OVA_XML, field=where)
            snapshot = item.get("snapshot")
            if not isinstance(item.get("class"), str) or not isinstance(item.get("id"), str):
                raise FormatError("class and id must be strings", path=OVA_XML, field=where)
            if not isinstance(snapshot, dict):
                raise FormatError("snapshot is not a struct", path=OVA_XML, field=where)
            objects.append(OvaObject(item["class"], item["id"], snapshot))
        return cls(OvaVersion.from_record(root["version"]), objects)

    def find(self, ref: str) -> OvaObject | None:
        """The object whose id is ``ref``."""
        return next((obj for obj in self.objects if obj.id == ref), None)

    def vm(self) -> OvaObject:
        """The exported VM (the first ``VM`` object that is not a snapshot of it)."""
        vms = [obj for obj in self.objects if obj.cls == "VM"]
        if not vms:
            raise FormatError("no VM object", path=OVA_XML, field="objects")
        return next((vm for vm in vms if not vm.snapshot.get("is_a_snapshot")), vms[0])

    def disks(self) -> list[XvaDiskInfo]:
        """The VDIs whose data follows in the archive, in archive order (sorted ``Ref:`` ids).

        A VDI is listed when a VBD of the VM points to it; VDIs on an ``iso`` SR are skipped, as
        XAPI does not export them.
        """
        result = []
        vm = self.vm()
        for vbd_ref in vm.snapshot.get("VBDs") or []:
            vbd = self.find(str(vbd_ref))
            if vbd is None or vbd.cls != "VBD":
                continue
            vdi = self.find(str(vbd.snapshot.get("VDI", "")))
            if vdi is None or vdi.cls != "VDI":
                continue
            sr = self.find(str(vdi.snapshot.get("SR", "")))
            if sr is not None and sr.snapshot.get("content_type") == "iso":
                continue
            result.append(
                XvaDiskInfo(
                    ref=vdi.id,
                    vdi_uuid=str(vdi.snapshot.get("uuid", "")),
                    virtual_size=_as_int(
                        vdi.snapshot.get("virtual_size", 0), f"{vdi.id}.virtual_size"
                    ),
                    name_label=str(vdi.snapshot.get("name_label", "")),
                    userdevice=str(vbd.snapshot.get("userdevice", "")),
                    vbd_ref=vbd.id,
                )
            )
        return sorted(result, key=lambda disk: disk.ref)


@dataclass(frozen=True)
class DiskSpec:
    """A disk for :func:`build_vm_metadata`: what the VBD and VDI records need."""

    virtual_size: int
    uuid: str
    name_label: str = ""
    userdevice: str = "0"
    bootable: bool = False
    mode: str = "RW"
    vdi_record: Mapping[str, Any] = field(default_factory=dict)
    """Extra VDI fields (``other_config``, ``type``…), merged over the defaults."""


@dataclass(frozen=True)
class VifSpec:
    """A network interface for :func:`build_vm_metadata`: the VIF and its network."""

    device: str
    mac: str
    network_uuid: str
    network_name: str = ""
    mtu: int = 1500
    vif_record: Mapping[str, Any] = field(default_factory=dict)
    """Extra VIF fields (``locking_mode``, ``other_config``…), merged over the defaults."""


def build_vm_metadata(
    vm_record: Mapping[str, Any],
    disks: Iterable[DiskSpec],
    *,
    vifs: Iterable[VifSpec] = (),
    sr_uuid: str = "00000000-0000-0000-0000-000000000000",
    version: OvaVersion | None = None,
) -> OvaMetadata:
    """Build the ``ova.xml`` of a halted VM: one VBD and one VDI per disk on one SR, one VIF
    per interface and each network once — the minimal set XAPI's import needs (§5).

    Ids are zero-padded (``Ref:000``, ``Ref:001``…) so that lexicographic order, which fixes
    the order of the disks in the archive, is also numeric order. Every ref field of the VM
    record not rewritten here is set to ``OpaqueRef:NULL``, as XAPI does for objects outside
    the export.
    """
    disk_list = list(disks)
    vif_list = list(vifs)
    network_uuids = list(dict.fromkeys(vif.network_uuid for vif in vif_list))
    width = max(3, len(str(2 + 2 * len(disk_list) + len(vif_list) + len(network_uuids))))

    def ref(n: int) -> str:
        return f"Ref:{n:0{width}d}"

    vm_ref, sr_ref = ref(0), ref(1)
    vbd_refs = [ref(2 + 2 * i) for i in range(len(disk_list))]
    vdi_refs = [ref(3 + 2 * i) for i in range(len(disk_list))]
    next_id = 2 + 2 * len(disk_list)
    vif_refs = [ref(next_id + i) for i in range(len(vif_list))]
    next_id += len(vif_list)
    network_refs = {uuid: ref(next_id + i) for i, uuid in enumerate(network_uuids)}
    objects = []
    vm = {
        key: (
            "OpaqueRef:NULL" if isinstance(value, str) and value.startswith("OpaqueRef:") else value
        )
        for key, value in vm_record.items()
    }
    vm.update(
        {
            "power_state": "Halted",
            "is_a_snapshot": False,
            "snapshot_of": "OpaqueRef:NULL",
            "snapshots": [],
            "parent": "OpaqueRef:NULL",
            "suspend_VDI": "OpaqueRef:NULL",
            "current_operations": {},
            "allowed_operations": [],
            "consoles": [],
            "crash_dumps": [],
            "VBDs": vbd_refs,
            "VIFs": vif_refs,
        }
    )
    objects.append(OvaObject("VM", vm_ref, vm))
    objects.append(
        OvaObject(
            "SR",
            sr_ref,
            {
                "uuid": sr_uuid,
                "name_label": "",
                "content_type": "user",
                "type": "ext",
                "VDIs": vdi_refs,
            },
        )
    )
    for disk, vbd_ref, vdi_ref in zip(disk_list, vbd_refs, vdi_refs, strict=True):
        objects.append(
            OvaObject(
                "VBD",
                vbd_ref,
                {
                    "uuid": "",
                    "VM": vm_ref,
                    "VDI": vdi_ref,
                    "device": "",
                    "userdevice": disk.userdevice,
                    "bootable": disk.bootable,
                    "mode": disk.mode,
                    "type": "Disk",
                    "empty": False,
                    "unpluggable": False,
                    "currently_attached": False,
                    "other_config": {},
                },
            )
        )
        vdi = {
            "uuid": disk.uuid,
            "name_label": disk.name_label,
            "name_description": "",
            "SR": sr_ref,
            "VBDs": [vbd_ref],
            "virtual_size": disk.virtual_size,
            "physical_utilisation": disk.virtual_size,
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
            "sm_config": {},
            "is_a_snapshot": False,
            "snapshot_of": "OpaqueRef:NULL",
            "snapshots": [],
            "tags": [],
        }
        vdi.update(disk.vdi_record)
        objects.append(OvaObject("VDI", vdi_ref, vdi))
    for vif, vif_ref in zip(vif_list, vif_refs, strict=True):
        record = {
            "uuid": "",
            "VM": vm_ref,
            "network": network_refs[vif.network_uuid],
            "device": vif.device,
            "MAC": vif.mac,
            "MAC_autogenerated": False,
            "MTU": vif.mtu,
            "currently_attached": False,
            "locking_mode": "network_default",
            "ipv4_allowed": [],
            "ipv6_allowed": [],
            "other_config": {},
        }
        record.update(vif.vif_record)
        objects.append(OvaObject("VIF", vif_ref, record))
    for uuid, network_ref in network_refs.items():
        vifs_on = [r for v, r in zip(vif_list, vif_refs, strict=True) if v.network_uuid == uuid]
        name = next((v.network_name for v in vif_list if v.network_uuid == uuid), "")
        objects.append(
            OvaObject(
                "network",
                network_ref,
                {
                    "uuid": uuid,
                    "name_label": name,
                    "name_description": "",
                    "bridge": "",
                    "MTU": 1500,
                    "VIFs": vifs_on,
                    "PIFs": [],
                    "other_config": {},
                },
            )
        )
    return OvaMetadata(version or OvaVersion(), objects)


# -- writing -----------------------------------------------------------------------------------
def _tar_header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o400
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class XvaWriter:
    """Write an XVA to a forward-only stream (a remote writer, an HTTP upload body, a pipe).

    Call :meth:`add_ova_xml` first, then :meth:`add_disk` once per disk in increasing ``Ref``
    order, then :meth:`close` (or use it as a context manager). ``dst`` is not closed.
    """

    def __init__(
        self,
        dst: BinaryIO,
        *,
        checksum: ChecksumKind = "xxhash",
        keepalive_seconds: float | None = KEEPALIVE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if checksum not in ("xxhash", "sha1"):
            raise ValueError(f"unknown XVA checksum kind {checksum!r}")
        self._dst = dst
        self._checksum: ChecksumKind = checksum
        self._keepalive = keepalive_seconds
        self._clock = clock
        self._last_emit = clock()
        self._has_ova = False
        self._last_ref: str | None = None
        self._closed = False
        self.bytes_written = 0
        """Bytes written to ``dst`` so far."""

    def _write(self, data: bytes | memoryview) -> None:
        self._dst.write(data)
        self.bytes_written += len(data)

    def _add_entry(self, name: str, data: bytes | memoryview, mtime: int = 0) -> None:
        self._write(_tar_header(name, len(data), mtime))
        self._write(data)
        padding = -len(data) % BLOCK
        if padding:
            self._write(bytes(padding))

    def add_ova_xml(self, metadata: OvaMetadata | bytes, *, mtime: int = 0) -> None:
        """Write ``ova.xml``, which must be the first member."""
        if self._has_ova:
            raise ValueError("ova.xml was already written")
        data = metadata.to_xml() if isinstance(metadata, OvaMetadata) else metadata
        self._add_entry(OVA_XML, data, mtime)
        self._has_ova = True

    def _emit_chunk(self, ref: str, counter: int, data: bytes | memoryview) -> None:
        name = f"{ref}/{counter:08d}"
        self._add_entry(name, data)
        digest = chunk_checksum(self._checksum, data).encode("ascii")
        self._add_entry(name + _checksum_suffix(self._checksum), digest)
        self._last_emit = self._clock()

    def add_disk(self, ref: str, source: BinaryIO | Iterable[bytes], size: int) -> None:
        """Write the ``size`` bytes of disk ``ref`` read from ``source`` (a readable stream, or
        an iterable of byte strings of any length), leaving out all-zero chunks.

        Raises :class:`FormatError` when ``source`` ends before ``size`` bytes.
        """
        if not self._has_ova:
            raise ValueError("ova.xml must be written before the disks")
        if not ref.startswith("Ref:") or "/" in ref:
            raise ValueError(f"bad disk id {ref!r}: expected Ref:<n>")
        if self._last_ref is not None and ref <= self._last_ref:
            # XAPI's importer expects disks in lexicographic order of their ids (§5).
            raise ValueError(f"disk {ref!r} must come after {self._last_ref!r}")
        if size < 0:
            raise ValueError("negative disk size")
        self._last_ref = ref
        last_counter = max(0, (size - 1) // CHUNK_SIZE)
        for counter, chunk in enumerate(_rechunk(source, size, ref)):
            is_zero = chunk == _ZERO_CHUNK[: len(chunk)]
            keepalive_due = (
                self._keepalive is not None and self._clock() - self._last_emit >= self._keepalive
            )
            if not is_zero or counter in (0, last_counter) or keepalive_due:
                self._emit_chunk(ref, counter, chunk)

    def close(self) -> None:
        """End the archive with two zero blocks (exactly, no record padding)."""
        if self._closed:
            return
        if not self._has_ova:
            raise ValueError("an XVA needs ova.xml")
        self._write(_END_OF_ARCHIVE)
        self._closed = True

    def __enter__(self) -> XvaWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()


def _rechunk(source: BinaryIO | Iterable[bytes], size: int, ref: str) -> Iterator[bytes]:
    """Yield ``size`` bytes from ``source`` as CHUNK_SIZE pieces (the last may be shorter;
    a zero-size disk yields one empty chunk, since chunk 0 is always present)."""
    if size == 0:
        yield b""
        return
    remaining = size
    if hasattr(source, "read"):
        stream: BinaryIO = source  # type: ignore[assignment]
        while remaining > 0:
            want = min(CHUNK_SIZE, remaining)
            chunk = _read_exactly(stream, want)
            if len(chunk) < want:
                raise FormatError(
                    f"source ended at byte {size - remaining + len(chunk)}, expected {size}",
                    path=ref,
                )
            remaining -= want
            yield chunk
        return
    buffer = bytearray()
    for piece in source:  # type: ignore[union-attr]
        buffer += piece
        while len(buffer) >= CHUNK_SIZE and remaining > 0:
            want = min(CHUNK_SIZE, remaining)
            chunk = bytes(buffer[:want])
            del buffer[:want]
            remaining -= want
            yield chunk
        if remaining == 0:
            break
    while remaining > 0:
        if len(buffer) < min(CHUNK_SIZE, remaining):
            raise FormatError(
                f"source ended at byte {size - remaining + len(buffer)}, expected {size}",
                path=ref,
            )
        want = min(CHUNK_SIZE, remaining)
        chunk = bytes(buffer[:want])
        del buffer[:want]
        remaining -= want
        yield chunk


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    """Read ``size`` bytes, fewer only at end of stream; never asks for more than 1 MiB at once
    so that a corrupt size field cannot make us allocate gigabytes."""
    parts = []
    remaining = size
    while remaining > 0:
        piece = stream.read(min(remaining, CHUNK_SIZE))
        if not piece:
            break
        parts.append(piece)
        remaining -= len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write_xva(
    dst: BinaryIO,
    metadata: OvaMetadata | bytes,
    disks: Mapping[str, tuple[BinaryIO | Iterable[bytes], int]],
    *,
    checksum: ChecksumKind = "xxhash",
) -> int:
    """Write a whole XVA: ``ova.xml`` then each disk ``{ref: (source, size)}`` in ref order.

    Returns the number of bytes written.
    """
    with XvaWriter(dst, checksum=checksum) as writer:
        writer.add_ova_xml(metadata)
        for ref in sorted(disks):
            source, size = disks[ref]
            writer.add_disk(ref, source, size)
    return writer.bytes_written


# -- reading -----------------------------------------------------------------------------------
def detect_compression(head: bytes) -> Compression | None:
    """``gzip`` or ``zstd`` from the first bytes of a stream, None for a plain tar."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return None


class _PrefixedReader(io.RawIOBase):
    """A stream whose first bytes were already read (to sniff the compression).

    ``read`` passes straight through to the underlying stream once the prefix is consumed,
    so a plain XVA is read without an extra buffer copy.
    """

    def __init__(self, prefix: bytes, rest: BinaryIO) -> None:
        super().__init__()
        self._prefix = prefix
        self._rest = rest

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if self._prefix:
            if size < 0 or size >= len(self._prefix):
                head, self._prefix = self._prefix, b""
                if size < 0:
                    return head + self._rest.read()
                return head
            head, self._prefix = self._prefix[:size], self._prefix[size:]
            return head
        return self._rest.read(size)

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


class _Decompressed(io.RawIOBase):
    """Wraps a decompressing stream so that codec errors become :class:`FormatError`."""

    def __init__(self, inner: BinaryIO, codec: str, name: str) -> None:
        super().__init__()
        self._inner = inner
        self._codec = codec
        self._name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        try:
            data = self._inner.read(len(view))
        except (OSError, EOFError, zlib.error, ValueError) as error:
            raise FormatError(f"corrupt {self._codec} stream: {error}", path=self._name) from None
        except Exception as error:
            # zstandard raises its own ZstdError type; it is imported lazily.
            if type(error).__name__ == "ZstdError":
                raise FormatError(f"corrupt zstd stream: {error}", path=self._name) from None
            raise
        view[: len(data)] = data
        return len(data)


def open_decompressed(source: BinaryIO, name: str = "XVA") -> BinaryIO:
    """Return a stream of the plain tar, decompressing gzip or zstd when the magic says so."""
    head = _read_exactly(source, 4)
    stream = _PrefixedReader(head, source)
    kind = detect_compression(head)
    if kind == "gzip":
        inner: BinaryIO = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
    elif kind == "zstd":
        try:
            import zstandard
        except ImportError as error:  # pragma: no cover - a packaging error
            raise FormatError(
                "a zstd-compressed XVA needs the Python package 'zstandard'", path=name
            ) from error
        inner = zstandard.ZstdDecompressor().stream_reader(  # type: ignore[assignment]
            stream, read_across_frames=True
        )
    else:
        return stream  # type: ignore[return-value]
    return io.BufferedReader(_Decompressed(inner, kind, name), CHUNK_SIZE)  # type: ignore[return-value]


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    kind: bytes


class _TarStream:
    """Forward-only tar framing: headers via :class:`tarfile.TarInfo`, data read here."""

    def __init__(self, stream: BinaryIO, name: str) -> None:
        self._stream = stream
        self._name = name
        self.offset = 0
        self._pending: _Entry | None = None
        self._pending_unread = 0
        self.finished = False

    def _read(self, size: int) -> bytes:
        data = _read_exactly(self._stream, size)
        self.offset += len(data)
        return data

    def next_entry(self) -> _Entry | None:
        """The next file entry, or None at the end-of-archive marker."""
        if self._pending is not None:
            self.skip_data()
        pax_path: str | None = None
        while True:
            at = self.offset
            block = self._read(BLOCK)
            if not block:
                raise FormatError(
                    f"stream ends at byte {at} without the end-of-archive blocks (truncated)",
                    path=self._name,
                )
            if len(block) < BLOCK:
                raise FormatError(f"truncated tar header at byte {at}", path=self._name)
            if block == _END_OF_ARCHIVE[:BLOCK]:
                # XAPI writes two zero blocks; a second one missing at EOF is tolerated.
                self._read(BLOCK)
                self.finished = True
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except (tarfile.HeaderError, ValueError, UnicodeError, OverflowError) as error:
                raise FormatError(
                    f"bad tar header at byte {at}: {error}", path=self._name
                ) from None
            if info.size < 0:
                raise FormatError(f"negative size in tar header at byte {at}", path=self._name)
            entry = _Entry(pax_path or info.name, info.size, info.type)
            pax_path = None
            if entry.kind in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                # pax extended headers: only a ``path`` override can matter to an XVA.
                if entry.size > 1024 * 1024:
                    raise FormatError(f"oversized pax header at byte {at}", path=self._name)
                self._pending, self._pending_unread = entry, entry.size
                records = self.read_data()
                if entry.kind == tarfile.XHDTYPE:
                    pax_path = _pax_path(records)
                continue
            if entry.kind == tarfile.DIRTYPE:
                self._pending, self._pending_unread = entry, entry.size
                self.skip_data()
                continue
            if entry.kind not in tarfile.REGULAR_TYPES:
                raise FormatError(
                    f"unexpected tar member type {entry.kind!r} at byte {at}",
                    path=f"{self._name}: {entry.name}",
                )
            self._pending, self._pending_unread = entry, entry.size
            return entry

    def read_data(self) -> bytes:
        """All the data of the current entry (which the caller has bounded in size)."""
        entry = self._pending
        assert entry is not None
        data = self._read(self._pending_unread)
        if len(data) < self._pending_unread:
            raise FormatError(
                f"stream ends inside the data ({len(data)} of {entry.size} bytes, truncated)",
                path=f"{self._name}: {entry.name}",
            )
        self._pending_unread = 0
        self._skip_padding(entry)
        return data

    def skip_data(self) -> None:
        """Skip what is left of the current entry."""
        entry = self._pending
        if entry is None:
            return
        while self._pending_unread > 0:
            piece = self._read(min(self._pending_unread, CHUNK_SIZE))
            if not piece:
                raise FormatError(
                    "stream ends inside the data (truncated)", path=f"{self._name}: {entry.name}"
                )
            self._pending_unread -= len(piece)
        self._skip_padding(entry)

    def _skip_padding(self, entry: _Entry) -> None:
        padding = -entry.size % BLOCK
        if padding and len(self._read(padding)) < padding:
            raise FormatError(
                "stream ends inside the padding (truncated)", path=f"{self._name}: {entry.name}"
            )
        self._pending = None


def _pax_path(records: bytes) -> str | None:
    for line in records.split(b"\n"):
        _, _, item = line.partition(b" ")
        key, _, value = item.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


@dataclass(frozen=True)
class XvaChunk:
    """A verified data chunk of a disk, at ``offset`` bytes into it."""

    offset: int
    data: bytes
    counter: int


class XvaDiskReader:
    """One disk of an archive being read: consume :meth:`chunks` (or :meth:`iter_data`)
    before asking the :class:`XvaReader` for the next disk."""

    def __init__(self, reader: XvaReader, ref: str, info: XvaDiskInfo | None) -> None:
        self._reader = reader
        self.ref = ref
        """The disk's ``Ref:<n>`` id."""
        self.info = info
        """What ``ova.xml`` says about it (None when it does not list it)."""
        self.size = 0
        """Bytes of disk data seen so far (the end of the last chunk read)."""
        self._started = False
        self.done = False

    def chunks(self) -> Iterator[XvaChunk]:
        """The chunks present in the archive, checksums verified, offsets rebuilt from the
        sequence (§5: ``previous offset + previous length + gap × first chunk length``)."""
        if self._started:
            raise ValueError(f"the chunks of {self.ref} were already read")
        self._started = True
        yield from self._reader._disk_chunks(self)

    def iter_data(self, size: int | None = None) -> Iterator[bytes]:
        """The whole disk as contiguous pieces, omitted chunks filled with zeros.

        ``size`` defaults to the VDI's ``virtual_size`` from ``ova.xml`` (else the end of the
        last chunk). Data beyond ``size`` is a :class:`FormatError`.
        """
        if size is None and self.info is not None:
            size = self.info.virtual_size
        position = 0
        for chunk in self.chunks():
            if chunk.offset < position:
                raise FormatError(
                    f"chunk overlaps the previous one at offset {chunk.offset}",
                    path=f"{self.ref}/{chunk.counter:08d}",
                )
            while position < chunk.offset:
                n = min(CHUNK_SIZE, chunk.offset - position)
                yield _ZERO_CHUNK[:n]
                position += n
            if size is not None and chunk.offset + len(chunk.data) > size:
                raise FormatError(
                    f"chunk ends at {chunk.offset + len(chunk.data)}, past the disk size {size}",
                    path=f"{self.ref}/{chunk.counter:08d}",
                )
            if chunk.data:
                yield chunk.data
            position = chunk.offset + len(chunk.data)
        while size is not None and position < size:
            n = min(CHUNK_SIZE, size - position)
            yield _ZERO_CHUNK[:n]
            position += n

    def read_into(self, dst: BinaryIO, size: int | None = None) -> int:
        """Write the whole disk to ``dst`` (see :meth:`iter_data`); returns the bytes written."""
        total = 0
        for piece in self.iter_data(size):
            dst.write(piece)
            total += len(piece)
        return total


class XvaReader:
    """Read an XVA from a forward-only stream, verifying every chunk's checksum.

    ``ova.xml`` is read at construction (:attr:`ova_xml`, :attr:`metadata`); then
    :meth:`disks` yields one :class:`XvaDiskReader` per disk, in archive order. Any damage
    (bad tar, truncation, bad checksum, bad names) raises :class:`FormatError` naming the entry.
    gzip- and zstd-compressed streams are detected and decompressed.
    """

    def __init__(self, source: BinaryIO, *, name: str = "XVA", verify: bool = True) -> None:
        self.name = name
        self.verify = verify
        self._tar = _TarStream(open_decompressed(source, name), name)
        first = self._tar.next_entry()
        if first is None:
            raise FormatError("empty archive: no ova.xml", path=name)
        if first.name != OVA_XML:
            raise FormatError(
                f"the first member is {first.name!r}, expected {OVA_XML!r}", path=name
            )
        if first.size > MAX_OVA_XML_SIZE:
            raise FormatError(f"{OVA_XML} is too large ({first.size} bytes)", path=name)
        self.ova_xml = self._tar.read_data()
        """The raw ``ova.xml``."""
        self._metadata: OvaMetadata | None = None
        self._lookahead = self._tar.next_entry()
        self._seen_refs: set[str] = set()
        self._current: XvaDiskReader | None = None

    @property
    def metadata(self) -> OvaMetadata:
        """``ova.xml`` parsed (on first use)."""
        if self._metadata is None:
            self._metadata = OvaMetadata.from_xml(self.ova_xml)
        return self._metadata

    def _where(self, entry: _Entry) -> str:
        return f"{self.name}: {entry.name}"

    def disks(self) -> Iterator[XvaDiskReader]:
        """Yield each disk in archive order; skips the rest of a disk left unread. After the
        last one, the end of the archive has been checked."""
        infos: dict[str, XvaDiskInfo] = {}
        try:
            infos = {disk.ref: disk for disk in self.metadata.disks()}
        except FormatError:
            # A VM-less ova.xml (hand-made archive) still has readable disks.
            infos = {}
        while True:
            if self._current is not None and not self._current.done:
                if not self._current._started:
                    self._current._started = True
                for _ in self._disk_chunks(self._current):
                    pass
            entry = self._lookahead
            if entry is None:
                return
            match = _CHUNK_NAME.match(entry.name)
            if not match:
                raise FormatError(
                    "unexpected member (expected Ref:<n>/<counter>)", path=self._where(entry)
                )
            ref = match.group(1)
            if ref in self._seen_refs:
                raise FormatError(
                    f"chunks of {ref} are not contiguous in the archive", path=self._where(entry)
                )
            self._seen_refs.add(ref)
            self._current = XvaDiskReader(self, ref, infos.get(ref))
            yield self._current

    def _disk_chunks(self, disk: XvaDiskReader) -> Iterator[XvaChunk]:
        previous_counter = -1
        offset = 0
        previous_length = 0
        first_length = 0
        while True:
            entry = self._lookahead
            if entry is None:
                break
            match = _CHUNK_NAME.match(entry.name)
            if not match:
                raise FormatError(
                    "unexpected member (expected Ref:<n>/<counter>)", path=self._where(entry)
                )
            if match.group(1) != disk.ref:
                break
            counter = int(match.group(2))
            if counter <= previous_counter:
                raise FormatError(
                    f"chunk counter {counter} does not increase (previous {previous_counter})",
                    path=self._where(entry),
                )
            if entry.size > CHUNK_SIZE:
                raise FormatError(
                    f"chunk of {entry.size} bytes, more than {CHUNK_SIZE}", path=self._where(entry)
                )
            data = self._tar.read_data()
            checksum_entry = self._tar.next_entry()
            kind = _CHECKSUM_SUFFIX.get(
                checksum_entry.name[len(entry.name) :] if checksum_entry else "", None
            )
            if (
                checksum_entry is None
                or not checksum_entry.name.startswith(entry.name)
                or kind is None
            ):
                raise FormatError(
                    "missing checksum member (.xxhash or .checksum) after the chunk",
                    path=self._where(entry),
                )
            if checksum_entry.size > 128:
                raise FormatError("oversized checksum member", path=self._where(checksum_entry))
            stored = self._tar.read_data()
            if self.verify:
                expected = chunk_checksum(kind, data)  # type: ignore[arg-type]
                if stored.strip().decode("ascii", "replace").lower() != expected.lower():
                    raise FormatError(
                        f"checksum mismatch: stored {stored[:64]!r}, computed {expected}",
                        path=self._where(checksum_entry),
                    )
            if previous_counter < 0:
                # Chunk 0 is always present; a stream starting later is read as if the
                # missing chunks were full and zero.
                offset = counter * CHUNK_SIZE
                first_length = len(data) or CHUNK_SIZE
            else:
                gap = counter - previous_counter - 1
                offset = offset + previous_length + gap * first_length
            previous_counter, previous_length = counter, len(data)
            disk.size = offset + len(data)
            self._lookahead = self._tar.next_entry()
            yield XvaChunk(offset, data, counter)
        disk.done = True

    def read_all(self) -> None:
        """Read and verify the rest of the archive, discarding the disk data."""
        for disk in self.disks():
            for _ in disk.chunks():
                pass


def verify_xva(source: BinaryIO, name: str = "XVA") -> OvaMetadata:
    """Read a whole XVA, verifying its structure, every checksum, and that each disk
    ``ova.xml`` lists is there with its last chunk (which XAPI always writes) ending at its
    ``virtual_size``. Returns the metadata."""
    reader = XvaReader(source, name=name)
    expected = {disk.ref: disk for disk in reader.metadata.disks()}
    for disk in reader.disks():
        for _ in disk.chunks():
            pass
        info = expected.pop(disk.ref, None)
        if info is not None and disk.size != info.virtual_size:
            raise FormatError(
                f"disk data ends at byte {disk.size}, its virtual_size is {info.virtual_size}",
                path=f"{name}: {disk.ref}",
            )
    if expected:
        raise FormatError(f"no data for disk(s) {', '.join(sorted(expected))}", path=name)
    return reader.metadata


# -- validity of a stored XVA (what a writer checks before publishing it) ----------------------
def check_xva_file(
    read_range: Callable[[int, int], bytes],
    size: int,
    *,
    name: str = "XVA",
    expected_size: int | None = None,
) -> None:
    """Cheap checks of a stored XVA without reading it all; raises :class:`FormatError`.

    ``read_range(offset, length)`` reads the stored file. Checks: the size matches
    ``expected_size`` when given; a plain tar is a whole number of 512-byte blocks, ends with
    the two zero blocks and starts with ``ova.xml``; a compressed one starts with its magic and
    a gzip one ends with the gzip trailer's uncompressed size being a multiple of 512.
    """
    if expected_size is not None and size != expected_size:
        raise FormatError(f"size is {size} bytes, expected {expected_size}", path=name)
    head = read_range(0, BLOCK)
    kind = detect_compression(head)
    if kind is None:
        if size < 3 * BLOCK:
            raise FormatError(f"too small for an XVA ({size} bytes)", path=name)
        if size % BLOCK:
            raise FormatError(f"size {size} is not a multiple of {BLOCK} (truncated)", path=name)
        tail = read_range(size - 2 * BLOCK, 2 * BLOCK)
        if tail != _END_OF_ARCHIVE:
            raise FormatError("does not end with two zero blocks (truncated tar)", path=name)
        try:
            first = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
        except (tarfile.HeaderError, ValueError, UnicodeError, OverflowError) as error:
            raise FormatError(f"bad first tar header: {error}", path=name) from None
        if first.name != OVA_XML:
            raise FormatError(
                f"the first member is {first.name!r}, expected {OVA_XML!r}", path=name
            )
        return
    if size < 18:
        raise FormatError(f"too small for a {kind} stream ({size} bytes)", path=name)
    if kind == "gzip":
        # ISIZE (uncompressed size mod 2^32) of a complete tar is a multiple of 512.
        trailer = read_range(size - 4, 4)
        if len(trailer) < 4 or int.from_bytes(trailer, "little") % BLOCK:
            raise FormatError("gzip trailer does not end a complete tar (truncated)", path=name)


def is_valid_xva(remote: Remote, path: str, *, expected_size: int | None = None) -> bool:
    """True when the XVA stored at ``path`` passes :func:`check_xva_file`."""
    try:
        size = remote.stat(path).size
        check_xva_file(
            lambda offset, length: remote.read_range(path, offset, length),
            size,
            name=path,
            expected_size=expected_size,
        )
    except (FormatError, RemoteError):
        return False
    return True
