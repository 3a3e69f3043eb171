"""Follow zstd frame boundaries in a compressed byte stream, without decoding it.

libzstd's streaming decoder, as the ``zstandard`` package exposes it, reports a stream that
stops in the middle of a frame as a clean end of data. A backup cut short by a full disk or a
broken connection would then restore silently truncated. :class:`FrameTracker` reads only the
frame and block headers (RFC 8878 §3.1) of the bytes handed to the decoder, so the reader can
tell at end of input whether the last frame was complete.
"""

from __future__ import annotations

import enum

ZSTD_MAGIC = 0xFD2FB528
"""First four bytes (little-endian) of a zstd frame."""
SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0
SKIPPABLE_MAGIC = 0x184D2A50
"""Skippable frames use the 16 magic numbers 0x184D2A50..0x184D2A5F (RFC 8878 §3.1.2)."""

_DICTIONARY_ID_SIZES = (0, 1, 2, 4)
_CONTENT_SIZE_SIZES = (0, 2, 4, 8)  # for flag 0 the size is 1 when the frame is single-segment
_BLOCK_TYPE_RLE = 1
_CHECKSUM_SIZE = 4


class _State(enum.Enum):
    MAGIC = enum.auto()
    FRAME_HEADER_DESCRIPTOR = enum.auto()
    FRAME_HEADER_REST = enum.auto()
    BLOCK_HEADER = enum.auto()
    SKIPPABLE_SIZE = enum.auto()
    UNKNOWN = enum.auto()


class FrameTracker:
    """Fed every compressed byte in order; says whether the input ended between frames."""

    def __init__(self) -> None:
        self.frames = 0
        """Complete frames seen (skippable frames included)."""
        self.bytes_seen = 0
        self._state = _State.MAGIC
        self._header = bytearray()
        self._need = 4
        self._skip = 0
        self._after_skip = _State.MAGIC
        self._has_checksum = False
        self._frame_ends_after_skip = False

    @property
    def at_frame_end(self) -> bool:
        """True when the bytes fed so far end exactly after a complete frame.

        Bytes that are not a zstd frame are left to libzstd to reject (it raises on them), so
        they count as complete here.
        """
        if self._state is _State.UNKNOWN:
            return True
        return (
            self.frames > 0 and self._state is _State.MAGIC and not self._header and not self._skip
        )

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Account for the next compressed bytes."""
        view = memoryview(data).cast("B")
        size = len(view)
        self.bytes_seen += size
        pos = 0
        while pos < size and self._state is not _State.UNKNOWN:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                if not self._skip:
                    self._end_skip()
                continue
            take = min(self._need - len(self._header), size - pos)
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) == self._need:
                header = bytes(self._header)
                self._header.clear()
                self._parse(header)

    def _end_skip(self) -> None:
        if self._frame_ends_after_skip:
            self._frame_ends_after_skip = False
            self.frames += 1
        self._set(self._after_skip, 4 if self._after_skip is _State.MAGIC else 3)

    def _set(self, state: _State, need: int) -> None:
        self._state = state
        self._need = need

    def _skip_then(self, count: int, state: _State, *, frame_ends: bool = False) -> None:
        self._after_skip = state
        self._frame_ends_after_skip = frame_ends
        self._skip = count
        if not count:
            self._end_skip()

    def _parse(self, header: bytes) -> None:
        state = self._state
        if state is _State.MAGIC:
            magic = int.from_bytes(header, "little")
            if magic == ZSTD_MAGIC:
                self._set(_State.FRAME_HEADER_DESCRIPTOR, 1)
            elif magic & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC:
                self._set(_State.SKIPPABLE_SIZE, 4)
            else:
                self._state = _State.UNKNOWN
        elif state is _State.SKIPPABLE_SIZE:
            self._skip_then(int.from_bytes(header, "little"), _State.MAGIC, frame_ends=True)
        elif state is _State.FRAME_HEADER_DESCRIPTOR:
            descriptor = header[0]
            single_segment = bool(descriptor & 0x20)
            self._has_checksum = bool(descriptor & 0x04)
            content_size_flag = descriptor >> 6
            rest = _DICTIONARY_ID_SIZES[descriptor & 0x03]
            rest += 0 if single_segment else 1  # the window descriptor
            if content_size_flag == 0 and single_segment:
                rest += 1
            else:
                rest += _CONTENT_SIZE_SIZES[content_size_flag]
            self._set(_State.FRAME_HEADER_REST, rest)  # never 0: see the two cases above
        elif state is _State.FRAME_HEADER_REST:
            self._set(_State.BLOCK_HEADER, 3)
        elif state is _State.BLOCK_HEADER:
            value = int.from_bytes(header, "little")
            last_block = bool(value & 1)
            block_type = (value >> 1) & 3
            block_size = value >> 3
            content = 1 if block_type == _BLOCK_TYPE_RLE else block_size
            if not last_block:
                self._skip_then(content, _State.BLOCK_HEADER)
            elif self._has_checksum:
                self._skip_then(content + _CHECKSUM_SIZE, _State.MAGIC, frame_ends=True)
            else:
                self._skip_then(content, _State.MAGIC, frame_ends=True)
