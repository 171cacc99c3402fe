"""libvms: cryptographically auditable VMs.

Everything a user needs is importable from here; other modules may change.
"""

from .archive import DatArchive, FilesArchive
from .errors import (
    BlobNotFetchedError,
    InvalidPathError,
    LibVMSError,
    LimitExceeded,
    NotFoundError,
    TamperError,
    VerificationError,
    VMCallError,
)
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
    "FilesArchive",
    "InvalidPathError",
    "Keypair",
    "LibVMSError",
    "LimitExceeded",
    "NotFoundError",
    "RPCClient",
    "RPCServer",
    "TamperError",
    "VMCallError",
    "VerificationError",
    "Verifier",
]
