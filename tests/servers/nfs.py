"""A throwaway nfs-ganesha (FSAL_VFS) NFSv3 server for tests and benchmarks.

NFSv3 needs rpcbind, and Debian's rpcbind cannot be limited to loopback (``-h`` crashes), so
rpcbind and ganesha run inside a private network namespace that has only ``lo``: nothing
listens in the host's namespace. A client joins that namespace for the current thread only
(:meth:`NfsServer.joined`; a network namespace is per thread), or runs a command through
``nsenter`` (:meth:`NfsServer.client_argv`).

Inside that namespace glibc cannot resolve ``Bind_addr = 127.0.0.1`` (AI_ADDRCONFIG ignores
loopback), so no bind address is set: the namespace itself confines the server to ``lo``.
rpcbind's unix socket ``/run/rpcbind.sock`` is global, so only one such server runs at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers.base import ServerProcess

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_RPCBIND_FILES = ("/run/rpcbind.sock", "/run/rpcbind.lock")


def available() -> bool:
    """True when ganesha, rpcbind, unshare and nsenter are installed and we are root."""
    tools = ("ganesha.nfsd", "rpcbind", "unshare", "nsenter")
    return os.geteuid() == 0 and all(
        shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in tools
    )


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setns: {os.strerror(error)}")


@dataclass
class NfsServer:
    """ganesha exporting ``root/export`` (and optional extra folders) over NFSv3 and v4."""

    root: Path
    port: int = 2049
    """Port inside the private namespace (it is private, so the standard port is free)."""
    extra_exports: dict[str, Path] = field(default_factory=dict)
    """More exports: NFSv4 pseudo path -> local folder (e.g. a small loop-mounted disk)."""
    _holder: ServerProcess | None = field(default=None, repr=False)
    _rpcbind: ServerProcess | None = field(default=None, repr=False)
    _ganesha: ServerProcess | None = field(default=None, repr=False)

    @property
    def export_dir(self) -> Path:
        """The exported folder on the local disk (also the NFSv3 mount path)."""
        return self.root / "export"

    @property
    def netns(self) -> str:
        """Path of the private network namespace the server runs in."""
        assert self._holder is not None, "server not started"
        return f"/proc/{self._holder.pid}/ns/net"

    def url(self, sub: str = "", export: Path | None = None) -> str:
        """``nfs://127.0.0.1/<export path>/<sub>`` (reachable from inside :attr:`netns`)."""
        base = str(export or self.export_dir)
        tail = f"/{sub.strip('/')}" if sub.strip("/") else ""
        return f"nfs://127.0.0.1{base}{tail}"

    def _config(self) -> str:
        exports = {"/export": self.export_dir, **self.extra_exports}
        blocks = []
        for number, (pseudo, path) in enumerate(exports.items(), start=1):
            blocks.append(
                f"""EXPORT {{
    Export_Id = {number};
    Path = {path};
    Pseudo = {pseudo};
    Protocols = 3, 4;
    Transports = TCP;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
"""
            )
        return f"""NFS_CORE_PARAM {{
    NFS_Port = {self.port};
    MNT_Port = {self.port + 1};
    NLM_Port = {self.port + 2};
    Rquota_Port = {self.port + 3};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Protocols = 3, 4;
}}
NFSV4 {{
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = {self.root}/recov;
    Allow_Numeric_Owners = true;
    Only_Numeric_Owners = true;
}}
{"".join(blocks)}
LOG {{ Default_Log_Level = EVENT; }}
"""

    def start(self) -> NfsServer:
        """Create the namespace, start rpcbind and ganesha in it, wait until ganesha is up."""
        self.export_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "recov").mkdir(exist_ok=True)
        if self._holder is None:
            self._holder = ServerProcess(
                [_tool("unshare"), "--net", "sleep", "infinity"], log=self.root / "holder.log"
            )
            own = os.readlink("/proc/self/ns/net")
            for _ in range(100):
                with contextlib.suppress(OSError):
                    if os.readlink(self.netns) != own:
                        break
                time.sleep(0.02)
            self._bring_loopback_up()
        if self._rpcbind is None:
            for stale in _RPCBIND_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
            self._rpcbind = ServerProcess(
                [_tool("nsenter"), f"--net={self.netns}", _tool("rpcbind"), "-f", "-w"],
                log=self.root / "rpcbind.log",
            )
            deadline = time.monotonic() + 5
            while not os.path.exists(_RPCBIND_FILES[0]):
                if time.monotonic() > deadline or self._rpcbind.process.poll() is not None:
                    raise RuntimeError(f"rpcbind did not start: {self._rpcbind.log_tail()}")
                time.sleep(0.02)
        conf = self.root / "ganesha.conf"
        conf.write_text(self._config())
        log = self.root / "ganesha.log"
        offset = log.stat().st_size if log.exists() else 0
        self._ganesha = ServerProcess(
            [
                _tool("nsenter"),
                f"--net={self.netns}",
                _tool("ganesha.nfsd"),
                "-F",
                "-f",
                str(conf),
                "-L",
                str(log),
                "-p",
                str(self.root / "ganesha.pid"),
            ],
            log=self.root / "ganesha.out",
        )
        deadline = time.monotonic() + 30
        while True:
            if log.exists():
                with log.open("rb") as handle:
                    handle.seek(offset)
                    if b"NFS SERVER INITIALIZED" in handle.read():
                        return self
            if self._ganesha.process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"ganesha did not start:\n{tail}")
            time.sleep(0.05)

    def stop_nfs(self) -> None:
        """Stop ganesha only (rpcbind and the namespace stay, so :meth:`start` resumes)."""
        if self._ganesha is not None:
            self._ganesha.stop(timeout=15)
            self._ganesha = None

    def stop(self) -> None:
        """Stop ganesha, rpcbind and the namespace holder, each by PID."""
        self.stop_nfs()
        for name in ("_rpcbind", "_holder"):
            process = getattr(self, name)
            if process is not None:
                process.stop()
                setattr(self, name, None)
        for stale in _RPCBIND_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)

    def _bring_loopback_up(self) -> None:
        """``ip link set lo up`` in the namespace, with two ioctls (no iproute2 needed)."""
        error: list[BaseException] = []

        def run() -> None:
            try:
                with self.joined(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    request = struct.pack("16sH22x", b"lo", 0)
                    flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
                    fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
            except BaseException as failure:
                error.append(failure)

        # In a thread of its own, so that no thread of the caller changes namespace.
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if error:
            raise RuntimeError(f"cannot bring up lo in the NFS namespace: {error[0]}")

    def client_argv(self, argv: list[str]) -> list[str]:
        """``argv`` wrapped to run inside the server's network namespace."""
        return [_tool("nsenter"), f"--net={self.netns}", *argv]

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """Run the current thread inside the server's namespace (sockets opened here stay in it).

        Threads started meanwhile inherit the namespace; on exit the thread returns home.
        """
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.netns, os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)

    def __enter__(self) -> NfsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
