"""JSON-RPC 2.0 over WebSocket, and HTTP read endpoints, for libvms VMs.

:mod:`~libvms.rpc.protocol` holds the messages and error codes (no I/O),
:mod:`~libvms.rpc.server` the server and :mod:`~libvms.rpc.client` the client.
"""

from .client import RPCClient
from .protocol import PROTOCOL, BackendInfo, ErrorCode
from .server import RPCServer

__all__ = ["PROTOCOL", "BackendInfo", "ErrorCode", "RPCClient", "RPCServer"]
