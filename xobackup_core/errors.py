"""Exit codes and the exception types every part of xobackup raises.

A user's mistake (bad config, bad argument, missing plugin) is a :class:`UsageError`: the CLI
prints its message as one paragraph and exits with :attr:`ExitCode.USAGE`, never a traceback.
Remotes map their library's errors onto the :class:`RemoteError` family so the engine can decide
what to retry and what to report without knowing the protocol.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of the ``xobackup`` command (documented in docs/cli.md)."""

    OK = 0
    """Everything asked for succeeded."""
    FAILURE = 1
    """The operation ran and failed (a VM backup failed, a remote test failed...)."""
    USAGE = 2
    """Bad input: config file, command-line arguments, missing plugin, unwritable folder."""
    DATA = 3
    """Corrupt or unreadable data: a malformed VHD, XVA, or backup metadata."""
    INTERRUPTED = 130
    """Stopped by the user (Ctrl-C) or a signal."""


class XobackupError(Exception):
    """Base of every error xobackup raises on purpose; its message is meant for the user."""

    exit_code: ExitCode = ExitCode.FAILURE


class UsageError(XobackupError):
    """The user asked for something that cannot work as given."""

    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """The configuration is invalid. ``key`` is the dotted path of the offending key."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.key = key
        self.source = source
        where = ""
        if source:
            where = f"{source}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}")


class PluginError(UsageError):
    """A plugin is missing, disabled, or broke its contract."""


class FormatError(XobackupError):
    """Malformed data in a disk or VM format. Names the file and the field."""

    exit_code = ExitCode.DATA

    def __init__(self, message: str, *, path: str | None = None, field: str | None = None) -> None:
        self.path = path
        self.field = field
        parts = [p for p in (path, field) if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class RemoteError(XobackupError):
    """An operation on a remote failed. Names the remote, the operation and the path."""

    transient = False
    """True when retrying the same operation later may succeed (network hiccup, timeout)."""

    def __init__(
        self,
        message: str,
        *,
        remote: str | None = None,
        operation: str | None = None,
        path: str | None = None,
    ) -> None:
        self.remote = remote
        self.operation = operation
        self.path = path
        self.detail = message
        super().__init__(self._format())

    def _format(self) -> str:
        head = []
        if self.remote:
            head.append(f"remote {self.remote!r}")
        if self.operation:
            head.append(self.operation)
        if self.path:
            head.append(self.path)
        return f"{' '.join(head)}: {self.detail}" if head else self.detail


class RemotePathError(RemoteError, UsageError):
    """A path that is not allowed on a remote (``..``, NUL byte, empty name)."""

    exit_code = ExitCode.USAGE


class RemoteConfigError(RemoteError, UsageError):
    """The remote as configured cannot be used (root folder missing or unwritable, bad URL)."""

    exit_code = ExitCode.USAGE


class RemoteNotFoundError(RemoteError):
    """The file or folder does not exist."""


class RemoteExistsError(RemoteError):
    """The file or folder already exists and the operation will not replace it."""


class RemotePermissionError(RemoteError):
    """Access denied: wrong credentials, read-only share, locked (immutable) object."""


class RemoteNoSpaceError(RemoteError):
    """The remote is full or over quota."""


class RemoteConnectionError(RemoteError):
    """The remote could not be reached or the connection broke."""

    transient = True


class RemoteTimeoutError(RemoteConnectionError):
    """An operation did not finish within its timeout."""


class HypervisorError(XobackupError):
    """A hypervisor call failed; ``code`` is its error code (XAPI ``ErrorDescription[0]``)."""

    def __init__(self, message: str, *, code: str | None = None, params: list[str] | None = None):
        self.code = code
        self.params = params or []
        super().__init__(message)


class CancelledError(XobackupError):
    """The operation was cancelled by the user."""

    exit_code = ExitCode.INTERRUPTED
