"""Encrypted remotes, readable and writable by Xen Orchestra.

A remote whose options carry ``encryptionKey`` (exactly 32 characters, a
:class:`~xobackup_core.config.Secret`) is wrapped in an :class:`EncryptedRemote`: every file is
encrypted on write and decrypted on read, so the backup code above never sees ciphertext.

On-remote format (the one Xen Orchestra's ``@xen-orchestra/fs`` uses):

* each file is ``IV (12 random bytes) ‖ ciphertext ‖ tag (16 bytes)``, with
  ``chacha20-poly1305`` (RFC 8439, the default) or the legacy ``aes-256-gcm``; the key is the
  32 characters of ``encryptionKey`` taken as raw bytes (no derivation), no associated data;
* ``encryption.json`` at the root is plain JSON ``{"algorithm": ...}``;
* ``metadata.json`` at the root is encrypted JSON ``{"random": <uuid>}``: decrypting it checks
  the key when the remote is opened. On an empty remote both files are (re)created;
* ``*.checksum`` files stay plain (so a remote can be checked without the key) and hold the
  MD5 of the *encrypted* file, as XO computes them.

Writes stream: each chunk is encrypted as it comes, the tag is appended on commit. A monolithic
VHD is refused (XO allows encryption only with VhdDirectory; the engine already picks
VhdDirectory on remotes that cannot update files in place, as this one). A remote opened
without a key whose ``encryption.json`` names an algorithm is refused too.

Reads: a file up to :data:`WHOLE_READ_LIMIT` bytes (VhdDirectory blocks, JSON, aliases) is read
whole and its tag verified before any byte is returned. A larger file (an XVA) is streamed: bytes
are returned as they are decrypted and the tag is checked when the end of the file is reached,
so the read that reaches the end raises :class:`~xobackup_core.errors.FormatError` if the file
was altered. A range read of such a file (the structural checks of a stored XVA read its first
and last blocks) decrypts just that range by seeking in the keystream: both ciphers are counter
based. Such bytes are not authenticated, since the tag covers the whole file; a restore reads
the whole file and is.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Mapping
from typing import Any, BinaryIO

from xobackup_core.config import Secret
from xobackup_core.config import _to_secret as to_secret
from xobackup_core.engine.streams import BackgroundDigest
from xobackup_core.errors import FormatError, RemoteConfigError, RemoteError, RemoteNotFoundError
from xobackup_core.remote import (
    Remote,
    RemoteFile,
    RemoteStat,
    RemoteWriter,
    normalize_path,
)

CHACHA20 = "chacha20-poly1305"
AES256 = "aes-256-gcm"
DEFAULT_ALGORITHM = CHACHA20
"""What new encrypted remotes use (XO's default since 2025)."""
ALGORITHMS = (CHACHA20, AES256)
IV_LENGTH = 12
TAG_LENGTH = 16
OVERHEAD = IV_LENGTH + TAG_LENGTH
KEY_LENGTH = 32
ENCRYPTION_FILE = "/encryption.json"
METADATA_FILE = "/metadata.json"
CHECKSUM_SUFFIX = ".checksum"
CHECKED_SUFFIXES = (".xva",)
"""Files written with a ``.checksum`` companion: their encrypted bytes' MD5 is kept for it."""
WHOLE_READ_LIMIT = 16 * 1024 * 1024
"""Encrypted files up to this size are read and verified whole before returning any byte."""
_CHUNK = 1024 * 1024
_MD5_PREFIX = "$1$$"


def _cipher(algorithm: str, key: bytes, iv: bytes) -> Any:
    # pycryptodome is imported here, not at the top: every remote that is opened goes through
    # this module, and most are not encrypted.
    from Crypto.Cipher import AES, ChaCha20_Poly1305

    if algorithm == CHACHA20:
        return ChaCha20_Poly1305.new(key=key, nonce=iv)
    return AES.new(key, AES.MODE_GCM, nonce=iv, mac_len=TAG_LENGTH)


def _keystream_at(algorithm: str, key: bytes, iv: bytes, position: int) -> Any:
    """A raw stream cipher positioned at plaintext byte ``position`` of a file (no tag check).

    ChaCha20-Poly1305 (RFC 8439) encrypts the payload from block counter 1; AES-GCM with a
    96-bit IV from counter block ``IV ‖ 2``.
    """
    from Crypto.Cipher import AES, ChaCha20

    if algorithm == CHACHA20:
        cipher = ChaCha20.new(key=key, nonce=iv)
        cipher.seek(64 + position)
        return cipher
    cipher = AES.new(key, AES.MODE_CTR, nonce=iv, initial_value=2 + position // 16)
    cipher.decrypt(bytes(position % 16))
    return cipher


class _RangeReader(io.RawIOBase):
    """Decrypts a byte range of a stored file with a positioned keystream."""

    def __init__(self, inner: BinaryIO, cipher: Any) -> None:
        super().__init__()
        self._inner = inner
        self._cipher = cipher

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        view = memoryview(target).cast("B")
        data = self._inner.read(len(view))
        if not data:
            return 0
        view[: len(data)] = self._cipher.decrypt(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._inner.close()
            finally:
                super().close()


def _is_plain(path: str) -> bool:
    """Files XO never encrypts: the algorithm description and the checksum files."""
    return path == ENCRYPTION_FILE or path.endswith(CHECKSUM_SUFFIX)


def _is_vhd_file(path: str) -> bool:
    """A monolithic VHD (not an alias, not a file inside a VhdDirectory folder)."""
    if not path.endswith(".vhd") or path.endswith(".alias.vhd"):
        return False
    return not any(segment.endswith(".vhd") for segment in path.split("/")[:-1])


def encryption_key_bytes(key: Secret | str, *, remote: str) -> bytes:
    """The raw cipher key: the 32 characters of ``encryptionKey`` (XO's rule), never logged."""
    value = key.reveal() if isinstance(key, Secret) else str(key)
    raw = value.encode("utf-8")
    if len(value) != KEY_LENGTH or len(raw) != KEY_LENGTH:
        raise RemoteConfigError(
            f"encryptionKey must be exactly {KEY_LENGTH} ASCII characters "
            f"(it has {len(value)} characters)",
            remote=remote,
        )
    return raw


def encrypt_bytes(algorithm: str, key: bytes, data: bytes) -> bytes:
    """One whole file's encrypted form: ``IV ‖ ciphertext ‖ tag``."""
    iv = os.urandom(IV_LENGTH)
    ciphertext, tag = _cipher(algorithm, key, iv).encrypt_and_digest(data)
    return iv + ciphertext + tag


def decrypt_bytes(algorithm: str, key: bytes, data: bytes, *, path: str) -> bytes:
    """Decrypt and authenticate a whole file; FormatError naming ``path`` if it fails."""
    if len(data) < OVERHEAD:
        raise FormatError(
            f"encrypted file is too short ({len(data)} bytes) to hold an IV and a tag", path=path
        )
    cipher = _cipher(algorithm, key, data[:IV_LENGTH])
    try:
        return cipher.decrypt_and_verify(data[IV_LENGTH:-TAG_LENGTH], data[-TAG_LENGTH:])
    except ValueError:
        raise FormatError(
            "encrypted file failed authentication (wrong key, or the file is damaged)", path=path
        ) from None


class _EncryptingWriter(RemoteWriter):
    """Encrypts a stream into the inner writer: IV first, tag on commit."""

    def __init__(
        self, inner: RemoteWriter, algorithm: str, key: bytes, on_commit: Any = None
    ) -> None:
        super().__init__()
        self._inner = inner
        iv = os.urandom(IV_LENGTH)
        self._cipher = _cipher(algorithm, key, iv)
        # only files that get a checksum (XVAs) pay for the MD5, in a thread of its own
        self._md5 = BackgroundDigest("md5") if on_commit is not None else None
        self._on_commit = on_commit
        self._emit(iv)

    def _emit(self, data: bytes) -> None:
        if self._md5 is not None:
            self._md5.update(data)
        self._inner.write(data)

    def _write(self, data: memoryview) -> None:
        if len(data):
            self._emit(self._cipher.encrypt(data))

    def _commit(self) -> None:
        self._emit(self._cipher.digest())
        self._inner.commit()
        if self._md5 is not None:
            self._on_commit(self._md5.hexdigest())

    def _abort(self) -> None:
        if self._md5 is not None:
            self._md5.hexdigest()  # ends its thread
        self._inner.abort()


class _DecryptingReader(io.RawIOBase):
    """Streams the plaintext of a large encrypted file; the tag is checked at end of file."""

    def __init__(
        self,
        inner: BinaryIO,
        algorithm: str,
        key: bytes,
        path: str,
        skip: int,
        length: int | None,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._path = path
        iv = self._read_exact(IV_LENGTH)
        if len(iv) < IV_LENGTH:
            raise FormatError("encrypted file is too short to hold an IV and a tag", path=path)
        self._cipher = _cipher(algorithm, key, iv)
        self._held = b""  # the last TAG_LENGTH bytes read so far: the tag once at EOF
        self._buffer = memoryview(b"")
        self._eof = False
        self._skip = skip
        self._remaining = length

    def _read_exact(self, size: int) -> bytes:
        parts = []
        while size > 0:
            chunk = self._inner.read(size)
            if not chunk:
                break
            parts.append(chunk)
            size -= len(chunk)
        return b"".join(parts)

    def _fill(self) -> None:
        """Decrypt the next chunk into the buffer, or verify the tag at end of file."""
        chunk = self._inner.read(_CHUNK)
        if not chunk:
            self._eof = True
            if len(self._held) < TAG_LENGTH:
                raise FormatError("encrypted file is too short to hold its tag", path=self._path)
            try:
                self._cipher.verify(self._held)
            except ValueError:
                raise FormatError(
                    "encrypted file failed authentication (wrong key, or the file is damaged)",
                    path=self._path,
                ) from None
            return
        # the last TAG_LENGTH bytes seen may be the tag: decrypt everything before them
        if len(chunk) >= TAG_LENGTH:
            body = self._cipher.decrypt(self._held) if self._held else b""
            body += self._cipher.decrypt(memoryview(chunk)[:-TAG_LENGTH])
            self._held = bytes(chunk[-TAG_LENGTH:])
        else:
            data = self._held + chunk
            body = self._cipher.decrypt(data[:-TAG_LENGTH]) if len(data) > TAG_LENGTH else b""
            self._held = data[-TAG_LENGTH:]
        self._buffer = memoryview(bytes(self._buffer) + body) if self._buffer else memoryview(body)

    def readable(self) -> bool:
        return True

    def _drain(self) -> None:
        """Read on to end of file so the tag is checked before the last bytes are given."""
        while not self._eof:
            self._buffer = memoryview(b"")
            self._fill()

    def readinto(self, target: Any) -> int:
        view = memoryview(target).cast("B")
        if self._remaining == 0:
            self._drain()
            return 0
        while True:
            while self._skip and self._buffer:
                dropped = min(self._skip, len(self._buffer))
                self._buffer = self._buffer[dropped:]
                self._skip -= dropped
            if self._buffer and not self._skip:
                break
            if self._eof:
                return 0
            self._fill()
        size = min(len(view), len(self._buffer))
        if self._remaining is not None:
            size = min(size, self._remaining)
            self._remaining -= size
        view[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        if self._remaining == 0 or (not self._buffer and self._eof):
            self._drain()
        return size

    def close(self) -> None:
        if not self.closed:
            try:
                self._inner.close()
            finally:
                super().close()


class EncryptedRemote(Remote):
    """A :class:`Remote` whose files are encrypted the way Xen Orchestra encrypts them.

    Build it with :func:`open_encrypted_remote`, which checks the key first.
    """

    supports_update = False

    def __init__(self, inner: Remote, key: bytes, algorithm: str) -> None:
        self._inner = inner
        self._key = key
        self.algorithm = algorithm
        self.name = inner.name
        # MD5 of the encrypted bytes of files written here, for their ``.checksum`` companion
        self._cipher_md5: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"EncryptedRemote({self.name!r}, {self.algorithm})"

    # -- key check ---------------------------------------------------------------------------
    def _is_empty(self) -> bool:
        """No entry at the root besides hidden ones and the two encryption files."""
        ignored = {ENCRYPTION_FILE[1:], METADATA_FILE[1:]}
        return not [n for n in self._inner.list("/") if not n.startswith(".") and n not in ignored]

    def _create_metadata(self) -> None:
        self.algorithm = DEFAULT_ALGORITHM
        self._inner.write_bytes(
            ENCRYPTION_FILE,
            json.dumps({"algorithm": self.algorithm}, separators=(",", ":")).encode(),
        )
        self.write_bytes(
            METADATA_FILE, json.dumps({"random": str(uuid.uuid4())}, separators=(",", ":")).encode()
        )

    def check_key(self) -> None:
        """Read ``encryption.json`` and decrypt ``metadata.json`` (XO's key check).

        On an empty remote, both files are (re)created with the default algorithm; otherwise a
        remote that does not open with this key raises :class:`RemoteConfigError`.
        """
        try:
            description = json.loads(self._inner.read_bytes(ENCRYPTION_FILE))
            algorithm = description["algorithm"]
        except RemoteNotFoundError:
            algorithm = DEFAULT_ALGORITHM
        except (ValueError, KeyError, TypeError):
            raise FormatError(
                "encryption.json is not valid JSON with an 'algorithm'", path=ENCRYPTION_FILE
            ) from None
        problem: str | None = None
        if algorithm not in ALGORITHMS:
            problem = f"the remote is not encrypted with a supported algorithm ({algorithm!r})"
        else:
            self.algorithm = algorithm
            try:
                json.loads(self.read_bytes(METADATA_FILE))
                return
            except RemoteNotFoundError:
                problem = "missing"
            except (FormatError, ValueError):
                problem = (
                    "the encryptionKey does not match the key this remote was created with: "
                    "its data cannot be read"
                )
        if self._is_empty():
            self._create_metadata()
            return
        if problem == "missing":
            problem = (
                "this remote already holds data but was not created encrypted; encryption can "
                "only be enabled on an empty remote"
            )
        raise RemoteConfigError(problem, remote=self.name, operation="open", path=METADATA_FILE)

    # -- files -------------------------------------------------------------------------------
    def open_write(self, path: str) -> RemoteWriter:
        path = normalize_path(path)
        if _is_plain(path):
            return self._inner.open_write(path)
        if _is_vhd_file(path):
            raise RemoteConfigError(
                "an encrypted remote stores delta backups only as VhdDirectory "
                "(set useVhdDirectory = true for this remote)",
                remote=self.name,
                operation="write",
                path=path,
            )
        inner = self._inner.open_write(path)

        def remember(md5: str) -> None:
            self._cipher_md5[path] = md5

        on_commit = remember if path.endswith(CHECKED_SUFFIXES) else None
        return _EncryptingWriter(inner, self.algorithm, self._key, on_commit)

    def write_bytes(self, path: str, data: bytes) -> None:
        path = normalize_path(path)
        if path.endswith(CHECKSUM_SUFFIX):
            # XO's checksum covers the file as stored (encrypted), so it can be checked without
            # the key: replace the plaintext digest the caller computed (MD5 or SHA-256) by
            # the ciphertext's MD5.
            md5 = self._cipher_md5.pop(path[: -len(CHECKSUM_SUFFIX)], None)
            if md5 is not None and data.startswith(b"$"):
                data = (_MD5_PREFIX + md5).encode()
        super().write_bytes(path, data)

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        path = normalize_path(path)
        if _is_plain(path):
            return self._inner.open_read(path, offset, length)
        stored = self._inner.stat(path).size
        if stored <= WHOLE_READ_LIMIT:
            with self._inner.open_read(path) as stream:
                data = stream.read()
            plain = decrypt_bytes(self.algorithm, self._key, data, path=path)
            end = None if length is None else offset + length
            return io.BytesIO(plain[offset:end])
        if offset or length is not None:
            plain_size = max(stored - OVERHEAD, 0)
            offset = min(offset, plain_size)
            length = plain_size - offset if length is None else min(length, plain_size - offset)
            iv = self._inner.read_range(path, 0, IV_LENGTH)
            cipher = _keystream_at(self.algorithm, self._key, iv, offset)
            inner = self._inner.open_read(path, IV_LENGTH + offset, length)
            return io.BufferedReader(_RangeReader(inner, cipher), _CHUNK)  # type: ignore[return-value]
        stream = self._inner.open_read(path)
        try:
            reader = _DecryptingReader(stream, self.algorithm, self._key, path, offset, length)
        except BaseException:
            stream.close()
            raise
        return io.BufferedReader(reader, _CHUNK)  # type: ignore[return-value]

    def open_update(self, path: str) -> RemoteFile:
        raise RemoteError(
            "encrypted files cannot be modified in place", remote=self.name, operation="open_update"
        )

    # -- namespace ---------------------------------------------------------------------------
    def list(self, path: str = "/") -> list[str]:
        return self._inner.list(path)

    def stat(self, path: str) -> RemoteStat:
        found = self._inner.stat(path)
        if found.is_dir or _is_plain(normalize_path(path)):
            return found
        # stream ciphers add no padding: the plaintext is exactly IV and tag shorter
        return RemoteStat(max(found.size - OVERHEAD, 0), found.mtime, found.is_dir)

    def rename(self, source: str, target: str) -> None:
        self._inner.rename(source, target)
        md5 = self._cipher_md5.pop(normalize_path(source), None)
        if md5 is not None:
            self._cipher_md5[normalize_path(target)] = md5

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        self._inner.delete(path, missing_ok=missing_ok)

    def delete_tree(self, path: str) -> None:
        self._inner.delete_tree(path)

    def makedirs(self, path: str) -> None:
        self._inner.makedirs(path)

    def free_space(self) -> int | None:
        return self._inner.free_space()

    def close(self) -> None:
        self._inner.close()


def open_encrypted_remote(inner: Remote, key: Secret | str) -> EncryptedRemote:
    """Wrap ``inner`` with encryption under ``key`` and check the key (see the module doc)."""
    raw = encryption_key_bytes(key, remote=inner.name)
    remote = EncryptedRemote(inner, raw, DEFAULT_ALGORITHM)
    try:
        remote.check_key()
    except BaseException:
        inner.close()
        raise
    return remote


def refuse_if_encrypted(remote: Remote) -> None:
    """Raise a clear error when ``remote``, opened without a key, is an encrypted remote.

    Otherwise its files would surface as corrupt data. Only a readable ``encryption.json``
    naming an algorithm counts: a remote that cannot be reached now fails later, as before.
    """
    try:
        description = json.loads(remote.read_bytes(ENCRYPTION_FILE))
        algorithm = description.get("algorithm", "none")
    except Exception:
        # unreachable, unreadable or not ours: opening stays as lazy as the plugin made it
        return
    if algorithm != "none":
        remote.close()
        raise RemoteConfigError(
            f"this remote is encrypted ({algorithm}): set its encryptionKey option",
            remote=remote.name,
            operation="open",
        )


def split_encryption_key(options: Mapping[str, Any]) -> tuple[dict[str, Any], Secret | None]:
    """``options`` without ``encryptionKey``, and that key as a :class:`Secret` (or None).

    The key may be given like any secret of the config: a string, ``{ env = "NAME" }`` or
    ``{ file = "/path" }``.
    """
    rest = dict(options)
    key = rest.pop("encryptionKey", None)
    if key is None or key == "":
        return rest, None
    try:
        return rest, to_secret(key)
    except ValueError as error:
        raise RemoteConfigError(
            f"encryptionKey: {error}", remote=str(options.get("name", "remote"))
        ) from None
