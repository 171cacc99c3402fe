"""A signed, append-only Merkle log of canonical JSON entries: the machinery under
both the call log and the files archive.

Each ledger is one table in a :class:`~libvms.store.Store` plus one signed
checkpoint in its ``meta`` table. The checkpoint (C2SP tlog-checkpoint in a
signed note) commits to the RFC 9162 root over the RFC 8785 bytes of every
entry, so anyone holding the public key can check the entries alone.

Opening a ledger re-hashes every stored entry and checks the result against
the signed checkpoint; reading an entry re-hashes it against the verified
tree. Altered data is never served as genuine: it raises :class:`TamperError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from . import encoding, merkle
from .checkpoint import Checkpoint, checkpoint_signing, open_checkpoint
from .errors import EncodingError, LibVMSError, TamperError
from .keys import Keypair, VerifierKey, ledger_url
from .store import Store, Write
from .writer import Signature

_NAME = re.compile(r"^[a-z_]+$")


def origin_for(public_key: bytes) -> str:
    """The checkpoint origin (and signed-note key name) of the ledger with this key."""
    return ledger_url(public_key)


class Ledger:
    """A Merkle log stored in table ``<name>_entries`` of ``store``.

    ``keypair`` is None for a read-only copy (fetched from a host): such a
    ledger can be extended only with entries that verify against a checkpoint
    signed by ``public_key``.
    """

    def __init__(
        self, store: Store, name: str, public_key: bytes, keypair: Keypair | None = None
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"bad ledger name {name!r}")
        if keypair is not None and keypair.public_key != public_key:
            raise ValueError("keypair does not match public key")
        self.store = store
        self.name = name
        self.public_key = public_key
        self.keypair = keypair
        self.origin = origin_for(public_key)
        self.verifier = VerifierKey(self.origin, public_key)
        self.tree = merkle.MerkleTree()
        self._table = f"{name}_entries"
        self._insert_sql = f"INSERT INTO {self._table} (seq, data, leaf) VALUES (?, ?, ?)"
        self._staged: dict[int, bytes] = {}
        self._signed_size = -1
        self._checkpoint_text: str | None = None
        self._batch_signature: Signature | None = None  # this commit's checkpoint
        self._seed: bytes | None = None  # the private key's, once needed
        self._ckpt_key = f"{name}.checkpoint"
        self._pub_key = f"{name}.public_key"
        store.execute_now(
            f"CREATE TABLE IF NOT EXISTS {self._table} "
            "(seq INTEGER PRIMARY KEY, data BLOB NOT NULL, leaf BLOB NOT NULL)"
        )
        self._batch_size = 0
        store.add_commit_hook(self._commit_hook, self._on_durable)

    # -- lifecycle -------------------------------------------------------------

    @classmethod
    def create(cls, store: Store, name: str, keypair: Keypair) -> Ledger:
        """A new, empty ledger; raises if ``store`` already holds one by this name."""
        if store.query("SELECT 1 FROM meta WHERE key = ?", (f"{name}.public_key",)):
            raise LibVMSError(f"a {name} ledger already exists here")
        ledger = cls(store, name, keypair.public_key, keypair)
        store.stage(
            "INSERT INTO meta (key, value) VALUES (?, ?)", (ledger._pub_key, keypair.public_key)
        )
        return ledger

    @classmethod
    def create_copy(cls, store: Store, name: str, public_key: bytes) -> Ledger:
        """A new, empty read-only copy of someone else's ledger, filled by
        :meth:`extend_verified` with entries that verify against ``public_key``."""
        if store.query("SELECT 1 FROM meta WHERE key = ?", (f"{name}.public_key",)):
            raise LibVMSError(f"a {name} ledger already exists here")
        ledger = cls(store, name, public_key)
        store.stage("INSERT INTO meta (key, value) VALUES (?, ?)", (ledger._pub_key, public_key))
        return ledger

    @classmethod
    def open(cls, store: Store, name: str, keypair: Keypair | None = None) -> Ledger:
        """Open a stored ledger, verifying every entry against the signed checkpoint."""
        rows = store.query("SELECT value FROM meta WHERE key = ?", (f"{name}.public_key",))
        if not rows:
            raise LibVMSError(f"no {name} ledger here")
        public_key = rows[0][0]
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise TamperError(f"the {name} ledger's public key is not 32 bytes on disk")
        if keypair is not None and keypair.public_key != public_key:
            raise TamperError(f"the {name} key file does not match the ledger's public key")
        ledger = cls(store, name, public_key, keypair)
        ledger._load_and_verify()
        return ledger

    def close(self) -> None:
        self.store.remove_commit_hook(self._commit_hook)

    def _load_and_verify(self) -> None:
        # One read transaction: a commit landing meanwhile (another process on this
        # directory) cannot pair an old checkpoint with newer entries.
        with self.store.snapshot():
            rows = self.store.query("SELECT value FROM meta WHERE key = ?", (self._ckpt_key,))
            if not rows:
                checkpoint = Checkpoint(self.origin, 0, merkle.EMPTY_ROOT)
                text: str | None = None
            else:
                value = rows[0][0]
                if not isinstance(value, bytes):
                    raise TamperError(f"{self.name} checkpoint is not stored as bytes")
                text = value.decode("utf-8", errors="replace")
                checkpoint = open_checkpoint(text, self.verifier)
            leaf_hash = merkle.leaf_hash
            tree = merkle.MerkleTree()
            stored = self.store.iterate(f"SELECT seq, data, leaf FROM {self._table} ORDER BY seq")
            for expected, (seq, data, leaf) in enumerate(stored):
                if seq != expected:
                    raise TamperError(
                        f"{self.name} entry {expected} is missing", where=str(expected)
                    )
                computed = leaf_hash(self._blob_column(seq, data))
                if computed != leaf:
                    raise TamperError(
                        f"{self.name} entry {seq} does not match its stored hash", where=str(seq)
                    )
                tree.append(computed)
        if tree.size != checkpoint.size:
            raise TamperError(
                f"{self.name} holds {tree.size} entries but its signed checkpoint covers "
                f"{checkpoint.size}"
            )
        if tree.root() != checkpoint.root_hash:
            raise TamperError(f"{self.name} entries do not hash to the signed checkpoint root")
        self.tree = tree
        self._signed_size = tree.size
        self._checkpoint_text = text

    # -- reading ---------------------------------------------------------------

    @property
    def length(self) -> int:
        """Entries in the ledger, including staged ones not yet durable."""
        return self.tree.size

    def raw(self, seq: int) -> bytes:
        """The canonical bytes of entry ``seq``, checked against the verified tree."""
        if not 0 <= seq < self.tree.size:
            raise IndexError(f"{self.name} has no entry {seq}")
        staged = self._staged.get(seq)
        if staged is not None:
            return staged
        rows = self.store.query(f"SELECT data FROM {self._table} WHERE seq = ?", (seq,))
        if not rows:
            raise TamperError(f"{self.name} entry {seq} is missing", where=str(seq))
        data = self._blob_column(seq, rows[0][0])
        self._check(seq, data)
        return data

    def raw_range(self, start: int, end: int, *, max_bytes: int | None = None) -> list[bytes]:
        """Canonical bytes of entries ``start`` (inclusive) to ``end`` (exclusive).

        With ``max_bytes``, stops before the entry that would take the total past
        it (the first entry always comes): what is read from disk stays bounded
        too, whatever the entries' sizes.
        """
        start = max(0, start)
        end = min(end, self.tree.size)
        if start >= end:
            return []
        out: list[bytes] = []
        total = 0
        for seq, data in self.store.iterate(
            f"SELECT seq, data FROM {self._table} WHERE seq >= ? AND seq < ? ORDER BY seq",
            (start, end),
            chunk=10_000 if max_bytes is None else 16,
        ):
            data = self._blob_column(seq, data)
            if seq != start + len(out):
                break
            if max_bytes is not None and out and total + len(data) > max_bytes:
                return out
            self._check(seq, data)
            out.append(data)
            total += len(data)
        while start + len(out) < end:
            seq = start + len(out)
            staged = self._staged.get(seq)
            if staged is None:
                raise TamperError(f"{self.name} entry {seq} is missing", where=str(seq))
            if max_bytes is not None and out and total + len(staged) > max_bytes:
                return out
            out.append(staged)
            total += len(staged)
        return out

    def get(self, seq: int) -> Any:
        # Stored entries were canonical when written or verified when fetched.
        return encoding.parse_verified(self.raw(seq))

    def _blob_column(self, seq: int, value: object) -> bytes:
        if not isinstance(value, bytes):
            raise TamperError(f"{self.name} entry {seq} is not stored as bytes", where=str(seq))
        return value

    def _check(self, seq: int, data: bytes) -> None:
        if merkle.leaf_hash(data) != self.tree.leaf(seq):
            raise TamperError(
                f"{self.name} entry {seq} was changed on disk after it was verified",
                where=str(seq),
            )

    # -- appending -------------------------------------------------------------

    def stage_append(self, entry: Any) -> int:
        """Encode and stage ``entry``; returns its index. Durable after ``store.flush()``."""
        if self.keypair is None:
            raise LibVMSError(f"this {self.name} is a read-only copy")
        if not isinstance(entry, dict):
            raise EncodingError("ledger entries must be JSON objects")
        data = encoding.canonical(entry)
        return self._stage_raw(data)

    def stage_canonical(self, data: bytes, *, leaf: bytes | None = None) -> int:
        """Stage bytes the caller produced with :func:`encoding.canonical` from an object.

        ``leaf`` is ``merkle.leaf_hash(data)`` when the caller already has it verified
        (a replay staging bytes equal to a logged entry's).
        """
        if self.keypair is None:
            raise LibVMSError(f"this {self.name} is a read-only copy")
        return self._stage_raw(data, leaf)

    def _stage_raw(self, data: bytes, leaf: bytes | None = None) -> int:
        seq = self.tree.size
        if leaf is None:
            leaf = merkle.leaf_hash(data)
        self.store.stage(self._insert_sql, (seq, data, leaf))
        self.tree.append(leaf)
        self._staged[seq] = data
        return seq

    def _on_durable(self) -> None:
        for seq in [s for s in self._staged if s < self._batch_size]:
            del self._staged[seq]
        signature = self._batch_signature
        if signature is not None and signature.value is not None:
            self._checkpoint_text = signature.value.decode()
            self._batch_signature = None

    def _commit_hook(self) -> list[Write | Signature]:
        self._batch_size = self.tree.size
        if self.tree.size == self._signed_size or self.keypair is None:
            return []
        checkpoint = Checkpoint(self.origin, self.tree.size, self.tree.root())
        text, head, key_id = checkpoint_signing(checkpoint, self.public_key)
        if self._seed is None:
            self._seed = self.keypair.private_bytes
        signature = Signature(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            self._ckpt_key,
            text,
            head,
            key_id,
            self._seed,
        )
        self._signed_size = self.tree.size
        self._batch_signature = signature
        return [signature]

    def check_extension(self, entries: Sequence[bytes], checkpoint_text: str) -> list[bytes]:
        """Raise unless :meth:`extend_verified` would accept ``entries``; changes nothing.

        Lets a caller verify fetched entries before fetching what they refer to.
        Returns their leaf hashes, for :meth:`extend_verified`.
        """
        base = self.tree.size
        self._append_checked(entries, checkpoint_text)
        leaves = [self.tree.leaf(i) for i in range(base, self.tree.size)]
        self.tree.truncate(base)
        return leaves

    def extend_verified(
        self, entries: Sequence[bytes], checkpoint_text: str, *, leaves: Sequence[bytes] = ()
    ) -> None:
        """Append fetched entries to a read-only copy, all-or-nothing.

        The entries must extend the current tree to exactly the size and root
        of ``checkpoint_text``, which must be signed by this ledger's key.
        ``leaves`` are their leaf hashes from :meth:`check_extension`, which
        already checked the entries themselves; the tree's root is checked again.
        """
        checkpoint = self._append_checked(entries, checkpoint_text, leaves)
        base = checkpoint.size - len(entries)
        # The tree already holds the verified leaves: stage the rows without re-hashing.
        rows = [(base + i, data, self.tree.leaf(base + i)) for i, data in enumerate(entries)]
        self.store.stage_many(self._insert_sql, rows)
        self._staged.update((seq, data) for seq, data, _leaf in rows)
        self._checkpoint_text = checkpoint_text
        self._signed_size = checkpoint.size
        self.store.stage(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (self._ckpt_key, checkpoint_text.encode()),
        )

    def _append_checked(
        self, entries: Sequence[bytes], checkpoint_text: str, leaves: Sequence[bytes] = ()
    ) -> Checkpoint:
        """Append ``entries`` to the tree if they reach ``checkpoint_text`` exactly.

        With their ``leaves``, the entries were checked before: only the tree is.
        """
        checkpoint = open_checkpoint(checkpoint_text, self.verifier)
        base = self.tree.size
        added = 0
        if leaves and len(leaves) != len(entries):
            raise ValueError("one leaf hash per entry")
        try:
            for i, data in enumerate(entries):
                if leaves:
                    self.tree.append(leaves[i])
                else:
                    if not isinstance(encoding.parse_canonical(data), dict):
                        raise EncodingError("entry is not a JSON object")
                    self.tree.append(merkle.leaf_hash(data))
                added += 1
                if self.tree.size > checkpoint.size:
                    raise TamperError(f"{self.name} sent more entries than its checkpoint covers")
            if self.tree.size != checkpoint.size or self.tree.root() != checkpoint.root_hash:
                raise TamperError(
                    f"{self.name} entries {base}..{self.tree.size} do not hash to the signed "
                    f"checkpoint (size {checkpoint.size})"
                )
        except EncodingError as exc:
            self.tree.truncate(base)
            raise TamperError(
                f"{self.name} entry {base + added} is not a canonical JSON object: {exc}"
            ) from exc
        except BaseException:
            self.tree.truncate(base)
            raise
        return checkpoint

    @property
    def checkpoint_text(self) -> str:
        """The latest signed checkpoint that is durable (covers only committed entries)."""
        if self._checkpoint_text is None:
            raise LibVMSError(f"this {self.name} has no checkpoint yet")
        return self._checkpoint_text


def abandon(ledger: Ledger | None, store: Store, owned: bool) -> None:
    """Undo a failed open or create: drop ``ledger``'s commit hook, and release
    ``store`` if the failed call opened it (a store the caller gave stays the caller's)."""
    try:
        if ledger is not None:
            ledger.close()
    finally:
        if owned:
            store.close()
