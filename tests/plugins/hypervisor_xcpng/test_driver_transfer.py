"""Disk and VM transfers through the driver, checked with independent readers.

Full VHD exports are read back with ``qemu-img``, delta VHDs with libvhdi (``pyvhdi``) on top
of their base, XVAs with the core XVA reader (checksums verified); imports are compared with
the simulator's VDI content.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

import pytest
from xobackup_hypervisor_xcpng.driver import XapiDriver
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.conftest import require_module, require_tool
from tests.plugins.hypervisor_xcpng.test_driver_helpers import (
    first_disk,
    halted_vm,
    make_driver,
    running_vm,
    sim_exists,
    sim_record,
)
from xobackup_core.errors import HypervisorError
from xobackup_core.formats.vhd_structs import (
    FOOTER_SIZE,
    HEADER_SIZE,
    build_header,
    parse_footer,
    parse_header,
)
from xobackup_core.formats.xva import XvaReader

MiB = 1024 * 1024


@pytest.fixture
def driver(xapi_sim: Simulator):  # type: ignore[no-untyped-def]
    driver = make_driver(xapi_sim)
    yield driver
    driver.close()


def _download(stream: io.RawIOBase, path: Path) -> Path:
    with stream, open(path, "wb") as out:
        while chunk := stream.read(4 * MiB):
            out.write(chunk)
    return path


def _qemu_raw(vhd: Path, out: Path) -> bytes:
    qemu_img = require_tool("qemu-img")
    subprocess.run(
        [
            qemu_img,
            "convert",
            "--image-opts",
            f"driver=vpc,force_size_calc=current_size,file.filename={vhd}",
            "-O",
            "raw",
            str(out),
        ],
        check=True,
    )
    return out.read_bytes()


def test_full_vhd_export_is_bit_exact(
    xapi_sim: Simulator, driver: XapiDriver, tmp_path: Path
) -> None:
    vdi = first_disk(xapi_sim, halted_vm(xapi_sim))
    xapi_sim.write(vdi, 5 * MiB + 512, b"written by the guest" * 1000)
    size = sim_record(xapi_sim, "VDI", vdi)["virtual_size"]
    stream = driver.export_disk(vdi)
    vhd = _download(stream, tmp_path / "full.vhd")
    assert stream.bytes_read == vhd.stat().st_size
    assert parse_footer(vhd.read_bytes()[-FOOTER_SIZE:]).disk_type == 3
    assert _qemu_raw(vhd, tmp_path / "full.raw") == xapi_sim.read(vdi, 0, size)


def test_raw_export_is_the_disk(xapi_sim: Simulator, driver: XapiDriver) -> None:
    vdi = first_disk(xapi_sim, halted_vm(xapi_sim))
    size = sim_record(xapi_sim, "VDI", vdi)["virtual_size"]
    with driver.export_disk(vdi, format="raw") as stream:
        digest = hashlib.sha256()
        while chunk := stream.read(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(xapi_sim.read(vdi, 0, size)).hexdigest()


def _relink(delta: Path, base: Path) -> None:
    """Point the delta's header at the base file, as the engine does when storing a chain."""
    base_uuid = parse_footer(base.read_bytes()[:FOOTER_SIZE]).uuid
    with open(delta, "r+b") as out:
        footer = parse_footer(out.read(FOOTER_SIZE))
        out.seek(footer.data_offset)
        header = parse_header(out.read(HEADER_SIZE))
        out.seek(footer.data_offset)
        out.write(build_header(header.replace(parent_uuid=base_uuid)))


def test_delta_export_applies_on_its_base(
    xapi_sim: Simulator, driver: XapiDriver, tmp_path: Path
) -> None:
    pyvhdi = require_module("pyvhdi")
    vm = running_vm(xapi_sim)
    base = driver.snapshot(vm, "base")
    live = first_disk(xapi_sim, vm)
    changed = xapi_sim.randomize_blocks(live, 0.1, seed=7)
    xapi_sim.write(live, 3 * MiB + 4096, b"small guest write")
    newer = driver.snapshot(vm, "newer")
    base_vdi, new_vdi = base.disks[0].vdi_uuid, newer.disks[0].vdi_uuid
    base_file = _download(driver.export_disk(base_vdi), tmp_path / "base.vhd")
    delta = driver.export_disk(new_vdi, base_vdi_uuid=base_vdi)
    delta_file = _download(delta, tmp_path / "delta.vhd")
    assert parse_footer(delta_file.read_bytes()[-FOOTER_SIZE:]).disk_type == 4
    # a delta carries whole 2 MiB blocks: the changed ones and the one written in
    blocks = (delta_file.stat().st_size - 2048) // (512 + 2 * MiB)
    assert blocks == len(set(changed) | {1})
    _relink(delta_file, base_file)

    parent, child = pyvhdi.file(), pyvhdi.file()  # type: ignore[attr-defined]
    parent.open(str(base_file))
    child.open(str(delta_file))
    child.set_parent(parent)
    size = sim_record(xapi_sim, "VDI", new_vdi)["virtual_size"]
    assert child.get_media_size() == size
    assert child.read_buffer_at_offset(size, 0) == xapi_sim.read(new_vdi, 0, size)
    assert xapi_sim.read(new_vdi, 0, size) != xapi_sim.read(base_vdi, 0, size)
    child.close()
    parent.close()


def test_delta_needs_vhd(xapi_sim: Simulator, driver: XapiDriver) -> None:
    vdi = first_disk(xapi_sim, halted_vm(xapi_sim))
    with pytest.raises(HypervisorError, match="format 'vhd'"):
        driver.export_disk(vdi, base_vdi_uuid=vdi, format="raw")


def _xva_disks(stream: io.RawIOBase) -> tuple[dict[str, bytes], str]:
    with stream:
        reader = XvaReader(stream, name="export")  # type: ignore[arg-type]
        vm_name = reader.metadata.vm().snapshot["name_label"]
        disks = {}
        for disk in reader.disks():
            info = disk.info
            assert info is not None
            out = io.BytesIO()
            disk.read_into(out, info.virtual_size)
            disks[info.vdi_uuid] = out.getvalue()
        # the archive is complete: reading on gives the end and a settled task
        assert stream.read(1) == b""
    return disks, vm_name


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_xva_export_round_trips_through_the_xva_reader(
    xapi_sim: Simulator, driver: XapiDriver, compression: str
) -> None:
    vm = running_vm(xapi_sim)
    snapshot = driver.snapshot(vm, "for export")
    stream = driver.export_vm(snapshot.uuid, compression=compression)  # type: ignore[arg-type]
    disks, vm_name = _xva_disks(stream)
    assert vm_name == "for export"
    vdi = snapshot.disks[0].vdi_uuid
    size = snapshot.disks[0].virtual_size
    assert disks[vdi] == xapi_sim.read(vdi, 0, size)
    assert stream.check.compression == compression  # type: ignore[attr-defined]


def test_zstd_on_citrix_is_refused(tmp_path: Path) -> None:
    with Simulator(vms=2, hosts=1, flavour="citrix", disk_size=8 * MiB, data_dir=tmp_path) as sim:
        driver = make_driver(sim)
        try:
            vm = halted_vm(sim)
            with pytest.raises(HypervisorError, match="zstd") as caught:
                driver.export_vm(vm, compression="zstd")
            assert caught.value.code == "ZSTD_NOT_SUPPORTED"
            with driver.export_vm(vm, compression="gzip") as stream:
                assert stream.read(2) == b"\x1f\x8b"
        finally:
            driver.close()


def _sr_uuid(sim: Simulator, name: str) -> str:
    return next(
        r["uuid"] for r in sim.pool(0).xapi.db.tables["SR"].values() if r["name_label"] == name
    )


@pytest.mark.parametrize("known_size", [True, False])
def test_import_vm_round_trip(
    xapi_sim: Simulator, driver: XapiDriver, tmp_path: Path, known_size: bool
) -> None:
    vm = halted_vm(xapi_sim)
    source = first_disk(xapi_sim, vm)
    xva = _download(driver.export_vm(vm), tmp_path / "vm.xva")
    sr = _sr_uuid(xapi_sim, "Shared storage")
    with open(xva, "rb") as stream:
        body = stream if known_size else io.BufferedReader(_Pipe(stream))  # type: ignore[arg-type]
        new_vm = driver.import_vm(body, sr_uuid=sr)
    assert new_vm != vm
    db = xapi_sim.pool(0).xapi.db
    vbds = sim_record(xapi_sim, "VM", new_vm)["VBDs"]
    disks = [db.record("VBD", v)["VDI"] for v in vbds if db.record("VBD", v)["type"] == "Disk"]
    (new_vdi,) = disks
    record = db.record("VDI", new_vdi)
    assert db.record("SR", record["SR"])["uuid"] == sr
    size = record["virtual_size"]
    assert xapi_sim.read(record["uuid"], 0, size) == xapi_sim.read(source, 0, size)


class _Pipe(io.RawIOBase):
    """A stream without a known length (like a pipe from another export)."""

    def __init__(self, inner: io.BufferedReader) -> None:
        self.inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@pytest.mark.parametrize("fmt", ["vhd", "raw"])
@pytest.mark.parametrize("sr_name", ["Shared storage", "Local storage"])
def test_import_disk_round_trip(
    xapi_sim: Simulator, driver: XapiDriver, tmp_path: Path, fmt: str, sr_name: str
) -> None:
    source = first_disk(xapi_sim, halted_vm(xapi_sim))
    size = sim_record(xapi_sim, "VDI", source)["virtual_size"]
    image = _download(driver.export_disk(source, format=fmt), tmp_path / f"disk.{fmt}")  # type: ignore[arg-type]
    # every host has a "Local storage": the last one is on a pool member (served there)
    local = [
        r["uuid"]
        for r in xapi_sim.pool(0).xapi.db.tables["SR"].values()
        if r["name_label"] == sr_name
    ][-1]
    target = driver.create_disk(sr_uuid=local, name="restored", virtual_size=size)
    assert sim_record(xapi_sim, "VDI", target)["virtual_size"] == size
    with open(image, "rb") as stream:
        body = stream if fmt == "raw" else io.BufferedReader(_Pipe(stream))  # type: ignore[arg-type]
        driver.import_disk(target, body, format=fmt)  # type: ignore[arg-type]
    assert xapi_sim.read(target, 0, size) == xapi_sim.read(source, 0, size)


def test_import_disk_stops_on_short_data(xapi_sim: Simulator, driver: XapiDriver) -> None:
    sr = _sr_uuid(xapi_sim, "Shared storage")
    target = driver.create_disk(sr_uuid=sr, name="short", virtual_size=8 * MiB)
    with pytest.raises(HypervisorError, match="ended after"):
        driver.import_disk(target, io.BytesIO(b"x" * MiB), format="raw", size=8 * MiB)


def _restore_inputs(driver: XapiDriver, sim: Simulator, tmp_path: Path) -> tuple:
    vm = running_vm(sim)
    checkpoint = driver.snapshot(vm, "memory backup", memory=True)
    metadata = {"vm": dict(checkpoint.record), **driver.vm_devices(checkpoint.uuid)}
    return checkpoint, metadata


def test_create_suspended_vm_on_xcpng(
    xapi_sim: Simulator, driver: XapiDriver, tmp_path: Path
) -> None:
    checkpoint, metadata = _restore_inputs(driver, xapi_sim, tmp_path)
    sr = _sr_uuid(xapi_sim, "Shared storage")
    disks = {}
    for disk in checkpoint.disks:
        target = driver.create_disk(sr_uuid=sr, name=disk.name, virtual_size=disk.virtual_size)
        image = _download(driver.export_disk(disk.vdi_uuid), tmp_path / "d.vhd")
        with open(image, "rb") as stream:
            driver.import_disk(target, stream)
        disks[disk.vdi_uuid] = target
    memory = checkpoint.suspend_vdi_uuid
    assert memory is not None
    memory_size = sim_record(xapi_sim, "VDI", memory)["virtual_size"]
    suspend = driver.create_disk(
        sr_uuid=sr, name="memory", virtual_size=memory_size, vdi_type="suspend"
    )
    # the memory image goes straight from one handler to the other (a pipe: length unknown)
    with driver.export_disk(memory) as stream:
        driver.import_disk(suspend, stream)  # type: ignore[arg-type]
    restored = driver.create_vm(metadata, sr_uuid=sr, disks=disks, suspend_vdi_uuid=suspend)
    record = sim_record(xapi_sim, "VM", restored)
    assert record["power_state"] == "Suspended"
    assert sim_record(xapi_sim, "VDI", suspend)["uuid"] == suspend
    assert xapi_sim.pool(0).xapi.db.record("VDI", record["suspend_VDI"])["uuid"] == suspend
    assert record["last_boot_CPU_flags"] == dict(checkpoint.last_boot_cpu_flags)
    assert record["last_boot_CPU_flags"]["vendor"] == "GenuineIntel"
    assert not record["is_a_template"] and not record["is_a_snapshot"]
    vm = driver.vm(restored)
    assert [d.vdi_uuid for d in vm.disks] == list(disks.values())
    assert [d.device for d in vm.disks] == [d.device for d in checkpoint.disks]
    assert len(record["VIFs"]) == len(metadata["vifs"])
    # the memory image is sparse: compare the blocks either side holds (the rest is zeros)
    source, copy = xapi_sim.vdi_data(memory), xapi_sim.vdi_data(suspend)
    held = set(source.allocated()) | set(copy.allocated())
    assert held and all(source.read_block(b) == copy.read_block(b) for b in held)
    # the restored VM resumes where the host's CPU allows it
    driver.call("VM.resume", driver._ref("VM", restored), False, False)
    assert sim_record(xapi_sim, "VM", restored)["power_state"] == "Running"


def test_create_suspended_vm_is_refused_on_citrix(tmp_path: Path) -> None:
    with Simulator(vms=2, hosts=1, flavour="citrix", disk_size=8 * MiB, data_dir=tmp_path) as sim:
        driver = make_driver(sim)
        try:
            checkpoint, metadata = _restore_inputs(driver, sim, tmp_path)
            before = len(sim.pool(0).xapi.db.tables["VM"])
            with pytest.raises(HypervisorError, match="cannot create a Suspended VM") as caught:
                driver.create_vm(
                    metadata,
                    sr_uuid=_sr_uuid(sim, "Shared storage"),
                    disks={},
                    suspend_vdi_uuid=checkpoint.suspend_vdi_uuid,
                )
            assert caught.value.code == "SUSPENDED_VM_NOT_SUPPORTED"
            assert len(sim.pool(0).xapi.db.tables["VM"]) == before
            # without the memory image the same restore works (Halted)
            halted = driver.create_vm(metadata, sr_uuid=_sr_uuid(sim, "Shared storage"), disks={})
            assert sim_record(sim, "VM", halted)["power_state"] == "Halted"
            assert sim_exists(sim, "VM", halted)
        finally:
            driver.close()


def test_download_follows_a_redirect_to_the_host_that_sees_the_sr(
    xapi_sim: Simulator, driver: XapiDriver
) -> None:
    from xobackup_hypervisor_xcpng.driver_http import RawCheck, XapiDownload

    member_sr = [
        r["uuid"]
        for r in xapi_sim.pool(0).xapi.db.tables["SR"].values()
        if r["name_label"] == "Local storage"
    ][-1]
    vdi = driver.create_disk(sr_uuid=member_sr, name="on a member", virtual_size=4 * MiB)
    xapi_sim.write(vdi, MiB, b"only on the member" * 100)
    # asked of the master, which cannot see that SR: XAPI answers 302 to the member (§4.1)
    stream = XapiDownload(
        driver.session,
        "/export_raw_vdi",
        {"vdi": driver._ref("VDI", vdi), "format": "raw"},
        what="redirected export",
        check=RawCheck(4 * MiB),
    )
    with stream:
        data = stream.read()
    assert data == xapi_sim.read(vdi, 0, 4 * MiB)
