"""RPCServer: serve deployed VMs over JSON-RPC 2.0 on WebSocket, and their ledgers over HTTP.

One server listens on one port and serves any number of VMs, each *mounted* at a
path. At each mount path:

* ``GET <path>`` upgraded to a WebSocket speaks JSON-RPC 2.0 (see
  :mod:`libvms.rpc.protocol`): ``handshake`` describes the VM, every other
  method is one of the script's exported functions;
* ``GET <path>`` without an upgrade returns the handshake result as JSON;
* ``GET <path>/log/...`` and ``GET <path>/files/...`` serve the call log and the
  files archive to auditors and mirrors: latest checkpoint, entries, proofs and
  blobs, everything verifiable against the keys in the ledgers' URLs.

Calls from every connection go into the VM's one queue (:meth:`BackendVM.submit`).
Each request runs in its own task, so requests that arrive together share one
commit; a reply is sent only once its entry is durable. Each connection has at
most ``max_in_flight`` calls running; past that the server stops reading from it
until one finishes, so a client that floods or never reads slows only itself;
a reply that cannot be written within ``send_timeout`` (the client does not read
its replies) closes that connection with code 1008.
A client that goes away does not cancel its calls: they finish and are logged.
``docs/protocol.md`` is the full description.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from .. import encoding
from ..checkpoint import TLOG_PROOF_HEADER
from ..errors import (
    LibVMSError,
    LimitExceeded,
    QueueFullError,
    TamperError,
    VMCallError,
)
from ..keys import USER_ID_PREFIX, ledger_url
from ..signed import DEFAULT_WINDOW_MS, NonceTracker, SignedCall, log_identity
from . import protocol
from .protocol import HANDSHAKE, MAX_MESSAGE_BYTES, ErrorCode, Rejection, Request

if TYPE_CHECKING:
    from ..ledger import Ledger
    from ..vm import BackendVM

logger = logging.getLogger("libvms.rpc")


class _MalformedHTTPFilter(logging.Filter):
    """Turns aiohttp's report of a request it could not parse (garbage, TLS sent
    to a plain port, an overlong line) from an error with a traceback into one
    line at INFO, and its report of a client that went away before its answer was
    written into one line at DEBUG: on a public port these are the client's
    doing, and routine."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ConnectionResetError):
            args = record.args
            where = args[0] if isinstance(args, tuple) and len(args) == 1 else "a client"
            record.msg = "%s went away before its answer was written: %s"
            record.args = (where, str(exc)[:200])
            record.exc_info = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        elif isinstance(exc, HttpProcessingError):
            reason = str(exc.message).strip().split("\n", 1)[0][:200]
            args = record.args
            where = args[0] if isinstance(args, tuple) and len(args) == 1 else "a client"
            record.msg = "refused a malformed HTTP request from %s: %s"
            record.args = (where, reason)
            record.exc_info = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


#: What aiohttp logs about the server's HTTP connections.
http_logger = logging.getLogger("libvms.rpc.http")
http_logger.addFilter(_MalformedHTTPFilter())

#: Default bound on the calls one connection may have running at once.
MAX_IN_FLIGHT = 128

#: Seconds a closing handshake may take before the connection is dropped.
CLOSE_TIMEOUT = 5.0

#: Default seconds a reply may wait for the client to read before its connection is closed.
SEND_TIMEOUT = 10.0

#: Default bytes of replies a WebSocket connection may leave unread in its write
#: buffer before it is closed, whatever send_timeout says.
MAX_UNSENT_BYTES = 64 * 2**20

#: Default bytes of HTTP response bodies (files, pages of entries) the server holds
#: at once for clients still receiving them.
MAX_HTTP_BODY_BYTES = 256 * 2**20

# HTTP bodies past this size are sent in chunks of _BODY_CHUNK bytes, each within
# send_timeout, and count toward max_http_body_bytes while they are sent.
_SMALL_BODY = 64 * 1024
_BODY_CHUNK = 1024 * 1024

# A mount path: "/" or "/" followed by segments of unreserved URL characters.
_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")
_RESERVED_SEGMENTS = frozenset({"log", "files"})
_HEX_HASH = re.compile(r"[0-9a-f]{64}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
_MAX_INDEX = 2**63 - 1


def _now_ms() -> int:
    return int(time.time() * 1000)


def normalize_mount_path(path: str) -> str:
    """``"/"`` or ``"/a/b"``: no trailing slash, no empty, dot, ``log`` or ``files`` segments."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"a mount path starts with '/': {path!r}")
    segments = [s for s in path.split("/") if s]
    for segment in segments:
        if _SEGMENT.fullmatch(segment) is None or segment in (".", ".."):
            raise ValueError(f"bad mount path segment {segment!r} in {path!r}")
        if segment in _RESERVED_SEGMENTS:
            raise ValueError(f"mount path segment {segment!r} is reserved for ledger endpoints")
    return "/" + "/".join(segments)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(eq=False)
class _Mount:
    path: str
    vm: BackendVM
    allow_unsigned: bool
    #: The VM's one memory of nonces, shared by every mount of it, on any server.
    nonces: NonceTracker
    #: How far a signed request's time may be from this server's clock.
    window_ms: int
    methods: list[str]
    origin: str
    method_set: frozenset[str] = frozenset()
    connections: set[_Connection] = field(default_factory=set)
    durable: dict[str, tuple[str, int]] = field(default_factory=dict)
    set_locations: bool = False
    closed: bool = False
    #: Whether the operator was told that the VM stopped taking calls.
    failure_logged: bool = False

    @property
    def prefix(self) -> str:
        return "" if self.path == "/" else self.path

    def ledger(self, kind: str) -> Ledger:
        if kind == "log":
            return self.vm.call_log.ledger
        return self.vm.files_archive.ledger

    def checkpoint(self, kind: str) -> tuple[str, int]:
        """The latest durable signed checkpoint of a ledger: its note text and tree size."""
        text = self.ledger(kind).checkpoint_text
        cached = self.durable.get(kind)
        if cached is None or cached[0] is not text:
            # Our own ledger wrote this note: tlog-checkpoint's second line is the size.
            cached = (text, int(text.split("\n", 2)[1]))
            self.durable[kind] = cached
        return cached


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    request: web.Request
    mount: _Mount
    handshake: dict[str, Any]
    #: Calls of this connection still running.
    in_flight: int = 0
    #: Set while the reader waits for a call to finish (``in_flight`` at the bound).
    room: asyncio.Future[None] | None = None
    #: Set once a reply timed out and the connection is being closed for it.
    stalled: bool = False
    #: The debug-mode user the URL names (``?user=``), for requests that name none.
    user: str | None = None

    def call_done(self, _task: object = None) -> None:
        self.in_flight -= 1
        room = self.room
        if room is not None:
            self.room = None
            if not room.done():
                room.set_result(None)


def _cannot_wait(transport: asyncio.Transport | None, text: str) -> bool:
    """Whether sending ``text`` is sure to finish without waiting for a drain.

    A drain waits only while the transport is paused, which takes more than its
    high-water mark of unsent bytes: with none buffered, a frame that stays under
    the mark cannot pause it. (Most replies: no timer to arm and cancel.)
    """
    if transport is None:
        return False
    _low, high = transport.get_write_buffer_limits()
    return transport.get_write_buffer_size() == 0 and 4 * len(text) + 14 <= high


class RPCServer:
    """Serves VMs over JSON-RPC on WebSocket and their ledgers over HTTP, on one port.

    ``RPCServer(vm)`` mounts ``vm`` at ``/``; ``RPCServer()`` plus :meth:`mount`
    serves several. Options:

    * ``max_message_bytes``: largest request accepted (1 MiB); a larger one closes
      the connection with code 1009;
    * ``max_in_flight``: calls one connection may have running at once;
    * ``signature_window_ms``: how far a signed request's time may be from the
      server's clock;
    * ``allow_unsigned``: whether debug-mode (unsigned) calls are accepted;
    * ``heartbeat``: seconds between pings; a client that does not answer is dropped;
    * ``send_timeout``: seconds a reply may take to be written (10); a client that
      does not read its replies for that long, so that the connection's write
      buffer stays full, is closed with code 1008 (its calls still finish and are
      logged). ``None`` waits for as long as the heartbeat keeps the connection up.
      An HTTP client must likewise take each MiB of a response within it;
    * ``max_unsent_bytes``: bytes of replies a connection may leave unread in its
      write buffer (64 MiB); a reply past it closes the connection with code
      1008 at once, without waiting for ``send_timeout`` (so that a client that
      does not read, with many large replies in flight, holds that much at most);
    * ``max_http_body_bytes``: bytes of HTTP response bodies (files, pages of
      entries) held at once for clients still receiving them (256 MiB), a quarter
      of it for one client address; a request past either gets ``503`` with
      ``Retry-After``, so that clients that do not read cannot make the server
      hold unbounded memory.
    """

    def __init__(
        self,
        vm: BackendVM | None = None,
        port: int = 5555,
        host: str = "127.0.0.1",
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_in_flight: int = MAX_IN_FLIGHT,
        signature_window_ms: int = DEFAULT_WINDOW_MS,
        allow_unsigned: bool = True,
        heartbeat: float | None = 30.0,
        send_timeout: float | None = SEND_TIMEOUT,
        max_http_body_bytes: int = MAX_HTTP_BODY_BYTES,
        max_unsent_bytes: int = MAX_UNSENT_BYTES,
    ) -> None:
        if max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if send_timeout is not None and not send_timeout > 0:
            raise ValueError("send_timeout must be positive, or None")
        if max_http_body_bytes < 1:
            raise ValueError("max_http_body_bytes must be positive")
        if max_unsent_bytes < 1:
            raise ValueError("max_unsent_bytes must be positive")
        self.host = host
        self._port = port
        self.max_message_bytes = max_message_bytes
        self.max_in_flight = max_in_flight
        self.signature_window_ms = signature_window_ms
        self.allow_unsigned = allow_unsigned
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.max_http_body_bytes = max_http_body_bytes
        self.max_unsent_bytes = max_unsent_bytes
        # Bytes of HTTP bodies being sent now (see max_http_body_bytes), in all
        # and by client address.
        self._body_bytes = 0
        self._body_bytes_of: dict[str, int] = {}
        self._mounts: dict[str, _Mount] = {}
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        if vm is not None:
            self.mount("/", vm)

    # -- mounting --------------------------------------------------------------

    def mount(self, path: str, vm: BackendVM, *, allow_unsigned: bool | None = None) -> None:
        """Serve the deployed ``vm`` at ``path`` (``"/"``, ``"/bob"``...), now or once started.

        The nonces of signed calls logged within the signature window are read
        back from the log, so a request accepted before a restart is still
        refused as a replay after it.
        """
        path = normalize_mount_path(path)
        if path in self._mounts:
            raise ValueError(f"{path} is already mounted")
        if not vm.deployed:
            raise LibVMSError("deploy the VM before mounting it (and do not close it)")
        methods = protocol.rpc_methods(vm.methods)
        mount = _Mount(
            path=path,
            vm=vm,
            allow_unsigned=self.allow_unsigned if allow_unsigned is None else allow_unsigned,
            nonces=_nonces_of(vm, self.signature_window_ms),
            window_ms=self.signature_window_ms,
            methods=methods,
            origin=log_identity(vm.call_log.public_key),
            method_set=frozenset(methods),
        )
        _recall_nonces(mount, _now_ms())
        self._mounts[path] = mount
        if self._runner is not None:
            self._set_locations(mount)

    def unmount(self, path: str) -> BackendVM:
        """Stop serving the VM at ``path`` and return it (it stays open).

        Its connections are closed with code 1001; calls already queued finish
        and are logged, but their replies are dropped.
        """
        mount = self._mounts.pop(normalize_mount_path(path), None)
        if mount is None:
            raise KeyError(f"nothing is mounted at {path}")
        mount.closed = True
        if mount.set_locations:
            mount.vm.call_log.location = None
            mount.vm.files_archive.location = None
        for conn in list(mount.connections):
            self._spawn(self._close_connection(conn, WSCloseCode.GOING_AWAY, "VM unmounted"))
        return mount.vm

    @property
    def mounts(self) -> dict[str, BackendVM]:
        """Mounted VMs by path."""
        return {path: m.vm for path, m in self._mounts.items()}

    # -- lifecycle -------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on (the real one once started, when created with port 0)."""
        return self._port

    def url(self, path: str = "/") -> str:
        """The WebSocket URL of the VM mounted at ``path``."""
        path = normalize_mount_path(path)
        return f"ws://{self._authority()}{path}"

    def http_url(self, path: str = "/") -> str:
        """The HTTP base URL of the VM mounted at ``path`` (its ledgers are below it)."""
        return f"http://{self._authority()}{normalize_mount_path(path).rstrip('/')}"

    def _authority(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self._port}"

    async def start(self) -> None:
        """Listen on ``host:port``; :attr:`port` is the real port afterwards."""
        if self._runner is not None:
            raise LibVMSError("server already started")
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=http_logger)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise LibVMSError(f"cannot listen on {self.host}:{self._port}: {exc}") from exc
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self._port = int(address[1])
                break
        for mount in self._mounts.values():
            self._set_locations(mount)

    def _set_locations(self, mount: _Mount) -> None:
        base = self.http_url(mount.path)
        log, archive = mount.vm.call_log, mount.vm.files_archive
        if log.location is None and archive.location is None:
            log.location = base + "/log"
            archive.location = base + "/files"
            mount.set_locations = True

    async def wait_idle(self) -> None:
        """Return once every call received so far has finished (and its reply was sent)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Close every connection (code 1001), let queued calls finish, stop listening."""
        if self._closing:
            return
        self._closing = True
        for path in list(self._mounts):
            self.unmount(path)
        await self.wait_idle()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> RPCServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- routing ---------------------------------------------------------------

    def _route(self, path: str) -> tuple[_Mount, str] | None:
        best: _Mount | None = None
        for mount in self._mounts.values():
            prefix = mount.prefix
            if (path == prefix or path.startswith(prefix + "/")) and (
                best is None or len(prefix) > len(best.prefix)
            ):
                best = mount
        if best is None:
            return None
        return best, path[len(best.prefix) :]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _text(405, "only GET is supported\n")
        routed = self._route(request.path)
        if routed is None or self._closing:
            return _text(404, "no VM is mounted here\n")
        mount, rest = routed
        try:
            if rest in ("", "/"):
                if request.headers.get("Upgrade", "").lower() == "websocket":
                    return await self._websocket(request, mount)
                return web.json_response(self._handshake(request, mount))
            parts = rest.strip("/").split("/")
            if parts[0] in _RESERVED_SEGMENTS:
                response = self._ledger_endpoint(request, mount, parts[0], parts[1:])
                body = response.body
                if request.method == "GET" and isinstance(body, bytes) and len(body) > _SMALL_BODY:
                    return await self._send_body(request, response, body)
                return response
            raise _HTTPError(404, "not found")
        except _HTTPError as exc:
            return _text(exc.status, exc.message + "\n")
        except TamperError as exc:
            logger.error("refusing to serve corrupt data at %s: %s", request.path, exc)
            return _text(500, "stored data does not verify\n")

    async def _send_body(
        self, request: web.Request, response: web.Response, body: bytes
    ) -> web.StreamResponse:
        """Send a large body in chunks, each within ``send_timeout``, while it counts
        toward ``max_http_body_bytes``; ``503`` when that bound is reached.

        One client address may hold a quarter of the bound (its first body may
        be as large as the bound); a body larger than the bound goes when
        nothing else is being sent.
        """
        size = len(body)
        remote = request.remote or ""
        if self._too_busy_for(remote, size):
            return _busy()
        held = self._body_bytes_of.get(remote, 0)
        self._body_bytes += size
        self._body_bytes_of[remote] = held + size
        try:
            stream = web.StreamResponse(status=response.status)
            stream.content_type = response.content_type
            if response.charset is not None:
                stream.charset = response.charset
            stream.content_length = size
            await stream.prepare(request)
            view = memoryview(body)
            for start in range(0, size, _BODY_CHUNK):
                write = stream.write(view[start : start + _BODY_CHUNK])
                try:
                    await asyncio.wait_for(write, self.send_timeout)
                except asyncio.TimeoutError:
                    logger.warning(
                        "dropping the HTTP connection of %s to %s: %d bytes could not be "
                        "sent within %g s (the client does not read)",
                        request.remote,
                        request.path,
                        size - start,
                        self.send_timeout,
                    )
                    if request.transport is not None:
                        request.transport.abort()
                    return stream
            await stream.write_eof()
            return stream
        except ConnectionError as exc:
            # The client went away mid-body: its doing, and routine.
            http_logger.debug("%s went away before its answer was written: %s", remote, exc)
            return stream
        finally:
            self._body_bytes -= size
            left = self._body_bytes_of.pop(remote) - size
            if left:
                self._body_bytes_of[remote] = left

    def _too_busy_for(self, remote: str, size: int) -> bool:
        """Whether a body of ``size`` bytes for ``remote`` would pass max_http_body_bytes
        or that client's quarter of it (see :meth:`_send_body`)."""
        if size <= _SMALL_BODY:
            return False
        held = self._body_bytes_of.get(remote, 0)
        total, bound = self._body_bytes, self.max_http_body_bytes
        return bool((total and total + size > bound) or (held and held + size > bound // 4))

    # -- HTTP ledger endpoints -------------------------------------------------

    def _ledger_endpoint(
        self, request: web.Request, mount: _Mount, kind: str, sub: list[str]
    ) -> web.Response:
        ledger = mount.ledger(kind)
        try:
            text, size = mount.checkpoint(kind)
        except LibVMSError as exc:
            raise _HTTPError(503, f"no checkpoint yet: {exc}") from None
        query = request.query
        if sub == ["checkpoint"]:
            response = _text(200, text)
            response.headers["Cache-Control"] = "no-cache"
            return response
        if sub == ["entries"]:
            start = _int_param(query, "start")
            end = _int_param(query, "end", size)
            if not start <= end <= size:
                raise _HTTPError(
                    400, f"entries range {start}..{end} is not within the checkpoint size {size}"
                )
            end = min(end, start + protocol.MAX_ENTRIES_PER_PAGE)
            page: list[bytes] = []
            total = 0
            for data in ledger.raw_range(start, end, max_bytes=protocol.MAX_PAGE_BYTES):
                if page and total + len(data) + 1 > protocol.MAX_PAGE_BYTES:
                    break
                page.append(data)
                total += len(data) + 1
            return web.Response(
                status=200,
                body=protocol.format_entries(page),
                content_type="application/x-ndjson",
            )
        if sub == ["proof", "inclusion"]:
            index = _int_param(query, "index")
            tree_size = _int_param(query, "size", size)
            if not index < tree_size <= size:
                raise _HTTPError(
                    400, f"need index < size <= {size}, got index {index} and size {tree_size}"
                )
            return _proof(ledger.tree.inclusion_proof(index, tree_size))
        if sub == ["proof", "consistency"]:
            old = _int_param(query, "old")
            new = _int_param(query, "new", size)
            if not old <= new <= size:
                raise _HTTPError(400, f"need old <= new <= {size}, got old {old} and new {new}")
            return _proof(ledger.tree.consistency_proof(old, new))
        if kind == "files" and len(sub) == 2 and sub[0] == "blobs":
            content_hash = sub[1]
            if _HEX_HASH.fullmatch(content_hash) is None:
                raise _HTTPError(400, "a blob is named by its lowercase hex SHA-256")
            key = (bytes.fromhex(content_hash),)
            sizes = ledger.store.query("SELECT length(data) FROM blobs WHERE hash = ?", key)
            if not sizes:
                raise _HTTPError(404, f"no blob {content_hash}")
            if request.method == "GET" and self._too_busy_for(request.remote or "", sizes[0][0]):
                return _busy()  # before reading and hashing it
            rows = ledger.store.query("SELECT data FROM blobs WHERE hash = ?", key)
            if not rows:
                raise _HTTPError(404, f"no blob {content_hash}")
            data = rows[0][0]
            if not isinstance(data, bytes) or encoding.sha256_hex(data) != content_hash:
                raise TamperError(f"blob {content_hash} does not match its hash")
            return web.Response(status=200, body=data, content_type="application/octet-stream")
        raise _HTTPError(404, "not found")

    # -- WebSocket -------------------------------------------------------------

    def _handshake(self, request: web.Request, mount: _Mount) -> dict[str, Any]:
        base = f"{request.scheme}://{request.host}{mount.prefix}"
        log, archive = mount.vm.call_log, mount.vm.files_archive
        try:
            log_url = ledger_url(log.public_key, base + "/log")
            files_url = ledger_url(archive.public_key, base + "/files")
        except ValueError:
            # A Host header that is not a plain host[:port]: name the server's own address.
            base = self.http_url(mount.path)
            log_url = ledger_url(log.public_key, base + "/log")
            files_url = ledger_url(archive.public_key, base + "/files")
        info = protocol.BackendInfo(
            methods=list(mount.methods),
            call_log_url=log_url,
            files_archive_url=files_url,
            call_log_key=log.verifier_key,
            files_archive_key=archive.ledger.verifier.to_text(),
        )
        return info.to_handshake()

    async def _websocket(self, request: web.Request, mount: _Mount) -> web.StreamResponse:
        user = request.query.get("user")
        if user is not None and not 0 < len(user) <= protocol.MAX_USER_ID:
            return _text(400, f"user must be 1 to {protocol.MAX_USER_ID} characters\n")
        ws = web.WebSocketResponse(
            # Twice the limit, so that most oversized messages are read and refused
            # with a reason; beyond that aiohttp drops them with 1009 on its own.
            max_msg_size=2 * self.max_message_bytes,
            heartbeat=self.heartbeat,
            compress=False,
            timeout=CLOSE_TIMEOUT,
        )
        await ws.prepare(request)
        conn = _Connection(
            ws=ws,
            request=request,
            mount=mount,
            handshake=self._handshake(request, mount),
            user=user,
        )
        mount.connections.add(conn)
        loop = asyncio.get_running_loop()
        max_in_flight = self.max_in_flight
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    call = await self._on_text(conn, msg.data)
                    if call is False:
                        break
                    if call is not None:
                        # The call runs in its own task, so that calls arriving
                        # together (from this or other connections) share one commit.
                        if conn.in_flight >= max_in_flight:
                            # Stop reading until one finishes: TCP back-pressure.
                            conn.room = loop.create_future()
                            await conn.room
                        conn.in_flight += 1
                        self._spawn(self._call(conn, call)).add_done_callback(conn.call_done)
                elif msg.type is WSMsgType.BINARY:
                    await self._close_connection(
                        conn,
                        WSCloseCode.UNSUPPORTED_DATA,
                        "binary frames are not accepted: send JSON-RPC requests as text",
                    )
                    break
                else:
                    break
                if mount.closed:
                    break
        finally:
            mount.connections.discard(conn)
        return ws

    async def _close_connection(self, conn: _Connection, code: int, reason: str) -> None:
        """Send a close frame, wait up to CLOSE_TIMEOUT for the client's, then drop the TCP link.

        The close is never cancelled: it may be waiting for the transport to drain,
        a wait that the connection's pending replies share. Aborting the transport
        ends it instead, and releases those replies too.
        """
        transport = conn.request.transport
        deadline = None
        if transport is not None:
            deadline = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)
        try:
            await conn.ws.close(code=code, message=reason.encode("utf-8")[:120])
        except (ConnectionError, RuntimeError) as exc:
            logger.debug("closing a connection failed: %s", exc)
        finally:
            if deadline is not None:
                deadline.cancel()
            # A client that did not read up to the close frame leaves bytes behind,
            # which closing the transport would wait for forever.
            if transport is not None and transport.get_write_buffer_size() > 0:
                transport.abort()

    async def _on_text(self, conn: _Connection, text: str) -> Request | Literal[False] | None:
        """Handle one text message: the call to run, None if answered here, False to close."""
        limit = self.max_message_bytes
        if len(text) > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
            await self._close_connection(
                conn, WSCloseCode.MESSAGE_TOO_BIG, f"message exceeds the {limit}-byte limit"
            )
            return False
        request = protocol.parse_request(text, max_bytes=4 * limit)
        if isinstance(request, Rejection):
            # JSON-RPC 2.0 §5: notifications get no reply, except when the server
            # cannot even tell whether the message was one.
            if not request.notification or request.code in (
                ErrorCode.PARSE_ERROR,
                ErrorCode.INVALID_REQUEST,
            ):
                await self._send(conn, request.to_text())
            return None
        if request.method == HANDSHAKE:
            if request.params:
                reply = protocol.error_text(
                    request.id, ErrorCode.INVALID_PARAMS, "handshake takes no params"
                )
            else:
                reply = protocol.result_text(request.id, conn.handshake)
            if not request.notification:
                await self._send(conn, reply)
            return None
        if request.user is None and request.signed is None and conn.user is not None:
            request = replace(request, user=conn.user)
        return request

    async def _send(self, conn: _Connection, text: str) -> None:
        ws = conn.ws
        if ws.closed or conn.stalled:
            return
        transport = conn.request.transport
        unread = 0 if transport is None else transport.get_write_buffer_size()
        # Only on top of replies already unread: one large reply always goes out.
        if unread and unread + _utf8_size(text, self.max_unsent_bytes - unread) > (
            self.max_unsent_bytes
        ):
            self._close_stalled(
                conn,
                f"more than {self.max_unsent_bytes} bytes of replies would wait unread",
                f"replies not read: over {self.max_unsent_bytes} bytes waiting",
            )
            return
        # Writing never blocks; what may wait is the drain that follows once the
        # client lets the write buffer fill up. Past send_timeout the connection is
        # closed, which ends the wait (nothing is cancelled: the drain is shared).
        timeout = self.send_timeout
        timer = None
        if timeout is not None and not _cannot_wait(conn.request.transport, text):
            timer = asyncio.get_running_loop().call_later(timeout, self._send_timed_out, conn)
        try:
            await ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            # The client went away; its call is logged all the same.
            logger.debug("dropping a reply to a closed connection: %s", exc)
        finally:
            if timer is not None:
                timer.cancel()

    def _send_timed_out(self, conn: _Connection) -> None:
        self._close_stalled(
            conn,
            f"a reply could not be sent within {self.send_timeout:g} s",
            f"replies not read within {self.send_timeout:g} s",
        )

    def _close_stalled(self, conn: _Connection, why: str, reason: str) -> None:
        """Close, once, a connection whose client does not read its replies."""
        if conn.stalled or conn.ws.closed:
            return
        conn.stalled = True
        logger.warning(
            "closing the connection of %s to %s: %s (the client does not read its replies)",
            conn.request.remote,
            conn.mount.path,
            why,
        )
        self._spawn(self._close_connection(conn, WSCloseCode.POLICY_VIOLATION, reason))

    async def _call(self, conn: _Connection, request: Request) -> None:
        try:
            reply = await self._run(conn.mount, request)
        except Exception:
            logger.exception("internal error in call %r", request.method)
            reply = protocol.error_text(request.id, ErrorCode.INTERNAL_ERROR, "internal error")
        if not request.notification:
            await self._send(conn, reply)

    async def _run(self, mount: _Mount, request: Request) -> str:
        """Check, queue and run one call; the reply to send."""
        rid = request.id

        def refuse(code: int, message: str) -> str:
            return protocol.error_text(rid, code, message)

        if mount.closed:
            return refuse(ErrorCode.UNAVAILABLE, "the VM is no longer served here")
        method = request.method
        if method not in mount.method_set:
            if method == "init":
                return refuse(
                    ErrorCode.METHOD_NOT_FOUND,
                    "init runs once when the VM is deployed and cannot be called",
                )
            return refuse(ErrorCode.METHOD_NOT_FOUND, f"method {method!r} not found")
        user = request.user
        signed: SignedCall | None = None
        if request.signed is not None:
            try:
                signed = SignedCall.from_wire(request.signed, method, request.params)
            except ValueError as exc:
                return refuse(ErrorCode.BAD_SIGNATURE, f"malformed signed request: {exc}")
            if signed.log != mount.origin:
                return refuse(
                    ErrorCode.BAD_SIGNATURE,
                    f"the request is signed for call log {signed.log}, "
                    f"but this VM's call log is {mount.origin}",
                )
            if user is not None and user != signed.user_id:
                return refuse(
                    ErrorCode.INVALID_REQUEST, "user differs from the signed request's user"
                )
            now = _now_ms()
            nonces = mount.nonces
            if abs(now - signed.time_ms) > mount.window_ms:
                return refuse(
                    ErrorCode.STALE_REQUEST,
                    f"the request's time {signed.time_ms} is more than "
                    f"{mount.window_ms} ms from the server's clock ({now})",
                )
            if nonces.seen(signed.user_id, signed.nonce):
                return refuse(ErrorCode.NONCE_REUSED, "this nonce was already used: replay refused")
            try:
                signed.verify()
            except TamperError as exc:
                return refuse(ErrorCode.BAD_SIGNATURE, str(exc))
            nonces.reserve(signed.user_id, signed.nonce, signed.time_ms, now)
            user = signed.user_id
        elif not mount.allow_unsigned:
            return refuse(ErrorCode.CALLER_REFUSED, "this server accepts only signed calls")
        elif user is not None and user.startswith(USER_ID_PREFIX):
            return refuse(
                ErrorCode.CALLER_REFUSED,
                f"user ids starting with {USER_ID_PREFIX!r} name keys: sign the request",
            )
        call_fields = None if signed is None else {"signed": signed.entry_fields()}
        try:
            result = await mount.vm.submit(method, request.params, user, call_fields=call_fields)
        except VMCallError as exc:
            # Refused before it was logged: the nonce may be used again.
            if signed is not None:
                mount.nonces.release(signed.user_id, signed.nonce)
            if isinstance(exc, QueueFullError):
                return refuse(ErrorCode.QUEUE_FULL, exc.message)
            if exc.name == "MethodNotFound":
                return refuse(ErrorCode.METHOD_NOT_FOUND, exc.message)
            return refuse(ErrorCode.INVALID_PARAMS, exc.message)
        except LibVMSError as exc:
            if not mount.failure_logged and not mount.closed:
                # Once: every call after it gets the same refusal.
                mount.failure_logged = True
                logger.error(
                    "the VM at %s refuses calls: %s (its ledgers still serve auditors; "
                    "if it does not recover, restart it: the directory reopens)",
                    mount.path,
                    exc,
                )
            return refuse(ErrorCode.UNAVAILABLE, f"the VM cannot take calls: {exc}")
        receipt = None if signed is None else await self._receipt(mount, result.seq)
        error = result.error
        if error is None:
            return protocol.result_text(rid, result.value, receipt=receipt)
        code = (
            ErrorCode.LIMIT_EXCEEDED if isinstance(error, LimitExceeded) else ErrorCode.SCRIPT_ERROR
        )
        return protocol.error_text(
            rid,
            code,
            error.message,
            {"name": error.name, "message": error.message},
            receipt=receipt,
        )

    async def _receipt(self, mount: _Mount, seq: int) -> dict[str, Any]:
        """Entry ``seq``'s bytes and its inclusion proof in the latest durable checkpoint."""
        text, size = mount.checkpoint("log")
        if seq >= size:
            await mount.vm.call_log.checkpoint()
            text, size = mount.checkpoint("log")
        ledger = mount.ledger("log")
        proof = ledger.tree.inclusion_proof(seq, size)
        # c2sp.org/tlog-proof: header, "index N", one base64 hash per line, a blank
        # line, then the signed checkpoint (the same text InclusionReceipt.to_text makes).
        hashes = "".join(base64.b64encode(h).decode("ascii") + "\n" for h in proof)
        return {
            "entry": ledger.raw(seq).decode("utf-8"),
            "proof": f"{TLOG_PROOF_HEADER}\nindex {seq}\n{hashes}\n{text}",
        }


#: Each VM's nonce memory, whichever paths and servers serve it: a signed request
#: accepted at one must be a replay at every other.
_NONCES: weakref.WeakKeyDictionary[BackendVM, NonceTracker] = weakref.WeakKeyDictionary()


def _nonces_of(vm: BackendVM, window_ms: int) -> NonceTracker:
    """``vm``'s nonce memory; it keeps pairs for the largest window it is served with."""
    nonces = _NONCES.get(vm)
    if nonces is None:
        nonces = _NONCES[vm] = NonceTracker(window_ms)
    nonces.window_ms = max(nonces.window_ms, window_ms)
    return nonces


def _recall_nonces(mount: _Mount, now_ms: int) -> None:
    """Remember the nonces of signed calls logged recently enough to be replayed now.

    A request signed at ``t`` is accepted only while the clock is within the
    window ``w`` of ``t``, and it is logged with a timestamp no earlier than
    ``t - w``. Entry timestamps never decrease along the log, so scanning back
    from the end until a timestamp older than ``now - 2w`` (with a minute's
    margin) finds every nonce that could still be accepted.
    """
    ledger = mount.vm.call_log.ledger
    horizon = now_ms - 2 * mount.nonces.window_ms - 60_000
    end = ledger.length
    while end > 1:
        start = max(1, end - 512)
        for data in reversed(ledger.raw_range(start, end)):
            entry = encoding.parse(data)
            call = entry.get("call") if isinstance(entry, dict) else None
            if not isinstance(call, dict):
                continue
            timestamp = call.get("timestamp")
            if isinstance(timestamp, int) and timestamp < horizon:
                return
            signed = call.get("signed")
            if isinstance(signed, dict):
                nonce, signed_time = signed.get("nonce"), signed.get("time")
                if isinstance(nonce, str) and isinstance(signed_time, int):
                    mount.nonces.reserve(str(call.get("userId")), nonce, signed_time, now_ms)
        end = start


def _text(status: int, body: str) -> web.Response:
    return web.Response(status=status, text=body, content_type="text/plain", charset="utf-8")


def _utf8_size(text: str, bound: int) -> int:
    """The UTF-8 size of ``text``, or its length when that alone decides whether it
    exceeds ``bound`` (a character takes 1 to 4 bytes)."""
    if len(text) > bound or 4 * len(text) <= bound:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _busy() -> web.Response:
    busy = _text(503, "the server is busy sending to other clients; retry shortly\n")
    busy.headers["Retry-After"] = "1"
    return busy


def _proof(hashes: list[bytes]) -> web.Response:
    return web.Response(
        status=200, body=protocol.format_proof(hashes), content_type="text/plain", charset="utf-8"
    )


def _int_param(query: Any, name: str, default: int | None = None) -> int:
    value = query.get(name)
    if value is None:
        if default is None:
            raise _HTTPError(400, f"missing query parameter {name!r}")
        return default
    if _DECIMAL.fullmatch(value) is None or int(value) > _MAX_INDEX:
        raise _HTTPError(400, f"query parameter {name!r} must be a non-negative integer")
    return int(value)


__all__ = [
    "MAX_HTTP_BODY_BYTES",
    "MAX_IN_FLIGHT",
    "MAX_UNSENT_BYTES",
    "SEND_TIMEOUT",
    "RPCServer",
    "normalize_mount_path",
]
