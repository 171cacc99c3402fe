"""Fetch a VM's call log and files archive over HTTP, trusting only the keys in their URLs.

A ledger URL is self-certifying: ``http://host:port/<mount>/log#<base64url key>``.
The location (before ``#``) says where to ask; the key (after it) says whom to
believe. Everything fetched is checked against that key before it is kept:

1. the latest checkpoint must be signed by the key (C2SP signed note);
2. the entries must be canonical JSON and hash to exactly that checkpoint's
   size and root (RFC 9162);
3. when extending a copy (:func:`refresh`), the new checkpoint must be
   consistent with the one already held (RFC 9162 §2.1.4 consistency proof);
4. every blob of the archive's current files (with ``history=True``: of every
   write in its ledger) must hash to its name.

Any mismatch raises :class:`~libvms.errors.TamperError` and nothing is kept;
a server that cannot be reached, or answers with an HTTP error, raises
:class:`~libvms.errors.ConnectError`. The endpoints are described in
``docs/protocol.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import encoding, merkle
from .archive import LEDGER_NAME as ARCHIVE_LEDGER
from .archive import FetchMode, FilesArchive, _Tree
from .checkpoint import Checkpoint, open_checkpoint
from .errors import ConnectError, LibVMSError, TamperError
from .keys import parse_ledger_url
from .ledger import Ledger
from .log import LEDGER_NAME as CALL_LOG_LEDGER
from .log import CallLog
from .rpc import protocol
from .store import Store

if TYPE_CHECKING:
    import aiohttp

__all__ = ["fetch_call_log", "fetch_files_archive", "refresh"]

#: Largest checkpoint note accepted, in bytes.
MAX_CHECKPOINT_BYTES = 64 * 1024

#: Largest proof body accepted (64 hashes of base64 and LF).
MAX_PROOF_BYTES = 64 * 45

#: Largest entries page accepted: a full page plus one entry of the largest size.
MAX_ENTRIES_BODY = protocol.MAX_PAGE_BYTES + encoding.MAX_ENTRY_BYTES + 1

#: Blobs fetched at once.
BLOB_CONCURRENCY = 8


# aiohttp is imported when a fetch first needs it, not with this module: its
# client makes SSL contexts (reading the CA certificates) when imported, which
# takes about half a second.


@functools.cache
def http_timeout() -> aiohttp.ClientTimeout:
    """The timeouts of the HTTP sessions libvms opens: connecting may take 10 s and
    each read 60 s; a whole fetch has no limit (histories can be large)."""
    import aiohttp

    return aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=60.0)


def _split_url(url: str) -> tuple[str, bytes]:
    location, public_key = parse_ledger_url(url)
    if location is None:
        raise ValueError(f"ledger URL {url!r} has no http(s) location to fetch from")
    return location.rstrip("/"), public_key


@contextlib.asynccontextmanager
async def _session(given: aiohttp.ClientSession | None) -> AsyncIterator[aiohttp.ClientSession]:
    if given is not None:
        yield given
        return
    import aiohttp

    async with aiohttp.ClientSession(timeout=http_timeout()) as session:
        yield session


#: Times a fetch asks again when the server answers that it is busy (503, Retry-After).
_BUSY_RETRIES = 5
# Longest wait, in seconds, for a server that answered it is busy.
_MAX_RETRY_AFTER = 5
_SECONDS = re.compile(r"[0-9]{1,6}")


class _Busy(Exception):
    """The server answered 503 with Retry-After: ask again after ``delay`` seconds."""

    def __init__(self, delay: int) -> None:
        super().__init__(delay)
        self.delay = delay


class _Source:
    """One ledger's HTTP endpoints, read with bounded sizes."""

    def __init__(self, session: aiohttp.ClientSession, location: str) -> None:
        self.session = session
        self.location = location

    async def get(self, path: str, limit: int, params: Mapping[str, int] | None = None) -> bytes:
        """The body of ``GET <location><path>``, at most ``limit`` bytes.

        A server busy sending to other clients answers 503 with ``Retry-After``:
        that is asked again, a few times, after the delay it names (at most
        ``_MAX_RETRY_AFTER`` seconds each).
        """
        retries = 0
        while True:
            try:
                return await self._get_once(path, limit, params)
            except _Busy as busy:
                if retries == _BUSY_RETRIES:
                    raise ConnectError(
                        f"GET {self.location + path}: the server stayed busy (HTTP 503) "
                        f"through {_BUSY_RETRIES} retries"
                    ) from None
                retries += 1
                await asyncio.sleep(busy.delay)

    async def _get_once(
        self, path: str, limit: int, params: Mapping[str, int] | None = None
    ) -> bytes:
        import aiohttp  # loaded already: the session is aiohttp's

        url = self.location + path
        query = {k: str(v) for k, v in (params or {}).items()}
        try:
            async with self.session.get(url, params=query, allow_redirects=False) as response:
                retry_after = response.headers.get("Retry-After", "")
                if response.status == 503 and _SECONDS.fullmatch(retry_after):
                    raise _Busy(min(int(retry_after), _MAX_RETRY_AFTER))
                if response.status != 200:
                    detail = (await response.content.read(300)).decode("utf-8", "replace")
                    raise ConnectError(
                        f"GET {url} answered HTTP {response.status}: {detail.strip()}"
                    )
                declared = response.content_length
                if declared is not None and declared > limit:
                    raise TamperError(f"GET {url} announced {declared} bytes, over {limit}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > limit:
                        raise TamperError(f"GET {url} sent more than {limit} bytes")
                return bytes(body)
        except aiohttp.ClientPayloadError as exc:
            # The connection broke off mid-response: a network failure, which
            # proves nothing about the server, so not a TamperError.
            raise ConnectError(f"GET {url}: the response broke off ({exc})") from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise ConnectError(f"GET {url} failed: {exc or type(exc).__name__}") from exc

    async def checkpoint(self, ledger: Ledger) -> tuple[str, Checkpoint]:
        body = await self.get("/checkpoint", MAX_CHECKPOINT_BYTES)
        checkpoint = open_checkpoint(body, ledger.verifier)
        return body.decode("utf-8"), checkpoint

    async def entries(self, start: int, end: int) -> list[bytes]:
        out: list[bytes] = []
        position = start
        while position < end:
            body = await self.get("/entries", MAX_ENTRIES_BODY, {"start": position, "end": end})
            page = protocol.parse_entries(body, most=end - position)
            if not page:
                raise TamperError(
                    f"{self.location} sent no entries from {position}, "
                    f"though its checkpoint has {end}"
                )
            out.extend(page)
            position += len(page)
        return out

    async def consistency(self, old: int, new: int) -> list[bytes]:
        body = await self.get("/proof/consistency", MAX_PROOF_BYTES, {"old": old, "new": new})
        return protocol.parse_proof(body)

    async def blob(self, content_hash: str, size: int) -> bytes:
        data = await self.get(f"/blobs/{content_hash}", size)
        if len(data) != size or encoding.sha256_hex(data) != content_hash:
            raise TamperError(
                f"blob {content_hash} from {self.location} does not match its hash",
                where=content_hash,
            )
        return data


def _check_key(ledger: Ledger, public_key: bytes, url: str) -> None:
    if ledger.public_key != public_key:
        raise TamperError(f"{url} names another ledger than the one held here")


async def _extend(source: _Source, ledger: Ledger) -> tuple[list[bytes], str] | None:
    """Fetch what ``ledger`` lacks and check it; the entries and checkpoint, or None if current.

    Nothing is staged: the caller applies the result with ``extend_verified``.
    """
    text, checkpoint = await source.checkpoint(ledger)
    old_size = ledger.length
    old_root = ledger.tree.root()
    if checkpoint.size < old_size:
        raise TamperError(
            f"{source.location} signed a checkpoint of {checkpoint.size} entries, "
            f"older than the {old_size} held here (rollback or fork)"
        )
    if checkpoint.size == old_size:
        if checkpoint.root_hash != old_root:
            raise TamperError(f"{source.location} signed two different trees of {old_size}")
        return None
    if old_size > 0:
        # RFC 9162 §2.1.4.2: the new tree must extend the one held here.
        proof = await source.consistency(old_size, checkpoint.size)
        merkle.verify_consistency(old_size, checkpoint.size, old_root, checkpoint.root_hash, proof)
    entries = await source.entries(old_size, checkpoint.size)
    return entries, text


def _current_blobs(tree: _Tree) -> dict[str, int]:
    """Hash -> size of every file of an archive's tree (replayed from verified entries)."""
    wanted: dict[str, int] = {}
    for stat in tree.all_nodes().values():
        if stat.hash is not None:
            _want(wanted, stat.hash, stat.size)
    return wanted


def _want(wanted: dict[str, int], content_hash: str, size: int) -> None:
    """Add a blob to ``wanted``; one content has one size, or the entries lie."""
    if wanted.setdefault(content_hash, size) != size:
        raise TamperError(
            f"archive entries give blob {content_hash} two sizes, "
            f"{wanted[content_hash]} and {size}",
            where=content_hash,
        )


def _writes(entries: Iterable[bytes]) -> list[tuple[str, str, int]]:
    """(path, hash, size) of every ``write`` among archive entries, in order."""
    writes = []
    for data in entries:
        entry = encoding.parse_verified(data)
        if isinstance(entry, dict) and entry.get("type") == "write":
            writes.append((entry["path"], entry["hash"], entry["size"]))
    return writes


def _written_blobs(entries: Iterable[bytes]) -> dict[str, int]:
    """Hash -> size of every ``write`` among archive entries (already replayed, so valid)."""
    return _blobs_of(_writes(entries))


def _blobs_of(writes: Iterable[tuple[str, str, int]]) -> dict[str, int]:
    wanted: dict[str, int] = {}
    for _path, content_hash, size in writes:
        _want(wanted, content_hash, size)
    return wanted


async def _fetch_blobs(
    source: _Source, archive: FilesArchive, wanted: Mapping[str, int], mode: FetchMode
) -> None:
    """Fetch and verify the ``wanted`` blobs the archive's store lacks, then stage them.

    The fetched blobs are recorded as such, with the copy's ``mode``, so that a
    blob it never fetched can be told from one lost or altered since. Nothing is
    staged unless every blob verifies.
    """
    store = archive.ledger.store
    missing = []
    for h, size in sorted(wanted.items()):
        held = store.query("SELECT length(data) FROM blobs WHERE hash = ?", (bytes.fromhex(h),))
        if not held:
            missing.append((h, size))
        elif held[0][0] != size:
            # Verified against its hash when fetched: these entries give it another size.
            raise TamperError(
                f"archive entries give blob {h} the size {size}, but it holds {held[0][0]} bytes",
                where=h,
            )
    slots = asyncio.Semaphore(BLOB_CONCURRENCY)

    async def one(content_hash: str, size: int) -> tuple[bytes, bytes]:
        async with slots:
            return bytes.fromhex(content_hash), await source.blob(content_hash, size)

    rows = list(await asyncio.gather(*(one(h, s) for h, s in missing)))
    if rows:
        store.stage_many("INSERT OR IGNORE INTO blobs (hash, data) VALUES (?, ?)", rows)
    # A copy that changes mode (a new copy, an upgrade to history, a copy made
    # before fetches were recorded) records every wanted blob: the ones it
    # already held were fetched and verified too. Otherwise, only the new ones.
    recorded = wanted if archive.fetch_mode != mode else dict(missing)
    archive._stage_fetched(sorted(recorded), mode)


def _open_store(dir: str | Path | None) -> tuple[Store, Path | None]:
    directory = None if dir is None else Path(dir)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    return Store.open(directory), directory


async def fetch_call_log(
    url: str, dir: str | Path | None = None, *, session: aiohttp.ClientSession | None = None
) -> CallLog:
    """Download and verify the call log at ``url`` into ``dir`` (None: memory).

    Returns a read-only :class:`CallLog` whose ``location`` is the URL's
    location; extend it later with :func:`refresh`. ``dir`` must not hold a call
    log already.
    """
    location, public_key = _split_url(url)
    store, directory = _open_store(dir)
    ledger: Ledger | None = None
    try:
        ledger = Ledger.create_copy(store, CALL_LOG_LEDGER, public_key)
        async with _session(session) as http:
            fetched = await _extend(_Source(http, location), ledger)
        if fetched is not None:
            ledger.extend_verified(*fetched)
        await store.flush()
    except BaseException:
        if ledger is not None:
            ledger.close()
        store.close()
        raise
    log = CallLog(ledger, directory)
    log.location = location
    return log


async def fetch_files_archive(
    url: str,
    dir: str | Path | None = None,
    *,
    history: bool = False,
    session: aiohttp.ClientSession | None = None,
) -> FilesArchive:
    """Download and verify the files archive at ``url``, with its current files' blobs.

    Returns a read-only :class:`FilesArchive` (into ``dir``, or memory). By
    default blobs of files that are no longer in the current tree are not
    fetched, so reading an older version may raise
    :class:`~libvms.errors.BlobNotFetchedError`. With ``history=True`` the blob
    of every write in the ledger is fetched and verified (each once), so every
    version can be read; the copy remembers this and :func:`refresh` keeps it.
    """
    location, public_key = _split_url(url)
    store, directory = _open_store(dir)
    ledger: Ledger | None = None
    archive: FilesArchive | None = None
    try:
        ledger = Ledger.create_copy(store, ARCHIVE_LEDGER, public_key)
        async with _session(session) as http:
            source = _Source(http, location)
            fetched = await _extend(source, ledger)
            if fetched is None:
                raise TamperError(f"{location} serves an empty files archive (no genesis)")
            ledger.extend_verified(*fetched)
            archive = FilesArchive._from_ledger(ledger, directory)
            if history:
                await _fetch_blobs(source, archive, _written_blobs(fetched[0]), "history")
            else:
                await _fetch_blobs(source, archive, _current_blobs(archive._tree), "current")
        await store.flush()
    except BaseException:
        if archive is not None:
            store.remove_commit_hook(archive._before_commit)
        if ledger is not None:
            ledger.close()
        store.close()
        raise
    archive.location = location
    return archive


async def refresh(
    ledger_owner: CallLog | FilesArchive,
    url: str | None = None,
    *,
    history: bool = False,
    session: aiohttp.ClientSession | None = None,
) -> int:
    """Bring a fetched copy up to date with its source; returns how many entries were added.

    ``url`` defaults to the copy's own ``location``. The server's latest
    checkpoint must be signed by the copy's key and be consistent with the
    tree held (RFC 9162 consistency proof); then only the new entries are
    fetched, verified and appended (for an archive, with the new files' blobs,
    or, for a copy fetched with history, the blobs of every new write).
    ``history=True`` makes an archive copy fetched without history a copy with
    history, fetching the blobs of every earlier write too; a copy never loses
    its history mode.
    """
    ledger = ledger_owner.ledger
    if ledger.keypair is not None:
        raise LibVMSError("this ledger is written here; only fetched copies can be refreshed")
    # One refresh of a copy at a time: a second would verify its entries against
    # the size the first is about to change.
    async with _refresh_locks.setdefault(ledger, asyncio.Lock()):
        return await _refresh(ledger_owner, ledger, url, history, session)


_refresh_locks: weakref.WeakKeyDictionary[Ledger, asyncio.Lock] = weakref.WeakKeyDictionary()


async def _refresh(
    ledger_owner: CallLog | FilesArchive,
    ledger: Ledger,
    url: str | None,
    history: bool,
    session: aiohttp.ClientSession | None,
) -> int:
    if history and not isinstance(ledger_owner, FilesArchive):
        raise ValueError("history applies to files archives only")
    if url is None:
        if ledger_owner.location is None:
            raise ValueError("this copy has no location: pass the ledger URL")
        location = ledger_owner.location.rstrip("/")
    else:
        location, public_key = _split_url(url)
        _check_key(ledger, public_key, url)
    store = ledger.store
    async with _session(session) as http:
        source = _Source(http, location)
        fetched = await _extend(source, ledger)
        if not isinstance(ledger_owner, FilesArchive):
            if fetched is None:
                return 0
            ledger.extend_verified(*fetched)
        else:
            archive = ledger_owner
            upgrade = history and archive.fetch_mode != "history"
            if fetched is None and not upgrade:
                return 0
            entries: list[bytes] = []
            leaves: list[bytes] = []
            tree = archive._tree
            if fetched is not None:
                # Verified against the signed checkpoint before any blob they name
                # is fetched; added only once every blob has verified too, so a
                # failure leaves the copy as it was.
                entries, text = fetched
                leaves = ledger.check_extension(entries, text)
                tree = archive._tree_with(entries)
            if upgrade:
                # Every write so far: the copy never fetched the older versions' blobs.
                old = ledger.raw_range(1, ledger.length)
                await _fetch_blobs(source, archive, _written_blobs([*old, *entries]), "history")
            elif archive.fetch_mode == "history":
                await _fetch_blobs(source, archive, _written_blobs(entries), "history")
            elif archive.fetch_mode == "current":
                # The files the new entries left current; the others' blobs are held
                # (a follower refreshes often: this costs what the batch wrote).
                writes = _writes(entries)
                current = {s.hash for path, _h, _n in writes if (s := tree.get(path))}
                wanted = {h: n for h, n in _blobs_of(writes).items() if h in current}
                await _fetch_blobs(source, archive, wanted, "current")
            else:
                await _fetch_blobs(source, archive, _current_blobs(tree), "current")
            if fetched is not None:
                ledger.extend_verified(entries, text, leaves=leaves)
                archive._tree = tree
    await store.flush()
    return 0 if fetched is None else len(fetched[0])
