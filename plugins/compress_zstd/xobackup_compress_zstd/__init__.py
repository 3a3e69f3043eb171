"""xobackup plugin: the ``zstd`` compressor (Zstandard, multi-threaded, streaming)."""

from __future__ import annotations

from xobackup_compress_zstd.codec import ZstdCodec
from xobackup_core.compression import Codec
from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided

__all__ = ["ZstdCodec", "xobackup_compressor", "xobackup_provides"]


@hookimpl
def xobackup_provides() -> list[Provided]:
    """Declare the ``zstd`` compressor."""
    return [Provided("compressor", "zstd", "Zstandard (.zst), multi-threaded, levels 1-22")]


@hookimpl
def xobackup_compressor(name: str) -> Codec | None:
    """The zstd codec when ``name`` is ``zstd``."""
    return ZstdCodec() if name == "zstd" else None
