"""Fetching a files archive with its history, so that every version can be read."""

import pytest

from libvms import encoding
from libvms.archive import FilesArchive
from libvms.errors import BlobNotFetchedError, NotFoundError, TamperError
from libvms.keys import parse_ledger_url
from libvms.remote import fetch_files_archive, refresh
from libvms.rpc import RPCClient, RPCServer
from libvms.vm import BackendVM

from ..tamper.helpers import blob_forging_proxy, sql

SCRIPT = """
exports.write = async (path, text) => { await System.files.writeFile(path, text); return path }
exports.remove = (path) => System.files.unlink(path)
"""

# Version 1 is the genesis; each call below adds one version.
CALLS = [
    ("write", "/a", "a one"),  # 2
    ("write", "/b", "b only"),  # 3
    ("write", "/a", "a two"),  # 4
    ("write", "/a", "a three"),  # 5
    ("remove", "/b"),  # 6
]
OLD = encoding.sha256_hex(b"a one")


@pytest.fixture
async def served():
    vm = BackendVM(SCRIPT)
    await vm.deploy(None, title="history")
    server = RPCServer(port=0)
    server.mount("/vm", vm)
    await server.start()
    async with RPCClient(server.url("/vm"), user="alice") as client:
        for method, *args in CALLS:
            await getattr(client, method)(*args)
        info = client.backend_info
    yield vm, server, info.files_archive_url
    await server.close()
    await vm.close()


async def contents(view):
    """Every path of a view and what it holds (None for a directory)."""
    out = {}
    for path, stat in sorted(view.files().items()):
        out[path] = await view.read_file(path) if stat.is_file() else None
    return out


async def assert_every_version_reads_as_the_original(copy, original):
    assert copy.version == original.version == len(CALLS) + 1
    for version in range(1, copy.version + 1):
        view, truth = await copy.checkout(version), await original.checkout(version)
        assert view.state_root == truth.state_root
        assert await contents(view) == await contents(truth)


async def test_a_copy_with_history_reads_every_version(served, tmp_path):
    vm, _, url = served
    copy = await FilesArchive.fetch(url, tmp_path, history=True)
    assert copy.fetch_mode == "history"
    await assert_every_version_reads_as_the_original(copy, vm.files_archive)
    assert await (await copy.checkout(2)).read_file("/a") == "a one"
    assert await (await copy.checkout(3)).read_file("/b") == "b only"
    assert await copy.read_file("/a") == "a three"
    await copy.close()
    reopened = await FilesArchive.open(tmp_path)
    assert reopened.fetch_mode == "history"
    await assert_every_version_reads_as_the_original(reopened, vm.files_archive)
    await reopened.close()


async def test_a_copy_without_history_says_what_it_lacks(served, tmp_path):
    _, _, url = served
    copy = FilesArchive(url)
    await copy.download("/", tmp_path)
    assert copy.fetch_mode == "current"
    assert await copy.read_file("/a") == "a three"
    current = await copy.checkout(copy.version)
    assert await current.read_file("/a") == "a three"
    old = await copy.checkout(2)
    assert (await old.stat("/a")).size == len("a one")  # the tree of every version is there
    with pytest.raises(BlobNotFetchedError, match="history=True") as info:
        await old.read_file("/a")
    assert info.value.hash == OLD
    assert isinstance(info.value, NotFoundError)
    assert not isinstance(info.value, TamperError)
    with pytest.raises(BlobNotFetchedError):
        await (await copy.checkout(3)).read_file("/b")
    await copy.close()
    reopened = await FilesArchive.open(tmp_path)
    assert reopened.fetch_mode == "current"
    with pytest.raises(BlobNotFetchedError):
        await (await reopened.checkout(4)).read_file("/a")
    assert await reopened.read_file("/a") == "a three"
    await reopened.close()


async def test_refresh_keeps_fetching_history(served, tmp_path):
    vm, server, url = served
    with_history = FilesArchive(url)
    await with_history.download(dir=tmp_path / "history", history=True)
    without = await fetch_files_archive(url, tmp_path / "current")
    async with RPCClient(server.url("/vm"), user="bob") as client:
        await client.write("/a", "a four")  # 7
        await client.write("/c", "c new")  # 8
        await client.write("/a", "a five")  # 9
        await client.remove("/c")  # 10
    await with_history.download()  # a refresh, in the mode the copy was fetched with
    assert await refresh(without) == 4
    for copy in (with_history, without):
        assert copy.version == vm.files_archive.version == 10
        assert copy.state_root == vm.files_archive.state_root
        assert await copy.read_file("/a") == "a five"
    assert await (await with_history.checkout(7)).read_file("/a") == "a four"
    assert await (await with_history.checkout(8)).read_file("/c") == "c new"
    with pytest.raises(BlobNotFetchedError):
        await (await without.checkout(7)).read_file("/a")
    await with_history.close()
    reopened = await FilesArchive.open(tmp_path / "history")
    assert reopened.fetch_mode == "history"
    assert await (await reopened.checkout(2)).read_file("/a") == "a one"
    await reopened.close()

    # Asking for history later fetches the blobs of every earlier write.
    assert await refresh(without, history=True) == 0
    assert without.fetch_mode == "history"
    for version in (2, 3, 4, 7, 8):
        view, truth = await without.checkout(version), await vm.files_archive.checkout(version)
        assert await contents(view) == await contents(truth)
    await without.close()


async def test_a_history_blob_altered_on_disk_is_tamper(served, tmp_path):
    _, _, url = served
    copy = await FilesArchive.fetch(url, tmp_path, history=True)
    await copy.close()
    sql(
        tmp_path,
        "UPDATE blobs SET data = CAST('forged' AS BLOB) WHERE hash = ?",
        (bytes.fromhex(OLD),),
    )
    reopened = await FilesArchive.open(tmp_path)  # opening checks the current files only
    assert await reopened.read_file("/a") == "a three"
    with pytest.raises(TamperError, match="does not match its hash"):
        await (await reopened.checkout(2)).read_file("/a")
    await reopened.close()
    # A blob the copy fetched and no longer holds is lost, not "not fetched".
    sql(tmp_path, "DELETE FROM blobs WHERE hash = ?", (bytes.fromhex(OLD),))
    reopened = await FilesArchive.open(tmp_path)
    with pytest.raises(TamperError, match="missing"):
        await (await reopened.checkout(2)).read_file("/a")
    await reopened.close()


async def test_a_current_blob_lost_from_a_copy_without_history_is_tamper(served, tmp_path):
    _, _, url = served
    copy = await FilesArchive.fetch(url, tmp_path)
    await copy.close()
    sql(
        tmp_path,
        "DELETE FROM blobs WHERE hash = ?",
        (bytes.fromhex(encoding.sha256_hex(b"a three")),),
    )
    with pytest.raises(TamperError, match="missing"):
        await FilesArchive.open(tmp_path)


@pytest.fixture
async def liar(served):
    """An HTTP proxy to the server that flips a bit of the old blob of /a."""
    _, server, _ = served
    async with blob_forging_proxy(f"http://127.0.0.1:{server.port}", OLD) as through:
        yield through


async def test_a_lying_server_is_caught_only_when_history_is_fetched(served, liar, tmp_path):
    _, _, url = served
    with pytest.raises(TamperError, match="does not match"):
        await fetch_files_archive(liar(url), tmp_path / "history", history=True)
    copy = await fetch_files_archive(liar(url))  # the forged blob is not a current file
    with pytest.raises(TamperError, match="does not match"):
        await refresh(copy, history=True)
    assert copy.fetch_mode == "current"
    with pytest.raises(BlobNotFetchedError):
        await (await copy.checkout(2)).read_file("/a")
    await copy.close()


async def test_a_copy_made_before_fetches_were_recorded(served, tmp_path):
    _, _, url = served
    copy = await FilesArchive.fetch(url, tmp_path)
    await copy.close()
    sql(tmp_path, "DELETE FROM meta WHERE key = 'files_archive.fetch'")
    sql(tmp_path, "DROP TABLE files_archive_fetched")
    reopened = await FilesArchive.open(tmp_path)
    assert reopened.fetch_mode is None
    with pytest.raises(BlobNotFetchedError):
        await (await reopened.checkout(2)).read_file("/a")
    reopened.location = parse_ledger_url(url)[0]
    assert await refresh(reopened) == 0
    assert reopened.fetch_mode is None  # nothing new: nothing recorded
    assert await refresh(reopened, history=True) == 0
    assert reopened.fetch_mode == "history"
    assert await (await reopened.checkout(2)).read_file("/a") == "a one"
    await reopened.close()


SAME = """
exports.write = async (path, text) => { await System.files.writeFile(path, text); return path }
"""


async def _served_by(tmp_path, calls):
    from ..tamper.dishonest import DishonestHost

    host = DishonestHost(tmp_path / "vm", SAME)
    await host.start()
    async with RPCClient(host.url(), user="alice") as client:
        for args in calls:
            await client.write(*args)
        url = client.backend_info.files_archive_url
    return host, url


def _claim_size(path, size):
    """An edit of the archive ledger: the write of ``path`` claims another size."""

    def edit(entries):
        for entry in entries:
            if entry.get("path") == path:
                entry["size"] = size
        return entries

    return edit


@pytest.mark.parametrize("history", [False, True])
async def test_a_size_the_content_does_not_have_is_tamper(tmp_path, history):
    # Two files with one content: the blob is fetched once, and each file's size
    # must still be its length.
    host, url = await _served_by(tmp_path, [("/c", "same"), ("/b", "same")])
    try:
        await host.rewrite(_claim_size("/c", 999_999), ledger="files_archive")
        with pytest.raises(TamperError, match="two sizes"):
            await fetch_files_archive(url, history=history)
    finally:
        await host.close()


async def test_refresh_checks_a_new_size_against_a_blob_already_held(tmp_path):
    host, url = await _served_by(tmp_path, [("/b", "same")])
    try:
        for history in (False, True):
            copy = await fetch_files_archive(url, history=history)

            def append_lie(entries):
                lie = dict(entries[-1], path="/c", size=123_456, mtime=entries[-1]["mtime"] + 1)
                return [*entries, lie]

            await host.rewrite(append_lie, ledger="files_archive")
            with pytest.raises(TamperError, match=r"two sizes|holds 4 bytes"):
                await refresh(copy)
            await copy.close()
            await host.rewrite(lambda entries: entries[:-1], ledger="files_archive")
    finally:
        await host.close()
