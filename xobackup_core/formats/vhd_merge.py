"""Merge (coalesce) a run of differencing VHD files into their parent, resumably.

This is what XO's cleanup does to deltas no backup needs any more (xo-backups.md §2.5):
``chain = [parent, child1, ..., childN]`` (oldest first, all in one folder). Only the blocks
allocated in the children are touched: each is composed from the children (the newest sector
wins, so a full-bitmap block is a plain copy) over the parent's own data and written into the
parent in place, appended when the parent did not have it. Then the parent takes the newest
child's uuid and size, is renamed to the newest child's name, and the other children are
deleted — children of ``childN`` keep working unchanged.

The parent is modified only through :meth:`Remote.open_update`, so this works on every remote
with in-place updates (local, NFS, SMB, SFTP). A state file ``.<parent name>.merge.json`` next
to the disks (XO's fields: ``child``, ``parent``, ``chain``, ``currentBlock``,
``mergedDataSize``, ``step``, ``diskSize``) makes an interrupted merge resumable: calling
:func:`merge_vhd_chain` again (or :func:`resume_merges` on the folder) finishes it with the same
result. Every step is idempotent: children are only read until the cleanup step, block writes
are plain overwrites, an appended block becomes visible only when its BAT entry is written
after its data, and the footer is written last.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from xobackup_core.errors import FormatError, RemoteError, RemoteNotFoundError, UsageError
from xobackup_core.formats.source import RemoteSource, read_ahead
from xobackup_core.formats.vhd import VhdDisk, VhdFile
from xobackup_core.formats.vhd_structs import (
    DISK_TYPE_FIXED,
    FOOTER_SIZE,
    HEADER_SIZE,
    SECTOR_SIZE,
    bat_size,
    bitmap_is_full,
    bitmap_or,
    bitmap_runs,
    geometry_for_size,
    vhd_timestamp,
)
from xobackup_core.remote import Remote, join_path, normalize_path

STATE_INTERVAL = 10.0
"""Seconds between state-file updates while merging blocks (XO's interval)."""

Progress = Callable[[int, int], None]
"""Called with (blocks merged, blocks to merge) after each block."""


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge did."""

    path: str
    """The merged disk (the newest child's former path)."""
    merged_blocks: int
    merged_bytes: int
    resumed: bool


def stream_size(disk: VhdDisk) -> int:
    """Bytes of ``disk`` as one plain VHD file, whatever its storage (file or VhdDirectory,
    compressed or not): footer copy, header, BAT, parent locator space, allocated blocks with
    their bitmaps, footer. Xen Orchestra records this as a backup's ``size`` after a merge."""
    header = disk.header
    if header is None:
        return disk.size + FOOTER_SIZE
    locators = sum(locator.data_space_bytes for locator in header.parent_locators)
    blocks = disk.allocated_count() * (header.bitmap_size + header.block_size)
    return (
        FOOTER_SIZE
        + HEADER_SIZE
        + bat_size(header.max_table_entries)
        + locators
        + blocks
        + (FOOTER_SIZE)
    )


def merge_state_path(parent_path: str) -> str:
    """Where the state of a merge into ``parent_path`` is kept."""
    folder, name = posixpath.split(normalize_path(parent_path))
    return join_path(folder, f".{name}.merge.json")


def _relative(folder: str, path: str) -> str:
    return posixpath.relpath(normalize_path(path), folder)


def merge_vhd_chain(
    remote: Remote,
    chain: Sequence[str],
    *,
    progress: Progress | None = None,
    state_interval: float = STATE_INTERVAL,
) -> MergeResult:
    """Merge ``chain[1:]`` into ``chain[0]``; resume a merge of the same chain if one was cut."""
    if len(chain) < 2:
        raise UsageError("a merge needs a parent and at least one child")
    paths = [normalize_path(path) for path in chain]
    folder = posixpath.dirname(paths[0])
    state_path = merge_state_path(paths[0])
    state = _read_state(remote, state_path)
    if state is not None:
        recorded = [join_path(folder, name) for name in state.get("chain", [])]
        if recorded != paths:
            raise UsageError(
                f"an interrupted merge of another chain is pending in {state_path}: "
                f"{', '.join(recorded)}"
            )
        return _resume(remote, state_path, state, progress, state_interval)
    return _merge(remote, paths, state_path, None, progress, state_interval)


def resume_merges(remote: Remote, folder: str, *, progress: Progress | None = None) -> list[str]:
    """Finish every interrupted merge in ``folder``; returns the merged disks' paths.

    State files whose disks are gone are deleted (XO does the same).
    """
    done = []
    for name in remote.list(folder):
        if not (name.startswith(".") and name.endswith(".merge.json")):
            continue
        state_path = join_path(folder, name)
        state = _read_state(remote, state_path)
        if state is None:
            continue
        result = _resume(remote, state_path, state, progress, STATE_INTERVAL)
        if result is not None:
            done.append(result.path)
    return done


def _read_state(remote: Remote, state_path: str) -> dict | None:
    try:
        raw = remote.read_bytes(state_path)
    except RemoteNotFoundError:
        return None
    try:
        state = json.loads(raw)
        if not isinstance(state, dict) or not isinstance(state.get("chain"), list):
            raise ValueError("not a merge state")
        return state
    except ValueError as error:
        raise FormatError(f"unreadable merge state ({error})", path=state_path) from None


def _write_state(remote: Remote, state_path: str, state: dict) -> None:
    remote.write_bytes(state_path, json.dumps(state).encode())


def _resume(
    remote: Remote,
    state_path: str,
    state: dict,
    progress: Progress | None,
    state_interval: float,
) -> MergeResult:
    folder = posixpath.dirname(state_path)
    paths = [join_path(folder, name) for name in state["chain"]]
    if state.get("step") == "cleanup":
        return _cleanup(remote, paths, state_path, state, resumed=True)
    if not all(remote.exists(path) for path in paths):
        # The disks this state describes are gone: nothing can be resumed.
        remote.delete(state_path, missing_ok=True)
        raise FormatError(
            "interrupted merge refers to disks that no longer exist; its state was removed",
            path=state_path,
        )
    return _merge(remote, paths, state_path, state, progress, state_interval)


def _open_children(remote: Remote, paths: Sequence[str]) -> list[VhdDisk]:
    disks: list[VhdDisk] = []
    try:
        for path in paths:
            disks.append(VhdFile.open(RemoteSource(remote, path)))
    except BaseException:
        for disk in disks:
            disk.close()
        raise
    return disks


def _merge(
    remote: Remote,
    paths: list[str],
    state_path: str,
    state: dict | None,
    progress: Progress | None,
    state_interval: float,
) -> MergeResult:
    resumed = state is not None
    children = _open_children(remote, paths[1:])
    try:
        parent_file = remote.open_update(paths[0])
        parent = VhdFile.open_update(parent_file, f"{remote.name}:{paths[0]}", force=resumed)
        try:
            leaf = children[-1]
            _check_links(parent, children)
            if leaf.size > parent.size and parent.header is None:
                raise FormatError(
                    f"the child ({leaf.size} bytes) is larger than this fixed parent; only "
                    "dynamic parents can grow",
                    path=parent.path,
                    field="footer.current_size",
                )
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
            # A resized disk: the parent grows first (§6.6), after the state file exists so
            # an interruption is resumed.
            parent.grow_bat(-(-leaf.size // parent.block_size))
            blocks = sorted(
                {
                    index
                    for child in children
                    for index in child.allocated_blocks()
                    if index < parent.block_count
                }
            )
            start_block = int(state.get("currentBlock", 0))
            todo = [index for index in blocks if index >= start_block]
            merged_bytes = int(state.get("mergedDataSize", 0))
            last_save = time.monotonic()
            # Child reads run one thread ahead of the parent's writes (bounded: 2 blocks).
            prepared = read_ahead(lambda index: _children_block(children, index), todo)
            for done, (index, block) in enumerate(prepared, 1):
                _merge_block(parent, block, index)
                merged_bytes += parent.block_size
                if progress is not None:
                    progress(done, len(todo))
                if time.monotonic() - last_save >= state_interval:
                    parent.flush()
                    state.update(currentBlock=index + 1, mergedDataSize=merged_bytes)
                    _write_state(remote, state_path, state)
                    last_save = time.monotonic()
            parent.flush()
            state.update(currentBlock=parent.block_count, mergedDataSize=merged_bytes)
            state["step"] = "cleanup"
            _write_state(remote, state_path, state)
        finally:
            parent.close()
    finally:
        for child in children:
            child.close()
    result = _cleanup(remote, paths, state_path, state, resumed=resumed)
    return MergeResult(result.path, len(blocks), merged_bytes, resumed)


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


@dataclass(frozen=True)
class _ChildrenBlock:
    """Block ``index`` as the children alone see it; ``covered`` marks the sectors they set."""

    bitmap: bytes
    data: bytes | bytearray | memoryview
    covered: bytes | None
    """None when the newest child's bitmap is full: the block is a plain copy."""


def _children_block(children: Sequence[VhdDisk], index: int) -> _ChildrenBlock:
    """Compose block ``index`` from the children, newest sector first.

    Runs in the read-ahead thread, which is the only one reading the children (some remotes
    refuse two concurrent opens of one file).
    """
    block_size = children[0].block_size
    sectors = block_size // SECTOR_SIZE
    full = (1 << sectors) - 1
    covered = 0
    bitmap = b""
    result: bytearray | None = None
    for child in reversed(children):
        block = child.read_block(index)
        if block is None:
            continue
        if result is None and bitmap_is_full(block.bitmap, block_size):
            return _ChildrenBlock(block.bitmap, block.data, None)
        if result is None:
            result = bytearray(block_size)
        wanted = int.from_bytes(block.bitmap[: sectors // 8], "big") & ~covered & full
        if wanted:
            for first, count in bitmap_runs(wanted.to_bytes(sectors // 8, "big"), block_size):
                start, end = first * SECTOR_SIZE, (first + count) * SECTOR_SIZE
                result[start:end] = block.data[start:end]
            covered |= wanted
        bitmap = bitmap_or(bitmap, block.bitmap)
    assert result is not None  # only blocks allocated in some child are merged
    return _ChildrenBlock(bitmap, result, covered.to_bytes(sectors // 8, "big"))


def _merge_block(parent: VhdFile, block: _ChildrenBlock, index: int) -> None:
    """Write the children's view of block ``index`` over the parent's own data."""
    if block.covered is None:
        parent.write_block(index, block.bitmap, block.data)
        return
    # Sectors no child sets keep the parent's value.
    base = parent.read_block(index)
    data = bytearray(base.data) if base is not None else bytearray(parent.block_size)
    for first, count in bitmap_runs(block.covered, parent.block_size):
        start, end = first * SECTOR_SIZE, (first + count) * SECTOR_SIZE
        data[start:end] = block.data[start:end]
    bitmap = bitmap_or(base.bitmap, block.bitmap) if base is not None else block.bitmap
    parent.write_block(index, bitmap.ljust(_bitmap_size(parent), b"\x00"), data)


def _bitmap_size(disk: VhdDisk) -> int:
    return disk.header.bitmap_size if disk.header is not None else 0


def virtual_size_or_none(open_disk: Callable[[str], VhdDisk], path: str) -> int | None:
    """The virtual size of the disk ``open_disk(path)`` opens, or None when it is gone or
    unreadable (finishing a merge: Xen Orchestra's cleanup may already have removed it)."""
    try:
        disk = open_disk(path)
    except (FormatError, RemoteError):
        return None
    try:
        return disk.size
    finally:
        disk.close()


def _cleanup(
    remote: Remote, paths: list[str], state_path: str, state: dict, *, resumed: bool
) -> MergeResult:
    parent_path, leaf_path = paths[0], paths[-1]
    if remote.exists(parent_path):
        with remote.open_update(parent_path) as file:
            parent = VhdFile.open_update(file, f"{remote.name}:{parent_path}", force=True)
            # Not the state's ``diskSize``: Xen Orchestra records the size on disk there. The
            # newest child has the virtual size until the rename below; if XO's cleanup
            # already deleted it, XO had given the parent its metadata.
            leaf_size = virtual_size_or_none(
                lambda p: VhdFile.open(RemoteSource(remote, p)), leaf_path
            )
            size = leaf_size or parent.size
            footer = parent.footer.replace(
                uuid=uuidlib.UUID(state["child"]["uuid"]),
                timestamp=vhd_timestamp(time.time()),
            )
            if size != footer.current_size and footer.disk_type != DISK_TYPE_FIXED:
                footer = footer.replace(current_size=size, geometry=geometry_for_size(size))
            parent.footer = footer
            parent.write_footer()
            parent.flush()
        remote.rename(parent_path, leaf_path)
    for path in paths[1:-1]:
        remote.delete(path, missing_ok=True)
    remote.delete(state_path, missing_ok=True)
    return MergeResult(leaf_path, 0, int(state.get("mergedDataSize", 0)), resumed)
