"""The ``mount`` mode: a folder on an NFS share the system has already mounted.

Everything about files is the local-folder remote's (temp name, fsync, rename, folder fsync):
on a kernel NFS mount those calls become WRITE+COMMIT and an atomic RENAME on the server.
What this adds is the check that the folder really is on NFS, so that an unmounted share
(an empty mount point) fails loudly instead of silently filling the local disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from xobackup_remote_local import LocalRemote

from xobackup_core.errors import RemoteConfigError

NFS_FILESYSTEMS = ("nfs", "nfs4")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Filesystem type of the mount holding ``path`` (the longest matching mount point)."""
    real = os.path.realpath(path)
    best, best_type = "", None
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                mount_point = _unescape(fields[4])
                fs_type = line.split(" - ", 1)[1].split()[0]
                inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fs_type
    except OSError:
        return None
    return best_type


class NfsMountRemote(LocalRemote):
    """A remote in a folder of a kernel-mounted NFS export."""

    def __init__(
        self, mount_point: str | Path, *, name: str | None = None, check_mount: bool = True
    ) -> None:
        folder = os.path.abspath(os.fspath(mount_point))
        label = name or f"nfs mount {folder}"
        if check_mount:
            if not os.path.isdir(folder):
                raise RemoteConfigError(
                    f"the mount point {folder} does not exist; mount the NFS export there first",
                    remote=label,
                )
            fs_type = filesystem_type(folder)
            if fs_type not in NFS_FILESYSTEMS:
                raise RemoteConfigError(
                    f"{folder} is not on a mounted NFS share (filesystem: {fs_type or 'unknown'}); "
                    "mount the export first (xobackup never mounts), or set check_mount = false",
                    remote=label,
                )
        super().__init__(folder, name=label)
