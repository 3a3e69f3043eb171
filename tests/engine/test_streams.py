"""One export stream fed to every target: read ahead into reused buffers, hashed on the way."""

from __future__ import annotations

import hashlib
import io
import os
import threading

import pytest

from xobackup_core.engine.streams import Fanout, ReadAhead, Target

CHUNK = 64 * 1024


class SlowStream(io.RawIOBase):
    """A readable stream of ``data`` whose reads can be held back, to let the consumer lag."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._position = 0
        self._fail_after = fail_after
        self.reads = 0
        self.closed_early = threading.Event()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._fail_after is not None and self._position >= self._fail_after:
            raise OSError("connection reset by the host")
        self.reads += 1
        size = min(len(buffer), len(self._data) - self._position)
        buffer[:size] = self._data[self._position : self._position + size]
        self._position += size
        return size


def test_chunks_are_the_stream_even_when_the_reader_runs_ahead():
    """Buffers are read into again: a buffer reused before the consumer is done with its chunk
    would show here as chunks with the bytes of a later one."""
    data = os.urandom(CHUNK * 40 + 123)
    received = bytearray()
    buffers = set()
    reader = ReadAhead(SlowStream(data), chunk_size=CHUNK, depth=3)
    for chunk in reader:
        buffers.add(id(chunk.obj))
        threading.Event().wait(0.001)  # the reader fills every free buffer meanwhile
        received += chunk
    assert bytes(received) == data
    assert len(buffers) <= 4  # depth + the consumer's: memory does not grow with the stream


def test_the_digest_is_of_the_whole_stream():
    data = os.urandom(CHUNK * 9 + 7)
    digest = hashlib.sha256()
    assert b"".join(bytes(c) for c in ReadAhead(SlowStream(data), CHUNK, digest=digest)) == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_stream_without_readinto_is_read_too():
    data = os.urandom(CHUNK * 3 + 5)

    class ReadOnly:
        def __init__(self) -> None:
            self._inner = io.BytesIO(data)

        def read(self, size: int) -> bytes:
            return self._inner.read(size)

    assert b"".join(bytes(c) for c in ReadAhead(ReadOnly(), CHUNK)) == data  # type: ignore[arg-type]


def test_a_stream_error_reaches_the_consumer_after_the_good_chunks():
    data = os.urandom(CHUNK * 10)
    seen = 0
    with pytest.raises(OSError, match="connection reset"):
        for chunk in ReadAhead(SlowStream(data, fail_after=CHUNK * 4), CHUNK):
            seen += len(chunk)
    assert seen == CHUNK * 4


def test_a_consumer_that_stops_ends_the_reading_thread():
    stream = SlowStream(os.urandom(CHUNK * 100))
    chunks = iter(ReadAhead(stream, CHUNK, depth=2))
    next(chunks)
    chunks.close()  # what a for loop left by an exception does
    for thread in threading.enumerate():
        if thread.name == "read-ahead":
            thread.join(timeout=5)
            assert not thread.is_alive()
    assert stream.reads <= 4  # it stopped reading instead of draining the export


def test_fanout_gives_every_target_every_byte_and_drops_a_failing_one():
    data = os.urandom(CHUNK * 12 + 99)
    outputs = {"a": bytearray(), "b": bytearray()}
    failing = bytearray()

    def fail_after_two(chunk) -> None:
        if len(failing) >= 2 * CHUNK:
            raise OSError("no space left on device")
        failing.extend(chunk)

    dropped = []
    targets = [
        Target("a", outputs["a"].extend, lambda: None, lambda: None),
        Target("broken", fail_after_two, lambda: None, lambda: None),
        Target("b", outputs["b"].extend, lambda: None, lambda: None),
    ]
    digest = hashlib.md5()
    fanout = Fanout(targets, lambda t: dropped.append(t.name))
    total = fanout.copy_stream(SlowStream(data), chunk_size=CHUNK, digest=digest)
    fanout.finish()
    assert total == len(data)
    assert bytes(outputs["a"]) == bytes(outputs["b"]) == data
    assert dropped == ["broken"] and "no space" in str(targets[1].error)
    assert digest.hexdigest() == hashlib.md5(data).hexdigest()
    assert targets[0].written == len(data)


def test_a_failing_digest_fails_the_copy_instead_of_hanging_it():
    class BrokenDigest:
        def __init__(self) -> None:
            self.calls = 0

        def update(self, data) -> None:
            self.calls += 1
            if self.calls == 3:
                raise ValueError("digest broke")

    data = os.urandom(CHUNK * 30)
    seen = 0
    digest = BrokenDigest()
    with pytest.raises(ValueError, match="digest broke"):
        for chunk in ReadAhead(SlowStream(data), CHUNK, depth=2, digest=digest):
            seen += len(chunk)
    assert seen == len(data)  # the stream went on to its end: no buffer was left held
