"""The JavaScript runtime of a VM: QuickJS (quickjs-ng), made deterministic.

A :class:`JSRuntime` owns one QuickJS context. A prelude (``prelude.js``) is
evaluated first; it replaces every source of non-determinism (clock, timers,
``Math.random``, host time zone) with virtual, host-driven equivalents, removes
host-specific globals, and keeps a private bridge to the host in a closure. The
script is then evaluated as a CommonJS module body.

Determinism rules (what a replay on any machine relies on):

* The host drives the event loop itself (:meth:`JSRuntime.call`): it runs every
  pending job, then serves the script's host requests one at a time in the order
  they were made, and only when nothing else can run and the call's promise is
  still pending does it fire the next virtual timer, ordered by (deadline,
  creation order), advancing the virtual clock to its deadline. Real time is
  never read by the script and never slept on.
* Timers do not outlive their call: once the call's promise has settled and its
  remaining jobs and requests are drained, every timer left is cleared. Timers
  created while the script loads never fire.
* ``Date`` is UTC-only and reads the virtual clock (the call's ``timestamp_ms``
  plus the virtual time timers advanced). ``Math.random`` is xoshiro128** whose
  state is ``SHA-256(seed)[0:16]`` as four little-endian uint32, reseeded at load
  and at the start of every call.
* Results are serialised in JS by a strict encoder: ``undefined`` object members
  are dropped as JSON.stringify does, but anything JSON would silently change
  (NaN, Infinity, BigInt, functions, symbols, ``undefined`` in arrays, cycles,
  Maps, Sets, binary data, errors, lone surrogates, nesting deeper than
  :data:`libvms.encoding.MAX_DEPTH`) makes the call fail with ``EncodingError``.
* A thrown Error gives ``(error.name, error.message)``; any other thrown value
  gives ``("Error", String(value))``. Lone surrogates in either are replaced
  by U+FFFD.

* Requests the script makes while it loads are rejected (``UnavailableError``):
  there is no host then. Errors thrown by timer callbacks and microtasks are
  logged to the console and do not end the call, except the machine's limits
  (out of memory, a string too long, a stack overflow, a thrown ``null``),
  which end it as if the call itself had thrown them: swallowed, they would
  let a run under other limits go on to another result.

No Python callable is ever exposed to the script: the quickjs wrapper cannot
combine them with its time limit, and an exception inside one poisons the
interpreter. All traffic goes through JSON strings passed to one JS dispatcher
function that only the host holds; it is never stored on ``globalThis``.

Limits. ``call_timeout`` bounds a whole call (or load), host awaits included: a
wall-clock deadline is checked between JS steps, and every step runs under the
engine's time limit set to what is left. That engine limit counts the process's
CPU time (C ``clock()``), so busy threads elsewhere in the process make it fire
sooner. The engine reports it as an uncatchable ``InternalError: interrupted``.
Out of memory and stack overflow surface as ordinary JS errors
(``InternalError: out of memory``, ``RangeError: Maximum call stack size
exceeded``) that a script can catch; when one ends a call or load uncaught it
becomes :class:`LimitExceeded`. Where they strike depends on the machine, so a
script that catches them may replay differently. After any
:class:`LimitExceeded` the runtime is :attr:`JSRuntime.broken`: build a new one.

Threading: the quickjs wrapper releases the GIL while JS runs, but one context
must only ever be used from one thread (the wrapper's own documentation reports
crashes otherwise), so use a :class:`JSRuntime` from the thread that created it,
one call at a time. JS runs synchronously inside :meth:`JSRuntime.call` and
blocks the event loop while it runs (at most ``call_timeout`` per call).
"""

from __future__ import annotations

import _locale
import base64
import hashlib
import importlib.metadata
import importlib.resources
import json
import json.encoder
import json.scanner
import locale
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import quickjs

from ..encoding import (
    MAX_DEPTH,
    MAX_SAFE_INT,
    canonical,
    is_unicode,
    json_number,
    may_hold_unsafe_int,
)
from ..errors import EncodingError, LimitExceeded, ScriptError, VMCallError

__all__ = [
    "ENGINE_NAME",
    "ENGINE_VERSION",
    "MAX_CALL_TIMEOUT",
    "MAX_MEMORY_LIMIT",
    "PRELUDE_VERSION",
    "SUPPORTED_PRELUDE_VERSIONS",
    "CallOutcome",
    "HostError",
    "HostHandler",
    "JSRuntime",
    "check_limits",
]

#: The JavaScript engine, as recorded with a VM.
ENGINE_NAME = "quickjs-ng"

#: Version of the installed quickjs-ng package.
ENGINE_VERSION: str = importlib.metadata.version("quickjs-ng")

#: Version of the prelude's observable behaviour. Bump it whenever a script could
#: see a difference (globals, Date formatting, PRNG, timer order, encodings...).
PRELUDE_VERSION = "3"

#: The behaviour versions a runtime can run: a log keeps the one it was begun
#: with (its init entry's ``runtime.prelude``), so that it replays as it ran.
SUPPORTED_PRELUDE_VERSIONS = ("2", "3")

#: Largest memory limit accepted (256 TiB): past it the limit is no limit at all.
MAX_MEMORY_LIMIT = 2**48

#: Largest call_timeout accepted, in seconds (about 11.6 days): the engine's own
#: time limit overflows far beyond it.
MAX_CALL_TIMEOUT = 1e6

#: Console lines kept per call (or load); further lines are dropped with a note.
MAX_LOG_LINES = 1000

#: Longest console line kept, in characters; longer lines are cut.
MAX_LOG_CHARS = 10_000

HostHandler = Callable[[str, list[Any]], Awaitable[Any]]
"""``await host(op, args)`` serves one request of the script.

``op`` is one of ``files.getInfo``, ``files.stat``, ``files.readFile``,
``files.readdir``, ``files.writeFile``, ``files.mkdir``, ``files.unlink``,
``files.rmdir``, ``files.history`` or ``oracle``. ``args`` and the result are
JSON values in which binary data is Python ``bytes``. Raise :class:`HostError`
to reject the script's promise; any other exception is a host bug: it propagates
out of :meth:`JSRuntime.call` and leaves the runtime broken.

Arguments per op (trailing ``undefined`` arguments are dropped):

* ``files.readFile``: ``[path, encoding]`` with encoding one of ``"utf8"``,
  ``"binary"``, ``"base64"``, ``"hex"``; return ``str`` (``bytes`` for binary).
* ``files.writeFile``: ``[path, data, encoding]``: ``data`` is ``bytes`` with
  encoding ``"binary"``, else ``str`` with ``"utf8"``, ``"base64"`` or ``"hex"``.
* ``files.stat``: ``[path]``; return an object with ``size``, ``mtime`` (ms since
  the epoch, or an ISO string) and ``type`` (``"file"``/``"directory"``) or a
  boolean ``isDirectory``/``isFile``. The script gets an object with the same
  fields (``mtime``/``ctime`` as Dates) and ``isFile()``/``isDirectory()``.
* ``files.readdir``: ``[path]`` or ``[path, opts]``; entries that are objects with
  a ``stat`` object get it converted like ``files.stat``'s result.
* ``files.getInfo``, ``files.mkdir``, ``files.unlink``, ``files.rmdir``,
  ``files.history``: the script's arguments as given.
* ``oracle``: ``[name, args]``.
"""


class HostError(Exception):
    """Raised by a host handler to reject the script's promise with a JS Error of this name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


class CallOutcome(NamedTuple):
    """What a call resolved or rejected to (a named tuple: one is built per call)."""

    #: JSON value the call resolved to (only meaningful when ``has_value``).
    value: Any = None
    #: False when the result was ``undefined``.
    has_value: bool = False
    #: ``(name, message)`` when the script threw or its promise rejected.
    error: tuple[str, str] | None = None
    #: How far timers advanced the virtual clock during the call, in ms.
    virtual_ms: int = 0
    #: An upper bound of the result's JSON text length, in UTF-16 code units: its
    #: canonical UTF-8 encoding is at most three bytes per unit.
    size: int = 0


# Dispatcher commands understood by the prelude.
_BEGIN = 1
_POLL = 2
_SETTLE = 3
_LOAD = 4
_EXPORTS = 5
_EXPORT_VALUE = 6
_SETTLE_WIRE = 7
_TAKE = 8
_SETTLE_NULL = 9


# First characters of prelude statuses; anything else is a bare JSON value.
_STATUS_CODES = frozenset("DPRTUX")

_LOG_LEVELS = {
    "log": logging.INFO,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "debug": logging.DEBUG,
}

_PRELUDE_SOURCE = (
    importlib.resources.files("libvms.runtime").joinpath("prelude.js").read_text("utf-8")
)


def check_limits(call_timeout: float, memory_limit: int) -> None:
    """Raise :class:`ValueError` unless the limits can bound a script: a positive
    ``call_timeout`` of at most :data:`MAX_CALL_TIMEOUT` seconds and an integer
    ``memory_limit`` from 1 to :data:`MAX_MEMORY_LIMIT` bytes (a limit too small
    for the sandbox to start is :class:`LimitExceeded` when it starts)."""
    if isinstance(call_timeout, bool) or not isinstance(call_timeout, (int, float)):
        raise ValueError(f"call_timeout must be a number of seconds, not {call_timeout!r}")
    if not (0 < call_timeout <= MAX_CALL_TIMEOUT):
        raise ValueError(
            f"call_timeout must be a number of seconds above 0 and at most "
            f"{MAX_CALL_TIMEOUT:g}, not {call_timeout!r}"
        )
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int):
        raise ValueError(f"memory_limit must be a whole number of bytes, not {memory_limit!r}")
    if not 0 < memory_limit <= MAX_MEMORY_LIMIT:
        raise ValueError(
            f"memory_limit must be from 1 to {MAX_MEMORY_LIMIT} bytes, not {memory_limit}"
        )


# Every JS number is a double: an integer beyond the safe range is the double's
# exact value, carried as a float (canonical JSON prints it back the way JS does).
_decoder = json.JSONDecoder(parse_int=json_number)
_decode = _decoder.decode


def _make_decoders() -> tuple[Callable[[str, int], Any], Callable[[str, int], Any]]:
    """``(decode_at, decode_hooked_at)``: ``decode_at(text, i)`` is the JSON value that
    fills ``text[i:]``, as :data:`_decode` gives it.

    Texts come from the prelude, which writes no whitespace. The C scanner is
    built once. ``decode_at`` uses the plain ``int`` parser when the text holds
    no run of 16 digits (so no integer that could leave the safe range), which
    gives the same values as :func:`json_number` without calling back into
    Python for every integer; the check costs about a nanosecond per character.
    ``decode_hooked_at`` always calls :func:`json_number`, for texts that hold
    few integers but maybe long strings. Anything the scanner does not consume
    whole goes through :data:`_decode`, which then raises its usual error.
    """
    make = getattr(json.scanner, "c_make_scanner", None)
    if make is None:  # pragma: no cover - CPython always has the C scanner

        def fallback(text: str, idx: int) -> Any:
            return _decode(text[idx:])

        return fallback, fallback
    hooked = make(_decoder)
    plain = make(json.JSONDecoder())

    def scan_whole(scan: Any, text: str, idx: int) -> Any:
        try:
            value, end = scan(text, idx)
        except StopIteration:
            return _decode(text[idx:])
        if end != len(text):
            return _decode(text[idx:])
        return value

    def decode_at(text: str, idx: int) -> Any:
        if len(text) - idx >= 16 and may_hold_unsafe_int(text.encode("utf-8", "surrogatepass")):
            return scan_whole(hooked, text, idx)
        return scan_whole(plain, text, idx)

    def decode_hooked_at(text: str, idx: int) -> Any:
        return scan_whole(hooked, text, idx)

    return decode_at, decode_hooked_at


_decode_at, _decode_hooked_at = _make_decoders()


# ASCII only: the wrapper passes strings through C strings (a NUL would cut
# them, a lone surrogate would fail), so everything is escaped.
_encoder = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))
_dumps = _encoder.encode


def _make_dumps_acyclic() -> Callable[[Any], str]:
    """:data:`_dumps` without its cycle check, for values that cannot hold a cycle.

    The same C encoder with the same settings, built once instead of on every
    call. Only for flat lists of scalars and for values rebuilt by
    :func:`_to_wire`, whose nesting is bounded.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython always has the C encoder
        return _dumps
    encode = make(
        None,
        _encoder.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        False,
        False,
        False,
    )
    return lambda value: "".join(encode(value, 0))


_dumps_acyclic = _make_dumps_acyclic()

# Scalars whose JSON text is the canonical one (floats are not: -0.0, 1e-07; and
# subclasses go the long way).
_PLAIN_SCALARS = frozenset((str, int, bool, type(None)))


def _decode_result(text: str) -> Any:
    """The value of a bare JSON result text (the prelude's fast path)."""
    if len(text) < 16 and text.isascii() and text.isdigit():
        return int(text)  # a non-negative integer well inside the safe range
    return _decode_at(text, 0)


def _c_safe(text: str) -> bool:
    """Whether the wrapper can pass ``text`` to JS unchanged (no NUL, no lone surrogate)."""
    return "\x00" not in text and is_unicode(text)


def _seed_words(seed: bytes) -> tuple[int, int, int, int]:
    words: tuple[int, int, int, int] = _unpack_words(hashlib.sha256(seed).digest()[:16])
    return words


_unpack_words = struct.Struct("<4I").unpack
_monotonic = time.monotonic


def _begin_args(
    method: str, args: list[Any], caller_id: str | None, timestamp_ms: int, seed: bytes
) -> tuple[Any, ...]:
    """The prelude's ``begin`` arguments. Numbers go as floats: the wrapper would cut
    Python ints to 32 bits. Strings it cannot pass (NUL, lone surrogates) go as JSON."""
    flags = 0
    if not _c_safe(method):
        method = _dumps(method)
        flags |= 1
    if caller_id is not None and not _c_safe(caller_id):
        caller_id = _dumps(caller_id)
        flags |= 2
    try:
        if not args:
            args_text = None
        else:
            for arg in args:
                if type(arg) not in _PLAIN_SCALARS:
                    # Containers and floats go as their canonical text: what a replay
                    # reads back from the log, so the script sees the same objects
                    # (keys in canonical order, -0 as 0) live and in every replay.
                    args_text = canonical(args).decode()
                    break
            else:
                args_text = _dumps_acyclic(args)
    except (TypeError, ValueError) as exc:  # EncodingError is a ValueError
        raise EncodingError(f"call arguments are not JSON: {exc}") from exc
    w0, w1, w2, w3 = _seed_words(seed)
    return (
        method,
        args_text,
        float(timestamp_ms),
        float(w0),
        float(w1),
        float(w2),
        float(w3),
        caller_id,
        flags,
    )


def _ensure_c_numeric_locale() -> None:
    """Make sure LC_NUMERIC reads numbers with a "." before any JS runs.

    QuickJS parses numbers in ``JSON.parse`` with the C library, which follows
    LC_NUMERIC: under a locale whose decimal point is not "." (de_DE, fr_FR...)
    ``JSON.parse('3.75')`` gives 3, and the prelude parses every argument and host
    answer that way. The host process may change its locale at any time (an
    oracle, a framework), so this is checked when a call, a load or an export
    read begins and after every host request (the host's code runs then): a
    query costs a fraction of a microsecond, and a locale found good is not
    examined again.
    """
    global _numeric_locale_ok
    name = _query_locale(locale.LC_NUMERIC)
    if name == _numeric_locale_ok:
        return
    if locale.localeconv()["decimal_point"] != ".":
        locale.setlocale(locale.LC_NUMERIC, "C")
        name = _query_locale(locale.LC_NUMERIC)
    _numeric_locale_ok = name


_query_locale = _locale.setlocale
# The LC_NUMERIC setting last found to read numbers with a ".".
_numeric_locale_ok: str | None = None


def _from_wire(value: Any) -> Any:
    """Decode request arguments: ``{"$bytes": b64}`` -> bytes, ``{"$object": [k, v]}`` -> dict."""
    if isinstance(value, list):
        return [_from_wire(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            if "$bytes" in value:
                return base64.b64decode(value["$bytes"])
            if "$object" in value:
                key, val = value["$object"]
                return {key: _from_wire(val)}
        return {k: _from_wire(v) for k, v in value.items()}
    return value


def _to_wire(value: Any, depth: int = 0) -> tuple[Any, bool]:
    """Encode a host result for the prelude; the flag tells whether markers were used.

    Raises :class:`EncodingError` for anything JS would not get exactly: NaN,
    infinities, integers beyond 2**53, non-string keys, nesting deeper than
    :data:`libvms.encoding.MAX_DEPTH`, other types.
    """
    if value is None or isinstance(value, (str, bool)):
        return value, False
    if isinstance(value, int):
        if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            raise EncodingError(f"host result holds {value}, beyond the JS safe integer range")
        return value, False
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise EncodingError(f"host result holds {value}, which is not JSON")
        return value, False
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}, True
    if depth >= MAX_DEPTH:
        raise EncodingError(f"host result is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        items = [_to_wire(v, depth + 1) for v in value]
        return [v for v, _ in items], any(m for _, m in items)
    if isinstance(value, dict):
        marked = False
        out: dict[str, Any] = {}
        for key, val in value.items():
            if not isinstance(key, str):
                raise EncodingError(f"host result has the non-string key {key!r}")
            enc, m = _to_wire(val, depth + 1)
            out[key] = enc
            marked = marked or m
        if len(out) == 1 and next(iter(out)) in ("$bytes", "$object"):
            ((key, val),) = out.items()
            return {"$object": [key, val]}, True
        return out, marked
    raise EncodingError(f"host result holds a {type(value).__name__}, which is not JSON")


class JSRuntime:
    """One QuickJS context running one script deterministically. See the module docstring."""

    broken: bool
    """True after a limit was hit, the host handler raised or the load failed: do not reuse."""

    def __init__(
        self,
        *,
        call_timeout: float = 5.0,
        memory_limit: int = 64 * 2**20,
        max_stack: int = 512 * 1024,
        logger: logging.Logger | None = None,
        prelude_version: str = PRELUDE_VERSION,
    ) -> None:
        _ensure_c_numeric_locale()
        check_limits(call_timeout, memory_limit)
        if prelude_version not in SUPPORTED_PRELUDE_VERSIONS:
            raise ValueError(
                f"prelude version {prelude_version!r} is not one this runtime runs "
                f"({', '.join(SUPPORTED_PRELUDE_VERSIONS)})"
            )
        #: The behaviour version this runtime runs (see SUPPORTED_PRELUDE_VERSIONS).
        self.prelude_version = prelude_version
        self.broken = False
        self._call_timeout = float(call_timeout)
        self._memory_limit = int(memory_limit)
        self._logger = logger if logger is not None else logging.getLogger("libvms.vm")
        #: Whether the calls run again what already ran once (rebuilding a VM's
        #: state): their console lines, shown when they first ran, go at DEBUG.
        self.rerunning = False
        self._loaded = False
        self._busy = False
        self._closed = False
        self._ctx: Any = quickjs.Context()
        self._ctx.set_memory_limit(self._memory_limit)
        self._ctx.set_max_stack_size(int(max_stack))
        try:
            factory = self._ctx.eval(_PRELUDE_SOURCE)
            config = self._ctx.parse_json(
                _dumps(
                    {
                        "maxDepth": MAX_DEPTH,
                        "maxLogLines": MAX_LOG_LINES,
                        "maxLogChars": MAX_LOG_CHARS,
                        "version": int(prelude_version),
                    }
                )
            )
            self._dispatch: Any = factory(config)
        except (quickjs.JSException, quickjs.StackOverflow) as exc:
            self._ctx = None
            raise LimitExceeded(
                "MemoryLimitExceeded",
                f"the sandbox itself needs more than memory_limit={self._memory_limit} bytes "
                f"to start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
            ) from None

    # ------------------------------------------------------------------ public

    @property
    def call_timeout(self) -> float:
        """Seconds a call (or a load) may take, host awaits included."""
        return self._call_timeout

    @call_timeout.setter
    def call_timeout(self, seconds: float) -> None:
        check_limits(seconds, self._memory_limit)
        self._call_timeout = float(seconds)

    def load(self, code: str, *, timestamp_ms: int, seed: bytes) -> None:
        """Evaluate ``code`` as a CommonJS module body (``exports`` and ``module`` in scope).

        Raises :class:`ScriptError` when the script does not compile or throws at
        top level, :class:`LimitExceeded` when it hits a limit while loading.
        """
        self._check_usable()
        if self._loaded:
            raise RuntimeError("a script is already loaded in this runtime")
        deadline = time.monotonic() + self._call_timeout
        self._busy = True
        try:
            status = self._enter(_LOAD, _dumps([code, timestamp_ms, _seed_words(seed)]), deadline)
            # A load settles at once (the module body is synchronous); its jobs
            # still run, its timers never fire and host requests are refused.
            data = _decode(status[1:])
            self._emit_logs(data[-1])
            while self._drain_jobs(deadline):
                status = self._enter(_POLL, "", deadline)
                data = _decode(status[1:])
                self._emit_logs(data[-1])
            if status[0] != "D":  # pragma: no cover - the prelude settles loads at once
                raise ScriptError(f"unexpected load status {status[0]!r}")
            if data[0] == 2:
                name, message = data[1][0], data[1][1]
                self._check_engine_error(name, message)
                where = data[1][2] if len(data[1]) > 2 else ""
                detail = f"{name}: {message}"
                if where:
                    detail += "\n" + where.rstrip()
                raise ScriptError(detail)
            self._loaded = True
        except BaseException:
            if not self._loaded and not self.broken:
                # A failed load leaves nothing usable behind.
                self.broken = True
            raise
        finally:
            self._busy = False

    def export_names(self) -> list[tuple[str, bool]]:
        """``(name, is_function)`` of ``module.exports``' own enumerable keys, in JS key order.

        Accessor properties are reported as non-functions and their getters are
        not run. Raises :class:`ScriptError` when the exports cannot be listed (a
        Proxy whose trap throws).
        """
        self._check_ready()
        deadline = time.monotonic() + self._call_timeout
        text = self._enter(_EXPORTS, "", deadline)
        if text[0] == "E":
            name, message = _decode(text[1:])
            self._check_engine_error(name, message)
            raise ScriptError(f"the script's exports cannot be listed: {name}: {message}")
        return [(str(name), bool(is_fn)) for name, is_fn in _decode(text)]

    def export_value(self, name: str) -> Any:
        """JSON value of the non-function export ``name``.

        Raises :class:`EncodingError` when it is not JSON (or is an accessor, a
        function, or ``undefined``), :class:`VMCallError` (``NotFound``) when there
        is no such export.
        """
        self._check_ready()
        deadline = time.monotonic() + self._call_timeout
        text = self._enter(_EXPORT_VALUE, _dumps(name), deadline)
        kind = text[0]
        if kind == "V":
            return _decode(text[1:])
        if kind == "X":
            raise VMCallError("NotFound", f"the script exports nothing named {name!r}")
        if kind == "F":
            raise EncodingError(f"export {name!r} is a function, not a value")
        if kind == "U":
            raise EncodingError(f"export {name!r} is undefined, which is not JSON")
        err_name, message = _decode(text[1:])
        self._check_engine_error(err_name, message)
        raise EncodingError(f"{err_name}: {message}")

    async def call(
        self,
        method: str,
        args: list[Any],
        *,
        caller_id: str | None,
        timestamp_ms: int,
        seed: bytes,
        host: HostHandler,
    ) -> CallOutcome:
        """Run ``exports[method](...args)`` to completion. See the module docstring.

        Script errors come back in :attr:`CallOutcome.error`. Raises
        :class:`VMCallError` (``MethodNotFound``) for an unknown method or a
        non-function export, :class:`LimitExceeded` (``TimeLimitExceeded``,
        ``MemoryLimitExceeded``, ``StackOverflow``, ``EngineError``) when a limit
        is hit, and re-raises whatever the host handler raises other than
        :class:`HostError`; after those two the runtime is :attr:`broken`.

        ``call_timeout`` bounds the whole call, time spent awaiting the host
        included (a host await itself is not interrupted; the limit is checked
        when it returns).
        """
        self._check_ready()
        begin_args = _begin_args(method, args, caller_id, timestamp_ms, seed)
        # The wall deadline covers the whole call; each JS step also gets the
        # engine's CPU time limit set to what is left of it.
        deadline = _monotonic() + self._call_timeout
        self._busy = True
        try:
            status = self._enter_with(deadline, _BEGIN, *begin_args)
            first = status[0]
            if first not in _STATUS_CODES:
                # Fast path: the call settled synchronously with a value and left
                # nothing behind; the text is the value's JSON.
                if not self._drain_jobs(deadline):
                    return CallOutcome(_decode_result(status), True, None, 0, len(status))
                return await self._run_call(self._enter(_POLL, "", deadline), True, host, deadline)
            if first != "X":
                return await self._run_call(status, False, host, deadline)
        except BaseException:
            # A limit, a host bug or a cancellation in the middle of a call: the
            # script's state is half-way through, so the runtime cannot be
            # trusted again.
            self.broken = True
            raise
        finally:
            self._busy = False
        raise VMCallError("MethodNotFound", f"the script exports no function named {method!r}")

    async def _run_call(
        self, status: str, polled: bool, host: HostHandler, deadline: float
    ) -> CallOutcome:
        """Drive a call that did not settle at once to its outcome, from its first status.

        ``polled`` tells that ``status`` is POLL's; otherwise it is BEGIN's. The
        host only polls once no job is pending, and a POLL runs no script code
        unless it fires a timer (``T``).
        """
        # The event loop. Every status carries the console lines written since
        # the previous one.
        while True:
            kind = status[0]
            # Requests hold few integers but maybe long strings (file contents).
            data = (_decode_hooked_at if kind == "R" else _decode_at)(status, 1)
            if data[-1]:
                self._emit_logs(data[-1])
            if kind == "R":
                requests = data[0]
                maybe_markers = _has_marker_text(status)
                if not polled and self._drain_jobs(deadline):
                    # BEGIN's requests, made before the call's first await. As if
                    # BEGIN had answered "P" and POLL taken the outbox: the jobs
                    # BEGIN left run first, and the requests they made (TAKE)
                    # join the batch before any of it is served.
                    status = self._enter(_TAKE, "", deadline)
                    data = _decode_hooked_at(status, 1)
                    if data[-1]:
                        self._emit_logs(data[-1])
                    requests = requests + data[0]
                    maybe_markers = maybe_markers or _has_marker_text(status)
                # Requests in the order the script made them, one at a time;
                # the jobs each settlement unblocks run before the next one.
                for req_id, op, wire_args in requests:
                    if maybe_markers and _has_markers(wire_args):
                        args = _from_wire(wire_args)
                    else:
                        args = wire_args
                    try:
                        result = await host(op, args)
                    except HostError as exc:
                        _ensure_c_numeric_locale()
                        payload = _dumps_acyclic([req_id, 0, str(exc.name), str(exc.message)])
                        self._settle(_SETTLE, payload, deadline)
                    else:
                        _ensure_c_numeric_locale()
                        if _monotonic() > deadline:
                            raise self._time_limit()
                        self._settle_result(req_id, op, result, deadline)
                    self._drain_jobs(deadline)
            elif (polled and (kind == "D" or kind == "U")) or not self._drain_jobs(deadline):
                # No job is pending (a "D" or "U" POLL ran no script code, and
                # the host polled with none pending): a final status is the
                # outcome.
                if kind == "D":
                    return self._outcome(data, len(status))
                if kind == "U":
                    return CallOutcome(
                        None,
                        False,
                        (
                            "UnsettledError",
                            "the call's promise never settled: no job, host request "
                            "or timer was left to settle it",
                        ),
                        int(data[0]),
                    )
            # "P" (pending), "T" (a timer fired or a request settled) and
            # every state after jobs ran: the prelude decides what is next.
            status = self._enter(_POLL, "", deadline)
            polled = True

    def close(self) -> None:
        """Free the QuickJS context. The runtime cannot be used afterwards."""
        self._closed = True
        self._dispatch = None
        self._ctx = None

    # ---------------------------------------------------------------- internals

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the runtime is closed")
        if self.broken:
            raise RuntimeError("the runtime is broken (a limit was hit or the host failed)")
        if self._busy:
            raise RuntimeError("the runtime is already running a call")
        _ensure_c_numeric_locale()  # JS is about to run

    def _check_ready(self) -> None:
        self._check_usable()
        if not self._loaded:
            raise RuntimeError("no script is loaded")

    def _limit(self, name: str, message: str) -> LimitExceeded:
        self.broken = True
        return LimitExceeded(name, message)

    def _time_limit(self) -> LimitExceeded:
        return self._limit(
            "TimeLimitExceeded", f"the call ran longer than its {self._call_timeout:g} s limit"
        )

    def _check_engine_error(self, name: str, message: str) -> None:
        """Turn an engine resource error the script did not catch into LimitExceeded.

        The script sees these as ordinary errors (RangeError "Maximum call stack
        size exceeded", InternalError "out of memory" / "string too long"); where
        they strike depends on the machine, so a call they end is not a result.
        """
        if name == "RangeError" and message == "Maximum call stack size exceeded":
            raise self._limit("StackOverflow", "the script overflowed its stack")
        if name == "InternalError" and message in ("out of memory", "string too long"):
            raise self._memory_limit_exceeded()

    def _memory_limit_exceeded(self) -> LimitExceeded:
        return self._limit(
            "MemoryLimitExceeded",
            f"the script ran out of memory (limit {self._memory_limit} bytes)",
        )

    def _engine_exception(self, exc: BaseException) -> LimitExceeded:
        text = str(exc)
        first = text.split("\n", 1)[0]
        if isinstance(exc, quickjs.StackOverflow) or "Maximum call stack size" in first:
            return self._limit("StackOverflow", "the script overflowed its stack")
        if "interrupted" in first:
            return self._time_limit()
        if "out of memory" in first or "Failed obtaining QuickJS error string" in first:
            return self._memory_limit_exceeded()
        return self._limit("EngineError", first or type(exc).__name__)

    def _enter(self, cmd: int, payload: str, deadline: float) -> str:
        """One entry into the prelude's dispatcher, bounded by what is left of ``deadline``."""
        return self._enter_with(deadline, cmd, payload)

    def _enter_with(self, deadline: float, *dispatch_args: Any) -> str:
        remaining = deadline - _monotonic()
        if remaining <= 0:
            raise self._time_limit()
        self._ctx.set_time_limit(remaining)
        try:
            result = self._dispatch(*dispatch_args)
        except (quickjs.JSException, quickjs.StackOverflow) as exc:
            raise self._engine_exception(exc) from None
        except Exception as exc:
            raise self._limit("EngineError", f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(result, str):  # pragma: no cover - the prelude always returns text
            raise self._limit("EngineError", "the prelude returned no status")
        return result

    def _drain_jobs(self, deadline: float) -> bool:
        """Run pending jobs until none is left; True when at least one ran."""
        ctx = self._ctx
        set_time_limit = ctx.set_time_limit
        execute_pending_job = ctx.execute_pending_job
        ran = False
        while True:
            remaining = deadline - _monotonic()
            if remaining <= 0:
                raise self._time_limit()
            set_time_limit(remaining)
            try:
                if not execute_pending_job():
                    return ran
            except (quickjs.JSException, quickjs.StackOverflow) as exc:
                raise self._engine_exception(exc) from None
            except Exception as exc:
                raise self._limit("EngineError", f"{type(exc).__name__}: {exc}") from exc
            ran = True

    def _settle_result(self, req_id: Any, op: str, result: Any, deadline: float) -> None:
        """Resolve request ``req_id``'s promise in JS with the host's ``result``."""
        if type(req_id) is int:
            if result is None:
                self._settle(_SETTLE_NULL, str(req_id), deadline)
                return
            if type(result) is int and -MAX_SAFE_INT <= result <= MAX_SAFE_INT:
                # A new archive version: the commonest answer after null.
                self._settle(_SETTLE, f"[{req_id},1,{result}]", deadline)
                return
        try:
            wire, marked = _to_wire(result)
            # _to_wire rebuilt every container, to a bounded depth: no cycle.
            payload = _dumps_acyclic([req_id, 1, wire])
        except (EncodingError, TypeError, ValueError) as exc:
            raise EncodingError(f"the host's result for {op} is not JSON: {exc}") from exc
        self._settle(_SETTLE_WIRE if marked else _SETTLE, payload, deadline)

    def _settle(self, cmd: int, payload: str, deadline: float) -> None:
        status = self._enter(cmd, payload, deadline)
        if status != "T[0]":  # "T[0]": no console lines
            logs = _decode_at(status, 1)[-1]
            if logs:
                self._emit_logs(logs)

    def _outcome(self, data: list[Any], size: int) -> CallOutcome:
        kind, payload, virtual_ms = data[0], data[1], int(data[2])
        if kind == 1:
            return CallOutcome(payload, True, None, virtual_ms, size)
        if kind == 2:
            name, message = str(payload[0]), str(payload[1])
            self._check_engine_error(name, message)
            return CallOutcome(None, False, (name, message), virtual_ms)
        return CallOutcome(None, False, None, virtual_ms)

    def _emit_logs(self, logs: Any) -> None:
        if not logs:
            return
        logger = self._logger
        for level, text in logs[: MAX_LOG_LINES + 1]:
            severity = logging.DEBUG if self.rerunning else _LOG_LEVELS.get(level, logging.INFO)
            logger.log(severity, "console.%s: %s", level, text)


def _has_marker_text(text: str) -> bool:
    """Whether a prelude status may hold a ``$bytes``/``$object`` marker.

    Markers are object keys, written by JSON.stringify as ``"$bytes"`` and
    ``"$object"`` (it never escapes ``$``), so a text without ``"$`` has none.
    """
    return '"$' in text


def _has_markers(value: Any) -> bool:
    """Whether decoded request arguments still hold ``$bytes``/``$object`` markers."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if len(item) == 1 and ("$bytes" in item or "$object" in item):
                return True
            stack.extend(item.values())
    return False
