"""Signed calls and receipts: the exact signed bytes, entry checks, nonces, receipt proofs."""

import base64

import pytest

from libvms import encoding, merkle
from libvms.checkpoint import Checkpoint, InclusionReceipt, sign_checkpoint
from libvms.errors import TamperError
from libvms.keys import Keypair, VerifierKey, ledger_url
from libvms.signed import (
    DOMAIN,
    CallReceipt,
    NonceTracker,
    SignedCall,
    check_entry_matches,
    check_nonces,
    log_identity,
    new_nonce,
    sign_call,
    signed_message,
    verify_call_entry,
    verify_receipt,
)

CALLER = Keypair.from_private_bytes(bytes(range(32)))
LOG_KEY = Keypair.from_private_bytes(bytes([7]) * 32)
LOG = log_identity(LOG_KEY.public_key)
NONCE = "AAAAAAAAAAAAAAAAAAAAAA"
TIME = 1_700_000_000_000


def a_call(method="add", args=(1, 2), **kw):
    kw.setdefault("nonce", NONCE)
    kw.setdefault("time_ms", TIME)
    return sign_call(CALLER, LOG, method, list(args), **kw)


def entry_for(call, res=3, **call_extra):
    return {
        "type": "call",
        "call": {
            "userId": call.user_id,
            "methodName": call.method,
            "args": list(call.args),
            "timestamp": call.time_ms + 5,
            "signed": call.entry_fields(),
            **call_extra,
        },
        "result": {"res": res, "filesVersion": 1},
    }


def test_the_signed_bytes_are_a_prefix_and_canonical_json():
    message = signed_message(LOG, CALLER.user_id, "add", [1, 2], NONCE, TIME)
    assert DOMAIN == b"libvms/signed-call/v1\n"
    expected = (
        '{"args":[1,2],"log":"' + LOG + '","method":"add","nonce":"' + NONCE + '",'
        '"time":1700000000000,"user":"' + CALLER.user_id + '"}'
    )
    assert message == DOMAIN + expected.encode()
    assert ledger_url(LOG_KEY.public_key) == LOG
    assert LOG.startswith("libvms:")


def test_a_signed_call_verifies_and_round_trips_through_the_wire():
    call = a_call()
    call.verify()
    assert call.user_id == CALLER.user_id
    wire = call.to_wire()
    assert set(wire) == {"user", "log", "nonce", "time", "sig"}
    assert base64.b64decode(wire["sig"]) == call.signature
    assert SignedCall.from_wire(wire, "add", [1, 2]) == call


@pytest.mark.parametrize(
    "change",
    [
        {"method": "sub"},
        {"args": (1, 3)},
        {"args": (1, 2.5)},
        {"log": log_identity(CALLER.public_key)},
        {"nonce": "B" * 22},
        {"time_ms": TIME + 1},
        {"user_id": Keypair.generate().user_id},
    ],
)
def test_changing_anything_breaks_the_signature(change):
    call = a_call()
    fields = {
        "log": call.log,
        "user_id": call.user_id,
        "method": call.method,
        "args": call.args,
        "nonce": call.nonce,
        "time_ms": call.time_ms,
        "signature": call.signature,
        **change,
    }
    with pytest.raises(TamperError):
        SignedCall(**fields).verify()


def test_true_and_one_are_different_arguments():
    with pytest.raises(TamperError):
        SignedCall(LOG, CALLER.user_id, "add", (True, 2), NONCE, TIME, a_call().signature).verify()


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"extra": 1}, "unknown"),
        ({"nonce": "short"}, "nonce"),
        ({"nonce": "!" * 22}, "nonce"),
        ({"time": -1}, "time"),
        ({"time": 1.5}, "time"),
        ({"time": True}, "time"),
        ({"sig": "AAAA"}, "64-byte"),
        ({"sig": 3}, "64-byte"),
        ({"user": "alice"}, "user id"),
        ({"user": "ed25519:short"}, "key"),
    ],
)
def test_malformed_wire_fields_are_value_errors(fields, fragment):
    wire = {**a_call().to_wire(), **fields}
    with pytest.raises(ValueError, match=fragment):
        SignedCall.from_wire(wire, "add", [1, 2])


def test_the_wire_form_is_an_object():
    with pytest.raises(ValueError, match="object"):
        SignedCall.from_wire([], "add", [1, 2])


def test_missing_wire_fields_are_named():
    wire = a_call().to_wire()
    del wire["nonce"]
    with pytest.raises(ValueError, match="nonce"):
        SignedCall.from_wire(wire, "add", [1, 2])


def test_sign_call_draws_fresh_nonces():
    assert len(new_nonce()) == 22
    first = sign_call(CALLER, LOG, "add", [1], time_ms=TIME)
    second = sign_call(CALLER, LOG, "add", [1], time_ms=TIME)
    assert first.nonce != second.nonce
    with pytest.raises(ValueError):
        sign_call(CALLER, LOG, "", [1], time_ms=TIME)


def test_verify_call_entry():
    call = a_call()
    entry = entry_for(call)
    assert verify_call_entry(entry, LOG_KEY.public_key) == call
    assert verify_call_entry(entry, LOG_KEY.public_key, max_skew_ms=5) == call
    with pytest.raises(TamperError, match="ms from"):
        verify_call_entry(entry, LOG_KEY.public_key, max_skew_ms=4)
    with pytest.raises(TamperError):
        verify_call_entry(entry, CALLER.public_key)
    altered = entry_for(call)
    altered["call"]["args"] = [1, 3]
    with pytest.raises(TamperError, match="does not verify") as info:
        verify_call_entry(altered, LOG_KEY.public_key, index=4)
    assert info.value.where == "4"
    broken = entry_for(call)
    broken["call"]["signed"]["sig"] = "nope"
    with pytest.raises(TamperError, match="malformed"):
        verify_call_entry(broken, LOG_KEY.public_key)


def test_entries_without_signatures():
    debug = {"type": "call", "call": {"userId": "alice", "methodName": "f", "args": []}}
    assert verify_call_entry(debug, LOG_KEY.public_key) is None
    assert verify_call_entry({"type": "init", "code": ""}, LOG_KEY.public_key) is None
    anonymous = {"type": "call", "call": {"methodName": "f", "args": []}}
    assert verify_call_entry(anonymous, LOG_KEY.public_key) is None
    impostor = {"type": "call", "call": {"userId": CALLER.user_id, "methodName": "f", "args": []}}
    with pytest.raises(TamperError, match="carries no signature"):
        verify_call_entry(impostor, LOG_KEY.public_key)


def test_check_nonces_finds_a_request_logged_twice():
    one, two = a_call(), a_call(nonce="C" * 22)
    check_nonces([{"type": "init"}, entry_for(one), entry_for(two)])
    with pytest.raises(TamperError, match="entries 1 and 3") as info:
        check_nonces([{"type": "init"}, entry_for(one), entry_for(two), entry_for(one)])
    assert info.value.where == "3"
    other_user = sign_call(Keypair.generate(), LOG, "add", [1, 2], nonce=NONCE, time_ms=TIME)
    check_nonces([entry_for(one), entry_for(other_user)])


def test_nonce_tracker_reserve_release_and_prune():
    tracker = NonceTracker(window_ms=1000)
    assert tracker.reserve("u", "n1", 5000, 5000)
    assert not tracker.reserve("u", "n1", 5000, 5000)
    assert tracker.seen("u", "n1") and not tracker.seen("v", "n1")
    assert tracker.reserve("v", "n1", 5000, 5000)
    tracker.release("v", "n1")
    assert not tracker.seen("v", "n1")
    assert len(tracker) == 1
    tracker.prune(7000)
    assert tracker.seen("u", "n1")  # kept for two windows
    tracker.prune(7001)
    assert not tracker.seen("u", "n1")
    assert len(tracker) == 0


def receipt_for(entries, index, size=None, signer=LOG_KEY):
    tree = merkle.MerkleTree.from_leaf_hashes(merkle.leaf_hash(e) for e in entries)
    size = tree.size if size is None else size
    checkpoint = Checkpoint(log_identity(LOG_KEY.public_key), size, tree.root(size))
    note = sign_checkpoint(checkpoint, signer)
    return InclusionReceipt(index, tuple(tree.inclusion_proof(index, size)), note).to_text()


ENTRIES = [encoding.canonical({"i": i}) for i in range(7)]
VKEY = VerifierKey(LOG, LOG_KEY.public_key)


def test_verify_receipt():
    text = receipt_for(ENTRIES, 3)
    checkpoint = verify_receipt(text, ENTRIES[3], VKEY)
    assert checkpoint.size == 7
    assert verify_receipt(text, ENTRIES[3], VKEY.to_text()) == checkpoint
    cache = {}
    verify_receipt(text, ENTRIES[3], VKEY, verified=cache)
    assert len(cache) == 1
    assert verify_receipt(text, ENTRIES[3], VKEY, verified=cache) == checkpoint
    for index in range(5):
        verify_receipt(receipt_for(ENTRIES, index, size=5), ENTRIES[index], VKEY)


@pytest.mark.parametrize(
    "attack",
    ["other entry", "other index", "flipped proof", "wrong key", "foreign signer", "garbage"],
)
def test_tampered_receipts_are_rejected(attack):
    text = receipt_for(ENTRIES, 3)
    entry, key = ENTRIES[3], VKEY
    if attack == "other entry":
        entry = ENTRIES[4]
    elif attack == "other index":
        text = text.replace("index 3\n", "index 2\n")
    elif attack == "flipped proof":
        line = text.split("\n")[2]
        flipped = base64.b64encode(
            bytes([base64.b64decode(line)[0] ^ 1]) + base64.b64decode(line)[1:]
        )
        text = text.replace(line, flipped.decode())
    elif attack == "wrong key":
        key = VerifierKey(LOG, CALLER.public_key)
    elif attack == "foreign signer":
        text = receipt_for(ENTRIES, 3, signer=CALLER)
    else:
        text = "not a receipt"
    with pytest.raises(TamperError):
        verify_receipt(text, entry, key)


def test_a_receipt_index_beyond_its_checkpoint_is_rejected():
    tree = merkle.MerkleTree.from_leaf_hashes(merkle.leaf_hash(e) for e in ENTRIES)
    note = sign_checkpoint(Checkpoint(LOG, 3, tree.root(3)), LOG_KEY)
    text = InclusionReceipt(5, (), note).to_text()
    with pytest.raises(TamperError, match="not in the checkpoint"):
        verify_receipt(text, ENTRIES[5], VKEY)
    with pytest.raises(TamperError, match="bad verifier key"):
        verify_receipt(text, ENTRIES[5], "nonsense")


def test_check_entry_matches():
    call = a_call()
    raw = encoding.canonical(entry_for(call, res=3))
    assert check_entry_matches(raw, call, result=3)["result"]["res"] == 3
    check_entry_matches(raw, call)
    with pytest.raises(TamperError, match="another result"):
        check_entry_matches(raw, call, result=4)
    with pytest.raises(TamperError, match="records an error"):
        failing = entry_for(call)
        failing["result"] = {"err": {"name": "E", "message": "m"}, "filesVersion": 1}
        check_entry_matches(encoding.canonical(failing), call, result=3)
    check_entry_matches(encoding.canonical(failing), call, error=("E", "m"))
    with pytest.raises(TamperError, match="records error"):
        check_entry_matches(encoding.canonical(failing), call, error=("E", "other"))
    nothing = entry_for(call)
    del nothing["result"]["res"]
    check_entry_matches(encoding.canonical(nothing), call, result=None)
    with pytest.raises(TamperError, match="another request"):
        check_entry_matches(raw, a_call(nonce="D" * 22), result=3)
    with pytest.raises(TamperError, match="canonical"):
        check_entry_matches(raw + b" ", call, result=3)
    with pytest.raises(TamperError, match="not a call"):
        check_entry_matches(b'{"type":"init"}', call)
    unsigned = entry_for(call)
    del unsigned["call"]["signed"]
    with pytest.raises(TamperError, match="no signed request"):
        check_entry_matches(encoding.canonical(unsigned), call)


def test_call_receipt_round_trip():
    text = receipt_for(ENTRIES, 2)
    receipt = CallReceipt.from_wire({"entry": ENTRIES[2].decode(), "proof": text})
    assert receipt.index == 2
    assert receipt.entry == ENTRIES[2]
    assert receipt.verify(VKEY).size == 7
    assert CallReceipt.from_wire(receipt.to_dict()) == receipt
    for bad in (None, {"entry": "x"}, {"entry": 1, "proof": text}, {"entry": "{}", "proof": "x"}):
        with pytest.raises(TamperError):
            CallReceipt.from_wire(bad)


def test_the_example_in_the_protocol_document():
    # docs/protocol.md §7: the example keys of docs/formats.md.
    user = Keypair.from_private_bytes(
        bytes.fromhex("6176736655b141521a49d7011e02f96e21f8bf565a74be0f76ce034e798ef4b6")
    )
    log = Keypair.from_private_bytes(
        bytes.fromhex("780eac4d9fbc2c1747e96c89b2f3a25dab957da1d8714f2ad31657c83f744a72")
    )
    call = sign_call(
        user,
        log_identity(log.public_key),
        "hello",
        ["alice"],
        time_ms=1700000000000,
        nonce="q83vEjRWeJCrze8SNFZ4kA",
    )
    assert call.message() == (
        b"libvms/signed-call/v1\n"
        b'{"args":["alice"],"log":"libvms:BUHdHFxSJj37fElUt7WBiogsYxRyaam3achEAlrZ-FU",'
        b'"method":"hello","nonce":"q83vEjRWeJCrze8SNFZ4kA","time":1700000000000,'
        b'"user":"ed25519:akcg9_KNChknr9RHHz-WFx65vwCabl2EBlPz5SWJIe8"}'
    )
    assert call.to_wire()["sig"] == (
        "X+wTY1ph7iTc58ppJecZyI1sOmMg75rZ5krjS8mInDUTmZ/se/xapt2vqHtz9kbA0uKWshJygMv5D5YnOiMhDQ=="
    )
