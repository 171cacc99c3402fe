"""Signed checkpoints: C2SP tlog-checkpoint bodies inside C2SP signed notes (Ed25519).

A ledger publishes its Merkle tree head as a *checkpoint*
(https://c2sp.org/tlog-checkpoint)::

    <origin>
    <tree size>
    <base64 root hash>
    [extension lines]

signed as a *note* (https://c2sp.org/signed-note): the text, a blank line, then
one line per signature, ``— <key name> <base64(4-byte key id || signature)>``.

Inclusion receipts use the C2SP tlog-proof text (https://c2sp.org/tlog-proof):
header, ``index N``, the proof hashes one per line, a blank line, then the signed
checkpoint verbatim.

Everything here is pure: parse, serialize, sign and verify. Data from a peer
that is malformed or does not verify raises :class:`~libvms.errors.TamperError`;
building a value object from bad arguments raises :class:`ValueError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import TamperError
from .keys import Keypair, VerifierKey, is_valid_key_name, key_id

#: Most signature lines accepted in one note (the spec requires accepting at least 16).
MAX_SIGNATURES = 16

#: Largest tree size / entry index a checkpoint or receipt may carry.
MAX_SIZE = 2**63 - 1

#: Length of a root or proof hash (SHA-256), in bytes.
HASH_SIZE = 32

#: Most hashes in an inclusion proof: a tree of at most 2^63-1 leaves is at most 63 levels deep.
MAX_PROOF_HASHES = 63

#: First line of a tlog-proof.
TLOG_PROOF_HEADER = "c2sp.org/tlog-proof@v1"

_SIG_PREFIX = "\u2014 "  # em dash, space
_KEY_ID_SIZE = 4
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,18}")
_CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f]")  # every ASCII control character but LF


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _b64decode_strict(text: str) -> bytes | None:
    """Decode standard padded base64 (RFC 4648 §4), accepting only its canonical spelling."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if _b64encode(raw) != text:
        return None
    return raw


def _decimal(text: str) -> int | None:
    """An ASCII decimal without leading zeros (except ``0``) in ``0..MAX_SIZE``, else ``None``."""
    if _DECIMAL_RE.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= MAX_SIZE else None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE


def _text_problem(text: str) -> str | None:
    """Why ``text`` cannot appear in a note, or ``None``: it must be UTF-8 without controls."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "text is not valid UTF-8 (lone surrogate)"
    match = _CONTROL_RE.search(text)
    if match is not None:
        return f"control character U+{ord(match.group()):04X} in text"
    return None


def _to_text(data: bytes | str, what: str) -> str:
    """``data`` as a str that is valid UTF-8; :class:`TamperError` otherwise."""
    if isinstance(data, bytes):
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TamperError(f"{what} is not valid UTF-8") from exc
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TamperError(f"{what} is not valid UTF-8") from exc
        return data
    raise TypeError(f"{what} must be bytes or str, not {type(data).__name__}")


# --- checkpoint body ---------------------------------------------------------------------------


def _checkpoint_problem(
    origin: str, size: int, root_hash: bytes, extensions: tuple[str, ...]
) -> str | None:
    if not isinstance(origin, str) or not origin:
        return "checkpoint origin must be a non-empty string"
    if "\n" in origin or _text_problem(origin) is not None:
        return "checkpoint origin must be one line of UTF-8 text without control characters"
    if not _is_count(size):
        return f"checkpoint size must be an integer in 0..2^63-1, not {size!r}"
    if not isinstance(root_hash, bytes) or len(root_hash) != HASH_SIZE:
        return f"checkpoint root hash must be {HASH_SIZE} bytes"
    for line in extensions:
        if not isinstance(line, str) or not line:
            return "checkpoint extension lines must be non-empty strings"
        if "\n" in line or _text_problem(line) is not None:
            return "checkpoint extension lines must be single lines without control characters"
    return None


@dataclass(frozen=True)
class Checkpoint:
    """A Merkle tree head: the log's ``origin``, its ``size`` in leaves and its ``root_hash``."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", tuple(self.extensions))
        problem = _checkpoint_problem(self.origin, self.size, self.root_hash, self.extensions)
        if problem is not None:
            raise ValueError(problem)

    def to_bytes(self) -> bytes:
        """The note text: origin, size, base64 root and extension lines, each ending in LF."""
        lines = [self.origin, str(self.size), _b64encode(self.root_hash), *self.extensions]
        return "".join(line + "\n" for line in lines).encode("utf-8")

    @classmethod
    def parse(cls, body: bytes | str) -> Checkpoint:
        """Parse a checkpoint note text strictly; :class:`TamperError` on anything malformed.

        Lines end in LF only; there are at least three, none empty; the size is an
        ASCII decimal without leading zeros (``0`` alone allowed) up to 2^63-1; the
        root is canonical base64 of 32 bytes.
        """
        text = _to_text(body, "checkpoint")
        problem = _text_problem(text)
        if problem is not None:
            raise TamperError(f"malformed checkpoint: {problem}")
        # tlog-checkpoint "Note text": lines separated by newlines; the note text ends in one.
        if not text.endswith("\n"):
            raise TamperError("malformed checkpoint: text does not end with a newline")
        lines = text[:-1].split("\n")
        # tlog-checkpoint "Note text": at least three non-empty lines; extensions non-empty too.
        if len(lines) < 3:
            raise TamperError("malformed checkpoint: fewer than three lines")
        if any(not line for line in lines):
            raise TamperError("malformed checkpoint: empty line")
        origin, size_text, root_text, *extensions = lines
        # tlog-checkpoint item 2: ASCII decimal, no leading zeroes unless the tree is empty.
        size = _decimal(size_text)
        if size is None:
            raise TamperError(f"malformed checkpoint: bad tree size {size_text!r}")
        # tlog-checkpoint item 3: base64 of the RFC 6962 root hash.
        root = _b64decode_strict(root_text)
        if root is None or len(root) != HASH_SIZE:
            raise TamperError("malformed checkpoint: root hash is not base64 of 32 bytes")
        problem = _checkpoint_problem(origin, size, root, tuple(extensions))
        if problem is not None:
            raise TamperError(f"malformed checkpoint: {problem}")
        return cls(origin, size, root, tuple(extensions))


# --- signed notes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key ``name``, 4-byte ``key_id`` and the raw ``signature``."""

    name: str
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not is_valid_key_name(self.name):
            raise ValueError(f"invalid key name {self.name!r}")
        if not isinstance(self.key_id, bytes) or len(self.key_id) != _KEY_ID_SIZE:
            raise ValueError(f"a key id is {_KEY_ID_SIZE} bytes")
        if not isinstance(self.signature, bytes) or not self.signature:
            raise ValueError("a signature is non-empty bytes")

    def to_line(self) -> str:
        """``— <name> <base64(key id || signature)>`` followed by LF."""
        return f"{_SIG_PREFIX}{self.name} {_b64encode(self.key_id + self.signature)}\n"

    def matches(self, key: VerifierKey) -> bool:
        """True iff this line claims to be by ``key`` (same name and key id)."""
        return self.name == key.name and self.key_id == key.key_id


def _parse_signature_line(line: str) -> NoteSignature:
    # signed-note "Signatures": em dash, space, key name, space, base64(key ID || signature).
    if not line.startswith(_SIG_PREFIX):
        raise TamperError("malformed note: signature line does not start with an em dash")
    name, space, sig_b64 = line[len(_SIG_PREFIX) :].partition(" ")
    if not space:
        raise TamperError("malformed note: signature line has no signature")
    # signed-note "Format": key names are non-empty, without Unicode spaces or '+'.
    if not is_valid_key_name(name):
        raise TamperError(f"malformed note: invalid key name {name!r}")
    # signed-note "Format": the signature is base64 of 4+n bytes, the first four the key ID.
    raw = _b64decode_strict(sig_b64)
    if raw is None:
        raise TamperError(f"malformed note: signature by {name!r} is not valid base64")
    if len(raw) <= _KEY_ID_SIZE:
        raise TamperError(f"malformed note: signature by {name!r} is too short")
    return NoteSignature(name, raw[:_KEY_ID_SIZE], raw[_KEY_ID_SIZE:])


@dataclass(frozen=True)
class Note:
    """A signed note: ``text`` (ending in LF) and one to :data:`MAX_SIGNATURES` signatures."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "signatures", tuple(self.signatures))
        problem = _note_text_problem(self.text)
        if problem is not None:
            raise ValueError(problem)
        if not 1 <= len(self.signatures) <= MAX_SIGNATURES:
            raise ValueError(f"a note has 1 to {MAX_SIGNATURES} signatures")
        if not all(isinstance(s, NoteSignature) for s in self.signatures):
            raise ValueError("note signatures must be NoteSignature values")

    @classmethod
    def parse(cls, data: bytes | str) -> Note:
        """Parse a signed note; :class:`TamperError` if it breaks any of these rules.

        1. It is valid UTF-8.
        2. It has no ASCII control character (below U+0020) other than LF, so no CR.
        3. The text ends in LF and is followed by a blank line; the last blank line
           separates the text from the signatures (the text may hold blank lines).
        4. Then come 1 to :data:`MAX_SIGNATURES` lines ``— <name> <base64>``, each
           ending in LF: em dash U+2014, space, a key name (non-empty, no spaces, no
           '+'), space, canonical base64 of a 4-byte key id and a signature.

        Signatures are not checked here; see :meth:`verify`.
        """
        # signed-note "Format": signed notes MUST be valid UTF-8 (rule 1).
        message = _to_text(data, "note")
        # signed-note "Format": no ASCII control characters other than newline (rule 2).
        match = _CONTROL_RE.search(message)
        if match is not None:
            raise TamperError(f"malformed note: control character U+{ord(match.group()):04X}")
        # signed-note "Format": text ending in newline, then a blank line; the text is
        # separated from the signatures by the last empty line in the note (rule 3).
        split = message.rfind("\n\n")
        if split < 0:
            raise TamperError("malformed note: no blank line before the signatures")
        text, sig_block = message[: split + 1], message[split + 2 :]
        # signed-note "Format": one or more signature lines, each ending in newline (rule 4).
        if not sig_block:
            raise TamperError("malformed note: no signatures")
        if not sig_block.endswith("\n"):
            raise TamperError("malformed note: last signature line does not end with a newline")
        lines = sig_block[:-1].split("\n")
        # signed-note "Format": verifiers SHOULD limit the number of signatures, and
        # MUST accept at least 16 (rule 4).
        if len(lines) > MAX_SIGNATURES:
            raise TamperError(f"malformed note: more than {MAX_SIGNATURES} signatures")
        signatures = tuple(_parse_signature_line(line) for line in lines)
        return cls(text, signatures)

    def to_bytes(self) -> bytes:
        """The signed note: text, blank line, signature lines."""
        lines = "".join(sig.to_line() for sig in self.signatures)
        return (self.text + "\n" + lines).encode("utf-8")

    def verify(self, keys: Sequence[VerifierKey]) -> list[VerifierKey]:
        """The keys in ``keys`` that signed this note, in the order given.

        Signature lines from unknown keys (name and key id not both matching a
        given key) are ignored, as the spec requires. Raises
        :class:`TamperError` if a line from a known key does not verify, or if no
        given key signed the note. Raises :class:`ValueError` if ``keys`` is empty
        or holds two different keys with the same name and key id.
        """
        if not keys:
            raise ValueError("no verifier keys given")
        known: dict[tuple[str, bytes], VerifierKey] = {}
        for key in keys:
            slot = (key.name, key.key_id)
            if slot in known and known[slot] != key:
                raise ValueError(f"ambiguous verifier keys for {key.name}+{key.key_id.hex()}")
            known[slot] = key
        message = self.text.encode("utf-8")
        verified: set[tuple[str, bytes]] = set()
        for sig in self.signatures:
            slot = (sig.name, sig.key_id)
            signer = known.get(slot)
            if signer is None:
                continue  # signed-note "Signatures": ignore signatures from unknown keys
            if not signer.verify(message, sig.signature):
                raise TamperError(
                    f"note signature by {sig.name}+{sig.key_id.hex()} does not verify",
                    where=sig.name,
                )
            verified.add(slot)
        if not verified:
            raise TamperError("note has no valid signature from a known key")
        result: list[VerifierKey] = []
        for key in keys:
            slot = (key.name, key.key_id)
            if slot in verified and key not in result:
                result.append(key)
        return result


def _note_text_problem(text: str) -> str | None:
    if not isinstance(text, str):
        return "note text must be a string"
    if not text.endswith("\n"):
        return "note text must end with a newline"
    return _text_problem(text)


def sign_note(text: str, signer: Keypair, name: str) -> Note:
    """Sign ``text`` (which must end in LF) with ``signer`` under key name ``name``."""
    problem = _note_text_problem(text)
    if problem is not None:
        raise ValueError(problem)
    if not is_valid_key_name(name):
        raise ValueError(f"invalid key name {name!r}")
    signature = signer.sign(text.encode("utf-8"))
    return Note(text, (NoteSignature(name, key_id(name, signer.public_key), signature),))


def sign_checkpoint(cp: Checkpoint, signer: Keypair, name: str | None = None) -> str:
    """The signed note text of ``cp``; the key name defaults to the checkpoint's origin."""
    note = sign_note(cp.to_bytes().decode("utf-8"), signer, cp.origin if name is None else name)
    return note.to_bytes().decode("utf-8")


def checkpoint_signing(
    cp: Checkpoint, public_key: bytes, name: str | None = None
) -> tuple[bytes, bytes, bytes]:
    """``(text, head, key_id)``: what it takes to sign ``cp`` somewhere else.

    The signed note is ``head + base64(key_id || Ed25519(text)) + LF``, byte for
    byte what :func:`sign_checkpoint` returns with the matching private key
    (Ed25519 signatures are deterministic). The store's writer process signs this way.
    """
    name = cp.origin if name is None else name
    if not is_valid_key_name(name):
        raise ValueError(f"invalid key name {name!r}")
    text = cp.to_bytes()
    return text, text + f"\n{_SIG_PREFIX}{name} ".encode(), key_id(name, public_key)


def open_checkpoint(note_text: bytes | str, key: VerifierKey) -> Checkpoint:
    """Verify a signed checkpoint with ``key`` and return it.

    Raises :class:`TamperError` if the note is malformed, is not validly signed by
    ``key``, its text is not a checkpoint, or the checkpoint's origin is not
    ``key.name``.
    """
    note = Note.parse(note_text)
    note.verify([key])
    # The text is only read once a trusted signature has verified it.
    checkpoint = Checkpoint.parse(note.text)
    if checkpoint.origin != key.name:
        raise TamperError(
            f"checkpoint origin {checkpoint.origin!r} is not the key name {key.name!r}",
            where=checkpoint.origin,
        )
    return checkpoint


# --- inclusion receipts ------------------------------------------------------------------------


def _receipt_problem(index: int, proof: tuple[bytes, ...], checkpoint: str) -> str | None:
    if not _is_count(index):
        return f"receipt index must be an integer in 0..2^63-1, not {index!r}"
    if len(proof) > MAX_PROOF_HASHES:
        return f"an inclusion proof has at most {MAX_PROOF_HASHES} hashes"
    if not all(isinstance(h, bytes) and len(h) == HASH_SIZE for h in proof):
        return f"proof hashes must be {HASH_SIZE} bytes each"
    if not isinstance(checkpoint, str):
        return "receipt checkpoint must be signed note text"
    try:
        Checkpoint.parse(Note.parse(checkpoint).text)
    except TamperError as exc:
        return f"receipt checkpoint is not a signed checkpoint: {exc}"
    return None


@dataclass(frozen=True)
class InclusionReceipt:
    """Proof that entry ``index`` is in the tree of a signed ``checkpoint`` (c2sp.org/tlog-proof).

    ``proof`` runs from the leaf's sibling up to the root's child (RFC 6962
    §2.1.1); ``checkpoint`` is the signed checkpoint note text. Parsing checks the
    form only: verifying the proof and the checkpoint signature happens elsewhere.
    """

    index: int
    proof: tuple[bytes, ...]
    checkpoint: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "proof", tuple(self.proof))
        problem = _receipt_problem(self.index, self.proof, self.checkpoint)
        if problem is not None:
            raise ValueError(problem)

    def to_text(self) -> str:
        """Header, ``index N``, one base64 hash per line, blank line, signed checkpoint."""
        hashes = "".join(_b64encode(h) + "\n" for h in self.proof)
        return f"{TLOG_PROOF_HEADER}\nindex {self.index}\n{hashes}\n{self.checkpoint}"

    @classmethod
    def parse(cls, text: bytes | str) -> InclusionReceipt:
        """Parse :meth:`to_text` output; :class:`TamperError` if malformed.

        The optional ``extra`` line of tlog-proof is not accepted: receipts made
        by libvms never carry one.
        """
        message = _to_text(text, "receipt")
        header, rest = _split_line(message)
        # tlog-proof "Format": the first line is the header.
        if header != TLOG_PROOF_HEADER:
            raise TamperError(f"malformed receipt: first line is not {TLOG_PROOF_HEADER!r}")
        index_line, rest = _split_line(rest)
        # tlog-proof "Format": an optional "extra" line precedes the index line.
        if index_line.startswith("extra "):
            raise TamperError("malformed receipt: extra data is not supported")
        # tlog-proof "Format": "index", space, ASCII decimal without leading zeroes.
        if not index_line.startswith("index "):
            raise TamperError("malformed receipt: second line is not 'index N'")
        index = _decimal(index_line[len("index ") :])
        if index is None:
            raise TamperError(f"malformed receipt: bad index in {index_line!r}")
        # tlog-proof "Format": zero or more non-empty lines of base64 hashes, then an
        # empty line.
        proof: list[bytes] = []
        while True:
            line, rest = _split_line(rest)
            if not line:
                break
            if len(proof) == MAX_PROOF_HASHES:
                raise TamperError(f"malformed receipt: more than {MAX_PROOF_HASHES} proof hashes")
            digest = _b64decode_strict(line)
            if digest is None or len(digest) != HASH_SIZE:
                raise TamperError("malformed receipt: proof line is not base64 of 32 bytes")
            proof.append(digest)
        # tlog-proof "Format": the checkpoint follows verbatim.
        try:
            return cls(index, tuple(proof), rest)
        except ValueError as exc:
            raise TamperError(f"malformed receipt: {exc}") from exc


def _split_line(text: str) -> tuple[str, str]:
    """``(first line without its LF, the rest)``; :class:`TamperError` if there is no LF."""
    line, newline, rest = text.partition("\n")
    if not newline:
        raise TamperError("malformed receipt: truncated")
    return line, rest


__all__ = [
    "HASH_SIZE",
    "MAX_PROOF_HASHES",
    "MAX_SIGNATURES",
    "MAX_SIZE",
    "TLOG_PROOF_HEADER",
    "Checkpoint",
    "InclusionReceipt",
    "Note",
    "NoteSignature",
    "open_checkpoint",
    "sign_checkpoint",
    "sign_note",
]
