"""The store's group commit: merged INSERTs, commits that overlap, failed commits."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libvms import writer as writer_module
from libvms.log import CallLog
from libvms.store import Store, StoreError, Write, _statements

SCHEMA = "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)"
INSERT = "INSERT INTO t (k, v) VALUES (?, ?)"
REPLACE = "INSERT OR REPLACE INTO t (k, v) VALUES (?, ?)"
IGNORE = "INSERT OR IGNORE INTO t (k, v) VALUES (?, ?)"
UPDATE = "UPDATE t SET v = v || ? WHERE k = ?"
U_INSERT = "INSERT INTO u (k, v) VALUES (?, ?)"
U_IGNORE = "INSERT OR IGNORE INTO u (k, v) VALUES (?, ?)"
INSERTS = [INSERT, REPLACE, IGNORE, U_INSERT, U_IGNORE]

rows = st.tuples(st.integers(0, 30), st.text(max_size=3))
writes = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(INSERTS), rows, st.just(False)),
        st.tuples(st.sampled_from(INSERTS), st.lists(rows, max_size=300), st.just(True)),
        st.tuples(
            st.just(UPDATE), st.tuples(st.text(max_size=2), st.integers(0, 30)), st.just(False)
        ),
    ),
    max_size=12,
)


def _outcome(statements: Any) -> Any:
    """Both tables' rows after running ``statements`` in one transaction, or "failed"."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(SCHEMA)
    conn.execute(SCHEMA.replace(" t ", " u "))
    conn.execute("BEGIN")
    try:
        for sql, params in statements:
            conn.execute(sql, params)
    except sqlite3.IntegrityError:
        return "failed"
    conn.execute("COMMIT")
    return [conn.execute(f"SELECT k, v FROM {t} ORDER BY k").fetchall() for t in "tu"]


def _table(statements: Any) -> list[tuple[Any, ...]]:
    result = _outcome(statements)
    assert result != "failed"
    return result[0]


@given(batch=writes)
def test_merged_statements_do_what_the_writes_one_by_one_would(batch: list[Write]) -> None:
    one_by_one = [
        (sql, row) for sql, params, many in batch for row in (params if many else [params])
    ]
    assert _outcome(_statements(batch)) == _outcome(one_by_one)


def test_inserts_into_other_tables_merge_across_each_other() -> None:
    batch: list[Write] = []
    for k in range(8):  # what a write call stages: blob, archive entry, log entry
        batch += [(U_IGNORE, (k, "blob"), False), (INSERT, (k, "a"), False)]
    batch.append((REPLACE, (100, "checkpoint"), False))  # other text into t: ends the merges
    batch.append((U_IGNORE, (100, "late"), False))
    statements = list(_statements(batch))
    assert [(sql, len(params) // 2) for sql, params in statements] == [
        (_merged_text(U_IGNORE, 8), 8),
        (_merged_text(INSERT, 8), 8),
        (REPLACE, 1),
        (U_IGNORE, 1),
    ]


def _merged_text(sql: str, rows: int) -> str:
    head, _, row = sql.partition("VALUES ")
    return head + "VALUES " + ", ".join([row] * rows)


def test_runs_of_one_insert_become_few_statements() -> None:
    batch: list[Write] = [(INSERT, (k, "x"), False) for k in range(300)]
    batch.append((UPDATE, ("y", 1), False))
    batch.append((INSERT, [(k, "z") for k in range(300, 310)], True))
    statements = list(_statements(batch))
    # Power-of-two chunks, at most 256 rows: 300 = 256 + 32 + 8 + 4, then 10 = 8 + 2.
    assert [len(params) // 2 if sql != UPDATE else 0 for sql, params in statements] == [
        256,
        32,
        8,
        4,
        0,
        8,
        2,
    ]
    assert _table(statements)[1] == (1, "xy")


async def test_writes_staged_during_a_commit_go_into_the_next(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    # Another connection holds the write lock: the writer process waits inside the
    # first commit until it is released.
    other = sqlite3.connect(tmp_path / "libvms.db", isolation_level=None)
    try:
        store.execute_now(SCHEMA)
        before = store.commits
        other.execute("BEGIN IMMEDIATE")
        try:
            store.stage(INSERT, (1, "a"))
            first = asyncio.ensure_future(store.flush())
            await asyncio.sleep(0)  # one turn of the loop: the first commit starts
            store.stage(INSERT, (2, "b"))
            second = asyncio.ensure_future(store.flush())
            store.stage(INSERT, (3, "c"))
            third = asyncio.ensure_future(store.flush())
            await asyncio.sleep(0)
            assert not first.done()
            # Reads go on while a commit waits: they see what is committed.
            assert store.query("SELECT count(*) FROM t") == [(0,)]
        finally:
            other.execute("COMMIT")
        await asyncio.gather(first, second, third)
        assert store.commits - before == 2
        assert store.query("SELECT k, v FROM t ORDER BY k") == [(1, "a"), (2, "b"), (3, "c")]
    finally:
        other.close()
        store.close()


@contextlib.contextmanager
def _held(tmp_path: Path) -> Iterator[tuple[Store, sqlite3.Connection]]:
    """A store with table ``t``, and another connection holding the write lock: the
    store's next commit waits in the writer process until ``other`` commits."""
    store = Store.open(tmp_path)
    other = sqlite3.connect(tmp_path / "libvms.db", isolation_level=None)
    try:
        store.execute_now(SCHEMA)
        other.execute("BEGIN IMMEDIATE")
        yield store, other
    finally:
        other.close()
        store.close()


async def _in_flight_and_queued(store: Store) -> tuple[asyncio.Task[None], asyncio.Task[None]]:
    """Flush row 1 (its commit starts, and waits while another connection holds the
    write lock), then row 2, whose flush queues behind it."""
    store.stage(INSERT, (1, "a"))
    first = asyncio.ensure_future(store.flush())
    await asyncio.sleep(0)
    store.stage(INSERT, (2, "b"))
    second = asyncio.ensure_future(store.flush())
    await asyncio.sleep(0)
    return first, second


@pytest.mark.parametrize("how", ["flush_sync", "close"])
async def test_flushes_queued_behind_a_commit_are_served_by_flush_sync_and_close(
    tmp_path: Path, how: str
) -> None:
    with _held(tmp_path) as (store, other):
        first, second = await _in_flight_and_queued(store)
        other.execute("COMMIT")
        if how == "flush_sync":
            store.flush_sync()
        else:
            store.close()
        await asyncio.wait_for(asyncio.gather(first, second), timeout=30)
    again = Store.open(tmp_path)
    try:
        assert again.query("SELECT k FROM t ORDER BY k") == [(1,), (2,)]
    finally:
        again.close()


@pytest.mark.parametrize("ending", ["cancelled", "abandoned"])
def test_a_flush_left_by_an_ended_loop_does_not_hold_up_the_next(
    tmp_path: Path, ending: str
) -> None:
    with _held(tmp_path) as (store, other):

        async def first() -> None:
            store.stage(INSERT, (1, "a"))
            pending = asyncio.ensure_future(store.flush())
            await asyncio.sleep(0)
            assert not pending.done()

        if ending == "cancelled":
            asyncio.run(first())  # cancels the pending flush as it ends
        else:
            loop = asyncio.new_event_loop()
            loop.run_until_complete(first())
            loop.close()  # closed as it is, the flush still waiting
        other.execute("COMMIT")

        async def second() -> None:
            store.stage(INSERT, (2, "b"))
            await store.flush()

        asyncio.run(asyncio.wait_for(second(), timeout=30))  # fails, not hangs
        assert store.query("SELECT k FROM t ORDER BY k") == [(1,), (2,)]


async def test_an_interrupt_while_flush_sync_reads_a_loop_commit_fails_its_waiters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(tmp_path)
    try:
        store.execute_now(SCHEMA)
        store.stage(INSERT, (1, "a"))
        flushing = asyncio.ensure_future(store.flush())  # a commit the loop starts
        await asyncio.sleep(0)

        def interrupted(fd: int, size: int) -> bytes | None:
            raise KeyboardInterrupt

        monkeypatch.setattr(writer_module, "read_exact", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.flush_sync()
        monkeypatch.undo()
        with pytest.raises(StoreError, match="commit failed"):
            await asyncio.wait_for(flushing, timeout=30)  # resolved, not left waiting
        # The unread reply cannot be taken for a later commit's: the store is failed.
        with pytest.raises(StoreError, match="reopen"):
            store.stage(INSERT, (2, "b"))
    finally:
        store.close()
    again = Store.open(tmp_path)
    try:
        assert again.query("SELECT count(*) FROM t WHERE k = 2") == [(0,)]
    finally:
        again.close()


async def test_an_interrupt_while_sending_fails_every_queued_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _held(tmp_path) as (store, other):
        first, second = await _in_flight_and_queued(store)
        write_all = writer_module.write_all

        def interrupted(fd: int, data: bytes) -> None:
            write_all(fd, data[: len(data) // 2])
            raise KeyboardInterrupt  # half the next commit's message is out

        monkeypatch.setattr(writer_module, "write_all", interrupted)
        other.execute("COMMIT")
        with pytest.raises(KeyboardInterrupt):
            store.flush_sync()  # finishes the first commit, then sends the second
        monkeypatch.undo()
        await asyncio.wait_for(first, timeout=30)
        with pytest.raises(StoreError, match="commit failed"):
            await asyncio.wait_for(second, timeout=30)
        with pytest.raises(StoreError, match="reopen"):
            store.stage(INSERT, (3, "c"))


def test_an_interrupt_while_the_loop_sends_a_commit_fails_every_queued_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The send happens in the event loop's reply handler here, not in flush_sync:
    # a private loop, since the interrupt comes out of it.
    loop = asyncio.new_event_loop()
    try:
        with _held(tmp_path) as (store, other):
            first, second = loop.run_until_complete(_in_flight_and_queued(store))
            write_all = writer_module.write_all

            def interrupted(fd: int, data: bytes) -> None:
                write_all(fd, data[: len(data) // 2])
                raise KeyboardInterrupt

            monkeypatch.setattr(writer_module, "write_all", interrupted)
            other.execute("COMMIT")
            with pytest.raises(KeyboardInterrupt):
                loop.run_until_complete(asyncio.wait_for(first, timeout=30))
            monkeypatch.undo()
            loop.run_until_complete(asyncio.wait_for(first, timeout=30))  # it was durable
            with pytest.raises(StoreError, match="commit failed"):
                loop.run_until_complete(asyncio.wait_for(second, timeout=30))
            with pytest.raises(StoreError, match="reopen"):
                store.stage(INSERT, (3, "c"))
    finally:
        loop.close()


async def test_closing_a_log_after_a_failed_commit_releases_the_store(tmp_path: Path) -> None:
    log = await CallLog.create(tmp_path, code="x", files_archive_url="")
    store = log._ledger.store
    store.stage("INSERT INTO meta (key, value) VALUES (?, ?)", ("same", b"1"))
    store.stage("INSERT INTO meta (key, value) VALUES (?, ?)", ("same", b"2"))
    with pytest.raises(StoreError):
        await store.flush()
    with pytest.raises(StoreError):
        await log.close()  # raises, but releases the database first
    again = Store.open(tmp_path)
    try:
        assert again is not store  # a fresh store: the directory can be reopened
    finally:
        again.close()


def test_a_forked_copy_closing_the_store_leaves_the_writer_to_its_parent(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    try:
        store.execute_now(SCHEMA)
        pid = os.fork()
        if pid == 0:  # the child closes what it inherited, and nothing else
            store.close()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        store.stage(INSERT, (1, "a"))
        store.flush_sync()  # no event loop needed
        assert store.commits == 1
    finally:
        store.close()
    again = Store.open(tmp_path)
    try:
        assert again.query("SELECT k, v FROM t") == [(1, "a")]
    finally:
        again.close()


@pytest.mark.parametrize("failure", ["constraint on disk", "constraint in memory", "killed writer"])
async def test_a_failed_commit_fails_its_waiters_and_keeps_nothing(
    tmp_path: Path, failure: str
) -> None:
    store = Store.open(None if failure == "constraint in memory" else tmp_path)
    try:
        store.execute_now(SCHEMA)
        store.stage(INSERT, (1, "a"))
        await store.flush()
        store.stage(INSERT, (2, "b"))
        if failure == "killed writer":
            assert store._writer is not None
            store._writer._proc.kill()
            store._writer._proc.wait()
        else:
            store.stage(INSERT, (1, "again"))  # violates the primary key
        with pytest.raises(StoreError, match="commit failed"):
            await store.flush()
        with pytest.raises(StoreError, match="reopen"):
            store.stage(INSERT, (3, "c"))
        assert store.query("SELECT k, v FROM t ORDER BY k") == [(1, "a")]
    finally:
        store.close()


class _Label(str):
    def __str__(self) -> str:
        return "not the value"


class _Kind(enum.IntEnum):
    SEVEN = 7


async def test_subclasses_of_the_stored_types_are_stored_as_their_base_type(
    tmp_path: Path,
) -> None:
    # The writer process receives commits through marshal, which takes exact
    # types only; SQLite itself accepts the subclasses. Both stores agree.
    for directory in (tmp_path, None):
        store = Store.open(directory)
        try:
            store.execute_now(SCHEMA)
            store.stage(INSERT, (_Kind.SEVEN, _Label("seven")))
            store.stage_many(INSERT, [(8, "eight"), (True, bytearray(b"one").decode())])
            await store.flush()
            rows = store.query("SELECT k, v FROM t ORDER BY k")
            assert rows == [(1, "one"), (7, "seven"), (8, "eight")]
            assert [type(k) for k, _v in rows] == [int, int, int]
            assert [type(v) for _k, v in rows] == [str, str, str]
            store.stage(INSERT, (9, "nine"))  # the store goes on
            await store.flush()
        finally:
            store.close()


def test_a_writer_whose_parent_is_gone_commits_and_exits_quietly(tmp_path: Path) -> None:
    # The parent died after sending a commit: the reply has nowhere to go. The
    # commit stands (as if the parent had crashed after reading it), and the
    # writer leaves without a traceback on the terminal it shares.
    import marshal
    import subprocess
    import sys

    db = tmp_path / "libvms.db"
    sqlite3.connect(db).execute("CREATE TABLE t (v INTEGER)").connection.close()
    proc = subprocess.Popen(
        [sys.executable, "-I", writer_module.__file__, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdout.close()  # the parent's end of the replies, gone
    for body in (marshal.dumps([]), marshal.dumps(([("INSERT INTO t VALUES (?)", [7])], []))):
        proc.stdin.write(writer_module.LENGTH.pack(len(body)) + body)
    proc.stdin.flush()
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert err == b""
    assert sqlite3.connect(db).execute("SELECT v FROM t").fetchall() == [(7,)]


async def test_a_full_disk_fails_the_commit_with_its_own_cause_and_keeps_what_was_committed(
    tmp_path: Path,
) -> None:
    import resource

    log = await CallLog.create(tmp_path, "code", "libvms:files")
    writer_process = log.ledger.store._writer
    assert writer_process is not None
    # From here on the writer may not grow a file past 256 KiB: the disk is full.
    limit = 256 * 1024
    resource.prlimit(writer_process._proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    acknowledged = 0
    with pytest.raises(StoreError) as info:
        for i in range(1000):
            await log.append({"type": "note", "i": i, "pad": "p" * 2000})
            acknowledged += 1
    assert "disk I/O error" in str(info.value) or "full" in str(info.value)
    assert "cannot rollback" not in str(info.value)
    with contextlib.suppress(StoreError):
        await log.close()
    reopened = await CallLog.open(tmp_path)
    assert reopened.length >= 1 + acknowledged
    await reopened.close()


def test_a_disk_that_fails_is_a_store_error_not_tampering(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A first deploy on a disk that takes no more than 12 KiB per file.
    program = (
        "import asyncio, resource, sys\n"
        "from libvms import BackendVM, TamperError\n"
        "from libvms.store import StoreError\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (12 * 1024, 12 * 1024))\n"
        "try:\n"
        "    asyncio.run(BackendVM('exports.f = () => 1').deploy(dir=sys.argv[1]))\n"
        "except StoreError as exc:\n"
        "    print('StoreError', exc)\n"
        "except TamperError as exc:\n"
        "    print('TamperError', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "vm")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.startswith("StoreError "), (done.stdout, done.stderr)
    assert "check the disk" in done.stdout


def test_a_writer_that_cannot_start_leaves_nothing_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from libvms import store as store_module

    opened: list[sqlite3.Connection] = []
    real_connect = writer_module.connect

    def connect(target: str) -> sqlite3.Connection:
        opened.append(real_connect(target))
        return opened[-1]

    def no_process(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(writer_module, "connect", connect)
    monkeypatch.setattr(store_module, "_Writer", no_process)
    with pytest.raises(OSError, match="Too many open files"):
        Store.open(tmp_path)
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[0].execute("SELECT 1")
