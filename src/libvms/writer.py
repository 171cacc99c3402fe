"""The writer process of an on-disk store: runs each commit it is sent, fsync included.

A store on disk commits in this child process rather than in a thread of its
own: SQLite's Python module gives up and takes back the GIL around every
statement, and each time it takes it back it waits for the event loop's
thread, which is busy running the next calls. Here the statements, the fsync
and SQLite's checkpoints run on the other core without touching the parent's
GIL; the parent only sends the statements and reads one short reply.

Standard library only: the store starts it as ``python -I writer.py DB``
(isolated, so nothing on the parent's path can shadow a standard module).

Protocol, over the child's standard input and output, each message a 4-byte
big-endian length and that many bytes:

* parent -> child: ``marshal`` data of a list of ``(sql, params)``, one
  transaction. The child runs ``BEGIN IMMEDIATE``, the statements in order,
  and ``COMMIT`` (``synchronous=FULL``: durable when it returns).
* child -> parent: an empty message once the transaction is durable, or the
  error's text after a rollback.

End of input (the parent closed the pipe or died) ends the child once the
commit in hand is finished. SIGINT is ignored: Ctrl-C at a terminal reaches
the whole process group, and the parent decides when its writer stops.
"""

from __future__ import annotations

import marshal
import os
import signal
import sqlite3
import struct
import sys
from collections.abc import Iterable
from typing import Any

#: The length prefix of every message, both ways.
LENGTH = struct.Struct(">I")

#: How long a commit waits for another connection's write lock (schema
#: changes the parent makes, or another process on the same directory).
BUSY_TIMEOUT_MS = 30_000


def read_exact(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``, or None at end of input."""
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def connect(path: str) -> sqlite3.Connection:
    """A connection with the settings every store connection uses."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: in WAL mode NORMAL does not fsync at commit, and an append must
    # survive power loss once acknowledged.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA journal_size_limit=67108864")
    return conn


def run(conn: sqlite3.Connection, statements: Iterable[tuple[str, Any]]) -> None:
    """Run ``statements`` as one durable transaction, or roll it back and raise."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            conn.execute(sql, params)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = connect(sys.argv[1])
    source, sink = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        header = read_exact(source, LENGTH.size)
        if header is None:
            break
        body = read_exact(source, LENGTH.unpack(header)[0])
        if body is None:
            break
        try:
            run(conn, marshal.loads(body))
            reply = b""
        except Exception as exc:  # reported to the parent, which fails the commit
            reply = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace") or b"?"
        write_all(sink, LENGTH.pack(len(reply)) + reply)
    conn.close()


if __name__ == "__main__":
    main()
