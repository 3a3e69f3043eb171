"""``xobackup vhd info|check|cat`` on local files and on a file:// remote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from tests.conftest import require_module
from tests.formats.conftest import BLOCK, ChainBuilder
from xobackup_core.cli.main import cli
from xobackup_core.errors import ExitCode
from xobackup_core.formats.source import LocalFile


def _run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_info_check_cat_on_a_chain(tmp_path: Path, chain_builder: ChainBuilder) -> None:
    chain = chain_builder.write(10 * BLOCK, chain_builder.random_layers(10, 3, 3))
    leaf = str(chain.leaf)
    result = _run("vhd", "info", leaf)
    assert result.exit_code == 0, result.output
    assert "type: differencing" in result.output
    assert f"parent: {chain.paths[1].name}" in result.output
    assert "chain: 3 disk(s), virtual size 20971520 bytes" in result.output
    result = _run("vhd", "check", leaf)
    assert result.exit_code == 0 and "OK" in result.output
    out = tmp_path / "disk.raw"
    assert _run("vhd", "cat", leaf, "-o", str(out)).exit_code == 0
    assert out.read_bytes() == bytes(chain.expected)
    # Through stdout, in a real process (binary-safe, streaming).
    piped = subprocess.run(
        [sys.executable, "-m", "xobackup_core.cli", "vhd", "cat", leaf],
        check=True,
        capture_output=True,
    )
    assert piped.stdout == bytes(chain.expected)


def test_remote_paths(tmp_path: Path, chain_builder: ChainBuilder) -> None:
    require_module("xobackup_remote_local")
    chain = chain_builder.write(4 * BLOCK, chain_builder.random_layers(4, 2, 2))
    url = f"file://{tmp_path}"
    result = _run("vhd", "info", "--remote", url, chain.leaf.name)
    assert result.exit_code == 0, result.output
    assert "chain: 2 disk(s)" in result.output
    out = tmp_path / "out.raw"
    assert _run("vhd", "cat", "--remote", url, chain.leaf.name, "-o", str(out)).exit_code == 0
    assert out.read_bytes() == bytes(chain.expected)
    result = _run("vhd", "check", "--remote", url, "missing.vhd")
    assert result.exit_code == ExitCode.USAGE
    assert "missing.vhd: no such file" in result.output


def test_check_reports_corruption_with_exit_code_data(
    tmp_path: Path, chain_builder: ChainBuilder
) -> None:
    chain = chain_builder.write(4 * BLOCK, chain_builder.random_layers(4, 2, 2))
    with LocalFile(chain.paths[0]) as file:
        original = file.read_at(512 + 20, 1)
        file.write_at(512 + 20, b"\x01")  # inside the base's header: checksum mismatch
    result = _run("vhd", "check", str(chain.leaf))
    assert result.exit_code == ExitCode.DATA
    assert f"{chain.paths[0]}: header.checksum: checksum is" in result.output
    assert "Traceback" not in result.output
    with LocalFile(chain.paths[0]) as file:
        file.write_at(512 + 20, original)
    assert _run("vhd", "check", str(chain.leaf)).exit_code == 0
    with LocalFile(chain.paths[1]) as file:
        file.write_at(0, b"\x00")  # footer copy differs from the trailing footer
    result = _run("vhd", "check", str(chain.leaf))
    assert result.exit_code == ExitCode.DATA
    assert "footer copy at offset 0 differs" in result.output
    assert _run("vhd", "info", str(tmp_path / "nope.vhd")).exit_code == ExitCode.USAGE


def test_chain_mixing_a_file_and_a_vhd_directory(
    tmp_path: Path, chain_builder: ChainBuilder
) -> None:
    """A VHD-file delta whose parent is a VhdDirectory (read through the file:// remote)."""
    remote_module = require_module("xobackup_remote_local")
    from xobackup_core.formats.source import LocalFileSource
    from xobackup_core.formats.vhd import VhdFile
    from xobackup_core.formats.vhd_directory import copy_disk_to_directory

    chain = chain_builder.write(6 * BLOCK, chain_builder.random_layers(6, 2, 3))
    base = chain.paths[0]
    as_file = base.with_name("base-file.vhd")
    base.rename(as_file)
    remote = remote_module.LocalRemote(str(tmp_path))
    with VhdFile.open(LocalFileSource(as_file)) as disk:
        copy_disk_to_directory(disk, remote, "/" + base.name, compression=None)
    as_file.unlink()
    assert base.is_dir()
    result = _run("vhd", "info", str(chain.leaf))
    assert result.exit_code == 0, result.output
    assert "chain: 2 disk(s)" in result.output
    out = tmp_path / "mixed.raw"
    assert _run("vhd", "cat", str(chain.leaf), "-o", str(out)).exit_code == 0
    assert out.read_bytes() == bytes(chain.expected)


def test_check_reads_every_block_file_of_a_vhd_directory(
    tmp_path: Path, chain_builder: ChainBuilder
) -> None:
    """A VhdDirectory keeps each block in its own file: ``check`` must find one that is
    missing, cut short or not decodable, and name the block and its file."""
    remote_module = require_module("xobackup_remote_local")
    require_module("brotli")
    from xobackup_core.formats.source import LocalFileSource
    from xobackup_core.formats.vhd import VhdFile
    from xobackup_core.formats.vhd_directory import copy_disk_to_directory

    chain = chain_builder.write(6 * BLOCK, [{1: chain_builder.block(), 4: chain_builder.block()}])
    source = chain.paths[0].with_name("source.vhd")
    chain.paths[0].rename(source)
    remote = remote_module.LocalRemote(str(tmp_path))
    with VhdFile.open(LocalFileSource(source)) as disk:
        copy_disk_to_directory(disk, remote, "/disk.vhd", compression="brotli")
    folder = tmp_path / "disk.vhd"
    block = folder / "blocks" / "0" / "4"
    stored = block.read_bytes()
    for args in ([str(folder)], ["--remote", f"file://{tmp_path}", "/disk.vhd"]):
        result = _run("vhd", "check", *args)
        assert result.exit_code == 0 and "OK (1 disk(s) in the chain)" in result.output

    block.unlink()
    for args in ([str(folder)], ["--remote", f"file://{tmp_path}", "/disk.vhd"]):
        result = _run("vhd", "check", *args)
        assert result.exit_code == ExitCode.DATA, result.output
        assert "/disk.vhd/blocks/0/4: bat[4]: block 4: " in result.output
        assert "its file is missing" in result.output
        assert "Traceback" not in result.output
    # a block file cut short, then one that is not brotli at all
    for damaged in (stored[: len(stored) // 2], b"not a brotli stream" * 8):
        block.write_bytes(damaged)
        result = _run("vhd", "check", str(folder))
        assert result.exit_code == ExitCode.DATA, result.output
        assert "/disk.vhd/blocks/0/4: bat[4]: block 4: " in result.output
        assert "Traceback" not in result.output
    block.write_bytes(stored)
    assert _run("vhd", "check", str(folder)).exit_code == 0
