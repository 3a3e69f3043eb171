"""XVA writer and reader: round trips, sparseness, checksums, compression, damage, validity."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import os
import random
import subprocess
import tarfile

import pytest

from tests.conftest import require_module, require_tool
from xobackup_core.errors import FormatError
from xobackup_core.formats.xva import (
    CHUNK_SIZE,
    DiskSpec,
    OvaMetadata,
    VifSpec,
    XvaReader,
    XvaWriter,
    build_vm_metadata,
    check_xva_file,
    decode_xmlrpc_value,
    encode_xmlrpc_value,
    is_valid_xva,
    verify_xva,
    write_xva,
)

MiB = CHUNK_SIZE


def _disk(size: int, data_chunks: dict[int, bytes]) -> bytes:
    """A disk image of ``size`` bytes: zero, except the given chunks (index → content)."""
    image = bytearray(size)
    for index, content in data_chunks.items():
        image[index * MiB : index * MiB + len(content)] = content
    return bytes(image)


def _two_disk_xva(checksum: str = "xxhash") -> tuple[bytes, OvaMetadata, dict[str, bytes]]:
    rng = random.Random(7)
    first = _disk(5 * MiB + 1000, {2: rng.randbytes(MiB), 4: b"\x01" * 17})
    second = bytes(3 * MiB)  # all zero: only chunk 0 and chunk 2 are stored
    meta = build_vm_metadata(
        {"uuid": "vm-uuid", "name_label": "web", "memory_static_max": 8 * 2**30},
        [
            DiskSpec(len(first), "vdi-a", "system", userdevice="0", bootable=True),
            DiskSpec(len(second), "vdi-b", "data", userdevice="1"),
        ],
    )
    refs = [disk.ref for disk in meta.disks()]
    images = dict(zip(refs, (first, second), strict=True))
    out = io.BytesIO()
    write_xva(
        out,
        meta,
        {ref: (io.BytesIO(image), len(image)) for ref, image in images.items()},
        checksum=checksum,  # type: ignore[arg-type]
    )
    return out.getvalue(), meta, images


@pytest.mark.parametrize("checksum", ["xxhash", "sha1"])
def test_round_trip_is_bit_exact_and_omits_zero_chunks(checksum):
    require_module("xxhash")
    blob, meta, images = _two_disk_xva(checksum)
    suffix = ".xxhash" if checksum == "xxhash" else ".checksum"
    first_ref, second_ref = sorted(images)

    # An independent tar reader sees exactly the members XAPI would write.
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        names = tar.getnames()
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert names == [
        "ova.xml",
        f"{first_ref}/00000000",
        f"{first_ref}/00000000{suffix}",
        f"{first_ref}/00000002",
        f"{first_ref}/00000002{suffix}",
        f"{first_ref}/00000004",
        f"{first_ref}/00000004{suffix}",
        f"{first_ref}/00000005",
        f"{first_ref}/00000005{suffix}",
        f"{second_ref}/00000000",
        f"{second_ref}/00000000{suffix}",
        f"{second_ref}/00000002",
        f"{second_ref}/00000002{suffix}",
    ]
    chunk = members[f"{first_ref}/00000002"]
    if checksum == "xxhash":
        import xxhash

        assert (
            members[f"{first_ref}/00000002.xxhash"]
            == xxhash.xxh64_hexdigest(chunk).upper().encode()
        )
    else:
        assert members[f"{first_ref}/00000002.checksum"] == hashlib.sha1(chunk).hexdigest().encode()
    assert len(members[f"{first_ref}/00000005"]) == 1000

    # XAPI's ending: exactly two zero blocks, no 10 KiB record padding.
    assert blob.endswith(bytes(1024))
    assert len(blob) % 512 == 0
    assert not blob[:-1024].endswith(bytes(512))

    reader = XvaReader(io.BytesIO(blob))
    assert reader.metadata.to_xml() == meta.to_xml()
    seen = {}
    for disk in reader.disks():
        out = io.BytesIO()
        disk.read_into(out)
        seen[disk.ref] = out.getvalue()
    assert seen == images


def test_iterable_source_and_empty_disk():
    require_module("xxhash")
    meta = build_vm_metadata({"uuid": "v"}, [DiskSpec(0, "empty"), DiskSpec(MiB + 3, "odd")])
    empty_ref, odd_ref = (d.ref for d in meta.disks())
    odd = os.urandom(MiB + 3)
    out = io.BytesIO()
    with XvaWriter(out) as writer:
        writer.add_ova_xml(meta)
        writer.add_disk(empty_ref, io.BytesIO(b""), 0)
        writer.add_disk(odd_ref, (odd[i : i + 4099] for i in range(0, len(odd), 4099)), len(odd))
    reader = XvaReader(io.BytesIO(out.getvalue()))
    got = {d.ref: b"".join(d.iter_data()) for d in reader.disks()}
    assert got == {empty_ref: b"", odd_ref: odd}


def test_writer_refuses_disks_out_of_order_and_short_sources():
    out = io.BytesIO()
    writer = XvaWriter(out)
    writer.add_ova_xml(b"<value><struct></struct></value>")
    writer.add_disk("Ref:2", io.BytesIO(b"a" * 10), 10)
    with pytest.raises(ValueError, match="must come after"):
        writer.add_disk("Ref:10", io.BytesIO(b"a" * 10), 10)
    with pytest.raises(FormatError, match="source ended at byte 5"):
        writer.add_disk("Ref:3", io.BytesIO(b"a" * 5), 10)


def test_reader_rebuilds_offsets_from_the_sequence_with_keepalive_chunks():
    """XAPI's keep-alive writes an empty chunk and then shifts every later counter by one;
    offsets must come from the sequence, never from counter × 1 MiB (§5)."""
    xxhash = require_module("xxhash")
    a, b = os.urandom(MiB), os.urandom(MiB)
    last = os.urandom(100)
    entries = [
        ("Ref:1/00000000", a),
        ("Ref:1/00000001", b""),  # keep-alive: same offset as the next chunk
        ("Ref:1/00000002", b),  # data at offset 1 MiB
        ("Ref:1/00000005", last),  # gap of 2 chunks: offset 4 MiB
    ]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("ova.xml", b"<value><struct></struct></value>"), *entries]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if name != "ova.xml":
                digest = xxhash.xxh64_hexdigest(data).upper().encode()
                info = tarfile.TarInfo(name + ".xxhash")
                info.size = len(digest)
                tar.addfile(info, io.BytesIO(digest))
    # Python's tarfile pads to 10 KiB records: the reader accepts that too.
    reader = XvaReader(io.BytesIO(out.getvalue()))
    disk = next(reader.disks())
    chunks = [(c.offset, len(c.data)) for c in disk.chunks()]
    assert chunks == [(0, MiB), (MiB, 0), (MiB, MiB), (4 * MiB, 100)]
    reader = XvaReader(io.BytesIO(out.getvalue()))
    disk = next(reader.disks())
    assert b"".join(disk.iter_data()) == a + b + bytes(2 * MiB) + last


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_compressed_xva_is_detected_and_read(codec, tmp_path):
    require_module("xxhash")
    blob, _, images = _two_disk_xva()
    plain = tmp_path / "vm.xva"
    plain.write_bytes(blob)
    # Compress with the real command-line tools, as the host does for the whole stream.
    tool = require_tool(codec)
    subprocess.run(
        [tool, "-q", "-k", str(plain)] if codec == "zstd" else [tool, "-k", str(plain)], check=True
    )
    compressed = tmp_path / ("vm.xva.gz" if codec == "gzip" else "vm.xva.zst")
    with open(compressed, "rb") as source:
        reader = XvaReader(source)
        got = {d.ref: b"".join(d.iter_data()) for d in reader.disks()}
    assert got == images
    assert [d.virtual_size for d in reader.metadata.disks()] == [len(i) for i in images.values()]


def test_corrupted_chunk_names_the_entry():
    require_module("xxhash")
    blob, _, images = _two_disk_xva()
    first_ref = sorted(images)[0]
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
        member = tar.getmember(f"{first_ref}/00000002")
    damaged = bytearray(blob)
    damaged[member.offset_data + 12345] ^= 0x40
    with pytest.raises(FormatError, match=rf"{first_ref}/00000002.xxhash: checksum mismatch"):
        verify_xva(io.BytesIO(bytes(damaged)))
    # Without verification the same stream reads (force=true on XAPI's side).
    reader = XvaReader(io.BytesIO(bytes(damaged)), verify=False)
    reader.read_all()


def test_damaged_streams_raise_format_error():
    require_module("xxhash")
    blob, _, images = _two_disk_xva()
    first_ref = sorted(images)[0]
    with pytest.raises(FormatError, match="truncated"):
        verify_xva(io.BytesIO(blob[: len(blob) // 2]))
    with pytest.raises(FormatError, match="truncated"):
        verify_xva(io.BytesIO(blob[:-1024]))
    with pytest.raises(FormatError, match="bad tar header"):
        verify_xva(io.BytesIO(b"\x01" * 4096))
    with pytest.raises(FormatError, match=r"no ova\.xml"):
        verify_xva(io.BytesIO(bytes(1024)))
    # A chunk without its checksum member.
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for name in ("ova.xml", f"{first_ref}/00000000"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(FormatError, match=f"{first_ref}/00000000: missing checksum"):
        XvaReader(io.BytesIO(out.getvalue())).read_all()
    # ova.xml not first.
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|") as tar:
        info = tarfile.TarInfo("Ref:1/00000000")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(FormatError, match=r"expected 'ova\.xml'"):
        XvaReader(io.BytesIO(out.getvalue()))
    with pytest.raises(FormatError, match="corrupt gzip"):
        verify_xva(io.BytesIO(gzip.compress(blob)[:-20] + b"garbage-garbage-garbage"))


def test_ova_xml_encoding_follows_xapi():
    value = {
        "virtual_size": 2**40,
        "flag": True,
        "ratio": 1.5,
        "when": dt.datetime(2026, 8, 1, 4, 0, tzinfo=dt.UTC),
        "tags": ["a", "<b&c>"],
        "other_config": {"k": "v"},
    }
    xml = encode_xmlrpc_value(value)
    assert b"<value>1099511627776</value>" in xml  # int64 untyped, as XAPI emits it
    assert b"<boolean>1</boolean>" in xml
    assert b"<dateTime.iso8601>20260801T04:00:00Z</dateTime.iso8601>" in xml
    decoded = decode_xmlrpc_value(xml)
    assert decoded["virtual_size"] == str(2**40)  # untyped = string, coerced by the caller
    assert decoded["when"] == value["when"]
    assert decoded["tags"] == ["a", "<b&c>"]
    assert decoded["flag"] is True and decoded["ratio"] == 1.5
    assert decode_xmlrpc_value(b"<value><i8>5</i8></value>") == 5
    with pytest.raises(FormatError, match=r"ova\.xml: flag: bad boolean"):
        decode_xmlrpc_value(
            b"<value><struct><member><name>flag</name>"
            b"<value><boolean>yes</boolean></value></member></struct></value>"
        )
    with pytest.raises(FormatError, match="not well-formed"):
        OvaMetadata.from_xml(b"<value><struct>")
    with pytest.raises(FormatError, match="objects"):
        OvaMetadata.from_xml(encode_xmlrpc_value({"version": {}}))


def test_metadata_lists_disks_with_their_refs_and_sizes():
    meta = build_vm_metadata(
        {"uuid": "vm", "name_label": "db", "resident_on": "OpaqueRef:abc"},
        [DiskSpec(10 * 2**30, f"vdi-{i}", userdevice=str(i)) for i in range(12)],
    )
    parsed = OvaMetadata.from_xml(meta.to_xml())
    assert parsed.version.export_vsn == 2 and (
        parsed.version.xapi_major,
        parsed.version.xapi_minor,
    ) == (1, 20)
    disks = parsed.disks()
    # Zero-padded ids: lexicographic (archive) order is the disks' order.
    assert [d.vdi_uuid for d in disks] == [f"vdi-{i}" for i in range(12)]
    assert [d.ref for d in disks] == sorted(d.ref for d in disks)
    assert all(d.virtual_size == 10 * 2**30 for d in disks)
    vm = parsed.vm().snapshot
    assert vm["resident_on"] == "OpaqueRef:NULL" and vm["power_state"] == "Halted"
    assert parsed.find(disks[0].vbd_ref).snapshot["VDI"] == disks[0].ref


def test_validity_checks_of_a_stored_xva(tmp_path):
    require_module("xxhash")
    from xobackup_remote_local.remote import LocalRemote

    blob, _, _ = _two_disk_xva()
    remote = LocalRemote(tmp_path)
    remote.write_bytes("/vm/a.xva", blob)
    remote.write_bytes("/vm/truncated.xva", blob[:-512])
    remote.write_bytes("/vm/cut.xva", blob[:-700])
    remote.write_bytes("/vm/a.xva.gz", gzip.compress(blob))
    remote.write_bytes("/vm/cut.xva.gz", gzip.compress(blob)[:-3])
    assert is_valid_xva(remote, "/vm/a.xva")
    assert is_valid_xva(remote, "/vm/a.xva", expected_size=len(blob))
    assert not is_valid_xva(remote, "/vm/a.xva", expected_size=len(blob) + 1)
    assert not is_valid_xva(remote, "/vm/truncated.xva")
    assert not is_valid_xva(remote, "/vm/cut.xva")
    assert not is_valid_xva(remote, "/vm/missing.xva")
    assert is_valid_xva(remote, "/vm/a.xva.gz")
    assert not is_valid_xva(remote, "/vm/cut.xva.gz")
    with pytest.raises(FormatError, match="two zero blocks"):
        check_xva_file(lambda o, n: blob[:-512][o : o + n], len(blob) - 512)


def test_verify_checks_every_listed_disk_is_complete():
    require_module("xxhash")
    meta = build_vm_metadata({"uuid": "v"}, [DiskSpec(3 * MiB, "a"), DiskSpec(MiB, "b")])
    first, second = (d.ref for d in meta.disks())
    short = io.BytesIO()
    with XvaWriter(short) as writer:
        writer.add_ova_xml(meta)
        writer.add_disk(first, io.BytesIO(bytes(2 * MiB)), 2 * MiB)  # says 3 MiB
        writer.add_disk(second, io.BytesIO(bytes(MiB)), MiB)
    with pytest.raises(FormatError, match=f"{first}: disk data ends at byte {2 * MiB}"):
        verify_xva(io.BytesIO(short.getvalue()))
    missing = io.BytesIO()
    with XvaWriter(missing) as writer:
        writer.add_ova_xml(meta)
        writer.add_disk(first, io.BytesIO(bytes(3 * MiB)), 3 * MiB)
    with pytest.raises(FormatError, match=f"no data for disk\\(s\\) {second}"):
        verify_xva(io.BytesIO(missing.getvalue()))


def test_metadata_with_network_interfaces():
    meta = build_vm_metadata(
        {"uuid": "vm"},
        [DiskSpec(MiB, "d")],
        vifs=[
            VifSpec("0", "aa:bb:cc:00:00:01", "net-1", "LAN"),
            VifSpec("1", "aa:bb:cc:00:00:02", "net-2", "DMZ"),
            VifSpec("2", "aa:bb:cc:00:00:03", "net-1", "LAN"),
        ],
    )
    parsed = OvaMetadata.from_xml(meta.to_xml())
    vm = parsed.vm().snapshot
    vifs = [parsed.find(ref) for ref in vm["VIFs"]]
    assert [v.snapshot["MAC"] for v in vifs] == [f"aa:bb:cc:00:00:0{i}" for i in (1, 2, 3)]
    networks = [o for o in parsed.objects if o.cls == "network"]
    assert [n.snapshot["name_label"] for n in networks] == ["LAN", "DMZ"]
    lan = parsed.find(vifs[0].snapshot["network"])
    assert lan.snapshot["uuid"] == "net-1" and lan.snapshot["VIFs"] == [vifs[0].id, vifs[2].id]
    assert len({o.id for o in parsed.objects}) == len(parsed.objects)
