"""The writer process of an on-disk store: runs each commit it is sent, fsync included.

A store on disk commits in this child process rather than in a thread of its
own: SQLite's Python module gives up and takes back the GIL around every
statement, and each time it takes it back it waits for the event loop's
thread, which is busy running the next calls. Here the statements, the fsync
and SQLite's checkpoints run on the other core without touching the parent's
GIL; the parent only sends the statements and reads one short reply.

The store starts it as ``python -I writer.py DB`` and sends the parent's
``sys.path`` first (a ``marshal`` list), so it imports what the parent would;
it needs the standard library and ``cryptography``.

Protocol, over the child's standard input and output, each message a 4-byte
big-endian length and that many bytes:

* parent -> child: ``marshal`` data of ``(statements, signatures)``, one
  transaction. ``statements`` is a list of ``(sql, params)``; ``signatures``
  a list of :class:`Signature` fields (signed checkpoints, see below). The
  child runs ``BEGIN IMMEDIATE``, the statements in order, then stores each
  signature's value, and ``COMMIT`` (``synchronous=FULL``: durable when it
  returns).
* child -> parent: ``0x00`` and ``marshal`` data of the signatures' values,
  once the transaction is durable; or ``0x01`` and the error's text after a
  rollback.

Signing here too keeps the Ed25519 signatures (one per commit per changed
ledger, the largest part of a commit's cost on the event loop) on the other core.

An empty message, or end of input (the parent died), ends the child once the
commit in hand is finished. The parent starts it in a session of its own, so
signals meant for the terminal's process group (Ctrl-C) do not reach it.
"""

from __future__ import annotations

import base64
import contextlib
import marshal
import os
import sqlite3
import struct
import sys
from collections.abc import Iterable, Sequence
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


class Signature:
    """A value to sign and store with a commit: a signed note's last line is made here.

    The stored value is ``head + base64(key_id || Ed25519(seed, text)) + LF``,
    run as ``sql`` with parameters ``(key, value)``. Ed25519 is deterministic,
    so the value is the same wherever it is made. ``value`` holds it once the
    commit is durable.
    """

    __slots__ = ("head", "key", "key_id", "seed", "sql", "text", "value")

    def __init__(
        self, sql: str, key: str, text: bytes, head: bytes, key_id: bytes, seed: bytes
    ) -> None:
        self.sql, self.key, self.text, self.head = sql, key, text, head
        self.key_id, self.seed = key_id, seed
        self.value: bytes | None = None

    def fields(self) -> tuple[str, str, bytes, bytes, bytes, bytes]:
        """What the writer process is sent (marshal takes plain tuples only)."""
        return (self.sql, self.key, self.text, self.head, self.key_id, self.seed)


_signers: dict[bytes, Any] = {}  # seed -> Ed25519PrivateKey, a few at a time
_MAX_SIGNERS = 64


def _signed_value(text: bytes, head: bytes, key_id: bytes, seed: bytes) -> bytes:
    signer = _signers.get(seed)
    if signer is None:
        # Imported here, once the parent's sys.path is in place.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if len(_signers) >= _MAX_SIGNERS:  # a process making many VMs (replays) in turn
            _signers.clear()
        signer = _signers[seed] = Ed25519PrivateKey.from_private_bytes(seed)
    return head + base64.b64encode(key_id + signer.sign(text)) + b"\n"


def run(
    conn: sqlite3.Connection,
    statements: Iterable[tuple[str, Any]],
    signatures: Sequence[Sequence[Any]] = (),
) -> list[bytes]:
    """Run ``statements`` and store ``signatures`` (their :meth:`Signature.fields`) as
    one durable transaction, or roll it back and raise. Returns the signed values."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            conn.execute(sql, params)
        values = []
        for sql, key, text, head, key_id, seed in signatures:
            value = _signed_value(text, head, key_id, seed)
            conn.execute(sql, (key, value))
            values.append(value)
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (disk full, an I/O error) may have rolled back already:
        # then ROLLBACK fails too, and its error must not hide the real one.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
    return values


def main() -> None:
    conn = connect(sys.argv[1])
    source, sink = sys.stdin.fileno(), sys.stdout.fileno()
    header = read_exact(source, LENGTH.size)
    paths = read_exact(source, LENGTH.unpack(header)[0]) if header else None
    if paths is None:
        return
    sys.path[:] = marshal.loads(paths)
    while True:
        header = read_exact(source, LENGTH.size)
        if header is None:
            break
        body = read_exact(source, LENGTH.unpack(header)[0])
        if not body:  # end of input, or an empty message: stop
            break
        try:
            reply = b"\x00" + marshal.dumps(run(conn, *marshal.loads(body)))
        except Exception as exc:  # reported to the parent, which fails the commit
            reply = b"\x01" + f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
        try:
            write_all(sink, LENGTH.pack(len(reply)) + reply)
        except BrokenPipeError:
            break  # the parent is gone; the commit stands, as after a crash of its own
    conn.close()
    os._exit(0)  # nothing left to clean up; skips the interpreter's teardown


if __name__ == "__main__":
    main()
