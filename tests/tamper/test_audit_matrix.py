"""The audit against a host that rewrites its own store and re-signs it.

Each test is one attack by a :class:`DishonestHost` on a real server and a real
store, then a real audit of what it serves: the audit must name the right
problem kind and place. Attacks on history seen before are in
``test_audit_history.py``; data altered in transit is in ``test_audit_transit.py``.
"""

import base64

import pytest

from libvms import encoding
from libvms.errors import VMCallError
from libvms.evidence import Evidence, check
from libvms.keys import Keypair, ledger_url
from libvms.log import LEDGER_NAME as LOG_LEDGER
from libvms.rpc import RPCClient
from libvms.verifier import PROBLEM_KINDS, Verifier

from .dishonest import DishonestHost

SCRIPT = """
let total = 0
exports.add = (n) => (total += n)
exports.note = async (path, text) => { await System.files.writeFile(path, text); return path }
exports.whoami = () => System.caller.id
exports.quote = async (symbol) => ({ symbol, price: await System.oracles.price(symbol) })
"""

PRICES = {"ACME": 100, "INITECH": 7}


def price(symbol):
    return PRICES[symbol]


@pytest.fixture
async def host(tmp_path):
    host = DishonestHost(tmp_path / "vm", SCRIPT, oracles={"price": price})
    await host.start()
    yield host
    await host.close()


async def audit(host, tmp_path, name="auditor"):
    return await Verifier.audit(host.url(), state_dir=tmp_path / name)


async def debug_calls(host, *calls, user="alice"):
    """Run ``(method, *args)`` calls in debug mode; their results."""
    async with RPCClient(host.url(), user=user) as client:
        return [await client.call(method, *args) for method, *args in calls]


def only_problem(report):
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    problem = report.problems[0]
    assert problem.kind in PROBLEM_KINDS
    return problem


async def test_honest_host_passes_with_no_false_alarm(host, tmp_path):
    await debug_calls(host, ("add", 1), ("note", "/a", "x"), ("quote", "ACME"))
    key = Keypair.generate()
    async with RPCClient(host.url(), key=key) as client:
        assert await client.whoami() == key.user_id
        assert await client.add(2) == 3
        with pytest.raises(VMCallError):
            await client.call("note", "/a/b", "not under a file")
    report = await audit(host, tmp_path)
    assert report.ok, report.to_json()
    assert report.problems == []
    assert report.warnings == []
    assert report.evidence is None
    assert report.entries == 7
    assert report.oracle_entries == [3]
    assert report.aborted_entries == []
    assert report.verdict.startswith("Verified 6 calls")
    # A second audit that remembers the first finds the log consistent with it.
    again = await audit(host, tmp_path)
    assert again.ok, again.to_json()


async def test_resigning_unchanged_entries_reproduces_the_hosts_own_checkpoint(host, tmp_path):
    # The tooling writes exactly what the ledger writes (Ed25519 is deterministic).
    await debug_calls(host, ("add", 1), ("note", "/a", "x"))
    assert host.vm is not None
    log_note = await host.vm.call_log.checkpoint()
    files_note = await host.vm.files_archive.checkpoint()
    assert await host.rewrite(lambda entries: entries) == log_note
    assert await host.rewrite(lambda entries: entries, ledger="files_archive") == files_note
    report = await audit(host, tmp_path)
    assert report.ok, report.to_json()


# -- 1. a logged result changed ----------------------------------------------------


async def test_changed_result_is_a_replay_mismatch_with_provable_evidence(host, tmp_path):
    assert await debug_calls(host, ("add", 1), ("add", 2), ("add", 3)) == [1, 3, 6]

    def edit(entries):
        entries[2]["result"]["res"] = 300
        return entries

    await host.rewrite(edit)
    report = await audit(host, tmp_path)
    problem = only_problem(report)
    assert problem.kind == "replay-mismatch"
    assert problem.index == 2
    assert problem.field == "result.res"
    assert (problem.expected, problem.found) == (300, 3)
    assert report.evidence is not None and report.evidence.kind == "replay"
    finding = await check(Evidence.from_json(report.evidence.to_json()))
    assert finding.proven, finding.statement


# -- 2. the archive changed outside any call ---------------------------------------


async def test_file_written_outside_any_call_is_an_archive_mismatch(host, tmp_path):
    await debug_calls(host, ("note", "/file", "honest"), ("add", 1))
    assert host.vm is not None
    await host.vm.files_archive.write_file("/file", "evil")
    report = await audit(host, tmp_path)
    problem = only_problem(report)
    assert problem.kind == "archive-mismatch"
    assert problem.path == "/file"
    assert problem.expected == "file sha256:" + encoding.sha256_hex(b"honest")
    assert problem.found == "file sha256:" + encoding.sha256_hex(b"evil")


async def test_new_file_outside_any_call_is_an_archive_mismatch(host, tmp_path):
    await debug_calls(host, ("note", "/a", "x"))
    assert host.vm is not None
    await host.vm.files_archive.write_file("/planted", "evil")
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "archive-mismatch"
    assert problem.path == "/planted"
    assert problem.expected == "absent"


async def test_file_written_between_calls_is_a_replay_mismatch_of_the_next_call(host, tmp_path):
    await debug_calls(host, ("note", "/a", "x"))
    assert host.vm is not None
    await host.vm.files_archive.write_file("/planted", "evil")
    await debug_calls(host, ("add", 1))
    report = await audit(host, tmp_path)
    problem = only_problem(report)
    # The next call logged the archive state it saw, which no logged call produced.
    assert problem.kind == "replay-mismatch"
    assert problem.index == 2
    assert problem.field == "result.filesRoot"
    assert (await check(Evidence.from_json(report.evidence.to_json()))).proven


async def test_same_content_written_outside_any_call_is_an_archive_mismatch(host, tmp_path):
    await debug_calls(host, ("note", "/file", "same"))
    assert host.vm is not None
    await host.vm.files_archive.write_file("/file", "same")
    problem = only_problem(await audit(host, tmp_path))
    # The files are what the calls produced, but not their history.
    assert problem.kind == "archive-mismatch"
    assert (problem.field, problem.expected, problem.found) == ("version", 2, 3)


async def test_archive_write_dropped_from_its_ledger_is_an_archive_mismatch(host, tmp_path):
    await debug_calls(host, ("note", "/a", "x"), ("note", "/b", "y"))
    await host.rewrite(lambda entries: entries[:-1], ledger="files_archive")
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "archive-mismatch"
    assert problem.path == "/b"
    assert problem.found == "absent"


async def test_archive_history_rewritten_to_the_same_files_is_an_archive_mismatch(host, tmp_path):
    # Same files at the same version, another history: two writes swap places
    # and one gets another mtime. The state root leaves both out.
    await debug_calls(host, ("note", "/a", "honest-1"), ("note", "/b", "b"))
    await debug_calls(host, ("note", "/a", "honest-2"))

    def rewrite(entries):
        entries[1]["mtime"] = 0
        entries[1], entries[2] = entries[2], entries[1]
        return entries

    await host.rewrite(rewrite, ledger="files_archive")
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "archive-mismatch"
    assert problem.index == 1 and problem.field == "history.hash"
    assert (problem.expected["path"], problem.found["path"]) == ("/a", "/b")


# -- 3. calls dropped, reordered, inserted ----------------------------------------


async def test_dropped_call_is_a_replay_mismatch(host, tmp_path):
    await debug_calls(host, ("add", 1), ("add", 2), ("add", 3), ("add", 4))
    await host.rewrite(lambda entries: entries[:2] + entries[3:])
    problem = only_problem(await audit(host, tmp_path))
    # The call after the gap replays on a total that lacks the dropped call.
    assert problem.kind == "replay-mismatch"
    assert problem.index == 2
    assert (problem.field, problem.expected, problem.found) == ("result.res", 6, 4)


async def test_reordered_calls_are_a_replay_mismatch(host, tmp_path):
    await debug_calls(host, ("add", 1), ("add", 10), ("add", 100))

    def swap(entries):
        entries[2], entries[3] = entries[3], entries[2]
        return entries

    await host.rewrite(swap)
    problem = only_problem(await audit(host, tmp_path))
    # Timestamps never decrease along an honest log: the swap shows before any replay.
    assert problem.kind == "replay-mismatch"
    assert problem.index == 3
    assert problem.field == "call.timestamp"
    assert problem.found < problem.expected


async def test_call_logged_for_a_signed_user_without_signature_is_a_signature_problem(
    host, tmp_path
):
    victim = Keypair.generate()
    async with RPCClient(host.url(), key=victim) as client:
        await client.add(1)
    assert host.vm is not None
    # The host runs a call itself, in the victim's name; the log replays perfectly.
    await host.vm.execute_call("add", [1000], user_id=victim.user_id)
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "signature"
    assert problem.index == 2
    assert "carries no signature" in problem.message


async def test_call_with_a_forged_signature_is_a_signature_problem(host, tmp_path):
    victim = Keypair.generate()
    async with RPCClient(host.url(), key=victim) as client:
        await client.add(1)
        genuine = (await host.entries())[1]["call"]["signed"]
    forged = dict(genuine, nonce="A" * 22, sig=base64.b64encode(bytes(64)).decode())
    assert host.vm is not None
    await host.vm.execute_call(
        "add", [1000], user_id=victim.user_id, call_fields={"signed": forged}
    )
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "signature"
    assert problem.index == 2
    assert "does not verify" in problem.message


async def test_replayed_signed_request_is_a_signature_problem(host, tmp_path):
    victim = Keypair.generate()
    async with RPCClient(host.url(), key=victim) as client:
        await client.add(5)
    await debug_calls(host, ("add", 1))
    genuine = (await host.entries())[1]["call"]
    assert host.vm is not None
    # The host runs the victim's signed request a second time: the signature is
    # valid and the log replays; only the repeated nonce gives it away.
    await host.vm.execute_call(
        "add", genuine["args"], user_id=genuine["userId"], call_fields={"signed": genuine["signed"]}
    )
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "signature"
    assert problem.index == 3
    assert problem.field == "call.signed.nonce"
    assert problem.found == genuine["signed"]["nonce"]


async def test_signed_entry_copied_into_the_store_is_a_signature_problem(host, tmp_path):
    victim = Keypair.generate()
    async with RPCClient(host.url(), key=victim) as client:
        await client.add(5)
    await debug_calls(host, ("add", 1), ("add", 2))
    await host.rewrite(lambda entries: [*entries[:3], entries[1], *entries[3:]])
    problem = only_problem(await audit(host, tmp_path))
    # Signatures are checked before the replay, which would fail here too.
    assert problem.kind == "signature"
    assert problem.index == 3
    assert problem.field == "call.signed.nonce"


async def test_signed_args_changed_in_the_store_is_a_signature_problem(host, tmp_path):
    victim = Keypair.generate()
    async with RPCClient(host.url(), key=victim) as client:
        await client.add(5)

    def edit(entries):
        entries[1]["call"]["args"] = [500]
        entries[1]["result"]["res"] = 500
        return entries

    await host.rewrite(edit)
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "signature"
    assert problem.index == 1


# -- 7. the script swapped ---------------------------------------------------------


async def test_init_naming_another_archive_is_an_assertion_problem(host, tmp_path):
    await debug_calls(host, ("note", "/a", "x"))
    other = ledger_url(Keypair.generate().public_key)

    def edit(entries):
        entries[0]["filesArchiveUrl"] = other
        return entries

    await host.rewrite(edit)
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "assertion"
    assert problem.index == 0
    assert problem.field == "filesArchiveUrl"
    assert problem.found == other


async def test_announcing_other_methods_than_the_script_exports_is_an_assertion_problem(
    host, tmp_path
):
    await debug_calls(host, ("add", 2))
    server = host.server
    honest = server._handshake

    def lying(request, mount):
        info = honest(request, mount)
        info["methods"] = [*info["methods"], "stealKeys"]
        return info

    server._handshake = lying
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "assertion"
    assert problem.field == "methods"
    assert problem.expected == ["add", "note", "whoami", "quote"]
    assert problem.found == ["add", "note", "whoami", "quote", "stealKeys"]


async def test_a_script_exporting_handshake_audits_clean(tmp_path):
    # The protocol answers "handshake" itself, so the server never announces it:
    # the audit must not count that as a difference.
    host = DishonestHost(tmp_path / "vm", "exports.handshake = () => 1\nexports.note = (x) => x")
    await host.start()
    try:
        await debug_calls(host, ("note", 1))
        report = await audit(host, tmp_path)
        assert report.ok, report.to_json()
    finally:
        await host.close()


async def test_swapped_script_is_a_replay_mismatch_at_the_first_call_it_changes(host, tmp_path):
    await debug_calls(host, ("note", "/a", "x"), ("add", 1), ("add", 2))
    swapped = SCRIPT.replace("(total += n)", "(total += 2 * n)")

    def edit(entries):
        entries[0]["code"] = swapped
        return entries

    await host.rewrite(edit, code=swapped)
    report = await audit(host, tmp_path)
    problem = only_problem(report)
    # The swapped code loads and announces the same methods; the first call whose
    # result it changes is where the audit stops.
    assert problem.kind == "replay-mismatch"
    assert problem.index == 2
    assert (problem.expected, problem.found) == (1, 2)
    assert report.evidence is not None
    assert (await check(Evidence.from_json(report.evidence.to_json()))).proven


async def test_script_that_does_not_load_is_an_assertion_problem(host, tmp_path):
    await debug_calls(host, ("add", 1))

    def edit(entries):
        entries[0]["code"] = "exports.add = ("
        return entries

    await host.rewrite(edit)
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "assertion"
    assert problem.index == 0


# -- 8. oracle results replaced: not detectable, but listed -------------------------


async def test_replaced_oracle_result_passes_and_is_listed(host, tmp_path):
    results = await debug_calls(
        host, ("add", 1), ("quote", "ACME"), ("add", 2), ("quote", "INITECH"), ("add", 3)
    )
    assert results[1] == {"symbol": "ACME", "price": 100}

    def edit(entries):
        entry = entries[2]
        entry["result"]["oracles"][0]["res"] = 1
        entry["result"]["res"]["price"] = 1
        return entries

    await host.rewrite(edit)
    report = await audit(host, tmp_path)
    # Oracles are trusted inputs: a consistent lie about one replays exactly.
    assert report.ok, report.to_json()
    assert report.oracle_entries == [2, 4]


async def test_oracle_record_the_script_did_not_ask_for_is_a_replay_mismatch(host, tmp_path):
    await debug_calls(host, ("quote", "ACME"), ("add", 1))

    def edit(entries):
        entries[1]["result"]["oracles"][0]["args"] = ["INITECH"]
        return entries

    await host.rewrite(edit)
    problem = only_problem(await audit(host, tmp_path))
    # Replay hands out recorded results only for the exact question the script asks.
    assert problem.kind == "replay-mismatch"
    assert problem.index == 1
    assert problem.field == "result.oracles[0]"


# -- what the audit cannot see, by design -----------------------------------------


async def test_debug_mode_call_forged_by_the_host_passes(host, tmp_path):
    await debug_calls(host, ("add", 1))
    assert host.vm is not None
    # Anyone can claim a debug-mode user id, the host included.
    await host.vm.execute_call("add", [1000], user_id="alice")
    report = await audit(host, tmp_path)
    assert report.ok, report.to_json()


async def test_call_marked_aborted_by_the_host_passes_and_is_listed(host, tmp_path):
    await debug_calls(host, ("add", 1), ("add", 2))

    def edit(entries):
        result = entries[2]["result"]
        del result["res"]
        result["err"] = {"name": "LimitExceeded", "message": "the call took too long"}
        result["aborted"] = True
        return entries

    await host.rewrite(edit)
    report = await audit(host, tmp_path)
    # Replay skips aborted entries; the caller saw the real answer (a receipt in
    # signed mode proves it, see test_audit_history.py).
    assert report.ok, report.to_json()
    assert report.aborted_entries == [2]


async def test_lie_stays_caught_while_the_host_keeps_serving(host, tmp_path):
    await debug_calls(host, ("add", 1), ("add", 2))

    def edit(entries):
        entries[1]["result"]["res"] = 10
        return entries

    await host.rewrite(edit)
    # The modified software keeps serving and logging calls after the lie.
    await debug_calls(host, ("add", 3))
    assert len(await host.entries(LOG_LEDGER)) == 4
    problem = only_problem(await audit(host, tmp_path))
    assert (problem.kind, problem.index) == ("replay-mismatch", 1)


# -- init ----------------------------------------------------------------------------------

INIT_SCRIPT = """
let total
exports.init = () => { total = 0 }
exports.add = (n) => (total += n)
"""


async def test_init_run_again_is_a_replay_mismatch(tmp_path):
    # The host runs init again, which resets the script's state behind its users,
    # and logs that call as the VM would: every entry is one the script computes.
    host = DishonestHost(tmp_path / "vm", INIT_SCRIPT)
    await host.start()
    try:
        await debug_calls(host, ("add", 1), ("add", 2))

        def run_init_again(entries):
            again = encoding.parse(encoding.canonical(entries[1]))
            again["call"]["timestamp"] = entries[-1]["call"]["timestamp"]
            return [*entries, again]

        await host.rewrite(run_init_again)
        problem = only_problem(await audit(host, tmp_path))
        assert problem.kind == "replay-mismatch"
        assert (problem.index, problem.field) == (4, "call.methodName")
        assert "runs once" in problem.message
    finally:
        await host.close()


async def test_archive_title_other_than_the_logged_one_is_an_archive_mismatch(host, tmp_path):
    # Scripts see the title the init entry logs (getInfo); the archive must carry it.
    await debug_calls(host, ("note", "/a", "x"))

    def retitle(entries):
        entries[0]["title"] = "another title"
        return entries

    await host.rewrite(retitle, ledger="files_archive")
    problem = only_problem(await audit(host, tmp_path))
    assert problem.kind == "archive-mismatch"
    assert (problem.index, problem.field) == (0, "history.title")
