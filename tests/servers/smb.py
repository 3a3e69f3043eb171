"""A throwaway Samba ``smbd`` on 127.0.0.1 for tests and benchmarks.

Everything (config, passdb, locks, logs, the shared folder) lives in one temp folder; nothing
under /etc or /var is read or written. Two traps shape this code:

* on SIGTERM smbd signals its whole process group, so it must lead its own session
  (``start_new_session=True``) or stopping it would kill the test runner; and inside its own
  session it must be told ``--no-process-group`` because its own ``setsid()`` would fail;
* ``smbpasswd`` only adds users that exist in ``/etc/passwd``, so a no-login system user is
  created once (``useradd``), while its SMB password lives in the private tdbsam file.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers.base import ServerProcess, free_port, wait_for_port

SMB_USER = "xobsmbtest"
SMB_PASSWORD = "S3cret-smb-Pa55"
SHARE = "backup"


def _smbd() -> str | None:
    return shutil.which("smbd") or ("/usr/sbin/smbd" if os.path.exists("/usr/sbin/smbd") else None)


def available() -> bool:
    """True when smbd and smbpasswd are installed and we can create the test user."""
    return _smbd() is not None and shutil.which("smbpasswd") is not None and os.geteuid() == 0


def _ensure_unix_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )


@dataclass
class SmbServer:
    """One smbd serving share ``backup`` from ``root/share`` to :data:`SMB_USER`."""

    root: Path
    port: int = 0
    encrypt: str = "default"
    """Samba's ``server smb encrypt``: default, desired, required or off."""
    user: str = SMB_USER
    password: str = SMB_PASSWORD
    share: str = SHARE
    process: ServerProcess | None = field(default=None, repr=False)

    @property
    def share_dir(self) -> Path:
        """The folder behind the share, on the local disk (for independent checks)."""
        return self.root / "share"

    @property
    def config(self) -> Path:
        return self.root / "smb.conf"

    def url(self, sub: str = "") -> str:
        """``smb://user@127.0.0.1:port/backup/<sub>`` (no password in it)."""
        tail = f"/{sub.strip('/')}" if sub.strip("/") else ""
        return f"smb://{self.user}@127.0.0.1:{self.port}/{self.share}{tail}"

    def _write_config(self) -> None:
        d = self.root
        self.config.write_text(
            f"""[global]
  server role = standalone server
  workgroup = WORKGROUP
  netbios name = XOBTESTSMB
  interfaces = 127.0.0.1
  bind interfaces only = yes
  smb ports = {self.port}
  disable netbios = yes
  server min protocol = SMB2_10
  server smb encrypt = {self.encrypt}
  server signing = auto
  passdb backend = tdbsam:{d}/private/passdb.tdb
  private dir = {d}/private
  lock directory = {d}/lock
  state directory = {d}/state
  cache directory = {d}/cache
  pid directory = {d}/pid
  ncalrpc dir = {d}/ncalrpc
  log file = {d}/log/smbd.log
  log level = 1
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
  map to guest = never
  usershare path =
  hostname lookups = no

[{self.share}]
  path = {self.share_dir}
  read only = no
  valid users = {self.user}
  # the temp folders above the share are root-only (0700), so file access runs as root
  force user = root
  create mask = 0644
  directory mask = 0755
"""
        )

    def start(self) -> SmbServer:
        """Write the config, set the password, start smbd and wait until it listens."""
        smbd = _smbd()
        if smbd is None:
            raise RuntimeError("smbd is not installed")
        for sub in ("share", "private", "lock", "state", "cache", "pid", "log", "ncalrpc"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        _ensure_unix_user(self.user)
        if not self.port:
            self.port = free_port()
        self._write_config()
        subprocess.run(
            ["smbpasswd", "-c", str(self.config), "-s", "-a", self.user],
            input=f"{self.password}\n{self.password}\n",
            text=True,
            check=True,
            capture_output=True,
        )
        self.process = ServerProcess(
            [smbd, "-F", "--no-process-group", "-s", str(self.config)],
            log=self.root / "log" / "stdout.log",
        )
        try:
            wait_for_port(self.port, timeout=20, process=self.process.process)
        except Exception as error:
            self.process.stop()
            raise RuntimeError(f"smbd did not start: {error}\n{self.process.log_tail()}") from None
        return self

    def stop(self) -> None:
        """Stop smbd by PID (its helper children exit with it)."""
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self) -> None:
        """Start again on the same port with the same data."""
        self.stop()
        self.start()

    def __enter__(self) -> SmbServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
