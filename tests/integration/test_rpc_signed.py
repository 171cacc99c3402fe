"""Signed calls over RPC: verified before queueing, stored in the entry, answered with receipts."""

import asyncio
import json
import time

import aiohttp
import pytest

from libvms import signed
from libvms.errors import RPCError, TamperError, VMCallError
from libvms.keys import Keypair
from libvms.rpc import ErrorCode, RPCClient, RPCServer
from libvms.vm import BackendVM

from ..tamper.dishonest import receipts_claiming

SCRIPT = """
exports.whoami = () => System.caller.id
exports.add = (a, b) => a + b
exports.fail = () => { throw new RangeError('too far') }
exports.nothing = () => {}
"""


async def start(directory=None):
    vm = BackendVM(SCRIPT)
    await vm.deploy(directory)
    server = RPCServer(vm, port=0)
    await server.start()
    return vm, server


@pytest.fixture
async def served():
    vm, server = await start()
    yield vm, server
    await server.close()
    await vm.close()


def now_ms():
    return int(time.time() * 1000)


def signed_request(key, log, method, params, *, request_id=1, time_ms=None, nonce=None):
    call = signed.sign_call(
        key, log, method, params, time_ms=now_ms() if time_ms is None else time_ms, nonce=nonce
    )
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": method,
        "params": params,
        "signed": call.to_wire(),
    }


async def send(server, *messages):
    replies = []
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url()) as ws:
        for message in messages:
            await ws.send_str(json.dumps(message))
            replies.append(await ws.receive_json())
    return replies


async def test_signed_calls_name_the_key_and_are_stored_verifiably(served):
    vm, server = served
    key = Keypair.generate()
    async with RPCClient(server.url(), key=key) as client:
        assert client.user == key.user_id
        assert await client.whoami() == key.user_id
        assert await client.add(1, 2) == 3
    entries = await vm.call_log.list()
    calls = entries[1:]
    assert [e["call"]["userId"] for e in calls] == [key.user_id] * 2
    assert set(calls[1]["call"]["signed"]) == {"nonce", "time", "sig"}
    for index, entry in enumerate(entries):
        signed.verify_call_entry(entry, vm.call_log.public_key, index=index, max_skew_ms=60_000)
    signed.check_nonces(entries)
    # The stored request does not verify for another log.
    with pytest.raises(TamperError):
        signed.verify_call_entry(calls[1], Keypair.generate().public_key)


async def test_receipts_are_verified_and_kept(served):
    vm, server = served
    async with RPCClient(server.url(), key=Keypair.generate()) as client:
        assert await client.add(2, 2) == 4
        assert await client.nothing() is None
        with pytest.raises(VMCallError) as info:
            await client.fail()
        assert info.value.name == "RangeError"
        receipts = list(client.receipts)
        key = client.backend_info.call_log_key
    assert [r.index for r in receipts] == [1, 2, 3]
    for receipt in receipts:
        assert receipt.entry == await vm.call_log.get_raw(receipt.index)
        checkpoint = receipt.verify(key)
        assert checkpoint.size > receipt.index
        assert signed.verify_receipt(receipt.text, receipt.entry, key) == checkpoint
    assert json.loads(receipts[2].entry)["result"]["err"]["message"] == "too far"
    # Offline, the receipt proves nothing about another entry.
    with pytest.raises(TamperError):
        signed.verify_receipt(receipts[0].text, receipts[1].entry, key)


async def test_concurrent_signed_calls_share_checkpoints(served):
    _, server = served
    async with RPCClient(server.url(), key=Keypair.generate()) as client:
        results = await asyncio.gather(*(client.add(i, 1) for i in range(50)))
        assert results == [i + 1 for i in range(50)]
        assert len(client.receipts) == 50


async def test_a_tampered_receipt_is_rejected_by_the_client(served, monkeypatch):
    _, server = served
    original = RPCServer._receipt

    async def lying_proof(self, mount, seq):
        receipt = await original(self, mount, seq)
        # Claim another index: the proof no longer leads to the signed root.
        receipt["proof"] = receipt["proof"].replace(f"index {seq}\n", f"index {seq - 1}\n")
        return receipt

    async def no_receipt(self, mount, seq):
        return None

    async with RPCClient(server.url(), key=Keypair.generate()) as client:
        assert await client.add(1, 1) == 2
        monkeypatch.setattr(RPCServer, "_receipt", receipts_claiming(5))
        with pytest.raises(TamperError, match="another result"):
            await client.add(2, 2)
        monkeypatch.setattr(RPCServer, "_receipt", lying_proof)
        with pytest.raises(TamperError):
            await client.add(3, 3)
        monkeypatch.setattr(RPCServer, "_receipt", no_receipt)
        with pytest.raises(TamperError, match="without a receipt"):
            await client.add(4, 4)
        assert len(client.receipts) == 1


async def test_a_bad_signature_is_refused_and_nothing_logged(served):
    vm, server = served
    key = Keypair.generate()
    log = signed.log_identity(vm.call_log.public_key)
    length = vm.call_log.length
    forged = signed_request(key, log, "add", [1, 2])
    forged["params"] = [1, 3]  # the signature covers [1, 2]
    other = signed_request(key, log, "add", [1, 2])
    other["signed"]["user"] = Keypair.generate().user_id
    malformed = signed_request(key, log, "add", [1, 2])
    malformed["signed"]["sig"] = "AAAA"
    replies = await send(server, forged, other, malformed)
    assert [r["error"]["code"] for r in replies] == [ErrorCode.BAD_SIGNATURE] * 3
    assert "does not verify" in replies[0]["error"]["message"]
    assert "malformed" in replies[2]["error"]["message"]
    assert vm.call_log.length == length


async def test_a_replayed_nonce_is_refused(served):
    vm, server = served
    key = Keypair.generate()
    log = signed.log_identity(vm.call_log.public_key)
    request = signed_request(key, log, "add", [1, 2])
    first, second = await send(server, request, request)
    assert first["result"] == 3
    assert second["error"]["code"] == ErrorCode.NONCE_REUSED
    assert second["error"]["data"]["name"] == "NonceReused"
    same_nonce = signed_request(key, log, "add", [5, 5], nonce=request["signed"]["nonce"])
    (third,) = await send(server, same_nonce)
    assert third["error"]["code"] == ErrorCode.NONCE_REUSED
    # Another user may pick the same nonce.
    nonce = request["signed"]["nonce"]
    stranger = signed_request(Keypair.generate(), log, "add", [0, 1], nonce=nonce)
    (fourth,) = await send(server, stranger)
    assert fourth["result"] == 1
    entries = await vm.call_log.list()
    signed.check_nonces(entries)
    assert len(entries) == 3


async def test_a_stale_or_future_request_is_refused(served):
    vm, server = served
    key = Keypair.generate()
    log = signed.log_identity(vm.call_log.public_key)
    length = vm.call_log.length
    replies = await send(
        server,
        signed_request(key, log, "add", [1, 2], time_ms=now_ms() - 10 * 60_000),
        signed_request(key, log, "add", [1, 2], time_ms=now_ms() + 10 * 60_000),
    )
    assert [r["error"]["code"] for r in replies] == [ErrorCode.STALE_REQUEST] * 2
    assert vm.call_log.length == length


async def test_a_time_spelled_with_a_fraction_is_the_same_number(served):
    # JSON numbers are doubles: a client that writes 1700000000000.0 signs the
    # same canonical bytes as one that writes 1700000000000.
    vm, server = served
    key = Keypair.generate()
    log = signed.log_identity(vm.call_log.public_key)
    request = signed_request(key, log, "add", [1, 2])
    request["signed"]["time"] = float(request["signed"]["time"])
    assert ".0," in json.dumps(request["signed"])
    (reply,) = await send(server, request)
    assert reply["result"] == 3
    entry = (await vm.call_log.list())[-1]
    assert entry["call"]["signed"]["time"] == int(request["signed"]["time"])
    assert signed.verify_call_entry(entry, vm.call_log.public_key).user_id == key.user_id


async def test_a_request_signed_for_another_vm_is_refused(served):
    vm, server = served
    other_log = signed.log_identity(Keypair.generate().public_key)
    (reply,) = await send(server, signed_request(Keypair.generate(), other_log, "add", [1, 2]))
    assert reply["error"]["code"] == ErrorCode.BAD_SIGNATURE
    assert "signed for call log" in reply["error"]["message"]
    assert vm.call_log.length == 1


async def test_unsigned_calls_cannot_claim_a_signed_user_id(served):
    vm, server = served
    key = Keypair.generate()
    async with RPCClient(server.url(), user=key.user_id) as client:
        with pytest.raises(RPCError) as info:
            await client.whoami()
        assert info.value.code == ErrorCode.CALLER_REFUSED
    log = signed.log_identity(vm.call_log.public_key)
    mismatched = signed_request(key, log, "whoami", [])
    mismatched["user"] = "mallory"
    (reply,) = await send(server, mismatched)
    assert reply["error"]["code"] == ErrorCode.INVALID_REQUEST
    assert vm.call_log.length == 1


async def test_nonces_survive_a_restart(tmp_path):
    vm, server = await start(tmp_path)
    key = Keypair.generate()
    log = signed.log_identity(vm.call_log.public_key)
    request = signed_request(key, log, "add", [1, 2])
    (first,) = await send(server, request)
    assert first["result"] == 3
    await server.close()
    await vm.close()

    vm, server = await start(tmp_path)
    try:
        assert signed.log_identity(vm.call_log.public_key) == log
        (again,) = await send(server, request)
        assert again["error"]["code"] == ErrorCode.NONCE_REUSED
        async with RPCClient(server.url(), key=key) as client:
            assert await client.add(2, 3) == 5
        assert vm.call_log.length == 3
    finally:
        await server.close()
        await vm.close()


async def test_a_request_accepted_at_one_mount_is_a_replay_at_every_other(served):
    # One VM at two paths, and on a second server: one nonce memory.
    vm, server = served
    server.mount("/again", vm)
    other = RPCServer(vm, port=0)
    await other.start()
    try:
        key = Keypair.generate()
        request = signed_request(key, signed.log_identity(vm.call_log.public_key), "add", [1, 2])
        (first,) = await send(server, request)
        assert first["result"] == 3
        async with aiohttp.ClientSession() as http:
            for url in (server.url("/again"), other.url()):
                async with http.ws_connect(url) as ws:
                    await ws.send_str(json.dumps(request))
                    reply = await ws.receive_json()
                assert reply["error"]["code"] == ErrorCode.NONCE_REUSED, url
        assert vm.call_log.length == 2
    finally:
        await other.close()


async def test_an_honest_signed_call_with_a_whole_number_past_2_53_passes_the_audit(
    served, tmp_path
):
    # JSON numbers are doubles: 2^53 + 2 arrives as a float, is signed and logged
    # as 9007199254740994, and the auditor must read it back the same way.
    from libvms.verifier import Verifier

    _vm, server = served
    async with RPCClient(server.url(), key=Keypair.generate()) as client:
        assert await client.add(2.0**53 + 2, 0) == 2.0**53 + 2
    report = await Verifier.audit(server.url(), state_dir=tmp_path)
    assert report.ok, report.problems


async def test_an_audit_takes_the_hosts_signature_window(tmp_path):
    # A host may accept requests signed long ago (its window is its choice); the
    # audit allows what the host's window allows, once told it.
    from libvms.verifier import Verifier

    vm = BackendVM(SCRIPT)
    await vm.deploy(None)
    async with RPCServer(vm, port=0, signature_window_ms=30 * 60_000) as server:
        log = signed.log_identity(vm.call_log.public_key)
        old = signed_request(Keypair.generate(), log, "add", [1, 2], time_ms=now_ms() - 900_000)
        (reply,) = await send(server, old)
        assert reply["result"] == 3
        report = await Verifier.audit(server.url(), state_dir=tmp_path / "a")
        assert [p.kind for p in report.problems] == ["signature"]
        report = await Verifier.audit(
            server.url(), state_dir=tmp_path / "b", signature_window_ms=30 * 60_000
        )
        assert report.ok, report.problems
    await vm.close()
