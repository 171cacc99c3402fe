"""Fetching a VM's ledgers over HTTP, replaying them, and catching servers that lie."""

import base64
import json

import aiohttp
import pytest
from aiohttp import web

from libvms import encoding, merkle, signed
from libvms.archive import FilesArchive
from libvms.checkpoint import Checkpoint, sign_checkpoint
from libvms.errors import ConnectError, LibVMSError, TamperError
from libvms.keys import Keypair, ledger_url, parse_ledger_url
from libvms.log import CallLog
from libvms.remote import fetch_call_log, fetch_files_archive, refresh
from libvms.rpc import RPCClient, RPCServer, protocol
from libvms.verifier import Verifier
from libvms.vm import BackendVM

SCRIPT = """
exports.write = async (path, text) => { await System.files.writeFile(path, text); return path }
exports.remove = (path) => System.files.unlink(path)
exports.add = (a, b) => a + b
"""


@pytest.fixture
async def served():
    vm = BackendVM(SCRIPT)
    await vm.deploy(None, title="fetched")
    server = RPCServer(port=0)
    server.mount("/vm", vm)
    await server.start()
    async with RPCClient(server.url("/vm"), user="alice") as client:
        await client.write("/a.txt", "hello")
        await client.write("/b.bin", "x" * 5000)
        await client.write("/gone", "soon deleted")
        await client.remove("/gone")
        await client.add(1, 2)
    async with RPCClient(server.url("/vm"), key=Keypair.generate()) as client:
        await client.write("/signed", "by key")
        info = client.backend_info
    yield vm, server, info
    await server.close()
    await vm.close()


async def test_fetch_both_ledgers_and_replay_them(served, tmp_path):
    vm, _, info = served
    log = await fetch_call_log(info.call_log_url)
    archive = await fetch_files_archive(info.files_archive_url, tmp_path / "files")
    try:
        assert log.length == vm.call_log.length
        assert await log.list() == await vm.call_log.list()
        assert log.location == parse_ledger_url(info.call_log_url)[0]
        assert archive.version == vm.files_archive.version
        assert archive.state_root == vm.files_archive.state_root
        assert await archive.read_file("/b.bin") == "x" * 5000
        assert await archive.readdir("/") == ["a.txt", "b.bin", "signed"]
        for index, entry in enumerate(await log.list()):
            signed.verify_call_entry(entry, log.public_key, index=index)
        replay = await BackendVM.from_call_log(log, info, check=True)
        try:
            await Verifier.compare_logs(log, replay.call_log)
            await Verifier.compare_archives(archive, replay.files_archive)
        finally:
            await replay.close()
    finally:
        await log.close()
        await archive.close()
    reopened = await FilesArchive.open(tmp_path / "files")
    assert await reopened.read_file("/signed") == "by key"
    await reopened.close()


async def test_refresh_fetches_only_what_is_new(served, tmp_path):
    vm, server, info = served
    log = await fetch_call_log(info.call_log_url, tmp_path)
    archive = await fetch_files_archive(info.files_archive_url, tmp_path)
    try:
        assert await refresh(log) == 0
        async with RPCClient(server.url("/vm")) as client:
            await client.write("/new", "fresh")
            await client.add(2, 2)
        assert await refresh(log, info.call_log_url) == 2
        assert await refresh(archive) == 1
        assert await archive.read_file("/new") == "fresh"
        assert await log.list() == await vm.call_log.list()
        assert archive.state_root == vm.files_archive.state_root
        with pytest.raises(TamperError):
            await refresh(log, info.files_archive_url)
    finally:
        await log.close()
        await archive.close()
    reopened = await CallLog.open(tmp_path)
    assert reopened.length == vm.call_log.length
    await reopened.close()


async def test_only_fetched_copies_can_be_refreshed(served):
    vm, _, info = served
    with pytest.raises(LibVMSError):
        await refresh(vm.call_log)
    _, key = parse_ledger_url(info.call_log_url)
    with pytest.raises(ValueError, match="no http"):
        await fetch_call_log(ledger_url(key))


async def get(url, *, content_types=None):
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        if content_types is not None:
            content_types.append(response.headers["Content-Type"])
        return response.status, await response.read()


async def test_http_endpoints(served, monkeypatch):
    vm, server, _ = served
    base = server.http_url("/vm")
    size = vm.call_log.length
    status, body = await get(base + "/log/checkpoint")
    assert status == 200
    assert body.decode() == await vm.call_log.checkpoint()

    status, body = await get(base + "/log/entries?start=0")
    assert status == 200
    assert body == b"".join(e + b"\n" for e in vm.call_log.ledger.raw_range(0, size))
    monkeypatch.setattr(protocol, "MAX_ENTRIES_PER_PAGE", 2)
    status, body = await get(base + "/log/entries?start=1&end=5")
    assert body.count(b"\n") == 2
    assert body.split(b"\n")[0] == await vm.call_log.get_raw(1)

    kinds = []
    status, body = await get(
        base + f"/log/proof/inclusion?index=2&size={size}", content_types=kinds
    )
    assert kinds == ["text/plain; charset=utf-8"]
    proof = protocol.parse_proof(body)
    root = vm.call_log.ledger.tree.root(size)
    merkle.verify_inclusion(merkle.leaf_hash(await vm.call_log.get_raw(2)), 2, size, proof, root)
    status, body = await get(base + f"/log/proof/consistency?old=3&new={size}")
    old_root = vm.call_log.ledger.tree.root(3)
    merkle.verify_consistency(3, size, old_root, root, protocol.parse_proof(body))

    content_hash = vm.files_archive.files()["/a.txt"].hash
    assert await get(base + f"/files/blobs/{content_hash}") == (200, b"hello")
    status, body = await get(base + "/files/entries?start=0&end=1")
    assert json.loads(body) == {"title": "fetched", "type": "genesis"}

    for path, expected in [
        ("/log/entries", 400),
        ("/log/entries?start=-1", 400),
        ("/log/entries?start=01", 400),
        (f"/log/entries?start=0&end={size + 1}", 400),
        ("/log/entries?start=3&end=2", 400),
        (f"/log/proof/inclusion?index={size}", 400),
        ("/log/proof/consistency?old=5&new=4", 400),
        ("/files/blobs/XYZ", 400),
        ("/files/blobs/" + "0" * 64, 404),
        ("/log/nope", 404),
        ("/log/blobs/" + content_hash, 404),
        ("/elsewhere", 404),
    ]:
        status, body = await get(base + path)
        assert status == expected, (path, body)
    async with aiohttp.ClientSession() as http, http.post(base + "/log/checkpoint") as response:
        assert response.status == 405


# --- a server that lies ------------------------------------------------------------------------


class Liar:
    """A proxy in front of the real server that rewrites chosen responses."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.rules = {}
        self.runner = None

    async def start(self):
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def url(self, real_url):
        location, key = parse_ledger_url(real_url)
        return ledger_url(key, self.base + location[len(self.upstream) :])

    async def handle(self, request):
        async with (
            aiohttp.ClientSession() as http,
            http.get(self.upstream + request.path_qs) as response,
        ):
            status, body = response.status, await response.read()
        for suffix, rule in self.rules.items():
            if suffix in request.path:
                result = rule(request, status, body)
                if isinstance(result, web.StreamResponse):
                    return result
                if result is None:
                    return await self.cut_short(request, body)
                status, body = result
        return web.Response(status=status, body=body)

    async def cut_short(self, request, body):
        response = web.StreamResponse(status=200)
        response.content_length = len(body) + 100
        await response.prepare(request)
        await response.write(body)
        request.transport.close()
        return response

    async def close(self):
        await self.runner.cleanup()


@pytest.fixture
async def liar(served):
    _, server, _ = served
    proxy = Liar(f"http://127.0.0.1:{server.port}")
    await proxy.start()
    yield proxy
    await proxy.close()


def edit_entry(index, change):
    def rule(request, status, body):
        start = int(request.query["start"])
        lines = body.split(b"\n")
        if start <= index < start + len(lines) - 1:
            entry = json.loads(lines[index - start])
            change(entry)
            lines[index - start] = encoding.canonical(entry)
        return status, b"\n".join(lines)

    return rule


async def test_the_honest_proxy_is_believed(served, liar):
    _, _, info = served
    log = await fetch_call_log(liar.url(info.call_log_url))
    archive = await fetch_files_archive(liar.url(info.files_archive_url))
    assert log.length > 5 and archive.version > 4
    await log.close()
    await archive.close()


def set_args(entry):
    entry["call"]["args"] = [40, 2]


def set_path(entry):
    entry["path"] = "/elsewhere"


@pytest.mark.parametrize(
    ("which", "suffix", "rule", "match"),
    [
        ("log", "/entries", edit_entry(5, set_args), "do not hash"),
        ("files", "/entries", edit_entry(2, set_path), "do not hash"),
        ("log", "/entries", lambda r, s, b: (s, b.replace(b'":', b'": ', 1)), "canonical"),
        ("log", "/entries", lambda r, s, b: (s, b[:-1]), "truncated"),
        ("log", "/entries", lambda r, s, b: (s, b""), "no entries"),
        ("log", "/entries", lambda r, s, b: (s, b + b"{}\n"), "more than"),
        ("log", "/checkpoint", lambda r, s, b: (s, b[:-3]), "malformed"),
        ("files", "/checkpoint", lambda r, s, b: (s, b"x" * 70000), "bytes"),
        ("files", "/blobs/", lambda r, s, b: (s, b[:-1] + bytes([b[-1] ^ 1])), "does not match"),
        ("files", "/blobs/", lambda r, s, b: (s, b + b"!"), "bytes"),
    ],
)
async def test_lies_are_caught(served, liar, which, suffix, rule, match):
    _, _, info = served
    liar.rules[suffix] = rule
    fetch = fetch_call_log if which == "log" else fetch_files_archive
    url = info.call_log_url if which == "log" else info.files_archive_url
    with pytest.raises(TamperError, match=match):
        await fetch(liar.url(url))


@pytest.mark.parametrize("suffix", ["/entries", "/checkpoint"])
async def test_a_response_that_breaks_off_is_a_connect_error_not_tamper(served, liar, suffix):
    _, _, info = served
    liar.rules[suffix] = lambda r, s, b: None  # announce the length, send half, hang up
    with pytest.raises(ConnectError, match="broke off"):
        await fetch_call_log(liar.url(info.call_log_url))


async def test_a_checkpoint_signed_by_another_key_is_refused(served, liar):
    _, _, info = served

    def resign(request, status, body):
        text = body.decode()
        checkpoint = Checkpoint.parse(text[: text.index("\n\n") + 1])
        return status, sign_checkpoint(checkpoint, Keypair.generate()).encode()

    liar.rules["/checkpoint"] = resign
    with pytest.raises(TamperError, match="no valid signature"):
        await fetch_call_log(liar.url(info.call_log_url))


async def test_http_errors_are_connect_errors(served, liar):
    _, _, info = served
    liar.rules["/entries"] = lambda r, s, b: (500, b"oops")
    with pytest.raises(ConnectError, match="HTTP 500"):
        await fetch_call_log(liar.url(info.call_log_url))
    await liar.close()
    with pytest.raises(ConnectError):
        await fetch_files_archive(liar.url(info.files_archive_url))
    await liar.start()


async def test_refresh_catches_a_rollback(served, liar):
    vm, server, info = served
    old_checkpoint = (await vm.call_log.checkpoint()).encode()
    async with RPCClient(server.url("/vm")) as client:
        await client.add(5, 5)
    log = await fetch_call_log(liar.url(info.call_log_url))
    liar.rules["/checkpoint"] = lambda r, s, b: (s, old_checkpoint)
    with pytest.raises(TamperError, match="older than"):
        await refresh(log)
    assert log.length == vm.call_log.length
    await log.close()


async def test_refresh_catches_a_fork_signed_with_the_real_key(served, liar):
    vm, _, info = served
    log = await fetch_call_log(liar.url(info.call_log_url))
    size = log.length
    ledger = vm.call_log.ledger
    leaves = [ledger.tree.leaf(i) for i in range(size - 1)]
    leaves += [merkle.leaf_hash(b'{"forked":1}'), merkle.leaf_hash(b'{"forked":2}')]
    fork = merkle.MerkleTree.from_leaf_hashes(leaves)
    forked = sign_checkpoint(Checkpoint(ledger.origin, size + 1, fork.root()), ledger.keypair)
    proof = b"".join(base64.b64encode(h) + b"\n" for h in fork.consistency_proof(size))
    liar.rules["/checkpoint"] = lambda r, s, b: (s, forked.encode())
    liar.rules["/consistency"] = lambda r, s, b: (200, proof)
    with pytest.raises(TamperError, match="consistency"):
        await refresh(log)
    assert log.length == size
    await log.close()
