"""libvms: cryptographically auditable VMs.

Everything a user needs is importable from here; other modules may change.

The errors are imported with the package; every other name is imported from its
module on first use (PEP 562), so that ``import libvms`` stays cheap and a
program loads only what it uses: aiohttp (whose client builds SSL contexts when
imported) only with the RPC client, server or auditor, the JavaScript runtime
only with a VM.
"""

import importlib
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import (
    BlobNotFetchedError,
    DirectoryInUseError,
    InvalidPathError,
    LibVMSError,
    LimitExceeded,
    NotFoundError,
    ReplayLimitError,
    TamperError,
    VerificationError,
    VMCallError,
)

if TYPE_CHECKING:
    from .archive import DatArchive, FilesArchive
    from .keys import Keypair
    from .log import CallLog
    from .rpc import RPCClient, RPCServer
    from .verifier import AuditReport, Verifier
    from .vm import BackendVM

__version__ = "0.1.0"

__all__ = [
    "AuditReport",
    "BackendVM",
    "BlobNotFetchedError",
    "CallLog",
    "DatArchive",
    "DirectoryInUseError",
    "FilesArchive",
    "InvalidPathError",
    "Keypair",
    "LibVMSError",
    "LimitExceeded",
    "NotFoundError",
    "RPCClient",
    "RPCServer",
    "ReplayLimitError",
    "TamperError",
    "VMCallError",
    "VerificationError",
    "Verifier",
]

#: The module each name imported on first use comes from.
_LAZY = {
    "AuditReport": ".verifier",
    "BackendVM": ".vm",
    "CallLog": ".log",
    "DatArchive": ".archive",
    "FilesArchive": ".archive",
    "Keypair": ".keys",
    "RPCClient": ".rpc",
    "RPCServer": ".rpc",
    "Verifier": ".verifier",
}


def _load_lazily(package: str, sources: Mapping[str, str], name: str) -> object:
    """The ``__getattr__`` (PEP 562) of a package that imports its names on first use.

    ``sources`` maps each such name to its module, relative to ``package``; any
    other name is taken as a submodule, so that ``libvms.vm`` works after
    ``import libvms`` alone. The value is set on the package, so that this runs
    once per name.
    """
    source = sources.get(name)
    if source is None and not name.isidentifier():
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(source or f".{name}", package)
    except ModuleNotFoundError as exc:
        if source is None and exc.name == f"{package}.{name}":
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        raise
    value = module if source is None else getattr(module, name)
    setattr(sys.modules[package], name, value)
    return value


if not TYPE_CHECKING:  # type checkers see the imports above, and flag unknown names

    def __getattr__(name: str) -> object:
        return _load_lazily(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
