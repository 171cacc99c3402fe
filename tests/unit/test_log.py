import asyncio
import os

import pytest

from libvms import merkle
from libvms.checkpoint import open_checkpoint
from libvms.encoding import canonical
from libvms.errors import EncodingError, LibVMSError, TamperError
from libvms.keys import VerifierKey
from libvms.ledger import Ledger
from libvms.log import KEY_FILENAME, LEDGER_NAME, CallLog
from libvms.store import Store


async def test_create_writes_the_seeds_init_entry(tmp_path):
    log = await CallLog.create(tmp_path, "exports.foo = () => 'bar'", "libvms:abc")
    assert log.length == 1
    assert await log.list() == [
        {"type": "init", "code": "exports.foo = () => 'bar'", "filesArchiveUrl": "libvms:abc"}
    ]
    assert len(log.public_key) == 32
    assert log.url.startswith("libvms:")
    assert os.stat(tmp_path / KEY_FILENAME).st_mode & 0o777 == 0o600
    await log.close()


async def test_append_call_has_the_seeds_shape_and_omits_absent_values():
    log = await CallLog.create(None, "", "libvms:x")
    await log.append_call(method_name="foo", args=[], files_version=1)
    await log.append_call(user_id="alice", method_name="bar", args=[1], res="ok", files_version=2)
    await log.append_call(method_name="baz", args=[], res=None, err="boom", files_version=2)
    entries = await log.list(start=1)
    assert entries == [
        {"type": "call", "call": {"methodName": "foo", "args": []}, "result": {"filesVersion": 1}},
        {
            "type": "call",
            "call": {"userId": "alice", "methodName": "bar", "args": [1]},
            "result": {"res": "ok", "filesVersion": 2},
        },
        {
            "type": "call",
            "call": {"methodName": "baz", "args": []},
            "result": {"res": None, "err": "boom", "filesVersion": 2},
        },
    ]
    await log.close()


async def test_list_bounds_are_start_inclusive_end_exclusive():
    log = await CallLog.create(None, "", "u")
    for i in range(5):
        await log.append({"type": "note", "i": i})
    assert [e.get("i") for e in await log.list(2, 4)] == [1, 2]
    assert [e.get("i") for e in await log.list(end=2)] == [None, 0]
    assert await log.list(4, 2) == []
    assert (await log.get(5))["i"] == 4
    with pytest.raises(IndexError):
        await log.get(6)
    await log.close()


@pytest.mark.parametrize("committed", [True, False])
async def test_raw_range_stops_at_a_byte_budget_but_always_gives_one_entry(tmp_path, committed):
    log = await CallLog.create(tmp_path, "", "u")
    sizes = [10, 3000, 200, 5000, 50, 50]
    for i, n in enumerate(sizes):
        log.stage({"type": "note", "i": i, "pad": "x" * n})
    if committed:
        await log.ledger.store.flush()
    everything = log.ledger.raw_range(1, 7)
    assert len(everything) == 6
    for budget in (1, 100, 3100, 3500, 10_000, 100_000):
        for start in range(1, 7):
            page = log.ledger.raw_range(start, 7, max_bytes=budget)
            assert page == everything[start - 1 : start - 1 + len(page)]
            assert len(page) >= 1
            total = sum(map(len, page))
            assert len(page) == 1 or total <= budget
            if start - 1 + len(page) < 6:  # stopped early: the next one would not fit
                assert total + len(everything[start - 1 + len(page)]) > budget
    await log.ledger.store.flush()
    await log.close()


async def test_reopen_keeps_entries_and_key(tmp_path):
    log = await CallLog.create(tmp_path, "code", "u")
    await log.append_call(method_name="m", args=[1, 2], res=3, files_version=1)
    key, entries = log.public_key, await log.list()
    await log.close()
    again = await CallLog.open(tmp_path)
    assert again.public_key == key
    assert await again.list() == entries
    await again.append_call(method_name="m", args=[], files_version=1)
    assert again.length == 3
    await again.close()


async def test_checkpoint_is_checkable_from_the_entries_alone(tmp_path):
    log = await CallLog.create(tmp_path, "code", "u")
    for i in range(6):
        await log.append({"type": "x", "i": i})
    note = await log.checkpoint()
    checkpoint = open_checkpoint(note, VerifierKey.parse(log.verifier_key))
    leaves = [merkle.leaf_hash(canonical(e)) for e in await log.list()]
    assert checkpoint.size == 7
    assert checkpoint.root_hash == merkle.root_of(leaves)
    await log.close()


async def test_proofs_verify_against_signed_checkpoints():
    log = await CallLog.create(None, "code", "u")
    old_note = await log.checkpoint()
    for i in range(20):
        await log.append({"type": "x", "i": i})
    note = await log.checkpoint()
    key = VerifierKey.parse(log.verifier_key)
    old, new = open_checkpoint(old_note, key), open_checkpoint(note, key)
    for seq in range(new.size):
        leaf = merkle.leaf_hash(await log.get_raw(seq))
        merkle.verify_inclusion(leaf, seq, new.size, await log.inclusion_proof(seq), new.root_hash)
    proof = await log.consistency_proof(old.size, new.size)
    merkle.verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof)
    await log.close()


async def test_concurrent_appends_share_commits(tmp_path):
    log = await CallLog.create(tmp_path, "code", "u")
    store = log.ledger.store
    before = store.commits
    seqs = await asyncio.gather(*(log.append({"type": "x", "i": i}) for i in range(200)))
    assert sorted(seqs) == list(range(1, 201))
    assert store.commits - before < 20
    async with log.batch():
        for i in range(100):
            await log.append({"type": "y", "i": i})
    assert log.length == 301
    await log.close()
    again = await CallLog.open(tmp_path)
    assert again.length == 301
    await again.close()


async def test_bad_entries_are_refused_and_nothing_changes():
    log = await CallLog.create(None, "code", "u")
    for bad in [{"x": float("nan")}, {"x": b"bytes"}, ["not an object"]]:
        with pytest.raises(EncodingError):
            await log.append(bad)
    assert log.length == 1
    await log.close()


async def test_create_refuses_a_dir_with_a_log(tmp_path):
    log = await CallLog.create(tmp_path, "code", "u")
    await log.close()
    with pytest.raises(LibVMSError, match="already holds"):
        await CallLog.create(tmp_path, "code", "u")


async def test_open_refuses_an_empty_dir(tmp_path):
    with pytest.raises(LibVMSError, match="no call log"):
        await CallLog.open(tmp_path)


async def test_a_copy_checks_an_extension_before_taking_it():
    log = await CallLog.create(None, "exports.x = 1", "libvms:" + "A" * 43)
    for i in range(6):
        await log.append_call(method_name="x", args=[i], files_version=1)
    entries = log.ledger.raw_range(0, log.length)
    text = await log.checkpoint()
    copy = Ledger.create_copy(Store.open(None), LEDGER_NAME, log.public_key)

    leaves = copy.check_extension(entries, text)
    assert copy.length == 0
    assert leaves == [merkle.leaf_hash(e) for e in entries]
    with pytest.raises(TamperError):
        copy.check_extension(entries[:-1], text)
    with pytest.raises(TamperError):
        copy.extend_verified(entries, text, leaves=leaves[::-1])
    with pytest.raises(ValueError):
        copy.extend_verified(entries, text, leaves=leaves[:-1])
    assert copy.length == 0
    copy.extend_verified(entries, text, leaves=leaves)
    assert copy.length == log.length
    assert copy.tree.root() == log.ledger.tree.root()
    await log.close()
