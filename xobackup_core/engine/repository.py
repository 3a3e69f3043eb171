"""The backup repository on a remote, in Xen Orchestra's layout (reference: xo-backups.md §2).

::

    xo-vm-backups/<vm uuid>/
        cache.json.gz                   index of the metadata files (rebuilt when stale)
        <YYYYMMDDTHHmmssZ>.json         one per backup, always written last
        <YYYYMMDDTHHmmssZ>.xva          full backups, with .xva.checksum
        vdis/<job uuid>/<vdi uuid>/<YYYYMMDDTHHmmssZ>.vhd   delta chains, per job and disk

A backup exists only once its JSON exists: data files are committed first, the metadata last,
so a run killed at any point leaves at worst unreferenced data files, which the next run's
cleanup removes. Sharing the layout means Xen Orchestra and xobackup read each other's backups.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from xobackup_core.errors import FormatError, RemoteError, RemoteNotFoundError
from xobackup_core.remote import Remote, join_path, normalize_path

BACKUP_ROOT = "/xo-vm-backups"
METADATA_VERSION = "2.0.0"
CACHE_NAME = "cache.json.gz"
_TIMESTAMP = re.compile(r"^\d{8}T\d{6}Z$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


def format_timestamp(moment: datetime | int | float) -> str:
    """``20260801T040000Z`` from a datetime or milliseconds since the epoch (UTC)."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment / 1000, tz=UTC)
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def parse_timestamp(text: str) -> datetime:
    """The UTC datetime of a ``20260801T040000Z`` name."""
    if not _TIMESTAMP.match(text):
        raise ValueError(f"{text!r} is not a backup timestamp (YYYYMMDDTHHMMSSZ)")
    return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class BackupMetadata:
    """One backup as its ``<timestamp>.json`` describes it."""

    path: str
    """Remote path of the JSON file: the backup's id."""
    data: Mapping[str, Any] = field(repr=False)

    @property
    def vm_uuid(self) -> str:
        return str(self.data.get("vm", {}).get("uuid") or self.path.split("/")[-2])

    @property
    def vm_name(self) -> str:
        return str(self.data.get("vm", {}).get("name_label", ""))

    @property
    def mode(self) -> str:
        return str(self.data.get("mode", ""))

    @property
    def timestamp(self) -> int:
        """Milliseconds since the epoch."""
        return int(self.data.get("timestamp", 0))

    @property
    def job_id(self) -> str:
        return str(self.data.get("jobId", ""))

    @property
    def schedule_id(self) -> str:
        return str(self.data.get("scheduleId", ""))

    @property
    def size(self) -> int:
        return int(self.data.get("size", 0) or 0)

    def listing(self, remote: str) -> dict[str, Any]:
        """This backup as ``backups list --json`` and the web API show it, on ``remote``."""
        return {
            "remote": remote,
            "id": self.path,
            "vm": self.vm_uuid,
            "vmName": self.vm_name,
            "timestamp": self.timestamp,
            "mode": self.mode,
            "size": self.size,
            "jobId": self.job_id,
            "scheduleId": self.schedule_id,
        }

    @property
    def folder(self) -> str:
        return self.path.rsplit("/", 1)[0]

    @property
    def xva_path(self) -> str | None:
        """Remote path of the XVA of a full backup."""
        xva = self.data.get("xva")
        return join_path(self.folder, xva) if xva else None

    @property
    def vhd_paths(self) -> dict[str, str]:
        """Remote path of each disk's tip VHD, keyed as in the metadata (``vhds``)."""
        return {key: join_path(self.folder, rel) for key, rel in self.data.get("vhds", {}).items()}


class BackupRepository:
    """Xen Orchestra's backup layout on one :class:`~xobackup_core.remote.Remote`."""

    def __init__(self, remote: Remote) -> None:
        self.remote = remote

    # -- paths -------------------------------------------------------------------------------
    @staticmethod
    def vm_folder(vm_uuid: str) -> str:
        return join_path(BACKUP_ROOT, vm_uuid)

    @staticmethod
    def vdi_folder(vm_uuid: str, job_id: str, vdi_uuid: str) -> str:
        return join_path(BACKUP_ROOT, vm_uuid, "vdis", job_id, vdi_uuid)

    # -- listing -----------------------------------------------------------------------------
    def list_vms(self) -> list[str]:
        """UUIDs of the VMs that have a backup folder (lock files and queues ignored)."""
        return [name for name in self.remote.list(BACKUP_ROOT) if _UUID.match(name)]

    def list_backups(self, vm_uuid: str) -> list[BackupMetadata]:
        """Every readable backup of a VM, oldest first. Unreadable JSON is skipped (see
        :meth:`read_problems` to report it)."""
        backups = []
        for path in self._metadata_paths(vm_uuid):
            try:
                backups.append(self.read_metadata(path))
            except (FormatError, RemoteNotFoundError):
                continue
        return sorted(backups, key=lambda b: (b.timestamp, b.path))

    def read_problems(self, vm_uuid: str) -> list[str]:
        """Messages for metadata files that cannot be read."""
        problems = []
        for path in self._metadata_paths(vm_uuid):
            try:
                self.read_metadata(path)
            except FormatError as error:
                problems.append(str(error))
            except RemoteNotFoundError:
                continue
        return problems

    def _metadata_paths(self, vm_uuid: str) -> Iterator[str]:
        folder = self.vm_folder(vm_uuid)
        for name in self.remote.list(folder):
            if name.endswith(".json") and _TIMESTAMP.match(name[: -len(".json")]):
                yield join_path(folder, name)

    def read_metadata(self, path: str) -> BackupMetadata:
        raw = self.remote.read_bytes(path)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise FormatError(f"not valid JSON ({error})", path=path) from None
        if not isinstance(data, dict) or data.get("mode") not in ("full", "delta"):
            raise FormatError("not backup metadata (no 'mode' full/delta)", path=path)
        return BackupMetadata(path=path, data=data)

    # -- writing -----------------------------------------------------------------------------
    def write_metadata(self, vm_uuid: str, timestamp: str, data: Mapping[str, Any]) -> str:
        """Write ``<timestamp>.json`` (the step that makes a backup exist) and refresh the
        cache. Returns the metadata path."""
        path = join_path(self.vm_folder(vm_uuid), f"{timestamp}.json")
        payload = {"version": METADATA_VERSION, **data}
        self.remote.write_bytes(path, json.dumps(payload, separators=(",", ":")).encode())
        self.refresh_cache(vm_uuid)
        return path

    def record_merges(self, vm_uuid: str, merged: Iterable[str]) -> list[str]:
        """After merges into the disks at ``merged`` (tip paths as the metadata names them),
        rewrite the metadata of each backup whose disk became a merged one, as XO does:
        ``isVhdDifferencing`` from what each of its disks now is (False once a merge reached
        the base) and ``size`` as the bytes of its disks as plain VHD files. Each JSON is
        replaced atomically, then the cache is refreshed once. Returns the rewritten paths.

        A backup whose disks cannot be opened is left as it is: the VM cleanup judges it.
        """
        # Imported here: the format code is only needed once a merge happened.
        from xobackup_core.formats.vhd_directory import open_remote_disk
        from xobackup_core.formats.vhd_merge import stream_size

        merged = {normalize_path(path) for path in merged}
        rewritten = []
        for backup in self.list_backups(vm_uuid) if merged else []:
            disks = backup.vhd_paths
            if merged.isdisjoint(disks.values()):
                continue
            differencing = dict(backup.data.get("isVhdDifferencing") or {})
            size = 0
            try:
                for key, path in disks.items():
                    disk = open_remote_disk(self.remote, path)
                    try:
                        differencing[key] = disk.is_differencing
                        size += stream_size(disk)
                    finally:
                        disk.close()
            except (FormatError, RemoteNotFoundError):
                continue
            data = {**backup.data, "isVhdDifferencing": differencing, "size": size}
            self.remote.write_bytes(backup.path, json.dumps(data, separators=(",", ":")).encode())
            rewritten.append(backup.path)
        if rewritten:
            self.refresh_cache(vm_uuid)
        return rewritten

    def delete_metadata(self, backup: BackupMetadata) -> None:
        """Remove a backup's JSON (it stops existing) and refresh the cache."""
        self.remote.delete(backup.path, missing_ok=True)
        self.refresh_cache(backup.vm_uuid)

    def refresh_cache(self, vm_uuid: str) -> None:
        """Rewrite ``cache.json.gz`` from the metadata files, in the shape XO reads."""
        entries = {}
        for backup in self.list_backups(vm_uuid):
            entries[backup.path] = {**backup.data, "_filename": backup.path, "id": backup.path}
        body = gzip.compress(json.dumps(entries).encode(), compresslevel=6, mtime=0)
        cache = join_path(self.vm_folder(vm_uuid), CACHE_NAME)
        try:
            self.remote.write_bytes(cache, body)
        except RemoteError:
            # The cache only speeds up listings; without it readers rebuild it from the JSONs.
            # A stale one must not stay, so try to remove it.
            try:
                self.remote.delete(cache, missing_ok=True)
            except RemoteError:
                pass
