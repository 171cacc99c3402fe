"""RPC calls against a real server on 127.0.0.1: the seed's behaviour and more."""

import asyncio
import socket

import aiohttp
import pytest

from libvms.errors import ConnectError, LimitExceeded, RPCError, VMCallError
from libvms.keys import same_ledger
from libvms.rpc import PROTOCOL, ErrorCode, RPCClient, RPCServer
from libvms.vm import BackendVM

SCRIPT = """
exports.foo = () => 'bar'
exports.whoami = () => System.caller.id
exports.add = (a, b) => a + b
exports.fail = () => { throw new TypeError('no good') }
exports.nothing = () => {}
exports.waitThenWriteToFile = async (v) => {
  await new Promise(r => setTimeout(r, 10))
  await System.files.writeFile('/file', v)
  return v
}
exports.spin = () => { for (;;) {} }
exports.answer = 42
exports.init = () => System.files.writeFile('/ready', 'yes')
"""


async def deployed(code=SCRIPT, **kw):
    vm = BackendVM(code, **kw)
    await vm.deploy(None, title="RPC test")
    return vm


@pytest.fixture
async def served(request):
    # Short enough for the runaway-call test, long enough for a loaded machine.
    vm = await deployed(call_timeout=0.5 if "limit_exceeded" in request.node.name else 5.0)
    server = RPCServer(vm, port=0)
    await server.start()
    yield vm, server
    await server.close()
    await vm.close()


async def raw_call(ws, message):
    await ws.send_json(message)
    return await ws.receive_json()


async def test_server_port_and_urls(served):
    vm, server = served
    assert server.port != 0
    assert server.url() == f"ws://127.0.0.1:{server.port}/"
    assert server.url("/x/") == f"ws://127.0.0.1:{server.port}/x"
    assert vm.call_log.location == f"http://127.0.0.1:{server.port}/log"
    assert vm.call_log.url.startswith(f"http://127.0.0.1:{server.port}/log#")


async def test_backend_info_describes_the_vm(served):
    vm, server = served
    async with RPCClient(server.url()) as client:
        info = client.backend_info
        assert client.url == server.url()
        assert info.methods == [
            "foo",
            "whoami",
            "add",
            "fail",
            "nothing",
            "waitThenWriteToFile",
            "spin",
        ]
        assert info.protocol == PROTOCOL
        assert same_ledger(info.call_log_url, vm.call_log.url)
        assert same_ledger(info.files_archive_url, vm.files_archive.url)
        assert info.call_log_url.startswith(f"http://127.0.0.1:{server.port}/log#")
        assert info.call_log_key == vm.call_log.verifier_key
        assert info["files_archive_url"] == info.files_archive_url
        assert info["filesArchiveUrl"] == info.files_archive_url
        assert "callLogUrl" in info
        with pytest.raises(KeyError):
            info["nope"]


async def test_plain_http_get_at_the_mount_path_returns_the_handshake(served):
    vm, server = served
    async with aiohttp.ClientSession() as http, http.get(server.http_url()) as response:
        assert response.status == 200
        body = await response.json()
    assert body["protocol"] == PROTOCOL
    assert same_ledger(body["callLogUrl"], vm.call_log.url)


async def test_calls_return_results_and_are_logged(served):
    vm, server = served
    async with RPCClient(server.url(), user="alice") as client:
        assert await client.foo() == "bar"
        assert await client.add(2, 3) == 5
        assert await client.call("add", "a", "b") == "ab"
        assert await client.whoami() == "alice"
        assert await client.nothing() is None
    entries = await vm.call_log.list(vm.call_log.length - 5)
    assert [e["call"]["methodName"] for e in entries] == ["foo", "add", "add", "whoami", "nothing"]
    assert all(e["call"]["userId"] == "alice" for e in entries)
    assert entries[1]["call"]["args"] == [2, 3]
    assert entries[1]["result"]["res"] == 5
    assert "res" not in entries[4]["result"]


async def test_unknown_attributes_raise_attribute_error(served):
    _, server = served
    client = RPCClient(server.url())
    with pytest.raises(AttributeError, match="not connected"):
        client.foo  # noqa: B018
    async with client:
        with pytest.raises(AttributeError):
            client.nope  # noqa: B018
        with pytest.raises(AttributeError):
            client.answer  # noqa: B018


async def test_script_errors_come_back_as_vm_call_errors(served):
    vm, server = served
    async with RPCClient(server.url()) as client:
        with pytest.raises(VMCallError) as info:
            await client.fail()
        assert (info.value.name, info.value.message) == ("TypeError", "no good")
        assert await client.foo() == "bar"
    last = await vm.call_log.get(vm.call_log.length - 2)
    assert last["result"]["err"] == {"name": "TypeError", "message": "no good"}


async def test_limit_exceeded_comes_back_as_limit_exceeded(served):
    vm, server = served
    async with RPCClient(server.url()) as client:
        with pytest.raises(LimitExceeded):
            await client.spin()
        assert await client.foo() == "bar"
    aborted = await vm.call_log.get(vm.call_log.length - 2)
    assert aborted["result"]["aborted"] is True


async def test_init_and_values_are_not_callable(served):
    vm, server = served
    length = vm.call_log.length
    async with RPCClient(server.url()) as client:
        for name in ("init", "answer", "nope", "constructor", "__proto__"):
            with pytest.raises(RPCError) as info:
                await client.call(name)
            assert info.value.code == ErrorCode.METHOD_NOT_FOUND
    assert vm.call_log.length == length


async def test_sequential_and_concurrent_calls_keep_log_order_equal_to_archive_order(served):
    vm, server = served
    async with RPCClient(server.url(), user="bob") as client:
        for i in range(10):
            assert await client.waitThenWriteToFile(f"s{i}") == f"s{i}"
        values = [f"c{i}" for i in range(100)]
        results = await asyncio.gather(*(client.waitThenWriteToFile(v) for v in values))
        assert results == values
    archive = vm.files_archive
    entries = await vm.call_log.list()
    writes = [e for e in entries if e.get("call", {}).get("methodName") == "waitThenWriteToFile"]
    assert len(writes) == 110
    assert sorted(e["call"]["args"][0] for e in writes[10:]) == sorted(values)
    versions = [e["result"]["filesVersion"] for e in writes]
    assert versions == list(range(versions[0], versions[0] + 110))
    history = await archive.history()
    assert [h["version"] for h in history if h["path"] == "/file"] == versions
    for entry in writes[::11]:
        view = await archive.checkout(entry["result"]["filesVersion"])
        assert await view.read_file("/file") == entry["call"]["args"][0]


async def test_several_clients_with_different_users(served):
    vm, server = served
    users = ["alice", "bob", "carol", "dave"]
    clients = [RPCClient(server.url(), user=u) for u in users]
    await asyncio.gather(*(c.connect() for c in clients))
    try:
        rounds = await asyncio.gather(
            *(c.whoami() for _ in range(5) for c in clients),
        )
        assert rounds == users * 5
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    entries = await vm.call_log.list(vm.call_log.length - 20)
    assert sorted(e["call"]["userId"] for e in entries) == sorted(users * 5)
    assert all(e["result"]["res"] == e["call"]["userId"] for e in entries)


async def test_the_seed_clients_way_of_asking_works(served):
    """The seed's JavaScript client (rpc-websockets) sends "params": null for a call
    without arguments, and names its debug-mode user once, in the URL."""
    vm, server = served
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(server.url() + "?user=bob") as ws:
            handshake = {"jsonrpc": "2.0", "id": 1, "method": "handshake", "params": None}
            assert (await raw_call(ws, handshake))["result"]["methods"][0] == "foo"
            whoami = {"jsonrpc": "2.0", "id": 2, "method": "whoami", "params": None}
            assert (await raw_call(ws, whoami))["result"] == "bob"
            alice = {**whoami, "id": 3, "user": "alice"}  # a request's own user wins
            assert (await raw_call(ws, alice))["result"] == "alice"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(server.url() + "?user=")
        assert refused.value.status == 400
    entries = await vm.call_log.list(vm.call_log.length - 2)
    assert [e["call"]["userId"] for e in entries] == ["bob", "alice"]


async def test_notifications_run_without_a_reply(served):
    vm, server = served
    length = vm.call_log.length
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
        await ws.send_json({"jsonrpc": "2.0", "method": "add", "params": [1, 1]})
        reply = await raw_call(ws, {"jsonrpc": "2.0", "id": "x", "method": "foo"})
        assert reply == {"jsonrpc": "2.0", "id": "x", "result": "bar"}
    await server.wait_idle()
    assert vm.call_log.length == length + 2


async def test_raw_errors_carry_name_and_message(served):
    _, server = served
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
        reply = await raw_call(ws, {"jsonrpc": "2.0", "id": 7, "method": "fail", "params": []})
    assert reply["id"] == 7
    assert reply["error"] == {
        "code": -32000,
        "message": "no good",
        "data": {"name": "TypeError", "message": "no good"},
    }


async def test_several_vms_on_one_port():
    one = await deployed("exports.who = () => 'one'")
    two = await deployed("exports.who = () => 'two'")
    server = RPCServer(port=0)
    server.mount("/one", one)
    await server.start()
    server.mount("/two/sub", two)
    with pytest.raises(ValueError):
        server.mount("/one", two)
    with pytest.raises(ValueError):
        server.mount("/x/log", two)
    try:
        async with RPCClient(server.url("/one")) as a, RPCClient(server.url("/two/sub")) as b:
            assert await a.who() == "one"
            assert await b.who() == "two"
            assert a.backend_info.call_log_url.startswith(
                f"http://127.0.0.1:{server.port}/one/log#"
            )
            assert same_ledger(b.backend_info.call_log_url, two.call_log.url)
            assert server.unmount("/two/sub") is two
            with pytest.raises(ConnectError):
                await b.who()
            assert await a.who() == "one"
        with pytest.raises(ConnectError):
            await RPCClient(server.url("/two/sub")).connect()
        with pytest.raises(ConnectError):
            await RPCClient(server.url("/")).connect()
    finally:
        await server.close()
        await one.close()
        await two.close()


async def test_connect_errors_are_clear():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectError, match="cannot connect"):
        await RPCClient(f"ws://127.0.0.1:{port}/").connect()


async def test_a_server_that_is_not_libvms_is_refused():
    async def junk(request):
        ws = aiohttp.web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            request_id = msg.json()["id"]
            await ws.send_json({"jsonrpc": "2.0", "id": request_id, "result": {"methods": 3}})
        return ws

    async def plain(request):
        return aiohttp.web.Response(text="hello")

    app = aiohttp.web.Application()
    app.router.add_get("/ws", junk)
    app.router.add_get("/plain", plain)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with pytest.raises(ConnectError, match="not a libvms server"):
            await RPCClient(f"ws://127.0.0.1:{port}/ws").connect()
        with pytest.raises(ConnectError, match="refused the WebSocket upgrade"):
            await RPCClient(f"ws://127.0.0.1:{port}/plain").connect()
    finally:
        await runner.cleanup()


async def test_closing_the_server_fails_waiting_clients_cleanly():
    vm = await deployed()
    server = RPCServer(vm, port=0)
    await server.start()
    client = RPCClient(server.url())
    await client.connect()
    assert await client.foo() == "bar"
    await server.close()
    with pytest.raises(ConnectError):
        await client.foo()
    await client.close()
    await vm.close()
