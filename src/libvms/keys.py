"""Ed25519 keys, user ids, signed-note verifier keys and self-certifying ledger URLs.

One Ed25519 key pair names a user or a ledger; everything printable here is
derived from its 32-byte public key:

* **user id**: ``"ed25519:" + base64url-without-padding(public key)``, 51
  characters in all.
* **verifier key** (the text form used by C2SP signed notes,
  https://c2sp.org/signed-note): ``<name>+<key id as 8 hex digits>+<base64(0x01 ||
  public key)>``, where the key id is ``SHA-256(name || 0x0A || 0x01 || public
  key)[:4]``.
* **ledger URL**: ``"libvms:" + base64url-without-padding(public key)``, or, when
  the ledger can be fetched from somewhere, ``<http(s) base URL>#<same base64url>``.
  The key is the ledger's identity and the location is only a hint, so two URLs
  name the same ledger exactly when they carry the same key.

Private key file
----------------
:meth:`Keypair.save` writes a two-line ASCII file, created with mode 0600::

    libvms-ed25519-private-key-v1
    <standard base64 of the 32-byte Ed25519 seed>

Each line ends with a newline. :meth:`Keypair.load` accepts exactly that (the
final newline may be missing) and raises :class:`~libvms.errors.LibVMSError` for
anything else.

Errors: malformed user ids, verifier keys and ledger URLs raise
:class:`ValueError` (they come from configuration, not from a peer's ledger);
:func:`verify_signature` never raises, it returns ``False``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import LibVMSError

#: Lengths, in bytes, of an Ed25519 public key, private seed and signature (RFC 8032).
PUBLIC_KEY_SIZE = 32
SEED_SIZE = 32
SIGNATURE_SIZE = 64

#: Prefix of a user id in signed mode.
USER_ID_PREFIX = "ed25519:"

#: Scheme of a ledger URL that carries no location.
LEDGER_URL_SCHEME = "libvms"

#: Signature type byte of Ed25519 in C2SP signed notes.
ED25519_ALGORITHM = 0x01

#: First line of a private key file.
KEY_FILE_HEADER = "libvms-ed25519-private-key-v1"

_MAX_KEY_FILE_BYTES = 4096
_B64URL_KEY_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_HEX8_RE = re.compile(r"[0-9a-fA-F]{8}")


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_key(text: str) -> bytes | None:
    """Decode exactly 43 base64url characters (no padding) into a 32-byte key, canonically."""
    if _B64URL_KEY_RE.fullmatch(text) is None:
        return None
    raw = base64.urlsafe_b64decode(text + "=")
    # A 43-character encoding has two spare low bits; only the all-zero spelling is accepted.
    if _b64url(raw) != text:
        return None
    return raw


def _b64decode_strict(text: str) -> bytes | None:
    """Decode standard padded base64 (RFC 4648 §4), accepting only its canonical spelling."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


def _check_public_key(public_key: bytes) -> None:
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes")


@functools.lru_cache(maxsize=256)
def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a signed-note key name, or ``None`` if it can."""
    if not isinstance(name, str) or not name:
        return "key name must be a non-empty string"
    if "+" in name:
        return "key name must not contain '+'"
    for ch in name:
        if ch.isspace():
            return "key name must not contain spaces"
        if unicodedata.category(ch) in ("Cc", "Cs"):
            return "key name must not contain control characters"
    return None


def is_valid_key_name(name: str) -> bool:
    """True if ``name`` can name a signed-note key: non-empty, no '+', spaces or control chars."""
    return _name_problem(name) is None


class Keypair:
    """An Ed25519 signing key. Its ``repr`` never shows the private part."""

    __slots__ = ("_private", "_public")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self._public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Keypair:
        """A fresh key pair from the operating system's random source."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, seed: bytes) -> Keypair:
        """The key pair whose 32-byte raw Ed25519 seed is ``seed`` (RFC 8032 private key)."""
        if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
            raise ValueError(f"an Ed25519 seed is {SEED_SIZE} bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def private_bytes(self) -> bytes:
        """The 32-byte raw seed. Keep it secret."""
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> bytes:
        """The 32-byte raw public key."""
        return self._public

    @property
    def user_id(self) -> str:
        """The printable user id of this key (see :func:`user_id_for`)."""
        return user_id_for(self._public)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message`` (deterministic, RFC 8032)."""
        return self._private.sign(message)

    def __repr__(self) -> str:
        return f"Keypair({self.user_id})"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the seed to a new file at ``path`` with mode 0600.

        The file is created with that mode from the start, so it is never readable
        by others, and an existing file (or symlink) is never overwritten: that
        raises :class:`~libvms.errors.LibVMSError`.
        """
        where = os.fspath(path)
        seed = base64.b64encode(self.private_bytes).decode("ascii")
        data = f"{KEY_FILE_HEADER}\n{seed}\n".encode("ascii")
        flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(where, flags, 0o600)
        except FileExistsError as exc:
            raise LibVMSError(f"refusing to overwrite existing key file {where!r}") from exc
        except OSError as exc:
            raise LibVMSError(f"cannot create key file {where!r}: {exc}") from exc
        try:
            if hasattr(os, "fchmod"):
                # The umask can only have narrowed 0600; make the mode exactly 0600.
                os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(where)
            raise LibVMSError(f"cannot write key file {where!r}: {exc}") from exc
        os.close(fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keypair:
        """Read a key file written by :meth:`save`.

        Raises :class:`~libvms.errors.LibVMSError` if the file is missing,
        unreadable or not in the format described in this module's docstring.
        """
        where = os.fspath(path)
        try:
            with open(where, "rb") as f:
                data = f.read(_MAX_KEY_FILE_BYTES + 1)
        except FileNotFoundError as exc:
            raise LibVMSError(f"key file {where!r} does not exist") from exc
        except OSError as exc:
            raise LibVMSError(f"cannot read key file {where!r}: {exc}") from exc

        def corrupt(why: str) -> LibVMSError:
            return LibVMSError(f"key file {where!r} is not a libvms private key: {why}")

        if len(data) > _MAX_KEY_FILE_BYTES:
            raise corrupt("file is too large")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise corrupt("file is not ASCII text") from exc
        lines = text.removesuffix("\n").split("\n")
        if len(lines) != 2 or lines[0] != KEY_FILE_HEADER:
            raise corrupt(f"expected the line {KEY_FILE_HEADER!r} and one base64 line")
        seed = _b64decode_strict(lines[1])
        if seed is None or len(seed) != SEED_SIZE:
            raise corrupt(f"the second line is not the base64 of a {SEED_SIZE}-byte seed")
        return cls.from_private_bytes(seed)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``.

    Never raises for a malformed key or signature: those simply do not verify.
    """
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
        return False
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        return False
    if not isinstance(message, bytes):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def user_id_for(public_key: bytes) -> str:
    """The user id of ``public_key``: ``"ed25519:"`` + base64url without padding (43 chars)."""
    _check_public_key(public_key)
    return USER_ID_PREFIX + _b64url(public_key)


def public_key_from_user_id(user_id: str) -> bytes:
    """The public key named by a signed-mode user id; :class:`ValueError` if it is not one."""
    if not isinstance(user_id, str) or not user_id.startswith(USER_ID_PREFIX):
        raise ValueError(f"not a signed user id (expected {USER_ID_PREFIX!r} + key): {user_id!r}")
    key = _b64url_key(user_id[len(USER_ID_PREFIX) :])
    if key is None:
        raise ValueError(f"user id does not carry a 32-byte base64url key: {user_id!r}")
    return key


def is_signed_user_id(user_id: str) -> bool:
    """True iff ``user_id`` is a well-formed signed-mode user id."""
    try:
        public_key_from_user_id(user_id)
    except ValueError:
        return False
    return True


def key_id(name: str, public_key: bytes) -> bytes:
    """The 4-byte signed-note key id: ``SHA-256(name || 0x0A || 0x01 || public key)[:4]``."""
    _check_public_key(public_key)
    digest = hashlib.sha256(
        name.encode("utf-8") + b"\n" + bytes([ED25519_ALGORITHM]) + public_key
    ).digest()
    return digest[:4]


@dataclass(frozen=True)
class VerifierKey:
    """A named Ed25519 public key that verifies signed notes (https://c2sp.org/signed-note)."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        problem = _name_problem(self.name)
        if problem is not None:
            raise ValueError(f"{problem}: {self.name!r}")
        _check_public_key(self.public_key)

    @property
    def key_id(self) -> bytes:
        """The 4-byte key id that signature lines by this key carry."""
        return key_id(self.name, self.public_key)

    def to_text(self) -> str:
        """``<name>+<8 hex digits of key id>+<base64(0x01 || public key)>``."""
        material = base64.b64encode(bytes([ED25519_ALGORITHM]) + self.public_key)
        return f"{self.name}+{self.key_id.hex()}+{material.decode('ascii')}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        """Parse :meth:`to_text` output.

        Raises :class:`ValueError` for a bad name, a key id that is not 8 hex
        digits or does not match the key, bad base64, a signature type other than
        Ed25519 (0x01) or a key that is not 32 bytes.
        """
        if not isinstance(text, str):
            raise ValueError("a verifier key is a string")
        parts = text.split("+", 2)  # base64 may itself contain '+'; name and id may not
        if len(parts) != 3:
            raise ValueError(f"verifier key is not <name>+<key id>+<key>: {text!r}")
        name, hex_id, material_b64 = parts
        problem = _name_problem(name)
        if problem is not None:
            raise ValueError(f"{problem}: {name!r}")
        if _HEX8_RE.fullmatch(hex_id) is None:
            raise ValueError(f"verifier key id is not 8 hex digits: {hex_id!r}")
        material = _b64decode_strict(material_b64)
        if material is None or not material:
            raise ValueError("verifier key material is not valid base64")
        if material[0] != ED25519_ALGORITHM:
            raise ValueError(f"unsupported verifier key algorithm 0x{material[0]:02x}")
        if len(material) != 1 + PUBLIC_KEY_SIZE:
            raise ValueError(f"an Ed25519 verifier key is {PUBLIC_KEY_SIZE} bytes")
        key = cls(name, material[1:])
        if key.key_id != bytes.fromhex(hex_id):
            raise ValueError(f"verifier key id {hex_id} does not match its name and key")
        return key

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True iff ``signature`` is this key's Ed25519 signature of ``message``."""
        return verify_signature(self.public_key, message, signature)


def verifier_key_text(name: str, public_key: bytes) -> str:
    """The verifier key text of ``public_key`` under ``name`` (see :class:`VerifierKey`)."""
    return VerifierKey(name, public_key).to_text()


def _check_location(location: str) -> None:
    if not isinstance(location, str):
        raise ValueError("a ledger location is a string")
    if "#" in location:
        raise ValueError(f"a ledger location must not have a fragment: {location!r}")
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs") for ch in location):
        raise ValueError(
            f"a ledger location must not contain spaces or control chars: {location!r}"
        )
    parts = urlsplit(location)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"a ledger location is an http(s) URL with a host: {location!r}")


def ledger_url(public_key: bytes, location: str | None = None) -> str:
    """The self-certifying URL of the ledger whose key is ``public_key``.

    Without ``location``: ``libvms:<base64url key>``. With it (an http or https
    URL of the ledger's base, without fragment): ``<location>#<base64url key>``.
    """
    _check_public_key(public_key)
    if location is None:
        return f"{LEDGER_URL_SCHEME}:{_b64url(public_key)}"
    _check_location(location)
    return f"{location}#{_b64url(public_key)}"


def parse_ledger_url(url: str) -> tuple[str | None, bytes]:
    """Split a ledger URL into ``(location or None, public key)``.

    Raises :class:`ValueError` for other schemes, an http(s) URL without the
    ``#key`` fragment, or a key that is not 43 base64url characters (32 bytes).
    """
    if not isinstance(url, str):
        raise ValueError("a ledger URL is a string")
    scheme, colon, rest = url.partition(":")
    if colon and scheme.lower() == LEDGER_URL_SCHEME:
        key = _b64url_key(rest)
        if key is None:
            raise ValueError(f"ledger URL does not carry a 32-byte base64url key: {url!r}")
        return None, key
    if colon and scheme.lower() in ("http", "https"):
        location, hash_sign, fragment = url.partition("#")
        if not hash_sign:
            raise ValueError(f"ledger URL has no #key fragment: {url!r}")
        _check_location(location)
        key = _b64url_key(fragment)
        if key is None:
            raise ValueError(f"ledger URL fragment is not a 32-byte base64url key: {url!r}")
        return location, key
    raise ValueError(f"not a ledger URL (libvms:, http: or https:): {url!r}")


def same_ledger(url_a: str, url_b: str) -> bool:
    """True iff both URLs are well-formed ledger URLs naming the same public key.

    Locations are ignored: they are hints, the key is the identity. A malformed
    URL names no ledger, so the answer is then ``False``.
    """
    try:
        _, key_a = parse_ledger_url(url_a)
        _, key_b = parse_ledger_url(url_b)
    except ValueError:
        return False
    return key_a == key_b


__all__ = [
    "ED25519_ALGORITHM",
    "KEY_FILE_HEADER",
    "LEDGER_URL_SCHEME",
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "SIGNATURE_SIZE",
    "USER_ID_PREFIX",
    "Keypair",
    "VerifierKey",
    "is_signed_user_id",
    "is_valid_key_name",
    "key_id",
    "ledger_url",
    "parse_ledger_url",
    "public_key_from_user_id",
    "same_ledger",
    "verifier_key_text",
    "verify_signature",
]
