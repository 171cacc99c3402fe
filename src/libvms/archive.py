"""FilesArchive: a versioned file tree whose every mutation is a signed ledger entry.

The archive's history is a :class:`~libvms.ledger.Ledger` of its own: entry 0 is
a genesis entry (the title), so a fresh archive has ``version == 1``, and each
``write``, ``mkdir``, ``unlink`` or ``rmdir`` appends one entry. File contents
are content-addressed blobs (SHA-256), stored once however often written.

The **state root** hashes the current tree only (sorted paths, kinds and
content hashes), never keys, titles, times or history, so an honest replay
reproduces it exactly. ``docs/formats.md`` gives the construction.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from . import encoding, merkle
from .errors import (
    AlreadyExistsError,
    BlobNotFetchedError,
    DirectoryNotEmptyError,
    InvalidPathError,
    IsADirectoryError_,
    LibVMSError,
    NotADirectoryError_,
    NotFoundError,
    ReadOnlyError,
    TamperError,
    TooLargeError,
)
from .keys import Keypair, ledger_url
from .ledger import Ledger, abandon
from .store import Store

KEY_FILENAME = "files-archive.key"
LEDGER_NAME = "files_archive"
#: Meta key of a fetched copy: b"history" (every blob of every version fetched)
#: or b"current" (the blobs of the files current at each fetch or refresh).
FETCH_MODE_KEY = f"{LEDGER_NAME}.fetch"
#: Table of a fetched copy: the hash of every blob it fetched and verified.
FETCHED_TABLE = f"{LEDGER_NAME}_fetched"

FetchMode = Literal["current", "history"]

#: Longest accepted path (characters) and path component.
MAX_PATH = 4096
MAX_NAME = 255
#: Largest file the archive accepts, in bytes.
MAX_FILE_BYTES = 64 * 1024 * 1024

Kind = Literal["file", "dir"]
Encoding = Literal["utf8", "binary", "base64", "hex"]
_ENCODINGS = ("utf8", "utf-8", "binary", "base64", "hex")


def normalize_path(path: str) -> str:
    """The canonical absolute form of an archive path.

    ``.`` and repeated slashes collapse; ``..`` may not leave the root; NUL,
    empty paths and over-long names raise :class:`InvalidPathError`.
    """
    if not isinstance(path, str):
        raise InvalidPathError(f"path must be a string, not {type(path).__name__}")
    if path == "":
        raise InvalidPathError("path is empty")
    if "\x00" in path:
        raise InvalidPathError("path contains a NUL byte")
    if not encoding.is_unicode(path):
        raise InvalidPathError("path is not valid Unicode (it holds a lone surrogate)")
    if len(path) > MAX_PATH:
        raise InvalidPathError(f"path is longer than {MAX_PATH} characters")
    parts: list[str] = []
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            if not parts:
                raise InvalidPathError(f"path {path!r} leaves the archive root")
            parts.pop()
            continue
        if len(name) > MAX_NAME:
            raise InvalidPathError(f"name {name[:20]!r}... is longer than {MAX_NAME} characters")
        parts.append(name)
    return "/" + "/".join(parts)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _depth(path: str) -> int:
    return path.count("/")


@dataclass(frozen=True)
class Stat:
    """What :meth:`FilesArchive.stat` returns."""

    kind: Kind
    size: int
    mtime_ms: int
    hash: str | None = None

    @property
    def mtime(self) -> datetime:
        """Last modification time (UTC)."""
        return datetime.fromtimestamp(self.mtime_ms / 1000, tz=timezone.utc)

    def is_file(self) -> bool:
        return self.kind == "file"

    def is_dir(self) -> bool:
        return self.kind == "dir"

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as scripts see it."""
        kind = "directory" if self.kind == "dir" else "file"
        return {"type": kind, "size": self.size, "mtime": self.mtime_ms}


def _leaf(path: str, kind: Kind, content_hash: str | None) -> bytes:
    # docs/formats.md, "State root": one leaf per path except the root.
    obj: dict[str, Any] = {"path": path, "type": kind}
    if content_hash is not None:
        obj["hash"] = content_hash
    # Strings under ASCII keys: nothing canonical_checked must look at first.
    return merkle.leaf_hash(encoding.canonical_checked(obj, True))


class _Nodes(ABC):
    """A file tree that archive entries apply to: the operations on top of five primitives."""

    @abstractmethod
    def get(self, path: str) -> Stat | None:
        """The node at ``path``, or None."""

    @abstractmethod
    def names(self, path: str) -> set[str]:
        """Names in the directory ``path`` (which exists)."""

    @abstractmethod
    def under(self, prefix: str) -> list[str]:
        """Every path that starts with ``prefix`` (a directory path plus ``/``)."""

    @abstractmethod
    def put(self, path: str, node: Stat) -> None:
        """Set the node at ``path``, whose parent directory exists."""

    @abstractmethod
    def drop(self, path: str) -> None:
        """Remove ``path`` (which exists); its descendants are dropped before it."""

    @abstractmethod
    def all_nodes(self) -> dict[str, Stat]:
        """Every path (the root included) and its node."""

    @abstractmethod
    def state_root(self) -> bytes:
        """The tree's state root (docs/formats.md)."""

    def lookup(self, path: str) -> Stat:
        node = self.get(path)
        if node is None:
            raise NotFoundError(f"{path} does not exist")
        return node

    def _require_parent_dir(self, path: str) -> None:
        parent = _parent(path)
        node = self.get(parent)
        if node is None:
            raise NotFoundError(f"directory {parent} does not exist")
        if node.kind != "dir":
            raise NotADirectoryError_(f"{parent} is not a directory")

    def apply(self, entry: dict[str, Any]) -> None:
        """Apply one archive ledger entry, or raise the error that refuses it (changing nothing)."""
        op = entry.get("type")
        if op == "genesis":
            return
        path = normalize_path(entry["path"])
        if path == "/":
            raise InvalidPathError("the archive root cannot be changed")
        mtime = int(entry["mtime"])
        if op == "write":
            self._require_parent_dir(path)
            existing = self.get(path)
            if existing is not None and existing.kind == "dir":
                raise IsADirectoryError_(f"{path} is a directory")
            self.put(path, Stat("file", int(entry["size"]), mtime, str(entry["hash"])))
        elif op == "mkdir":
            self._require_parent_dir(path)
            if self.get(path) is not None:
                raise AlreadyExistsError(f"{path} already exists")
            self.put(path, Stat("dir", 0, mtime))
        elif op == "unlink":
            node = self.lookup(path)
            if node.kind == "dir":
                raise IsADirectoryError_(f"{path} is a directory; use rmdir")
            self.drop(path)
        elif op == "rmdir":
            node = self.lookup(path)
            if node.kind != "dir":
                raise NotADirectoryError_(f"{path} is not a directory")
            if self.names(path) and not entry.get("recursive"):
                raise DirectoryNotEmptyError(f"{path} is not empty")
            for sub in reversed(self.under(path + "/")):  # deepest first
                self.drop(sub)
            self.drop(path)
        else:
            raise LibVMSError(f"unknown archive operation {op!r}")


class _Tree(_Nodes):
    """The file tree at one version: path -> Stat, directory listings and the state root.

    ``generation`` counts changes, so a transaction can tell whether the tree it
    started from has changed under it.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, Stat] = {"/": Stat("dir", 0, 0)}
        self.children: dict[str, set[str]] = {"/": set()}
        self.leaves = merkle.MerkleMap()  # one leaf per path but the root: the state root
        #: False while a replay puts its paths in: the leaves are built once, at the end.
        self.indexed = True
        self.generation = 0

    def copy(self) -> _Tree:
        other = _Tree()
        other.nodes = dict(self.nodes)
        other.children = {k: set(v) for k, v in self.children.items()}
        other.leaves = self.leaves.copy()
        return other

    def state_root(self) -> bytes:
        return self.leaves.root()

    def get(self, path: str) -> Stat | None:
        return self.nodes.get(path)

    def names(self, path: str) -> set[str]:
        return self.children[path]

    def under(self, prefix: str) -> list[str]:
        # Walks the directory's own subtree: costs what it finds, not the archive.
        found: list[str] = []
        pending = [prefix[:-1] or "/"]
        while pending:
            directory = pending.pop()
            head = "" if directory == "/" else directory
            for name in self.children.get(directory, ()):
                path = f"{head}/{name}"
                found.append(path)
                if path in self.children:
                    pending.append(path)
        found.sort()
        return found

    def put(self, path: str, node: Stat) -> None:
        if path not in self.nodes:
            self.children[_parent(path)].add(_basename(path))
        self.nodes[path] = node
        if node.kind == "dir":
            self.children.setdefault(path, set())
        else:
            self.children.pop(path, None)  # a directory replaced by a file
        if self.indexed:
            self.leaves.set(path, _leaf(path, node.kind, node.hash))
        self.generation += 1

    def merge(self, changes: _Overlay) -> None:
        """Make this tree show what ``changes``, an overlay of it, shows.

        The overlay already checked every rule, so its final nodes are put in
        directly: removals deepest first, then the rest parents first.
        """
        nodes = self.nodes
        dropped = [p for p, n in changes.nodes.items() if n is None and p in nodes]
        for path in sorted(dropped, key=_depth, reverse=True):
            self.drop(path)
        kept = [(p, n) for p, n in changes.nodes.items() if n is not None]
        if len(kept) > 1:
            kept.sort(key=lambda item: _depth(item[0]))
        for path, node in kept:
            self.put(path, node)

    def all_nodes(self) -> dict[str, Stat]:
        return self.nodes

    def drop(self, path: str) -> None:
        del self.nodes[path]
        if self.indexed:
            self.leaves.delete(path)
        self.children.pop(path, None)
        self.children[_parent(path)].discard(_basename(path))
        self.generation += 1


class _Overlay(_Nodes):
    """A transaction's changes on top of a tree it leaves untouched until commit.

    Costs what the changes cost, not what the tree holds: the tree is never copied.
    """

    def __init__(self, base: _Tree) -> None:
        self.base = base
        self.generation = base.generation
        self.nodes: dict[str, Stat | None] = {}  # None: removed
        self.added: dict[str, set[str]] = {}  # directory -> names added to it
        self.removed: dict[str, set[str]] = {}  # directory -> names removed from it
        self.fresh: set[str] = set()  # directories made here: nothing of theirs in base

    def get(self, path: str) -> Stat | None:
        if path in self.nodes:
            return self.nodes[path]
        return self.base.nodes.get(path)

    def names(self, path: str) -> set[str]:
        added = self.added.get(path, set())
        if path in self.fresh:
            return set(added)
        return (self.base.children.get(path, set()) - self.removed.get(path, set())) | added

    def under(self, prefix: str) -> list[str]:
        paths = {p for p in self.base.under(prefix) if self.nodes.get(p, True) is not None}
        paths.update(p for p, n in self.nodes.items() if n is not None and p.startswith(prefix))
        return sorted(paths)

    def put(self, path: str, node: Stat) -> None:
        if self.get(path) is None:
            parent, name = _parent(path), _basename(path)
            self.added.setdefault(parent, set()).add(name)
            self.removed.get(parent, set()).discard(name)
            if node.kind == "dir":
                self.fresh.add(path)
        self.nodes[path] = node

    def drop(self, path: str) -> None:
        parent, name = _parent(path), _basename(path)
        self.nodes[path] = None
        self.removed.setdefault(parent, set()).add(name)
        self.added.get(parent, set()).discard(name)
        self.added.pop(path, None)
        self.removed.pop(path, None)
        self.fresh.discard(path)

    def all_nodes(self) -> dict[str, Stat]:
        nodes = dict(self.base.nodes)
        for path, node in self.nodes.items():
            if node is None:
                nodes.pop(path, None)
            else:
                nodes[path] = node
        return nodes

    def state_root(self) -> bytes:
        """The root the tree would have with these changes (costs a copy of the leaves)."""
        leaves = self.base.leaves.copy()
        for path, node in self.nodes.items():
            if node is None:
                if path in leaves:
                    leaves.delete(path)
            else:
                leaves.set(path, _leaf(path, node.kind, node.hash))
        return leaves.root()


def _decode_data(data: str | bytes, encoding_name: str) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if not isinstance(data, str):
        raise TypeError(f"file data must be str or bytes, not {type(data).__name__}")
    try:
        if encoding_name in ("utf8", "utf-8", "binary"):
            return data.encode("utf-8")
        if encoding_name == "base64":
            return base64.b64decode(data, validate=True)
        if encoding_name == "hex":
            return bytes.fromhex(data)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"data is not valid {encoding_name}: {exc}") from exc
    raise ValueError(f"unknown encoding {encoding_name!r}")


def _encode_data(data: bytes, encoding_name: str) -> str | bytes:
    if encoding_name == "binary":
        return data
    if encoding_name in ("utf8", "utf-8"):
        return data.decode("utf-8", errors="replace")
    if encoding_name == "base64":
        return base64.b64encode(data).decode("ascii")
    if encoding_name == "hex":
        return data.hex()
    raise ValueError(f"unknown encoding {encoding_name!r}")


class _Reader(ABC):
    """Read operations shared by the archive, its transactions and its checkouts."""

    _tree: _Nodes

    @abstractmethod
    def _blob(self, content_hash: str) -> bytes:
        """The verified bytes of a blob."""

    @property
    def state_root(self) -> str:
        """Hex hash of the current tree's content (see ``docs/formats.md``)."""
        return self._tree.state_root().hex()

    async def stat(self, path: str) -> Stat:
        return self.stat_now(path)

    def stat_now(self, path: str) -> Stat:
        return self._tree.lookup(normalize_path(path))

    async def read_file(self, path: str, encoding: str = "utf8") -> Any:
        """File contents: ``str`` for utf8/base64/hex, ``bytes`` for ``"binary"``."""
        return self.read_file_now(path, encoding)

    def read_file_now(self, path: str, encoding: str = "utf8") -> str | bytes:
        if encoding not in _ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}")
        p = normalize_path(path)
        node = self._tree.lookup(p)
        if node.kind != "file" or node.hash is None:
            raise IsADirectoryError_(f"{p} is a directory")
        return _encode_data(self._blob(node.hash), encoding)

    async def readdir(self, path: str = "/") -> list[str]:
        """Names in the directory, sorted."""
        return self.readdir_now(path)

    def readdir_now(self, path: str = "/", *, recursive: bool = False) -> list[str]:
        """The names in directory ``path``, sorted; with ``recursive``, every path
        below it, relative to it (``b``, ``b/c.txt``), depth first, each
        directory's entries sorted."""
        if not recursive:
            return sorted(self._tree.names(self._directory(path)))
        return [name for name, _ in self.readdir_stats_now(path, recursive=True)]

    def _directory(self, path: str) -> str:
        """``path`` normalised, once known to name a directory."""
        p = normalize_path(path)
        if self._tree.lookup(p).kind != "dir":
            raise NotADirectoryError_(f"{p} is not a directory")
        return p

    def readdir_stats_now(
        self, path: str = "/", *, recursive: bool = False, limit: int | None = None
    ) -> list[tuple[str, Stat]]:
        """:meth:`readdir_now` with each entry's stat. More than ``limit`` entries in
        a recursive listing raise :class:`~libvms.errors.TooLargeError`."""
        p = self._directory(path)
        tree = self._tree
        prefix = p.rstrip("/") + "/"
        if not recursive:
            return [(name, tree.lookup(prefix + name)) for name in sorted(tree.names(p))]
        found: list[tuple[str, Stat]] = []
        stack = [(prefix, "", iter(sorted(tree.names(p))))]
        while stack:
            directory, relative, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child = directory + name
            stat = tree.lookup(child)
            found.append((relative + name, stat))
            if limit is not None and len(found) > limit:
                raise TooLargeError(f"the listing of {p} holds more than {limit} entries")
            if stat.kind == "dir":
                stack.append((child + "/", relative + name + "/", iter(sorted(tree.names(child)))))
        return found

    def files(self) -> dict[str, Stat]:
        """Every path in the tree (except the root) and its stat."""
        return {p: s for p, s in self._tree.all_nodes().items() if p != "/"}


class FilesArchive(_Reader):
    """The VM's files archive. Create with :meth:`create`, reopen with :meth:`open`.

    ``FilesArchive(url)`` followed by ``await archive.download()`` is the seed's
    way to get a verified copy of someone else's archive (see :meth:`fetch`).
    """

    _tree: _Tree

    def __init__(self, url: str) -> None:
        self._remote_url: str | None = url
        self.location: str | None = None

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes a not-yet-downloaded archive lacks.
        if name.startswith("__") or self.__dict__.get("_remote_url") is None:
            raise AttributeError(name)
        raise AttributeError(f"{name}: call download() before using this archive")

    @classmethod
    def _make(cls, ledger: Ledger, directory: Path | None, title: str) -> FilesArchive:
        archive = cls.__new__(cls)
        archive._remote_url = None
        archive._setup(ledger, directory, title)
        return archive

    def _setup(self, ledger: Ledger, directory: Path | None, title: str) -> None:
        self._ledger = ledger
        self._store = ledger.store
        self.dir = directory
        self.title = title
        self.location = None
        self._tree = _Tree()
        self._staged_blobs: dict[str, bytes] = {}
        self._blobs_in_commit: list[str] = []
        self._fetch_mode: FetchMode | None = None
        rows = self._store.query("SELECT value FROM meta WHERE key = ?", (FETCH_MODE_KEY,))
        if rows:
            mode = bytes(rows[0][0]).decode("ascii", "replace")
            if mode not in ("current", "history"):
                raise TamperError(f"unknown fetch mode {mode!r}", where=FETCH_MODE_KEY)
            self._fetch_mode = "history" if mode == "history" else "current"
        self._store.add_commit_hook(self._before_commit, self._after_commit)

    def _before_commit(self) -> list[Any]:
        self._blobs_in_commit = list(self._staged_blobs)
        return []

    def _after_commit(self) -> None:
        for content_hash in self._blobs_in_commit:
            self._staged_blobs.pop(content_hash, None)
        self._blobs_in_commit = []

    # -- lifecycle -------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        dir: str | Path | None,
        title: str = "",
        *,
        keypair: Keypair | None = None,
        store: Store | None = None,
    ) -> FilesArchive:
        """Create an archive in ``dir`` (None: in memory) with its genesis entry."""
        keypair = keypair or Keypair.generate()
        directory = None if dir is None else Path(dir)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            if (directory / KEY_FILENAME).exists():
                raise LibVMSError(f"{directory} already holds a files archive")
        owned = store is None
        store = store if store is not None else Store.open(directory)
        ledger: Ledger | None = None
        archive: FilesArchive | None = None
        try:
            ledger = Ledger.create(store, LEDGER_NAME, keypair)
            if directory is not None:
                keypair.save(directory / KEY_FILENAME)
            archive = cls._make(ledger, directory, title)
            ledger.stage_append({"type": "genesis", "title": title})
            if owned:
                # A caller that gave its store commits the genesis with what it stages next.
                await store.flush()
        except BaseException:
            if archive is not None:
                store.remove_commit_hook(archive._before_commit)
            abandon(ledger, store, owned)
            raise
        return archive

    @classmethod
    async def open(cls, dir: str | Path, *, store: Store | None = None) -> FilesArchive:
        """Reopen the archive in ``dir``, verifying its ledger and every blob."""
        directory = Path(dir)
        if not Store.exists(directory):
            raise LibVMSError(f"{directory} holds no files archive")
        key_path = directory / KEY_FILENAME
        keypair = Keypair.load(key_path) if key_path.exists() else None
        owned = store is None
        store = store if store is not None else Store.open(directory)
        ledger: Ledger | None = None
        archive: FilesArchive | None = None
        try:
            ledger = Ledger.open(store, LEDGER_NAME, keypair)
            archive = cls._from_ledger(ledger, directory)
            archive._verify_blobs()
        except BaseException:
            if archive is not None:
                store.remove_commit_hook(archive._before_commit)
            abandon(ledger, store, owned)
            raise
        return archive

    @classmethod
    def _from_ledger(cls, ledger: Ledger, directory: Path | None) -> FilesArchive:
        if ledger.length == 0:
            raise TamperError("files archive has no genesis entry")
        entries = [encoding.parse(d) for d in ledger.raw_range(0, ledger.length)]
        genesis = entries[0]
        if not isinstance(genesis, dict) or genesis.get("type") != "genesis":
            raise TamperError("files archive entry 0 is not a genesis entry", where="0")
        tree = _replay(entries, len(entries))
        archive = cls._make(ledger, directory, str(genesis.get("title", "")))
        archive._tree = tree
        return archive

    @classmethod
    async def fetch(
        cls, url: str, dir: str | Path | None = None, *, history: bool = False
    ) -> FilesArchive:
        """A verified, read-only copy of the archive at ``url`` with its current files.

        Every entry is checked against the signed checkpoint and the key in the
        URL, every blob against its hash: :class:`TamperError` otherwise. With
        ``history=True`` the blob of every write in the ledger is fetched too,
        so that every version can be checked out and read; without it, reading
        an older version's file whose content was never fetched raises
        :class:`~libvms.errors.BlobNotFetchedError`. The copy remembers its
        mode: refreshing it keeps fetching history.
        """
        from .remote import fetch_files_archive

        return await fetch_files_archive(url, dir, history=history)

    async def download(
        self, path: str = "/", dir: str | Path | None = None, *, history: bool = False
    ) -> None:
        """Fetch and verify the archive named by ``FilesArchive(url)``.

        Every file of the current version is downloaded (``path`` is checked and
        kept for the seed's API), and with ``history=True`` the content of every
        older version as well (see :meth:`fetch`). Calling it again brings the
        copy up to date in the mode it was fetched with; ``history=True`` then
        turns a copy of the current files into a copy with history.
        """
        normalize_path(path)
        if self._remote_url is None:
            if self.location is None or self._ledger.keypair is not None:
                raise LibVMSError("this archive is not a fetched copy")
            from .remote import refresh

            await refresh(self, history=history)
            return
        fetched = await self.fetch(self._remote_url, dir, history=history)
        fetched._store.remove_commit_hook(fetched._before_commit)
        self._setup(fetched._ledger, fetched.dir, fetched.title)
        self._tree = fetched._tree
        self.location = fetched.location
        self._fetch_mode = fetched._fetch_mode
        self._remote_url = None

    @property
    def fetch_mode(self) -> FetchMode | None:
        """How this copy was fetched: ``"history"`` (every version's content),
        ``"current"`` (the current files at each fetch or refresh), or None for an
        archive written here (or a copy made before fetches were recorded)."""
        return self._fetch_mode

    def _stage_fetched(self, hashes: Iterable[str], mode: FetchMode) -> None:
        """Record blobs fetched and verified into this copy, and its fetch mode."""
        if mode != self._fetch_mode:
            self._store.execute_now(
                f"CREATE TABLE IF NOT EXISTS {FETCHED_TABLE} (hash BLOB PRIMARY KEY)"
            )
        rows = [(bytes.fromhex(h),) for h in hashes]
        if rows:
            self._store.stage_many(f"INSERT OR IGNORE INTO {FETCHED_TABLE} (hash) VALUES (?)", rows)
        if mode != self._fetch_mode:
            self._store.stage(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (FETCH_MODE_KEY, mode.encode("ascii")),
            )
            self._fetch_mode = mode

    def _was_fetched(self, content_hash: str) -> bool:
        if self._fetch_mode is None:
            # A copy made before fetches were recorded held the current files' blobs.
            return any(n.hash == content_hash for n in self._tree.nodes.values())
        rows = self._store.query(
            f"SELECT 1 FROM {FETCHED_TABLE} WHERE hash = ?", (bytes.fromhex(content_hash),)
        )
        return bool(rows)

    def _tree_with(self, entries: Sequence[bytes]) -> _Tree:
        """The current tree with fetched ``entries`` applied, leaving the archive as it is."""
        return _apply_stored(self._tree.copy(), entries, self.version)

    def _verify_blobs(self) -> None:
        wanted = {n.hash for n in self._tree.nodes.values() if n.hash is not None}
        for content_hash in wanted:
            self._blob(content_hash)

    async def close(self) -> None:
        """Wait for pending writes, then release the database (also when a commit
        failed: the error is raised once the database is released)."""
        try:
            await self._store.flush()
        finally:
            self._store.remove_commit_hook(self._before_commit)
            self._ledger.close()
            self._store.close()

    async def __aenter__(self) -> FilesArchive:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- identity and info -----------------------------------------------------

    @property
    def public_key(self) -> bytes:
        return self._ledger.public_key

    @property
    def url(self) -> str:
        """Self-certifying URL: where the archive is served (if known) plus its key."""
        return ledger_url(self.public_key, self.location)

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def version(self) -> int:
        """Number of entries in the archive's ledger (1 when fresh)."""
        return self._ledger.length

    async def get_info(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "title": self.title,
            "version": self.version,
            "stateRoot": self.state_root,
        }

    async def checkpoint(self) -> str:
        """The latest signed checkpoint of the archive's ledger."""
        await self._store.flush()
        return self._ledger.checkpoint_text

    async def history(self) -> list[dict[str, Any]]:
        """Every mutation: ``{"version", "type", "path"}``, oldest first."""
        # Stored entries are verified canonical JSON: the quick parser reads them.
        return history_of(
            [encoding.parse_verified(d) for d in self._ledger.raw_range(1, self._ledger.length)]
        )

    async def checkout(self, version: int) -> ArchiveView:
        """A read-only view of the archive as it was at ``version``."""
        if not 1 <= version <= self.version:
            raise NotFoundError(f"version {version} does not exist (1..{self.version})")
        entries = [encoding.parse_verified(d) for d in self._ledger.raw_range(0, version)]
        return ArchiveView(self, _replay(entries, version), version)

    # -- blobs -----------------------------------------------------------------

    def _blob(self, content_hash: str) -> bytes:
        staged = self._staged_blobs.get(content_hash)
        if staged is not None:
            return staged
        rows = self._store.query(
            "SELECT data FROM blobs WHERE hash = ?", (bytes.fromhex(content_hash),)
        )
        if not rows:
            if self._ledger.keypair is None and not self._was_fetched(content_hash):
                raise BlobNotFetchedError(
                    f"blob {content_hash} was not fetched: this copy holds only the content "
                    "of the files current when it was fetched or refreshed; fetch the "
                    "archive with history=True to read older versions",
                    hash=content_hash,
                )
            raise TamperError(f"blob {content_hash} is missing", where=content_hash)
        data = rows[0][0]
        if not isinstance(data, bytes) or encoding.sha256_hex(data) != content_hash:
            raise TamperError(f"blob {content_hash} does not match its hash", where=content_hash)
        return data

    # -- writing ---------------------------------------------------------------

    def transaction(
        self, mtime_ms: int | None = None, *, max_bytes: int | None = None
    ) -> ArchiveTransaction:
        """Stage mutations apart from the archive; ``commit()`` applies them, or drop it.

        ``mtime_ms`` stamps every mutation (default: the wall clock at each one).
        ``max_bytes`` bounds the file data it holds until it commits (distinct
        contents, counted once each): a write past it raises
        :class:`~libvms.errors.TooLargeError` and stages nothing.
        """
        if self._ledger.keypair is None:
            raise ReadOnlyError("this archive is a read-only copy")
        if mtime_ms is not None and (
            type(mtime_ms) is not int or not 0 <= mtime_ms <= encoding.MAX_SAFE_INT
        ):
            raise ValueError(f"mtime_ms must be an integer from 0 to 2^53-1, not {mtime_ms!r}")
        return ArchiveTransaction(self, mtime_ms, max_bytes)

    def _apply_transaction(self, tx: ArchiveTransaction) -> None:
        if not tx.entries:
            return
        changes = tx._tree
        if changes.base is not self._tree or changes.generation != self._tree.generation:
            # Another write landed while the transaction was open: its entries
            # must still apply, in order, on top of the archive as it is now.
            changes = _Overlay(self._tree)
            for entry in tx.entries:
                changes.apply(entry)
        # Every entry is encoded before anything is staged: a failure stages nothing.
        # Entries of this module's making hold strings, booleans and safe integers.
        encoded = [encoding.canonical_checked(entry, True) for entry in tx.entries]
        rows = [(bytes.fromhex(h), d) for h, d in tx._blobs.items()]
        if rows:
            self._store.stage_many("INSERT OR IGNORE INTO blobs (hash, data) VALUES (?, ?)", rows)
            self._staged_blobs.update(tx._blobs)
        for data in encoded:
            self._ledger.stage_canonical(data)
        self._tree.merge(changes)
        tx._release()

    def _mutate_now(self, op: str, *args: Any) -> int:
        tx = self.transaction()
        version: int = getattr(tx, op)(*args)
        tx.commit()
        return version

    async def _mutate(self, op: str, *args: Any) -> int:
        version = self._mutate_now(op, *args)
        await self._store.flush()
        return version

    async def write_file(self, path: str, data: str | bytes, encoding: str = "utf8") -> int:
        """Write a file (str in ``encoding``, or bytes); returns the new version."""
        return await self._mutate("write_file", path, data, encoding)

    async def mkdir(self, path: str) -> int:
        return await self._mutate("mkdir", path)

    async def unlink(self, path: str) -> int:
        return await self._mutate("unlink", path)

    async def rmdir(self, path: str, recursive: bool = False) -> int:
        return await self._mutate("rmdir", path, recursive)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS: dict[str, set[str]] = {
    "write": {"type", "path", "hash", "size", "mtime"},
    "mkdir": {"type", "path", "mtime"},
    "unlink": {"type", "path", "mtime"},
    "rmdir": {"type", "path", "mtime", "recursive"},
}


def _check_stored_entry(entry: Any) -> None:
    """Refuse a stored mutation entry that this code would never have written."""
    if not isinstance(entry, dict):
        raise LibVMSError("not an object")
    fields = _FIELDS.get(entry.get("type"))  # type: ignore[arg-type]
    if fields is None:
        raise LibVMSError(f"unknown operation {entry.get('type')!r}")
    if not set(entry) <= fields or not fields - {"recursive"} <= set(entry):
        raise LibVMSError(f"fields {sorted(entry)} do not match a {entry['type']} entry")
    path = entry["path"]
    if not isinstance(path, str) or normalize_path(path) != path:
        raise LibVMSError(f"path {path!r} is not normalised")
    mtime = entry["mtime"]
    if type(mtime) is not int or mtime < 0:
        raise LibVMSError("mtime is not a non-negative integer")
    if "recursive" in entry and entry["recursive"] is not True:
        raise LibVMSError("recursive must be true when present")
    if entry["type"] == "write":
        size = entry["size"]
        if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise LibVMSError("size is not a valid file size")
        if not isinstance(entry["hash"], str) or not _HEX64.match(entry["hash"]):
            raise LibVMSError("hash is not a lowercase hex SHA-256")


def _replay(entries: Sequence[Any], upto: int) -> _Tree:
    # The state root's index is built once at the end, in one pass: cheaper than
    # keeping it up to date through every entry (archives of 10^5 files reopen).
    tree = _Tree()
    tree.indexed = False
    _apply_stored(tree, entries[1:upto], 1)
    tree.leaves = merkle.MerkleMap.from_items(
        (path, _leaf(path, node.kind, node.hash))
        for path, node in tree.nodes.items()
        if path != "/"
    )
    tree.indexed = True
    return tree


def _apply_stored(tree: _Tree, entries: Sequence[Any], first: int) -> _Tree:
    """Apply signed archive entries (parsed, the first at index ``first``) to ``tree``.

    An entry this code would never have written, or one that does not apply,
    is a :class:`TamperError` naming its index.
    """
    for index, entry in enumerate(entries, first):
        try:
            if isinstance(entry, bytes):
                entry = encoding.parse(entry)
            _check_stored_entry(entry)
            tree.apply(entry)
        except (LibVMSError, KeyError, TypeError, ValueError) as exc:
            raise TamperError(
                f"files archive entry {index} is not a valid mutation: {exc}", where=str(index)
            ) from exc
    return tree


def history_of(mutations: Sequence[Any]) -> list[dict[str, Any]]:
    """``{"version", "type", "path"}`` for archive entries 1.. in order."""
    return [
        {"version": i + 2, "type": e["type"], "path": e["path"]} for i, e in enumerate(mutations)
    ]


class ArchiveTransaction(_Reader):
    """Mutations staged apart from the archive: the VM's writes during one call.

    Reads see the staged changes over the archive as it is now: a write committed
    elsewhere while the transaction is open shows through (a VM's calls never
    overlap, so within a VM nothing does). ``commit()`` applies the staged
    entries in order on top of the archive as it then is, or raises the error
    that refuses them and stages nothing; it makes them part of the archive
    (durable at the next store flush). Dropping the transaction discards them.
    """

    _tree: _Overlay

    def __init__(
        self, archive: FilesArchive, mtime_ms: int | None, max_bytes: int | None = None
    ) -> None:
        self._archive = archive
        self._tree = _Overlay(archive._tree)
        self._mtime = mtime_ms
        self.entries: list[dict[str, Any]] = []
        self._blobs: dict[str, bytes] = {}
        self._held = 0  # bytes in _blobs
        self._max_bytes = max_bytes
        self._done = False

    @property
    def version(self) -> int:
        return self._archive.version + len(self.entries)

    def _blob(self, content_hash: str) -> bytes:
        staged = self._blobs.get(content_hash)
        return staged if staged is not None else self._archive._blob(content_hash)

    def _now(self) -> int:
        return self._mtime if self._mtime is not None else int(time.time() * 1000)

    def _push(self, entry: dict[str, Any]) -> int:
        if self._done:
            raise LibVMSError("transaction already finished")
        self._tree.apply(entry)
        self.entries.append(entry)
        return self.version

    def write_file(self, path: str, data: str | bytes, encoding_name: str = "utf8") -> int:
        p = normalize_path(path)
        if encoding_name not in _ENCODINGS:
            raise ValueError(f"unknown encoding {encoding_name!r}")
        blob = _decode_data(data, encoding_name)
        if len(blob) > MAX_FILE_BYTES:
            raise ValueError(f"file is {len(blob)} bytes, more than the {MAX_FILE_BYTES} allowed")
        content_hash = encoding.sha256_hex(blob)
        new = content_hash not in self._blobs
        if new and self._max_bytes is not None and self._held + len(blob) > self._max_bytes:
            raise TooLargeError(
                f"writing {len(blob)} more bytes would make this call's writes hold more "
                f"than {self._max_bytes} bytes of file data"
            )
        entry = {"type": "write", "path": p, "hash": content_hash, "size": len(blob)}
        entry["mtime"] = self._now()
        version = self._push(entry)
        if new:
            self._blobs[content_hash] = blob
            self._held += len(blob)
        return version

    def mkdir(self, path: str) -> int:
        return self._push({"type": "mkdir", "path": normalize_path(path), "mtime": self._now()})

    def unlink(self, path: str) -> int:
        return self._push({"type": "unlink", "path": normalize_path(path), "mtime": self._now()})

    def rmdir(self, path: str, recursive: bool = False) -> int:
        entry: dict[str, Any] = {"type": "rmdir", "path": normalize_path(path)}
        if recursive:
            entry["recursive"] = True
        entry["mtime"] = self._now()
        return self._push(entry)

    def history(self) -> list[dict[str, Any]]:
        committed = [
            encoding.parse_verified(d)
            for d in self._archive._ledger.raw_range(1, self._archive._ledger.length)
        ]
        return history_of(committed + self.entries)

    def info(self) -> dict[str, Any]:
        return {
            "url": self._archive.url,
            "title": self._archive.title,
            "version": self.version,
            "stateRoot": self.state_root,
        }

    def commit(self) -> None:
        """Stage the mutations into the archive (durable at the next flush).

        Raises the archive error if the mutations no longer apply because the
        archive changed since the transaction began; nothing is staged then.
        """
        if self._done:
            raise LibVMSError("transaction already finished")
        self._archive._apply_transaction(self)
        self._done = True

    def _release(self) -> None:
        # Drop the staged changes and blobs so gathered writes don't pile them up.
        self._tree = _Overlay(self._archive._tree)
        self._blobs = {}


class ArchiveView(_Reader):
    """A read-only view of an archive at one version."""

    _tree: _Tree

    def __init__(self, archive: FilesArchive, tree: _Tree, version: int) -> None:
        self._archive = archive
        self._tree = tree
        self.version = version

    def _blob(self, content_hash: str) -> bytes:
        return self._archive._blob(content_hash)


#: The seed's name for the files archive.
DatArchive = FilesArchive
