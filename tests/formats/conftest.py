"""Fixtures for the VHD tests: build chains with our writer and know their expected content."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from xobackup_core.formats.vhd_chain import open_vhd_chain
from xobackup_core.formats.vhd_writer import ParentLink, write_vhd_stream

BLOCK = 2 * 1024 * 1024


@dataclass
class BuiltChain:
    """Files of a chain (oldest first) and the raw image the newest one must read as."""

    paths: list[Path]
    size: int
    expected: bytearray = field(repr=False)

    @property
    def leaf(self) -> Path:
        return self.paths[-1]


class ChainBuilder:
    """Writes VHD chains into a folder, tracking the expected virtual disk."""

    def __init__(self, folder: Path, seed: int = 0) -> None:
        self.folder = folder
        self.random = random.Random(seed)

    def block(self) -> bytes:
        return self.random.randbytes(BLOCK)

    def random_layers(self, blocks: int, layers: int, per_layer: int) -> list[dict[int, bytes]]:
        return [
            {index: self.block() for index in self.random.sample(range(blocks), per_layer)}
            for _ in range(layers)
        ]

    def write(self, size: int, layers: list[dict[int, bytes]], prefix: str = "disk") -> BuiltChain:
        """Layer 0 is a dynamic base, each next layer a differencing child of the previous."""
        expected = bytearray(size)
        paths: list[Path] = []
        parent: ParentLink | None = None
        for depth, layer in enumerate(layers):
            path = self.folder / f"{prefix}{depth:04d}.vhd"
            with open(path, "wb") as stream:
                layout = write_vhd_stream(
                    stream.write, size, sorted(layer.items()), sorted(layer), parent=parent
                )
            for index, data in layer.items():
                expected[index * BLOCK : (index + 1) * BLOCK] = data.ljust(BLOCK, b"\0")
            parent = ParentLink(layout.footer.uuid, path.name, layout.footer.timestamp)
            paths.append(path)
        del expected[size:]
        return BuiltChain(paths, size, expected)


def read_chain(path: Path | str) -> bytes:
    """The whole virtual disk of a local chain, through our reader."""
    with open_vhd_chain(os.fspath(path)) as chain:
        return b"".join(bytes(data) for _, data in chain.iter_blocks())


@pytest.fixture
def chain_builder(tmp_path: Path) -> ChainBuilder:
    return ChainBuilder(tmp_path)
