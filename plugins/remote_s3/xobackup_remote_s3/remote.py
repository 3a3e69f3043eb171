"""The S3 remote: boto3, streaming multipart uploads, ranged reads, virtual folders.

* Writes stream as a multipart upload whose parts are sent in parallel (a bounded number in
  flight, so memory does not grow with the stream). Parts start at 8 MiB (boto3's size),
  double after 50 parts and then every 1,000 parts, so the 10,000-part limit covers more than
  S3's 5 TiB object limit without a size hint; with a size hint the first part is already
  large enough for the hinted size
  (xo-backups.md §10.5). Committing completes the upload (a small file is one PutObject);
  aborting calls AbortMultipartUpload. An upload cut by a dead server is never visible under
  its key; :meth:`S3Remote.abort_incomplete_uploads` removes what it left.
* Rename is CopyObject (multipart copy above 5 GiB, by boto3's managed copy) then delete.
* Folders do not exist in S3: ``makedirs`` does nothing and a prefix with children is a folder.
* Transient failures (connection reset, timeouts, 5xx, SlowDown) are retried by botocore's
  ``standard`` retry mode (exponential backoff with jitter); permanent ones are not.
* Object Lock: a refused delete or overwrite of a locked object becomes a
  :class:`RemotePermissionError` that says the object is locked (and until when), at once.
"""

from __future__ import annotations

import io
import math
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar
from urllib.parse import unquote, urlsplit

import boto3
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from xobackup_core.config import Secret, parse_duration, redact_url
from xobackup_core.errors import (
    RemoteConfigError,
    RemoteConnectionError,
    RemoteError,
    RemoteExistsError,
    RemoteNoSpaceError,
    RemoteNotFoundError,
    RemotePermissionError,
    RemoteTimeoutError,
)
from xobackup_core.remote import Remote, RemoteStat, RemoteWriter, normalize_path

T = TypeVar("T")

SCHEMES = ("s3", "s3+http", "s3+https")
MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
"""S3's smallest allowed part (except the last)."""
DEFAULT_PART_SIZE = 8 * MiB
"""The first parts' size by default: boto3's. Every part is a request with a fixed cost on
both sides (signing, routing, a response), so a 1 GiB stream takes 89 parts, not 128."""
MAX_PART_SIZE = 5 * 1024 * MiB
MAX_PARTS = 10_000
EARLY_PARTS = 50
"""Parts 1-50 have the first size; parts 51-1,000 twice that; then doubling every 1,000."""
PARTS_PER_SIZE_STEP = 1_000
MEMORY_PART_LIMIT = 32 * MiB
"""Larger parts are spooled to a temporary file instead of memory."""
MEMORY_IN_FLIGHT = 48 * MiB
"""In-memory parts being uploaded at once, in bytes (with at least one part)."""
SPOOL_IN_FLIGHT = 1024 * MiB
"""Spooled parts being uploaded at once, in bytes of temporary files (at least one part)."""
COPY_LIMIT = 5 * 1024 * MiB
"""CopyObject's limit: larger objects are copied part by part."""
CHECKSUM_ALGORITHM = "CRC32"
"""Checksum of each uploaded part (botocore's default; zlib computes it quickly)."""
PART_CHECKSUM = f"Checksum{CHECKSUM_ALGORITHM}"
DELETE_BATCH = 1_000
"""DeleteObjects takes at most 1,000 keys per request."""

_OPTIONS = {
    "name": "display name in messages (default: the URL without secrets)",
    "endpoint": "URL of an S3-compatible server (default: AWS)",
    "region": "region (default: the environment's, else us-east-1)",
    "path_style": "path-style addressing (host/bucket/key); default true with an endpoint",
    "access_key": "access key id (default: the environment / AWS config)",
    "secret_key": "secret access key (a secret)",
    "session_token": "temporary session token (a secret)",
    "connect_timeout": "seconds to connect; default 30",
    "timeout": "seconds a request may wait for data; default 600",
    "retries": "attempts after a transient failure (5xx, SlowDown, reset); default 5",
    "part_size": "first multipart part size in bytes (>= 5 MiB); default 8 MiB",
    "upload_concurrency": "parts of one file uploaded in parallel; default 8",
    "upload_memory": "bytes of in-memory parts in flight per file (at least one part); 48 MiB",
    "checksums": "'when_supported' (default) or 'when_required' for older S3-compatible servers",
    "verify_tls": "check the server's TLS certificate; default true (or a CA bundle path)",
    "purge_versions": "delete every version of a file (versioned buckets), not just hide it",
    "conditional_writes": "the server honours If-None-Match (exclusive lock files); default true",
}


def part_size_for(part_number: int, first_part_size: int = DEFAULT_PART_SIZE) -> int:
    """Size of part ``part_number`` (1-based) of a stream of unknown length.

    Small streams keep small parts (little memory); the size doubles after 50 parts, since
    every request has a fixed cost (a 1 GiB stream takes 89 parts, 128 with boto3's
    ``upload_file``), then every 1,000 parts, which keeps the 10,000-part limit out of reach
    for any stream S3 can hold (5 TiB).
    """
    if part_number <= EARLY_PARTS:
        step = 0
    else:
        step = 1 + (part_number - 1) // PARTS_PER_SIZE_STEP
    return min(first_part_size << step, MAX_PART_SIZE)


def first_part_size(size_hint: int | None, minimum: int = DEFAULT_PART_SIZE) -> int:
    """The first part's size: enough for ``size_hint`` bytes in 10,000 equal parts."""
    if not size_hint:
        return minimum
    needed = math.ceil(size_hint / MAX_PARTS)
    return min(max(minimum, math.ceil(needed / MiB) * MiB), MAX_PART_SIZE)


@dataclass(frozen=True)
class S3Settings:
    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None
    path_style: bool | None
    access_key: str | None
    secret_key: Secret | None
    session_token: Secret | None
    connect_timeout: float = 30.0
    timeout: float = 600.0
    retries: int = 5
    part_size: int = DEFAULT_PART_SIZE
    upload_concurrency: int = 8
    upload_memory: int = MEMORY_IN_FLIGHT
    checksums: str = "when_supported"
    verify_tls: bool | str = True
    purge_versions: bool = False
    conditional_writes: bool = True


def _secret(value: Any) -> Secret | None:
    if value is None or isinstance(value, Secret):
        return value
    return Secret(str(value))


def _error_code(error: botocore.exceptions.ClientError) -> tuple[str, int, str]:
    details = error.response.get("Error", {})
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(details.get("Code", "")), int(status or 0), str(details.get("Message", ""))


_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidSecurity",
}
_TRANSIENT = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"}


class _RangeError(RemoteError):
    """A ranged GET starting at or after the end of the object: there is nothing to read."""

    def __init__(self) -> None:
        super().__init__("range not satisfiable")


class _S3Writer(RemoteWriter):
    """Fills one part at a time and uploads parts in parallel; commit completes the upload.

    Parts up to :data:`MEMORY_PART_LIMIT` are held in memory, larger ones (streams past
    about 10 GiB without a size hint) are spooled to temporary files; the bytes in flight are
    bounded (:data:`MEMORY_IN_FLIGHT`, :data:`SPOOL_IN_FLIGHT`), so memory stays under
    about 70 MiB of part data whatever the stream's size.
    """

    def __init__(self, remote: S3Remote, path: str, size_hint: int | None) -> None:
        super().__init__()
        self._remote = remote
        self._path = path
        self._key = remote._key(path)
        self._first_part = first_part_size(size_hint, remote.settings.part_size)
        self._part_size = self._first_part
        self._part_number = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._in_flight = 0
        self._in_flight_changed = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None
        self._free: list[bytearray] = []
        self._free_lock = threading.Lock()
        # The parts' checksum algorithm is declared when the upload starts (as boto3's
        # upload_file does): the server then combines the parts' own checksums. Without
        # it, servers default to a full-object CRC-64 they compute over the whole object
        # again at completion (moto copies it once more for that).
        self._checksum: dict[str, str] = (
            {"ChecksumAlgorithm": CHECKSUM_ALGORITHM}
            if remote.settings.checksums == "when_supported"
            else {}
        )
        self._new_buffer()

    def _new_buffer(self) -> None:
        self._filled = 0
        self._spool: BinaryIO | None = None
        if self._part_size > MEMORY_PART_LIMIT:
            self._buffer = bytearray()
            self._spool = tempfile.TemporaryFile(prefix="xobackup-s3-part-")
            return
        # Buffers of uploaded parts are reused: a fresh multi-MiB allocation costs a page
        # fault per 4 KiB on first touch, which showed up as a tenth of the upload's CPU.
        with self._free_lock:
            while self._free:
                buffer = self._free.pop()
                if len(buffer) == self._part_size:
                    self._buffer = buffer
                    return
        self._buffer = bytearray(self._part_size)

    def _take_body(self) -> bytearray | BinaryIO:
        """The filled part as a request body, and a fresh buffer for the next one.

        An in-memory part goes to botocore as the ``bytearray`` itself: botocore hashes it
        and urllib3 sends it whole, each in one C call without a copy. A file-like body
        would be read back in 1 MiB pieces for the SHA-256 and the CRC-32 and in 16 KiB
        pieces for the socket, into a new ``bytes`` object each time: more copies, and
        memory churn in every upload thread.
        """
        body: bytearray | BinaryIO
        if self._spool is not None:
            self._spool.seek(0)
            body = self._spool
        else:
            body = self._buffer
            if self._filled < len(body):
                del body[self._filled :]  # the last part: shrunk in place
        self._new_buffer()
        return body

    def _write(self, data: memoryview) -> None:
        while data:
            piece = data[: self._part_size - self._filled]
            if self._spool is not None:
                self._spool.write(piece)
            else:
                self._buffer[self._filled : self._filled + len(piece)] = piece
            self._filled += len(piece)
            data = data[len(piece) :]
            if self._filled >= self._part_size:
                self._send_part()

    def _raise_failed_part(self) -> None:
        for future in self._parts:
            if future.done() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._remote._call(
                "write",
                self._path,
                lambda c: c.create_multipart_upload(
                    Bucket=self._remote.settings.bucket, Key=self._key, **self._checksum
                )["UploadId"],
            )
            self._pool = ThreadPoolExecutor(
                max_workers=self._remote.settings.upload_concurrency,
                thread_name_prefix="s3-part",
            )
        self._part_number += 1
        if self._part_number > MAX_PARTS:
            raise RemoteError(
                f"the stream needs more than {MAX_PARTS} parts; give a size hint",
                remote=self._remote.name,
                operation="write",
                path=self._path,
            )
        self._part_size = max(
            self._first_part, part_size_for(self._part_number + 1, self._remote.settings.part_size)
        )
        size = self._filled
        body = self._take_body()
        self._wait_for_slot(size)
        self._raise_failed_part()
        assert self._pool is not None
        self._parts.append(self._pool.submit(self._upload_part, self._part_number, body))

    def _wait_for_slot(self, size: int) -> None:
        """Block until this part may be sent: a bounded number of bytes in flight."""
        settings = self._remote.settings
        budget = SPOOL_IN_FLIGHT if size > MEMORY_PART_LIMIT else settings.upload_memory
        limit = max(1, min(settings.upload_concurrency, budget // max(size, 1)))
        with self._in_flight_changed:
            while self._in_flight >= limit:
                self._in_flight_changed.wait()
            self._in_flight += 1

    def _upload_part(self, number: int, body: bytearray | BinaryIO) -> dict[str, Any]:
        try:
            response = self._remote._call(
                "write",
                self._path,
                lambda c: c.upload_part(
                    Bucket=self._remote.settings.bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=body,
                    **self._checksum,
                ),
            )
            part = {"PartNumber": number, "ETag": response["ETag"]}
            if PART_CHECKSUM in response:
                part[PART_CHECKSUM] = response[PART_CHECKSUM]
            return part
        finally:
            if isinstance(body, bytearray):
                with self._free_lock:
                    self._free.append(body)
            else:
                body.close()
            with self._in_flight_changed:
                self._in_flight -= 1
                self._in_flight_changed.notify_all()

    def _commit(self) -> None:
        settings = self._remote.settings
        if self._upload_id is None:
            body = self._take_body()
            try:
                self._remote._call(
                    "write",
                    self._path,
                    lambda c: c.put_object(Bucket=settings.bucket, Key=self._key, Body=body),
                )
            finally:
                if not isinstance(body, bytearray):
                    body.close()
            return
        if self._filled:
            self._send_part()
        parts = [future.result() for future in self._parts]
        self._shutdown()
        self._remote._call(
            "write",
            self._path,
            lambda c: c.complete_multipart_upload(
                Bucket=settings.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            ),
        )

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _abort(self) -> None:
        if self._spool is not None:
            self._spool.close()
        self._buffer = bytearray()
        self._shutdown()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        try:
            self._remote._client.abort_multipart_upload(
                Bucket=self._remote.settings.bucket, Key=self._key, UploadId=upload_id
            )
        except Exception:
            # Server unreachable: the parts stay invisible; abort_incomplete_uploads() cleans up.
            pass


class _S3Reader(io.RawIOBase):
    """The body of a (ranged) GET; a transient failure resumes with a new ranged GET."""

    def __init__(self, remote: S3Remote, path: str, offset: int, length: int | None) -> None:
        super().__init__()
        self._remote = remote
        self._path = path
        self._position = offset
        self._end = None if length is None else offset + length
        self._body: Any = None
        self._resumes = 0
        self._open()

    def _open(self) -> None:
        if self._end is not None and self._position >= self._end:
            self._body = None
            return
        last = "" if self._end is None else str(self._end - 1)
        arguments: dict[str, Any] = {
            "Bucket": self._remote.settings.bucket,
            "Key": self._remote._key(self._path),
        }
        if self._position or last:
            arguments["Range"] = f"bytes={self._position}-{last}"
        try:
            self._body = self._remote._call(
                "read", self._path, lambda c: c.get_object(**arguments)
            )["Body"]
        except _RangeError:
            self._body = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._body is None:
            return 0
        while True:
            try:
                data = self._body.read(len(buffer))
                break
            except Exception as error:
                mapped = self._remote._map(error, "read", self._path)
                if not mapped.transient or self._resumes >= self._remote.settings.retries:
                    raise mapped from None
                self._resumes += 1
                self._open()
                if self._body is None:
                    return 0
        count = len(data)
        buffer[:count] = data
        self._position += count
        return count

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None
        super().close()


class S3Remote(Remote):
    """An S3 bucket (or a prefix in it) as a remote.

    URLs: ``s3://bucket/prefix`` (AWS, or the ``endpoint`` option), and
    ``s3+http://host:port/bucket/prefix`` / ``s3+https://...`` for S3-compatible servers
    (path-style). Credentials: ``access_key`` and ``secret_key`` (secret) options, the
    ``ak:sk@`` user-info of the URL, or the environment / AWS config files.
    Other options: ``region``, ``path_style``, ``connect_timeout`` (30 s), ``timeout`` (600 s),
    ``retries`` (5), ``part_size`` (8 MiB), ``upload_concurrency`` (8), ``upload_memory``
    (48 MiB: raise it on fast links, memory for speed), ``checksums``,
    ``verify_tls``, ``purge_versions``.
    """

    supports_update = False
    list_page_size = 1000
    """Keys per listing request (S3's maximum; smaller only to exercise pagination)."""

    def __init__(self, settings: S3Settings, *, name: str) -> None:
        self.settings = settings
        self.name = name
        if not settings.conditional_writes:
            # Hide the extension: callers then know no exclusive create is available.
            self.create_exclusive = None  # type: ignore[assignment]
        session = boto3.session.Session(
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key.reveal() if settings.secret_key else None,
            aws_session_token=settings.session_token.reveal() if settings.session_token else None,
            region_name=settings.region,
        )
        addressing = "auto"
        if settings.path_style is True or (settings.path_style is None and settings.endpoint):
            addressing = "path"
        elif settings.path_style is False:
            addressing = "virtual"
        config = Config(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.timeout,
            retries={"mode": "standard", "total_max_attempts": settings.retries + 1},
            s3={"addressing_style": addressing},
            max_pool_connections=max(10, settings.upload_concurrency * 4),
            request_checksum_calculation=settings.checksums,
            response_checksum_validation="when_required",
            user_agent_extra="xobackup",
        )
        try:
            self._client = session.client(
                "s3",
                endpoint_url=settings.endpoint,
                region_name=settings.region or session.region_name or "us-east-1",
                config=config,
                verify=settings.verify_tls,
            )
        except ValueError as error:
            raise RemoteConfigError(f"invalid S3 settings: {error}", remote=name) from None
        try:
            self._call("open", "/", lambda c: c.head_bucket(Bucket=settings.bucket))
        except RemotePermissionError as error:
            # HEAD answers carry no error code: a bare 403 means bad keys or no permission.
            raise RemotePermissionError(
                f"access to bucket {settings.bucket!r} was refused ({error.detail}): check the "
                "credentials (access_key / secret_key) and the bucket's permissions",
                remote=name,
                operation="open",
            ) from None
        except RemoteNotFoundError:
            raise RemoteConfigError(
                f"bucket {settings.bucket!r} does not exist"
                + (f" on {settings.endpoint}" if settings.endpoint else ""),
                remote=name,
                operation="open",
            ) from None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, options: Mapping[str, Any]) -> S3Remote:
        """Parse an ``s3://``, ``s3+http://`` or ``s3+https://`` URL and the remote's options."""
        # The CLI names a remote opened by URL after the URL: never show its password.
        name = redact_url(str(options.get("name") or url))
        unknown = sorted(set(options) - set(_OPTIONS) - {"username", "password"})
        if unknown:
            raise RemoteConfigError(
                f"unknown option(s) {', '.join(unknown)}; s3 options: "
                + "; ".join(f"{k}: {v}" for k, v in _OPTIONS.items()),
                remote=name,
            )
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - validates the port
        except ValueError as error:
            raise RemoteConfigError(f"invalid S3 URL: {error}", remote=name) from None
        path = unquote(parts.path or "")
        endpoint = options.get("endpoint")
        if parts.scheme == "s3":
            bucket = parts.hostname or ""
            rest = path
        else:
            protocol = parts.scheme.split("+", 1)[1]
            host = parts.hostname or ""
            if not host:
                raise RemoteConfigError(
                    f"the URL has no host: write {parts.scheme}://host[:port]/bucket/prefix",
                    remote=name,
                )
            netloc = host if parts.port is None else f"{host}:{parts.port}"
            endpoint = endpoint or f"{protocol}://{netloc}"
            bucket, _, rest = path.lstrip("/").partition("/")
        if not bucket:
            raise RemoteConfigError(
                "the URL names no bucket: write s3://bucket/prefix", remote=name
            )
        prefix = normalize_path(rest).strip("/")
        access_key = options.get("access_key") or (
            unquote(parts.username) if parts.username else None
        )
        secret_key = _secret(options.get("secret_key"))
        if secret_key is None and parts.password is not None:
            secret_key = Secret(unquote(parts.password))
        if (access_key is None) != (secret_key is None):
            raise RemoteConfigError(
                "give both access_key and secret_key, or neither (to use the environment)",
                remote=name,
            )
        try:
            settings = S3Settings(
                bucket=bucket,
                prefix=f"{prefix}/" if prefix else "",
                endpoint=endpoint,
                region=options.get("region"),
                path_style=options.get("path_style"),
                access_key=access_key,
                secret_key=secret_key,
                session_token=_secret(options.get("session_token")),
                connect_timeout=parse_duration(options.get("connect_timeout", 30)),
                timeout=parse_duration(options.get("timeout", 600)),
                retries=int(options.get("retries", 5)),
                part_size=int(options.get("part_size", DEFAULT_PART_SIZE)),
                upload_concurrency=max(1, int(options.get("upload_concurrency", 8))),
                upload_memory=int(options.get("upload_memory", MEMORY_IN_FLIGHT)),
                checksums=str(options.get("checksums", "when_supported")),
                verify_tls=options.get("verify_tls", True),
                purge_versions=bool(options.get("purge_versions", False)),
                conditional_writes=bool(options.get("conditional_writes", True)),
            )
        except (TypeError, ValueError) as error:
            raise RemoteConfigError(f"invalid option: {error}", remote=name) from None
        if not MIN_PART_SIZE <= settings.part_size <= MAX_PART_SIZE:
            raise RemoteConfigError(
                f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes",
                remote=name,
            )
        if settings.checksums not in ("when_supported", "when_required"):
            raise RemoteConfigError(
                "checksums must be 'when_supported' or 'when_required'", remote=name
            )
        return cls(settings, name=name)

    # -- keys, calls and errors --------------------------------------------------------------
    def _key(self, path: str) -> str:
        return self.settings.prefix + normalize_path(path)[1:]

    def _folder_prefix(self, path: str) -> str:
        relative = normalize_path(path)[1:]
        return self.settings.prefix + (f"{relative}/" if relative else "")

    def _call(self, operation: str, path: str | None, function: Callable[[Any], T]) -> T:
        try:
            return function(self._client)
        except RemoteError:
            raise
        except Exception as error:
            raise self._map(error, operation, path) from None

    def _map(self, error: BaseException, operation: str, path: str | None) -> RemoteError:
        """The core's error for a boto3 failure: names remote, operation and path, no secret."""
        if isinstance(error, RemoteError):
            return error
        kwargs: dict[str, Any] = {"remote": self.name, "operation": operation, "path": path}
        where = self.settings.endpoint or "AWS S3"
        if isinstance(error, botocore.exceptions.ClientError):
            code, status, message = _error_code(error)
            if code == "InvalidRange" or status == 416:
                return _RangeError()
            if code == "NoSuchBucket":
                return RemoteConfigError(
                    f"bucket {self.settings.bucket!r} does not exist", **kwargs
                )
            if code in _NOT_FOUND or status == 404:
                return RemoteNotFoundError("no such file", **kwargs)
            if code in _CREDENTIALS:
                return RemotePermissionError(
                    f"the credentials were refused by {where} ({code})", **kwargs
                )
            if code in ("AccessDenied", "403") or status == 403:
                return RemotePermissionError(f"access denied by {where} ({code})", **kwargs)
            if code in ("EntityTooLarge", "QuotaExceeded"):
                return RemoteNoSpaceError(f"{code}: {message}", **kwargs)
            if code in _TRANSIENT or status >= 500:
                return RemoteConnectionError(f"{where} failed: {code} {message}".strip(), **kwargs)
            return RemoteError(f"{code}: {message}" if message else code, **kwargs)
        if isinstance(
            error, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError
        ):
            return RemoteTimeoutError(f"no answer from {where} within the timeout", **kwargs)
        if isinstance(error, botocore.exceptions.NoCredentialsError):
            return RemoteConfigError(
                "no credentials: set access_key and secret_key, or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY",
                **kwargs,
            )
        if isinstance(
            error,
            botocore.exceptions.EndpointConnectionError
            | botocore.exceptions.ConnectionError
            | botocore.exceptions.HTTPClientError
            | botocore.exceptions.IncompleteReadError
            | botocore.exceptions.ResponseStreamingError
            | ConnectionError,
        ):
            return RemoteConnectionError(f"cannot reach {where}: {type(error).__name__}", **kwargs)
        if isinstance(error, TimeoutError):
            return RemoteTimeoutError(f"no answer from {where} within the timeout", **kwargs)
        return RemoteError(f"{type(error).__name__}: {error}", **kwargs)

    def _locked_error(
        self, error: RemoteError, key: str, version_id: str | None = None
    ) -> RemoteError:
        """Turn an access-denied delete/overwrite of a locked object into a clear message."""
        if not isinstance(error, RemotePermissionError) or "credentials" in error.detail:
            return error
        arguments: dict[str, Any] = {"Bucket": self.settings.bucket, "Key": key}
        if version_id:
            arguments["VersionId"] = version_id
        try:
            head = self._client.head_object(**arguments)
        except Exception:
            return error
        mode = head.get("ObjectLockMode")
        until = head.get("ObjectLockRetainUntilDate")
        hold = head.get("ObjectLockLegalHoldStatus") == "ON"
        if not (mode or hold):
            return error
        reasons = []
        if mode:
            reasons.append(f"{mode} retention until {until.isoformat() if until else '?'}")
        if hold:
            reasons.append("a legal hold")
        return RemotePermissionError(
            f"the object is locked by S3 Object Lock ({', '.join(reasons)}); it cannot be "
            "deleted or replaced before then",
            remote=error.remote,
            operation=error.operation,
            path=error.path,
        )

    # -- files -------------------------------------------------------------------------------
    def open_write(self, path: str, size_hint: int | None = None) -> RemoteWriter:
        """Start a streaming upload; ``size_hint`` (bytes) sizes the parts for huge streams."""
        return _S3Writer(self, normalize_path(path), size_hint)

    def create_exclusive(self, path: str, data: bytes) -> None:
        """Create ``path`` holding ``data`` only if no object is there (atomic, for locks).

        A ``PutObject`` with ``If-None-Match: *`` (AWS, MinIO, SeaweedFS and moto honour
        it); the loser of a race gets :class:`~xobackup_core.errors.RemoteExistsError`. A
        server that ignores the header would overwrite: set the option
        ``conditional_writes = false`` for it, and locks fall back to their best-effort mode.
        """
        path = normalize_path(path)
        try:
            self._client.put_object(
                Bucket=self.settings.bucket, Key=self._key(path), Body=data, IfNoneMatch="*"
            )
        except botocore.exceptions.ClientError as error:
            code, status, _message = _error_code(error)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                409,
                412,
            ):
                raise RemoteExistsError(
                    "already exists", remote=self.name, operation="create", path=path
                ) from None
            raise self._map(error, "create", path) from None
        except Exception as error:
            raise self._map(error, "create", path) from None

    def open_read(self, path: str, offset: int = 0, length: int | None = None) -> BinaryIO:
        path = normalize_path(path)
        raw = _S3Reader(self, path, offset, length)
        return io.BufferedReader(raw, buffer_size=1024 * 1024)  # type: ignore[return-value]

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        path = normalize_path(path)
        if length <= 0:
            return b""
        try:
            response = self._call(
                "read",
                path,
                lambda c: c.get_object(
                    Bucket=self.settings.bucket,
                    Key=self._key(path),
                    Range=f"bytes={offset}-{offset + length - 1}",
                ),
            )
        except _RangeError:
            return b""
        return self._call("read", path, lambda c: response["Body"].read())

    # -- namespace ---------------------------------------------------------------------------
    def _paginate(self, operation: str, path: str, **arguments: Any) -> Iterator[dict[str, Any]]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.settings.bucket,
            PaginationConfig={"PageSize": self.list_page_size},
            **arguments,
        )
        iterator = iter(pages)
        while True:
            try:
                page = next(iterator)
            except StopIteration:
                return
            except Exception as error:
                raise self._map(error, operation, path) from None
            yield page

    def list(self, path: str = "/") -> list[str]:
        path = normalize_path(path)
        prefix = self._folder_prefix(path)
        names: set[str] = set()
        for page in self._paginate("list", path, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                name = common["Prefix"][len(prefix) :].rstrip("/")
                if name:
                    names.add(name)
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if name:  # a "folder/" marker object made by other tools
                    names.add(name)
        return sorted(names)

    def stat(self, path: str) -> RemoteStat:
        path = normalize_path(path)
        if path == "/":
            return RemoteStat(size=0, mtime=0.0, is_dir=True)
        try:
            head = self._call(
                "stat",
                path,
                lambda c: c.head_object(Bucket=self.settings.bucket, Key=self._key(path)),
            )
            return RemoteStat(
                size=int(head["ContentLength"]),
                mtime=head["LastModified"].timestamp(),
                is_dir=False,
            )
        except RemoteNotFoundError:
            pass
        for page in self._paginate("stat", path, Prefix=self._folder_prefix(path), MaxKeys=1):
            if page.get("KeyCount", 0) or page.get("Contents"):
                return RemoteStat(size=0, mtime=0.0, is_dir=True)
            break
        raise RemoteNotFoundError(
            "no such file or folder", remote=self.name, operation="stat", path=path
        )

    def rename(self, source: str, target: str) -> None:
        source, target = normalize_path(source), normalize_path(target)
        where = f"{source} -> {target}"
        size = self.stat(source).size
        bucket = self.settings.bucket
        copy_source = {"Bucket": bucket, "Key": self._key(source)}
        if size <= COPY_LIMIT:
            self._call(
                "rename",
                where,
                lambda c: c.copy_object(
                    Bucket=bucket, Key=self._key(target), CopySource=copy_source
                ),
            )
        else:
            transfer = TransferConfig(
                multipart_threshold=COPY_LIMIT,
                multipart_chunksize=max(512 * MiB, first_part_size(size)),
                max_concurrency=self.settings.upload_concurrency,
            )
            self._call(
                "rename",
                where,
                lambda c: c.copy(copy_source, bucket, self._key(target), Config=transfer),
            )
        self._delete_key(source, "rename")

    def _delete_key(self, path: str, operation: str) -> None:
        key = self._key(path)
        try:
            if self.settings.purge_versions:
                self._delete_keys([key], operation, path, versions=True)
            else:
                self._call(
                    operation, path, lambda c: c.delete_object(Bucket=self.settings.bucket, Key=key)
                )
        except RemotePermissionError as error:
            raise self._locked_error(error, key) from None

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        path = normalize_path(path)
        # S3 deletes a missing key without complaint; the contract wants to know.
        try:
            self._call(
                "delete",
                path,
                lambda c: c.head_object(Bucket=self.settings.bucket, Key=self._key(path)),
            )
        except RemoteNotFoundError:
            if missing_ok:
                return
            raise
        self._delete_key(path, "delete")

    def _delete_keys(
        self, keys: list[str], operation: str, path: str, *, versions: bool = False
    ) -> None:
        objects: list[dict[str, str]] = []
        if versions:
            for key in keys:
                paginator = self._client.get_paginator("list_object_versions")
                try:
                    for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=key):
                        for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                            if entry["Key"] == key:
                                objects.append({"Key": key, "VersionId": entry["VersionId"]})
                except Exception as error:
                    raise self._map(error, operation, path) from None
        else:
            objects = [{"Key": key} for key in keys]
        for start in range(0, len(objects), DELETE_BATCH):
            batch = objects[start : start + DELETE_BATCH]
            response = self._call(
                operation,
                path,
                lambda c, batch=batch: c.delete_objects(
                    Bucket=self.settings.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )
            for failure in response.get("Errors", []):
                code = failure.get("Code", "")
                failed_path = "/" + failure.get("Key", "")[len(self.settings.prefix) :]
                error: RemoteError
                if code == "AccessDenied":
                    error = RemotePermissionError(
                        f"access denied ({code})",
                        remote=self.name,
                        operation=operation,
                        path=failed_path,
                    )
                    raise self._locked_error(
                        error, failure.get("Key", ""), failure.get("VersionId")
                    )
                if code in _NOT_FOUND:
                    continue
                raise RemoteError(
                    f"{code}: {failure.get('Message', '')}",
                    remote=self.name,
                    operation=operation,
                    path=failed_path,
                )

    def delete_tree(self, path: str) -> None:
        path = normalize_path(path)
        prefix = self._folder_prefix(path)
        folders = {prefix} if prefix else set()
        keys: list[str] = []
        for page in self._paginate("delete_tree", path, Prefix=prefix):
            for item in page.get("Contents", []):
                keys.append(item["Key"])
                folder = item["Key"].rpartition("/")[0]
                while len(folder) + 1 > len(prefix):
                    folders.add(folder + "/")
                    folder = folder.rpartition("/")[0]
            if len(keys) >= DELETE_BATCH:
                self._delete_keys(keys, "delete_tree", path, versions=self.settings.purge_versions)
                keys = []
        if keys:
            self._delete_keys(keys, "delete_tree", path, versions=self.settings.purge_versions)
        if path != "/" and self._lists_empty_prefix(path):
            # Filer-backed servers (SeaweedFS) keep emptied folders and list them; deleting
            # the folder names, deepest first, removes them. Real S3 never gets here.
            markers = sorted(folders, key=lambda f: f.count("/"), reverse=True)
            self._delete_keys(markers, "delete_tree", path)

    def _lists_empty_prefix(self, path: str) -> bool:
        """True when the server still lists the (now empty) folder ``path`` as a prefix."""
        target = self._folder_prefix(path)
        for page in self._paginate("delete_tree", path, Prefix=target[:-1], Delimiter="/"):
            if any(c["Prefix"] == target for c in page.get("CommonPrefixes", [])):
                return True
        return False

    def makedirs(self, path: str) -> None:
        """Nothing to do: S3 has no folders (a prefix exists as soon as a key uses it)."""
        normalize_path(path)

    def abort_incomplete_uploads(self) -> int:
        """Abort every unfinished multipart upload under the remote's prefix; return the count.

        Uploads cut by a crash or a dead connection keep their parts (and their cost) until
        aborted; they are never visible as objects.
        """
        count = 0
        paginator = self._client.get_paginator("list_multipart_uploads")
        try:
            for page in paginator.paginate(
                Bucket=self.settings.bucket, Prefix=self.settings.prefix
            ):
                for upload in page.get("Uploads", []):
                    self._client.abort_multipart_upload(
                        Bucket=self.settings.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    count += 1
        except Exception as error:
            raise self._map(error, "abort_incomplete_uploads", "/") from None
        return count

    def close(self) -> None:
        self._client.close()
