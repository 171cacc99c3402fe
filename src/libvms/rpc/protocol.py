"""The libvms wire protocol as values: JSON-RPC 2.0 messages, error codes, handshake, HTTP bodies.

Nothing here touches a socket: the server and the client parse what they
receive and build what they send with these functions, so every rule of the
protocol lives in one place. ``docs/protocol.md`` is the prose version.

Requests (https://www.jsonrpc.org/specification, section 4) may carry two
members beyond the specification's, both optional:

* ``user``: the caller's user id in debug mode (a string, taken on trust);
* ``signed``: a signed request (see :mod:`libvms.signed`).

Batches (a JSON array of requests) are refused with ``-32600``: every call is
its own message, and the server still runs concurrent messages together.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from .. import encoding
from ..errors import (
    EncodingError,
    LibVMSError,
    LimitExceeded,
    QueueFullError,
    RPCError,
    TamperError,
    VMCallError,
)
from ..keys import VerifierKey, ledger_url, parse_ledger_url

__all__ = [
    "HANDSHAKE",
    "JSONRPC_VERSION",
    "MAX_ENTRIES_PER_PAGE",
    "MAX_MESSAGE_BYTES",
    "MAX_PAGE_BYTES",
    "PROTOCOL",
    "BackendInfo",
    "ErrorCode",
    "Rejection",
    "Request",
    "RequestId",
    "Response",
    "error_text",
    "exception_for",
    "format_entries",
    "format_proof",
    "parse_entries",
    "parse_proof",
    "parse_request",
    "parse_response",
    "request_text",
    "result_text",
]

#: Protocol name and version a server announces in its handshake.
PROTOCOL = "libvms/1"

#: The ``jsonrpc`` member every message carries.
JSONRPC_VERSION = "2.0"

#: Name of the method that describes a VM; never forwarded to the script.
HANDSHAKE = "handshake"


def rpc_methods(methods: Sequence[str]) -> list[str]:
    """The VM methods callable over RPC, in order: all but ``handshake``, which the
    protocol itself answers. The handshake announces exactly these."""
    return [m for m in methods if m != HANDSHAKE]


#: Default bound on one WebSocket message, in bytes (1 MiB).
MAX_MESSAGE_BYTES = 1024 * 1024

#: Most entries one ``entries`` page holds.
MAX_ENTRIES_PER_PAGE = 1000

#: Most bytes one ``entries`` page holds, unless its first entry alone is larger.
MAX_PAGE_BYTES = 4 * 1024 * 1024

#: Longest debug-mode user id accepted, in characters.
MAX_USER_ID = 256

RequestId = str | int | None

_REQUEST_MEMBERS = frozenset({"jsonrpc", "id", "method", "params", "user", "signed"})
_RESPONSE_MEMBERS = frozenset({"jsonrpc", "id", "result", "error", "receipt"})


class ErrorCode(IntEnum):
    """JSON-RPC error codes: the specification's five, then libvms's in -32000..-32099."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    #: The script threw; the call is logged. ``data``: the error's ``name`` and ``message``.
    SCRIPT_ERROR = -32000
    #: The call ran past its time or memory limit and was aborted; the abort is logged.
    LIMIT_EXCEEDED = -32001
    #: Too many calls are queued for this VM; nothing was logged, try again later.
    QUEUE_FULL = -32002
    #: The signed request is malformed, signed for another log, or its signature is bad.
    BAD_SIGNATURE = -32003
    #: The signed request's nonce was already used by this user.
    NONCE_REUSED = -32004
    #: The signed request's time is too far from the server's clock.
    STALE_REQUEST = -32005
    #: This caller may not call: unsigned calls are refused, or the user id needs a signature.
    CALLER_REFUSED = -32006
    #: The VM cannot take calls now (closed, unmounted, or its storage failed).
    UNAVAILABLE = -32010


_ERROR_NAMES: dict[int, str] = {
    ErrorCode.PARSE_ERROR: "ParseError",
    ErrorCode.INVALID_REQUEST: "InvalidRequest",
    ErrorCode.METHOD_NOT_FOUND: "MethodNotFound",
    ErrorCode.INVALID_PARAMS: "InvalidParams",
    ErrorCode.INTERNAL_ERROR: "InternalError",
    ErrorCode.QUEUE_FULL: "QueueFullError",
    ErrorCode.BAD_SIGNATURE: "BadSignature",
    ErrorCode.NONCE_REUSED: "NonceReused",
    ErrorCode.STALE_REQUEST: "StaleRequest",
    ErrorCode.CALLER_REFUSED: "CallerRefused",
    ErrorCode.UNAVAILABLE: "Unavailable",
}


def error_name(code: int) -> str:
    """The ``data.name`` sent with a protocol error of this code."""
    return _ERROR_NAMES.get(code, "Error")


# One encoder for every message: ``json.dumps`` with options builds a new one per
# call, which costs more than encoding a small reply.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


# --- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A well-formed request. ``id`` is absent (and ``notification`` true) for notifications."""

    id: RequestId
    method: str
    params: list[Any]
    user: str | None = None
    signed: dict[str, Any] | None = None
    notification: bool = False


@dataclass(frozen=True)
class Rejection:
    """A message refused before it reached a VM, and the error reply it gets."""

    id: RequestId
    code: int
    message: str
    notification: bool = False

    def to_text(self) -> str:
        """The JSON-RPC error reply."""
        return error_text(self.id, self.code, self.message)


def _valid_id(value: object) -> bool:
    if value is None or isinstance(value, str):
        return True
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and abs(value) <= encoding.MAX_SAFE_INT
    )


def parse_request(data: str | bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Request | Rejection:
    """Parse one request message, or say which error it gets.

    Rules, in order: strict JSON within ``max_bytes`` and
    :data:`~libvms.encoding.MAX_DEPTH` levels (else -32700); not an array (batches
    are refused, -32600); an object whose ``id``, if present, is a string, an
    integer or null, with ``"jsonrpc": "2.0"``, a non-empty string ``method`` and no
    members but ``jsonrpc, id, method, params, user, signed`` (else -32600);
    ``params`` absent, null (read as absent, as clients of the seed send it) or an
    array (an object is -32602, anything else -32600);
    ``user`` absent, null or a string of 1 to :data:`MAX_USER_ID` characters, and
    ``signed`` absent or an object (else -32600).
    """
    try:
        obj = encoding.parse(data, max_bytes=max_bytes)
    except EncodingError as exc:
        return Rejection(None, ErrorCode.PARSE_ERROR, f"parse error: {exc}")
    if isinstance(obj, list):
        return Rejection(
            None,
            ErrorCode.INVALID_REQUEST,
            "batch requests are not supported: send each request as its own message",
        )
    if not isinstance(obj, dict):
        return Rejection(None, ErrorCode.INVALID_REQUEST, "a request must be a JSON object")
    notification = "id" not in obj
    request_id = obj.get("id")
    if not _valid_id(request_id):
        return Rejection(
            None, ErrorCode.INVALID_REQUEST, "request id must be a string, an integer or null"
        )

    def reject(code: int, message: str) -> Rejection:
        return Rejection(request_id, code, message, notification)

    if obj.get("jsonrpc") != JSONRPC_VERSION:
        return reject(ErrorCode.INVALID_REQUEST, 'request must have "jsonrpc": "2.0"')
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        return reject(ErrorCode.INVALID_REQUEST, "request method must be a non-empty string")
    if not obj.keys() <= _REQUEST_MEMBERS:
        unknown = sorted(set(obj) - _REQUEST_MEMBERS)
        return reject(ErrorCode.INVALID_REQUEST, f"unknown request member {unknown[0]!r}")
    params = obj.get("params")
    if params is None:
        params = []
    if isinstance(params, dict):
        return reject(ErrorCode.INVALID_PARAMS, "params must be an array of positional arguments")
    if not isinstance(params, list):
        return reject(ErrorCode.INVALID_REQUEST, "params must be an array")
    user = obj.get("user")
    if user is not None and (not isinstance(user, str) or not 0 < len(user) <= MAX_USER_ID):
        return reject(
            ErrorCode.INVALID_REQUEST, f"user must be a string of 1 to {MAX_USER_ID} characters"
        )
    signed = obj.get("signed")
    if signed is not None and not isinstance(signed, dict):
        return reject(ErrorCode.INVALID_REQUEST, "signed must be an object")
    return Request(request_id, method, params, user, signed, notification)


def request_text(
    request_id: RequestId,
    method: str,
    params: Sequence[Any] = (),
    *,
    user: str | None = None,
    signed: Mapping[str, Any] | None = None,
) -> str:
    """A request message. Raises :class:`~libvms.errors.EncodingError` for non-JSON params."""
    params = list(params)
    encoding.check_value(params)
    if user is not None:
        encoding.check_value(user)  # a lone surrogate (say, from an undecodable argv)
    message: dict[str, Any] = {
        "jsonrpc": JSONRPC_VERSION,
        "id": request_id,
        "method": method,
        "params": params,
    }
    if user is not None:
        message["user"] = user
    if signed is not None:
        message["signed"] = dict(signed)
    return _dumps(message)


# --- responses ---------------------------------------------------------------------------------


def result_text(
    request_id: RequestId, result: Any, *, receipt: Mapping[str, Any] | None = None
) -> str:
    """A success reply; a signed call's reply also carries its ``receipt``."""
    if receipt is None:
        # The common case, spelled out: the same text as encoding the whole object.
        return f'{{"jsonrpc":"2.0","id":{_dumps(request_id)},"result":{_dumps(result)}}}'
    message: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "id": request_id, "result": result}
    message["receipt"] = dict(receipt)
    return _dumps(message)


def error_text(
    request_id: RequestId,
    code: int,
    message: str,
    data: Any = None,
    *,
    receipt: Mapping[str, Any] | None = None,
) -> str:
    """An error reply. ``data`` defaults to ``{"name", "message"}`` for the code."""
    if data is None:
        data = {"name": error_name(code), "message": message}
    error = {"code": int(code), "message": message, "data": data}
    reply: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "id": request_id, "error": error}
    if receipt is not None:
        reply["receipt"] = dict(receipt)
    return _dumps(reply)


@dataclass(frozen=True)
class Response:
    """A reply: ``result``, or ``error`` as the exception it stands for, and a ``receipt``."""

    id: RequestId
    result: Any = None
    error: LibVMSError | None = None
    receipt: dict[str, Any] | None = None


def exception_for(code: int, message: str, data: Any = None) -> LibVMSError:
    """The exception a client raises for an error reply.

    ``-32000`` is a :class:`~libvms.errors.VMCallError` and ``-32001`` a
    :class:`~libvms.errors.LimitExceeded`, both with the logged name and
    message; ``-32002`` is a :class:`~libvms.errors.QueueFullError`; every
    other code is an :class:`~libvms.errors.RPCError`.
    """
    name = data.get("name") if isinstance(data, dict) else None
    detail = data.get("message") if isinstance(data, dict) else None
    if code in (ErrorCode.SCRIPT_ERROR, ErrorCode.LIMIT_EXCEEDED) and isinstance(name, str):
        text = detail if isinstance(detail, str) else message
        if code == ErrorCode.LIMIT_EXCEEDED:
            return LimitExceeded(name, text)
        return VMCallError(name, text)
    if code == ErrorCode.QUEUE_FULL:
        return QueueFullError(detail if isinstance(detail, str) else message)
    return RPCError(code, message, data)


def parse_response(data: str | bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Response:
    """Parse one reply; :class:`ValueError` if it is not a JSON-RPC 2.0 response."""
    try:
        obj = encoding.parse(data, max_bytes=max_bytes)
    except EncodingError as exc:
        raise ValueError(f"reply is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("jsonrpc") != JSONRPC_VERSION:
        raise ValueError('reply is not a JSON-RPC 2.0 object (no "jsonrpc": "2.0")')
    if "id" not in obj or not _valid_id(obj["id"]):
        raise ValueError("reply has no valid id")
    if not obj.keys() <= _RESPONSE_MEMBERS:
        unknown = sorted(set(obj) - _RESPONSE_MEMBERS)
        raise ValueError(f"unknown reply member {unknown[0]!r}")
    receipt = obj.get("receipt")
    if receipt is not None and not isinstance(receipt, dict):
        raise ValueError("reply receipt must be an object")
    if ("result" in obj) == ("error" in obj):
        raise ValueError("reply must have exactly one of result and error")
    if "result" in obj:
        return Response(obj["id"], obj["result"], None, receipt)
    error = obj["error"]
    if not isinstance(error, dict):
        raise ValueError("reply error must be an object")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(message, str):
        raise ValueError("reply error must have an integer code and a string message")
    return Response(obj["id"], None, exception_for(code, message, error.get("data")), receipt)


# --- handshake ---------------------------------------------------------------------------------

_INFO_FIELDS = {
    "methods": "methods",
    "call_log_url": "callLogUrl",
    "files_archive_url": "filesArchiveUrl",
    "call_log_key": "callLogKey",
    "files_archive_key": "filesArchiveKey",
    "protocol": "protocol",
}
_CAMEL_TO_SNAKE = {camel: snake for snake, camel in _INFO_FIELDS.items()}


def _check_ledger(url: object, key_text: object, what: str) -> VerifierKey:
    if not isinstance(url, str):
        raise ValueError(f"{what} URL is missing")
    if not isinstance(key_text, str):
        raise ValueError(f"{what} key is missing")
    try:
        _, public_key = parse_ledger_url(url)
        key = VerifierKey.parse(key_text)
    except ValueError as exc:
        raise ValueError(f"bad {what}: {exc}") from exc
    if key.public_key != public_key or key.name != ledger_url(public_key):
        raise ValueError(f"the {what} key does not match the key in its URL")
    return key


@dataclass(frozen=True)
class BackendInfo:
    """What a server says about the VM at a path, checked for consistency.

    Readable as attributes (``info.files_archive_url``) or as a mapping, under
    either spelling (``info["files_archive_url"]``, ``info["filesArchiveUrl"]``).
    """

    methods: list[str]
    call_log_url: str
    files_archive_url: str
    call_log_key: str
    files_archive_key: str
    protocol: str = PROTOCOL

    @classmethod
    def from_handshake(cls, result: Any) -> BackendInfo:
        """Check a handshake result; :class:`ValueError` says what is wrong with it.

        The protocol must be :data:`PROTOCOL`, ``methods`` a list of distinct
        strings, and each URL a ledger URL whose key is the key given for it.
        """
        if not isinstance(result, dict):
            raise ValueError("handshake result is not an object")
        protocol = result.get("protocol")
        if protocol != PROTOCOL:
            raise ValueError(f"unsupported protocol {protocol!r} (expected {PROTOCOL!r})")
        methods = result.get("methods")
        if (
            not isinstance(methods, list)
            or not all(isinstance(m, str) and m for m in methods)
            or len(set(methods)) != len(methods)
        ):
            raise ValueError("handshake methods must be a list of distinct names")
        _check_ledger(result.get("callLogUrl"), result.get("callLogKey"), "call log")
        _check_ledger(result.get("filesArchiveUrl"), result.get("filesArchiveKey"), "files archive")
        return cls(
            methods=list(methods),
            call_log_url=result["callLogUrl"],
            files_archive_url=result["filesArchiveUrl"],
            call_log_key=result["callLogKey"],
            files_archive_key=result["filesArchiveKey"],
            protocol=protocol,
        )

    def to_handshake(self) -> dict[str, Any]:
        """The handshake result, with the protocol's camelCase names."""
        return {camel: getattr(self, snake) for snake, camel in _INFO_FIELDS.items()}

    @property
    def call_log_public_key(self) -> bytes:
        """The call log's 32-byte public key (its identity)."""
        return parse_ledger_url(self.call_log_url)[1]

    @property
    def call_log_verifier(self) -> VerifierKey:
        """The key that verifies the call log's checkpoints."""
        return VerifierKey.parse(self.call_log_key)

    def __getitem__(self, name: str) -> Any:
        snake = _CAMEL_TO_SNAKE.get(name, name)
        if snake not in _INFO_FIELDS:
            raise KeyError(name)
        return getattr(self, snake)

    def __contains__(self, name: object) -> bool:
        return name in _INFO_FIELDS or name in _CAMEL_TO_SNAKE

    def get(self, name: str, default: Any = None) -> Any:
        """Like :meth:`dict.get`, under either spelling."""
        try:
            return self[name]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        """The snake_case field names."""
        return list(_INFO_FIELDS)


# --- HTTP bodies -------------------------------------------------------------------------------


def format_proof(hashes: Iterable[bytes]) -> bytes:
    """A proof body: the standard base64 of each hash, one per line, each ending in LF."""
    return b"".join(base64.b64encode(h) + b"\n" for h in hashes)


def parse_proof(body: bytes, *, max_hashes: int = 64) -> list[bytes]:
    """Parse :func:`format_proof` output; :class:`TamperError` if malformed."""
    if not body:
        return []
    if not body.endswith(b"\n"):
        raise TamperError("proof body is truncated (no final newline)")
    lines = body[:-1].split(b"\n")
    if len(lines) > max_hashes:
        raise TamperError(f"proof has more than {max_hashes} hashes")
    out: list[bytes] = []
    for line in lines:
        try:
            raw = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TamperError("proof line is not base64") from exc
        if len(raw) != 32 or base64.b64encode(raw) != line:
            raise TamperError("proof line is not the canonical base64 of a 32-byte hash")
        out.append(raw)
    return out


def format_entries(entries: Iterable[bytes]) -> bytes:
    """An entries body: each entry's canonical JSON followed by LF (RFC 8785 has no raw LF)."""
    return b"".join(e + b"\n" for e in entries)


def parse_entries(body: bytes, *, most: int) -> list[bytes]:
    """Split an entries body into entries; :class:`TamperError` if truncated or too long.

    Entries are returned as sent: the caller checks that they are canonical and
    that they hash to a signed checkpoint.
    """
    if not body:
        return []
    if not body.endswith(b"\n"):
        raise TamperError("entries body is truncated (no final newline)")
    entries = body[:-1].split(b"\n")
    if len(entries) > most:
        raise TamperError(f"server sent {len(entries)} entries, more than the {most} asked for")
    return entries
