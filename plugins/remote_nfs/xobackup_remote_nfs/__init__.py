"""NFS exports as remotes: ``nfs://host[:port]/export/path``.

Two modes, chosen with the ``mode`` option:

``client`` (default)
    A userspace NFSv3 client (libnfs through ctypes, see :mod:`xobackup_remote_nfs.libnfs`):
    nothing is mounted, no root rights or kernel NFS support are needed. The URL's path is
    mounted directly when the server exports it, else its longest exported ancestor is
    mounted and the rest is a folder inside that export (created if missing).
``mount``
    The export is already mounted by the system (fstab, autofs, a systemd mount unit): set
    ``mount_point`` to the local folder where the URL's path is mounted. Files are then
    handled exactly like a local folder (temp name, fsync, rename, folder fsync), which on a
    kernel NFS mount gives the same guarantees (close-to-open consistency, COMMIT on fsync).
    xobackup never mounts anything itself. Unless ``check_mount = false``, the folder must be
    on an NFS filesystem, so that a missing mount fails loudly instead of filling the local
    disk. Timeouts then come from the mount options (``timeo``, ``retrans``, ``soft``/``hard``).

Options of the client mode:

``version``
    3 (default). 4 needs libnfs 5 or later (libnfs 4.0 cannot write over NFSv4).
``mount_port``
    The MOUNT service port, to skip the portmapper (with ``:port`` in the URL for NFS).
``timeout`` / ``connect_timeout``
    Seconds for one RPC (default 60) / for connecting and mounting (default 15).
``retries``
    Attempts after a transient failure of an idempotent operation (default 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from xobackup_core.config import redact_url
from xobackup_core.errors import RemoteConfigError
from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided
from xobackup_core.remote import Remote
from xobackup_remote_nfs.mount import NfsMountRemote
from xobackup_remote_nfs.remote import NfsRemote

__all__ = ["NfsMountRemote", "NfsRemote", "open_nfs_remote"]

_CLIENT_OPTIONS = {"name", "mode", "version", "mount_port", "timeout", "connect_timeout", "retries"}
_MOUNT_OPTIONS = {"name", "mode", "mount_point", "check_mount"}


def _number(value: Any, key: str, name: str, kind: type = float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise RemoteConfigError(
            f"option {key!r} must be a number, not {value!r}", remote=name
        ) from None
    if number < 0:
        raise RemoteConfigError(f"option {key!r} cannot be negative", remote=name)
    return number


def open_nfs_remote(url: str, options: Mapping[str, Any]) -> Remote:
    """Parse an ``nfs://`` URL and its options and open the remote."""
    name = str(options.get("name") or redact_url(url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise RemoteConfigError(f"invalid NFS URL: {error}", remote=name) from None
    merged: dict[str, Any] = dict(parse_qsl(parts.query))
    merged.update(options)
    mode = str(merged.get("mode", "client"))
    if mode not in ("client", "mount"):
        raise RemoteConfigError(
            f"option 'mode' must be 'client' or 'mount', not {mode!r}", remote=name
        )
    known = _CLIENT_OPTIONS if mode == "client" else _MOUNT_OPTIONS
    unknown = sorted(set(merged) - known)
    if unknown:
        raise RemoteConfigError(
            f"unknown option(s) for mode {mode!r}: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}",
            remote=name,
        )
    if mode == "mount":
        if not merged.get("mount_point"):
            raise RemoteConfigError(
                "mode 'mount' needs 'mount_point': the local folder where the export is mounted",
                remote=name,
            )
        check = str(merged.get("check_mount", True)).lower() not in ("false", "0", "no", "off")
        return NfsMountRemote(str(merged["mount_point"]), name=name, check_mount=check)
    host = parts.hostname
    if not host:
        raise RemoteConfigError("an NFS URL names a host: nfs://host[:port]/export", remote=name)
    return NfsRemote(
        host,
        unquote(parts.path) or "/",
        port=port,
        mount_port=_number(merged["mount_port"], "mount_port", name, int)
        if merged.get("mount_port")
        else None,
        version=_number(merged.get("version", 3), "version", name, int),
        timeout=_number(merged.get("timeout", 60), "timeout", name),
        connect_timeout=_number(merged.get("connect_timeout", 15), "connect_timeout", name),
        retries=_number(merged.get("retries", 3), "retries", name, int),
        name=name,
    )


@hookimpl
def xobackup_provides() -> list[Provided]:
    return [
        Provided(
            "remote",
            "nfs",
            "an NFS export: nfs://host[:port]/export/path (userspace NFSv3, or a mounted share)",
        )
    ]


@hookimpl
def xobackup_remote(url: str, options: Mapping[str, Any]) -> Remote | None:
    if not url.lower().startswith("nfs://"):
        return None
    return open_nfs_remote(url, options)
