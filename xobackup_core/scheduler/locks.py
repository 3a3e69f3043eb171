"""Per-VM locks on a remote, held with a heartbeat so a crashed holder's lock expires.

Two jobs backing up the same VM to the same remote must not interleave (a merge under a
transfer, two retentions at once). The lock is the file ``xo-vm-backups/<vm uuid>.lock``:
JSON with the owner, pid, host, a random token, when it was taken and when it expires. The
holder rewrites it every ``ttl / 3`` seconds (the heartbeat, a thread), pushing the expiry
forward; a holder that crashed stops doing so and its lock expires by itself after ``ttl``
seconds — no "Lock file is already being held" that never goes away (xo-backups.md §12.12).

Taking the lock is an atomic create-if-absent. The :class:`~xobackup_core.remote.Remote`
contract only offers atomic *replace*, so the primitive depends on what the remote offers:

1. a remote that has a ``create_exclusive(path, data)`` method (an optional extension of the
   contract: create ``path`` with ``data`` only if nothing is there, raising
   :class:`~xobackup_core.errors.RemoteExistsError` otherwise) uses it — for S3 that is a
   ``PutObject`` with ``If-None-Match: *``;
2. a folder remote (``file://``, or a kernel-mounted NFS/SMB share: the remote has
   ``real_path``) writes the lock under a unique temporary name and ``link()``\\ s it onto
   the lock path, which fails if the path exists — atomic on local filesystems and on NFS
   (the classic NFS-safe lock file);
3. any other remote falls back to *write, wait, read back*: the claim is written only if no
   lock is seen, and held only if the lock read back after a settle delay is still ours. Two
   contenders can both win only if their check-then-write windows overlap within the settle
   delay; this is documented as best-effort (docs/daemon.md).

An expired lock is deleted under a short-lived guard file (``.<vm uuid>.lock.takeover``,
created the same exclusive way) after reading it again, so a fresh lock taken in between is
never removed; then the contenders race for it with the exclusive create. The heartbeat
reads the lock before each refresh: when the token is no longer ours the lock was lost
(expired and taken over after a stall longer than ``ttl``), :attr:`VmLock.lost` becomes
true and :meth:`VmLock.check` raises.

Compatibility with Xen Orchestra: XO locks the same VM with proper-lockfile, which creates a
*folder* at this very path (``xo-vm-backups/<vm uuid>.lock``). Each tool therefore sees the
other's lock as taken: XO's ``mkdir`` fails on our file, and our exclusive create fails on its
folder (reported as "locked by Xen Orchestra"). XO never locks on S3 (§13.8).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from types import TracebackType

from xobackup_core.errors import (
    RemoteError,
    RemoteExistsError,
    RemoteNotFoundError,
    XobackupError,
)
from xobackup_core.remote import Remote, join_path, make_temp_name, map_os_error

_log = logging.getLogger(__name__)

LOCK_FOLDER = "/xo-vm-backups"
DEFAULT_TTL = 120.0
"""Seconds a lock lives without a heartbeat."""
SETTLE_DELAY = 1.0
"""Seconds the best-effort protocol waits before reading its claim back."""
TAKEOVER_TTL = 30.0
"""Seconds after which the guard of a takeover left by a crashed process is ignored."""


def lock_path(vm_uuid: str) -> str:
    """Where a VM's lock lives on a remote."""
    return join_path(LOCK_FOLDER, f"{vm_uuid}.lock")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _holder_is_dead(info: LockInfo) -> bool:
    """A lock held by a process of this host that no longer runs is stale at once: a run
    killed with SIGKILL must not block the next one until the lock's expiry."""
    from xobackup_core.logs.process import process_alive

    return info.host == socket.gethostname() and info.pid > 0 and not process_alive(info.pid)


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says."""

    owner: str
    pid: int
    host: str
    token: str
    acquired: float
    """When the lock was taken (Unix time)."""
    expires: float
    """When it expires unless refreshed (Unix time)."""

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockInfo:
        fields = json.loads(data)
        return cls(
            owner=str(fields["owner"]),
            pid=int(fields["pid"]),
            host=str(fields["host"]),
            token=str(fields["token"]),
            acquired=float(fields["acquired"]),
            expires=float(fields["expires"]),
        )

    def describe(self) -> str:
        return (
            f"locked by {self.owner} (pid {self.pid} on {self.host}) since "
            f"{_iso(self.acquired)}, expires {_iso(self.expires)}"
        )


_CONTENDED = LockInfo("", 0, "", "", 0.0, 0.0)
"""Stands for "taken and released by others while we looked": no holder to name."""


class VmLockedError(XobackupError):
    """The VM is locked on that remote by someone else; ``info`` says by whom, if known."""

    def __init__(self, message: str, info: LockInfo | None = None) -> None:
        self.info = info
        super().__init__(message)


class LockLostError(XobackupError):
    """This process held the lock but it expired and someone else took it."""


# -- exclusive create ------------------------------------------------------------------------
def _link_create(remote: Remote, path: str, data: bytes) -> bool:
    real = remote.real_path(path)  # type: ignore[attr-defined]
    folder, name = os.path.split(real)
    temp = os.path.join(folder, make_temp_name(name))
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # link() fails when the name exists: the atomic create-if-absent
            os.link(temp, real)
        except FileExistsError:
            return False
        finally:
            os.unlink(temp)
    except OSError as error:
        raise map_os_error(error, remote=remote.name, operation="lock", path=path) from None
    return True


def _settle_create(remote: Remote, path: str, data: bytes, token: str) -> bool:
    if remote.exists(path):
        return False
    remote.write_bytes(path, data)
    time.sleep(SETTLE_DELAY)
    try:
        return LockInfo.from_bytes(remote.read_bytes(path)).token == token
    except (RemoteNotFoundError, ValueError, KeyError):
        return False


def create_exclusive(remote: Remote, path: str, data: bytes, token: str) -> bool:
    """Create ``path`` with ``data`` if nothing is there; False if something is."""
    method: Callable[[str, bytes], object] | None = getattr(remote, "create_exclusive", None)
    if callable(method):
        try:
            method(path, data)
        except RemoteExistsError:
            return False
        return True
    if hasattr(remote, "real_path"):
        return _link_create(remote, path, data)
    return _settle_create(remote, path, data, token)


def lock_guarantee(remote: Remote) -> str:
    """``exclusive`` when taking a lock on ``remote`` is atomic, else ``best-effort``."""
    if callable(getattr(remote, "create_exclusive", None)) or hasattr(remote, "real_path"):
        return "exclusive"
    return "best-effort"


# -- the lock --------------------------------------------------------------------------------
class VmLock:
    """``with VmLock(remote, vm_uuid, owner, ttl):`` — hold a VM's lock on a remote.

    ``owner`` says who holds it in messages (``"job nightly (run 1f3c...)"``). ``wait``:
    seconds to keep trying while the VM is locked (0: fail at once with
    :class:`VmLockedError`). The heartbeat refreshes every ``heartbeat`` seconds
    (default ``ttl / 3``).
    """

    def __init__(
        self,
        remote: Remote,
        vm_uuid: str,
        owner: str,
        ttl: float = DEFAULT_TTL,
        *,
        wait: float = 0.0,
        heartbeat: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl <= 0:
            raise ValueError("a lock's ttl must be positive")
        self.remote = remote
        self.vm_uuid = vm_uuid
        self.owner = owner
        self.ttl = ttl
        self.wait = wait
        self.heartbeat = heartbeat if heartbeat is not None else ttl / 3
        self.clock = clock
        self.path = lock_path(vm_uuid)
        self.token = secrets.token_hex(16)
        self.info: LockInfo | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new_info(self, acquired: float | None = None) -> LockInfo:
        now = self.clock()
        return LockInfo(
            owner=self.owner,
            pid=os.getpid(),
            host=socket.gethostname(),
            token=self.token,
            acquired=now if acquired is None else acquired,
            expires=now + self.ttl,
        )

    def read(self) -> LockInfo | None:
        """The lock as it is on the remote (None when free). VmLockedError if unreadable
        because something else (Xen Orchestra's lock folder) holds the path."""
        try:
            if self.remote.stat(self.path).is_dir:
                raise VmLockedError(self._foreign_message())
            data = self.remote.read_bytes(self.path)
        except RemoteNotFoundError:
            return None
        try:
            return LockInfo.from_bytes(data)
        except (ValueError, KeyError, TypeError):
            # half-written by another tool: treat as held, it is not ours to remove
            raise VmLockedError(
                f"VM {self.vm_uuid} on remote {self.remote.name!r}: {self.path} exists "
                "but is not an xobackup lock; remove it if no backup is running"
            ) from None

    def _foreign_message(self) -> str:
        try:
            since = _iso(self.remote.stat(self.path).mtime)
        except RemoteError:
            since = "an unknown time"
        return (
            f"VM {self.vm_uuid} on remote {self.remote.name!r} is locked by Xen Orchestra "
            f"(lock folder {self.path}, last refreshed {since})"
        )

    def _try_once(self) -> LockInfo | None:
        """Take the lock if free or expired: None when taken, else the holder's info (the
        last one seen while others were contending for it)."""
        seen: LockInfo | None = None
        for _attempt in range(3):
            info = self._new_info()
            if create_exclusive(self.remote, self.path, info.to_bytes(), self.token):
                self.info = info
                return None
            current = self.read()
            if current is None:
                continue  # released between our attempt and our look: try again
            seen = current
            if current.expires > self.clock() and not _holder_is_dead(current):
                return current
            self._take_over(current)
        return seen or _CONTENDED

    def _take_over(self, expired: LockInfo) -> None:
        """Delete an expired lock, and only that lock.

        Deleting after a read could remove a lock taken in between, so the read-and-delete
        happens under a short-lived guard file created exclusively: one contender at a
        time does it, and the others retry. A guard left by a crashed contender expires
        after :data:`TAKEOVER_TTL` seconds.
        """
        guard = join_path(LOCK_FOLDER, f".{self.vm_uuid}.lock.takeover")
        now = self.clock()
        mine = LockInfo(
            owner=self.owner,
            pid=os.getpid(),
            host=socket.gethostname(),
            token=self.token,
            acquired=now,
            expires=now + TAKEOVER_TTL,
        )
        if not create_exclusive(self.remote, guard, mine.to_bytes(), self.token):
            try:
                other = LockInfo.from_bytes(self.remote.read_bytes(guard))
            except RemoteNotFoundError:
                return
            except (ValueError, KeyError, TypeError):
                other = None
            if other is None or other.expires <= self.clock():
                self.remote.delete(guard, missing_ok=True)  # abandoned by a crashed contender
            return
        try:
            current = self.read()
            if (
                current is not None
                and current.token == expired.token
                and (current.expires <= self.clock() or _holder_is_dead(current))
            ):
                self.remote.delete(self.path, missing_ok=True)
                _log.warning(
                    "VM %s on remote %r: removed the stale lock of %s (pid %d on %s)",
                    self.vm_uuid,
                    self.remote.name,
                    expired.owner,
                    expired.pid,
                    expired.host,
                )
        finally:
            self.remote.delete(guard, missing_ok=True)

    def acquire(self) -> None:
        """Take the lock, or raise :class:`VmLockedError` (after ``wait`` seconds)."""
        give_up = time.monotonic() + self.wait
        pause = 0.05
        while True:
            holder = self._try_once()
            if holder is None:
                break
            if time.monotonic() >= give_up:
                where = f"VM {self.vm_uuid} on remote {self.remote.name!r}"
                if holder is _CONTENDED:
                    raise VmLockedError(f"{where} is being locked by another process right now")
                raise VmLockedError(f"{where} is {holder.describe()}", holder)
            time.sleep(min(pause, max(0.0, give_up - time.monotonic())))
            pause = min(pause * 2, 2.0)
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"lock-{self.vm_uuid[:8]}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self.refresh()
            except LockLostError as error:
                _log.error("%s", error)
                return
            except XobackupError as error:
                # a remote hiccup: the lock stays valid until it expires, try again
                _log.warning("could not refresh the lock of VM %s: %s", self.vm_uuid, error)

    def refresh(self) -> None:
        """Push the expiry ``ttl`` seconds forward (the heartbeat does it)."""
        current = self.read()
        if current is None or current.token != self.token:
            self.lost = True
            holder = current.describe() if current else "gone"
            raise LockLostError(
                f"the lock of VM {self.vm_uuid} on remote {self.remote.name!r} was lost "
                f"(now {holder})"
            )
        assert self.info is not None
        info = self._new_info(acquired=self.info.acquired)
        self.remote.write_bytes(self.path, info.to_bytes())
        self.info = info

    def check(self) -> None:
        """Raise :class:`LockLostError` if the lock was lost (call between long steps)."""
        if self.lost:
            raise LockLostError(
                f"the lock of VM {self.vm_uuid} on remote {self.remote.name!r} was lost"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            current = self.read()
        except XobackupError:
            return
        if current is not None and current.token == self.token:
            self.remote.delete(self.path, missing_ok=True)

    def __enter__(self) -> VmLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class VmLocks:
    """One VM's locks on several remotes, for a backup that writes to all of them.

    ``with VmLocks({"nas": nas, "s3": s3}, vm_uuid, owner) as refused:`` takes every lock it
    can; ``refused`` maps the remotes whose lock is held elsewhere to their
    :class:`VmLockedError`, so the engine drops those targets with a warning and goes on with
    the others (a VM fails only when every target failed). All held locks are released on
    exit.
    """

    def __init__(
        self,
        remotes: Mapping[str, Remote],
        vm_uuid: str,
        owner: str,
        ttl: float = DEFAULT_TTL,
        *,
        wait: float = 0.0,
    ) -> None:
        self.locks = {
            key: VmLock(remote, vm_uuid, owner, ttl, wait=wait) for key, remote in remotes.items()
        }
        self.held: dict[str, VmLock] = {}
        self.refused: dict[str, VmLockedError] = {}

    def __enter__(self) -> dict[str, VmLockedError]:
        try:
            for key, lock in self.locks.items():
                try:
                    lock.acquire()
                except VmLockedError as error:
                    self.refused[key] = error
                else:
                    self.held[key] = lock
        except BaseException:
            self.release()
            raise
        return self.refused

    def release(self) -> None:
        """Release every lock held."""
        for lock in self.held.values():
            try:
                lock.release()
            except XobackupError as error:  # it expires by itself anyway
                _log.warning("could not release the lock of VM %s: %s", lock.vm_uuid, error)
        self.held.clear()

    def check(self) -> None:
        """Raise :class:`LockLostError` if any held lock was lost."""
        for lock in self.held.values():
            lock.check()

    def __exit__(self, *exc: object) -> None:
        self.release()
