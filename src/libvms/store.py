"""SQLite storage shared by the ledgers of one directory, with group commit.

A VM's call log and files archive live in one database file so that a call's
log entry and its archive mutations commit in one transaction: after a crash
the directory holds both or neither.

Writes are *staged* synchronously (in memory, in order) and made durable by
:meth:`Store.flush`. A writer process (:mod:`libvms.writer`) commits
everything staged so far in a single transaction; whatever is staged while
that commit's fsync runs goes into the next one. Many concurrent appends
therefore share one fsync and one checkpoint signature per ledger (group
commit), and an append is durable when its ``await`` returns. Reads use the
store's own connection and see what is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import marshal
import os
import re
import select
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from . import writer
from .errors import DirectoryInUseError, LibVMSError, TamperError
from .writer import Signature

DB_FILENAME = "libvms.db"
LOCK_FILENAME = "libvms.lock"
#: Seconds a deploy waits for another holder of its directory to let go.
LOCK_WAIT = 5.0

Write = tuple[str, Sequence[Any] | Iterable[Sequence[Any]], bool]
#: A commit hook: what joins the commit about to start.
Hook = Callable[[], "list[Write | Signature]"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (hash BLOB PRIMARY KEY, data BLOB NOT NULL);
"""


class StoreError(LibVMSError):
    """The database could not be written; the ledgers in it must be reopened."""


class DirectoryLock:
    """An exclusive hold on a directory, taken by the VM that writes it.

    A ``flock`` on the directory's ``libvms.lock``, so the system drops it when
    its holders exit, however they exit: a crash leaves no stale lock. The
    directory's writer process inherits it (see :meth:`Store.open`), so a writer
    still finishing a dead VM's last commit keeps the next VM out until it is done.
    """

    _held: set[Path] = set()  # noqa: RUF012 - this process's, by design

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self._path = path

    @classmethod
    async def acquire(cls, directory: str | Path, timeout: float = LOCK_WAIT) -> DirectoryLock:
        """Take the lock, waiting up to ``timeout`` seconds for another process to
        let go (a dead VM's writer process takes a moment to see it is alone and
        exit). A directory held in this process is refused at once."""
        path = Path(directory).resolve()
        if path in cls._held:
            raise cls._in_use(path, "in this process")
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILENAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if path in cls._held:  # taken in this process while this one waited
                    raise cls._in_use(path, "in this process")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise cls._in_use(path, "in another process") from None
                # flock has nothing to await: look again shortly.
                await asyncio.sleep(0.02)
        except BaseException:
            os.close(fd)
            raise
        cls._held.add(path)
        return cls(fd, path)

    @staticmethod
    def _in_use(path: Path, where: str) -> DirectoryInUseError:
        return DirectoryInUseError(
            f"{path} is in use by another VM ({where}): one VM at a time may write a directory"
        )

    def release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self._held.discard(self._path)
            os.close(fd)


# An INSERT whose rows can be merged into one multi-row statement: its table, its row.
_INSERT = re.compile(r"INSERT (?:OR [A-Z]+ )?INTO (\w+) .+ VALUES (\(\?(?:, \?)*\))", re.DOTALL)


@functools.lru_cache(maxsize=256)
def _insert_parts(sql: str) -> tuple[str, str, str] | None:
    """``(table, head, row)`` of a mergeable INSERT (``head`` ends before its row), or None."""
    match = _INSERT.fullmatch(sql)
    if match is None:
        return None
    return match.group(1), sql[: match.start(2)], match.group(2)


#: Most rows per merged INSERT (SQLite allows 32,766 parameters per statement).
_ROWS_PER_INSERT = 256


def _statements(batch: list[Write]) -> Iterator[tuple[str, Sequence[Any]]]:
    """The writes of ``batch`` as few statements as give the same result.

    Rows for one INSERT statement are merged into multi-row INSERTs, also when
    INSERTs into other tables come between them (a write call stages a blob,
    an archive entry and a log entry, in turn). Anything else (another
    statement, or an INSERT with other text into a table already being merged)
    first ends every merge, so each table sees its writes in their order.

    Each statement is one call into SQLite in the writer process and one
    tuple to encode for it: a commit of 16 write calls takes 4 or 5
    statements instead of about 50.
    """
    groups: dict[str, list[Sequence[Any]]] = {}  # INSERT text -> rows, in first-seen order
    tables: dict[str, str] = {}  # table -> the INSERT text being merged into it
    for sql, params, many in batch:
        rows: list[Sequence[Any]] = list(params) if many else [params]  # type: ignore[arg-type, list-item]
        parts = _insert_parts(sql)
        if parts is not None and tables.get(parts[0], sql) == sql:
            tables[parts[0]] = sql
            groups.setdefault(sql, []).extend(rows)
            continue
        for text, merged in groups.items():
            yield from _merged(text, merged)
        groups, tables = {}, {}
        if parts is not None:
            tables[parts[0]] = sql
            groups[sql] = rows
            continue
        for row in rows:
            yield sql, row
    for text, merged in groups.items():
        yield from _merged(text, merged)


def _merged(sql: str, rows: list[Sequence[Any]]) -> Iterator[tuple[str, Sequence[Any]]]:
    parts = _insert_parts(sql)
    assert parts is not None
    _table, head, row_sql = parts
    # Chunks of power-of-two sizes keep the distinct statement texts few, so
    # SQLite's prepared-statement cache still serves them.
    start, left = 0, len(rows)
    while left:
        size = min(_ROWS_PER_INSERT, 1 << (left.bit_length() - 1))
        chunk = rows[start : start + size]
        yield head + ", ".join([row_sql] * size), [value for row in chunk for value in row]
        start += size
        left -= size


class _Outcome:
    """How a commit ended, once it has: ``concurrent.futures.Future``'s methods that
    the store uses, without its lock (a store is used from one thread at a time,
    and this is read several times per call)."""

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = False
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def set_result(self, _value: None) -> None:
        self._done = True

    def set_exception(self, error: BaseException) -> None:
        self._done, self._error = True, error

    def exception(self) -> BaseException | None:
        """The commit's error; only once it is done."""
        if not self._done:
            raise RuntimeError("the commit is still in flight")
        return self._error

    def result(self) -> None:
        """Raise the commit's error, if it failed; call only once it is done."""
        error = self.exception()
        if error is not None:
            raise error


class _Commit(NamedTuple):
    """One commit in flight: who waits for it, whether it wrote, and its outcome."""

    waiters: list[asyncio.Future[None]]
    wrote: bool
    done: _Outcome


class _Writer:
    """The writer process of one database file, and the one commit it may hold.

    Messages and replies pair up strictly, one commit at a time. If an exchange
    is cut short (an interrupt or error mid-write or mid-read), the pairing can
    no longer be trusted: the process is killed and every later use fails.
    """

    def __init__(self, path: Path, inherit: tuple[int, ...] = ()) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", writer.__file__, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            pass_fds=inherit,
            # Its own session: Ctrl-C, SIGQUIT and SIGHUP for the terminal's
            # process group do not reach it; it ends when told to, or when its
            # parent's end of the pipe closes.
            start_new_session=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._sink = self._proc.stdin.fileno()
        self.source = self._proc.stdout.fileno()
        self.pending: _Outcome | None = None
        self._broken: str | None = None
        self._owner = os.getpid()  # a forked copy of this object must not stop the writer
        self._poll = select.poll()
        self._poll.register(self.source, select.POLLIN)
        self._signatures: list[Signature] = []
        # First message: the parent's import path, for the signing library.
        self._write(marshal.dumps([p for p in sys.path if isinstance(p, str)]))

    def _write(self, body: bytes) -> None:
        try:
            writer.write_all(self._sink, writer.LENGTH.pack(len(body)))
            writer.write_all(self._sink, body)
        except BaseException as exc:
            self._break(f"sending a commit failed ({type(exc).__name__}: {exc})")
            raise

    def _break(self, why: str) -> None:
        self._broken = why
        with contextlib.suppress(OSError):
            self._proc.kill()

    def send(
        self, statements: list[tuple[str, Sequence[Any]]], signatures: list[Signature]
    ) -> _Outcome:
        """Start committing ``statements`` and ``signatures``; the future is done once
        :meth:`receive` ran, and each signature's value is set then."""
        assert self.pending is None, "one commit at a time"
        done = _Outcome()
        if self._broken is not None:
            done.set_exception(StoreError(f"the writer process was stopped: {self._broken}"))
            return done
        fields = [sig.fields() for sig in signatures]
        try:
            body = marshal.dumps((statements, fields))
        except ValueError:
            # marshal takes exact built-in types only; SQLite stores a subclass
            # (an IntEnum, a str subclass) as its base type, and so does this.
            statements = [(sql, [_exact(v) for v in params]) for sql, params in statements]
            try:
                body = marshal.dumps((statements, fields))
            except ValueError as exc:
                done.set_exception(StoreError(f"a staged value cannot be stored: {exc}"))
                return done
        try:
            self._write(body)
        except OSError as exc:
            done.set_exception(StoreError(f"the writer process is gone ({exc})"))
            return done
        self.pending = done
        self._signatures = signatures
        return done

    def replied(self) -> bool:
        """Whether the pending commit's reply can be read without waiting."""
        return self.pending is not None and bool(self._poll.poll(0))

    def receive(self) -> None:
        """Read the pending commit's reply (blocks until it comes) and settle its future."""
        done = self.pending
        if done is None:
            return
        signatures = self._signatures
        try:
            header = writer.read_exact(self.source, writer.LENGTH.size)
            reply = (
                writer.read_exact(self.source, writer.LENGTH.unpack(header)[0]) if header else None
            )
            if reply is not None and reply[:1] == b"\x00":
                for signature, value in zip(signatures, marshal.loads(reply[1:]), strict=True):
                    signature.value = value
        except BaseException as exc:
            self.pending, self._signatures = None, []
            self._break(f"reading a reply failed ({type(exc).__name__}: {exc})")
            done.set_exception(StoreError(f"the writer process was stopped: {self._broken}"))
            raise
        self.pending, self._signatures = None, []
        if reply is None:
            done.set_exception(StoreError(f"the writer process exited (code {self._proc.poll()})"))
        elif reply[:1] != b"\x00":
            done.set_exception(StoreError(reply[1:].decode("utf-8", "replace")))
        else:
            done.set_result(None)

    def close(self) -> None:
        """Finish the pending commit, then end the process."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        if os.getpid() != self._owner:
            # A forked process closing what it inherited: only its copies of the pipes.
            self._proc.stdin.close()
            self._proc.stdout.close()
            return
        try:
            self.receive()
            if self._broken is None:
                with contextlib.suppress(OSError):
                    self._write(b"")  # an empty message: stop (other processes may hold the pipe)
        finally:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hung SQLite
                self._proc.kill()
                self._proc.wait()
            self._proc.stdout.close()


# SQLite's primary result codes for a disk or system that failed, not for data
# that is not what was written: busy, locked, no memory, read-only, I/O error,
# disk full, cannot open, no permission.
_SYSTEM_FAILURES = frozenset({3, 5, 6, 7, 8, 10, 13, 14, 23})


def _read_error(exc: sqlite3.DatabaseError, what: str, where: str) -> LibVMSError:
    """A failed read as the error it is: :class:`StoreError` when the disk or the
    system failed (``disk I/O error``, ``database or disk is full``), else
    :class:`TamperError` (a corrupt page, a file that is not a database)."""
    if isinstance(exc, sqlite3.ProgrammingError):  # a closed connection: our own doing
        return StoreError(f"{what}: {exc}")
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _SYSTEM_FAILURES:
        return StoreError(f"{what}: {exc}; the data may be intact, check the disk and retry")
    return TamperError(f"{what}: {exc}", where=where)


def _exact(value: Any) -> Any:
    """A subclass of ``str``, ``int``, ``float`` or ``bytes`` (bool aside) as the base
    value SQLite stores for it; anything else as it is.

    The base types' own conversions copy the value itself, whatever a subclass
    makes of ``str()`` or ``int()``. A subclass SQLite adapts (``__conform__``, a
    registered adapter) is left alone: marshal refuses it, and so does the commit.
    """
    kind = type(value)
    if kind in _EXACT or hasattr(value, "__conform__"):
        return value
    if (kind, sqlite3.PrepareProtocol) in sqlite3.adapters:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, bytes):
        return bytes(memoryview(value))  # the buffer itself, not a __bytes__ of its own
    return value


_EXACT = frozenset({str, int, float, bytes, bool, type(None)})


def _resolved() -> _Outcome:
    done = _Outcome()
    done.set_result(None)
    return done


def _waiting(waiter: asyncio.Future[None]) -> bool:
    """Whether ``waiter`` still waits (its event loop may have ended without cancelling it)."""
    return not waiter.done() and not waiter.get_loop().is_closed()


class Store:
    """One SQLite database (a file, or memory when ``path`` is None).

    Stores are shared within a process by path, so a call log and a files
    archive opened on the same directory commit together. Use :meth:`open`
    and :meth:`close`, never the constructor.
    """

    _registry: dict[Path, Store] = {}  # noqa: RUF012 - process-wide by design
    _registry_lock = threading.Lock()

    def __init__(self, path: Path | None, inherit: tuple[int, ...] = ()) -> None:
        self.path = path
        self._refs = 1
        self._lock = threading.RLock()
        target = ":memory:" if path is None else str(path)
        try:
            self._conn = writer.connect(target)
        except sqlite3.DatabaseError as exc:
            raise _read_error(exc, f"database {target} is unreadable", target) from exc
        try:
            self._conn.executescript(_SCHEMA)
            # Started now, so that its start-up overlaps whatever comes before the
            # first commit.
            self._writer: _Writer | None = None if path is None else _Writer(path, inherit)
        except BaseException as exc:
            self._conn.close()  # nothing may stay open: not even out of file descriptors
            if isinstance(exc, sqlite3.DatabaseError):
                raise _read_error(exc, f"database {target} is unreadable", target) from exc
            raise
        self._pending: list[Write] = []
        self._hooks: list[tuple[Hook, Callable[[], None]]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._inflight: _Commit | None = None
        self._pump_scheduled = False
        self._reading: asyncio.AbstractEventLoop | None = None  # watches the writer's replies
        self._failed: BaseException | None = None
        self.commits = 0

    @classmethod
    def open(cls, directory: str | Path | None, *, lock: DirectoryLock | None = None) -> Store:
        """Open (or share) the store of ``directory``; None gives a private in-memory store.

        ``lock``, the directory's :class:`DirectoryLock`, is handed down to the writer
        process when this starts one.
        """
        if directory is None:
            return cls(None)
        path = (Path(directory) / DB_FILENAME).resolve()
        with cls._registry_lock:
            store = cls._registry.get(path)
            if store is not None:
                store._refs += 1
                return store
            path.parent.mkdir(parents=True, exist_ok=True)
            store = cls(path, () if lock is None else (lock.fd,))
            cls._registry[path] = store
            return store

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        """True if ``directory`` already holds a libvms database."""
        return (Path(directory) / DB_FILENAME).exists()

    @classmethod
    def holds_nothing(cls, directory: str | Path) -> bool:
        """True if ``directory``'s database exists but not one row was ever committed
        to it (its tables may exist: they are made before the first commit)."""
        path = Path(directory) / DB_FILENAME
        try:
            conn = sqlite3.connect(str(path), isolation_level=None)
        except sqlite3.Error:
            return False
        try:
            listed = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = [row[0] for row in listed]
            for table in tables:
                if conn.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchone() is not None:
                    return False
        except sqlite3.Error:
            return False  # unreadable: opening it says why
        finally:
            conn.close()
        return True

    def close(self) -> None:
        """Drop one reference; the last one closes the database (later calls do nothing)."""
        with self._registry_lock:
            if self._refs <= 0:
                return
            self._refs -= 1
            if self._refs > 0:
                return
            if self.path is not None and self._registry.get(self.path) is self:
                del self._registry[self.path]
        try:
            if self._failed is None and (self._inflight is not None or self._waiters):
                self.flush_sync()  # nobody may be left waiting on a closed store
        finally:
            self._stop_reading()
            writer_process, self._writer = self._writer, None
            try:
                if writer_process is not None:
                    writer_process.close()
            finally:
                with self._lock:
                    self._conn.close()

    # -- reads -----------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query now and return all rows."""
        try:
            with self._lock:
                return self._conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise _read_error(exc, "database read failed", str(self.path)) from exc

    def iterate(self, sql: str, params: Sequence[Any] = (), chunk: int = 10_000) -> Iterable[Any]:
        """Yield rows of a read query in chunks, without holding them all in memory."""
        try:
            with self._lock:
                cursor = self._conn.execute(sql, params)
                rows = cursor.fetchmany(chunk)
            while rows:
                yield from rows
                with self._lock:
                    rows = cursor.fetchmany(chunk)
        except sqlite3.DatabaseError as exc:
            raise _read_error(exc, "database read failed", str(self.path)) from exc

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Make the reads inside one read transaction: one consistent state, even
        while commits land (from this process's writer or another process)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error:
                    # Only reads happened: nothing to keep, and a read that met the
                    # damage (a corrupt page, say) raised what it found already.
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")

    def execute_now(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one write immediately in its own transaction (schema setup, tests)."""
        with self._lock:
            self._conn.execute(sql, params)

    # -- writes ----------------------------------------------------------------

    def stage(self, sql: str, params: Sequence[Any]) -> None:
        """Stage one write for the next commit."""
        self._check()
        self._pending.append((sql, params, False))

    def stage_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Stage a write executed once per row for the next commit."""
        self._check()
        self._pending.append((sql, list(rows), True))

    def discard_staged(self) -> None:
        """Drop every write staged since the last commit started: none of it is committed
        (and, with nothing staged, the next flush signs nothing either)."""
        self._pending = []

    def add_commit_hook(self, before: Hook, after: Callable[[], None]) -> None:
        """Register a pair of callbacks run on the event loop around each commit.

        ``before`` runs just before a commit and its writes join that commit:
        ledgers add one signed checkpoint covering exactly the entries staged so
        far, as a :class:`~libvms.writer.Signature` that the writer signs. ``after``
        runs once that commit is durable (and its signatures' values are set).
        """
        self._hooks.append((before, after))

    def remove_commit_hook(self, before: Hook) -> None:
        self._hooks = [h for h in self._hooks if h[0] is not before]

    async def flush(self) -> None:
        """Return once everything staged before this call is durable."""
        self._check()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if self.path is not None:
            commit = self._inflight
            if commit is None or commit.done.done():
                # The writer is free: start a commit now, not when this task
                # yields, so the calls already queued on the event loop run while
                # its fsync does. (A commit already done had its reply read where
                # an interrupt cut the rest short: it is finished first.)
                self._pump(loop)
            elif self._reading is not loop:
                # The commit in flight was started on another event loop (one
                # that has ended): this loop reads its reply and goes on.
                self._read_replies(loop)
            elif len(self._waiters) >= len(commit.waiters) and self._finished(commit):
                # The writer has finished, but its reply waits behind the calls
                # queued on the loop. Once as many calls wait as that commit
                # held, take it and start the next: consecutive commits stay
                # about equal, each half's execution overlapping the other's
                # fsync. (Starting whatever is staged at once makes commits
                # small and slower; waiting for the loop to read the reply makes
                # them lopsided: 15 calls and 1.)
                self._pump(loop)
        elif not self._pump_scheduled:
            # Memory costs nothing to wait for: let every call that is ready to
            # run stage first, so they share one checkpoint signature.
            self._pump_scheduled = True
            loop.call_soon(self._pump, loop)
        await waiter

    def flush_sync(self) -> None:
        """Commit everything staged now, blocking (used by close and tests).

        Waiters of a flush in progress are woken too: their writes are in.
        """
        self._check()
        commit = self._inflight
        if commit is not None:
            # A commit the event loop started: it ends first.
            self._inflight = None
            try:
                if not commit.done.done():
                    self._stop_reading()
                    assert self._writer is not None
                    self._writer.receive()
            finally:
                if not commit.done.done():
                    # Cut short before its reply was read: what became of it is unknown.
                    commit.done.set_exception(StoreError("the commit was interrupted"))
                self._finish(commit)
            self._check()
        commit = self._commit_now()
        self._finish(commit)
        exc = commit.done.exception()
        if exc is not None:
            if not isinstance(exc, Exception):
                raise exc  # an interrupt stays one (the store is failed all the same)
            raise StoreError(f"commit failed: {exc}") from exc

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        """Finish the commit in flight if it is done; start the next if anyone waits.

        Runs when the writer's reply arrives, when a memory store's calls have
        staged, and on a flush that finds the writer free or finished.
        """
        self._pump_scheduled = False
        while True:
            commit = self._inflight
            if commit is not None:
                if not commit.done.done():
                    return
                self._inflight = None
                self._finish(commit)
            if not self._waiters or self._failed is not None:
                return
            commit = self._start_commit(loop)
            self._inflight = commit
            if not commit.done.done():
                return

    def _start_commit(self, loop: asyncio.AbstractEventLoop) -> _Commit:
        """Take every waiter and staged write, and start committing them."""
        if self.path is None:
            return self._commit_now()  # memory: nothing to wait for
        waiters, self._waiters = self._waiters, []
        try:
            batch, signatures = self._take_batch()
            if not batch:
                return _Commit(waiters, False, _resolved())
            assert self._writer is not None, "the store is closed"
            done = self._writer.send(list(_statements(batch)), signatures)
        except BaseException as exc:
            # Nothing of it reached the writer whole: fail everyone now.
            failed = _Outcome()
            failed.set_exception(exc)
            self._finish(_Commit(waiters, True, failed))
            raise
        if not done.done():
            self._read_replies(loop)
        return _Commit(waiters, True, done)

    def _commit_now(self) -> _Commit:
        """Commit every waiter's and every staged write now, blocking."""
        waiters, self._waiters = self._waiters, []
        done = _Outcome()
        wrote = False
        try:
            batch, signatures = self._take_batch()
            wrote = bool(batch)
            if batch:
                self._commit(batch, signatures)
            done.set_result(None)
        except BaseException as exc:
            done.set_exception(exc)
            wrote = True
        return _Commit(waiters, wrote, done)

    def _finished(self, commit: _Commit) -> bool:
        """Whether ``commit`` is done, reading the writer's reply if it is there."""
        if not commit.done.done() and self._writer is not None and self._writer.replied():
            self._writer.receive()
        return commit.done.done()

    def _read_replies(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have ``loop`` read the writer's reply when it comes (no thread involved)."""
        if self._reading is loop:
            return
        self._stop_reading()
        assert self._writer is not None
        loop.add_reader(self._writer.source, self._on_reply, loop)
        self._reading = loop

    def _stop_reading(self) -> None:
        loop, self._reading = self._reading, None
        if loop is not None and self._writer is not None and not loop.is_closed():
            loop.remove_reader(self._writer.source)

    def _on_reply(self, loop: asyncio.AbstractEventLoop) -> None:
        writer = self._writer
        if writer is None or writer.pending is None:
            self._stop_reading()
            self._pump(loop)  # a commit whose reply was read elsewhere may wait to finish
            return
        # A flush may have read this reply already and sent the next commit:
        # never block the loop waiting for that one.
        if writer.replied():
            writer.receive()
            self._pump(loop)

    def _finish(self, commit: _Commit) -> None:
        """Wake the waiters of a finished commit, or fail them and every later one."""
        exc = commit.done.exception()
        if exc is not None:
            self._failed = exc
            for waiter in commit.waiters + self._waiters:
                if _waiting(waiter):
                    waiter.set_exception(
                        StoreError(f"commit failed: {str(exc) or type(exc).__name__}")
                    )
            self._waiters = []
            return
        if commit.wrote:
            self.commits += 1
            self._after_commit()
        for waiter in commit.waiters:
            if _waiting(waiter):
                waiter.set_result(None)

    def _take_batch(self) -> tuple[list[Write], list[Signature]]:
        if not self._pending:
            return [], []
        batch = self._pending
        self._pending = []
        signatures: list[Signature] = []
        for before, _after in self._hooks:
            for item in before():
                if isinstance(item, Signature):
                    signatures.append(item)
                else:
                    batch.append(item)  # type: ignore[arg-type]
        return batch, signatures

    def _after_commit(self) -> None:
        for _before, after in self._hooks:
            after()

    def _commit(self, batch: list[Write], signatures: list[Signature]) -> None:
        """Commit ``batch`` and ``signatures`` now, blocking until they are durable."""
        statements = list(_statements(batch))
        if self.path is None:
            with self._lock:
                values = writer.run(self._conn, statements, [s.fields() for s in signatures])
            for signature, value in zip(signatures, values, strict=True):
                signature.value = value
        else:
            process = self._writer
            assert process is not None, "the store is closed"
            done = process.send(statements, signatures)
            if not done.done():
                process.receive()
            done.result()

    def _check(self) -> None:
        if self._failed is not None:
            why = str(self._failed) or type(self._failed).__name__
            raise StoreError(f"an earlier commit failed ({why}); reopen the ledgers to continue")
