"""A throwaway OpenSSH ``sshd`` serving SFTP on 127.0.0.1, for tests and benchmarks.

Host keys, client key, ``authorized_keys``, config, pid file and log live in one temp folder;
nothing under /etc is read or written except that a no-login-shell test user is created once
(``useradd``) and given a password (``chpasswd``), because password authentication checks the
system's user database. Traps this code handles:

* sshd must be started by its absolute path and refuses to start without ``/run/sshd``;
* ``StrictModes no``: the temp folder's ownership would fail sshd's checks otherwise;
* the test user must traverse every parent of the server folder (pytest's tmp_path is 0700),
  so :meth:`SftpServer.create` makes its folder under the system temp dir;
* each client session runs in its own child process, so killing the listener alone does not
  cut transfers in progress: :meth:`SftpServer.stop` kills the whole process group.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers.base import ServerProcess, free_port

SFTP_USER = "xobsftptest"
SFTP_PASSWORD = "S3cret-sftp-Pa55"
SSHD = "/usr/sbin/sshd"


def available() -> bool:
    """True when sshd and ssh-keygen are installed and we may create the test user (root)."""
    return os.path.exists(SSHD) and shutil.which("ssh-keygen") is not None and os.geteuid() == 0


def _ensure_unix_user(name: str, password: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "-M", "-N", "-s", "/bin/sh", name], check=True, capture_output=True
        )
    subprocess.run(
        ["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True
    )


def _keygen(path: Path) -> None:
    if not path.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "xobackup-test", "-f", str(path)],
            check=True,
            capture_output=True,
        )


def public_key_fingerprint(public_key_line: str) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key line, as ``ssh-keygen -lf`` prints it."""
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _wait_for_banner(port: int, process: ServerProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise RuntimeError(f"sshd exited early:\n{process.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(7) == b"SSH-2.0":
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"sshd did not answer on 127.0.0.1:{port}:\n{process.log_tail()}")


@dataclass
class SftpServer:
    """One sshd with internal-sftp, user :data:`SFTP_USER`, data under ``root/data``."""

    root: Path
    port: int = 0
    user: str = SFTP_USER
    password: str = SFTP_PASSWORD
    process: ServerProcess | None = field(default=None, repr=False)
    owns_root: bool = False

    @classmethod
    def create(cls) -> SftpServer:
        """A server in a fresh world-traversable temp folder, removed again by :meth:`stop`."""
        return cls(Path(tempfile.mkdtemp(prefix="xobackup-sshd-")), owns_root=True)

    @property
    def data_dir(self) -> Path:
        """A folder the test user owns: put remotes under it."""
        return self.root / "data"

    @property
    def client_key(self) -> Path:
        """Private key accepted for :data:`SFTP_USER` (no passphrase)."""
        return self.root / "client_ed25519"

    @property
    def host_key_line(self) -> str:
        return (self.root / "ssh_host_ed25519_key.pub").read_text().strip()

    @property
    def host_key_fingerprint(self) -> str:
        """The server's host key as ``SHA256:...``."""
        return public_key_fingerprint(self.host_key_line)

    @property
    def known_hosts(self) -> Path:
        """A known_hosts file holding this server's key under ``[127.0.0.1]:port``."""
        path = self.root / "known_hosts"
        key_type, key = self.host_key_line.split()[:2]
        path.write_text(f"[127.0.0.1]:{self.port} {key_type} {key}\n")
        return path

    def url(self, path: str = "") -> str:
        """``sftp://user@127.0.0.1:port/<data dir>/<path>``."""
        target = f"{self.data_dir}/{path.strip('/')}".rstrip("/")
        return f"sftp://{self.user}@127.0.0.1:{self.port}{target}"

    def start(self) -> SftpServer:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        _ensure_unix_user(self.user, self.password)
        self.data_dir.mkdir(exist_ok=True)
        user = pwd.getpwnam(self.user)
        os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        _keygen(self.root / "ssh_host_ed25519_key")
        _keygen(self.client_key)
        shutil.copy(self.root / "client_ed25519.pub", self.root / "authorized_keys")
        os.chmod(self.root / "authorized_keys", 0o644)
        if not self.port:
            self.port = free_port()
        config = self.root / "sshd_config"
        config.write_text(
            f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.root}/ssh_host_ed25519_key
PidFile {self.root}/sshd.pid
AuthorizedKeysFile {self.root}/authorized_keys
StrictModes no
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
PermitRootLogin no
AllowUsers {self.user}
UseDNS no
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
MaxStartups 100
MaxSessions 100
Subsystem sftp internal-sftp
"""
        )
        subprocess.run([SSHD, "-t", "-f", str(config)], check=True, capture_output=True)
        self.process = ServerProcess(
            [SSHD, "-D", "-e", "-f", str(config)], log=self.root / "sshd.log"
        )
        _wait_for_banner(self.port, self.process)
        return self

    def kill_sessions(self) -> int:
        """SIGKILL every client session (sshd's children, which lead their own sessions).

        The listener keeps running. Returns how many processes were killed.
        """
        if self.process is None:
            return 0
        victims = _descendants(self.process.pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(victims)

    def stop_keep_files(self) -> None:
        """Stop sessions and listener but keep the folder, so :meth:`start` can resume it."""
        if self.process is not None:
            self.kill_sessions()
            self.process.stop()
            self.process = None

    def stop(self) -> None:
        """Stop every session, then the listener (by PID)."""
        if self.process is not None:
            self.kill_sessions()
            self.process.stop()
            self.process = None
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _descendants(root_pid: int) -> list[int]:
    """PIDs of every process descended from ``root_pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    pending = [root_pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found
