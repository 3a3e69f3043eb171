"""Feeding one export stream to several targets, with a rate limit.

One snapshot and one export feed every target of a run (reference: xo-backups.md §4.3). A
:class:`Fanout` hands each chunk to every live target; a target that fails is aborted and
dropped with the reason, the others go on, and the export is abandoned only when no target
is left. :class:`RateLimiter` applies ``maxExportRate`` once, before the fan-out.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from xobackup_core.errors import XobackupError

CHUNK_SIZE = 1024 * 1024
"""Bytes per read of an export stream. Small enough for a chunk to still be in the CPU's
cache when it is written out: with 4 MiB chunks, writing a 4 GiB export to a local folder
cost the kernel twice the CPU (10 s against 4 s on a test VM, curl's buffer doing as well as
1 MiB chunks)."""


class RateLimiter:
    """Blocks so that bytes pass at no more than ``rate`` per second (0: no limit).

    Shared by every stream of a run: the limit is for the whole run, as in Xen Orchestra.
    """

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._sent = 0

    def consume(self, size: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            self._sent += size
            due = self._start + self._sent / self.rate
        delay = due - self._clock()
        if delay > 0:
            time.sleep(delay)


@dataclass
class Target:
    """One destination of a fan-out: ``write`` gets every chunk, then ``finish`` or ``abort``.

    A chunk may be a view of a buffer that is read into again once ``write`` returns: a
    target that needs the bytes later copies them.
    """

    name: str
    write: Callable[[bytes | memoryview], Any]
    finish: Callable[[], Any]
    abort: Callable[[], Any]
    error: BaseException | None = None
    written: int = 0
    data: dict[str, Any] = field(default_factory=dict)


class Fanout:
    """Copy chunks to targets; isolate each target's failures."""

    def __init__(self, targets: list[Target], on_drop: Callable[[Target], None]) -> None:
        self.targets = targets
        self._on_drop = on_drop

    @property
    def live(self) -> list[Target]:
        return [target for target in self.targets if target.error is None]

    def _drop(self, target: Target, error: BaseException) -> None:
        target.error = error
        try:
            target.abort()
        except Exception:  # the target is already broken; its first error is what matters
            pass
        self._on_drop(target)

    def write(self, chunk: Any, size: int | None = None) -> bool:
        """Give ``chunk`` (bytes, or any item the targets take, of ``size`` bytes) to every
        live target; False once none is left."""
        for target in self.live:
            try:
                target.write(chunk)
                target.written += len(chunk) if size is None else size
            except Exception as error:
                self._drop(target, error)
        return bool(self.live)

    def finish(self) -> None:
        for target in self.live:
            try:
                target.finish()
            except Exception as error:
                self._drop(target, error)

    def abort(self, error: BaseException) -> None:
        for target in self.live:
            self._drop(target, error)

    def copy_stream(
        self,
        stream: BinaryIO,
        limiter: RateLimiter | None = None,
        chunk_size: int = CHUNK_SIZE,
        on_chunk: Callable[[int], Any] | None = None,
        digest: Digest | None = None,
    ) -> int:
        """Read ``stream`` to its end into every target (and ``digest``); returns the bytes
        read.

        The stream is read ahead by a thread, so receiving the next chunks overlaps with
        writing this one (a network read and a disk write each release the GIL).
        """
        total = 0
        for chunk in ReadAhead(stream, chunk_size, digest=digest):
            if limiter is not None:
                limiter.consume(len(chunk))
            if on_chunk is not None:
                on_chunk(len(chunk))
            total += len(chunk)
            if not self.write(chunk):
                return total
        return total


_END = object()


class Digest(Protocol):
    """A hashlib object, or anything else that takes the bytes of a stream."""

    def update(self, data: bytes | memoryview, /) -> None: ...


class ReadAhead:
    """The chunks of ``stream``, read by a thread up to ``depth`` chunks ahead of the consumer
    into a small ring of buffers that are read into again and again.

    Why reuse: a fresh buffer per chunk costs fresh pages. On a VM that hands freed memory
    back to its host that was a large part of a full backup's time; the ring keeps the same
    few MiB hot. A yielded chunk (a memoryview) is valid until the consumer asks for the next.

    ``digest`` is fed every chunk by a thread of its own, beside the reading and the writing:
    hashing in the reading thread made it the slowest stage of a full backup. A buffer is read
    into again only once both the consumer and the digest are done with it.

    An error of the stream is raised to the consumer; a consumer that stops early ends the
    threads.
    """

    def __init__(
        self,
        stream: BinaryIO,
        chunk_size: int = CHUNK_SIZE,
        depth: int = 4,
        digest: Digest | None = None,
    ) -> None:
        self._stream = stream
        self._digest = digest
        # the chunks queued ahead and the one the consumer holds, and as many again for the
        # digest to lag behind the consumer without stalling the reader
        count = (depth + 1) * (2 if digest is not None else 1)
        self._views = [memoryview(bytearray(chunk_size)) for _ in range(count)]
        self._users = 2 if digest is not None else 1
        self._holders = [0] * count
        self._lock = threading.Lock()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(count):
            self._free.put(index)
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._to_digest: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._digest_error: BaseException | None = None

    def _release(self, index: int) -> None:
        with self._lock:
            self._holders[index] -= 1
            if self._holders[index]:
                return
        self._free.put(index)

    def _fill(self, view: memoryview) -> int:
        readinto = getattr(self._stream, "readinto", None)
        if readinto is not None:
            return readinto(view) or 0
        data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def _read(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    index = self._free.get(timeout=0.2)
                except queue.Empty:
                    continue
                size = self._fill(self._views[index])
                if not size:
                    break
                chunk = self._views[index][:size]
                self._holders[index] = self._users  # the buffer is nobody's until queued
                if self._digest is not None:
                    self._to_digest.put((index, chunk))
                self._ready.put((index, chunk))
            self._ready.put(_END)
        except BaseException as error:  # handed to the consumer
            self._ready.put(error)
        finally:
            self._to_digest.put(_END)

    def _hash(self) -> None:
        assert self._digest is not None
        while (item := self._to_digest.get()) is not _END:
            index, chunk = item
            if self._digest_error is None:
                try:
                    self._digest.update(chunk)
                except BaseException as error:  # raised to the consumer at the end
                    self._digest_error = error
            # released even after a failure: the reader waits for this buffer
            self._release(index)

    def __iter__(self) -> Iterator[memoryview]:
        threads = [threading.Thread(target=self._read, name="read-ahead", daemon=True)]
        if self._digest is not None:
            threads.append(threading.Thread(target=self._hash, name="digest", daemon=True))
        for thread in threads:
            thread.start()
        try:
            while True:
                item = self._ready.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                index, chunk = item
                yield chunk
                self._release(index)
        finally:
            self._stop.set()
        # the digest is complete only once its thread has hashed the last chunk
        for thread in threads[1:]:
            thread.join()
        if self._digest_error is not None:
            raise self._digest_error


class BackgroundDigest:
    """A hash computed in its own thread, so hashing overlaps with the transfer (the MD5 of
    what an encrypted remote stores, for example).

    MD5 runs at a few hundred MB/s on one core: inline it would cap the transfer. hashlib
    releases the GIL on large buffers, so a thread really runs it beside the I/O. A bounded
    queue keeps memory at a few chunks.
    """

    def __init__(self, name: str = "md5", depth: int = 8) -> None:
        self.name = name
        self._digest = hashlib.new(name, usedforsecurity=False)
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name=f"{name}-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._digest.update(chunk)

    def update(self, chunk: bytes | memoryview) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        """Wait for the queued chunks and return the digest (the digest is then final)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return self._digest.hexdigest()


def describe_error(error: BaseException) -> str:
    """A user-facing message for any error (ours carry their own; others get their type)."""
    if isinstance(error, XobackupError):
        return str(error)
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
