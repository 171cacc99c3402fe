"""BackendVM: a backend script whose every call is logged and replays exactly.

Calls run one at a time in arrival order. Each call gets a transaction on the
files archive; when the script's promise settles, the archive mutations and
the call's log entry are staged together and become durable in one commit
(calls arriving together share it). A call that exceeds its limits is logged
as aborted, its archive writes are dropped and the script's state is rebuilt
by replaying the log.

Replay (:meth:`BackendVM.from_call_log`, and reopening a directory) feeds each
logged call's inputs — method, arguments, caller, timestamp, oracle results —
to a fresh sandbox and reproduces the entry byte for byte.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import encoding, merkle
from .archive import KEY_FILENAME as ARCHIVE_KEY_FILENAME
from .archive import ArchiveTransaction, FilesArchive
from .errors import (
    ArchiveError,
    EncodingError,
    InvalidPathError,
    LibVMSError,
    LimitExceeded,
    QueueFullError,
    ReplayLimitError,
    ScriptError,
    TamperError,
    VerificationError,
    VMCallError,
)
from .keys import same_ledger
from .log import ABSENT, CallLog, init_entry
from .log import KEY_FILENAME as LOG_KEY_FILENAME
from .runtime.js import (
    ENGINE_NAME,
    ENGINE_VERSION,
    MAX_CALL_TIMEOUT,
    PRELUDE_VERSION,
    SUPPORTED_PRELUDE_VERSIONS,
    CallOutcome,
    HostError,
    JSRuntime,
    check_limits,
)
from .store import DB_FILENAME, LOCK_FILENAME, DirectoryLock, Store

logger = logging.getLogger("libvms.vm")

#: Most bytes of logged entries a replay reads from the log at a time.
_REPLAY_BATCH_BYTES = 16 * 1024 * 1024

#: Calls allowed to wait for a VM at once (the seed's limit).
MAX_QUEUE = 1000

#: Most bytes of file data one call's writes may hold until the call commits
#: (distinct contents, counted once each): past it, a write rejects with a
#: RangeError. It bounds the host's memory by what it bounds, not by the time a
#: call may take. Logs of prelude 3 on; version 2 had no such bound.
MAX_CALL_WRITE_BYTES = 128 * 2**20

#: Most entries a recursive ``readdir`` may list (prelude 3 on): past it, the
#: script's promise rejects with a RangeError. The listing is built in the host's
#: memory, before the script's memory limit can apply.
MAX_LISTED_ENTRIES = 100_000

#: How many times its call_timeout a VM gives each call when it rebuilds its own
#: state (on a reopen, after an abort). Those calls all ran within the limit
#: once; on a busier machine one may run a little longer the second time, and a
#: rebuild that fails leaves the VM unable to serve.
REBUILD_TIME_FACTOR = 4

# Longest a burst of calls that finish without awaiting anything may keep the
# event loop from everything else (other connections, auditors' requests,
# signals), in seconds: past it, the next call lets the loop run first.
_MAX_LOOP_HOLD = 0.02

#: How deep call arguments and results may nest: a log entry holds them two levels
#: down (``call.args``, ``result.res``), and an entry may nest MAX_DEPTH levels.
MAX_VALUE_DEPTH = encoding.MAX_DEPTH - 2
# An oracle's arguments and result sit four levels down (result.oracles[i].res).
_ORACLE_DEPTH = encoding.MAX_DEPTH - 4

#: Largest canonical encoding of a call's arguments (with its user id), and of its
#: result: together they leave room in an entry (MAX_ENTRY_BYTES, 8 MiB).
MAX_ARGS_BYTES = 2 * 2**20
MAX_RESULT_BYTES = 4 * 2**20
#: Largest canonical encoding of all the oracle records of one call (names,
#: arguments, results and errors). With the bounds above and the error bounds
#: below, every call's entry fits in MAX_ENTRY_BYTES.
MAX_ORACLE_BYTES = 2**20
#: A thrown error's name and message are logged cut to these many characters.
MAX_ERROR_NAME_CHARS = 256
MAX_ERROR_MESSAGE_CHARS = 65_536

_SEED_DOMAIN = b"libvms/random/v2\x00"

#: A VM's key files: one per ledger.
_KEY_FILENAMES = (LOG_KEY_FILENAME, ARCHIVE_KEY_FILENAME)

#: Present in a directory while its first deploy has not committed: key files found
#: with it and a database holding nothing are that deploy's, safe to discard.
DEPLOYING_FILENAME = "libvms.deploying"

OracleFn = Callable[..., Any]


def runtime_info() -> dict[str, str]:
    """What the init entry records about the engine, so replays can warn on a mismatch."""
    return {"engine": ENGINE_NAME, "version": ENGINE_VERSION, "prelude": PRELUDE_VERSION}


def _logged_prelude(init: Any) -> str | None:
    """The behaviour version a log was begun with, if this runtime runs it: the VM
    keeps running, and every replay runs, the log under the rules it ran under."""
    recorded = init.get("runtime") if isinstance(init, dict) else None
    version = recorded.get("prelude") if isinstance(recorded, dict) else None
    return version if version in SUPPORTED_PRELUDE_VERSIONS else None


def runtime_warnings(init: Any) -> list[str]:
    """What an audit should say about the runtime a log names, against this one's."""
    recorded = init.get("runtime") if isinstance(init, dict) else None
    if not isinstance(recorded, dict):
        return [f"the log names no runtime; replaying with {_describe_runtime(runtime_info())}"]
    warnings = []
    if (recorded.get("engine"), recorded.get("version")) != (ENGINE_NAME, ENGINE_VERSION):
        warnings.append(
            f"the log was written by {_describe_runtime(recorded)}; replaying with "
            f"{_describe_runtime(runtime_info())}: results of floating-point Math "
            "functions may differ"
        )
    if _logged_prelude(init) is None:
        warnings.append(
            f"the log was written with prelude {recorded.get('prelude')!r}, which this "
            f"libvms does not run (it runs {', '.join(SUPPORTED_PRELUDE_VERSIONS)}); "
            f"replaying with prelude {PRELUDE_VERSION}: the script's environment differs"
        )
    return warnings


def _describe_runtime(info: dict[str, Any]) -> str:
    return f"{info.get('engine')} {info.get('version')} (prelude {info.get('prelude')})"


def derive_seed(init_leaf: bytes, seq: int) -> bytes:
    """The PRNG seed of the call at log index ``seq``: logged data only (docs/formats.md).

    ``init_leaf`` is the leaf hash of the log's init entry, so each VM draws its
    own numbers; one hash per call, whatever the log's length.
    """
    return encoding.sha256(_SEED_DOMAIN + init_leaf + seq.to_bytes(8, "big"))


def _now_ms() -> int:
    return int(time.time() * 1000)


_monotonic = time.monotonic


def _error_obj(name: str, message: str) -> dict[str, str]:
    return {"name": name, "message": message}


class _ExportedFunction:
    """``vm.exports[name]``: calling it runs a logged call."""

    def __init__(self, vm: BackendVM, name: str) -> None:
        self._vm = vm
        self.__name__ = name

    async def __call__(self, *args: Any, user_id: str | None = None) -> Any:
        return await self._vm.execute_call(self.__name__, list(args), user_id=user_id)

    def __repr__(self) -> str:
        return f"<exported function {self.__name__}>"


class _LiveOracles:
    """Oracles during a live call: run the host's function and record what it returned."""

    def __init__(self, functions: Mapping[str, OracleFn]) -> None:
        self._functions = functions
        self.records: list[dict[str, Any]] = []
        #: Canonical bytes of :attr:`records`, counted against MAX_ORACLE_BYTES.
        self.used = 0

    async def __call__(self, name: str, args: list[Any]) -> Any:
        record: dict[str, Any] = {"name": name, "args": args}
        fn = self._functions.get(name)
        logged = b""
        if fn is None:
            record["err"] = _error_obj("OracleNotFound", f"no oracle named {name!r}")
        else:
            try:
                value = fn(*args)
                if inspect.isawaitable(value):
                    value = await value
                simple = encoding.check_value(value, max_depth=_ORACLE_DEPTH)
                logged = encoding.canonical_checked(value, simple, max_bytes=MAX_ORACLE_BYTES)
                record["res"] = value
            except EncodingError as exc:
                message = f"oracle result cannot be logged: {exc}"
                record["err"] = _error_obj("EncodingError", message)
            except Exception as exc:
                record["err"] = _error_obj(*_loggable_error(type(exc).__name__, str(exc)))
        size = _record_size(record)
        if self.used + size > MAX_ORACLE_BYTES:
            # Over the budget: a short error in its place, so the entry stays loggable.
            record.pop("res", None)
            record["err"] = _error_obj(
                "RangeError",
                f"the oracle's answer would take this call's oracle records past "
                f"{MAX_ORACLE_BYTES} bytes",
            )
            size = _record_size(record)
        self.used += size
        self.records.append(record)
        if "err" in record:
            raise HostError(record["err"]["name"], record["err"]["message"])
        # The script gets the value as a replay reads it back from the log: keys in
        # canonical order, -0 as 0.
        return encoding.parse_verified(logged)


def _record_size(record: dict[str, Any]) -> int:
    """Canonical bytes of an oracle record; over the budget if it cannot be encoded."""
    try:
        return len(encoding.canonical(record))
    except EncodingError:
        return MAX_ORACLE_BYTES + 1


def _loggable_error(name: str, message: str) -> tuple[str, str]:
    """An error's name and message as the log holds them: cut to
    :data:`MAX_ERROR_NAME_CHARS` and :data:`MAX_ERROR_MESSAGE_CHARS`, and with
    any lone surrogate (which UTF-8 cannot carry) replaced by U+FFFD."""
    name = name[:MAX_ERROR_NAME_CHARS]
    message = message[:MAX_ERROR_MESSAGE_CHARS]
    if not (encoding.is_unicode(name) and encoding.is_unicode(message)):
        name = _SURROGATE.sub("\ufffd", name)
        message = _SURROGATE.sub("\ufffd", message)
    return name, message


_SURROGATE = re.compile("[\ud800-\udfff]")


class _RecordedOracles:
    """Oracles during replay: return the logged results; the script must ask for the same."""

    def __init__(self, recorded: Sequence[Any], seq: int) -> None:
        self._recorded = list(recorded)
        self._seq = seq
        self.records: list[dict[str, Any]] = []
        #: What the live call counted against MAX_ORACLE_BYTES, counted the same way.
        self.used = 0

    async def __call__(self, name: str, args: list[Any]) -> Any:
        position = len(self.records)
        if position >= len(self._recorded):
            raise VerificationError(
                f"entry {self._seq}: replay asked oracle {name!r} but the log records "
                f"only {len(self._recorded)} oracle calls",
                index=self._seq,
                field="result.oracles",
                expected=None,
                found={"name": name, "args": args},
            )
        record = self._recorded[position]
        if not isinstance(record, dict) or record.get("name") != name or record.get("args") != args:
            raise VerificationError(
                f"entry {self._seq}: replay asked oracle {name!r} with {args!r}, the log "
                f"records {record!r}",
                index=self._seq,
                field=f"result.oracles[{position}]",
                expected=record,
                found={"name": name, "args": args},
            )
        self.records.append(record)
        self.used += _record_size(record)
        err = record.get("err")
        if err is not None:
            raise HostError(str(err.get("name", "Error")), str(err.get("message", "")))
        return record.get("res")


class _Oracles(Protocol):
    """Where a call's host gets oracle values: :class:`_LiveOracles` or
    :class:`_RecordedOracles`."""

    used: int

    async def __call__(self, name: str, args: list[Any]) -> Any: ...


class _Host:
    """Performs the script's ``System.*`` requests on one call's archive transaction.

    The transaction is opened on the call's first files request: most calls make none.
    """

    def __init__(
        self,
        archive: FilesArchive,
        mtime_ms: int,
        oracles: _Oracles,
        identity: tuple[str, str] | None = None,
        prelude_version: str = PRELUDE_VERSION,
    ) -> None:
        self._archive = archive
        self._mtime = mtime_ms
        # Version 2 logs keep version 2's files API (docs/formats.md).
        self._v2 = prelude_version == "2"
        # File data the call's writes may hold.
        self._max_bytes = None if self._v2 else MAX_CALL_WRITE_BYTES
        self._opened: ArchiveTransaction | None = None
        self._oracles = oracles
        # The files archive's URL and title as the script sees them (getInfo): a
        # replay's own archive has another key and maybe title, so it passes the VM's.
        self._identity = identity

    @property
    def _tx(self) -> ArchiveTransaction:
        if self._opened is None:
            self._opened = self._archive.transaction(
                mtime_ms=self._mtime, max_bytes=self._max_bytes
            )
        return self._opened

    def commit(self) -> None:
        """Stage the call's archive writes, if it made any."""
        if self._opened is not None:
            self._opened.commit()

    async def __call__(self, op: str, args: list[Any]) -> Any:
        if op == "oracle":
            name, oracle_args = args
            oracles = self._oracles
            try:
                simple = encoding.check_value(oracle_args, max_depth=_ORACLE_DEPTH)
                # The name is recorded too, and a script may make it of any length.
                simple = encoding.check_value(name) and simple
                size = len(
                    encoding.canonical_checked(
                        [name, oracle_args], simple, max_bytes=MAX_ORACLE_BYTES
                    )
                )
            except EncodingError as exc:  # bytes, too deep or too large for the entry
                raise HostError(
                    "TypeError", f"the oracle's name and arguments cannot be logged: {exc}"
                ) from None
            if oracles.used + size > MAX_ORACLE_BYTES:
                # Refused before it is recorded, live and in replay alike.
                raise HostError(
                    "RangeError",
                    f"this call's oracle records would take more than {MAX_ORACLE_BYTES} bytes",
                )
            return await oracles(str(name), list(oracle_args))
        try:
            return self._files(op, args)
        except ArchiveError as exc:
            name = exc.name if self._v2 else _seed_error_name(op, exc.name)
            raise HostError(name, str(exc)) from None
        except (TypeError, ValueError, IndexError) as exc:
            raise HostError("TypeError", f"{op}: {exc}") from None

    def _files(self, op: str, args: list[Any]) -> Any:
        tx = self._tx
        path = args[0] if args else "/"
        if op == "files.getInfo":
            info = tx.info()
            if self._identity is not None:
                info["url"], info["title"] = self._identity
            return info
        if op == "files.stat":
            return tx.stat_now(path).to_dict()
        if op == "files.readFile":
            return tx.read_file_now(path, args[1] if len(args) > 1 else "utf8")
        if op == "files.readdir":
            if self._v2:
                return tx.readdir_now(path)
            recursive, with_stat = _readdir_options(args[1] if len(args) > 1 else None)
            if not (recursive or with_stat):
                return tx.readdir_now(path)
            entries = tx.readdir_stats_now(path, recursive=recursive, limit=MAX_LISTED_ENTRIES)
            if not with_stat:
                return [name for name, _ in entries]
            return [{"name": name, "stat": stat.to_dict()} for name, stat in entries]
        if op == "files.writeFile":
            if not self._v2 and isinstance(path, str) and path.endswith("/"):
                raise InvalidPathError(f"{path}: files can not have a trailing slash")
            data = args[1]
            return tx.write_file(path, data, args[2] if len(args) > 2 else "utf8")
        if op == "files.mkdir":
            return tx.mkdir(path)
        if op == "files.unlink":
            return tx.unlink(path)
        if op == "files.rmdir":
            # As Node's fs: options are an object, and recursive a boolean; anything
            # else is refused rather than read as "delete everything below".
            opts = args[1] if len(args) > 1 else None
            if opts is not None and not isinstance(opts, dict):
                raise TypeError("options must be an object, such as {recursive: true}")
            recursive = False if opts is None else opts.get("recursive", False)
            if type(recursive) is not bool:
                raise TypeError("options.recursive must be true or false")
            return tx.rmdir(path, recursive=recursive)
        if op == "files.history":
            return tx.history()
        raise TypeError(f"unknown request {op!r}")


@dataclass(frozen=True)
class CallResult:
    """A logged call: its log index and its result, or the error it logged."""

    seq: int
    value: Any
    error: VMCallError | None


@dataclass
class ReplayStats:
    """What a replay did: entries reproduced and which depend on oracles."""

    entries: int = 0
    oracle_entries: list[int] = field(default_factory=list)
    aborted_entries: list[int] = field(default_factory=list)


class BackendVM:
    """A deterministic, sandboxed JavaScript VM with a signed call log and files archive."""

    def __init__(
        self,
        code: str,
        *,
        call_timeout: float = 5.0,
        memory_limit: int = 64 * 2**20,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        if not isinstance(code, str):
            raise TypeError("code must be a string of JavaScript")
        check_limits(call_timeout, memory_limit)
        self.code = code
        self.call_timeout = call_timeout
        self.memory_limit = memory_limit
        self.max_queue = max_queue
        self.files_archive: FilesArchive = None  # type: ignore[assignment]
        self.call_log: CallLog = None  # type: ignore[assignment]
        self.warnings: list[str] = []
        self._oracles: dict[str, OracleFn] = {}
        self._runtime: JSRuntime | None = None
        self._exports: dict[str, Any] = {}
        self._store: Store | None = None
        self._lock = asyncio.Lock()
        self._queued = 0
        # A callback waits for the event loop's next turn (see _MAX_LOOP_HOLD), since:
        self._turn_pending = False
        self._turn_awaited_since = 0.0
        self._last_timestamp = 0
        self._closed = False
        self._deployed = False
        self._dir_lock: DirectoryLock | None = None
        #: The files archive's URL (as the init entry names it) and title: what
        #: ``getInfo`` shows, live and in replay, wherever the archive is served.
        self._identity: tuple[str, str] | None = None
        self._logger = logger
        # The behaviour version the VM's log runs under: a new log's is this
        # libvms's; a reopened or replayed log keeps the one it was begun with.
        self._prelude_version = PRELUDE_VERSION

    # -- configuration ---------------------------------------------------------

    def add_oracle(self, name: str, fn: OracleFn) -> None:
        """Let scripts call ``System.oracles.<name>(...)``; results are logged for replay."""
        if not isinstance(name, str) or not name:
            raise ValueError("oracle name must be a non-empty string")
        self._oracles[name] = fn

    @property
    def exports(self) -> Mapping[str, Any]:
        """The script's exports as they stood once it loaded, in script order: values
        as JSON, functions as async callables."""
        return dict(self._exports)

    @property
    def methods(self) -> list[str]:
        """Exported function names callable over RPC (everything but ``init``): the
        functions the script exports once it has loaded. A function a call exports
        later is not a method: what an auditor checks is the logged script's."""
        return [
            n for n, v in self._exports.items() if isinstance(v, _ExportedFunction) and n != "init"
        ]

    def _new_runtime(self) -> JSRuntime:
        return JSRuntime(
            call_timeout=self.call_timeout,
            memory_limit=self.memory_limit,
            logger=self._logger,
            prelude_version=self._prelude_version,
        )

    def _load(self, runtime: JSRuntime, timestamp: int) -> dict[str, Any]:
        """Load the script into ``runtime`` and read its exports; returns them.

        Every path that loads the script (deploy, reopen, a rebuild after an
        abort, a replay) reads the exports here and only here, right after the
        load: reading them can run script code (a value's ``toJSON``, a Proxy's
        traps), which must run at the same point live and in every replay.
        """
        runtime.load(self.code, timestamp_ms=timestamp, seed=derive_seed(merkle.EMPTY_ROOT, 0))
        exports: dict[str, Any] = {}
        for name, is_function in runtime.export_names():
            if is_function:
                exports[name] = _ExportedFunction(self, name)
                continue
            try:
                exports[name] = runtime.export_value(name)
            except EncodingError as exc:
                raise ScriptError(f"the script's exports are not JSON: {exc}") from None
        if runtime.prelude_version == "2":
            # Version 2 logs were begun by a deploy that listed the exports once
            # more (to find init): what their script code saw then.
            runtime.export_names()
        return exports

    async def _let_the_loop_turn(self) -> None:
        """Wait for the event loop's next turn if it has not turned for
        ``_MAX_LOOP_HOLD``: calls that arrived together and finish without
        awaiting would otherwise all run before it serves anything else. Calls
        that follow one another from turn to turn, as under load, never wait.

        Outside the VM's lock: a call that waited holding it would put every
        later call through the lock's hand-off, one per turn, and calls would
        no longer group into commits.
        """
        while True:
            if not self._turn_pending:
                self._turn_pending = True
                self._turn_awaited_since = _monotonic()
                asyncio.get_running_loop().call_soon(self._loop_turned)
                return
            since = self._turn_awaited_since
            if _monotonic() - since <= _MAX_LOOP_HOLD:
                return
            await asyncio.sleep(0)
            if self._turn_pending and self._turn_awaited_since == since:
                self._turn_pending = False  # its callback was another loop's

    def _loop_turned(self) -> None:
        self._turn_pending = False

    # -- deploy ----------------------------------------------------------------

    async def deploy(self, dir: str | Path | None = None, title: str = "") -> None:
        """Create the VM's ledgers in ``dir`` (None: memory) and run the script.

        On a directory that already holds this VM, reopen both ledgers (verifying
        them) and rebuild the script's state by replaying the log. A directory
        holding a different script is an error, and so is one that another VM
        holds (:class:`~libvms.errors.DirectoryInUseError`).

        Creating is one commit: the archive's genesis, the init entry and the
        ``init`` call are durable together or not at all, so a crash leaves a
        directory that reopens or one that holds nothing (deployed afresh). An
        ``init`` that throws or runs past a limit fails the deploy the same way:
        :class:`~libvms.errors.ScriptError`, nothing committed, the VM closed, and
        the directory deploys afresh (with the script fixed, say).
        """
        # Held throughout, so that close() waits for the deploy, then undoes it,
        # and a second deploy waits, then finds this one done.
        async with self._lock:
            if self._runtime is not None or self.call_log is not None or self._deployed:
                raise LibVMSError("this VM is already deployed")
            if self._closed:
                raise LibVMSError("this VM is closed")
            lock = None if dir is None else await DirectoryLock.acquire(dir)
            try:
                if dir is not None and Store.exists(dir) and not _discard_uncommitted(Path(dir)):
                    await self._reopen(Path(dir), lock)
                else:
                    await self._create(dir, title, lock)
            except BaseException:
                if lock is not None:
                    lock.release()
                raise
            self._dir_lock = lock

    async def _create(self, dir: str | Path | None, title: str, lock: DirectoryLock | None) -> None:
        """Deploy afresh in one commit."""
        self._prelude_version = PRELUDE_VERSION  # a new log runs this libvms's rules
        timestamp = _now_ms()
        runtime = self._new_runtime()
        try:
            exports = self._load(runtime, timestamp)  # a script that does not load leaves no trace
            marker = None if dir is None else _mark_first_deploy(Path(dir))
            store = Store.open(dir, lock=lock)
        except BaseException:
            runtime.close()
            raise
        try:
            archive = await FilesArchive.create(dir, title, store=store)
            log = CallLog._new(dir, store=store)
        except BaseException:
            runtime.close()
            store.close()
            raise
        self._attach(store, archive, log, runtime, exports)
        self._identity = (archive.url, title)
        log.stage(
            init_entry(
                self.code,
                archive.url,
                filesArchiveTitle=title,
                runtime=runtime_info(),
                timestamp=timestamp,
            )
        )
        self._last_timestamp = timestamp
        try:
            if _runs_init(exports):
                # Its entry joins the same commit as everything staged above.
                result = await self._execute("init", [], None, None, True)  # deploy holds the lock
                if result.error is not None:
                    error = result.error
                    raise ScriptError(
                        f"the script's init failed ({error}), so nothing was deployed"
                    ) from error
            await store.flush()
        except BaseException:
            # Cancelled, interrupted, init failed, or the commit failed: nothing of
            # the deploy may be committed now (a commit already under way completes).
            store.discard_staged()
            self._closed = True
            await self._release()
            raise
        self._deployed = True
        if marker is not None:
            marker.unlink(missing_ok=True)

    def _attach(
        self,
        store: Store,
        archive: FilesArchive,
        log: CallLog,
        runtime: JSRuntime,
        exports: dict[str, Any],
    ) -> None:
        self._store = store
        self.files_archive = archive
        self.call_log = log
        self._runtime = runtime
        self._exports = exports

    async def _reopen(self, directory: Path, lock: DirectoryLock | None) -> None:
        missing = [name for name in _KEY_FILENAMES if not (directory / name).exists()]
        if missing:
            # Opened without its keys, a ledger is a read-only copy: the VM would
            # fail every call that writes, and log those failures for good.
            raise LibVMSError(
                f"{directory} holds a VM's {DB_FILENAME} but not its key file "
                f"{missing[0]}: restore the key files from the same backup as the database"
            )
        store = Store.open(directory, lock=lock)
        try:
            log = await CallLog.open(directory, store=store)
            archive = await FilesArchive.open(directory, store=store)
            init = await log.get(0)
            if not isinstance(init, dict) or init.get("code") != self.code:
                raise LibVMSError(f"{directory} holds a VM with a different script")
            logged = _logged_prelude(init)
            if logged is None:
                self._logger.warning(
                    "%s: %s; its new calls run under prelude %s",
                    directory,
                    "; ".join(runtime_warnings(init)),
                    PRELUDE_VERSION,
                )
            self._prelude_version = logged or PRELUDE_VERSION
            if not same_ledger(str(init.get("filesArchiveUrl")), archive.url):
                raise TamperError(f"{directory}: the call log names another files archive")
        except BaseException:
            store.close()
            raise
        store._refs += 1  # both ledgers hold the shared store
        self._store = store
        self.files_archive = archive
        self.call_log = log
        try:
            await self._rebuild()
        except BaseException:
            # A log that does not replay (tampered, or another engine): the VM
            # stays undeployed and holds nothing open.
            self._store = None
            self.files_archive = None  # type: ignore[assignment]
            self.call_log = None  # type: ignore[assignment]
            try:
                await log.close()
            finally:
                await archive.close()
            raise
        self._identity = _archive_identity(init, archive.title)
        self._deployed = True
        # A deploy whose commit landed but that ended before it could say so.
        (directory / DEPLOYING_FILENAME).unlink(missing_ok=True)

    async def _rebuild(self) -> JSRuntime:
        """A fresh runtime whose state is rebuilt by replaying the whole log.

        The replay runs against a scratch archive in memory and must reproduce
        every logged entry and the archive's state root, or the directory has
        been tampered with.
        """
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        source = self.call_log
        init = await source.get(0)
        runtime = self._new_runtime()
        runtime.rerunning = True  # its console lines were shown when the calls ran
        try:
            runtime.call_timeout = min(self.call_timeout * REBUILD_TIME_FACTOR, MAX_CALL_TIMEOUT)
            exports = self._load(runtime, int(init.get("timestamp", 0)))
            scratch = await FilesArchive.create(None, self.files_archive.title)
        except BaseException:
            runtime.close()
            raise
        try:
            async for seq, entry, raw, produced in self._replay_entries(
                runtime, scratch, source, 1, exports
            ):
                compare_entry(seq, raw, produced, entry)
                if seq % 1000 == 0:
                    scratch.ledger.store.flush_sync()
            if scratch.state_root != self.files_archive.state_root:
                raise TamperError(
                    "the files archive does not match what replaying the call log produces"
                )
        except BaseException:
            runtime.close()
            raise
        finally:
            await scratch.close()
        runtime.rerunning = False
        runtime.call_timeout = self.call_timeout
        self._runtime = runtime
        # The same as before: the load is deterministic, and so is what it exports.
        self._exports = exports
        return runtime

    # -- calls -----------------------------------------------------------------

    async def execute_call(
        self,
        method_name: str,
        args: Sequence[Any] = (),
        user_id: str | None = None,
        *,
        call_fields: Mapping[str, Any] | None = None,
    ) -> Any:
        """Run one logged call and return its result once its entry is durable.

        ``call_fields`` are extra inputs stored in the entry's ``call`` object
        (a signed request). Raises :class:`VMCallError` when the script throws,
        :class:`LimitExceeded` when the call was aborted, and
        :class:`QueueFullError` when too many calls are waiting.
        """
        result = await self.submit(method_name, args, user_id, call_fields=call_fields)
        if result.error is not None:
            raise result.error
        return result.value

    async def submit(
        self,
        method_name: str,
        args: Sequence[Any] = (),
        user_id: str | None = None,
        *,
        call_fields: Mapping[str, Any] | None = None,
    ) -> CallResult:
        """Like :meth:`execute_call`, but a logged failure is returned, not raised.

        Raises only when the call is refused before it is logged (unknown
        method, arguments that are not JSON, full queue, closed VM).
        """
        if self._closed:
            raise LibVMSError("this VM is closed")
        if not self._deployed:
            raise LibVMSError("deploy the VM before calling it")
        function = self._exports.get(method_name)
        if not isinstance(function, _ExportedFunction) or method_name == "init":
            # The deploy runs init, once; no call can.
            raise VMCallError("MethodNotFound", f"{method_name!r} is not an exported function")
        args = list(args)
        try:
            simple = encoding.check_value(args, max_depth=MAX_VALUE_DEPTH)
            if user_id is not None:
                if not isinstance(user_id, str):
                    raise EncodingError("user id must be a string")
                encoding.check_value(user_id)  # a lone surrogate
            size = _encoded_size_bound(args) + 6 * len(user_id or "") + 2
            if call_fields is not None:
                fields = dict(call_fields)
                fields_simple = encoding.check_value(fields)
                size += len(encoding.canonical_checked(fields, fields_simple))
                simple = fields_simple and simple
            if size > MAX_ARGS_BYTES:
                inputs = [args, user_id, dict(call_fields or {})]
                size = len(encoding.canonical_checked(inputs, simple))
                if size > MAX_ARGS_BYTES:
                    raise EncodingError(
                        f"they take {size} bytes (with the user id), more than the "
                        f"{MAX_ARGS_BYTES} allowed"
                    )
        except EncodingError as exc:
            raise VMCallError("TypeError", f"arguments must be JSON values: {exc}") from None
        if self._queued >= self.max_queue:
            raise QueueFullError()
        self._queued += 1
        try:
            await self._let_the_loop_turn()
            async with self._lock:
                result = await self._execute(method_name, args, user_id, call_fields, simple)
        finally:
            self._queued -= 1
        assert self._store is not None
        await self._store.flush()
        return result

    async def _execute(
        self,
        method: str,
        args: list[Any],
        user_id: str | None,
        call_fields: Mapping[str, Any] | None,
        inputs_simple: bool,
    ) -> CallResult:
        """Run one call and stage its entry. ``inputs_simple``: what ``check_value``
        said of the arguments and call fields (see :func:`encoding.canonical_checked`)."""
        if self._runtime is None:
            self._runtime = await self._rebuild()
        runtime = self._runtime
        log, archive = self.call_log, self.files_archive
        seq = log.length
        timestamp = max(_now_ms(), self._last_timestamp)
        self._last_timestamp = timestamp
        call: dict[str, Any] = {}
        if user_id is not None:
            call["userId"] = user_id
        call.update({"methodName": method, "args": args, "timestamp": timestamp})
        if call_fields:
            call.update(call_fields)
        oracles = _LiveOracles(self._oracles)
        host = _Host(archive, timestamp, oracles, self._identity, runtime.prelude_version)
        try:
            outcome = await runtime.call(
                method,
                args,
                caller_id=user_id,
                timestamp_ms=timestamp,
                seed=derive_seed(log.ledger.tree.leaf(0), seq),
                host=host,
            )
        except LimitExceeded as exc:
            err = _error_obj(exc.name, exc.message)
            seq = log.stage(_entry(call, archive, err=err, aborted=True, oracles=oracles.records))
            self._runtime = None
            try:
                self._runtime = await self._rebuild()
            except Exception as failure:
                # The aborted call is logged all the same, and its caller must
                # hear so; the next call tries the rebuild again.
                self._logger.error(
                    "the VM's state could not be rebuilt after an aborted call (%s); "
                    "the next call tries again",
                    failure,
                )
            return CallResult(seq, None, exc)
        except VMCallError as exc:
            if not _vanishes(exc, runtime, self._exports, method):
                self._runtime = None
                raise
            outcome = _vanished(method)
        except BaseException:
            self._runtime = None
            raise
        outcome, result_simple = _loggable(outcome)
        host.commit()
        entry = _outcome_entry(call, archive, outcome, oracles.records)
        if oracles.records:
            seq = log.stage(entry)  # host values: check the whole entry
        else:
            # Everything else in the entry is checked already or is ours (strings,
            # safe integers); _loggable looked at the result.
            simple = inputs_simple and result_simple
            seq = log.stage_canonical(encoding.canonical_checked(entry, simple))
        if outcome.error is not None:
            return CallResult(seq, None, VMCallError(*outcome.error))
        return CallResult(seq, outcome.value if outcome.has_value else None, None)

    async def _replay_entries(
        self,
        runtime: JSRuntime,
        archive: FilesArchive,
        source: CallLog,
        start: int,
        exports: Mapping[str, Any],
    ) -> AsyncIterator[tuple[int, Any, bytes, dict[str, Any]]]:
        """Replay ``source``'s entries from ``start`` on; yields (seq, entry, logged, produced).

        ``exports``: what the script exported once it loaded (its methods).
        """
        runs_init = _runs_init(exports)
        total = source.length
        init_leaf = source.ledger.tree.leaf(0)
        identity = _archive_identity(source.ledger.get(0), archive.title)
        if runs_init and total == 1:
            raise VerificationError(
                "the script exports init, but the log holds no init call (entry 1): "
                "a deploy runs it in the same commit as the init entry",
                index=1,
                field="call.methodName",
                expected="init",
            )
        seq = start
        while seq < total:
            # Read in batches bounded in entries and in bytes (entries go up to 8 MiB).
            raws = source.ledger.raw_range(
                seq, min(total, seq + 1000), max_bytes=_REPLAY_BATCH_BYTES
            )
            for raw in raws:
                if seq % 128 == 127:
                    # A long replay (a VM rebuilt after an abort, an audit) must
                    # not keep the event loop from everything else it serves.
                    await asyncio.sleep(0)
                entry = encoding.parse_verified(raw)
                produced = await self._replay_entry(
                    runtime, archive, entry, seq, init_leaf, exports, identity
                )
                self._last_timestamp = max(self._last_timestamp, int(entry["call"]["timestamp"]))
                yield seq, entry, raw, produced
                seq += 1

    async def _replay_entry(
        self,
        runtime: JSRuntime,
        archive: FilesArchive,
        entry: Any,
        seq: int,
        init_leaf: bytes,
        exports: Mapping[str, Any],
        identity: tuple[str, str],
    ) -> dict[str, Any]:
        """Re-execute logged call ``seq`` on ``archive``; returns the entry it produces.

        ``exports``: what the script exported once it loaded; if that holds a
        function ``init``, entry 1 must be its call.
        ``identity``: the VM's files archive URL and title, for ``getInfo``.
        """
        runs_init = _runs_init(exports)
        try:
            if not isinstance(entry, dict) or entry.get("type") != "call":
                raise TypeError("not a call entry")
            call = entry["call"]
            result = entry["result"]
            method = call["methodName"]
            args = call["args"]
            timestamp = int(call["timestamp"])
            user_id = call.get("userId")
            recorded = result.get("oracles", [])
            if not isinstance(args, list) or not isinstance(method, str):
                raise TypeError("bad method or args")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise VerificationError(
                f"entry {seq} is not a well-formed call entry ({exc})", index=seq
            ) from None
        if method == "init" or (seq == 1 and runs_init):
            _check_init_rule(seq, call, runs_init)
        if result.get("aborted"):
            return _entry(
                call, archive, err=result.get("err"), aborted=True, oracles=recorded or None
            )
        oracles = _RecordedOracles(recorded, seq)
        host = _Host(archive, timestamp, oracles, identity, runtime.prelude_version)
        try:
            outcome = await runtime.call(
                method,
                args,
                caller_id=user_id,
                timestamp_ms=timestamp,
                seed=derive_seed(init_leaf, seq),
                host=host,
            )
        except LimitExceeded as exc:
            raise ReplayLimitError(
                f"entry {seq}: the replay ran past its own limits ({exc}), which the host's "
                "run did not; that says nothing about the host: replay with the host's "
                "call_timeout and memory_limit (or a higher call_timeout)",
                index=seq,
            ) from None
        except VMCallError as exc:
            if not _vanishes(exc, runtime, exports, method):
                # Never a method of the script: no honest host logs a call of it.
                raise VerificationError(
                    f"entry {seq}: {exc}", index=seq, field="call.methodName", found=method
                ) from None
            outcome = _vanished(method)
        host.commit()
        return _outcome_entry(call, archive, _loggable(outcome)[0], oracles.records)

    # -- replay ----------------------------------------------------------------

    @classmethod
    async def from_call_log(
        cls,
        call_log: CallLog,
        assertions: Any,
        dir: str | Path | None = None,
        *,
        check: bool = False,
        call_timeout: float = 5.0,
        memory_limit: int = 64 * 2**20,
        progress: Callable[[int, int], None] | None = None,
        stats: ReplayStats | None = None,
    ) -> BackendVM:
        """Replay ``call_log`` into a fresh VM with its own ledgers (in ``dir``, or memory).

        ``assertions`` (``client.backend_info`` or ``{"files_archive_url": ...}``)
        must name the files archive the log's init entry names, or
        :class:`VerificationError` is raised. With ``check``, each produced entry
        is compared with the logged one as it is produced, and the first
        difference raises :class:`VerificationError`.
        """
        init = await call_log.get(0)
        if not isinstance(init, dict) or init.get("type") != "init":
            raise VerificationError("entry 0 is not an init entry", index=0, field="type")
        expected_url = _assertion(assertions, "files_archive_url", "filesArchiveUrl")
        found_url = init.get("filesArchiveUrl")
        if expected_url is not None and not same_ledger(str(expected_url), str(found_url)):
            raise VerificationError(
                "the call log's files archive is not the one asserted",
                index=0,
                field="filesArchiveUrl",
                expected=expected_url,
                found=found_url,
            )
        code = init.get("code")
        if not isinstance(code, str):
            raise VerificationError("init entry has no script code", index=0, field="code")
        vm = cls(code, call_timeout=call_timeout, memory_limit=memory_limit)
        vm._prelude_version = _logged_prelude(init) or PRELUDE_VERSION
        vm.warnings.extend(runtime_warnings(init))
        runtime = vm._new_runtime()
        try:
            exports = vm._load(runtime, int(init.get("timestamp", 0)))
        except BaseException as exc:
            runtime.close()
            thrown_null = isinstance(exc, ScriptError) and str(exc).split("\n")[0] == "Error: null"
            if isinstance(exc, LimitExceeded) or thrown_null:
                # Where memory runs out depends on the limit: the host's may be higher.
                raise ReplayLimitError(
                    f"the logged script does not load within the replay's limits ({exc}); "
                    "that says nothing about the host: replay with the host's memory_limit "
                    "and call_timeout",
                    index=0,
                ) from None
            if isinstance(exc, ScriptError):
                raise VerificationError(f"the logged script does not load: {exc}", index=0) from exc
            raise
        lock = None
        try:
            lock = None if dir is None else await DirectoryLock.acquire(dir)
            store = Store.open(dir, lock=lock)
        except BaseException:
            runtime.close()
            if lock is not None:
                lock.release()
            raise
        try:
            title = init.get("filesArchiveTitle")
            archive = await FilesArchive.create(
                dir, title if isinstance(title, str) else "replay", store=store
            )
            log = CallLog._new(dir, store=store)
        except BaseException:
            runtime.close()
            store.close()
            if lock is not None:
                lock.release()
            raise
        store._refs += 1
        vm._dir_lock = lock
        vm._attach(store, archive, log, runtime, exports)
        vm._identity = _archive_identity(init, archive.title)
        try:
            log.stage(init)
            await vm.replay_more(call_log, check=check, progress=progress, stats=stats)
        except BaseException:
            # A failed audit leaves no writer process or sandbox behind.
            await vm.close()
            raise
        vm._deployed = True  # a replica: it takes calls, as the original did
        return vm

    async def replay_more(
        self,
        call_log: CallLog,
        *,
        check: bool = True,
        progress: Callable[[int, int], None] | None = None,
        stats: ReplayStats | None = None,
    ) -> int:
        """Continue a replay made by :meth:`from_call_log` with ``call_log``'s newer entries.

        Costs what the new entries cost, not the history: a live auditor keeps
        the replayed VM and feeds it each new batch. Returns the number of
        entries replayed.
        """
        runtime, archive, log, store = self._runtime, self.files_archive, self.call_log, self._store
        if runtime is None or store is None:
            raise LibVMSError("this VM is not a replay in progress")
        stats = stats if stats is not None else ReplayStats()
        first, total = log.length, call_log.length
        async for seq, entry, raw, produced in self._replay_entries(
            runtime, archive, call_log, first, self._exports
        ):
            if check:
                # Equal bytes: the logged entry's verified leaf hash is this one's too.
                compare_entry(seq, raw, produced, entry)
                log.stage_canonical(raw, leaf=call_log.ledger.tree.leaf(seq))
            else:
                log.stage(produced)
            result = entry["result"]
            if result.get("oracles"):
                stats.oracle_entries.append(seq)
            if result.get("aborted"):
                stats.aborted_entries.append(seq)
            if seq % 1000 == 999 or seq == total - 1:
                await store.flush()
                if progress is not None:
                    progress(seq + 1, total)
        stats.entries = log.length
        return total - first

    @property
    def deployed(self) -> bool:
        """Whether :meth:`deploy` (or :meth:`from_call_log`) finished and the VM is not closed."""
        return self._deployed and not self._closed

    async def close(self) -> None:
        """Finish pending commits and release the ledgers and the sandbox."""
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            await self._release()

    async def _release(self) -> None:
        """Close the sandbox, the ledgers and the directory lock (with the VM's lock held)."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None
        try:
            if self.call_log is not None:
                await self.call_log.close()
        finally:
            try:
                if self.files_archive is not None:
                    await self.files_archive.close()
            finally:
                if self._dir_lock is not None:
                    self._dir_lock.release()
                    self._dir_lock = None

    async def __aenter__(self) -> BackendVM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _assertion(assertions: Any, *names: str) -> Any:
    for name in names:
        if isinstance(assertions, Mapping) and name in assertions:
            return assertions[name]
        value = getattr(assertions, name, None)
        if value is not None:
            return value
    return None


def _check_init_rule(seq: int, call: dict[str, Any], runs_init: bool) -> None:
    """Raise :class:`VerificationError` unless ``init`` is called exactly where a
    deploy calls it: as entry 1, with no arguments and no caller, when the script
    exports it, and nowhere else. (A host that ran it again could reset the
    script's state behind its users.)"""
    method = call["methodName"]
    if seq == 1 and runs_init:
        if method != "init":
            raise VerificationError(
                f"entry 1 calls {method!r}, but the script exports init, which a deploy "
                "calls first",
                index=1,
                field="call.methodName",
                expected="init",
                found=method,
            )
        if call["args"] != [] or "userId" in call or "signed" in call:
            raise VerificationError(
                "entry 1 calls init with arguments or a caller; a deploy calls it with neither",
                index=1,
                field="call",
            )
    elif method == "init":
        raise VerificationError(
            f"entry {seq} calls init, which runs once, as entry 1, when the VM is deployed"
            + ("" if runs_init else " (and this script exports no init function)"),
            index=seq,
            field="call.methodName",
            found=method,
        )


def _archive_identity(init: Any, fallback_title: str) -> tuple[str, str]:
    """The files archive's URL and title that ``getInfo`` shows, from the init entry
    (which logs the title since it was added; ``fallback_title`` for older logs)."""
    title = init.get("filesArchiveTitle") if isinstance(init, dict) else None
    url = init.get("filesArchiveUrl") if isinstance(init, dict) else None
    return str(url), title if isinstance(title, str) else fallback_title


def _runs_init(exports: Mapping[str, Any]) -> bool:
    """Whether the loaded script exports a function ``init``: the call a deploy makes
    first (entry 1), and never again."""
    return isinstance(exports.get("init"), _ExportedFunction)


def _mark_first_deploy(directory: Path) -> Path:
    """Leave the marker of a first deploy in ``directory`` (see DEPLOYING_FILENAME);
    refuse key files without a database: they are a VM whose database is missing."""
    if _key_files(directory):
        raise LibVMSError(
            f"{directory} holds key files but no database: restore the VM's "
            f"{DB_FILENAME}, or remove the key files to deploy a new VM there"
        )
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / DEPLOYING_FILENAME
    marker.touch()
    return marker


def foreign_files(directory: Path) -> list[str]:
    """The names in ``directory`` that are not a VM's own files (its database, key
    files, lock and deploy marker), sorted: a deploy there would mix them in."""
    own = {
        DB_FILENAME,
        DB_FILENAME + "-wal",
        DB_FILENAME + "-shm",
        *_KEY_FILENAMES,
        LOCK_FILENAME,
        DEPLOYING_FILENAME,
    }
    try:
        return sorted(p.name for p in directory.iterdir() if p.name not in own)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _key_files(directory: Path) -> list[Path]:
    return [directory / name for name in _KEY_FILENAMES if (directory / name).exists()]


def _discard_uncommitted(directory: Path) -> bool:
    """Whether ``directory``'s database holds nothing committed, so a deploy starts
    afresh there. Key files found with it are discarded only when they are an
    interrupted deploy's (its marker is there): they never signed anything. Other
    key files mean a database lost or replaced, and are an error, not ours to
    delete. Called with the directory locked."""
    if not Store.holds_nothing(directory):
        return False
    keys = _key_files(directory)
    if keys and not (directory / DEPLOYING_FILENAME).exists():
        raise LibVMSError(
            f"{directory} holds key files, but its {DB_FILENAME} holds nothing: restore "
            "the VM's database, or remove the key files to deploy a new VM there"
        )
    for key in keys:
        key.unlink()
    return True


def _entry(
    call: dict[str, Any],
    archive: FilesArchive,
    *,
    res: Any = ABSENT,
    err: Any = None,
    aborted: bool = False,
    oracles: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if res is not ABSENT:
        result["res"] = res
    if err is not None:
        result["err"] = err
    result["filesVersion"] = archive.version
    result["filesRoot"] = archive.state_root
    if oracles:
        result["oracles"] = oracles
    if aborted:
        result["aborted"] = True
    return {"type": "call", "call": call, "result": result}


def _encoded_size_bound(args: list[Any]) -> int:
    """An upper bound of the canonical size of ``args`` (checked JSON values) that
    costs nothing to compute when they are scalars; ``MAX_ARGS_BYTES + 1`` (measure
    them) when they are not."""
    bound = 2
    for arg in args:
        kind = type(arg)
        if kind is str:
            bound += 6 * len(arg) + 3  # every character escaped, the quotes, a comma
        elif kind is int or kind is float or kind is bool or arg is None:
            bound += 26
        else:
            return MAX_ARGS_BYTES + 1
    return bound


def _loggable(outcome: CallOutcome) -> tuple[CallOutcome, bool]:
    """``outcome``, or an ``EncodingError`` in place of a result the log cannot hold
    (nested deeper than :data:`MAX_VALUE_DEPTH`, or larger than
    :data:`MAX_RESULT_BYTES`): decided the same way live and in every replay, so
    such a call is logged and replays like a thrown error. The flag is
    :func:`encoding.check_value`'s answer for the result (see ``canonical_checked``)."""
    value = outcome.value
    if not outcome.has_value:
        error = outcome.error
        if error is not None and (
            len(error[0]) > MAX_ERROR_NAME_CHARS or len(error[1]) > MAX_ERROR_MESSAGE_CHARS
        ):
            return CallOutcome(None, False, _loggable_error(*error), outcome.virtual_ms), True
        return outcome, True
    try:
        simple = encoding.check_value(value, max_depth=MAX_VALUE_DEPTH)
        if 3 * outcome.size > MAX_RESULT_BYTES:  # else it surely fits: no need to encode
            size = len(encoding.canonical(value))
            if size > MAX_RESULT_BYTES:
                raise EncodingError(
                    f"it takes {size} bytes, more than the {MAX_RESULT_BYTES} allowed"
                )
    except EncodingError as exc:
        error = ("EncodingError", f"the result cannot be logged: {exc}")
        return CallOutcome(None, False, error, outcome.virtual_ms), True
    return outcome, simple


def _seed_error_name(op: str, name: str) -> str:
    """The name node-dat-archive gave the files API error libvms names ``name``
    (prelude 3 on; version 2 logs keep libvms's names)."""
    if op in ("files.writeFile", "files.mkdir") and name in ("NotFoundError", "NotADirectoryError"):
        return "ParentFolderDoesntExistError"  # writing needs only the parent to exist
    if name == "AlreadyExistsError" or (op == "files.writeFile" and name == "IsADirectoryError"):
        return "EntryAlreadyExistsError"
    return _SEED_ERROR_NAMES.get(name, name)


_SEED_ERROR_NAMES = {
    "IsADirectoryError": "NotAFileError",
    "NotADirectoryError": "NotAFolderError",
    "DirectoryNotEmptyError": "DestDirectoryNotEmpty",
    "ReadOnlyError": "ArchiveNotWritableError",
}


def _readdir_options(opts: Any) -> tuple[bool, bool]:
    """``readdir``'s ``{recursive, stat}``: as node-dat-archive's, but booleans, as
    ``rmdir``'s options are (anything else is refused, not guessed at)."""
    if opts is None:
        return False, False
    if not isinstance(opts, dict):
        raise TypeError("options must be an object, such as {recursive: true, stat: true}")
    # null reads as absent (false), as undefined members do.
    recursive, with_stat = (
        False if v is None else v for v in (opts.get("recursive"), opts.get("stat"))
    )
    if type(recursive) is not bool or type(with_stat) is not bool:
        raise TypeError("options.recursive and options.stat must be true or false")
    return recursive, with_stat


def _vanishes(
    exc: VMCallError, runtime: JSRuntime, exports: Mapping[str, Any], method: str
) -> bool:
    """Whether ``exc`` says that ``method``, a method of the script once it loaded,
    is one no more: a call's outcome to log (prelude 3 on; version 2 logs never
    held such calls, and their hosts refused them unlogged)."""
    return (
        exc.name == "MethodNotFound"
        and runtime.prelude_version != "2"
        and method != "init"
        and isinstance(exports.get(method), _ExportedFunction)
    )


def _vanished(method: str) -> CallOutcome:
    """The outcome of a call of a method the script exported once it loaded but
    exports no more (a call deleted it): a ``TypeError``, logged and replayed as
    any thrown error, since reaching that verdict may have run script code (a
    Proxy's traps)."""
    return CallOutcome(
        None,
        False,
        ("TypeError", f"{method} is not a function: the script's exports no longer hold it"),
        0,
    )


def _outcome_entry(
    call: dict[str, Any],
    archive: FilesArchive,
    outcome: CallOutcome,
    oracles: list[dict[str, Any]],
) -> dict[str, Any]:
    if outcome.error is not None:
        return _entry(call, archive, err=_error_obj(*outcome.error), oracles=oracles)
    res = outcome.value if outcome.has_value else ABSENT
    return _entry(call, archive, res=res, oracles=oracles)


def differences(expected: Any, found: Any, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Paths (``result.res``...) where two JSON values differ, depth first."""
    if isinstance(expected, dict) and isinstance(found, dict):
        for key in list(expected) + [k for k in found if k not in expected]:
            sub = f"{where}.{key}" if where else key
            if key not in found:
                yield sub, expected[key], None
            elif key not in expected:
                yield sub, None, found[key]
            elif expected[key] != found[key]:
                yield from differences(expected[key], found[key], sub)
        return
    if expected != found or type(expected) is not type(found):
        yield where, expected, found


def _threw_null(entry: Any) -> bool:
    result = entry.get("result") if isinstance(entry, dict) else None
    return isinstance(result, dict) and result.get("err") == {"name": "Error", "message": "null"}


def compare_entry(seq: int, expected: bytes, produced: dict[str, Any], logged: Any = None) -> None:
    """Raise :class:`VerificationError` naming the first differing field unless the
    canonical bytes of ``produced`` equal ``expected``.

    ``logged`` is ``expected`` parsed, when the caller has it: a replayed entry
    holds the logged ``call`` object itself, so then only the results need
    encoding to know whether the whole entries are equal.
    """
    shares_call = (
        isinstance(logged, dict)
        and produced["call"] is logged.get("call")
        and produced["type"] == logged.get("type")
        and len(produced) == len(logged)
    )
    if shares_call and encoding.same_value(produced["result"], logged.get("result")):
        return
    if encoding.canonical(produced) == expected:
        return
    logged = encoding.parse(expected)
    if _threw_null(logged) or _threw_null(produced):
        # What QuickJS throws when memory runs out so completely that it cannot
        # make its error: where it strikes depends on the memory limit, so a run
        # under another limit cannot decide the entry either way.
        raise ReplayLimitError(
            f"entry {seq}: one run ended with a thrown null (what the engine throws when "
            "memory runs out completely) and the other did not: replay with the host's "
            "memory_limit to decide it",
            index=seq,
        )
    diffs = list(differences(logged, produced))
    where, logged_value, replayed_value = diffs[0] if diffs else ("", logged, produced)
    raise VerificationError(
        f"entry {seq}: {where or 'entry'} differs: logged {logged_value!r}, "
        f"replayed {replayed_value!r}",
        index=seq,
        field=where,
        expected=logged_value,
        found=replayed_value,
    )


__all__ = [
    "BackendVM",
    "CallResult",
    "ReplayStats",
    "derive_seed",
    "runtime_info",
]
