"""Bad input over RPC: each case gets a clear error or a clean close, and nothing else breaks."""

import asyncio
import contextlib
import gc
import json
import logging

import aiohttp
import pytest

from libvms.errors import ConnectError, LibVMSError, QueueFullError, RPCError
from libvms.rpc import ErrorCode, RPCClient, RPCServer
from libvms.vm import BackendVM

SCRIPT = """
exports.foo = () => 'bar'
exports.echo = (...args) => args
exports.hold = async () => { await System.oracles.gate(); return 'held' }
"""


class Gate:
    """An oracle that blocks a call until the test opens it."""

    def __init__(self):
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def __call__(self):
        self.entered.set()
        await self.opened.wait()
        return 1


async def start(max_queue=1000, **server_kw):
    vm = BackendVM(SCRIPT, max_queue=max_queue)
    gate = Gate()
    vm.add_oracle("gate", gate)
    await vm.deploy(None)
    server = RPCServer(vm, port=0, **server_kw)
    await server.start()
    return vm, server, gate


@pytest.fixture
async def served():
    vm, server, gate = await start(max_message_bytes=4096)
    yield vm, server, gate
    gate.opened.set()
    await server.close()
    await vm.close()


async def still_works(server):
    async with RPCClient(server.url()) as client:
        assert await client.foo() == "bar"


async def exchange(ws, text):
    await ws.send_str(text)
    msg = await ws.receive()
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


@pytest.mark.parametrize(
    ("text", "code", "fragment"),
    [
        ("{not json", ErrorCode.PARSE_ERROR, "invalid JSON"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "foo", "params": [NaN]}', -32700, "NaN"),
        ('{"jsonrpc": "2.0", "id": 1, "id": 2, "method": "foo"}', -32700, "duplicate"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "echo", "params": [1e400]}', -32700, "large"),
        ('{"jsonrpc": "2.0", "id": "\\udc00", "method": "handshake"}', -32700, "surrogate"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "echo", "user": "\\ud800"}', -32700, "surrogate"),
        (
            '{"jsonrpc": "2.0", "id": 1, "method": "echo", "params": [' + "9" * 400 + "]}",
            ErrorCode.PARSE_ERROR,
            "too large",
        ),
        ("[" * 80 + "]" * 80, ErrorCode.PARSE_ERROR, "nested deeper"),
        (
            '{"jsonrpc": "2.0", "id": 1, "method": "echo", "params": ' + "[" * 70 + "]" * 70 + "}",
            ErrorCode.PARSE_ERROR,
            "nested deeper",
        ),
        ('[{"jsonrpc": "2.0", "id": 1, "method": "foo"}]', ErrorCode.INVALID_REQUEST, "batch"),
        ('"hello"', ErrorCode.INVALID_REQUEST, "JSON object"),
        ('{"jsonrpc": "1.0", "id": 1, "method": "foo"}', ErrorCode.INVALID_REQUEST, "2.0"),
        ('{"jsonrpc": "2.0", "id": 1, "method": 5}', ErrorCode.INVALID_REQUEST, "method"),
        ('{"jsonrpc": "2.0", "id": [1], "method": "foo"}', ErrorCode.INVALID_REQUEST, "id"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "foo", "x": 1}', -32600, "unknown"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "foo", "params": 3}', -32600, "array"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "foo", "user": 3}', -32600, "user"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "foo", "signed": 3}', -32600, "signed"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"a": 1}}', -32602, "array"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "nope", "params": []}', -32601, "not found"),
        ('{"jsonrpc": "2.0", "id": 1, "method": "handshake", "params": [1]}', -32602, "no params"),
    ],
)
async def test_malformed_requests_get_json_rpc_errors(served, text, code, fragment):
    vm, server, _ = served
    length = vm.call_log.length
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
        reply = await exchange(ws, text)
        assert reply["jsonrpc"] == "2.0"
        assert reply["error"]["code"] == code
        assert fragment in reply["error"]["message"]
        assert reply["error"]["data"]["message"] == reply["error"]["message"]
        # The same connection keeps working.
        ok = await exchange(ws, '{"jsonrpc": "2.0", "id": 9, "method": "foo"}')
        assert ok["result"] == "bar"
    assert vm.call_log.length == length + 1


async def test_parse_errors_have_a_null_id(served):
    _, server, _ = served
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
        reply = await exchange(ws, "{")
    assert reply["id"] is None


async def test_an_oversized_message_closes_with_1009_and_a_reason(served):
    vm, server, _ = served
    length = vm.call_log.length
    big = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": ["x" * 5000]})
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
        await ws.send_str(big)
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1009
        assert "4096-byte limit" in msg.extra
    await still_works(server)
    assert vm.call_log.length == length + 1


async def test_a_huge_message_is_dropped_by_the_websocket_layer(served):
    _, server, _ = served
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
        await ws.send_str("[" + "1," * 10000 + "1]")
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1009
    await still_works(server)


async def test_the_client_says_why_the_server_closed_on_it(served):
    # The server's reason when it gave one; what the code means when it did not.
    _, server, _ = served
    for size, said in ((5000, "4096-byte limit"), (50_000, "larger than the server accepts")):
        async with RPCClient(server.url()) as client:
            with pytest.raises(ConnectError, match=r"closed \(code 1009\): .*" + said):
                await client.echo("x" * size)
    await still_works(server)


async def test_a_request_cut_off_by_the_server_fails_once_and_leaves_nothing_behind():
    vm, server, _ = await start()
    loop = asyncio.get_running_loop()
    reported = []
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
    try:
        for size in (6_000_000, 20_000_000):  # past twice the limit: the server drops it
            async with RPCClient(server.url()) as client:
                with pytest.raises(ConnectError, match=r"1,048,576|1048576-byte|1 MiB"):
                    await client.echo("x" * size)
            gc.collect()  # a future whose error nobody saw is reported when collected
        await still_works(server)
    finally:
        loop.set_exception_handler(None)
        await server.close()
        await vm.close()
    assert reported == []


async def test_the_default_limit_is_one_mebibyte():
    vm, server, _ = await start()
    try:
        fits = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": ["y" * 1000000]})
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
            assert (await exchange(ws, fits))["result"] == ["y" * 1000000]
            await ws.send_str(fits.replace("y" * 1000000, "y" * (1 << 20)))
            msg = await ws.receive()
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1009)
    finally:
        await server.close()
        await vm.close()


async def test_binary_frames_close_with_1003(served):
    _, server, _ = served
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
        await ws.send_bytes(b'{"jsonrpc": "2.0", "id": 1, "method": "foo"}')
        msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1003
        assert "binary" in msg.extra
    await still_works(server)


async def test_a_full_queue_is_refused_and_loses_nothing():
    vm, server, gate = await start(max_queue=1)
    try:
        async with RPCClient(server.url()) as client:
            held = asyncio.ensure_future(client.hold())
            await gate.entered.wait()
            length = vm.call_log.length
            with pytest.raises(QueueFullError):
                await client.foo()
            async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
                reply = await exchange(ws, '{"jsonrpc": "2.0", "id": 1, "method": "foo"}')
            assert reply["error"]["code"] == ErrorCode.QUEUE_FULL
            assert reply["error"]["data"]["name"] == "QueueFullError"
            gate.opened.set()
            assert await held == "held"
            assert await client.foo() == "bar"
        assert vm.call_log.length == length + 2
        entries = await vm.call_log.list(length)
        assert [e["call"]["methodName"] for e in entries] == ["hold", "foo"]
    finally:
        await server.close()
        await vm.close()


async def test_a_client_that_vanishes_mid_call_still_gets_its_call_logged(served):
    vm, server, gate = served
    client = RPCClient(server.url(), user="ghost")
    await client.connect()
    held = asyncio.ensure_future(client.hold())
    await gate.entered.wait()
    await client.close()
    with pytest.raises(ConnectError):
        await held
    gate.opened.set()
    await server.wait_idle()
    last = await vm.call_log.get(vm.call_log.length - 1)
    assert last["call"]["methodName"] == "hold"
    assert last["call"]["userId"] == "ghost"
    assert last["result"]["res"] == "held"
    await still_works(server)


async def test_a_client_that_never_reads_does_not_block_others():
    vm, server, _ = await start(max_in_flight=4)
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as lazy:
            for i in range(200):
                await lazy.send_str(json.dumps({"jsonrpc": "2.0", "id": i, "method": "foo"}))
            await still_works(server)
            replies = [await lazy.receive_json() for _ in range(200)]
        assert sorted(r["id"] for r in replies) == list(range(200))
        assert all(r["result"] == "bar" for r in replies)
    finally:
        await server.close()
        await vm.close()


async def test_a_connection_at_its_in_flight_bound_is_not_read_until_a_call_finishes():
    vm, server, gate = await start(max_in_flight=2)
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
            for i in range(4):
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": i, "method": "hold"}))
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": "hs", "method": "handshake"}))
            await gate.entered.wait()
            # Two calls are running (one in the oracle, one queued behind it): the
            # server reads nothing more from this connection, so the handshake
            # behind them cannot be answered before the first call is.
            gate.opened.set()
            replies = [await ws.receive_json() for _ in range(5)]
        assert replies[0]["id"] != "hs"
        assert sorted(str(r["id"]) for r in replies) == ["0", "1", "2", "3", "hs"]
        assert all(r["result"] == "held" for r in replies if r["id"] != "hs")
        assert vm.call_log.length >= 4
    finally:
        gate.opened.set()
        await server.close()
        await vm.close()


async def raw_websocket(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def test_a_text_frame_that_is_not_utf8_closes_with_1007(served):
    _, server, _ = served
    reader, writer = await raw_websocket(server.port)
    # A masked text frame (zero mask) whose payload is not UTF-8.
    writer.write(b"\x81\x82\x00\x00\x00\x00\xff\xfe")
    await writer.drain()
    frame = await reader.readexactly(4)
    assert frame[0] == 0x88  # a close frame
    assert int.from_bytes(frame[2:4], "big") == 1007
    writer.close()
    await writer.wait_closed()
    await still_works(server)


async def test_stalled_half_sent_requests_do_not_block_others(served):
    _, server, _ = served
    # A client that stops in the middle of its HTTP upgrade request...
    _, half_http = await asyncio.open_connection("127.0.0.1", server.port)
    half_http.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    await half_http.drain()
    # ...and one that upgrades, then stops in the middle of a frame.
    _, half_frame = await raw_websocket(server.port)
    # A masked text frame header announcing 100 bytes, followed by only three.
    half_frame.write(b"\x81\xe4\x00\x00\x00\x00abc")
    await half_frame.drain()
    await still_works(server)
    for writer in (half_http, half_frame):
        writer.close()
        await writer.wait_closed()
    await still_works(server)


async def test_unsigned_requests_may_be_refused():
    vm, server, _ = await start(allow_unsigned=False)
    try:
        async with RPCClient(server.url(), user="alice") as client:
            with pytest.raises(RPCError) as info:
                await client.foo()
            assert info.value.code == ErrorCode.CALLER_REFUSED
    finally:
        await server.close()
        await vm.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",
    ],
)
async def test_a_malformed_http_request_gets_400_and_one_log_line(served, caplog, garbage):
    _vm, server, _gate = served
    caplog.set_level(logging.INFO, logger="libvms.rpc.http")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(garbage)
    assert (await reader.readline()).startswith(b"HTTP/1.0 400")
    writer.close()
    await writer.wait_closed()
    records = [r for r in caplog.records if r.name == "libvms.rpc.http"]
    assert len(records) == 1
    # The client's mistake: one line at INFO, not an error with a traceback.
    assert records[0].levelno == logging.INFO and records[0].exc_info is None
    assert records[0].getMessage().startswith("refused a malformed HTTP request from 127.0.0.1: ")
    await still_works(server)


def test_a_client_gone_before_its_answer_is_one_debug_line(caplog):
    # What aiohttp logs when a client resets its connection before the answer to
    # its request (a WebSocket upgrade, say) is written: routine on a public port.
    caplog.set_level(logging.DEBUG, logger="libvms.rpc.http")
    gone = ConnectionResetError("Cannot write to closing transport")
    logging.getLogger("libvms.rpc.http").error(
        "Error handling request from %s", "127.0.0.1", exc_info=gone
    )
    (record,) = [r for r in caplog.records if r.name == "libvms.rpc.http"]
    assert record.levelno == logging.DEBUG and record.exc_info is None
    assert record.getMessage() == (
        "127.0.0.1 went away before its answer was written: Cannot write to closing transport"
    )


async def test_a_vm_whose_storage_failed_is_refused_and_the_operator_told_once(tmp_path, caplog):
    vm = BackendVM(SCRIPT)
    await vm.deploy(tmp_path)
    server = RPCServer(vm, port=0)
    await server.start()
    try:
        async with RPCClient(server.url()) as client:
            assert await client.foo() == "bar"
            writer = vm.call_log.ledger.store._writer
            writer._proc.kill()  # the disk, or the writer process, is gone
            writer._proc.wait()
            caplog.set_level(logging.ERROR, logger="libvms.rpc")
            for _ in range(3):
                with pytest.raises(RPCError) as info:
                    await client.foo()
                assert info.value.code in (ErrorCode.UNAVAILABLE,)
        told = [r for r in caplog.records if "refuses calls" in r.getMessage()]
        assert len(told) == 1
        # Auditors can still read what was committed.
        checkpoint = vm.call_log.location + "/checkpoint"
        async with aiohttp.ClientSession() as http, http.get(checkpoint) as response:
            assert response.status == 200
    finally:
        await server.close()
        with contextlib.suppress(LibVMSError):
            await vm.close()
