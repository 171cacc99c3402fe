"""Clients that do not read their replies: closed after send_timeout, nothing committed lost."""

import asyncio
import json
import logging
import socket

import pytest

from libvms.rpc import RPCClient, RPCServer
from libvms.vm import BackendVM

SCRIPT = """
exports.foo = () => 'bar'
exports.big = (n) => 'x'.repeat(n)
"""

#: Size of each reply the slow client asks for, and how many it asks for: far more
#: than the kernel's socket buffers and the transport's high-water mark hold.
REPLY_CHARS = 200_000
CALLS = 24


class StallLog(logging.Handler):
    """Sets an event when the server logs that it is closing a connection that does not read."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.closed = asyncio.Event()
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        self.messages.append(message)
        if "could not be sent" in message or "would wait unread" in message:
            self.closed.set()


@pytest.fixture
def stall_log():
    handler = StallLog()
    logger = logging.getLogger("libvms.rpc")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def start(**server_kw):
    vm = BackendVM(SCRIPT)
    await vm.deploy(None)
    server = RPCServer(vm, port=0, **server_kw)
    await server.start()
    return vm, server


def text_frame(text):
    """A masked (zero mask) client text frame."""
    payload = text.encode("utf-8")
    n = len(payload)
    if n < 126:
        header = bytes([0x81, 0x80 | n])
    elif n < 65536:
        header = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return header + b"\x00\x00\x00\x00" + payload


def close_frame(code):
    return b"\x88\x82\x00\x00\x00\x00" + code.to_bytes(2, "big")


class RawClient:
    """A WebSocket client on a plain socket: nothing is read unless the test reads it."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = b""

    @classmethod
    async def connect(cls, port):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window, set before connecting, so the server's writes back up fast.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        client = cls(sock)
        await client.send(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        while b"\r\n\r\n" not in client.buffer:
            data = await loop.sock_recv(sock, 4096)
            assert data, "the server closed the connection during the upgrade"
            client.buffer += data
        head, client.buffer = client.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101")
        return client

    async def send(self, data):
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def frames(self):
        """Read frames until the server ends the connection: (opcode, payload) pairs."""
        loop = asyncio.get_running_loop()
        frames = []
        while True:
            frame = self._parse()
            if frame is not None:
                frames.append(frame)
                if frame[0] == 0x8:
                    # Answer the close, as a client should: the server then closes TCP.
                    await self.send(close_frame(int.from_bytes(frame[1][:2], "big")))
                continue
            try:
                data = await loop.sock_recv(self.sock, 65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return frames
            self.buffer += data

    def _parse(self):
        buf = self.buffer
        if len(buf) < 2:
            return None
        opcode, length, offset = buf[0] & 0x0F, buf[1] & 0x7F, 2
        assert buf[1] & 0x80 == 0, "server frames are not masked"
        if length == 126:
            if len(buf) < 4:
                return None
            length, offset = int.from_bytes(buf[2:4], "big"), 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length, offset = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < offset + length:
            return None
        self.buffer = buf[offset + length :]
        return opcode, buf[offset : offset + length]

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("max_in_flight", [128, 4])
async def test_a_client_that_stops_reading_is_closed_after_send_timeout(stall_log, max_in_flight):
    vm, server = await start(send_timeout=0.2, max_in_flight=max_in_flight)
    slow = None
    try:
        length = vm.call_log.length
        async with RPCClient(server.url(), user="other") as other:
            slow = await RawClient.connect(server.port)
            request = {"jsonrpc": "2.0", "method": "big", "params": [REPLY_CHARS], "user": "slow"}
            await slow.send(
                b"".join(text_frame(json.dumps({**request, "id": i})) for i in range(CALLS))
            )

            # The slow client reads nothing: the server gives up on it, and meanwhile
            # and afterwards other connections are answered.
            async def call_until_closed():
                while not stall_log.closed.is_set():
                    assert await other.foo() == "bar"

            await asyncio.wait_for(call_until_closed(), 30)
            assert await other.foo() == "bar"

            # Now read what the server sent, until it closes the connection.
            frames = await asyncio.wait_for(slow.frames(), 30)
            assert frames, "the server sent nothing"
            opcode, payload = frames[-1]
            assert opcode == 0x8
            assert int.from_bytes(payload[:2], "big") == 1008
            assert payload[2:].decode() == "replies not read within 0.2 s"
            replies = [json.loads(p) for op, p in frames[:-1]]
            assert all(op == 0x1 for op, _ in frames[:-1])
            assert all(r["result"] == "x" * REPLY_CHARS for r in replies)
            assert other.connected
            assert await other.foo() == "bar"

        await server.wait_idle()
        # Every call the slow client got in was run and logged, replied to or not.
        entries = await vm.call_log.list(length)
        slow_calls = [e for e in entries if e["call"]["userId"] == "slow"]
        # With a low in-flight bound, the server had stopped reading the requests
        # behind those running: they were never received, so never logged.
        assert len(replies) <= len(slow_calls) <= CALLS
        if max_in_flight > CALLS:
            assert len(slow_calls) == CALLS
        assert all(e["result"]["res"] == "x" * REPLY_CHARS for e in slow_calls)
        assert any("could not be sent within 0.2 s" in m for m in stall_log.messages)
        async with RPCClient(server.url()) as client:
            assert await client.foo() == "bar"
    finally:
        if slow is not None:
            slow.close()
        await server.close()
        await vm.close()


async def test_a_client_that_reads_is_not_closed_by_the_send_timeout(stall_log):
    vm, server = await start(send_timeout=2.0)
    try:
        async with RPCClient(server.url(), user="reader") as client:
            results = await asyncio.gather(*(client.big(REPLY_CHARS) for _ in range(CALLS)))
            assert results == ["x" * REPLY_CHARS] * CALLS
            assert client.connected
            assert await client.foo() == "bar"
        assert stall_log.messages == []
    finally:
        await server.close()
        await vm.close()


async def test_without_a_send_timeout_a_client_that_stops_reading_is_kept(stall_log):
    vm, server = await start(send_timeout=None)
    slow = None
    try:
        slow = await RawClient.connect(server.port)
        request = {"jsonrpc": "2.0", "id": 1, "method": "big", "params": [REPLY_CHARS]}
        await slow.send(text_frame(json.dumps(request)))
        async with RPCClient(server.url()) as other:
            assert await other.foo() == "bar"
        await slow.send(close_frame(1000))
        frames = await asyncio.wait_for(slow.frames(), 30)
        assert json.loads(frames[0][1])["result"] == "x" * REPLY_CHARS
        assert frames[-1][0] == 0x8
        assert int.from_bytes(frames[-1][1][:2], "big") == 1000
        assert stall_log.messages == []
    finally:
        if slow is not None:
            slow.close()
        await server.close()
        await vm.close()


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_send_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match="send_timeout"):
        RPCServer(send_timeout=timeout)


async def test_http_clients_that_do_not_read_are_bounded_then_dropped(stall_log):
    """Large HTTP bodies count toward max_http_body_bytes while they are sent, and a
    client that does not take them within send_timeout is dropped: clients that
    ask for files and never read cannot make the server hold unbounded memory."""
    import hashlib

    import aiohttp

    from libvms import encoding
    from libvms.remote import fetch_files_archive

    size = 12 * 2**20
    vm = BackendVM("exports.put = async (n) => System.files.writeFile('/big', 'x'.repeat(n))")
    await vm.deploy(None)
    await vm.execute_call("put", [size])
    blob = hashlib.sha256(b"x" * size).hexdigest()
    server = RPCServer(vm, port=0, send_timeout=1.0, max_http_body_bytes=size + size // 2)
    await server.start()
    url = f"{server.http_url()}/files/blobs/{blob}"
    loop = asyncio.get_running_loop()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    try:
        await loop.sock_connect(stalled, ("127.0.0.1", server.port))
        await loop.sock_sendall(
            stalled, f"GET /files/blobs/{blob} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        head = await loop.sock_recv(stalled, 12)  # the server has begun to send: then stop
        assert head == b"HTTP/1.1 200"
        async with aiohttp.ClientSession() as http:
            hashed = []
            real_sha256_hex = encoding.sha256_hex

            def counting(data):
                hashed.append(len(data))
                return real_sha256_hex(data)

            encoding.sha256_hex = counting
            try:
                async with http.get(url) as busy:
                    assert busy.status == 503 and busy.headers["Retry-After"] == "1"
            finally:
                encoding.sha256_hex = real_sha256_hex
            assert size not in hashed  # refused before the file was read and hashed
            # The library's fetch asks again after the delay the server names.
            fetched = await fetch_files_archive(vm.files_archive.url)
            assert stall_log.closed.is_set()  # the stalled client was dropped meanwhile
            assert await fetched.read_file("/big") == "x" * size
            await fetched.close()
            async with http.get(url) as response:
                assert response.status == 200
                assert hashlib.sha256(await response.read()).hexdigest() == blob
            async with http.get(f"{server.http_url()}/log/entries?start=0") as entries:
                assert entries.status == 200  # small bodies are not held back
        assert server._body_bytes == 0
    finally:
        stalled.close()
        await server.close()
        await vm.close()


async def test_a_client_that_leaves_too_many_reply_bytes_unread_is_closed_at_once(stall_log):
    # send_timeout is far off: the bound on unread bytes closes the connection first.
    vm, server = await start(send_timeout=600, max_unsent_bytes=2**20)
    slow = await RawClient.connect(server.port)
    try:
        request = {"jsonrpc": "2.0", "method": "big", "params": [REPLY_CHARS], "user": "slow"}
        await slow.send(
            b"".join(text_frame(json.dumps({**request, "id": i})) for i in range(CALLS))
        )
        await asyncio.wait_for(stall_log.closed.wait(), 30)  # having read nothing till then
        frames = await asyncio.wait_for(slow.frames(), 30)
        opcode, payload = frames[-1]
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1008
        assert payload[2:].decode() == "replies not read: over 1048576 bytes waiting"
        assert any("bytes of replies would wait unread" in m for m in stall_log.messages)
        async with RPCClient(server.url()) as client:
            assert await client.foo() == "bar"
        await server.wait_idle()
        entries = await vm.call_log.list()
        assert sum(e["call"].get("userId") == "slow" for e in entries[1:]) == CALLS  # all logged
        async with RPCClient(server.url()) as reader:  # one large reply goes out whole
            assert await reader.big(3 * 2**20) == "x" * (3 * 2**20)
    finally:
        slow.close()
        await server.close()
        await vm.close()
