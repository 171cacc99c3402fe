"""RPCClient: call a VM's exported functions over JSON-RPC on WebSocket.

::

    async with RPCClient("ws://localhost:5555", user="alice") as client:
        client.backend_info.methods          # the VM's exported functions
        await client.foo(1, 2)               # or: await client.call("foo", 1, 2)

With ``key=Keypair`` every call is signed (see :mod:`libvms.signed`); the
server's reply then carries a receipt, which the client checks before
returning: the entry records exactly the signed request and the result
received, and it is included in a checkpoint signed by the call log's key.
The newest verified receipts (10,000 by default, see ``max_receipts``) are
kept in :attr:`RPCClient.receipts`.

One connection carries any number of concurrent calls. A script error is
raised as :class:`~libvms.errors.VMCallError`, an aborted call as
:class:`~libvms.errors.LimitExceeded`, a full queue as
:class:`~libvms.errors.QueueFullError`, every other refusal as
:class:`~libvms.errors.RPCError` (with the code of ``docs/protocol.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from .. import encoding
from ..checkpoint import Checkpoint
from ..errors import ConnectError, LibVMSError, QueueFullError, TamperError, VMCallError
from ..keys import Keypair, VerifierKey
from ..signed import CallReceipt, SignedCall, check_entry_matches, log_identity, sign_call
from . import protocol
from .protocol import HANDSHAKE, MAX_MESSAGE_BYTES, BackendInfo, Response

#: Seconds to wait for the connection and the handshake.
CONNECT_TIMEOUT = 10.0

#: Default number of verified receipts a client keeps (the newest).
MAX_RECEIPTS = 10_000

# Verified checkpoints remembered, so a burst of receipts costs one signature check.
_CHECKPOINT_CACHE = 16


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"the server refused the WebSocket upgrade (HTTP {exc.status})"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        # aiohttp's own text names its SSL setting and repeats the address.
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return exc.os_error.strerror or str(exc.os_error) or str(exc)
    if isinstance(exc, aiohttp.InvalidURL):
        return "not a valid URL (a bad port or host?)"
    text = str(exc)
    return text or type(exc).__name__


#: What a close code says, where the server's close frame gave no reason.
_CLOSE_CODES = {
    1001: "the server is going away (closed, or the VM unmounted)",
    1009: "a message was larger than the server accepts (1 MiB unless configured)",
}


class RPCClient:
    """A connection to one VM served by an :class:`~libvms.rpc.server.RPCServer`.

    ``user`` (debug mode) is sent with every call as the caller's id, on trust;
    ``key`` (signed mode) signs every call, and the caller's id is
    ``key.user_id``. Exported functions are attributes once connected, unless a
    client attribute has the same name: use :meth:`call` for those.

    In signed mode the verified receipt of each logged call is appended to
    :attr:`receipts`, which keeps the newest ``max_receipts`` of them (10,000;
    older ones are dropped): ``None`` keeps them all, ``0`` keeps none.
    ``keep_receipts=False`` is the same as ``max_receipts=0``. Receipts are
    verified whether they are kept or not.
    """

    def __init__(
        self,
        url: str,
        user: str | None = None,
        key: Keypair | None = None,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        call_timeout: float | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        heartbeat: float | None = 30.0,
        keep_receipts: bool = True,
        max_receipts: int | None = MAX_RECEIPTS,
    ) -> None:
        if max_receipts is not None and max_receipts < 0:
            raise ValueError("max_receipts must be at least 0, or None for no bound")
        if key is not None and user is not None and user != key.user_id:
            raise ValueError("in signed mode the user id is the key's: leave user unset")
        self._url = url
        self.user = key.user_id if key is not None else user
        self.key = key
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self.max_message_bytes = max_message_bytes
        # A reply may hold a result of up to 4 MiB and, in a signed call's receipt,
        # its entry (up to 8 MiB) as a JSON string, escaped to at most twice that.
        self._max_reply_bytes = max(16 * max_message_bytes, 4 * encoding.MAX_ENTRY_BYTES)
        self.heartbeat = heartbeat
        self.keep_receipts = keep_receipts
        #: Verified receipts of signed calls, oldest first: the newest ``max_receipts``.
        self.receipts: deque[CallReceipt] = deque(maxlen=max_receipts if keep_receipts else 0)
        self._info: BackendInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._next_id = 0
        self._closed_error: LibVMSError | None = None
        self._log = ""
        self._verifier: VerifierKey | None = None
        self._checkpoints: OrderedDict[str, Checkpoint] = OrderedDict()

    # -- connection ------------------------------------------------------------

    @property
    def max_receipts(self) -> int | None:
        """How many receipts :attr:`receipts` keeps (the newest); ``None``: all of them."""
        return self.receipts.maxlen

    @property
    def url(self) -> str:
        """The server URL this client connects to."""
        return self._url

    @property
    def backend_info(self) -> BackendInfo:
        """What the server said about the VM: methods, ledger URLs and keys, protocol."""
        if self._info is None:
            raise LibVMSError("not connected: call connect() first")
        return self._info

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed and self._closed_error is None

    async def connect(self) -> None:
        """Connect and handshake.

        Raises :class:`~libvms.errors.ConnectError` when the server cannot be
        reached, refuses the WebSocket, or does not answer the handshake as a
        libvms server does.
        """
        if self._ws is not None:
            raise LibVMSError("already connected")
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
        )
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(
                    self._url,
                    max_msg_size=self._max_reply_bytes,
                    heartbeat=self.heartbeat,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                    compress=0,
                ),
                self.connect_timeout,
            )
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            await session.close()
            raise ConnectError(f"cannot connect to {self._url}: {_describe(exc)}") from exc
        except BaseException:  # cancelled, interrupted: leave nothing open
            await session.close()
            raise
        self._session = session
        self._ws = ws
        self._closed_error = None
        self._reader = asyncio.get_running_loop().create_task(self._read(ws))
        try:
            response = await asyncio.wait_for(self._request(HANDSHAKE, []), self.connect_timeout)
            if response.error is not None:
                raise response.error
            info = BackendInfo.from_handshake(response.result)
        except (LibVMSError, ValueError, asyncio.TimeoutError) as exc:
            await self.close()
            raise ConnectError(f"{self._url} is not a libvms server: {_describe(exc)}") from exc
        except BaseException:
            # Cancelled or interrupted: drop the connection without waiting for a
            # close handshake from a server that may never answer.
            await self._drop()
            raise
        self._info = info
        self._log = log_identity(info.call_log_public_key)
        self._verifier = info.call_log_verifier

    async def close(self, *, wait: bool = True) -> None:
        """Close the connection; calls still waiting fail with ConnectError.

        ``wait=False`` drops it without waiting (up to 5 s) for the server to
        answer the close: for a server busy with a long call, say, after a
        ``call_timeout``.
        """
        ws, self._ws = self._ws, None
        self._fail_pending(ConnectError("the client was closed"))
        try:
            if ws is not None and wait:
                with contextlib.suppress(Exception):
                    await ws.close()
        finally:
            await self._drop()  # even when cancelled while the server is slow to answer

    async def _drop(self) -> None:
        """Forget the connection and close its session (and so its socket) at once."""
        session, reader = self._session, self._reader
        self._ws = self._session = self._reader = None
        self._fail_pending(ConnectError("the client was closed"))
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if session is not None:
            await session.close()

    async def __aenter__(self) -> RPCClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse[bool]) -> None:
        error: LibVMSError | None = None
        closing = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)
        said = ""  # the reason in the server's close frame
        try:
            while True:
                msg = await ws.receive()
                if msg.type in closing:
                    if msg.type is aiohttp.WSMsgType.CLOSE and isinstance(msg.extra, str):
                        said = msg.extra
                    break
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    error = ConnectError(f"{self._url} sent a non-text message")
                    break
                try:
                    response = protocol.parse_response(msg.data, max_bytes=self._max_reply_bytes)
                except ValueError as exc:
                    error = ConnectError(f"{self._url} sent a malformed reply: {exc}")
                    break
                future = None
                if isinstance(response.id, int):
                    future = self._pending.pop(response.id, None)
                if future is not None and not future.done():
                    future.set_result(response)
                elif response.error is not None and response.id is None:
                    # A message the server could not attribute to a request: our
                    # bug or theirs, but every waiting call should hear of it.
                    error = ConnectError(f"{self._url} refused a message: {response.error}")
                    break
        finally:
            if error is None:
                code = ws.close_code
                problem = ws.exception()
                why = said or _CLOSE_CODES.get(code or 0, "") or (str(problem) if problem else "")
                reason = f": {why}" if why else ""
                error = ConnectError(f"connection to {self._url} closed (code {code}){reason}")
            else:
                with contextlib.suppress(Exception):
                    await ws.close()
            self._closed_error = error
            self._fail_pending(error)

    def _fail_pending(self, error: LibVMSError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    async def _request(
        self,
        method: str,
        params: list[Any],
        *,
        user: str | None = None,
        signed: dict[str, Any] | None = None,
    ) -> Response:
        ws = self._ws
        if ws is None:
            raise ConnectError("not connected: call connect() first")
        if self._closed_error is not None:
            raise self._closed_error
        self._next_id += 1
        request_id = self._next_id
        text = protocol.request_text(request_id, method, params, user=user, signed=signed)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await ws.send_str(text)
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            self._pending.pop(request_id, None)
            if future.done() and not future.cancelled():
                # The reader saw the connection end meanwhile and failed the call
                # with what the server said (a size limit, say): that is the error.
                raise future.exception() from exc  # type: ignore[misc]
            future.cancel()
            hint = ""
            if len(text) > protocol.MAX_MESSAGE_BYTES:
                hint = (
                    f" (the request took {len(text):,} bytes: servers refuse requests over "
                    f"{protocol.MAX_MESSAGE_BYTES:,} unless configured otherwise)"
                )
            raise ConnectError(f"cannot send to {self._url}: {_describe(exc)}{hint}") from exc
        try:
            if self.call_timeout is None:
                return await future
            return await asyncio.wait_for(future, self.call_timeout)
        finally:
            self._pending.pop(request_id, None)

    # -- calls -----------------------------------------------------------------

    async def call(self, method: str, *args: Any) -> Any:
        """Call the VM's exported function ``method`` with ``args``; its result once logged."""
        self.backend_info  # noqa: B018 - raises unless connected
        params = list(args)
        if self.key is None:
            # request_text checks that params are JSON values.
            response = await self._request(method, params, user=self.user)
            if response.error is not None:
                raise response.error
            return response.result
        encoding.check_value(params)
        signed = sign_call(self.key, self._log, method, params, time_ms=int(time.time() * 1000))
        response = await self._request(method, params, signed=signed.to_wire())
        self._check_receipt(response, signed)
        if response.error is not None:
            raise response.error
        return response.result

    def _check_receipt(self, response: Response, signed: SignedCall) -> None:
        """Verify the receipt of a logged signed call; TamperError if it does not hold."""
        error = response.error
        logged = error is None or (
            isinstance(error, VMCallError) and not isinstance(error, QueueFullError)
        )
        if not logged:
            return
        if response.receipt is None:
            raise TamperError(f"{self._url} answered a signed call without a receipt")
        receipt = CallReceipt.from_wire(response.receipt)
        if isinstance(error, VMCallError):
            check_entry_matches(receipt.entry, signed, error=(error.name, error.message))
        else:
            check_entry_matches(receipt.entry, signed, result=response.result)
        if self._verifier is None:
            raise LibVMSError("not connected: call connect() first")
        receipt.verify(self._verifier, verified=self._checkpoints)
        while len(self._checkpoints) > _CHECKPOINT_CACHE:
            self._checkpoints.popitem(last=False)
        if self.keep_receipts:
            self.receipts.append(receipt)

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        info = self.__dict__.get("_info")
        if not name.startswith("_") and info is not None and name in info.methods:

            async def method(*args: Any) -> Any:
                return await self.call(name, *args)

            method.__name__ = name
            method.__qualname__ = f"RPCClient.{name}"
            return method
        if info is None and not name.startswith("_"):
            raise AttributeError(f"RPCClient has no attribute {name!r} (not connected yet)")
        raise AttributeError(
            f"RPCClient has no attribute {name!r}, and the VM exports no such method"
        )

    def __repr__(self) -> str:
        mode = "signed" if self.key is not None else "debug"
        return f"RPCClient({self._url!r}, {mode}, user={self.user!r})"


__all__ = ["CONNECT_TIMEOUT", "MAX_RECEIPTS", "RPCClient"]
