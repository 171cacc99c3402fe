"""Canonical JSON (RFC 8785) and hashing: the bytes every ledger hashes and signs.

Entries are JSON objects. We hash the canonical bytes, never a dict, because two
encoders may order keys or print numbers differently; RFC 8785 (JCS) fixes one
spelling so an auditor in any language computes the same hash.

Values JSON cannot carry exactly are rejected, never silently changed: NaN and
infinities, integers outside the IEEE-754 safe range, bytes, non-string keys,
nesting deeper than :data:`MAX_DEPTH`, and encodings larger than
:data:`MAX_ENTRY_BYTES`.
"""

from __future__ import annotations

import hashlib
import json
import json.scanner
from collections.abc import Callable
from typing import Any

import rfc8785

from .errors import EncodingError

#: Deepest nesting of arrays/objects accepted in any entry or message.
MAX_DEPTH = 64

#: Largest canonical encoding of one ledger entry, in bytes (8 MiB).
MAX_ENTRY_BYTES = 8 * 1024 * 1024

#: Largest integer JSON carries exactly (an IEEE-754 double's safe range is ±2^53-1).
MAX_SAFE_INT = 2**53 - 1


def _make_fast_dumps() -> Callable[[Any], str]:
    """Sorted, compact ``json`` encoding; the C encoder is built once when there is one.

    No circular-reference markers: :func:`check_value` runs first and bounds nesting.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C encoder
        return json.JSONEncoder(
            ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
        ).encode
    encode = make(None, None, json.encoder.encode_basestring, None, ":", ",", True, False, False)
    return lambda value: "".join(encode(value, 0))


_fast_dumps = _make_fast_dumps()


def check_value(value: Any, *, max_depth: int = MAX_DEPTH) -> bool:
    """Raise :class:`EncodingError` unless ``value`` is a JSON value canonical JSON can carry.

    Returns True when the value holds no floats and no object keys outside the
    Basic Multilingual Plane: then plain sorted ``json.dumps`` output is
    already RFC 8785 canonical (same escapes, same integer spelling, and key
    order by code point equals order by UTF-16 code unit).
    """
    return _check(value, max_depth)


_INF = float("inf")


def _check(item: Any, depth: int) -> bool:
    # Exact type checks first: this runs on every entry and message.
    kind = type(item)
    if kind is str:
        if item.isascii() or is_unicode(item):
            return True
        raise EncodingError("a string holds a lone surrogate, which UTF-8 cannot encode")
    if kind is bool or item is None:
        return True
    if kind is int:
        if -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
            return True
        raise EncodingError(f"integer {item} is outside the JSON safe range (±2^53-1)")
    if kind is dict:
        if depth <= 0:
            raise EncodingError(f"value is nested deeper than {MAX_DEPTH} levels")
        simple = True
        for key, x in item.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    raise EncodingError(f"object key {key!r} is not a string")
            elif not key.isascii():
                if not is_unicode(key):
                    raise EncodingError("an object key holds a lone surrogate")
                if max(key) > "\uffff":
                    simple = False
            if not _check(x, depth - 1):
                simple = False
        return simple
    if kind is list or kind is tuple:
        if depth <= 0:
            raise EncodingError(f"value is nested deeper than {MAX_DEPTH} levels")
        simple = True
        for x in item:
            if not _check(x, depth - 1):
                simple = False
        return simple
    if kind is float:
        if item != item or item == _INF or item == -_INF:
            raise EncodingError(f"{item} cannot be represented in JSON")
        return False
    # Subclasses of the JSON types (an IntEnum, a str subclass...) take the slow road.
    if isinstance(item, str):
        return _check(str.__str__(item), depth)
    if isinstance(item, int):
        return _check(int(item), depth)
    if isinstance(item, float):
        return _check(float(item), depth)
    if isinstance(item, dict):
        return _check(dict(item), depth)
    if isinstance(item, (list, tuple)):
        return _check(list(item), depth)
    raise EncodingError(f"{type(item).__name__} values cannot be represented in JSON")


def canonical(value: Any, *, max_bytes: int = MAX_ENTRY_BYTES) -> bytes:
    """Return the RFC 8785 canonical bytes of ``value``.

    Raises :class:`EncodingError` for anything JSON cannot carry exactly, or when
    the encoding is longer than ``max_bytes``.
    """
    try:
        simple = check_value(value)
    except RecursionError as exc:
        raise EncodingError(str(exc)) from exc
    return canonical_checked(value, simple, max_bytes=max_bytes)


def canonical_checked(value: Any, simple: bool, *, max_bytes: int = MAX_ENTRY_BYTES) -> bytes:
    """:func:`canonical` of a value built only from parts that :func:`check_value`
    accepted, and from strings, booleans and safe integers; ``simple`` is the
    ``and`` of what it returned for those parts. Saves walking them again."""
    try:
        data = _fast_dumps(value).encode("utf-8") if simple else rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, RecursionError, UnicodeEncodeError) as exc:
        raise EncodingError(str(exc)) from exc
    if len(data) > max_bytes:
        raise EncodingError(
            f"encoded value is {len(data)} bytes, more than the {max_bytes} allowed"
        )
    return data


def same_value(a: Any, b: Any) -> bool:
    """Whether two checked JSON values have the same canonical encoding, without encoding.

    Python's ``==`` almost decides it (key order never matters, and equal numbers
    print alike whether int or float), but it takes ``True`` for ``1``; this
    also requires booleans to meet booleans.
    """
    return bool(a == b) and _same_kinds(a, b)


def _same_kinds(a: Any, b: Any) -> bool:
    # Loops rather than all(): a replay checks every entry's result this way.
    kind = type(a)
    if kind is dict:
        if type(b) is not dict:
            return False
        for key, value in a.items():  # noqa: SIM110 - all() over a generator costs more
            if not _same_kinds(value, b[key]):
                return False
        return True
    if kind is list or kind is tuple:
        if type(b) is not list and type(b) is not tuple:
            return False
        for x, y in zip(a, b, strict=True):  # noqa: SIM110 - as above; a == b: same length
            if not _same_kinds(x, y):
                return False
        return True
    return (kind is bool) == (type(b) is bool)


def _reject_constant(name: str) -> Any:
    raise EncodingError(f"{name} is not valid JSON")


def json_number(text: str) -> int | float:
    """A JSON integer's value as JavaScript reads it: beyond the safe range, a double.

    For the ``parse_int`` hook of a ``json`` decoder. JSON numbers are IEEE-754
    doubles, and canonical JSON carries such a float exactly.
    """
    value = int(text)
    if -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        return value
    try:
        as_float = float(value)
    except OverflowError:
        raise EncodingError(f"the number {text[:20]}... is too large for JSON") from None
    _floats_parsed[0] += 1
    return as_float


def _float(text: str) -> float:
    value = float(text)
    if value == _INF or value == -_INF:
        raise EncodingError(f"the number {text[:20]} is too large for JSON")
    _floats_parsed[0] += 1
    return value


# How many floats the strict decoder has made, ever: a parse that leaves it
# unchanged made none (another thread's parse can only make a value look less simple).
_floats_parsed = [0]


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise EncodingError("JSON object has duplicate keys")
    return obj


# Built once: json.loads with options builds a new decoder on every call.
_strict_decode = json.JSONDecoder(
    parse_constant=_reject_constant,
    parse_int=json_number,
    parse_float=_float,
    object_pairs_hook=_unique_object,
).decode


def parse(data: bytes | str, *, max_bytes: int = MAX_ENTRY_BYTES) -> Any:
    """Parse JSON text strictly: no NaN/Infinity, no duplicate keys, bounded size and depth."""
    if len(data) > max_bytes:
        raise EncodingError(f"JSON text is {len(data)} bytes, more than the {max_bytes} allowed")
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        value = _strict_decode(text)
    except EncodingError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise EncodingError(f"invalid JSON: {exc}") from exc
    # The decoder refused what JSON cannot carry (NaN, infinities, duplicate keys)
    # and made numbers doubles. What is left: lone surrogates, which only a
    # non-ASCII text or a \u escape can hold, and the depth, which cannot exceed the
    # number of opening brackets. Most texts need no walk.
    if not text.isascii() or "\\u" in text or text.count("[") + text.count("{") > MAX_DEPTH:
        check_value(value)
    return value


def parse_verified(data: bytes) -> Any:
    """Parse bytes already known to be canonical JSON (a verified ledger entry).

    Numbers come back as :func:`parse` makes them: an integer outside the safe
    range (a double such as ``1e16``, which canonical JSON spells in digits) is
    a float, so the value encodes again to the same bytes.
    """
    text = data.decode("utf-8")
    scan = _scan_doubles if may_hold_unsafe_int(data) else _scan
    value, end = scan(text, 0)
    if end != len(text):  # pragma: no cover - canonical bytes hold one value and nothing else
        raise EncodingError("trailing data after the JSON value")
    return value


_DIGIT_MARKS = bytes.maketrans(b"0123456789", b"#" * 10)
_DIGIT_RUN = b"#" * 16


def may_hold_unsafe_int(data: bytes) -> bool:
    """Whether JSON text ``data`` may spell an integer outside the safe range.

    Such an integer has at least 16 digits (2^53 has 16), so a text without a
    run of 16 digits holds none: its integers parse with the plain ``int``, and
    the decoder need not call back into Python for each of them.
    """
    return len(data) >= 16 and _DIGIT_RUN in data.translate(_DIGIT_MARKS)


# The C scanners, built once: json.loads spends more time around them than in them.
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]  # typeshed types the context oddly
)
_scan_doubles: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder(parse_int=json_number)  # type: ignore[arg-type]
)


def parse_canonical(data: bytes, *, max_bytes: int = MAX_ENTRY_BYTES) -> Any:
    """Parse bytes that must already be canonical; anything else is an :class:`EncodingError`.

    Fetched entries go through here: a host cannot send two spellings of one entry.
    """
    floats = _floats_parsed[0]
    value = parse(data, max_bytes=max_bytes)
    # No float and no key outside the Basic Multilingual Plane (an ASCII text has
    # none): check_value would answer True, and need not walk the value to say so.
    if floats == _floats_parsed[0] and data.isascii():
        encoded = canonical_checked(value, True, max_bytes=max_bytes)
    else:
        encoded = canonical(value, max_bytes=max_bytes)
    if encoded != data:
        raise EncodingError("JSON text is not in RFC 8785 canonical form")
    return value


def is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode: no lone surrogate, so UTF-8 can encode it."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sha256(data: bytes) -> bytes:
    """SHA-256 digest of ``data``."""
    return hashlib.sha256(data).digest()


def sha256_hex(data: bytes) -> str:
    """SHA-256 digest of ``data`` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()
