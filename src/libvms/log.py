"""CallLog: the VM's signed, append-only record of its script and every call.

Entry shapes are the seed's, stored as RFC 8785 bytes; absent values are
omitted, never ``null``::

    {"type": "init", "code": ..., "filesArchiveUrl": ..., ...}
    {"type": "call", "call": {"userId"?, "methodName", "args"},
                     "result": {"res"?, "err"?, "filesVersion"}, ...}
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import encoding
from .errors import LibVMSError
from .keys import Keypair, ledger_url
from .ledger import Ledger, abandon
from .store import Store

KEY_FILENAME = "call-log.key"
LEDGER_NAME = "call_log"


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


#: Default of optional entry fields: the field is left out of the entry.
ABSENT: Any = _Absent()


def init_entry(code: str, files_archive_url: str, **extra: Any) -> dict[str, Any]:
    """The ``init`` entry that starts every call log."""
    entry: dict[str, Any] = {"type": "init", "code": code, "filesArchiveUrl": files_archive_url}
    entry.update({k: v for k, v in extra.items() if v is not ABSENT and v is not None})
    return entry


def call_entry(
    *,
    method_name: str,
    args: Sequence[Any],
    files_version: int,
    user_id: str | None = None,
    res: Any = ABSENT,
    err: Any = ABSENT,
    call_extra: Mapping[str, Any] | None = None,
    result_extra: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``call`` entry in the seed's shape; ``ABSENT``/``None`` optional fields are omitted."""
    call: dict[str, Any] = {}
    if user_id is not None:
        call["userId"] = user_id
    call["methodName"] = method_name
    call["args"] = list(args)
    if call_extra:
        call.update(call_extra)
    result: dict[str, Any] = {}
    if res is not ABSENT:
        result["res"] = res
    if err is not ABSENT and err is not None:
        result["err"] = err
    result["filesVersion"] = files_version
    if result_extra:
        result.update(result_extra)
    entry: dict[str, Any] = {"type": "call", "call": call, "result": result}
    entry.update({k: v for k, v in extra.items() if v is not ABSENT and v is not None})
    return entry


class CallLog:
    """A VM's call log. Create with :meth:`create`, reopen with :meth:`open`.

    Appends are durable when their ``await`` returns. Inside ``async with
    log.batch():`` appends return at once and the block's exit waits for one
    shared commit and one checkpoint signature.
    """

    def __init__(self, ledger: Ledger, directory: Path | None) -> None:
        self._ledger = ledger
        self.dir = directory
        self.location: str | None = None
        self._batch_depth = 0

    # -- lifecycle -------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        dir: str | Path | None,
        code: str,
        files_archive_url: str,
        *,
        keypair: Keypair | None = None,
        store: Store | None = None,
        **init_extra: Any,
    ) -> CallLog:
        """Create a log in ``dir`` (None: in memory) and append its init entry."""
        log = cls._new(dir, keypair=keypair, store=store)
        await log.append_init(code=code, files_archive_url=files_archive_url, **init_extra)
        return log

    @classmethod
    def _new(
        cls,
        dir: str | Path | None,
        *,
        keypair: Keypair | None = None,
        store: Store | None = None,
    ) -> CallLog:
        keypair = keypair or Keypair.generate()
        directory = None if dir is None else Path(dir)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            key_path = directory / KEY_FILENAME
            if key_path.exists():
                raise LibVMSError(f"{directory} already holds a call log")
        owned = store is None
        store = store if store is not None else Store.open(directory)
        ledger: Ledger | None = None
        try:
            ledger = Ledger.create(store, LEDGER_NAME, keypair)
            if directory is not None:
                keypair.save(directory / KEY_FILENAME)
        except BaseException:
            abandon(ledger, store, owned)
            raise
        return cls(ledger, directory)

    @classmethod
    async def fetch(cls, url: str, dir: str | Path | None = None) -> CallLog:
        """Download and verify the call log at ``url`` into ``dir`` (None: memory).

        Every entry is checked against the signed checkpoint and the key in the
        URL as it arrives: :class:`TamperError` otherwise. The copy is read-only.
        """
        from .remote import fetch_call_log

        return await fetch_call_log(url, dir)

    @classmethod
    async def copy_of(
        cls,
        public_key: bytes,
        entries: Sequence[bytes],
        checkpoint_note: str,
        dir: str | Path | None = None,
    ) -> CallLog:
        """A read-only copy of someone's log from its entries and signed checkpoint.

        The entries must hash to the checkpoint, which must be signed by
        ``public_key``; :class:`TamperError` otherwise.
        """
        directory = None if dir is None else Path(dir)
        store = Store.open(directory)
        try:
            ledger = Ledger.create_copy(store, LEDGER_NAME, public_key)
            ledger.extend_verified(entries, checkpoint_note)
            await store.flush()
        except BaseException:
            store.close()
            raise
        return cls(ledger, directory)

    @classmethod
    async def open(cls, dir: str | Path, *, store: Store | None = None) -> CallLog:
        """Reopen the log in ``dir``, verifying it; :class:`TamperError` on any change."""
        directory = Path(dir)
        key_path = directory / KEY_FILENAME
        if not Store.exists(directory):
            raise LibVMSError(f"{directory} holds no call log")
        keypair = Keypair.load(key_path) if key_path.exists() else None
        owned = store is None
        store = store if store is not None else Store.open(directory)
        try:
            ledger = Ledger.open(store, LEDGER_NAME, keypair)
        except BaseException:
            abandon(None, store, owned)
            raise
        return cls(ledger, directory)

    async def close(self) -> None:
        """Wait for pending appends, then release the database (also when a commit
        failed: the error is raised once the database is released)."""
        try:
            await self._ledger.store.flush()
        finally:
            self._ledger.close()
            self._ledger.store.close()

    async def __aenter__(self) -> CallLog:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- identity --------------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        """The log's Ed25519 public key (32 bytes): its identity."""
        return self._ledger.public_key

    @property
    def url(self) -> str:
        """Self-certifying URL: where the log is served (if known) plus its key."""
        return ledger_url(self.public_key, self.location)

    @property
    def verifier_key(self) -> str:
        """The C2SP signed-note verifier key of the log's checkpoints."""
        return self._ledger.verifier.to_text()

    @property
    def origin(self) -> str:
        return self._ledger.origin

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def length(self) -> int:
        """How many entries the log holds."""
        return self._ledger.length

    async def checkpoint(self) -> str:
        """The latest signed checkpoint, as C2SP signed-note text, once it is durable."""
        await self._ledger.store.flush()
        return self._ledger.checkpoint_text

    # -- reading ---------------------------------------------------------------

    async def list(self, start: int | None = None, end: int | None = None) -> list[Any]:
        """Entries ``start`` (default 0) to ``end`` (exclusive, default the length)."""
        first = 0 if start is None else start
        last = self.length if end is None else end
        return [encoding.parse_verified(d) for d in self._ledger.raw_range(first, last)]

    async def get(self, seq: int) -> Any:
        """Entry ``seq``; IndexError if there is none."""
        return self._ledger.get(seq)

    async def get_raw(self, seq: int) -> bytes:
        """The canonical bytes of entry ``seq``."""
        return self._ledger.raw(seq)

    async def inclusion_proof(self, seq: int, size: int | None = None) -> builtins.list[bytes]:
        """RFC 9162 inclusion proof of entry ``seq`` in the tree of ``size`` entries."""
        return self._ledger.tree.inclusion_proof(seq, size)

    async def consistency_proof(
        self, old_size: int, new_size: int | None = None
    ) -> builtins.list[bytes]:
        """RFC 9162 consistency proof between the trees of ``old_size`` and ``new_size``."""
        return self._ledger.tree.consistency_proof(old_size, new_size)

    # -- appending -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Group the appends inside into one durable commit, awaited on exit."""
        self._batch_depth += 1
        try:
            yield
        finally:
            self._batch_depth -= 1
        if self._batch_depth == 0:
            await self._ledger.store.flush()

    def stage(self, entry: dict[str, Any]) -> int:
        """Stage an entry without waiting for durability; returns its index."""
        return self._ledger.stage_append(entry)

    def stage_canonical(self, data: bytes, *, leaf: bytes | None = None) -> int:
        """Stage an entry already encoded by :func:`encoding.canonical`; returns its index.

        ``leaf`` is its leaf hash when the caller already verified it.
        """
        return self._ledger.stage_canonical(data, leaf=leaf)

    async def append(self, entry: dict[str, Any]) -> int:
        """Append one JSON object; returns its index once durable."""
        seq = self._ledger.stage_append(entry)
        if self._batch_depth == 0:
            await self._ledger.store.flush()
        return seq

    async def append_init(self, *, code: str, files_archive_url: str, **extra: Any) -> int:
        """Append the ``init`` entry (script code and files archive URL)."""
        return await self.append(init_entry(code, files_archive_url, **extra))

    async def append_call(
        self,
        *,
        method_name: str,
        args: Sequence[Any],
        files_version: int,
        user_id: str | None = None,
        res: Any = ABSENT,
        err: Any = ABSENT,
        **extra: Any,
    ) -> int:
        """Append a ``call`` entry in the seed's shape; omitted fields stay absent."""
        entry = call_entry(
            method_name=method_name,
            args=args,
            files_version=files_version,
            user_id=user_id,
            res=res,
            err=err,
            **extra,
        )
        return await self.append(entry)
