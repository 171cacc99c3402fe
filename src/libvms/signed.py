"""Signed calls and call receipts: the bytes a caller signs, and the checks anyone can repeat.

In signed mode a caller's user id is an Ed25519 public key (``ed25519:<base64url>``,
see :mod:`libvms.keys`) and every request carries a signature over the message

    ``b"libvms/signed-call/v1\\n"`` followed by the RFC 8785 canonical JSON of
    ``{"args": [...], "log": <call log identity>, "method": <name>,
    "nonce": <nonce>, "time": <milliseconds since 1970>, "user": <user id>}``

The call log identity is the log's checkpoint origin, ``libvms:<base64url key>``
(:func:`log_identity`), so a request signed for one VM is refused by every other.
The nonce is 16 to 64 base64url characters (clients send 16 random bytes, 22
characters); the time is the caller's clock, an integer.

The host stores ``{"nonce", "time", "sig"}`` (``sig`` is the standard base64 of
the 64-byte signature) as ``call.signed`` in the call's log entry, next to the
``userId``, ``methodName`` and ``args`` it already holds, so any auditor can
re-verify every signed call from the entry alone (:func:`verify_call_entry`) and
check that no request was used twice (:func:`check_nonces`).

A host answers a signed call with a receipt: the entry's canonical bytes and a
C2SP tlog-proof (https://c2sp.org/tlog-proof) proving the entry is in the tree of
a checkpoint signed by the log's key (:func:`verify_receipt`, :class:`CallReceipt`).

Everything here is pure: no I/O, the clock is always an argument. Data that does
not verify raises :class:`~libvms.errors.TamperError`.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import re
import secrets
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import encoding, merkle
from .checkpoint import Checkpoint, InclusionReceipt, open_checkpoint
from .errors import EncodingError, TamperError
from .keys import (
    USER_ID_PREFIX,
    Keypair,
    VerifierKey,
    ledger_url,
    public_key_from_user_id,
    verify_signature,
)

__all__ = [
    "DEFAULT_WINDOW_MS",
    "DOMAIN",
    "NONCE_BYTES",
    "CallReceipt",
    "NonceTracker",
    "SignedCall",
    "check_entry_matches",
    "check_nonces",
    "log_identity",
    "new_nonce",
    "sign_call",
    "signed_message",
    "verify_call_entry",
    "verify_receipt",
]

#: Domain-separation prefix of every signed-call message.
DOMAIN = b"libvms/signed-call/v1\n"

#: How far a signed request's time may be from the host's clock, either way (5 minutes).
DEFAULT_WINDOW_MS = 5 * 60 * 1000

#: Random bytes in a nonce made by :func:`new_nonce`.
NONCE_BYTES = 16

_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
_SIGNATURE_SIZE = 64
_ENTRY_FIELDS = ("nonce", "time", "sig")
_WIRE_FIELDS = ("user", "log", "nonce", "time", "sig")


def log_identity(public_key: bytes) -> str:
    """The identity a signed call names: the call log's origin, ``libvms:<base64url key>``."""
    return ledger_url(public_key)


def new_nonce() -> str:
    """A fresh nonce: 16 random bytes as base64url without padding (22 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(NONCE_BYTES)).rstrip(b"=").decode()


def _form_problem(user_id: object, method: object, nonce: object, time_ms: object) -> str | None:
    if not isinstance(user_id, str) or not user_id.startswith(USER_ID_PREFIX):
        return f"user id must be {USER_ID_PREFIX!r} followed by a public key"
    try:
        public_key_from_user_id(user_id)
    except ValueError as exc:
        return str(exc)
    if not isinstance(method, str) or not method:
        return "method must be a non-empty string"
    if not isinstance(nonce, str) or _NONCE_RE.fullmatch(nonce) is None:
        return "nonce must be 16 to 64 base64url characters"
    if (
        not isinstance(time_ms, int)
        or isinstance(time_ms, bool)
        or not 0 <= time_ms <= encoding.MAX_SAFE_INT
    ):
        return "time must be an integer number of milliseconds in 0..2^53-1"
    return None


def signed_message(
    log: str, user_id: str, method: str, args: Sequence[Any], nonce: str, time_ms: int
) -> bytes:
    """The exact bytes signed for one call (see the module docstring).

    Raises :class:`~libvms.errors.EncodingError` if ``args`` are not JSON values.
    """
    body = {
        "args": list(args),
        "log": log,
        "method": method,
        "nonce": nonce,
        "time": time_ms,
        "user": user_id,
    }
    return DOMAIN + encoding.canonical(body)


def _b64decode_signature(text: object) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != _SIGNATURE_SIZE or base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


@dataclass(frozen=True)
class SignedCall:
    """One signed request: who calls what with which arguments, for which log, and the signature.

    Build one with :func:`sign_call` (caller side), :meth:`from_wire` (host side)
    or :meth:`from_entry` (auditor side), then :meth:`verify` it.
    """

    log: str
    user_id: str
    method: str
    args: tuple[Any, ...]
    nonce: str
    time_ms: int
    signature: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        problem = _form_problem(self.user_id, self.method, self.nonce, self.time_ms)
        if problem is not None:
            raise ValueError(problem)
        if not isinstance(self.log, str) or not self.log:
            raise ValueError("log identity must be a non-empty string")
        if not isinstance(self.signature, bytes) or len(self.signature) != _SIGNATURE_SIZE:
            raise ValueError(f"a signature is {_SIGNATURE_SIZE} bytes")

    @property
    def public_key(self) -> bytes:
        """The caller's 32-byte Ed25519 public key, from the user id."""
        return public_key_from_user_id(self.user_id)

    def message(self) -> bytes:
        """The bytes the signature covers (:func:`signed_message`)."""
        return signed_message(
            self.log, self.user_id, self.method, self.args, self.nonce, self.time_ms
        )

    def verify(self) -> None:
        """Raise :class:`TamperError` unless the signature is the user's over :meth:`message`."""
        try:
            message = self.message()
        except EncodingError as exc:
            raise TamperError(f"signed call arguments are not JSON: {exc}") from exc
        if not verify_signature(self.public_key, message, self.signature):
            raise TamperError(
                f"the signature of {self.user_id} over {self.method!r} does not verify",
                where=self.user_id,
            )

    def entry_fields(self) -> dict[str, Any]:
        """What the host stores as ``call.signed`` in the log entry: nonce, time, signature."""
        return {
            "nonce": self.nonce,
            "time": self.time_ms,
            "sig": base64.b64encode(self.signature).decode("ascii"),
        }

    def to_wire(self) -> dict[str, Any]:
        """The ``signed`` member of a JSON-RPC request: user, log, nonce, time, signature."""
        return {"user": self.user_id, "log": self.log, **self.entry_fields()}

    @classmethod
    def _from_fields(cls, fields: object, names: tuple[str, ...], **known: Any) -> SignedCall:
        if not isinstance(fields, Mapping):
            raise ValueError("signed request must be a JSON object")
        extra = sorted(set(fields) - set(names))
        if extra:
            raise ValueError(f"unknown member {extra[0]!r} in signed request")
        missing = [n for n in names if n not in fields]
        if missing:
            raise ValueError(f"signed request has no {missing[0]!r}")
        signature = _b64decode_signature(fields["sig"])
        if signature is None:
            raise ValueError("sig must be the standard base64 of a 64-byte signature")
        values = {n: fields[n] for n in names if n != "sig"}
        values.update(known)
        time_ms = values["time"]
        if type(time_ms) is float and time_ms.is_integer():
            # JSON numbers are doubles: 1700000000000.0 is the time 1700000000000,
            # and canonical JSON signs it with that spelling.
            values["time"] = int(time_ms)
        return cls(
            log=values["log"],
            user_id=values["user"],
            method=values["method"],
            args=tuple(values["args"]),
            nonce=values["nonce"],
            time_ms=values["time"],
            signature=signature,
        )

    @classmethod
    def from_wire(cls, fields: object, method: str, args: Sequence[Any]) -> SignedCall:
        """The signed call a request carries: its ``signed`` member plus its method and params.

        Raises :class:`ValueError` if the member is malformed (the signature is not
        checked here; call :meth:`verify`).
        """
        return cls._from_fields(fields, _WIRE_FIELDS, method=method, args=args)

    @classmethod
    def from_entry(cls, entry: object, log: str) -> SignedCall | None:
        """The signed call recorded in a call entry, or ``None`` if the entry has none.

        Raises :class:`TamperError` if the entry holds a malformed one.
        """
        call = entry.get("call") if isinstance(entry, Mapping) else None
        if not isinstance(call, Mapping) or "signed" not in call:
            return None
        args = call.get("args")
        if not isinstance(args, list):
            raise TamperError("signed call entry has no argument list")
        try:
            return cls._from_fields(
                call["signed"],
                _ENTRY_FIELDS,
                log=log,
                user=call.get("userId"),
                method=call.get("methodName"),
                args=args,
            )
        except ValueError as exc:
            raise TamperError(f"malformed signed call in entry: {exc}") from exc


def sign_call(
    keypair: Keypair,
    log: str,
    method: str,
    args: Sequence[Any],
    *,
    time_ms: int,
    nonce: str | None = None,
) -> SignedCall:
    """Sign a call of ``method(*args)`` on the call log named ``log`` at ``time_ms``.

    A fresh random nonce is drawn unless ``nonce`` is given.
    """
    nonce = new_nonce() if nonce is None else nonce
    user_id = keypair.user_id
    problem = _form_problem(user_id, method, nonce, time_ms)
    if problem is not None:
        raise ValueError(problem)
    message = signed_message(log, user_id, method, args, nonce, time_ms)
    return SignedCall(log, user_id, method, tuple(args), nonce, time_ms, keypair.sign(message))


def _where(index: int | None) -> str | None:
    return None if index is None else str(index)


def verify_call_entry(
    entry: Any,
    log_public_key: bytes,
    *,
    index: int | None = None,
    max_skew_ms: int | None = None,
) -> SignedCall | None:
    """Re-verify the signed request recorded in one call-log entry.

    Returns the :class:`SignedCall` (or ``None`` for an entry that carries no
    signature legitimately: a non-call entry, or a call by a debug-mode user).
    Raises :class:`TamperError` if the signature does not verify for this log, if
    a call by a signed user id (``ed25519:...``) carries no signature, or, when
    ``max_skew_ms`` is given, if the signed time is further than that from the
    entry's ``call.timestamp``.
    """
    where = _where(index)
    if not isinstance(entry, Mapping) or entry.get("type") != "call":
        return None
    call = entry.get("call")
    if not isinstance(call, Mapping):
        raise TamperError("call entry has no call object", where=where)
    try:
        signed = SignedCall.from_entry(entry, log_identity(log_public_key))
    except TamperError as exc:
        raise TamperError(str(exc), where=where) from exc
    if signed is None:
        user_id = call.get("userId")
        if isinstance(user_id, str) and user_id.startswith(USER_ID_PREFIX):
            raise TamperError(f"call by signed user {user_id} carries no signature", where=where)
        return None
    try:
        signed.verify()
    except TamperError as exc:
        raise TamperError(str(exc), where=where) from exc
    if max_skew_ms is not None:
        timestamp = call.get("timestamp")
        if (
            not isinstance(timestamp, int)
            or isinstance(timestamp, bool)
            or abs(timestamp - signed.time_ms) > max_skew_ms
        ):
            raise TamperError(
                f"signed time {signed.time_ms} is more than {max_skew_ms} ms from the "
                f"entry's timestamp {timestamp!r}",
                where=where,
            )
    return signed


def check_nonces(entries: Iterable[Any], *, start: int = 0) -> None:
    """Raise :class:`TamperError` if two signed calls in ``entries`` share user and nonce.

    ``entries`` are parsed log entries, the first one at index ``start``; only
    their ``call.userId`` and ``call.signed.nonce`` are read (verify signatures
    with :func:`verify_call_entry`). A host that logged one signed request twice
    is caught here, whatever the time between the two.
    """
    seen: dict[tuple[str, str], int] = {}
    for index, entry in enumerate(entries, start):
        call = entry.get("call") if isinstance(entry, Mapping) else None
        signed = call.get("signed") if isinstance(call, Mapping) else None
        if not isinstance(signed, Mapping) or call is None:
            continue
        key = (str(call.get("userId")), str(signed.get("nonce")))
        first = seen.setdefault(key, index)
        if first != index:
            raise TamperError(
                f"entries {first} and {index} hold the same signed request "
                f"(user {key[0]}, nonce {key[1]})",
                where=str(index),
            )


@dataclass
class NonceTracker:
    """The host's memory of recent nonces, which refuses replayed requests.

    A request is acceptable when its time is within ``window_ms`` of the host's
    clock (the server checks that) and its (user, nonce) pair has not been seen.
    Pairs are remembered for ``2 * window_ms`` after their signed time, so a clock
    stepping back by up to one window cannot make a forgotten pair acceptable again.
    """

    window_ms: int = DEFAULT_WINDOW_MS
    _seen: set[tuple[str, str]] = field(default_factory=set, repr=False)
    _expiry: list[tuple[int, str, str]] = field(default_factory=list, repr=False)

    def seen(self, user_id: str, nonce: str) -> bool:
        """True iff this (user, nonce) pair is remembered."""
        return (user_id, nonce) in self._seen

    def reserve(self, user_id: str, nonce: str, time_ms: int, now_ms: int) -> bool:
        """Remember the pair; False (and nothing changes) if it was already remembered."""
        self.prune(now_ms)
        key = (user_id, nonce)
        if key in self._seen:
            return False
        self._seen.add(key)
        heapq.heappush(self._expiry, (time_ms + 2 * self.window_ms, user_id, nonce))
        return True

    def release(self, user_id: str, nonce: str) -> None:
        """Forget a pair whose request was refused before it was logged."""
        self._seen.discard((user_id, nonce))

    def prune(self, now_ms: int) -> None:
        """Forget pairs whose requests can no longer be accepted."""
        expiry = self._expiry
        while expiry and expiry[0][0] < now_ms:
            _, user_id, nonce = heapq.heappop(expiry)
            self._seen.discard((user_id, nonce))

    def __len__(self) -> int:
        return len(self._seen)


def verify_receipt(
    receipt_text: str | bytes | InclusionReceipt,
    entry_bytes: bytes,
    verifier_key: VerifierKey | str,
    *,
    verified: MutableMapping[str, Checkpoint] | None = None,
) -> Checkpoint:
    """Check that ``entry_bytes`` is in the log, as the receipt claims; return its checkpoint.

    The receipt is C2SP tlog-proof text (or its parsed form); its checkpoint must be signed by
    ``verifier_key`` (a :class:`~libvms.keys.VerifierKey` or its text) and its
    inclusion proof must lead from ``SHA-256(0x00 || entry_bytes)`` at the
    receipt's index to the checkpoint's root (RFC 9162 §2.1.3.2). Raises
    :class:`TamperError` otherwise.

    ``verified`` caches checkpoints already verified with this same key, by
    their signed note text, so a caller checking many receipts verifies each
    checkpoint signature once.
    """
    if isinstance(verifier_key, str):
        try:
            verifier_key = VerifierKey.parse(verifier_key)
        except ValueError as exc:
            raise TamperError(f"bad verifier key: {exc}") from exc
    if isinstance(receipt_text, InclusionReceipt):
        receipt = receipt_text
    else:
        receipt = InclusionReceipt.parse(receipt_text)
    checkpoint = None if verified is None else verified.get(receipt.checkpoint)
    if checkpoint is None:
        checkpoint = open_checkpoint(receipt.checkpoint, verifier_key)
        if verified is not None:
            verified[receipt.checkpoint] = checkpoint
    if receipt.index >= checkpoint.size:
        raise TamperError(
            f"receipt index {receipt.index} is not in the checkpoint's {checkpoint.size} entries",
            where=str(receipt.index),
        )
    merkle.verify_inclusion(
        merkle.leaf_hash(entry_bytes),
        receipt.index,
        checkpoint.size,
        receipt.proof,
        checkpoint.root_hash,
    )
    return checkpoint


_NO_RESULT: Any = object()


def check_entry_matches(
    entry_bytes: bytes,
    call: SignedCall,
    *,
    result: Any = _NO_RESULT,
    error: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Check that a receipt's entry records exactly this signed call and its outcome.

    ``entry_bytes`` must be canonical JSON of a call entry whose caller, method,
    arguments and ``call.signed`` are those of ``call``; its result must be
    ``result`` (the value the caller received: ``None`` also matches a call
    that returned nothing) or, with ``error``, the error ``(name, message)``.
    Returns the parsed entry; raises :class:`TamperError` on any difference.
    """
    try:
        entry = encoding.parse_canonical(entry_bytes)
    except EncodingError as exc:
        raise TamperError(f"receipt entry is not canonical JSON: {exc}") from exc
    if not isinstance(entry, dict) or entry.get("type") != "call":
        raise TamperError("receipt entry is not a call entry")
    recorded = SignedCall.from_entry(entry, call.log)
    if recorded is None:
        raise TamperError("receipt entry carries no signed request")
    same_fields = (recorded.user_id, recorded.method, recorded.nonce, recorded.time_ms) == (
        call.user_id,
        call.method,
        call.nonce,
        call.time_ms,
    )
    if (
        not same_fields
        or recorded.signature != call.signature
        or encoding.canonical(list(recorded.args)) != encoding.canonical(list(call.args))
    ):
        raise TamperError("receipt entry records another request than the one signed")
    outcome = entry.get("result")
    if not isinstance(outcome, dict):
        raise TamperError("receipt entry has no result")
    if error is not None:
        logged = outcome.get("err")
        if logged != {"name": error[0], "message": error[1]}:
            raise TamperError(f"receipt entry records error {logged!r}, not {error!r}")
        return entry
    if "err" in outcome:
        raise TamperError("receipt entry records an error, but the call returned a result")
    if result is not _NO_RESULT:
        expected = outcome.get("res")
        try:
            same = encoding.canonical(expected) == encoding.canonical(result)
        except EncodingError:
            same = False
        if not same:
            raise TamperError("receipt entry records another result than the one returned")
    return entry


@dataclass(frozen=True)
class CallReceipt:
    """What a signed caller keeps: the entry's canonical bytes and the tlog-proof text.

    Anyone holding the log's verifier key can check it later, offline, with
    :meth:`verify`; together with a checkpoint of the same log that does not
    contain the entry, it is evidence that the host forked its log.
    """

    entry: bytes
    text: str
    proof: InclusionReceipt = field(repr=False, compare=False)

    @property
    def index(self) -> int:
        """The entry's index in the call log."""
        return self.proof.index

    @classmethod
    def from_wire(cls, fields: object) -> CallReceipt:
        """Parse the ``receipt`` member of a reply; :class:`TamperError` if malformed."""
        if not isinstance(fields, Mapping):
            raise TamperError("receipt must be a JSON object")
        entry, text = fields.get("entry"), fields.get("proof")
        if not isinstance(entry, str) or not isinstance(text, str):
            raise TamperError("receipt must hold 'entry' and 'proof' strings")
        return cls(entry.encode("utf-8"), text, InclusionReceipt.parse(text))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"entry": <entry JSON text>, "proof": <tlog-proof text>}``."""
        return {"entry": self.entry.decode("utf-8"), "proof": self.text}

    def verify(
        self,
        verifier_key: VerifierKey | str,
        *,
        verified: MutableMapping[str, Checkpoint] | None = None,
    ) -> Checkpoint:
        """:func:`verify_receipt` of this receipt."""
        return verify_receipt(self.proof, self.entry, verifier_key, verified=verified)
