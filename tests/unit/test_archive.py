import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvms import merkle
from libvms.archive import DatArchive, FilesArchive, _replay, normalize_path
from libvms.encoding import canonical, sha256_hex
from libvms.errors import (
    AlreadyExistsError,
    DirectoryNotEmptyError,
    EncodingError,
    InvalidPathError,
    IsADirectoryError_,
    NotADirectoryError_,
    NotFoundError,
)


async def test_fresh_archive_is_version_1_and_each_mutation_adds_one(tmp_path):
    archive = await FilesArchive.create(tmp_path, title="Bobs VM")
    assert archive.version == 1
    assert await archive.readdir("/") == []
    assert await archive.write_file("/file", "foo") == 2
    assert await archive.mkdir("/dir") == 3
    assert await archive.write_file("/dir/a.txt", b"\x00\x01") == 4
    assert await archive.unlink("/file") == 5
    assert await archive.read_file("/dir/a.txt", encoding="binary") == b"\x00\x01"
    assert await archive.read_file("/dir/a.txt", encoding="hex") == "0001"
    assert (await archive.get_info())["title"] == "Bobs VM"
    assert await archive.history() == [
        {"version": 2, "type": "write", "path": "/file"},
        {"version": 3, "type": "mkdir", "path": "/dir"},
        {"version": 4, "type": "write", "path": "/dir/a.txt"},
        {"version": 5, "type": "unlink", "path": "/file"},
    ]
    await archive.close()
    again = await FilesArchive.open(tmp_path)
    assert again.version == 5
    assert await again.readdir("/") == ["dir"]
    assert await again.read_file("/dir/a.txt", "base64") == "AAE="
    await again.close()


async def test_dat_archive_is_an_alias():
    assert DatArchive is FilesArchive


async def test_stat():
    archive = await FilesArchive.create(None, "t")
    await archive.write_file("/a", "hello")
    st_ = await archive.stat("/a")
    assert st_.size == 5 and st_.is_file() and not st_.is_dir()
    assert st_.mtime.year >= 2024
    assert (await archive.stat("/")).is_dir()
    await archive.close()


@pytest.mark.parametrize(
    ("path", "expected"),
    [("a", "/a"), ("/a/./b//c/", "/a/b/c"), ("/a/b/../c", "/a/c"), ("/", "/"), ("//", "/")],
)
def test_normalize_path(path, expected):
    assert normalize_path(path) == expected


@pytest.mark.parametrize(
    "path", ["", "/..", "a/../../b", "a\x00b", "/" + "x" * 300, 5, "/ok/\ud800", "/\udfff"]
)
async def test_invalid_paths_are_rejected_and_version_unchanged(path):
    archive = await FilesArchive.create(None, "t")
    with pytest.raises(InvalidPathError):
        await archive.write_file(path, "x")
    assert archive.version == 1
    await archive.close()


async def test_clear_errors_and_no_version_change():
    archive = await FilesArchive.create(None, "t")
    await archive.mkdir("/d")
    await archive.write_file("/d/f", "x")
    cases = [
        (archive.write_file("/missing/f", "x"), NotFoundError),
        (archive.write_file("/d/f/g", "x"), NotADirectoryError_),
        (archive.write_file("/d", "x"), IsADirectoryError_),
        (archive.mkdir("/d"), AlreadyExistsError),
        (archive.unlink("/d"), IsADirectoryError_),
        (archive.unlink("/nope"), NotFoundError),
        (archive.rmdir("/d"), DirectoryNotEmptyError),
        (archive.rmdir("/d/f"), NotADirectoryError_),
        (archive.rmdir("/"), InvalidPathError),
        (archive.read_file("/nope"), NotFoundError),
        (archive.read_file("/d"), IsADirectoryError_),
        (archive.readdir("/d/f"), NotADirectoryError_),
    ]
    for coro, error in cases:
        with pytest.raises(error):
            await coro
    assert archive.version == 3
    assert await archive.rmdir("/d", recursive=True) == 4
    assert await archive.readdir("/") == []
    await archive.close()


async def test_blobs_are_stored_once(tmp_path):
    archive = await FilesArchive.create(tmp_path, "t")
    for i in range(5):
        await archive.write_file(f"/copy{i}", "same content")
    rows = archive.ledger.store.query("SELECT count(*) FROM blobs")
    assert rows[0][0] == 1
    await archive.close()


async def test_checkout_shows_an_older_version():
    archive = await FilesArchive.create(None, "t")
    await archive.write_file("/f", "one")
    await archive.write_file("/f", "two")
    view = await archive.checkout(2)
    assert view.version == 2
    assert await view.read_file("/f") == "one"
    assert await archive.read_file("/f") == "two"
    with pytest.raises(NotFoundError):
        await archive.checkout(9)
    await archive.close()


def spec_state_root(files: dict[str, tuple[str, bytes | None]]) -> str:
    """The state root exactly as docs/formats.md §9 defines it, written independently."""
    leaves = []
    for path, (kind, content) in files.items():
        obj = {"path": path, "type": kind}
        if content is not None:
            obj["hash"] = sha256_hex(content)
        digest = int.from_bytes(hashlib.sha256(path.encode()).digest(), "big")
        leaves.append((digest, merkle.leaf_hash(canonical(obj))))

    def trie(items, depth):
        if len(items) < 2:
            return items[0][1] if items else hashlib.sha256(b"").digest()
        bit = 255 - depth
        zero = [i for i in items if not (i[0] >> bit) & 1]
        one = [i for i in items if (i[0] >> bit) & 1]
        return hashlib.sha256(b"\x01" + trie(zero, depth + 1) + trie(one, depth + 1)).digest()

    return trie(leaves, 0).hex()


names = st.sampled_from(["a", "b", "c", "é", "Z", "a b"])
contents = st.binary(max_size=20)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.tuples(names, names), contents, max_size=6),
    st.randoms(use_true_random=False),
    st.text(max_size=5),
)
async def test_state_root_depends_on_content_only(files, rnd, title):
    """Two archives with the same files have the same root, whatever history, title or key."""
    dirs = sorted({d for d, _ in files})
    a = await FilesArchive.create(None, title)
    b = await FilesArchive.create(None, "other " + title)
    for d in dirs:
        await a.mkdir(d)
    for (d, n), data in files.items():
        await a.write_file(f"/{d}/{n}", data)
    # b: different order, extra files later removed, overwritten content
    order = list(files.items())
    rnd.shuffle(order)
    for d in reversed(dirs):
        await b.mkdir(d)
    await b.write_file("/scratch", "tmp")
    for (d, n), data in order:
        await b.write_file(f"/{d}/{n}", data + b"!")
        await b.write_file(f"/{d}/{n}", data)
    await b.unlink("/scratch")
    expected = {f"/{d}": ("dir", None) for d in dirs}
    expected.update({f"/{d}/{n}": ("file", c) for (d, n), c in files.items()})
    assert a.state_root == b.state_root == spec_state_root(expected)
    await a.close()
    await b.close()


async def test_empty_archive_root_is_the_empty_tree():
    archive = await FilesArchive.create(None, "t")
    assert archive.state_root == merkle.EMPTY_ROOT.hex()
    await archive.close()


async def test_transaction_is_discarded_unless_committed():
    archive = await FilesArchive.create(None, "t")
    tx = archive.transaction(mtime_ms=1000)
    tx.write_file("/a", "x")
    assert tx.version == 2
    assert tx.read_file_now("/a") == "x"
    assert archive.version == 1
    with pytest.raises(NotFoundError):
        await archive.read_file("/a")
    tx2 = archive.transaction(mtime_ms=2000)
    tx2.mkdir("/d")
    tx2.commit()
    await archive.ledger.store.flush()
    assert archive.version == 2
    assert (await archive.stat("/d")).mtime_ms == 2000
    await archive.close()


async def test_transaction_reapplies_on_top_of_writes_that_landed_meanwhile(tmp_path):
    archive = await FilesArchive.create(tmp_path, "t")
    tx = archive.transaction(mtime_ms=1)
    tx.write_file("/a", "from the transaction")
    await archive.write_file("/b", "landed first")
    tx.commit()
    await archive.ledger.store.flush()
    assert await archive.readdir("/") == ["a", "b"]
    root = archive.state_root
    await archive.close()
    again = await FilesArchive.open(tmp_path)
    assert again.state_root == root
    await again.close()


async def test_an_open_transaction_reads_writes_committed_meanwhile():
    archive = await FilesArchive.create(None, "t")
    await archive.write_file("/f", "v1")
    tx = archive.transaction(mtime_ms=1)
    tx.write_file("/mine", "staged")
    assert tx.read_file_now("/f") == "v1"
    await archive.write_file("/f", "v2")
    await archive.write_file("/g", "new")
    assert tx.read_file_now("/f") == "v2"
    assert sorted(tx.files()) == ["/f", "/g", "/mine"]
    tx.commit()
    assert await archive.readdir("/") == ["f", "g", "mine"]
    await archive.close()


async def test_conflicting_transaction_is_refused_and_nothing_is_staged():
    archive = await FilesArchive.create(None, "t")
    tx = archive.transaction(mtime_ms=1)
    tx.write_file("/x", "file")
    await archive.mkdir("/x")
    with pytest.raises(IsADirectoryError_):
        tx.commit()
    assert archive.version == 2
    assert (await archive.stat("/x")).is_dir()
    await archive.close()


async def test_unfetched_archive_says_so():
    archive = FilesArchive("http://127.0.0.1:1/files#" + "A" * 43)
    with pytest.raises(AttributeError, match=r"download\(\)"):
        await archive.read_file("/x")


def _model_apply(files, op, path, data, recursive):
    """The archive's rules on a plain dict; returns the new dict, or None if refused."""
    parent = path.rsplit("/", 1)[0] or "/"
    parent_ok = parent == "/" or files.get(parent, ("file",))[0] == "dir"
    kind = files.get(path, (None,))[0]
    out = dict(files)
    if op == "write":
        if not parent_ok or kind == "dir":
            return None
        out[path] = ("file", data)
    elif op == "mkdir":
        if not parent_ok or kind is not None:
            return None
        out[path] = ("dir", None)
    elif op == "unlink":
        if kind != "file":
            return None
        del out[path]
    else:
        below = [p for p in files if p.startswith(path + "/")]
        if kind != "dir" or (below and not recursive):
            return None
        for p in [*below, path]:
            del out[p]
    return out


async def _assert_shows(reader, files):
    assert {p: s.kind for p, s in reader.files().items()} == {p: k for p, (k, _) in files.items()}
    for path, (kind, data) in files.items():
        if kind == "file":
            assert reader.read_file_now(path, "binary") == data
        else:
            prefix = path + "/"
            assert reader.readdir_now(path) == sorted(
                p[len(prefix) :]
                for p in files
                if p.startswith(prefix) and "/" not in p[len(prefix) :]
            )
    assert reader.readdir_now("/") == sorted(p[1:] for p in files if p.count("/") == 1)
    assert reader.state_root == spec_state_root(files)


def _mutate(tx, op, path, data, recursive):
    if op == "write":
        tx.write_file(path, data)
    elif op == "rmdir":
        tx.rmdir(path, recursive)
    else:
        getattr(tx, op)(path)


tx_ops = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["write", "write", "mkdir", "mkdir", "mkdir", "unlink", "rmdir"]),
            st.lists(st.sampled_from(["a", "é"]), min_size=1, max_size=3).map(
                lambda parts: "/" + "/".join(parts)
            ),
            contents,
            st.booleans(),
        ),
        max_size=12,
    ).flatmap(lambda ops: st.tuples(st.just(ops), st.booleans())),
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tx_ops)
async def test_transactions_follow_the_archive_rules_and_commit_or_vanish_whole(transactions):
    archive = await FilesArchive.create(None, "t")
    committed: dict = {}
    for ops, commit in transactions:
        tx = archive.transaction(mtime_ms=5)
        pending = committed
        for op, path, data, recursive in ops:
            after = _model_apply(pending, op, path, data, recursive)
            if after is None:
                with pytest.raises(
                    (
                        NotFoundError,
                        IsADirectoryError_,
                        NotADirectoryError_,
                        AlreadyExistsError,
                        DirectoryNotEmptyError,
                    )
                ):
                    _mutate(tx, op, path, data, recursive)
                continue
            _mutate(tx, op, path, data, recursive)
            pending = after
        await _assert_shows(tx, pending)
        await _assert_shows(archive, committed)
        if commit:
            tx.commit()
            committed = pending
        await _assert_shows(archive, committed)
        # A commit puts the transaction's final nodes into the tree: the result
        # is the tree that replaying the stored entries one by one builds.
        ledger = archive._ledger
        rebuilt = _replay(ledger.raw_range(0, ledger.length), ledger.length)
        assert archive._tree.nodes == rebuilt.nodes
        assert archive._tree.children == rebuilt.children
        assert archive._tree.state_root() == rebuilt.state_root()
    await archive.close()


async def test_a_path_that_changes_kind_within_a_transaction_commits_like_its_entries():
    archive = await FilesArchive.create(None, "t")
    await archive.mkdir("/d")
    await archive.write_file("/d/f", "x")
    await archive.write_file("/p", "file")
    tx = archive.transaction(mtime_ms=9)
    tx.rmdir("/d", recursive=True)
    tx.write_file("/d", "now a file")
    tx.unlink("/p")
    tx.mkdir("/p")
    tx.write_file("/p/q", "inside")
    tx.commit()
    files = {"/d": ("file", b"now a file"), "/p": ("dir", None), "/p/q": ("file", b"inside")}
    await _assert_shows(archive, files)
    ledger = archive._ledger
    rebuilt = _replay(ledger.raw_range(0, ledger.length), ledger.length)
    assert archive._tree.children == rebuilt.children
    assert archive._tree.nodes == rebuilt.nodes
    await archive.close()


async def test_recursive_rmdir_removes_every_descendant_in_and_out_of_a_transaction():
    archive = await FilesArchive.create(None, "t")
    for d in ("/a", "/a/b", "/a/b/c", "/ab"):
        await archive.mkdir(d)
    for f in ("/a/b/c/f", "/a/b/g", "/a/x", "/ab/y"):
        await archive.write_file(f, f)
    left = {"/ab": ("dir", None), "/ab/y": ("file", b"/ab/y")}
    tx = archive.transaction(mtime_ms=7)
    tx.write_file("/a/b/new", "n")
    tx.rmdir("/a", recursive=True)
    await _assert_shows(tx, left)
    tx.mkdir("/a")
    await _assert_shows(tx, {**left, "/a": ("dir", None)})
    tx.commit()
    await _assert_shows(archive, {**left, "/a": ("dir", None)})
    await archive.rmdir("/a", recursive=True)
    await _assert_shows(archive, left)
    await archive.close()


def test_the_worked_state_root_example_of_the_formats_document():
    tree = merkle.MerkleMap()
    for obj in (
        {"path": "/docs", "type": "dir"},
        {
            "hash": "b6a98d9ce9a2d9149288fa3df42d377c3e42737afdcdaf714e33c0a100b51060",
            "path": "/docs/a.txt",
            "type": "file",
        },
        {
            "hash": "853ff93762a06ddbf722c4ebe9ddd66d8f63ddaea97f521c3ecc20da7c976020",
            "path": "/hello.txt",
            "type": "file",
        },
    ):
        tree.set(obj["path"], merkle.leaf_hash(canonical(obj)))
    expected = "314c9beb28c5b43cbc0087c0a5ebb2163a23a08a81cd3ea6662055a38afe57f4"
    assert tree.root().hex() == expected
    files = {"/docs": ("dir", None)}
    assert (
        spec_state_root(files)
        == merkle.leaf_hash(canonical({"path": "/docs", "type": "dir"})).hex()
    )


@pytest.mark.parametrize("mtime", [-1, 2**53, 1.5, True, "5"])
async def test_a_transaction_refuses_an_mtime_json_cannot_carry(mtime):
    archive = await FilesArchive.create(None, "t")
    with pytest.raises(ValueError, match="mtime_ms"):
        archive.transaction(mtime_ms=mtime)
    assert archive.version == 1
    await archive.close()


async def test_a_commit_whose_entry_cannot_be_encoded_stages_nothing():
    archive = await FilesArchive.create(None, "t")
    await archive.write_file("/kept", "x")
    root, version = archive.state_root, archive.version
    tx = archive.transaction(mtime_ms=5)
    tx.write_file("/a", "first")
    tx.write_file("/b", "second")
    # The second entry fails to encode (as an entry JSON cannot carry would).
    tx.entries[1]["path"] = "/\ud800"
    with pytest.raises(EncodingError):
        tx.commit()
    assert (archive.version, archive.state_root) == (version, root)
    await archive.write_file("/after", "y")
    ledger = archive._ledger
    rebuilt = _replay(ledger.raw_range(0, ledger.length), ledger.length)
    assert archive._tree.state_root() == rebuilt.state_root()
    assert sorted(archive._tree.nodes) == ["/", "/after", "/kept"]
    await archive.close()


@given(
    st.lists(
        st.lists(st.sampled_from(["a", "ab", "b", "a.b"]), min_size=1, max_size=4),
        max_size=25,
    )
)
def test_paths_under_a_directory_are_exactly_those_below_it(paths):
    # Siblings that share a name's start ("/a", "/ab", "/a.b") stay out of "/a/".
    from libvms.archive import Stat, _Tree

    tree = _Tree()
    for parts in paths:
        for depth in range(1, len(parts) + 1):
            path = "/" + "/".join(parts[:depth])
            node = tree.get(path)
            if node is None:
                tree.put(path, Stat("dir", 0, 0))
            elif node.kind != "dir":
                break
    for directory in [p for p, n in tree.nodes.items() if n.kind == "dir"]:
        prefix = "/" if directory == "/" else directory + "/"
        expected = sorted(p for p in tree.nodes if p != "/" and p.startswith(prefix))
        assert tree.under(prefix if directory != "/" else "//") == expected
