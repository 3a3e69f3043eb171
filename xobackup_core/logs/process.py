"""Is the process that recorded a run still running?

A bare PID is not enough: after a crash or a reboot the number is reused by an unrelated
process, and a run would look alive forever (the "job already running" ghosts of xo-backups.md
§12.5). On Linux a process is therefore identified by the boot id plus its start time in clock
ticks since boot (``/proc/<pid>/stat`` field 22), which no other process can share.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path


@cache
def hostname() -> str:
    """The name this host records in runs it starts."""
    return socket.gethostname()


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (which may hold spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    _, _, rest = text.rpartition(")")
    return rest.split()


def process_identity(pid: int) -> str | None:
    """A token that names exactly this process, or None where the system cannot tell."""
    boot_id = _boot_id()
    fields = _stat_fields(pid)
    if boot_id is None or fields is None or len(fields) < 20:
        return None
    # fields[0] is field 3 (state), so field 22 (starttime) is fields[19]
    return f"{boot_id}/{fields[19]}"


def process_alive(pid: int, identity: str | None = None) -> bool:
    """True when ``pid`` runs on this host and, if ``identity`` is given, is that process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    fields = _stat_fields(pid)
    if fields is not None and fields[0] in ("Z", "X"):  # killed, waiting to be reaped
        return False
    if identity is not None:
        current = process_identity(pid)
        if current is not None and current != identity:
            return False
    return True
