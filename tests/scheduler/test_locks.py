"""Per-VM locks on a real local remote: exclusive between threads and processes, expiring
after a holder is killed, kept alive by the heartbeat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from xobackup_remote_local import LocalRemote

from tests.scheduler.conftest import wait_until
from xobackup_core.errors import RemoteExistsError
from xobackup_core.remote import Remote
from xobackup_core.scheduler.locks import (
    LockLostError,
    VmLock,
    VmLockedError,
    VmLocks,
    lock_guarantee,
    lock_path,
)

VM = "7d2f3c9a-4b51-4f0e-9d8e-1a2b3c4d5e6f"

HOLDER = """
import sys, time
from xobackup_remote_local import LocalRemote
from xobackup_core.scheduler.locks import VmLock
lock = VmLock(LocalRemote(sys.argv[1]), sys.argv[2], "job nightly (pid holder)",
              ttl=float(sys.argv[3]))
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def remote(tmp_path):
    return LocalRemote(tmp_path / "remote", name="nas")


def test_a_second_holder_is_refused_with_who_holds_it(remote):
    with VmLock(remote, VM, "job nightly (run 1)", ttl=30):
        lock_file = remote.read_bytes(lock_path(VM))
        info = json.loads(lock_file)
        assert info["owner"] == "job nightly (run 1)"
        assert info["pid"] == os.getpid()
        assert info["expires"] - info["acquired"] == pytest.approx(30)
        with pytest.raises(VmLockedError) as raised:
            VmLock(remote, VM, "job weekly (run 2)").acquire()
        message = str(raised.value)
        assert f"VM {VM} on remote 'nas' is locked by job nightly (run 1)" in message
        assert "since" in message and "expires" in message
    # released: the next holder gets it, and the VM folder listing is unaffected
    assert not remote.exists(lock_path(VM))
    with VmLock(remote, VM, "job weekly (run 2)"):
        pass


def test_threads_racing_for_one_lock_hold_it_one_at_a_time(remote):
    inside = 0
    most_inside = 0
    entries = 0
    guard = threading.Lock()
    start = threading.Barrier(6)

    def contend(number: int) -> None:
        nonlocal inside, most_inside, entries
        start.wait()
        for _ in range(5):
            with VmLock(remote, VM, f"thread {number}", ttl=30, wait=30):
                with guard:
                    inside += 1
                    entries += 1
                    most_inside = max(most_inside, inside)
                time.sleep(0.005)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert entries == 30
    assert most_inside == 1


def start_holder(remote_root, ttl: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(remote_root), VM, str(ttl)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_another_process_holding_the_lock_excludes_us_until_it_is_killed(tmp_path, remote):
    holder = start_holder(tmp_path / "remote", ttl=1.5)
    try:
        with pytest.raises(
            VmLockedError, match=rf"locked by job nightly \(pid holder\) \(pid {holder.pid} "
        ):
            VmLock(remote, VM, "us").acquire()
        # the holder's heartbeat (every 0.5 s) keeps it locked well past the ttl
        time.sleep(2.0)
        with pytest.raises(VmLockedError):
            VmLock(remote, VM, "us").acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        killed_at = time.time()
        # nobody refreshes it now: it expires by itself within the ttl
        with VmLock(remote, VM, "us", wait=10) as lock:
            # within the ttl, plus the pause between two attempts (at most 2 s)
            assert time.time() - killed_at <= 1.5 + 2.5
            assert json.loads(remote.read_bytes(lock_path(VM)))["owner"] == "us"
            lock.check()
    finally:
        holder.kill()
        holder.wait()


def test_the_heartbeat_keeps_a_lock_alive_and_a_stalled_holder_loses_it(remote):
    with VmLock(remote, VM, "alive", ttl=1.0) as alive:
        time.sleep(2.2)  # more than twice the ttl
        with pytest.raises(VmLockedError):
            VmLock(remote, VM, "other").acquire()
        alive.check()
    stalled = VmLock(remote, VM, "stalled", ttl=0.5, heartbeat=3600)
    stalled.acquire()
    try:
        time.sleep(0.7)
        with VmLock(remote, VM, "successor", ttl=30):
            with pytest.raises(LockLostError, match="was lost"):
                stalled.refresh()
            assert stalled.lost
            with pytest.raises(LockLostError):
                stalled.check()
    finally:
        stalled.release()
    # the successor released its own lock; the stalled one never deleted it
    assert not remote.exists(lock_path(VM))


def test_xen_orchestra_lock_folder_is_respected(remote):
    remote.makedirs(lock_path(VM))  # proper-lockfile's folder, as XO leaves it while it holds
    with pytest.raises(VmLockedError, match="locked by Xen Orchestra"):
        VmLock(remote, VM, "us").acquire()


class _ExclusiveOnly(Remote):
    """A remote offering the optional create_exclusive extension over a local folder, and
    no ``real_path``: the lock must use the extension."""

    def __init__(self, inner: LocalRemote) -> None:
        self.inner = inner
        self.name = "exclusive"
        self.created = 0

    def create_exclusive(self, path: str, data: bytes) -> None:
        real = self.inner.real_path(path)
        os.makedirs(os.path.dirname(real), exist_ok=True)
        try:
            fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            raise RemoteExistsError("exists", remote=self.name, path=path) from None
        os.write(fd, data)
        os.close(fd)
        self.created += 1

    def open_write(self, path):
        return self.inner.open_write(path)

    def open_read(self, path, offset=0, length=None):
        return self.inner.open_read(path, offset, length)

    def list(self, path="/"):
        return self.inner.list(path)

    def stat(self, path):
        return self.inner.stat(path)

    def rename(self, source, target):
        self.inner.rename(source, target)

    def delete(self, path, *, missing_ok=False):
        self.inner.delete(path, missing_ok=missing_ok)

    def delete_tree(self, path):
        self.inner.delete_tree(path)

    def makedirs(self, path):
        self.inner.makedirs(path)


class _ReplaceOnly(_ExclusiveOnly):
    create_exclusive = None  # type: ignore[assignment]


def test_remotes_with_create_exclusive_use_it_and_others_are_best_effort(remote):
    exclusive = _ExclusiveOnly(remote)
    assert lock_guarantee(exclusive) == "exclusive"
    assert lock_guarantee(remote) == "exclusive"
    with VmLock(exclusive, VM, "first", ttl=30):
        assert exclusive.created == 1
        with pytest.raises(VmLockedError, match="locked by first"):
            VmLock(exclusive, VM, "second").acquire()
    replace_only = _ReplaceOnly(remote)
    assert lock_guarantee(replace_only) == "best-effort"
    with VmLock(replace_only, VM, "first", ttl=30):
        with pytest.raises(VmLockedError, match="locked by first"):
            VmLock(replace_only, VM, "second").acquire()
    assert not remote.exists(lock_path(VM))


def test_expired_lock_is_taken_over_once_when_many_contend(tmp_path, remote):
    holder = start_holder(tmp_path / "remote", ttl=0.5)
    holder.kill()
    holder.wait()
    wait_until(lambda: json.loads(remote.read_bytes(lock_path(VM)))["expires"] < time.time())
    winners = []
    start = threading.Barrier(5)

    def contend(number: int) -> None:
        lock = VmLock(remote, VM, f"thread {number}", ttl=30)
        start.wait()
        try:
            lock.acquire()
        except VmLockedError:
            return
        winners.append(lock)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(winners) == 1
    winners[0].release()


def test_vm_locks_over_several_remotes_report_the_refused_ones(tmp_path, remote):
    other = LocalRemote(tmp_path / "other", name="usb")
    with VmLock(other, VM, "job weekly (run 9)"):
        with VmLocks({"nas": remote, "usb": other}, VM, "job nightly (run 1)") as refused:
            assert list(refused) == ["usb"]
            assert "locked by job weekly (run 9)" in str(refused["usb"])
            assert json.loads(remote.read_bytes(lock_path(VM)))["owner"] == "job nightly (run 1)"
        assert not remote.exists(lock_path(VM))  # released on exit
        assert json.loads(other.read_bytes(lock_path(VM)))["owner"] == "job weekly (run 9)"
