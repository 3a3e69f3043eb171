"""VhdDirectory: a VHD stored as one object per 2 MiB block, for remotes that cannot patch files.

Layout of one disk (xo-backups.md §2.4), every file compressed on its own with the codec named
in ``chunk-filters.json``::

    <disk>/header                 the 1024-byte dynamic header
    <disk>/footer                 the 512-byte footer
    <disk>/bat                    a bitmap, 1 bit per block (MSB first) — not the VHD BAT
    <disk>/parentLocatorEntry<i>  data of parent locator i (its header offset is 0)
    <disk>/chunk-filters.json     e.g. ["brotli"]; absent when chunks are not compressed
    <disk>/blocks/<n // 1000>/<n % 1000>   512-byte sector bitmap + block data

In a backup repository the directory is ``data/<date>.vhd/`` next to an alias file
``<date>.alias.vhd`` whose content is the relative path of the directory (§2.1); a chain's
parent names are relative paths between aliases. :func:`open_remote_disk` opens a path that is an
alias, a VhdDirectory or a VHD file, so :func:`~xobackup_core.formats.vhd_chain.open_vhd_chain`
with :func:`remote_disk_opener` reads chains that mix both kinds.

Why this exists: an object store cannot change a file in place, so merging a delta into a
monolithic VHD would rewrite the whole disk. Here a merge just *moves* block objects from the
child to the parent (:meth:`Remote.rename`) and rewrites the small ``bat`` —
:func:`merge_vhd_directory_chain`, resumable with the same state file as the VHD-file merge
(:mod:`xobackup_core.formats.vhd_merge`).
"""

from __future__ import annotations

import json
import posixpath
import threading
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import ModuleType
from typing import BinaryIO, TypeVar

from xobackup_core.errors import FormatError, RemoteError, RemoteNotFoundError, UsageError
from xobackup_core.formats.source import RemoteSource
from xobackup_core.formats.vhd import VhdBlock, VhdDisk, VhdFile, WritableVhdDisk
from xobackup_core.formats.vhd_chain import OpenDisk
from xobackup_core.formats.vhd_merge import MergeResult, merge_state_path, virtual_size_or_none
from xobackup_core.formats.vhd_structs import (
    DEFAULT_BLOCK_SIZE,
    DISK_TYPE_DIFFERENCING,
    DISK_TYPE_FIXED,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR_SIZE,
    DynamicHeader,
    Footer,
    bitmap_is_full,
    bitmap_or,
    bitmap_runs,
    build_footer,
    build_header,
    full_bitmap,
    geometry_for_size,
    parse_footer,
    parse_header,
    relative_parent_locators,
    vhd_timestamp,
)
from xobackup_core.formats.vhd_writer import ParentLink, plan_vhd_stream
from xobackup_core.remote import Remote, RemoteStat, RemoteWriter, join_path, normalize_path

CHUNK_FILTERS = "chunk-filters.json"
ALIAS_SUFFIX = ".alias.vhd"
MAX_ALIAS_SIZE = 1024
"""XO caps alias files at 1024 bytes (§2.3); a larger one is not an alias."""
DEFAULT_COMPRESSION = "brotli"
"""XO's default ``vhdDirectoryCompression``."""
WRITE_BLOCK_CONCURRENCY = 16
"""Blocks uploaded in parallel while writing (XO's ``writeBlockConcurrency``)."""
MERGE_BLOCK_CONCURRENCY = 2
"""Blocks merged in parallel (XO's ``mergeBlockConcurrency``)."""
STATE_INTERVAL = 10.0
"""Seconds between merge-state updates while moving blocks (XO's interval)."""
PARENT_LOCATOR_COUNT = 8
BITMAP_READ_SIZE = 4096
"""Compressed bytes first fetched to decode a block's bitmap (more are fetched if needed)."""


# -- per-chunk compression ---------------------------------------------------------------------
class ChunkCodec:
    """Compresses each file of a VhdDirectory independently.

    ``name`` is what ``chunk-filters.json`` holds (``None`` for no compression: XO then has
    no such file). Decompression is bounded by ``limit`` so a corrupt or hostile chunk cannot
    expand into gigabytes.
    """

    def __init__(self, name: str | None) -> None:
        if name not in (None, "gzip", "brotli"):
            raise UsageError(
                f"unknown VhdDirectory compression {name!r}; use 'brotli', 'gzip' or 'none'"
            )
        self.name = name
        if name == "brotli":
            _brotli()

    def compress(self, data: bytes | memoryview) -> bytes:
        """The stored form of ``data``."""
        if self.name is None:
            return bytes(data)
        if self.name == "gzip":
            compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
            return compressor.compress(data) + compressor.flush()
        # XO compresses at brotli's minimum quality: fast, and enough for disk blocks.
        return _brotli().compress(bytes(data), quality=0)

    def decompress(self, data: bytes, limit: int, path: str) -> bytes:
        """The original bytes of a stored chunk (at most ``limit`` of them are produced)."""
        if self.name is None:
            return data
        try:
            if self.name == "gzip":
                decompressor = zlib.decompressobj(31)
                out = decompressor.decompress(data, limit + 1)
                if len(out) <= limit and not decompressor.eof:
                    raise ValueError("truncated gzip data")
            else:
                out = _brotli().Decompressor().process(data, output_buffer_limit=limit + 1)
        except (zlib.error, ValueError) as error:
            raise FormatError(f"corrupt {self.name} chunk: {error}", path=path) from None
        except Exception as error:
            if type(error).__name__ == "error":  # brotli.error
                raise FormatError(f"corrupt brotli chunk: {error}", path=path) from None
            raise
        if len(out) > limit:
            raise FormatError(f"chunk decompresses to more than {limit} bytes", path=path)
        return out


def _brotli() -> ModuleType:
    try:
        import brotli
    except ImportError as error:  # pragma: no cover - a packaging error
        raise UsageError(
            "VhdDirectory brotli compression needs the Python package 'brotli'"
        ) from error
    return brotli


def codec_for(compression: str | None) -> ChunkCodec:
    """The codec of a compression setting (``none``/None, ``gzip``, ``brotli``)."""
    return ChunkCodec(None if compression in (None, "", "none") else compression)


def block_path(index: int) -> str:
    """Where block ``index`` lives inside the directory (limits files per folder to 1000)."""
    return f"blocks/{index // 1000}/{index % 1000}"


# -- aliases -----------------------------------------------------------------------------------
def is_alias(path: str) -> bool:
    """Whether ``path`` names an alias file (``<date>.alias.vhd``)."""
    return path.endswith(ALIAS_SUFFIX)


def resolve_alias(remote: Remote, alias_path: str) -> str:
    """The VhdDirectory an alias points to (its content, relative to the alias's folder).

    Raises :class:`FormatError` for an oversized alias or one pointing to another alias
    (XO forbids chains of aliases); the resulting path cannot climb out of the remote.
    """
    alias_path = normalize_path(alias_path)
    if remote.stat(alias_path).size > MAX_ALIAS_SIZE:
        raise FormatError(f"alias file is over {MAX_ALIAS_SIZE} bytes", path=alias_path)
    try:
        target = remote.read_bytes(alias_path).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise FormatError("alias file is not UTF-8 text", path=alias_path) from None
    if not target:
        raise FormatError("alias file is empty", path=alias_path)
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(alias_path), target))
    resolved = normalize_path(resolved)
    if is_alias(resolved):
        raise FormatError(f"alias points to another alias ({target})", path=alias_path)
    return resolved


def write_alias(remote: Remote, alias_path: str, data_path: str) -> None:
    """Write the alias ``alias_path`` pointing to ``data_path`` (stored relative)."""
    folder = posixpath.dirname(normalize_path(alias_path))
    remote.write_bytes(alias_path, posixpath.relpath(normalize_path(data_path), folder).encode())


# -- the disk ----------------------------------------------------------------------------------
class VhdDirectory(WritableVhdDisk):
    """A VHD stored as a directory on a :class:`Remote` (see the module docstring).

    Thread-safe for concurrent :meth:`read_block` and :meth:`write_block` calls. Writes become
    visible as whole files; :meth:`write_bat`, :meth:`write_header` and :meth:`write_footer`
    publish the metadata, footer last.
    """

    def __init__(
        self,
        remote: Remote,
        path: str,
        footer: Footer,
        header: DynamicHeader,
        bat: bytearray,
        codec: ChunkCodec,
        *,
        writable: bool,
    ) -> None:
        self.remote = remote
        self.directory = normalize_path(path)
        self.path = f"{remote.name}:{self.directory}"
        self.footer = footer
        self.header = header
        self.codec = codec
        self._bat = bat
        self._writable = writable
        self._lock = threading.Lock()

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, remote: Remote, path: str, *, writable: bool = False) -> VhdDirectory:
        """Open the VhdDirectory at ``path`` (a directory, not an alias).

        Raises :class:`FormatError` naming the file and field when a part is missing or bad.
        """
        directory = normalize_path(path)
        display = f"{remote.name}:{directory}"
        codec = ChunkCodec(_read_chunk_filters(remote, directory, display))

        def part(name: str, limit: int) -> bytes:
            try:
                raw = remote.read_bytes(join_path(directory, name))
            except RemoteNotFoundError:
                raise FormatError("missing", path=display, field=name) from None
            return codec.decompress(raw, limit, f"{display}/{name}")

        footer = parse_footer(part("footer", FOOTER_SIZE), path=f"{display}/footer")
        if footer.disk_type == DISK_TYPE_FIXED:
            raise FormatError(
                "a VhdDirectory cannot hold a fixed disk", path=display, field="footer.disk_type"
            )
        header = parse_header(part("header", HEADER_SIZE), path=f"{display}/header")
        needed = -(-footer.current_size // header.block_size)
        if header.max_table_entries < needed:
            raise FormatError(
                f"{header.max_table_entries} blocks, the disk size needs {needed}",
                path=f"{display}/header",
                field="max_table_entries",
            )
        bat_bytes = -(-header.max_table_entries // 8)
        # Xen Orchestra sizes its ``bat`` at one byte per table entry (only the first
        # ``bat_bytes`` carry bits), eight times what the bitmap needs: accept that much.
        bat = bytearray(part("bat", max(bat_bytes * 2, header.max_table_entries, 1)))
        if len(bat) < bat_bytes:
            raise FormatError(
                f"block bitmap is {len(bat)} bytes, {header.max_table_entries} blocks need "
                f"{bat_bytes} (truncated?)",
                path=display,
                field="bat",
            )
        del bat[bat_bytes:]
        return cls(remote, directory, footer, header, bat, codec, writable=writable)

    @classmethod
    def create(
        cls,
        remote: Remote,
        path: str,
        footer: Footer,
        header: DynamicHeader,
        *,
        compression: str | None = DEFAULT_COMPRESSION,
    ) -> VhdDirectory:
        """Start a new, empty VhdDirectory at ``path``; nothing is written until the first
        block or metadata write, and the disk is complete only after :meth:`write_footer`."""
        if footer.disk_type == DISK_TYPE_FIXED:
            raise ValueError("a VhdDirectory holds dynamic or differencing disks")
        remote.makedirs(path)
        bat = bytearray(-(-header.max_table_entries // 8))
        return cls(remote, path, footer, header, bat, codec_for(compression), writable=True)

    # -- reading ---------------------------------------------------------------------------
    @property
    def compression(self) -> str | None:
        """The chunk codec name (None: uncompressed)."""
        return self.codec.name

    @property
    def bat(self) -> bytes:
        """The block bitmap as stored in ``bat``."""
        return bytes(self._bat)

    def block_file(self, index: int) -> str:
        """The remote path of block ``index``'s file."""
        return join_path(self.directory, block_path(index))

    def has_block(self, index: int) -> bool:
        if not 0 <= index < self.block_count:
            return False
        return bool(self._bat[index >> 3] & (0x80 >> (index & 7)))

    def allocated_blocks(self) -> Iterator[int]:
        count = self.block_count
        for byte_index, byte in enumerate(self._bat):
            if not byte:
                continue
            base = byte_index * 8
            for bit in range(8):
                if byte & (0x80 >> bit) and base + bit < count:
                    yield base + bit

    def allocated_count(self) -> int:
        return sum(1 for _ in self.allocated_blocks())

    def _read_raw_block(self, index: int) -> bytes:
        path = self.block_file(index)
        try:
            return self.remote.read_bytes(path)
        except RemoteNotFoundError:
            raise FormatError(
                "block is marked present in bat but its file is missing"
                + self._pending_merge_hint(),
                path=f"{self.remote.name}:{path}",
                field=f"bat[{index}]",
            ) from None

    def _pending_merge_hint(self) -> str:
        """Why a block file can be missing: a merge (ours or Xen Orchestra's) that moved
        it and was cut short leaves its state file beside the disks' aliases."""
        folder = posixpath.dirname(posixpath.dirname(self.directory))
        try:
            states = [n for n in self.remote.list(folder) if n.endswith(".merge.json")]
        except RemoteError:
            return ""
        if not states:
            return ""
        return (
            f" (an interrupted merge is pending in {join_path(folder, states[0])}; the next "
            "backup run of this job finishes it)"
        )

    def _read_block_file(self, index: int, limit: int) -> bytes:
        raw = self._read_raw_block(index)
        return self.codec.decompress(raw, limit, f"{self.remote.name}:{self.block_file(index)}")

    def read_block(self, index: int) -> VhdBlock | None:
        if not self.has_block(index):
            return None
        bitmap_bytes = self.header.bitmap_size
        span = bitmap_bytes + self.header.block_size
        content = self._read_block_file(index, span)
        if len(content) != span:
            raise FormatError(
                f"block file holds {len(content)} bytes, expected {span}",
                path=f"{self.remote.name}:{self.block_file(index)}",
            )
        view = memoryview(content)
        return VhdBlock(bytes(view[:bitmap_bytes]), view[bitmap_bytes:])

    def read_block_bitmap(self, index: int) -> bytes:
        bitmap_bytes = self.header.bitmap_size
        if not self.has_block(index):
            return bytes(bitmap_bytes)
        where = f"{self.remote.name}:{self.block_file(index)}"
        if self.codec.name is None:
            prefix = self.remote.read_range(self.block_file(index), 0, bitmap_bytes)
            if not prefix and not self.remote.exists(self.block_file(index)):
                self._read_raw_block(index)
        else:
            prefix = self._compressed_prefix(index, bitmap_bytes, where)
        if len(prefix) < bitmap_bytes:
            raise FormatError("block file is shorter than its bitmap", path=where)
        return prefix[:bitmap_bytes]

    def _compressed_prefix(self, index: int, wanted: int, where: str) -> bytes:
        """The first ``wanted`` decompressed bytes of block ``index``'s file (fewer if it is
        shorter), reading only as much of the compressed file as they need.

        Both codecs stream, so the bitmap comes out of the file's first bytes: fetching only
        those keeps a merge on an object store from downloading every block it moves.
        """
        path = self.block_file(index)
        gzip = self.codec.name == "gzip"
        decoder = zlib.decompressobj(31) if gzip else _brotli().Decompressor()
        out = b""
        offset, step = 0, BITMAP_READ_SIZE
        while len(out) < wanted:
            try:
                raw = self.remote.read_range(path, offset, step)
            except RemoteNotFoundError:
                raw = b""
            if not raw:
                if offset == 0 and not self.remote.exists(path):
                    self._read_raw_block(index)  # raises the error naming the missing file
                break
            offset += len(raw)
            try:
                if gzip:
                    out += decoder.decompress(raw, wanted - len(out))
                else:
                    out += decoder.process(raw, output_buffer_limit=wanted - len(out))
            except zlib.error as error:
                raise FormatError(f"corrupt gzip chunk: {error}", path=where) from None
            except Exception as error:
                if type(error).__name__ == "error":  # brotli.error
                    raise FormatError(f"corrupt brotli chunk: {error}", path=where) from None
                raise
            if len(raw) < step or (gzip and decoder.eof) or (not gzip and decoder.is_finished()):
                break
            step *= 8
        return out

    def read_parent_locator(self, index: int) -> bytes | None:
        """The data of parent locator ``index`` (None when the file does not exist)."""
        path = join_path(self.directory, f"parentLocatorEntry{index}")
        try:
            raw = self.remote.read_bytes(path)
        except RemoteNotFoundError:
            return None
        return self.codec.decompress(raw, 64 * 1024, f"{self.remote.name}:{path}")

    # -- writing ---------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if not self._writable:
            raise ValueError(f"{self.path} was opened read-only")

    def _write_part(self, name: str, data: bytes | memoryview) -> None:
        self.remote.write_bytes(join_path(self.directory, name), self.codec.compress(data))

    def write_block(self, index: int, bitmap: bytes, data: bytes | memoryview) -> None:
        """Store block ``index`` and mark it present (in memory; :meth:`write_bat` saves)."""
        self._check_writable()
        if not 0 <= index < self.block_count:
            raise ValueError(f"block {index} is outside the disk's {self.block_count} blocks")
        if len(bitmap) != self.header.bitmap_size:
            raise ValueError(f"bitmap of block {index} must be {self.header.bitmap_size} bytes")
        if len(data) > self.header.block_size:
            raise ValueError(f"block {index} has {len(data)} bytes, more than a block")
        content = bytes(bitmap) + bytes(data)
        if len(data) < self.header.block_size:
            content += bytes(self.header.block_size - len(data))
        self.remote.write_bytes(self.block_file(index), self.codec.compress(content))
        self.mark_allocated(index)

    def mark_allocated(self, index: int, allocated: bool = True) -> None:
        """Set or clear block ``index`` in the in-memory block bitmap."""
        with self._lock:
            if allocated:
                self._bat[index >> 3] |= 0x80 >> (index & 7)
            else:
                self._bat[index >> 3] &= ~(0x80 >> (index & 7)) & 0xFF

    def grow(self, size: int) -> None:
        """Let the disk address ``size`` bytes: more block entries (in memory)."""
        entries = -(-size // self.header.block_size)
        if entries > self.header.max_table_entries:
            with self._lock:
                self.header = self.header.replace(max_table_entries=entries)
                self._bat.extend(bytes(-(-entries // 8) - len(self._bat)))

    def write_parent_locator(self, index: int, data: bytes) -> None:
        """Store the data of parent locator ``index`` (the header's entry keeps offset 0)."""
        self._check_writable()
        self._write_part(f"parentLocatorEntry{index}", data)

    def write_bat(self) -> None:
        self._check_writable()
        with self._lock:
            bat = bytes(self._bat)
        self._write_part("bat", bat)

    def write_header(self) -> None:
        self._check_writable()
        self._write_part("header", build_header(self.header))
        # As XO does, the header write also records the chunk codec.
        filters = join_path(self.directory, CHUNK_FILTERS)
        if self.codec.name is None:
            self.remote.delete(filters, missing_ok=True)
        else:
            self.remote.write_bytes(filters, json.dumps([self.codec.name]).encode())

    def write_footer(self) -> None:
        self._check_writable()
        self._write_part("footer", build_footer(self.footer))

    def flush(self) -> None:
        """Nothing to do: every remote write is durable once its writer is committed."""


def _read_chunk_filters(remote: Remote, directory: str, display: str) -> str | None:
    path = join_path(directory, CHUNK_FILTERS)
    try:
        raw = remote.read_bytes(path)
    except RemoteNotFoundError:
        if not remote.exists(directory) or not remote.stat(directory).is_dir:
            raise FormatError("not a VhdDirectory (no such directory)", path=display) from None
        return None
    try:
        filters = json.loads(raw)
    except ValueError:
        raise FormatError("not valid JSON", path=display, field=CHUNK_FILTERS) from None
    if not isinstance(filters, list) or len(filters) > 1:
        raise FormatError(
            f"expected a list of at most one codec, found {filters!r}",
            path=display,
            field=CHUNK_FILTERS,
        )
    name = filters[0] if filters else None
    if name not in (None, "gzip", "brotli"):
        raise FormatError(f"unsupported chunk codec {name!r}", path=display, field=CHUNK_FILTERS)
    return name


# -- opening any disk on a remote --------------------------------------------------------------
def open_remote_disk(remote: Remote, path: str, *, writable: bool = False) -> VhdDisk:
    """Open ``path`` on ``remote``: an alias (its VhdDirectory), a VhdDirectory, or a VHD file.

    The returned disk's ``path`` names what was opened; chains resolve parent names relative to
    the path given here (the alias, as XO does).
    """
    path = normalize_path(path)
    if is_alias(path):
        return VhdDirectory.open(remote, resolve_alias(remote, path), writable=writable)
    if remote.stat(path).is_dir:
        return VhdDirectory.open(remote, path, writable=writable)
    if writable:
        raise UsageError(f"{path} is a VHD file: use the VHD-file merge to change it")
    return VhdFile.open(RemoteSource(remote, path))


def remote_disk_opener(remote: Remote) -> OpenDisk:
    """An ``open_disk`` for :func:`~xobackup_core.formats.vhd_chain.open_vhd_chain` that
    reads aliases, VhdDirectory disks and VHD files on ``remote``."""

    def open_disk(path: str) -> VhdDisk:
        return open_remote_disk(remote, path)

    return open_disk


# -- writing a whole disk ----------------------------------------------------------------------
BlockSource = Iterable[tuple[int, bytes | memoryview]] | Iterable[tuple[int, bytes, bytes]]


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_vhd_directory` stored."""

    path: str
    blocks: int
    stored_bytes: int
    """Bytes written to the remote (compressed chunks and metadata)."""


def new_vhd_metadata(
    size: int,
    *,
    parent: ParentLink | None = None,
    uuid: uuidlib.UUID | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[Footer, DynamicHeader, dict[int, bytes]]:
    """Footer, header and parent-locator data of a new dynamic (or differencing) disk.

    The header's locator 0 is a relative ``W2ru`` locator with data offset 0: a VhdDirectory
    keeps the data in ``parentLocatorEntry0``.
    """
    layout = plan_vhd_stream(size, [], parent=parent, uuid=uuid, block_size=block_size)
    header = layout.header
    locators: dict[int, bytes] = {}
    if parent is not None:
        locator, data = relative_parent_locators(parent.name, 0)
        header = header.replace(parent_locators=(locator, *header.parent_locators[1:]))
        locators[0] = data[: locator.data_length]
    return layout.footer, header, locators


def write_vhd_directory(
    remote: Remote,
    path: str,
    footer: Footer,
    header: DynamicHeader,
    blocks: BlockSource,
    *,
    compression: str | None = DEFAULT_COMPRESSION,
    parent_locators: Mapping[int, bytes] | None = None,
    concurrency: int = WRITE_BLOCK_CONCURRENCY,
) -> WriteResult:
    """Write a whole VhdDirectory at ``path`` from ``blocks``.

    ``blocks`` yields ``(index, data)`` (a full bitmap is stored) or ``(index, bitmap, data)``
    in any order. Blocks are compressed and uploaded by ``concurrency`` threads; at most twice
    that many blocks are held in memory, so memory does not grow with the disk. Parent locator
    data, ``bat``, ``header`` (with ``chunk-filters.json``) and ``footer`` are written last, the
    footer at the very end: a directory without a footer is incomplete.
    """
    counter = _CountingRemote(remote)
    disk = VhdDirectory.create(counter, path, footer, header, compression=compression)
    full = full_bitmap(header.block_size)
    in_flight: list[Future[None]] = []
    count = 0
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        try:
            for item in blocks:
                if len(item) == 2:
                    index, data = item  # type: ignore[misc]
                    bitmap = full
                else:
                    index, bitmap, data = item  # type: ignore[misc]
                in_flight.append(pool.submit(disk.write_block, index, bitmap, data))
                count += 1
                if len(in_flight) >= 2 * max(1, concurrency):
                    in_flight.pop(0).result()
            for future in in_flight:
                future.result()
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
    for index, data in (parent_locators or {}).items():
        disk.write_parent_locator(index, data)
    disk.write_bat()
    disk.write_header()
    disk.write_footer()
    return WriteResult(disk.directory, count, counter.bytes_written)


def write_vhd_directory_backup(
    remote: Remote,
    vdi_folder: str,
    date: str,
    footer: Footer,
    header: DynamicHeader,
    blocks: BlockSource,
    *,
    compression: str | None = DEFAULT_COMPRESSION,
    parent_locators: Mapping[int, bytes] | None = None,
    concurrency: int = WRITE_BLOCK_CONCURRENCY,
) -> str:
    """Write a disk in XO's repository layout and return the alias path.

    The data goes to ``<vdi_folder>/data/<date>.vhd/``, then the alias
    ``<vdi_folder>/<date>.alias.vhd`` is written, last, so a disk is visible only once complete.
    On any error both are removed.
    """
    data_path = join_path(vdi_folder, "data", f"{date}.vhd")
    alias_path = join_path(vdi_folder, f"{date}{ALIAS_SUFFIX}")
    try:
        write_vhd_directory(
            remote,
            data_path,
            footer,
            header,
            blocks,
            compression=compression,
            parent_locators=parent_locators,
            concurrency=concurrency,
        )
        # Check what was written reads back before publishing it (XO validates too).
        VhdDirectory.open(remote, data_path).close()
        write_alias(remote, alias_path, data_path)
    except BaseException:
        try:
            remote.delete(alias_path, missing_ok=True)
            remote.delete_tree(data_path)
        except RemoteError:
            pass
        raise
    return alias_path


def copy_disk_to_directory(
    source: VhdDisk,
    remote: Remote,
    path: str,
    *,
    compression: str | None = DEFAULT_COMPRESSION,
    concurrency: int = WRITE_BLOCK_CONCURRENCY,
) -> WriteResult:
    """Store any :class:`VhdDisk` (a VHD file...) as a VhdDirectory with the same footer,
    header and parent locators."""
    if source.header is None:
        raise UsageError(f"{source.path} is a fixed VHD; store it as a dynamic one")
    header = source.header
    locators: dict[int, bytes] = {}
    if isinstance(source, VhdDirectory):
        for index in range(PARENT_LOCATOR_COUNT):
            data = source.read_parent_locator(index)
            if data is not None:
                locators[index] = data
    elif isinstance(source, VhdFile):
        for index, locator in enumerate(header.parent_locators):
            if locator.platform_code and locator.data_length:
                locators[index] = source.source.read_at(locator.data_offset, locator.data_length)
    header = header.replace(
        parent_locators=tuple(replace(loc, data_offset=0) for loc in header.parent_locators)
    )

    def blocks() -> Iterator[tuple[int, bytes, bytes | memoryview]]:
        for index in source.allocated_blocks():
            block = source.read_block(index)
            assert block is not None
            yield index, block.bitmap, block.data

    return write_vhd_directory(
        remote,
        path,
        source.footer,
        header,
        blocks(),
        compression=compression,
        parent_locators=locators,
        concurrency=concurrency,
    )


def vhd_file_stream(disk: VhdDisk) -> Iterator[bytes | memoryview]:
    """The disk as a VHD file stream (dynamic or differencing, same uuid and parent link).

    Every block is written with a full bitmap, so a differencing block with a partial bitmap
    is expanded from its own data only; use it on disks whose blocks are whole (XAPI deltas,
    our writers), or on a chain's root.
    """
    from xobackup_core.formats.vhd_writer import vhd_stream

    parent = None
    if disk.is_differencing and disk.header is not None:
        parent = ParentLink(disk.header.parent_uuid, disk.parent_name, disk.header.parent_timestamp)
    allocated = list(disk.allocated_blocks())
    layout = plan_vhd_stream(
        disk.size,
        allocated,
        parent=parent,
        uuid=disk.uuid,
        block_size=disk.block_size,
        timestamp=disk.footer.timestamp,
    )

    def blocks() -> Iterator[tuple[int, bytes | memoryview]]:
        for index in allocated:
            block = disk.read_block(index)
            assert block is not None
            yield index, block.data

    return vhd_stream(layout, blocks())


class _CountingRemote(Remote):
    """Passes everything to ``inner`` and counts the bytes written through it."""

    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.name = inner.name
        self.supports_update = inner.supports_update
        self.bytes_written = 0
        self._lock = threading.Lock()

    def write_bytes(self, path: str, data: bytes) -> None:
        self.inner.write_bytes(path, data)
        with self._lock:
            self.bytes_written += len(data)

    def open_write(self, path: str) -> RemoteWriter:
        return self.inner.open_write(path)

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        return self.inner.open_read(path, offset, length)

    def read_bytes(self, path: str) -> bytes:
        return self.inner.read_bytes(path)

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        return self.inner.read_range(path, offset, length)

    def list(self, path: str = "/") -> list[str]:
        return self.inner.list(path)

    def stat(self, path: str) -> RemoteStat:
        return self.inner.stat(path)

    def rename(self, source: str, target: str) -> None:
        self.inner.rename(source, target)

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        self.inner.delete(path, missing_ok=missing_ok)

    def delete_tree(self, path: str) -> None:
        self.inner.delete_tree(path)

    def makedirs(self, path: str) -> None:
        self.inner.makedirs(path)


# -- merging -----------------------------------------------------------------------------------
Progress = Callable[[int, int], None]


def _relative(folder: str, path: str) -> str:
    return posixpath.relpath(normalize_path(path), folder)


def _read_state(remote: Remote, state_path: str) -> dict | None:
    try:
        raw = remote.read_bytes(state_path)
    except RemoteNotFoundError:
        return None
    try:
        state = json.loads(raw)
        if not isinstance(state, dict) or not isinstance(state.get("chain"), list):
            raise ValueError("not a merge state")
    except ValueError as error:
        raise FormatError(f"unreadable merge state ({error})", path=state_path) from None
    return state


def _write_state(remote: Remote, state_path: str, state: dict) -> None:
    remote.write_bytes(state_path, json.dumps(state).encode())


def is_directory_disk(remote: Remote, path: str) -> bool:
    """Whether ``path`` is an alias or a VhdDirectory (rather than a VHD file)."""
    path = normalize_path(path)
    if is_alias(path):
        return True
    try:
        return remote.stat(path).is_dir
    except RemoteNotFoundError:
        return False


def merge_vhd_directory_chain(
    remote: Remote,
    chain: Sequence[str],
    *,
    concurrency: int = MERGE_BLOCK_CONCURRENCY,
    progress: Progress | None = None,
    state_interval: float = STATE_INTERVAL,
) -> MergeResult:
    """Merge ``chain[1:]`` (newest last) into ``chain[0]``, a VhdDirectory alias.

    Blocks of the newest child holding each block are *moved* into the parent
    (:meth:`Remote.rename`, no data copied) when both are VhdDirectory disks with the same
    compression and the child's block is whole; otherwise the block is composed and written.
    Then the parent takes the newest child's uuid and size, its alias replaces the newest
    child's alias, and the children's data is deleted (xo-backups.md §2.5).

    A state file ``.<parent name>.merge.json`` is written at the start, at most every
    ``state_interval`` seconds, and when cleanup starts; calling this again with the same chain
    (or :func:`resume_directory_merges`) after a crash finishes the merge with the same result.
    """
    if len(chain) < 2:
        raise UsageError("a merge needs a parent and at least one child")
    paths = [normalize_path(path) for path in chain]
    if not is_alias(paths[0]) or not is_alias(paths[-1]):
        raise UsageError(
            "a VhdDirectory merge needs the parent and the newest child as alias files "
            f"(*{ALIAS_SUFFIX}): {paths[0]}, {paths[-1]}"
        )
    folder = posixpath.dirname(paths[0])
    state_path = merge_state_path(paths[0])
    state = _read_state(remote, state_path)
    if state is not None:
        recorded = [join_path(folder, name) for name in state["chain"]]
        if recorded != paths:
            raise UsageError(
                f"an interrupted merge of another chain is pending in {state_path}: "
                f"{', '.join(recorded)}"
            )
        return _resume(remote, state_path, state, concurrency, progress, state_interval)
    return _merge(remote, paths, state_path, None, concurrency, progress, state_interval)


def merge_chain(remote: Remote, chain: Sequence[str], **options: object) -> MergeResult:
    """Merge a chain of either kind: VhdDirectory aliases here, VHD files with
    :func:`xobackup_core.formats.vhd_merge.merge_vhd_chain` (XO keeps chains homogeneous)."""
    if chain and is_alias(normalize_path(chain[0])):
        return merge_vhd_directory_chain(remote, chain, **options)  # type: ignore[arg-type]
    from xobackup_core.formats.vhd_merge import merge_vhd_chain

    options.pop("concurrency", None)
    return merge_vhd_chain(remote, chain, **options)  # type: ignore[arg-type]


def resume_directory_merges(
    remote: Remote, folder: str, *, progress: Progress | None = None
) -> list[str]:
    """Finish every interrupted VhdDirectory merge in ``folder``; returns the merged disks.

    State files of VHD-file merges are left to :func:`xobackup_core.formats.vhd_merge.
    resume_merges`; those whose disks are all gone are deleted.
    """
    done = []
    for name in remote.list(folder):
        if not (name.startswith(".") and name.endswith(".merge.json")):
            continue
        state_path = join_path(folder, name)
        state = _read_state(remote, state_path)
        if state is None or not state["chain"] or not is_alias(str(state["chain"][0])):
            continue
        result = _resume(
            remote, state_path, state, MERGE_BLOCK_CONCURRENCY, progress, STATE_INTERVAL
        )
        done.append(result.path)
    return done


def _resume(
    remote: Remote,
    state_path: str,
    state: dict,
    concurrency: int,
    progress: Progress | None,
    state_interval: float,
) -> MergeResult:
    folder = posixpath.dirname(state_path)
    paths = [join_path(folder, str(name)) for name in state["chain"]]
    if state.get("step") == "cleanup":
        return _cleanup(remote, paths, state_path, state, resumed=True)
    if not all(remote.exists(path) for path in paths):
        remote.delete(state_path, missing_ok=True)
        raise FormatError(
            "interrupted merge refers to disks that no longer exist; its state was removed",
            path=state_path,
        )
    return _merge(remote, paths, state_path, state, concurrency, progress, state_interval)


def _merge(
    remote: Remote,
    paths: list[str],
    state_path: str,
    state: dict | None,
    concurrency: int,
    progress: Progress | None,
    state_interval: float,
) -> MergeResult:
    resumed = state is not None
    parent = open_remote_disk(remote, paths[0], writable=True)
    assert isinstance(parent, VhdDirectory)
    children = [open_remote_disk(remote, path) for path in paths[1:]]
    try:
        leaf = children[-1]
        _check_links(parent, children)
        folder = posixpath.dirname(state_path)
        if state is None:
            state = {
                "child": {"uuid": str(leaf.uuid)},
                "parent": {"uuid": str(parent.uuid)},
                "chain": [_relative(folder, path) for path in paths],
                "currentBlock": 0,
                "mergedDataSize": 0,
                "step": "mergeBlocks",
                "diskSize": leaf.size,
            }
            _write_state(remote, state_path, state)
        if leaf.size > parent.size:
            # bat before header: a longer bat is accepted, a shorter one is not.
            parent.grow(leaf.size)
            parent.write_bat()
            parent.write_header()
        blocks = sorted(
            {
                index
                for child in children
                for index in child.allocated_blocks()
                if index < parent.block_count
            }
        )
        start = int(state.get("currentBlock", 0))
        if resumed:
            # Blocks below currentBlock were merged: moved files left their child, so mark
            # them in the parent whatever its saved bat says (XO's rule).
            for index in blocks:
                if index < start:
                    parent.mark_allocated(index)
        todo = [index for index in blocks if index >= start]
        merged_bytes = int(state.get("mergedDataSize", 0))
        last_save = time.monotonic()
        results = _bounded_map(
            lambda i: _merge_block(parent, children, i, resumed), todo, concurrency
        )
        for done, (index, size) in enumerate(zip(todo, results, strict=True), 1):
            merged_bytes += size
            if progress is not None:
                progress(done, len(todo))
            if time.monotonic() - last_save >= state_interval:
                # bat first: the state never claims more than the parent records.
                parent.write_bat()
                state.update(currentBlock=index + 1, mergedDataSize=merged_bytes)
                _write_state(remote, state_path, state)
                last_save = time.monotonic()
        parent.write_bat()
        removals = _removals(remote, paths)
        state.update(
            currentBlock=parent.block_count,
            mergedDataSize=merged_bytes,
            step="cleanup",
            removePaths=[_relative(folder, path) for path in removals],
        )
        _write_state(remote, state_path, state)
    finally:
        parent.close()
        for child in children:
            child.close()
    result = _cleanup(remote, paths, state_path, state, resumed=resumed)
    return MergeResult(result.path, len(blocks), merged_bytes, resumed)


T = TypeVar("T")
R = TypeVar("R")


def _bounded_map(function: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """``function`` over ``items`` on ``workers`` threads, results in order, at most
    ``2 × workers`` in flight; on an error the pending ones are cancelled."""
    window = 2 * max(1, workers)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: list[Future[R]] = []
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) >= window:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()


def _check_links(parent: VhdDisk, children: Sequence[VhdDisk]) -> None:
    above = parent
    for child in children:
        if not child.is_differencing or child.parent_uuid != above.uuid:
            raise FormatError(
                f"is not a child of {above.path} (parent uuid {child.parent_uuid}, expected "
                f"{above.uuid})",
                path=child.path,
                field="header.parent_uuid",
            )
        above = child


def _merge_block(
    parent: VhdDirectory, children: Sequence[VhdDisk], index: int, resumed: bool
) -> int:
    """Make ``parent``'s block ``index`` what the newest child sees; returns bytes merged."""
    newest = next(child for child in reversed(children) if child.has_block(index))
    if (
        isinstance(newest, VhdDirectory)
        and newest.remote is parent.remote
        and newest.compression == parent.compression
        and newest.block_size == parent.block_size
    ):
        source, target = newest.block_file(index), parent.block_file(index)
        try:
            whole = bitmap_is_full(newest.read_block_bitmap(index), newest.block_size)
        except FormatError:
            if not resumed or not parent.remote.exists(target):
                raise
            # Moved before the interruption: the parent already holds the child's block.
            parent.mark_allocated(index)
            return parent.block_size
        if whole:
            parent.remote.rename(source, target)
            parent.mark_allocated(index)
            return parent.block_size
    _compose_block(parent, children, index)
    return parent.block_size


def _compose_block(parent: VhdDirectory, children: Sequence[VhdDisk], index: int) -> None:
    block_size = parent.block_size
    sectors = block_size // SECTOR_SIZE
    full = (1 << sectors) - 1
    covered = 0
    result: bytearray | None = None
    bitmap = b""
    for child in reversed(children):
        block = child.read_block(index)
        if block is None:
            continue
        if result is None and bitmap_is_full(block.bitmap, block_size):
            parent.write_block(index, block.bitmap, block.data)
            return
        if result is None:
            # Sectors no child sets keep the parent's own value.
            base = parent.read_block(index)
            result = bytearray(base.data) if base is not None else bytearray(block_size)
            bitmap = base.bitmap if base is not None else bytes(parent.header.bitmap_size)
        bits = int.from_bytes(block.bitmap[: sectors // 8], "big")
        wanted = bits & ~covered & full
        for first, count in bitmap_runs(wanted.to_bytes(sectors // 8, "big"), block_size):
            start, end = first * SECTOR_SIZE, (first + count) * SECTOR_SIZE
            result[start:end] = block.data[start:end]
        covered |= wanted
        bitmap = bitmap_or(bitmap, block.bitmap)
    if result is not None:
        parent.write_block(index, bitmap, result)


def _removals(remote: Remote, paths: list[str]) -> list[str]:
    """What cleanup deletes: every child's data and every child alias but the newest's
    (which the parent's alias replaces). Resolved now, before any alias moves."""
    removals: list[str] = []
    for path in paths[1:]:
        if is_alias(path):
            try:
                removals.append(resolve_alias(remote, path))
            except RemoteNotFoundError:
                pass
            if path != paths[-1]:
                removals.append(path)
        else:
            removals.append(path)
    return removals


def _cleanup(
    remote: Remote, paths: list[str], state_path: str, state: dict, *, resumed: bool
) -> MergeResult:
    folder = posixpath.dirname(state_path)
    parent_path, leaf_path = paths[0], paths[-1]
    removals = state.get("removePaths")
    if removals is None:
        # A state Xen Orchestra wrote: it names no paths to remove, so resolve the children's
        # data now, before the parent's alias takes the newest child's name.
        removals = [_relative(folder, path) for path in _removals(remote, paths)]
    if remote.exists(parent_path):
        parent = open_remote_disk(remote, parent_path, writable=True)
        assert isinstance(parent, VhdDirectory)
        # Not the state's ``diskSize``: Xen Orchestra records the size on disk there. The
        # newest child has the virtual size until the rename below; if XO's cleanup already
        # deleted it, XO had given the parent its metadata.
        size = virtual_size_or_none(remote_disk_opener(remote), leaf_path) or parent.size
        parent.grow(size)
        footer = parent.footer.replace(
            uuid=uuidlib.UUID(state["child"]["uuid"]), timestamp=vhd_timestamp(time.time())
        )
        if size != footer.current_size:
            footer = footer.replace(
                current_size=size, original_size=size, geometry=geometry_for_size(size)
            )
        parent.footer = footer
        parent.write_header()
        parent.write_footer()
        # The parent's alias replaces the newest child's: children of that child still find
        # their parent under the same name and uuid.
        remote.rename(parent_path, leaf_path)
    for relative in removals:
        path = join_path(folder, str(relative))
        try:
            if remote.stat(path).is_dir:
                remote.delete_tree(path)
            else:
                remote.delete(path, missing_ok=True)
        except RemoteNotFoundError:
            pass
    remote.delete(state_path, missing_ok=True)
    return MergeResult(leaf_path, 0, int(state.get("mergedDataSize", 0)), resumed)


__all__ = [
    "ALIAS_SUFFIX",
    "CHUNK_FILTERS",
    "DEFAULT_COMPRESSION",
    "DISK_TYPE_DIFFERENCING",
    "ChunkCodec",
    "VhdDirectory",
    "WriteResult",
    "block_path",
    "codec_for",
    "copy_disk_to_directory",
    "is_alias",
    "is_directory_disk",
    "merge_chain",
    "merge_vhd_directory_chain",
    "new_vhd_metadata",
    "open_remote_disk",
    "remote_disk_opener",
    "resolve_alias",
    "resume_directory_merges",
    "vhd_file_stream",
    "write_alias",
    "write_vhd_directory",
    "write_vhd_directory_backup",
]
