"""A refresh that fails on a blob leaves the fetched copy exactly as it was."""

import pytest

from libvms import encoding
from libvms.archive import FilesArchive
from libvms.errors import TamperError
from libvms.remote import fetch_files_archive, refresh
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
