"""xobackup plugin: the ``gzip`` compressor (standard gzip, multi-threaded through ISA-L)."""

from __future__ import annotations

from xobackup_compress_gzip.codec import GzipCodec
from xobackup_core.compression import Codec
from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided

__all__ = ["GzipCodec", "xobackup_compressor", "xobackup_provides"]


@hookimpl
def xobackup_provides() -> list[Provided]:
    """Declare the ``gzip`` compressor."""
    return [Provided("compressor", "gzip", "gzip (.gz) through ISA-L, multi-threaded, levels 1-9")]


@hookimpl
def xobackup_compressor(name: str) -> Codec | None:
    """The gzip codec when ``name`` is ``gzip``."""
    return GzipCodec() if name == "gzip" else None
