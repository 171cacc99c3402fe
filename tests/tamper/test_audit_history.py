"""Lies about history: what an auditor, or a client holding a receipt, saw before.

A host that re-signs a rewritten log produces a log that verifies on its own. It
is caught by comparing with a checkpoint it signed earlier: the one an auditor
saved (``state_dir``), the one in a client's receipt, or the one another auditor
was shown. Each comparison yields fork evidence that anyone can check offline.
"""

import asyncio

import pytest

from libvms.evidence import Evidence, check, fork_evidence
from libvms.keys import Keypair, ledger_url
from libvms.rpc import RPCClient
from libvms.verifier import Auditor, Verifier, check_receipt
from libvms.vm import BackendVM

from .dishonest import DishonestHost

SCRIPT = """
let total = 0
exports.add = (n) => (total += n)
exports.note = async (path, text) => { await System.files.writeFile(path, text); return path }
"""


@pytest.fixture
async def host(tmp_path):
    host = DishonestHost(tmp_path / "vm", SCRIPT)
    await host.start()
    yield host
    await host.close()


async def calls(url, *numbers, user="alice"):
    async with RPCClient(url, user=user) as client:
        return [await client.add(n) for n in numbers]


async def proven(evidence):
    """Check ``evidence`` the way a third party does: from its file, offline."""
    assert evidence is not None
    finding = await check(Evidence.from_json(evidence.to_json()))
    assert finding.proven, finding.statement
    return finding


def only_problem(report):
    assert not report.ok
    assert len(report.problems) == 1, report.problems
    return report.problems[0]


# -- 4. history rewritten after an audit -------------------------------------------


@pytest.mark.parametrize("grown", [False, True], ids=["same-size", "grown"])
async def test_history_rewritten_after_an_audit_is_a_provable_fork(host, tmp_path, grown):
    state = tmp_path / "auditor"
    await calls(host.url(), 1, 2, 3)
    first = await Verifier.audit(host.url(), state_dir=state)
    assert first.ok, first.to_json()

    def edit(entries):
        entries[2]["result"]["res"] = 30
        return entries

    await host.rewrite(edit)
    if grown:
        await calls(host.url(), 4)
    report = await Verifier.audit(host.url(), state_dir=state)
    problem = only_problem(report)
    assert problem.kind == "fork"
    assert "call log" in problem.message
    assert problem.expected == first.checkpoint["root"]
    assert report.evidence is not None and report.evidence.kind == "fork"
    assert report.evidence.notes[0] == first.checkpoint["note"]
    # Between two sizes the evidence carries a consistency proof; at one size, none.
    assert (report.evidence.prefix_root is not None) == grown
    finding = await proven(report.evidence)
    assert ("rewrote its history" if grown else "two different trees") in finding.statement
    # The lie is not forgotten: the auditor kept the checkpoint it verified first.
    again = await Verifier.audit(host.url(), state_dir=state)
    assert only_problem(again).kind == "fork"


async def test_files_history_rewritten_after_an_audit_is_a_provable_fork(host, tmp_path):
    state = tmp_path / "auditor"
    async with RPCClient(host.url(), user="alice") as client:
        await client.note("/a", "x")
        await client.note("/b", "y")
    assert (await Verifier.audit(host.url(), state_dir=state)).ok

    def edit(entries):
        entries[1]["mtime"] += 1
        return entries

    await host.rewrite(edit, ledger="files_archive")
    report = await Verifier.audit(host.url(), state_dir=state)
    problem = only_problem(report)
    assert problem.kind == "fork"
    assert "files archive" in problem.message
    await proven(report.evidence)


async def test_entries_removed_after_an_audit_are_a_rollback(host, tmp_path):
    state = tmp_path / "auditor"
    await calls(host.url(), 1, 2, 3, 4)
    assert (await Verifier.audit(host.url(), state_dir=state)).ok
    await host.rewrite(lambda entries: entries[:-2])
    report = await Verifier.audit(host.url(), state_dir=state)
    problem = only_problem(report)
    assert problem.kind == "rollback"
    assert (problem.field, problem.expected, problem.found) == ("size", 5, 3)
    assert report.evidence is None


async def test_rollback_hidden_by_new_calls_is_a_provable_fork(host, tmp_path):
    state = tmp_path / "auditor"
    await calls(host.url(), 1, 2, 3)
    assert (await Verifier.audit(host.url(), state_dir=state)).ok
    await host.rewrite(lambda entries: entries[:-1])
    await calls(host.url(), 10, 20)
    report = await Verifier.audit(host.url(), state_dir=state)
    assert only_problem(report).kind == "fork"
    await proven(report.evidence)


async def test_other_keys_at_an_audited_url_are_a_key_change(host, tmp_path):
    state = tmp_path / "auditor"
    await calls(host.url(), 1)
    assert (await Verifier.audit(host.url(), state_dir=state)).ok
    assert host.server is not None
    # The host serves a brand-new VM, with new keys and a clean history, at the same URL.
    stand_in = BackendVM(SCRIPT)
    await stand_in.deploy(None)
    honest = host.server.unmount("/")
    host.server.mount("/", stand_in)
    try:
        problem = only_problem(await Verifier.audit(host.url(), state_dir=state))
        assert problem.kind == "key-changed"
        assert str(state) in problem.message  # where the pin is kept
        # A key given to check against is used instead of the pin, in any form.
        origin = ledger_url(honest.call_log.public_key)  # libvms:<key>
        web = ledger_url(honest.call_log.public_key, "http://127.0.0.1:1/log")
        for given in (web, origin, origin.removeprefix("libvms:")):
            report = await Verifier.audit(host.url(), state_dir=tmp_path / "b", pin_key=given)
            assert only_problem(report).kind == "key-changed"
            assert "given" in only_problem(report).message
        stand_in_key = stand_in.call_log.ledger.verifier.to_text()
        report = await Verifier.audit(host.url(), state_dir=state, pin_key=stand_in_key)
        assert report.ok
        with pytest.raises(ValueError, match="names no call log key"):
            await Verifier.audit(host.url(), state_dir=state, pin_key="garbage")
    finally:
        host.server.unmount("/")
        host.server.mount("/", honest)
        await stand_in.close()


# -- following a live VM -------------------------------------------------------------


async def follow_until_problem(url, state, act, *, honest_batch=True):
    """Audit ``url`` and follow it; run ``act`` (after one honest batch was verified,
    unless ``honest_batch`` is false) and return the report of the problem it causes."""
    auditor = Auditor(url, state_dir=state)
    try:
        assert (await auditor.run()).ok
        batches: asyncio.Queue[int] = asyncio.Queue()
        task = asyncio.create_task(auditor.follow(lambda _r, added: batches.put_nowait(added)))
        if honest_batch:
            await calls(url, 100)
            assert await asyncio.wait_for(batches.get(), 10) == 1
        await act()
        return await asyncio.wait_for(task, 10)
    finally:
        await auditor.close()


async def test_following_auditor_catches_a_result_the_logged_script_does_not_compute(
    host, tmp_path
):
    await calls(host.url(), 1)
    # Modified software runs other code than the log names; what it logged so far is honest.
    await host.rewrite(lambda entries: entries, code=SCRIPT.replace("total += n", "total -= n"))

    async def act():
        await calls(host.url(), 2)

    report = await follow_until_problem(host.url(), tmp_path / "auditor", act, honest_batch=False)
    problem = only_problem(report)
    assert (problem.kind, problem.index) == ("replay-mismatch", 2)
    assert report.evidence is not None and report.evidence.kind == "replay"
    await proven(report.evidence)


async def test_following_auditor_catches_a_call_forged_in_a_signed_users_name(host, tmp_path):
    victim = Keypair.generate()

    async def act():
        assert host.vm is not None
        await host.vm.execute_call("add", [1000], user_id=victim.user_id)

    report = await follow_until_problem(host.url(), tmp_path / "auditor", act)
    problem = only_problem(report)
    assert (problem.kind, problem.index) == ("signature", 2)


# -- 5. two auditors shown different logs -----------------------------------------


async def test_split_view_passes_each_audit_and_the_two_checkpoints_prove_a_fork(host, tmp_path):
    await calls(host.url(), 1)
    twin = await host.split(tmp_path / "twin")
    try:
        assert await calls(host.url(), 2, user="alice") == [3]
        assert await calls(twin.url(), 200, user="bob") == [201]
        report_a = await Verifier.audit(host.url(), state_dir=tmp_path / "auditor-a")
        report_b = await Verifier.audit(twin.url(), state_dir=tmp_path / "auditor-b")
        # Each view is an honest log on its own: no single auditor can tell.
        assert report_a.ok, report_a.to_json()
        assert report_b.ok, report_b.to_json()
        assert report_a.checkpoint["size"] == report_b.checkpoint["size"] == 3
        # Two auditors who compare notes hold two signed trees of one size.
        evidence = fork_evidence(report_a.checkpoint["note"], report_b.checkpoint["note"])
        await proven(evidence)
        # An auditor shown both views finds the fork itself.
        seen_both = await Verifier.audit(twin.url(), state_dir=tmp_path / "auditor-a")
        assert only_problem(seen_both).kind == "fork"
        await proven(seen_both.evidence)
    finally:
        await twin.close()


# -- 6. a receipt's entry missing or altered later ---------------------------------


@pytest.fixture
async def receipt(host):
    async with RPCClient(host.url(), key=Keypair.generate()) as client:
        await client.add(1)
        assert await client.add(2) == 3
        receipt = client.receipts[-1]
    await calls(host.url(), 3, 4)
    assert receipt.index == 2
    return receipt


async def test_receipt_of_an_honest_log_checks(host, receipt):
    result = await check_receipt(receipt, host.url())
    assert result.ok, result.message
    assert result.evidence is None


async def test_receipt_entry_altered_later_proves_a_fork(host, receipt):
    def edit(entries):
        entries[2]["result"]["res"] = 300
        return entries

    await host.rewrite(edit)
    result = await check_receipt(receipt, host.url())
    assert not result.ok
    assert "entry 2" in result.message
    await proven(result.evidence)


async def test_receipt_entry_dropped_later_proves_a_fork(host, receipt):
    await host.rewrite(lambda entries: entries[:2] + entries[3:])
    result = await check_receipt(receipt, host.url())
    assert not result.ok
    await proven(result.evidence)


async def test_receipt_entry_cut_off_later_fails_without_evidence(host, receipt):
    # Truncating consistently leaves a prefix of the receipt's tree: nothing two
    # signed checkpoints contradict, so the check fails but proves no fork.
    await host.rewrite(lambda entries: entries[:2])
    result = await check_receipt(receipt, host.url())
    assert not result.ok
    assert "fewer than" in result.message
    assert result.evidence is None
