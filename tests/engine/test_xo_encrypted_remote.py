"""Encrypted remotes written by Xen Orchestra itself, and ours that XO can read.

``tests/fixtures/xo_encrypted_remote/remote.tar.xz`` was written by XO's own backup code with
an ``encryptionKey`` (chacha20-poly1305): a VhdDirectory delta chain of two runs and a full XVA;
``xo_encrypted_remote_aes`` is the same delta chain on a legacy aes-256-gcm remote (see
``tests/fixtures/xo_remote_generator/README.md``). ``expected.json`` holds the key and what each
backup must restore to, computed from the source images.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from urllib.parse import quote

import pytest
from xobackup_hypervisor_xcpng.sim import Simulator

from tests.core.conftest import run_cli
from tests.engine.conftest import Harness
from xobackup_core import remote_encryption
from xobackup_core.config import Secret, load_config, parse_config, redact_url
from xobackup_core.engine.repository import BackupRepository, format_timestamp
from xobackup_core.engine.restore import restore_backup
from xobackup_core.errors import ConfigError, FormatError, RemoteConfigError
from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_directory import remote_disk_opener
from xobackup_core.plugins import Plugins
from xobackup_core.remote_encryption import EncryptedRemote

MiB = 1024 * 1024
FIXTURES = Path(__file__).parent.parent / "fixtures"
CHACHA = FIXTURES / "xo_encrypted_remote"
AES = FIXTURES / "xo_encrypted_remote_aes"
EXPECTED = json.loads((CHACHA / "expected.json").read_text())
EXPECTED_AES = json.loads((AES / "expected.json").read_text())
KEY = EXPECTED["encryption"]["key"]
WRONG_KEY = "an-other-key-of-32-characters-!!"
CHACHA_ENCRYPTION_JSON = '{"algorithm":"chacha20-poly1305"}'
DELTA_VM = "8a7b6c5d-4e3f-4a2b-9c1d-0e9f8a7b6c5d"
XVA_VM = "9b8c7d6e-5f4a-4b3c-8d2e-1f0a9b8c7d6e"


def extract(fixture: Path, folder: Path) -> Path:
    with tarfile.open(fixture / "remote.tar.xz") as archive:
        archive.extractall(folder, filter="data")
    return folder / "remote"


def open_remote(root: Path, key: str = KEY) -> EncryptedRemote:
    remote = Plugins().remote(f"file://{root}", {"name": "xo", "encryptionKey": Secret(key)})
    assert isinstance(remote, EncryptedRemote)
    return remote


def metadata_path(vm: str, timestamp: int) -> str:
    return f"/xo-vm-backups/{vm}/{format_timestamp(timestamp)}.json"


def sha256_of_chain(remote, path: str) -> str:
    digest = hashlib.sha256()
    with open_vhd_chain(path, remote_disk_opener(remote)) as chain:
        for index in range(-(-chain.leaf.size // chain.block_size)):
            digest.update(chain.read_block(index))
    return digest.hexdigest()


def write_config(tmp_path: Path, root: Path, key: str = KEY, sim: Simulator | None = None) -> Path:
    (tmp_path / "key").write_text(key + "\n")
    lines = [
        f'log_db = "{tmp_path}/logs.sqlite"',
        "[remotes.xo]",
        f'url = "file://{root}"',
        f'options = {{ encryptionKey = {{ file = "{tmp_path}/key" }} }}',
    ]
    if sim is not None:
        (tmp_path / "pw").write_text(sim.password)
        for i, pool in enumerate(sim.pools):
            lines += [f"[servers.pool{i}]", f'url = "{pool.url}"']
            lines += [f'password = {{ file = "{tmp_path}/pw" }}']
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def xo_remote(tmp_path) -> Path:
    return extract(CHACHA, tmp_path / "fixture")


@pytest.fixture(scope="module")
def restore_pool(tmp_path_factory):
    data = tmp_path_factory.mktemp("xo-encrypted-sim")
    with Simulator(pools=1, vms=1, hosts=1, disk_size=8 * MiB, data_dir=data) as sim:
        yield sim


# -- the fixture is really encrypted -------------------------------------------------------------
def test_fixture_files_are_ciphertext_and_layout_is_xo_s(xo_remote):
    assert (xo_remote / "encryption.json").read_text() == CHACHA_ENCRYPTION_JSON
    assert json.loads((xo_remote / "encryption.json").read_text()) == {
        "algorithm": "chacha20-poly1305"
    }
    metadata = xo_remote / "xo-vm-backups" / DELTA_VM / "20260820T040000Z.json"
    with pytest.raises(ValueError):
        json.loads(metadata.read_bytes())
    remote = open_remote(xo_remote)
    plain = remote.read_bytes(
        metadata_path(DELTA_VM, EXPECTED["vms"][DELTA_VM]["runs"][0]["timestamp"])
    )
    assert len(plain) == metadata.stat().st_size - 28
    assert json.loads(plain)["mode"] == "delta"
    assert remote.stat(
        metadata_path(DELTA_VM, EXPECTED["vms"][DELTA_VM]["runs"][0]["timestamp"])
    ).size == len(plain)


# -- listing -------------------------------------------------------------------------------------
def test_backups_list_on_an_encrypted_xo_remote(xo_remote, tmp_path):
    config = write_config(tmp_path, xo_remote)
    result = run_cli("--config", str(config), "backups", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in json.loads(result.stdout)}
    wanted = {
        metadata_path(vm, b["timestamp"]): (vm, b)
        for vm, spec in EXPECTED["vms"].items()
        for b in spec["backups"]
    }
    assert set(rows) == set(wanted)
    for path, (vm, backup) in wanted.items():
        assert rows[path]["vmName"] == EXPECTED["vms"][vm]["name"]
        assert rows[path]["mode"] == backup["mode"]
    [xva] = EXPECTED["vms"][XVA_VM]["backups"]
    assert rows[metadata_path(XVA_VM, xva["timestamp"])]["size"] == xva["xvaSize"]


def test_the_key_in_the_url_as_xo_writes_it(xo_remote, tmp_path):
    """``file://…?encryptionKey="…"`` (Xen Orchestra's remote URL, JSON-encoded value) opens
    the encrypted remote; the key shows nowhere, and the plugin never gets it in its URL."""
    url = f"file://{xo_remote}?encryptionKey={quote(json.dumps(KEY))}"
    config = tmp_path / "url.toml"
    config.write_text(f"log_db = \"{tmp_path}/logs.sqlite\"\n[remotes.xo]\nurl = '{url}'\n")
    result = run_cli("--config", str(config), "backups", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert {row["vmName"] for row in json.loads(result.stdout)} == {
        spec["name"] for spec in EXPECTED["vms"].values()
    }
    loaded = load_config(config)
    assert loaded.remotes["xo"].url == f"file://{xo_remote}"
    assert loaded.remotes["xo"].encryption_key.reveal() == KEY
    assert KEY not in loaded.model_dump_json() and KEY not in redact_url(url)
    # the same URL given straight to the command line
    listed = run_cli("backups", "list", "--remote", url, "--json")
    assert listed.returncode == 0, listed.stderr
    assert KEY not in listed.stdout + listed.stderr
    assert len(json.loads(listed.stdout)) == len(json.loads(result.stdout))


def test_a_key_given_in_options_never_shows_in_a_dump(tmp_path):
    root = tmp_path / "enc"
    config = parse_config(
        {"remotes": {"enc": {"url": f"file://{root}", "options": {"encryptionKey": KEY}}}}
    )
    assert config.remotes["enc"].options == {}
    assert config.remotes["enc"].plugin_options("enc")["encryptionKey"].reveal() == KEY
    assert KEY not in config.model_dump_json() and KEY not in repr(config)


def test_an_empty_key_means_a_plain_remote(tmp_path):
    """XO may write ``encryptionKey=""`` for a remote that is not encrypted."""
    for remote in (
        {"url": f"file://{tmp_path}?encryptionKey=%22%22"},
        {"url": f"file://{tmp_path}", "options": {"encryptionKey": ""}},
    ):
        config = parse_config({"remotes": {"plain": remote}})
        assert config.remotes["plain"].encryption_key is None
        assert config.remotes["plain"].url == f"file://{tmp_path}"
        opened = Plugins().remote(remote["url"], config.remotes["plain"].plugin_options("plain"))
        assert not isinstance(opened, EncryptedRemote)


def test_a_key_given_twice_is_refused(tmp_path):
    url = f"file://{tmp_path}?encryptionKey={quote(json.dumps(KEY))}"
    with pytest.raises(ConfigError, match="given twice") as refused:
        parse_config({"remotes": {"enc": {"url": url, "options": {"encryptionKey": KEY}}}})
    assert KEY not in str(refused.value)
    with pytest.raises(RemoteConfigError, match="given twice"):
        Plugins().remote(url, {"name": "enc", "encryptionKey": Secret(KEY)})


# -- reading and restoring -----------------------------------------------------------------------
@pytest.mark.parametrize("fixture", [CHACHA, AES], ids=["chacha20-poly1305", "aes-256-gcm"])
def test_encrypted_delta_chain_reads_bit_exact(tmp_path, fixture):
    expected = json.loads((fixture / "expected.json").read_text())
    remote = open_remote(extract(fixture, tmp_path))
    assert remote.algorithm == expected["encryption"]["algorithm"]
    backups = {b.timestamp: b for b in BackupRepository(remote).list_backups(DELTA_VM)}
    assert len(backups) == 2
    for backup in expected["vms"][DELTA_VM]["backups"]:
        [path] = backups[backup["timestamp"]].vhd_paths.values()
        assert sha256_of_chain(remote, path) == backup["sha256"]


@pytest.mark.parametrize(
    ("vm", "index", "whole_read_limit"),
    [(DELTA_VM, 0, None), (DELTA_VM, 1, None), (XVA_VM, 0, None), (XVA_VM, 0, 4096)],
    ids=["delta1", "delta2", "xva", "xva-streamed"],
)
def test_encrypted_xo_backup_restores_bit_exact(
    xo_remote, tmp_path, restore_pool, monkeypatch, vm, index, whole_read_limit
):
    if whole_read_limit is not None:
        # the XVA then streams through the decryptor, as a large one does
        monkeypatch.setattr(remote_encryption, "WHOLE_READ_LIMIT", whole_read_limit)
    harness = Harness(tmp_path, restore_pool)
    try:
        remote = open_remote(xo_remote)
        expected = EXPECTED["vms"][vm]["backups"][index]
        backup = BackupRepository(remote).read_metadata(metadata_path(vm, expected["timestamp"]))
        driver = harness.plugins.hypervisor(harness.config({}).server_view("pool0"))
        try:
            pool = driver.inventory().pools[0]
            sr = next(sr for sr in pool.srs if sr.name == "Shared storage")
            result = restore_backup(remote, backup, driver, sr_uuid=sr.uuid, pool=pool)
            restored = driver.inventory().vm(result.vm_uuid)
            [disk] = restored.disks
            size = restore_pool.vdi_data(disk.vdi_uuid).size
            content = restore_pool.read(disk.vdi_uuid, 0, size)
            assert size == EXPECTED["diskSize"]
            assert hashlib.sha256(content).hexdigest() == expected["sha256"]
        finally:
            driver.close()
    finally:
        harness.store.close()


def test_xva_streams_and_is_authenticated_at_end(xo_remote, monkeypatch):
    """Past the whole-read limit a file streams; a damaged byte fails at end of file."""
    monkeypatch.setattr(remote_encryption, "WHOLE_READ_LIMIT", 1024)
    [backup] = EXPECTED["vms"][XVA_VM]["backups"]
    path = f"/xo-vm-backups/{XVA_VM}/{format_timestamp(backup['timestamp'])}.xva"
    remote = open_remote(xo_remote)
    digest = hashlib.sha256()
    with remote.open_read(path) as stream:
        while chunk := stream.read(300_000):
            digest.update(chunk)
    assert digest.hexdigest() == backup["xvaSha256"]
    assert remote.read_range(path, 1000, 20) == remote.read_bytes(path)[1000:1020]
    stored = xo_remote / path.lstrip("/")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    with pytest.raises(FormatError) as error, remote.open_read(path) as stream:
        while stream.read(1 << 20):
            pass
    assert path in str(error.value) and "authentication" in str(error.value)


@pytest.mark.parametrize("fixture", [CHACHA, AES], ids=["chacha20-poly1305", "aes-256-gcm"])
def test_range_reads_of_large_encrypted_files_seek_in_the_keystream(tmp_path, fixture, monkeypatch):
    remote = open_remote(extract(fixture, tmp_path))
    files = [p for p in remote.walk("/") if not p.endswith(("encryption.json", ".checksum"))]
    wholes = {path: remote.read_bytes(path) for path in files}
    monkeypatch.setattr(remote_encryption, "WHOLE_READ_LIMIT", 64)
    for path, whole in wholes.items():
        for offset, length in [(0, 5), (1, 17), (15, 33), (63, 70), (len(whole) - 3, 10)]:
            assert remote.read_range(path, offset, length) == whole[offset : offset + length]


@pytest.mark.parametrize("algorithm", ["chacha20-poly1305", "aes-256-gcm"])
def test_streamed_round_trip_with_odd_sizes(tmp_path, monkeypatch, algorithm):
    """Odd write sizes and read sizes, through the streaming decryptor, for both algorithms:
    the same bytes come back, and what is stored decrypts as one XO-framed file."""
    root = tmp_path / "enc"
    root.mkdir()
    (root / "encryption.json").write_text(json.dumps({"algorithm": algorithm}))
    raw = KEY.encode()
    (root / "metadata.json").write_bytes(
        remote_encryption.encrypt_bytes(algorithm, raw, b'{"random":"x"}')
    )
    remote = open_remote(root)
    assert remote.algorithm == algorithm
    monkeypatch.setattr(remote_encryption, "WHOLE_READ_LIMIT", 0)
    monkeypatch.setattr(remote_encryption, "_CHUNK", 1000)
    for size in (0, 1, 15, 16, 17, 999, 1000, 1001, 1016, 5000, 70_001):
        data = bytes((i * 7 + size) % 251 for i in range(size))
        with remote.open_write(f"/f{size}") as writer:
            for offset in range(0, size, 333):
                writer.write(data[offset : offset + 333])
        stored = (root / f"f{size}").read_bytes()
        assert remote_encryption.decrypt_bytes(algorithm, raw, stored, path="x") == data
        with remote.open_read(f"/f{size}") as stream:
            back = b"".join(iter(lambda: stream.read(77), b""))
        assert back == data


def test_files_ls_and_get_from_an_encrypted_xo_backup(xo_remote, tmp_path):
    config = str(write_config(tmp_path, xo_remote))
    for backup in EXPECTED["vms"][DELTA_VM]["backups"]:
        ref = f"xo:{DELTA_VM}/{format_timestamp(backup['timestamp'])}"
        files = EXPECTED["images"][backup["version"] - 1]["files"]
        listing = run_cli("--config", config, "files", "ls", "--json", ref, "0", "whole", "/db")
        assert listing.returncode == 0, listing.stderr
        assert {e["name"] for e in json.loads(listing.stdout)} == {
            p.split("/")[-1] for p in files if p.startswith("/db/")
        }
        out = tmp_path / format_timestamp(backup["timestamp"])
        got = run_cli(
            "--config", config, "files", "get", ref, "0", "whole", *sorted(files), "--to", str(out)
        )
        assert got.returncode == 0, got.stderr
        for path, info in files.items():
            data = (out / path.rsplit("/", 1)[1]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == info["sha256"], path


# -- wrong key, tampering ------------------------------------------------------------------------
def test_wrong_key_is_a_clear_error_and_never_printed(xo_remote, tmp_path):
    config = write_config(tmp_path, xo_remote, key=WRONG_KEY)
    before = sorted(p.relative_to(xo_remote) for p in xo_remote.rglob("*"))
    for command in (["backups", "list"], ["files", "ls", f"xo:{DELTA_VM}/latest"]):
        result = run_cli("--config", str(config), *command)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert "encryptionKey does not match" in result.stderr
        assert "Traceback" not in result.stderr
        for secret in (WRONG_KEY, KEY):
            assert secret not in result.stderr and secret not in result.stdout
    # a remote that holds data is never re-keyed
    assert sorted(p.relative_to(xo_remote) for p in xo_remote.rglob("*")) == before
    short = write_config(tmp_path, xo_remote, key="too-short")
    result = run_cli("--config", str(short), "backups", "list")
    assert result.returncode == 2 and "exactly 32" in result.stderr
    assert "too-short" not in result.stderr and "Traceback" not in result.stderr


def test_encrypted_remote_without_its_key_is_a_clear_error(xo_remote, tmp_path):
    config = tmp_path / "nokey.toml"
    config.write_text(
        f'log_db = "{tmp_path}/logs.sqlite"\n[remotes.xo]\nurl = "file://{xo_remote}"\n'
    )
    result = run_cli("--config", str(config), "backups", "list")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "encrypted (chacha20-poly1305): set its encryptionKey" in result.stderr
    assert "Traceback" not in result.stderr


def test_interrupted_encrypted_write_leaves_nothing(tmp_path):
    root = tmp_path / "enc"
    root.mkdir()
    remote = open_remote(root)
    with pytest.raises(RuntimeError), remote.open_write("/vm/a.bin") as writer:
        writer.write(b"x" * 100_000)
        raise RuntimeError("the source stream broke")
    assert not remote.exists("/vm/a.bin")
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == [
        "encryption.json",
        "metadata.json",
    ]
    remote.write_bytes("/vm/b.bin", b"")
    assert remote.read_bytes("/vm/b.bin") == b"" and (root / "vm" / "b.bin").stat().st_size == 28


def test_key_on_a_non_empty_plain_remote_is_refused(tmp_path):
    root = tmp_path / "plain"
    (root / "xo-vm-backups").mkdir(parents=True)
    with pytest.raises(RemoteConfigError, match="only be enabled on an empty remote"):
        open_remote(root)
    assert not (root / "encryption.json").exists()


def test_empty_remote_gets_xo_key_check_files(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    remote = open_remote(root)
    # byte for byte what XO writes (its own fixture holds the same text)
    assert (root / "encryption.json").read_text() == (CHACHA_ENCRYPTION_JSON)
    stored = (root / "metadata.json").read_bytes()
    assert set(json.loads(remote.read_bytes("/metadata.json"))) == {"random"}
    assert len(stored) == 12 + len(remote.read_bytes("/metadata.json")) + 16
    # the same key opens it again; another key on this still-empty remote re-creates it
    open_remote(root)
    open_remote(root, WRONG_KEY)
    assert (root / "metadata.json").read_bytes() != stored
    with pytest.raises(FormatError):
        remote.read_bytes("/metadata.json")


def test_tampered_block_is_a_clear_error_naming_the_file(xo_remote, tmp_path):
    spec = EXPECTED["vms"][DELTA_VM]
    blocks = sorted((xo_remote / "xo-vm-backups" / DELTA_VM).rglob("blocks/*/*"))
    target = blocks[0]
    data = bytearray(target.read_bytes())
    data[100] ^= 0x80
    target.write_bytes(bytes(data))
    remote = open_remote(xo_remote)
    backups = BackupRepository(remote).list_backups(DELTA_VM)
    with pytest.raises(FormatError) as error:
        for backup in backups:
            [path] = backup.vhd_paths.values()
            sha256_of_chain(remote, path)
    relative = "/" + str(target.relative_to(xo_remote))
    assert relative in str(error.value)
    config = str(write_config(tmp_path, xo_remote))
    ref = f"xo:{DELTA_VM}/{format_timestamp(spec['backups'][0]['timestamp'])}"
    result = run_cli(
        "--config", config, "files", "get", ref, "0", "whole", "/notes.txt", "--to", str(tmp_path)
    )
    assert result.returncode != 0
    assert relative in result.stderr and "Traceback" not in result.stderr


# -- our backups into an encrypted remote --------------------------------------------------------
def test_xobackup_runs_into_an_encrypted_remote_read_back(tmp_path, xapi_sim):
    """A delta job (VhdDirectory; three runs, two kept: a merge of encrypted blocks) and a full
    job write an encrypted remote: nothing on disk is plaintext, each backup reads back
    bit-exact, and the XVA checksum is XO's (MD5 of what is stored). Deltas are VhdDirectory
    only, as XO requires for encryption."""
    harness = Harness(tmp_path, xapi_sim)
    root = tmp_path / "encrypted"
    root.mkdir()
    vm_uuid = next(record["uuid"] for _ref, record in xapi_sim.vms(0))
    remotes = {"enc": {"url": f"file://{root}", "options": {"encryptionKey": KEY}}}
    jobs = {
        "delta": {"mode": "delta", "remotes": ["enc"], "vms": [vm_uuid]},
        "plain-vhd": {"mode": "delta", "remotes": ["enc"], "vms": [vm_uuid]},
        "full": {"mode": "full", "remotes": ["enc"], "vms": [vm_uuid]},
    }
    jobs["delta"]["settings"] = {"useVhdDirectory": True, "exportRetention": 2}
    jobs["plain-vhd"]["settings"] = {"useVhdDirectory": False}
    config = harness.config(jobs, remotes=remotes)
    driver = harness.plugins.hypervisor(config.server_view("pool0"))
    try:
        vdi = driver.inventory().vm(vm_uuid).disks[0].vdi_uuid
    finally:
        driver.close()
    contents = []
    for seed in range(3):
        xapi_sim.randomize_blocks(vdi, 0.2, seed=seed)
        size = xapi_sim.vdi_data(vdi).size
        contents.append(hashlib.sha256(xapi_sim.read(vdi, 0, size)).hexdigest())
        outcome = harness.run(config, "delta")
        assert outcome.status == "success", harness.store.get_run(outcome.run_id).to_dict()
    assert harness.run(config, "full").status == "success"
    # a job set to VHD files still writes VhdDirectory: encrypted files cannot be updated in
    # place, so the engine treats this remote like an object store
    assert harness.run(config, "plain-vhd").status == "success"
    harness.store.close()

    assert json.loads((root / "encryption.json").read_text()) == {"algorithm": "chacha20-poly1305"}
    for path in root.rglob("*"):
        if (
            path.is_file()
            and path.name != "encryption.json"
            and not path.name.endswith(".checksum")
        ):
            assert (
                b"xo-vm-backups" not in path.read_bytes() and b"conectix" not in path.read_bytes()
            )
            assert not path.name.endswith(".vhd") or path.name.endswith(".alias.vhd")
    remote = open_remote(root)
    backups = BackupRepository(remote).list_backups(vm_uuid)
    deltas = [b for b in backups if b.data["mode"] == "delta"]
    [full] = [b for b in backups if b.data["mode"] == "full"]
    assert len(deltas) == 3
    assert all(".alias.vhd" in path for b in deltas for path in b.vhd_paths.values())
    for backup, content in zip(deltas, [contents[1], contents[2], contents[2]], strict=True):
        [path] = backup.vhd_paths.values()
        assert sha256_of_chain(remote, path) == content
    stored = root / full.xva_path.lstrip("/")
    checksum = stored.with_name(stored.name + ".checksum").read_text()
    assert checksum == f"$1$${hashlib.md5(stored.read_bytes()).hexdigest()}"
    assert remote.stat(full.xva_path).size == stored.stat().st_size - 28
    # a monolithic VHD is refused outright
    with pytest.raises(RemoteConfigError, match="VhdDirectory"):
        remote.open_write(f"/xo-vm-backups/{vm_uuid}/vdis/j/d/20260101T000000Z.vhd")
    # the wrong key cannot open what we wrote
    with pytest.raises(RemoteConfigError):
        open_remote(root, WRONG_KEY)
