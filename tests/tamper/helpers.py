"""Tools for attacking a stored ledger the way a dishonest host would."""

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from libvms.keys import ledger_url, parse_ledger_url
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


@contextlib.asynccontextmanager
async def blob_forging_proxy(
    upstream: str, forged_hash: str
) -> AsyncIterator[Callable[[str], str]]:
    """An HTTP proxy on 127.0.0.1 to ``upstream`` that flips a bit of one blob.

    Yields a function that turns a ledger URL of ``upstream`` into the same
    ledger's URL through the proxy.
    """

    async def handle(request: web.Request) -> web.Response:
        async with (
            aiohttp.ClientSession() as http,
            http.get(upstream + request.path_qs) as response,
        ):
            status, body = response.status, await response.read()
        if request.path.endswith("/blobs/" + forged_hash):
            body = body[:-1] + bytes([body[-1] ^ 1])
        return web.Response(status=status, body=body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"

    def through(real_url: str) -> str:
        location, key = parse_ledger_url(real_url)
        return ledger_url(key, base + location[len(upstream) :])

    try:
        yield through
    finally:
        await runner.cleanup()
