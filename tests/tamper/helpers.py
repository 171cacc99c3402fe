"""Tools for attacking a stored ledger the way a dishonest host would."""

import sqlite3
from pathlib import Path

from libvms.store import DB_FILENAME


def db_path(directory: Path) -> Path:
    return Path(directory) / DB_FILENAME


def sql(directory: Path, statement: str, params: tuple = ()) -> None:
    conn = sqlite3.connect(db_path(directory))
    conn.execute(statement, params)
    conn.commit()
    conn.close()


def flip_bytes_in_file(path: Path, needle: bytes) -> None:
    """Flip one bit of the first occurrence of ``needle`` in the file on disk."""
    data = bytearray(Path(path).read_bytes())
    at = data.find(needle)
    assert at >= 0, f"{needle!r} not found in {path}"
    data[at + len(needle) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))
