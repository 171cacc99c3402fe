"""Refreshing a fetched copy: all or nothing, one refresh at a time."""

import asyncio

import pytest

from libvms import encoding
from libvms.archive import FilesArchive
from libvms.errors import TamperError
from libvms.remote import fetch_call_log, fetch_files_archive, refresh
from libvms.rpc import RPCClient, RPCServer
from libvms.vm import BackendVM

from ..tamper.helpers import blob_forging_proxy

SCRIPT = "exports.write = async (path, text) => { await System.files.writeFile(path, text) }"
FORGED = encoding.sha256_hex(b"new content")


@pytest.fixture
async def served():
    vm = BackendVM(SCRIPT)
    await vm.deploy(None, title="refresh")
    server = RPCServer(port=0)
    server.mount("/vm", vm)
    await server.start()
    yield vm, server
    await server.close()
    await vm.close()


@pytest.fixture
async def liar(served):
    """An HTTP proxy to the server that flips a bit of one blob."""
    _, server = served
    async with blob_forging_proxy(f"http://127.0.0.1:{server.port}", FORGED) as through:
        yield through


@pytest.mark.parametrize("history", [False, True])
async def test_a_forged_blob_leaves_the_copy_as_it_was(served, liar, tmp_path, history):
    vm, server = served
    async with RPCClient(server.url("/vm"), user="alice") as client:
        await client.write("/old", "old content")
        url = client.backend_info.files_archive_url
        copy = await fetch_files_archive(liar(url), tmp_path, history=history)
        await client.write("/new", "new content")  # its blob is the one the proxy forges
    version, root = copy.version, copy.state_root
    with pytest.raises(TamperError, match="does not match"):
        await refresh(copy)
    assert (copy.version, copy.state_root) == (version, root)
    assert await copy.read_file("/old") == "old content"
    await copy.close()

    # Nothing of the failed refresh reached the disk either, and an honest
    # server's refresh then brings the copy up to date.
    reopened = await FilesArchive.open(tmp_path)
    assert (reopened.version, reopened.state_root) == (version, root)
    assert await refresh(reopened, url) == 1
    assert reopened.state_root == vm.files_archive.state_root
    assert await reopened.read_file("/new") == "new content"
    await reopened.close()


async def test_concurrent_refreshes_of_one_copy_take_turns(served, tmp_path):
    vm, server = served
    async with RPCClient(server.url("/vm"), user="alice") as client:
        await client.write("/a", "one")
        url = client.backend_info.files_archive_url
        log_url = client.backend_info.call_log_url
        copy = await fetch_files_archive(url, tmp_path / "files")
        log = await fetch_call_log(log_url, tmp_path / "log")
        for i in range(5):
            await client.write(f"/n{i}", str(i))
    added = await asyncio.gather(refresh(copy), refresh(copy), refresh(log), refresh(log))
    assert sorted(added[:2]) == [0, 5] and sorted(added[2:]) == [0, 5]
    assert copy.state_root == vm.files_archive.state_root
    assert log.length == vm.call_log.length
    await copy.close()
    await log.close()
