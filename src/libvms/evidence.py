"""Evidence: self-contained files that prove a host lied, checkable offline by anyone.

Everything in an evidence file is signed by the host or bound by hashes to
what it signed; a third party needs nothing but the file. Two kinds:

``fork``
    Two checkpoints signed by one log key that cannot both be true: equal
    sizes with different roots, or a larger tree whose prefix (shown by a
    consistency proof to the larger root, RFC 9162 §2.1.4.2) has a different
    root from the smaller checkpoint.
``replay``
    A signed log (checkpoint plus every entry it covers) whose replay does not
    reproduce entry ``index``: the host signed a result its own script does
    not compute.

The file is JSON: ``{"format": "libvms-evidence/v1", "kind", ...}`` with
notes as text and hashes and entries in base64 (``docs/formats.md``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from . import encoding, merkle
from .checkpoint import Checkpoint, open_checkpoint
from .errors import LibVMSError, ReplayLimitError, TamperError, VerificationError
from .keys import VerifierKey, parse_ledger_url

FORMAT = "libvms-evidence/v1"

Kind = Literal["fork", "replay"]


@dataclass(frozen=True)
class Finding:
    """What checking an evidence file established."""

    proven: bool
    statement: str


@dataclass(frozen=True)
class Evidence:
    """A claim of misbehaviour and the signed data that proves it."""

    kind: Kind
    notes: tuple[str, ...]
    proof: tuple[bytes, ...] = ()
    prefix_root: bytes | None = None
    entries: tuple[bytes, ...] = ()
    index: int | None = None
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        obj: dict[str, Any] = {
            "format": FORMAT,
            "kind": self.kind,
            "summary": self.summary,
            "checkpoints": list(self.notes),
        }
        if self.proof or self.prefix_root is not None:
            obj["consistencyProof"] = [_b64(h) for h in self.proof]
        if self.prefix_root is not None:
            obj["prefixRoot"] = _b64(self.prefix_root)
        if self.entries:
            obj["entries"] = [_b64(e) for e in self.entries]
        if self.index is not None:
            obj["index"] = self.index
        obj.update(self.extra)
        return json.dumps(obj, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Evidence:
        """Parse an evidence file; :class:`LibVMSError` when it is not one."""
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict) or obj.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            kind = obj["kind"]
            if kind not in ("fork", "replay"):
                raise ValueError(f"unknown evidence kind {kind!r}")
            notes = tuple(str(n) for n in obj["checkpoints"])
            proof = tuple(_unb64(h) for h in obj.get("consistencyProof", []))
            prefix = obj.get("prefixRoot")
            entries = tuple(_unb64(e) for e in obj.get("entries", []))
            index = obj.get("index")
            if index is not None and (type(index) is not int or index < 0):
                raise ValueError("index must be a non-negative integer")
        except (ValueError, KeyError, TypeError) as exc:
            raise LibVMSError(f"not a valid evidence file: {exc}") from exc
        known = {"format", "kind", "summary", "checkpoints", "consistencyProof", "prefixRoot"}
        known |= {"entries", "index"}
        return cls(
            kind=kind,
            notes=notes,
            proof=proof,
            prefix_root=None if prefix is None else _unb64(prefix),
            entries=entries,
            index=index,
            summary=str(obj.get("summary", "")),
            extra={k: v for k, v in obj.items() if k not in known},
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)


def key_of(note: str) -> VerifierKey:
    """The verifier key named by a libvms checkpoint's origin (its ``libvms:<key>`` URL)."""
    origin = note.split("\n", 1)[0]
    try:
        _location, public_key = parse_ledger_url(origin)
    except ValueError as exc:
        raise TamperError(f"checkpoint origin {origin!r} is not a libvms ledger") from exc
    return VerifierKey(origin, public_key)


def fork_evidence(
    older: str, newer: str, newer_tree: merkle.MerkleTree | None = None, summary: str = ""
) -> Evidence:
    """Evidence that two signed checkpoints of one log disagree.

    ``newer_tree`` is the tree the larger checkpoint commits to (the entries
    fetched and verified against it); from it come the prefix root and the
    consistency proof. Not needed when both checkpoints have the same size.
    """
    a, b = open_checkpoint(older, key_of(older)), open_checkpoint(newer, key_of(newer))
    if a.size > b.size:
        a, b = b, a
        older, newer = newer, older
    if a.size == b.size or newer_tree is None:
        return Evidence("fork", (older, newer), summary=summary)
    return Evidence(
        "fork",
        (older, newer),
        proof=tuple(newer_tree.consistency_proof(a.size, b.size)),
        prefix_root=newer_tree.root(a.size),
        summary=summary,
    )


def replay_evidence(note: str, entries: list[bytes], index: int, summary: str) -> Evidence:
    """Evidence that signed log ``entries`` (covered by ``note``) do not replay at ``index``."""
    return Evidence("replay", (note,), entries=tuple(entries), index=index, summary=summary)


def _open_all(notes: tuple[str, ...]) -> list[Checkpoint]:
    if not notes:
        raise TamperError("evidence holds no checkpoint")
    key = key_of(notes[0])
    checkpoints = [open_checkpoint(n, key) for n in notes]
    return checkpoints


async def check(
    evidence: Evidence, *, call_timeout: float = 5.0, memory_limit: int = 64 * 2**20
) -> Finding:
    """Verify ``evidence`` offline and say what it proves.

    Raises :class:`TamperError` when the evidence itself does not verify
    (bad signatures, checkpoints of different logs, a proof that does not
    lead to the signed root): such a file proves nothing about the host.
    ``call_timeout`` and ``memory_limit`` bound the replay that checks replay
    evidence; a replay that runs past them proves nothing.
    """
    if evidence.kind == "fork":
        return _check_fork(evidence)
    return await _check_replay(evidence, call_timeout, memory_limit)


def _check_fork(evidence: Evidence) -> Finding:
    if len(evidence.notes) != 2:
        raise TamperError("fork evidence needs exactly two checkpoints")
    a, b = _open_all(evidence.notes)
    if a.size > b.size:
        a, b = b, a
    origin = a.origin
    if a.size == b.size:
        if a.root_hash != b.root_hash:
            return Finding(
                True,
                f"log {origin} signed two different trees of size {a.size}: "
                f"{a.root_hash.hex()[:16]}... and {b.root_hash.hex()[:16]}...",
            )
        return Finding(False, f"both checkpoints agree (size {a.size}); no fork shown")
    if a.size == 0:
        # The empty prefix of any tree is the empty tree: no proof binds prefix_root
        # here, so it proves nothing; only a size-0 root that is not empty does.
        if a.root_hash != merkle.EMPTY_ROOT:
            return Finding(
                True,
                f"log {origin} signed a checkpoint of size 0 whose root is not the empty tree's",
            )
        return Finding(False, "a checkpoint of size 0 is a prefix of any log; no fork")
    if evidence.prefix_root is None:
        raise TamperError("fork evidence between different sizes needs a consistency proof")
    # RFC 9162 §2.1.4.2: the proof binds prefix_root to the larger signed root, so
    # prefix_root is what the larger tree's first a.size entries hash to.
    merkle.verify_consistency(a.size, b.size, evidence.prefix_root, b.root_hash, evidence.proof)
    if evidence.prefix_root != a.root_hash:
        return Finding(
            True,
            f"log {origin} rewrote its history: its checkpoint of size {b.size} contains a "
            f"first {a.size} entries that differ from its own signed checkpoint of size {a.size}",
        )
    return Finding(False, f"the checkpoints are consistent ({a.size} -> {b.size}); no fork")


async def _check_replay(evidence: Evidence, call_timeout: float, memory_limit: int) -> Finding:
    from .log import CallLog
    from .vm import BackendVM

    if len(evidence.notes) != 1 or evidence.index is None:
        raise TamperError("replay evidence needs one checkpoint and an entry index")
    (checkpoint,) = _open_all(evidence.notes)
    leaves = [merkle.leaf_hash(e) for e in evidence.entries]
    if len(leaves) != checkpoint.size or merkle.root_of(leaves) != checkpoint.root_hash:
        raise TamperError("the evidence's entries do not hash to its signed checkpoint")
    if not 0 < evidence.index < checkpoint.size:
        raise TamperError("the evidence's index is not a call in its log")
    copy = await CallLog.copy_of(
        key_of(evidence.notes[0]).public_key, list(evidence.entries), evidence.notes[0]
    )
    init = encoding.parse(evidence.entries[0])
    try:
        replay = await BackendVM.from_call_log(
            copy,
            {"files_archive_url": init.get("filesArchiveUrl")},
            check=True,
            call_timeout=call_timeout,
            memory_limit=memory_limit,
        )
    except ReplayLimitError as exc:
        return Finding(False, f"this check cannot decide it: {exc}")
    except VerificationError as exc:
        if exc.index == evidence.index:
            return Finding(
                True,
                f"log {checkpoint.origin} signed entry {exc.index} but its own script "
                f"replays it differently: {exc}",
            )
        return Finding(False, f"the replay diverges elsewhere: {exc}")
    finally:
        await copy.close()
    await replay.close()
    return Finding(False, f"entry {evidence.index} replays exactly; nothing is proven")
