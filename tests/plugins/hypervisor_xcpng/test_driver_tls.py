"""TLS: refused by default with a self-signed certificate, accepted when told how to trust it.

The simulator speaks plain HTTP, so the tests put a real TLS terminator in front of it (Python's
``ssl`` module with a self-signed certificate made by ``cryptography``), as stunnel would.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from xobackup_hypervisor_xcpng.driver import XapiDriver
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.conftest import require_module
from tests.plugins.hypervisor_xcpng.test_driver_helpers import (
    first_disk,
    halted_vm,
    server_config,
)
from xobackup_core.errors import HypervisorError


def _self_signed(folder: Path) -> tuple[Path, Path, str]:
    require_module("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xcp-host.local")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "host.pem", folder / "host.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return cert_file, key_file, fingerprint


class TlsTerminator:
    """Accept TLS on a loopback port and relay each connection to a plain HTTP server."""

    def __init__(self, cert: Path, key: Path, backend: tuple[str, int]) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.backend = backend
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()  # the client refused our certificate: that is the point of a test
            return
        upstream = socket.create_connection(self.backend)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(1 << 20):
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.stopping = True
        self.listener.close()


@pytest.fixture
def tls(xapi_sim: Simulator, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    cert, key, fingerprint = _self_signed(tmp_path)
    address, port = xapi_sim.pool(0).listeners[0].server_address[:2]
    terminator = TlsTerminator(cert, key, (address, port))
    yield f"https://127.0.0.1:{terminator.port}", cert, fingerprint
    terminator.close()


def _works(driver: XapiDriver, sim: Simulator) -> None:
    try:
        assert driver.inventory().pools[0].uuid == sim.pool(0).uuid
        vdi = first_disk(sim, halted_vm(sim))
        with driver.export_disk(vdi) as stream:
            data = stream.read()
        assert data[:8] == b"conectix" and stream.check.problem() is None  # type: ignore[attr-defined]
    finally:
        driver.close()


def test_self_signed_certificate_is_refused_by_default(
    xapi_sim: Simulator, tls: tuple[str, Path, str]
) -> None:
    url, _, fingerprint = tls
    with pytest.raises(HypervisorError, match="certificate is not trusted") as caught:
        XapiDriver(server_config(xapi_sim, url=url))
    assert caught.value.code == "CERTIFICATE_UNTRUSTED"
    # the message names the certificate's fingerprint so the user can pin it
    assert fingerprint[:8].upper() in str(caught.value).replace(":", "")


def test_allow_unauthorized_accepts_it(xapi_sim: Simulator, tls: tuple[str, Path, str]) -> None:
    url, _, _ = tls
    _works(XapiDriver(server_config(xapi_sim, url=url, allow_unauthorized=True)), xapi_sim)


def test_the_right_fingerprint_accepts_it(xapi_sim: Simulator, tls: tuple[str, Path, str]) -> None:
    url, _, fingerprint = tls
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    _works(XapiDriver(server_config(xapi_sim, url=url, fingerprint=colons)), xapi_sim)


def test_a_wrong_fingerprint_is_refused(xapi_sim: Simulator, tls: tuple[str, Path, str]) -> None:
    url, _, fingerprint = tls
    wrong = ("0" if fingerprint[0] != "0" else "1") + fingerprint[1:]
    with pytest.raises(HypervisorError, match="fingerprint") as caught:
        XapiDriver(server_config(xapi_sim, url=url, fingerprint=wrong))
    assert caught.value.code == "CERTIFICATE_MISMATCH"


def test_a_malformed_fingerprint_is_a_clear_error(
    xapi_sim: Simulator, tls: tuple[str, Path, str]
) -> None:
    url, _, _ = tls
    with pytest.raises(HypervisorError, match="not a SHA-256 fingerprint"):
        XapiDriver(server_config(xapi_sim, url=url, fingerprint="abc"))


def test_ca_file_accepts_it(xapi_sim: Simulator, tls: tuple[str, Path, str]) -> None:
    url, cert, _ = tls
    _works(XapiDriver(server_config(xapi_sim, url=url, ca_file=str(cert))), xapi_sim)
