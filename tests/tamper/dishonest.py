"""A dishonest host: it edits its own store, re-signs with its own keys, and serves the result.

libvms refuses to reopen a directory whose log does not replay, so a host that lies
must run modified software. :func:`serve_as_is` is that software: it opens both
ledgers checking only their signatures (which the host can always produce) and
serves them without replaying anything. :func:`resign` rewrites a ledger's entries
and signs a fresh checkpoint over them, exactly as :mod:`libvms.ledger` would have.

:class:`LyingProxy` plays a host (or a network in between) that alters data in
transit: it answers the handshake with the real server's data, pointing the ledger
URLs at itself, and relays the ledger endpoints, changing what it chooses to.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from libvms import encoding, merkle
from libvms.archive import KEY_FILENAME as ARCHIVE_KEY_FILENAME
from libvms.archive import LEDGER_NAME as ARCHIVE_LEDGER
from libvms.archive import FilesArchive
from libvms.checkpoint import Checkpoint, sign_checkpoint
from libvms.keys import Keypair, ledger_url, parse_ledger_url
from libvms.log import KEY_FILENAME as LOG_KEY_FILENAME
from libvms.log import LEDGER_NAME as LOG_LEDGER
from libvms.log import CallLog
from libvms.rpc import RPCServer
from libvms.store import DB_FILENAME, Store
from libvms.vm import BackendVM

Entries = list[dict[str, Any]]
Edit = Callable[[Entries], Entries]

_KEY_FILES = {LOG_LEDGER: LOG_KEY_FILENAME, ARCHIVE_LEDGER: ARCHIVE_KEY_FILENAME}


# -- the store ---------------------------------------------------------------------


def read_entries(directory: Path, ledger: str = LOG_LEDGER) -> Entries:
    """The entries of a ledger in ``directory``, parsed, in order (the VM must be closed)."""
    conn = sqlite3.connect(Path(directory) / DB_FILENAME)
    try:
        rows = conn.execute(f"SELECT data FROM {ledger}_entries ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [encoding.parse(bytes(data)) for (data,) in rows]


def resign(directory: Path, ledger: str = LOG_LEDGER, edit: Edit = lambda e: e) -> str:
    """Rewrite a ledger with ``edit`` applied to its entries and sign it with the host's key.

    Writes what :class:`libvms.ledger.Ledger` writes: rows ``(seq, data, leaf)`` with
    ``seq`` 0..n-1, RFC 8785 bytes and RFC 9162 leaf hashes, and the signed
    checkpoint note, as bytes, in ``meta`` under ``<ledger>.checkpoint``. Returns
    the new checkpoint note. The VM using ``directory`` must be closed.
    """
    directory = Path(directory)
    keypair = Keypair.load(directory / _KEY_FILES[ledger])
    entries = edit(read_entries(directory, ledger))
    rows = []
    for seq, entry in enumerate(entries):
        data = encoding.canonical(entry)
        rows.append((seq, data, merkle.leaf_hash(data)))
    root = merkle.root_of([leaf for _seq, _data, leaf in rows])
    origin = ledger_url(keypair.public_key)
    note = sign_checkpoint(Checkpoint(origin, len(rows), root), keypair)
    conn = sqlite3.connect(directory / DB_FILENAME, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"DELETE FROM {ledger}_entries")
        conn.executemany(f"INSERT INTO {ledger}_entries (seq, data, leaf) VALUES (?, ?, ?)", rows)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (f"{ledger}.checkpoint", note.encode()),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return note


async def serve_as_is(
    directory: Path, code: str, oracles: Mapping[str, Callable[..., Any]] | None = None
) -> BackendVM:
    """A VM on ``directory`` whose ledgers are checked against their signatures only.

    The honest :meth:`BackendVM.deploy` replays the log on reopening and refuses
    a directory that does not replay; this is the modified software a dishonest
    host runs instead. Its script state starts fresh from ``code``.
    """
    vm = BackendVM(code)
    for name, fn in (oracles or {}).items():
        vm.add_oracle(name, fn)
    store = Store.open(directory)
    log = await CallLog.open(directory, store=store)
    archive = await FilesArchive.open(directory, store=store)
    store._refs += 1  # the call log and the archive each release the store once
    runtime = vm._new_runtime()
    vm._attach(store, archive, log, runtime, vm._load(runtime, 0))
    vm._deployed = True
    return vm


class DishonestHost:
    """Serves one VM from its own directory, on a real server, and lies when told to.

    The server keeps its port for the host's lifetime: a rewritten VM is mounted
    where the honest one was, so auditors find it at the same URL.
    """

    def __init__(
        self,
        directory: Path,
        code: str,
        oracles: Mapping[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.code = code
        self.oracles = dict(oracles or {})
        self.vm: BackendVM | None = None
        self.server: RPCServer | None = None

    async def start(self) -> DishonestHost:
        """Deploy (or reopen, replaying) the VM and serve it on a free port."""
        self.vm = await self._open(honest=True)
        self.server = RPCServer(self.vm, port=0)
        await self.server.start()
        return self

    async def _open(self, *, honest: bool, code: str | None = None) -> BackendVM:
        if not honest:
            return await serve_as_is(self.directory, code or self.code, self.oracles)
        vm = BackendVM(code or self.code)
        for name, fn in self.oracles.items():
            vm.add_oracle(name, fn)
        await vm.deploy(self.directory, title="dishonest")
        return vm

    async def __aenter__(self) -> DishonestHost:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
        if self.vm is not None:
            await self.vm.close()

    def url(self) -> str:
        assert self.server is not None
        return self.server.url()

    def http_url(self) -> str:
        assert self.server is not None
        return self.server.http_url()

    async def _stop_vm(self) -> None:
        assert self.server is not None and self.vm is not None
        await self.server.wait_idle()
        vm = self.server.unmount("/")
        await vm.close()
        self.vm = None

    async def _serve(self, *, honest: bool, code: str | None = None) -> None:
        assert self.server is not None
        self.vm = await self._open(honest=honest, code=code)
        self.server.mount("/", self.vm)

    async def rewrite(
        self, edit: Edit, ledger: str = LOG_LEDGER, *, code: str | None = None
    ) -> str:
        """Stop the VM, apply ``edit`` to a ledger, re-sign it and serve the result.

        ``code`` is the script the modified software runs from now on (default:
        the same). Returns the new signed checkpoint note.
        """
        await self._stop_vm()
        note = resign(self.directory, ledger, edit)
        await self._serve(honest=False, code=code)
        return note

    async def entries(self, ledger: str = LOG_LEDGER) -> Entries:
        """The ledger's current entries, as the host stores them."""
        assert self.vm is not None
        owner: Any = self.vm.call_log if ledger == LOG_LEDGER else self.vm.files_archive
        return [encoding.parse(d) for d in owner.ledger.raw_range(0, owner.ledger.length)]

    async def split(self, other: Path) -> DishonestHost:
        """Copy the whole VM directory, keys included, and serve the copy too.

        From here on the two copies grow apart while both sign with the same keys:
        a split view, one history for some users and another for the rest.
        """
        await self._stop_vm()
        shutil.copytree(self.directory, other)
        await self._serve(honest=True)
        return await DishonestHost(other, self.code, self.oracles).start()


# -- in transit --------------------------------------------------------------------

#: ``(ledger path, body) -> body``: what the proxy sends instead of a relayed body.
Tamper = Callable[[str, bytes], bytes]


def flip_byte(body: bytes, at: int | None = None) -> bytes:
    """``body`` with one bit of one byte (the middle one by default) flipped."""
    data = bytearray(body)
    data[len(data) // 2 if at is None else at] ^= 0x01
    return bytes(data)


def receipts_claiming(result: Any) -> Callable[..., Any]:
    """A replacement for ``RPCServer._receipt`` whose receipts show ``result`` as the
    call's result: the entry a host would show if it logged another outcome than
    the one it replied with (monkeypatch it in)."""
    honest = RPCServer._receipt

    async def lying(self: RPCServer, mount: Any, seq: int) -> dict[str, Any]:
        receipt = await honest(self, mount, seq)
        entry = json.loads(receipt["entry"])
        entry["result"]["res"] = result
        receipt["entry"] = encoding.canonical(entry).decode()
        return receipt

    return lying


class LyingProxy:
    """A server in front of a real libvms server that relays its ledgers, with changes.

    The WebSocket at ``/`` answers ``handshake`` with the real server's handshake,
    its ledger URLs pointing here (same keys); ``GET /log/...`` and
    ``GET /files/...`` are relayed. ``tamper`` may replace a relayed body;
    ``cut`` decides, per path, to announce the full body and then drop the
    connection half-way; ``refuse`` decides to drop the connection before any answer.
    """

    def __init__(
        self,
        upstream: str,
        *,
        tamper: Tamper | None = None,
        cut: Callable[[str], bool] | None = None,
        refuse: Callable[[str], bool] | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.tamper = tamper
        self.cut = cut
        self.refuse = refuse
        self.relayed: list[str] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port = 0

    async def __aenter__(self) -> LyingProxy:
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_get("/{kind:log|files}/{tail:.*}", self._relay)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/"

    def _base(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def _handshake(self) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.get(self.upstream) as response:
            info = await response.json()
        for name, suffix in (("callLogUrl", "/log"), ("filesArchiveUrl", "/files")):
            _location, key = parse_ledger_url(info[name])
            info[name] = ledger_url(key, self._base() + suffix)
        return dict(info)

    async def _root(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response(await self._handshake())
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            call = json.loads(msg.data)
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": call.get("id")}
            if call.get("method") == "handshake":
                reply["result"] = await self._handshake()
            else:
                reply["error"] = {"code": -32601, "message": "this proxy only shakes hands"}
            await ws.send_str(json.dumps(reply))
        return ws

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        path = request.path
        self.relayed.append(path)
        if self.refuse is not None and self.refuse(path):
            _drop(request)
            return web.Response(status=500)
        async with self._session.get(self.upstream + path, params=request.query) as response:
            status, body = response.status, await response.read()
            content_type = response.content_type
        if status == 200 and self.tamper is not None:
            body = self.tamper(path, body)
        if status == 200 and self.cut is not None and self.cut(path) and len(body) > 1:
            stream = web.StreamResponse(status=200)
            stream.content_length = len(body)
            stream.content_type = content_type
            await stream.prepare(request)
            await stream.write(body[: len(body) // 2])
            _drop(request)
            return stream
        return web.Response(status=status, body=body, content_type=content_type)


def _drop(request: web.Request) -> None:
    transport = request.transport
    assert transport is not None
    transport.abort()
