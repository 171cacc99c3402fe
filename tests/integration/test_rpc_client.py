"""RPCClient options: how many verified receipts a signed client keeps."""

import asyncio
import json

import pytest

from libvms.errors import TamperError
from libvms.keys import Keypair
from libvms.rpc import RPCClient, RPCServer
from libvms.rpc.client import MAX_RECEIPTS
from libvms.vm import BackendVM

from ..tamper.dishonest import receipts_claiming

SCRIPT = "exports.add = (a, b) => a + b"


@pytest.fixture
async def server():
    vm = BackendVM(SCRIPT)
    await vm.deploy(None)
    server = RPCServer(vm, port=0)
    await server.start()
    yield server
    await server.close()
    await vm.close()


def logged_args(receipt):
    return json.loads(receipt.entry)["call"]["args"]


async def test_receipts_keep_the_newest_max_receipts(server):
    async with RPCClient(server.url(), key=Keypair.generate(), max_receipts=3) as client:
        assert client.max_receipts == 3
        for i in range(5):
            assert await client.add(i, 1) == i + 1
        assert len(client.receipts) == 3
        assert [logged_args(r) for r in client.receipts] == [[2, 1], [3, 1], [4, 1]]
        assert logged_args(client.receipts[-1]) == [4, 1]


async def test_concurrent_calls_stay_within_the_bound(server):
    async with RPCClient(server.url(), key=Keypair.generate(), max_receipts=10) as client:
        await asyncio.gather(*(client.add(i, 0) for i in range(40)))
        assert len(client.receipts) == 10
        assert len({r.entry for r in client.receipts}) == 10


async def test_no_bound_keeps_every_receipt(server):
    async with RPCClient(server.url(), key=Keypair.generate(), max_receipts=None) as client:
        assert client.max_receipts is None
        for i in range(12):
            await client.add(i, i)
        assert [logged_args(r) for r in client.receipts] == [[i, i] for i in range(12)]


@pytest.mark.parametrize("options", [{"max_receipts": 0}, {"keep_receipts": False}])
async def test_receipts_can_be_verified_and_not_kept(server, options, monkeypatch):
    async with RPCClient(server.url(), key=Keypair.generate(), **options) as client:
        assert client.max_receipts == 0
        assert await client.add(1, 2) == 3
        assert len(client.receipts) == 0
        # Not kept, but still checked: a lying server is caught all the same.
        monkeypatch.setattr(RPCServer, "_receipt", receipts_claiming(99))
        with pytest.raises(TamperError, match="another result"):
            await client.add(2, 2)


def test_the_default_bound_and_its_checks():
    client = RPCClient("ws://127.0.0.1:1", key=Keypair.generate())
    assert client.max_receipts == MAX_RECEIPTS == 10_000
    assert len(client.receipts) == 0
    with pytest.raises(ValueError, match="max_receipts"):
        RPCClient("ws://127.0.0.1:1", max_receipts=-1)
