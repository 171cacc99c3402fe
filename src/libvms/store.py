"""SQLite storage shared by the ledgers of one directory, with group commit.

A VM's call log and files archive live in one database file so that a call's
log entry and its archive mutations commit in one transaction: after a crash
the directory holds both or neither.

Writes are *staged* synchronously (in memory, in order) and made durable by
:meth:`Store.flush`. One writer thread commits everything staged so far in a
single transaction; whatever is staged while that commit's fsync runs goes
into the next one. Many concurrent appends therefore share one fsync and one
checkpoint signature per ledger (group commit), and an append is durable when
its ``await`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from .errors import LibVMSError, TamperError

DB_FILENAME = "libvms.db"

Write = tuple[str, Sequence[Any] | Iterable[Sequence[Any]], bool]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (hash BLOB PRIMARY KEY, data BLOB NOT NULL);
"""


class StoreError(LibVMSError):
    """The database could not be written; the ledgers in it must be reopened."""


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

    Each statement is one step of SQLite, and the writer thread gives up and
    takes back the GIL around every step: a commit of 16 write calls takes 4
    or 5 steps instead of about 50, so it waits far less on the loop's thread.
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


class _Commit(NamedTuple):
    """One commit in flight: who waits for it, whether it wrote, and its outcome."""

    waiters: list[asyncio.Future[None]]
    wrote: bool
    done: Future[None]


class Store:
    """One SQLite database (a file, or memory when ``path`` is None).

    Stores are shared within a process by path, so a call log and a files
    archive opened on the same directory commit together. Use :meth:`open`
    and :meth:`close`, never the constructor.
    """

    _registry: dict[Path, Store] = {}  # noqa: RUF012 - process-wide by design
    _registry_lock = threading.Lock()

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._refs = 1
        self._lock = threading.Lock()
        target = ":memory:" if path is None else str(path)
        try:
            self._conn = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: in WAL mode NORMAL does not fsync at commit, and an append
            # must survive power loss once acknowledged.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA journal_size_limit=67108864")
            self._conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise TamperError(f"database {target} is unreadable: {exc}", where=target) from exc
        self._pending: list[Write] = []
        self._hooks: list[tuple[Callable[[], list[Write]], Callable[[], None]]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._inflight: _Commit | None = None
        self._pump_scheduled = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="libvms-store")
        self._failed: BaseException | None = None
        self.commits = 0

    @classmethod
    def open(cls, directory: str | Path | None) -> Store:
        """Open (or share) the store of ``directory``; None gives a private in-memory store."""
        if directory is None:
            return cls(None)
        path = (Path(directory) / DB_FILENAME).resolve()
        with cls._registry_lock:
            store = cls._registry.get(path)
            if store is not None:
                store._refs += 1
                return store
            path.parent.mkdir(parents=True, exist_ok=True)
            store = cls(path)
            cls._registry[path] = store
            return store

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        """True if ``directory`` already holds a libvms database."""
        return (Path(directory) / DB_FILENAME).exists()

    def close(self) -> None:
        """Drop one reference; the last one closes the database."""
        with self._registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            if self.path is not None:
                self._registry.pop(self.path, None)
        self._executor.shutdown(wait=True)
        with self._lock:
            self._conn.close()

    # -- reads -----------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query now and return all rows."""
        try:
            with self._lock:
                return self._conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise TamperError(f"database read failed: {exc}", where=str(self.path)) from exc

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
            raise TamperError(f"database read failed: {exc}", where=str(self.path)) from exc

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

    def add_commit_hook(self, before: Callable[[], list[Write]], after: Callable[[], None]) -> None:
        """Register a pair of callbacks run on the event loop around each commit.

        ``before`` runs just before a commit and its writes join that commit:
        ledgers add one signed checkpoint covering exactly the entries staged so
        far. ``after`` runs once that commit is durable.
        """
        self._hooks.append((before, after))

    def remove_commit_hook(self, before: Callable[[], list[Write]]) -> None:
        self._hooks = [h for h in self._hooks if h[0] is not before]

    async def flush(self) -> None:
        """Return once everything staged before this call is durable."""
        self._check()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if self.path is not None:
            commit = self._inflight
            if commit is None:
                # The writer is free: start a commit now, not when this task
                # yields, so the calls already queued on the event loop run while
                # its fsync does.
                self._pump(loop)
            elif commit.done.done() and len(self._waiters) >= len(commit.waiters):
                # The writer has finished, but its report waits behind the calls
                # queued on the loop. Once as many calls wait as that commit
                # held, take it and start the next: consecutive commits stay
                # about equal, each half's execution overlapping the other's
                # fsync. (Starting whatever is staged at once makes commits
                # small and slower; waiting for the report makes them lopsided.)
                self._pump(loop)
        elif not self._pump_scheduled:
            # Memory costs nothing to wait for: let every call that is ready to
            # run stage first, so they share one checkpoint signature.
            self._pump_scheduled = True
            loop.call_soon(self._pump, loop)
        await waiter

    def flush_sync(self) -> None:
        """Commit everything staged now, blocking (used by close and tests)."""
        self._check()
        batch = self._take_batch()
        if batch:
            self._commit(batch)
            self._after_commit()

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        """Finish the commit in flight if it is done; start the next if anyone waits.

        Runs when the writer thread reports a commit done, when a memory store's
        calls have staged, and on a flush that finds the writer free or finished.
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
            commit = self._start_commit()
            self._inflight = commit
            if not commit.done.done():
                commit.done.add_done_callback(lambda _: self._wake(loop))
                return

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        # Runs in the writer thread when a commit ends.
        with contextlib.suppress(RuntimeError):  # a closed loop has nobody left to wake
            loop.call_soon_threadsafe(self._pump, loop)

    def _start_commit(self) -> _Commit:
        """Take every waiter and staged write, and start committing them."""
        waiters, self._waiters = self._waiters, []
        batch = self._take_batch()
        if batch and self.path is not None:
            statements = list(_statements(batch))  # prepared here: the writer thread only runs them
            return _Commit(waiters, True, self._executor.submit(self._run, statements))
        done: Future[None] = Future()
        try:
            if batch:
                self._commit(batch)  # memory: nothing to wait for, no thread needed
            done.set_result(None)
        except BaseException as exc:
            done.set_exception(exc)
        return _Commit(waiters, bool(batch), done)

    def _finish(self, commit: _Commit) -> None:
        """Wake the waiters of a finished commit, or fail them and every later one."""
        exc = commit.done.exception()
        if exc is not None:
            self._failed = exc
            for waiter in commit.waiters + self._waiters:
                if not waiter.done():
                    waiter.set_exception(StoreError(f"commit failed: {exc}"))
            self._waiters = []
            return
        if commit.wrote:
            self._after_commit()
        for waiter in commit.waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _take_batch(self) -> list[Write]:
        if not self._pending:
            return []
        batch = self._pending
        self._pending = []
        for before, _after in self._hooks:
            batch.extend(before())
        return batch

    def _after_commit(self) -> None:
        for _before, after in self._hooks:
            after()

    def _commit(self, batch: list[Write]) -> None:
        self._run(list(_statements(batch)))

    def _run(self, statements: list[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self.commits += 1

    def _check(self) -> None:
        if self._failed is not None:
            raise StoreError(
                f"an earlier commit failed ({self._failed}); reopen the ledgers to continue"
            )
