"""The core's ``none`` codec, registered like any plugin."""

from __future__ import annotations

from xobackup_core.compression import Codec, NoneCodec
from xobackup_core.hookspecs import hookimpl
from xobackup_core.plugins import Provided


@hookimpl
def xobackup_provides() -> list[Provided]:
    return [Provided("compressor", "none", "no compression")]


@hookimpl
def xobackup_compressor(name: str) -> Codec | None:
    return NoneCodec() if name == "none" else None
