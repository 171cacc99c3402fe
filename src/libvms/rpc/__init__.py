"""JSON-RPC 2.0 over WebSocket, and HTTP read endpoints, for libvms VMs.

:mod:`~libvms.rpc.protocol` holds the messages and error codes (no I/O),
:mod:`~libvms.rpc.server` the server and :mod:`~libvms.rpc.client` the client.
The client and server are imported on first use: they need aiohttp, which is
slow to import, and the protocol alone does not.
"""

from typing import TYPE_CHECKING

from .. import _load_lazily
from .protocol import PROTOCOL, BackendInfo, ErrorCode

if TYPE_CHECKING:
    from .client import RPCClient
    from .server import RPCServer

__all__ = ["PROTOCOL", "BackendInfo", "ErrorCode", "RPCClient", "RPCServer"]

#: The module each name imported on first use comes from.
_LAZY = {"RPCClient": ".client", "RPCServer": ".server"}


if not TYPE_CHECKING:  # type checkers see the imports above, and flag unknown names

    def __getattr__(name: str) -> object:
        return _load_lazily(__name__, _LAZY, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
