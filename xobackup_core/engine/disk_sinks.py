"""Where one exported disk goes on one remote: a VHD file or a VhdDirectory.

A sink takes the export's blocks one by one (``put``), then ``finish`` publishes the disk or
``abort`` leaves nothing behind. Several sinks are fed from one export stream by the engine's
fan-out, so each block is read from the host once whatever the number of remotes.

* :class:`VhdFileSink` streams a VHD file through a :class:`~xobackup_core.remote.RemoteWriter`
  (published atomically on commit).
* :class:`VhdDirectorySink` writes XO's VhdDirectory layout (one object per 2 MiB block, the
  alias file last), for object stores that cannot modify files in place and for remotes with
  ``useVhdDirectory``. The directory writer pulls blocks from an iterator, so it runs in its
  own thread fed by a small bounded queue: memory stays at a few blocks.
"""

from __future__ import annotations

import queue
import threading
import uuid as uuidlib
from collections.abc import Iterator
from typing import Any

from xobackup_core.formats.vhd_directory import new_vhd_metadata, write_vhd_directory_backup
from xobackup_core.formats.vhd_structs import build_footer, full_bitmap
from xobackup_core.formats.vhd_writer import ParentLink, VhdStreamLayout
from xobackup_core.remote import Remote, join_path

_DONE = object()
_ABORT = object()
QUEUE_BLOCKS = 4


class VhdFileSink:
    """One VHD file, written forward-only: header and BAT first, blocks, footer."""

    def __init__(self, remote: Remote, folder: str, stamp: str, layout: VhdStreamLayout) -> None:
        self.path = join_path(folder, f"{stamp}.vhd")
        self.layout = layout
        self._bitmap = full_bitmap(layout.header.block_size)
        self._writer = remote.open_write(self.path)
        self._writer.write(layout.metadata)

    @property
    def size(self) -> int:
        return self.layout.stream_size

    def put(self, index: int, data: bytes | memoryview) -> None:
        self._writer.write(self._bitmap)
        self._writer.write(data)

    def finish(self) -> None:
        self._writer.write(build_footer(self.layout.footer))
        self._writer.commit()

    def abort(self) -> None:
        self._writer.abort()


class VhdDirectorySink:
    """One VhdDirectory plus its ``<stamp>.alias.vhd``, written by a thread of its own."""

    def __init__(
        self,
        remote: Remote,
        folder: str,
        stamp: str,
        *,
        size: int,
        uuid: uuidlib.UUID,
        parent: ParentLink | None,
        compression: str,
    ) -> None:
        self.path = join_path(folder, f"{stamp}.alias.vhd")
        self.size = 0
        footer, header, locators = new_vhd_metadata(size, parent=parent, uuid=uuid)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_BLOCKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(remote, folder, stamp, footer, header, locators, compression),
            name="vhd-directory",
            daemon=True,
        )
        self._thread.start()

    def _blocks(self) -> Iterator[tuple[int, bytes | memoryview]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if item is _ABORT:
                raise RuntimeError("the transfer was aborted")
            yield item

    def _run(self, remote: Remote, folder: str, stamp: str, *args: Any) -> None:
        footer, header, locators, compression = args
        try:
            write_vhd_directory_backup(
                remote,
                folder,
                stamp,
                footer,
                header,
                self._blocks(),
                compression=compression,
                parent_locators=locators,
            )
        except BaseException as error:
            self._error = error
            # Unblock a producer waiting on a full queue: nothing will read it any more.
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break

    def _put(self, item: Any) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise self._error or RuntimeError("the directory writer stopped") from None

    def put(self, index: int, data: bytes | memoryview) -> None:
        self._put((index, bytes(data)))
        self.size += len(data)

    def finish(self) -> None:
        self._put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        if self._thread.is_alive():
            try:
                self._queue.put(_ABORT, timeout=5)
            except queue.Full:
                pass
            self._thread.join(timeout=60)
