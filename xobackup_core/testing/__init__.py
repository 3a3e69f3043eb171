"""Test kits for plugin authors: inherit a suite, give it your implementation, run pytest."""

from xobackup_core.testing.codec_conformance import CodecConformance
from xobackup_core.testing.remote_conformance import RemoteConformance, pattern

__all__ = ["CodecConformance", "RemoteConformance", "pattern"]
