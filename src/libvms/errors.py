"""The one error hierarchy of libvms.

Every error the public API raises is a :class:`LibVMSError`. Each subclass
carries the data a caller needs to act on it, not only a message.
"""

from __future__ import annotations

from typing import Any


class LibVMSError(Exception):
    """Root of every error libvms raises on purpose."""


class EncodingError(LibVMSError, ValueError):
    """A value cannot be carried as canonical JSON (NaN, bytes, too deep, too big...)."""


class TamperError(LibVMSError):
    """Stored or fetched data does not verify against its hashes, checkpoint or key.

    ``where`` names the piece of data that failed (an entry index, a blob hash, a
    file name) when it is known.
    """

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


class VerificationError(LibVMSError):
    """Two ledgers that should be identical are not.

    ``index`` is the first differing entry (or ``None``), ``path`` the first
    differing archive path (or ``None``), ``field`` what differs, and
    ``expected``/``found`` the two values.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        path: str | None = None,
        field: str | None = None,
        expected: Any = None,
        found: Any = None,
    ) -> None:
        super().__init__(message)
        self.index = index
        self.path = path
        self.field = field
        self.expected = expected
        self.found = found


class ReplayLimitError(LibVMSError):
    """A replay ran past its own time or memory limit on entry ``index``, which the
    host's run did not. That proves nothing about the host (its limits and its
    machine may differ): the replay cannot decide that entry. Replay again with
    the host's limits."""

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


class ArchiveError(LibVMSError):
    """A files-archive operation was refused. ``name`` is the JS-facing error name."""

    name = "ArchiveError"


class NotFoundError(ArchiveError):
    """The path does not exist in the archive."""

    name = "NotFoundError"


class BlobNotFetchedError(NotFoundError):
    """A fetched copy does not hold a file's content: it was fetched without history.

    Such a copy holds the blobs of the files that were current when it was
    fetched or refreshed; reading a file of an older version may need one it
    never fetched. Fetch the archive with ``history=True`` to read every
    version. ``hash`` is the missing blob's hex SHA-256. (A blob the copy did
    fetch and no longer holds intact is a :class:`TamperError`.)
    """

    def __init__(self, message: str, *, hash: str) -> None:
        super().__init__(message)
        self.hash = hash


class InvalidPathError(ArchiveError, ValueError):
    """The path is malformed: escapes the root, holds NUL, or has empty names."""

    name = "InvalidPathError"


class AlreadyExistsError(ArchiveError):
    """The path already exists where the operation needs it absent."""

    name = "AlreadyExistsError"


class NotADirectoryError_(ArchiveError):
    """A directory was expected at the path (or one of its parents)."""

    name = "NotADirectoryError"


class IsADirectoryError_(ArchiveError):
    """A file was expected at the path, but it is a directory."""

    name = "IsADirectoryError"


class DirectoryNotEmptyError(ArchiveError):
    """The directory has entries and ``recursive`` was not given."""

    name = "DirectoryNotEmptyError"


class ReadOnlyError(ArchiveError):
    """The archive (or this view of it) cannot be written."""

    name = "ReadOnlyError"


class TooLargeError(ArchiveError):
    """An archive operation would hold more than it may: a transaction's file
    data, a listing's entries."""

    name = "RangeError"


class VMCallError(LibVMSError):
    """A VM call failed: the script threw, or the call was refused.

    ``name`` is the error's name (``TypeError``, ``NotFoundError``...) and
    ``message`` its message, exactly as logged.
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class LimitExceeded(VMCallError):
    """A call ran past its time or memory limit (or overflowed the stack) and was aborted."""


class QueueFullError(VMCallError):
    """Too many calls are already queued for this VM."""

    def __init__(self, message: str = "too many queued calls") -> None:
        super().__init__("QueueFullError", message)


class ScriptError(LibVMSError):
    """The backend script could not be loaded (syntax error, throws at top level...)."""


class DirectoryInUseError(LibVMSError):
    """Another VM (in this process or another) holds the directory: one at a time writes it."""


class ConnectError(LibVMSError, ConnectionError):
    """The server is unreachable or is not a libvms server."""


class RPCError(LibVMSError):
    """A JSON-RPC error reply: ``code``, ``message`` and optional ``data``."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data


__all__ = [
    "AlreadyExistsError",
    "ArchiveError",
    "BlobNotFetchedError",
    "ConnectError",
    "DirectoryNotEmptyError",
    "EncodingError",
    "InvalidPathError",
    "IsADirectoryError_",
    "LibVMSError",
    "LimitExceeded",
    "NotADirectoryError_",
    "NotFoundError",
    "QueueFullError",
    "RPCError",
    "ReadOnlyError",
    "ScriptError",
    "TamperError",
    "TooLargeError",
    "VMCallError",
    "VerificationError",
]
