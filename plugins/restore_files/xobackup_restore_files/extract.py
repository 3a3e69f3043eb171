"""Copy files out of a backup's filesystem: into a folder, or as a tar or zip stream.

A backup's filesystem is untrusted input: it belongs to the VM, and a guest (or a damaged disk)
can hold names such as ``..``, names with ``/`` in them, and symlinks pointing anywhere. Rules:

* every name goes through :func:`safe_name`: ``.``/``..`` are skipped, ``/``, ``\\`` and NUL
  become ``_``, so a name is always one path component;
* into a folder, every component is opened relative to its parent's descriptor with
  ``O_NOFOLLOW``, so an earlier symlink (from the backup or already in the folder) is never
  followed to write elsewhere;
* symlinks are restored as symlinks, their target text unchanged and never followed;
* an existing file is left alone unless ``overwrite``; then it is replaced by rename (which
  replaces a symlink, never what it points to).

Archives stream one entry at a time in constant memory (tar through :mod:`tarfile` in stream
mode, zip through :meth:`zipfile.ZipFile.open` in write mode), with the same names.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import BinaryIO, TypeVar

from xobackup_core.errors import FormatError, UsageError, XobackupError
from xobackup_restore_files.readers import DIRECTORY, FILE, SYMLINK, Node

COPY_CHUNK = 1 << 20
T = TypeVar("T")
Warn = Callable[[str], None]


class OutputError(XobackupError):
    """Writing the restored files failed (target full, read-only, permission denied)."""


def read_guest(what: str, read: Callable[[], T]) -> T:
    """Call ``read`` (a parser reading guest data); its failures become FormatError.

    The parsers raise whatever their code hits on damaged data (struct errors, KeyError,
    their own exceptions): they all mean "this filesystem cannot be read here"."""
    try:
        return read()
    except XobackupError:
        raise
    except Exception as error:
        raise FormatError(f"cannot read {what}: {type(error).__name__}: {error}") from None


def safe_name(name: str) -> str | None:
    """``name`` as one harmless path component, or None when it must be skipped."""
    cleaned = name.replace("\x00", "_").replace("/", "_").replace("\\", "_")
    if cleaned in ("", ".", ".."):
        return None
    return cleaned


def valid_link_target(target: str | None) -> bool:
    """A symlink target the system can store: not empty, no NUL byte (damaged data)."""
    return bool(target) and "\x00" not in (target or "")


def safe_relative_path(path: str) -> str | None:
    """A relative archive member name from any path: absolute roots, ``.``, ``..`` and empty
    segments are dropped. None when nothing is left."""
    parts = [p.replace("\x00", "_") for p in path.replace("\\", "/").split("/")]
    kept = [p for p in parts if p not in ("", ".", "..")]
    return "/".join(kept) or None


def _timestamp(node: Node) -> float | None:
    if node.mtime is None:
        return None
    moment = node.mtime if node.mtime.tzinfo else node.mtime.replace(tzinfo=UTC)
    try:
        return moment.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


MAX_DEPTH = 1024
"""Deeper folders mean a loop in a damaged filesystem (Linux paths stop at 4096 bytes)."""


def _children(node: Node, name: str) -> Iterator[Node]:
    return iter(read_guest(f"the folder {name}", lambda: list(node.children())))


def walk(node: Node, name: str, warn: Warn) -> Iterator[tuple[str, Node]]:
    """``(relative path, node)`` for ``node`` (under ``name``) and, for a directory, everything
    below it, parents first. Skipped names are reported through ``warn``. Iterative, with a
    depth bound, so a directory loop in a damaged filesystem ends with a FormatError."""
    yield name, node
    if node.kind != DIRECTORY:
        return
    stack = [(name, _children(node, name))]
    while stack:
        parent, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            continue
        child_name = safe_name(child.name)
        if child_name is None:
            warn(f"skipped an entry named {child.name!r} in {parent}")
            continue
        path = f"{parent}/{child_name}"
        yield path, child
        if child.kind == DIRECTORY:
            if len(stack) >= MAX_DEPTH:
                raise FormatError(
                    f"folders nested deeper than {MAX_DEPTH} at {path[:200]}...: a loop?"
                )
            stack.append((path, _children(child, path)))


def _copy(node: Node, what: str, write: Callable[[bytes], object]) -> int:
    source = read_guest(what, node.open)
    copied = 0
    while True:
        chunk = read_guest(what, lambda: source.read(COPY_CHUNK))
        if not chunk:
            break
        write(chunk)
        copied += len(chunk)
        if copied > node.size:
            # A damaged run list can yield data without end: stop at the recorded size.
            raise FormatError(f"{what} holds more data than its size, {node.size} bytes")
    if copied != node.size:
        raise FormatError(f"{what}: read {copied} bytes where the filesystem says {node.size}")
    return copied


def top_entries(items: list[tuple[str, Node]], warn: Warn) -> Iterator[tuple[str, Node]]:
    """``(name at the top of the target, node)`` for each asked path: its last component, or
    for the root directory each of its entries (so ``/`` restores the whole filesystem)."""
    for path, node in items:
        base = [p for p in path.split("/") if p not in ("", ".")]
        if not base and node.kind == DIRECTORY:
            for child in _children(node, "/"):
                name = safe_name(child.name)
                if name is None:
                    warn(f"skipped an entry named {child.name!r} in /")
                    continue
                yield name, child
            continue
        name = safe_name(base[-1]) if base else None
        yield name or safe_name(node.name) or "root", node


def walk_all(items: list[tuple[str, Node]], warn: Warn) -> Iterator[tuple[str, Node]]:
    """Every ``(relative path, node)`` to restore for the asked paths, parents first."""
    for name, node in top_entries(items, warn):
        yield from walk(node, name, warn)


# -- into a folder -----------------------------------------------------------------------------
class FolderWriter:
    """Writes nodes under ``root`` without ever following a symlink."""

    def __init__(self, root: str, *, overwrite: bool, warn: Warn) -> None:
        os.makedirs(root, exist_ok=True)
        self.root = os.path.realpath(root)
        self.overwrite = overwrite
        self.warn = warn
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        self.files = 0
        self.bytes = 0

    def close(self) -> None:
        os.close(self._root_fd)

    def _open_parent(self, relative: str) -> tuple[int, str]:
        """A descriptor of the folder holding ``relative`` (created as needed) and its name."""
        parts = relative.split("/")
        fd = os.dup(self._root_fd)
        try:
            for part in parts[:-1]:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as error:
                    raise UsageError(
                        f"cannot write {relative} under {self.root}: {part!r} is not a folder "
                        f"there ({error.strerror}); a symlink is never followed"
                    ) from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def _exists(self, name: str, fd: int) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _refuse(self, relative: str) -> None:
        raise UsageError(
            f"{os.path.join(self.root, relative)} already exists; pass --overwrite to replace it"
        )

    def write(self, relative: str, node: Node) -> None:
        """Create ``relative`` (a folder, a file with its content, or a symlink)."""
        try:
            fd, name = self._open_parent(relative)
        except OSError as error:
            raise self._output_error(relative, error) from None
        try:
            self._write(fd, name, relative, node)
        except OSError as error:
            raise self._output_error(relative, error) from None
        finally:
            os.close(fd)

    def _output_error(self, relative: str, error: OSError) -> OutputError:
        detail = error.strerror or str(error)
        return OutputError(f"cannot write {os.path.join(self.root, relative)}: {detail}")

    def _write(self, fd: int, name: str, relative: str, node: Node) -> None:
        existing = self._exists(name, fd)
        if node.kind == DIRECTORY:
            self.files += 1
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                return
            if existing is not None:
                if not self.overwrite:
                    self._refuse(relative)
                os.unlink(name, dir_fd=fd)
            os.mkdir(name, 0o755, dir_fd=fd)
            return
        if existing is not None:
            if not self.overwrite:
                self._refuse(relative)
            if stat.S_ISDIR(existing.st_mode):
                raise UsageError(
                    f"{os.path.join(self.root, relative)} is a folder; not replaced by a file"
                )
        temp = f".{name[:200]}.restore-{secrets.token_hex(4)}"
        if node.kind == SYMLINK and not valid_link_target(node.link_target):
            self.warn(f"skipped {relative}: its link target holds a NUL byte or is empty")
            return
        if node.kind == SYMLINK:
            os.symlink(node.link_target or "", temp, dir_fd=fd)
        elif node.kind == FILE:
            self._write_file(fd, temp, relative, node)
        else:
            self.warn(f"skipped {relative}: not a file, folder or symlink")
            return
        os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
        stamp = _timestamp(node)
        if stamp is not None:
            with contextlib.suppress(OSError):
                os.utime(name, (stamp, stamp), dir_fd=fd, follow_symlinks=False)
        self.files += 1

    def _write_file(self, fd: int, temp: str, relative: str, node: Node) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        out_fd = os.open(temp, flags, 0o644, dir_fd=fd)
        try:
            with os.fdopen(out_fd, "wb", closefd=False) as out:
                self.bytes += _copy(node, relative, out.write)
        except BaseException:
            os.close(out_fd)
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=fd)
            raise
        os.close(out_fd)

    def set_folder_times(self, entries: list[tuple[str, Node]]) -> None:
        """Folder mtimes last: writing their content changed them."""
        for relative, node in reversed(entries):
            stamp = _timestamp(node)
            if stamp is None:
                continue
            fd, name = self._open_parent(relative)
            try:
                with contextlib.suppress(OSError):
                    os.utime(name, (stamp, stamp), dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)


def extract_to_folder(
    items: list[tuple[str, Node]], folder: str, *, overwrite: bool, warn: Warn
) -> tuple[int, int]:
    """Write ``(path, node)`` items (each with its subtree) under ``folder``.

    Returns (entries written, bytes of file data).
    """
    try:
        writer = FolderWriter(folder, overwrite=overwrite, warn=warn)
    except OSError as error:
        raise OutputError(f"cannot write into {folder}: {error.strerror or error}") from None
    try:
        folders = []
        for relative, entry in walk_all(items, warn):
            writer.write(relative, entry)
            if entry.kind == DIRECTORY:
                folders.append((relative, entry))
        writer.set_folder_times(folders)
        return writer.files, writer.bytes
    finally:
        writer.close()


# -- archives ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _archive_output(path: str, overwrite: bool) -> Iterator[BinaryIO]:
    """The archive file; removed again when writing it fails, so no truncated archive stays."""
    try:
        output = open(path, "wb" if overwrite else "xb")
    except FileExistsError:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it") from None
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror}") from None
    try:
        yield output
        output.close()
    except BaseException as error:
        output.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        if isinstance(error, OSError):
            raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
        raise


def extract_to_tar(
    items: list[tuple[str, Node]], path: str, *, overwrite: bool, warn: Warn
) -> tuple[int, int]:
    """A tar archive (gzip-compressed when ``path`` ends in ``.gz`` or ``.tgz``), streamed."""
    mode = "w|gz" if path.endswith((".gz", ".tgz")) else "w|"
    entries = 0
    total = 0
    with (
        _archive_output(path, overwrite) as output,
        tarfile.open(fileobj=output, mode=mode, format=tarfile.PAX_FORMAT) as archive,
    ):
        for relative, entry in walk_all(items, warn):
            name = safe_relative_path(relative)
            if name is None:
                continue
            info = tarfile.TarInfo(name)
            info.mtime = int(_timestamp(entry) or 0)
            if entry.kind == DIRECTORY:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            elif entry.kind == SYMLINK and not valid_link_target(entry.link_target):
                warn(f"skipped {relative}: its link target holds a NUL byte or is empty")
                continue
            elif entry.kind == SYMLINK:
                info.type = tarfile.SYMTYPE
                info.linkname = entry.link_target or ""
                info.mode = 0o777
                archive.addfile(info)
            elif entry.kind == FILE:
                info.size = entry.size
                info.mode = 0o644
                archive.addfile(info, _SizedReader(entry, relative))
                total += entry.size
            else:
                warn(f"skipped {relative}: not a file, folder or symlink")
                continue
            entries += 1
    return entries, total


class _SizedReader:
    """Gives tarfile exactly ``size`` bytes, failing loudly if the source is short."""

    def __init__(self, node: Node, what: str) -> None:
        self._source: BinaryIO = read_guest(what, node.open)
        self._left = node.size
        self._what = what

    def read(self, length: int = -1) -> bytes:
        if length < 0 or length > self._left:
            length = self._left
        data = read_guest(self._what, lambda: self._source.read(length))
        if len(data) < length:
            raise FormatError(f"{self._what} ends before the size its filesystem records")
        self._left -= len(data)
        return data


def extract_to_zip(
    items: list[tuple[str, Node]], path: str, *, overwrite: bool, warn: Warn
) -> tuple[int, int]:
    """A zip archive (deflate), streamed entry by entry; symlinks stored as Unix links."""
    entries = 0
    total = 0
    with (
        _archive_output(path, overwrite) as output,
        zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive,
    ):
        for relative, entry in walk_all(items, warn):
            name = safe_relative_path(relative)
            if name is None:
                continue
            moment = entry.mtime or datetime(1980, 1, 1)
            stamp = (
                max(moment.year, 1980),
                moment.month,
                moment.day,
                moment.hour,
                moment.minute,
                moment.second,
            )
            if entry.kind == DIRECTORY:
                info = zipfile.ZipInfo(name + "/", stamp)
                info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
                archive.writestr(info, b"")
            elif entry.kind == SYMLINK and not valid_link_target(entry.link_target):
                warn(f"skipped {relative}: its link target holds a NUL byte or is empty")
                continue
            elif entry.kind == SYMLINK:
                info = zipfile.ZipInfo(name, stamp)
                info.create_system = 3  # Unix: the mode bits below say "symlink"
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                archive.writestr(info, (entry.link_target or "").encode())
            elif entry.kind == FILE:
                info = zipfile.ZipInfo(name, stamp)
                info.create_system = 3
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(info, "w", force_zip64=entry.size >= (1 << 31)) as out:
                    total += _copy(entry, relative, out.write)
            else:
                warn(f"skipped {relative}: not a file, folder or symlink")
                continue
            entries += 1
    return entries, total
