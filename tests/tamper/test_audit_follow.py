"""A live auditor (``--follow``) against a host that cheats after the first audit."""

import asyncio

import pytest

from libvms.evidence import Evidence, check
from libvms.keys import Keypair
from libvms.rpc import RPCClient
from libvms.signed import DEFAULT_WINDOW_MS
from libvms.verifier import Auditor

from .dishonest import DishonestHost
from .test_audit_matrix import SCRIPT, audit, debug_calls, only_problem, price


@pytest.fixture
async def host(tmp_path):
    host = DishonestHost(tmp_path / "vm", SCRIPT, oracles={"price": price})
    await host.start()
    yield host
    await host.close()


async def start_follower(host, tmp_path):
    auditor = Auditor(host.url(), state_dir=tmp_path / "follower")
    report = await auditor.run()
    assert report.ok, report.problems
    batches: asyncio.Queue[int] = asyncio.Queue()
    task = asyncio.ensure_future(auditor.follow(lambda _report, added: batches.put_nowait(added)))
    return auditor, task, batches


async def test_follower_verifies_each_new_batch(host, tmp_path):
    await debug_calls(host, ("add", 1))
    auditor, task, batches = await start_follower(host, tmp_path)
    await debug_calls(host, ("add", 2), ("note", "/a", "x"))
    added = 0
    while added < 3:  # two log entries and one archive entry, in one or more batches
        added += await asyncio.wait_for(batches.get(), 10)
    assert auditor.report.ok
    assert auditor.report.entries == 4
    task.cancel()
    await auditor.close()


async def test_follower_catches_a_rewrite_with_evidence(host, tmp_path):
    await debug_calls(host, ("add", 1), ("add", 2))
    auditor, task, _batches = await start_follower(host, tmp_path)

    def change_result(entries):
        entries[1]["result"]["res"] = 1000
        return entries

    await host.rewrite(change_result)
    report = await asyncio.wait_for(task, 10)
    problem = only_problem(report)
    assert problem.kind == "fork"
    finding = await check(Evidence.from_json(report.evidence.to_json()))
    assert finding.proven
    await auditor.close()


async def test_follower_catches_a_truncation_as_rollback(host, tmp_path):
    await debug_calls(host, ("add", 1), ("add", 2))
    auditor, task, _batches = await start_follower(host, tmp_path)
    await host.rewrite(lambda entries: entries[:2])
    report = await asyncio.wait_for(task, 10)
    assert only_problem(report).kind == "rollback"
    await auditor.close()


async def test_follower_catches_a_file_written_outside_any_call(host, tmp_path):
    await debug_calls(host, ("note", "/file", "honest"))
    auditor, task, batches = await start_follower(host, tmp_path)
    await host.vm.files_archive.write_file("/file", "evil")
    report = await asyncio.wait_for(task, 10)
    problem = only_problem(report)
    assert (problem.kind, problem.path) == ("archive-mismatch", "/file")
    assert batches.empty()  # the batch that showed it was not announced as verified
    # The report names the archive checkpoint it was found at (the evil write's).
    assert report.files_checkpoint["size"] == auditor.archive.version == 3
    await auditor.close()


async def test_signed_request_logged_long_after_it_was_signed_is_caught(host, tmp_path):
    key = Keypair.generate()
    async with RPCClient(host.url(), key=key) as client:
        await client.add(5)

    def delay(entries):
        entries[1]["call"]["timestamp"] += 3 * DEFAULT_WINDOW_MS
        return entries

    await host.rewrite(delay)
    problem = only_problem(await audit(host, tmp_path))
    assert (problem.kind, problem.index) == ("signature", 1)


async def test_an_archive_fetched_ahead_of_the_log_is_no_false_alarm(host, tmp_path, monkeypatch):
    # The auditor fetches the log, then the archive: a busy host's archive already
    # holds calls the fetched log does not. Every commit writes both ledgers, so
    # the log fetched once more holds them; no false alarm.
    from libvms import verifier

    await debug_calls(host, ("note", "/a", "1"))
    fetch = verifier.fetch_files_archive

    async def calls_land_in_between(url, *args, **kwargs):
        await debug_calls(host, ("note", "/a", "2"), ("note", "/b", "3"))
        return await fetch(url, *args, **kwargs)

    refresh = verifier.refresh

    async def and_before_the_log_again(copy, *args, **kwargs):
        if copy is auditor.log and auditor.log.length == 2:
            await debug_calls(host, ("note", "/b", "5"))  # and one more meanwhile
        return await refresh(copy, *args, **kwargs)

    monkeypatch.setattr(verifier, "fetch_files_archive", calls_land_in_between)
    monkeypatch.setattr(verifier, "refresh", and_before_the_log_again)
    auditor = Auditor(host.url(), state_dir=tmp_path / "auditor")
    report = await auditor.run()
    assert report.ok, report.problems
    # The log, fetched again after the archive, held the calls that raced it, and
    # one more; the archive, fetched again in turn, holds that one too.
    assert (auditor.archive.version, auditor.replay.files_archive.version) == (5, 5)
    batches: asyncio.Queue[int] = asyncio.Queue()
    task = asyncio.ensure_future(auditor.follow(lambda _r, added: batches.put_nowait(added)))
    await debug_calls(host, ("note", "/c", "4"))
    while auditor.archive.version < 6:  # genesis and five writes
        await asyncio.wait_for(batches.get(), 10)
    assert not task.done() and auditor.report.ok, auditor.report.problems
    task.cancel()
    await auditor.close()


async def test_a_write_withheld_while_the_log_is_fetched_again_is_caught(
    host, tmp_path, monkeypatch
):
    # The same race, played by a dishonest host: calls land between the two
    # fetches and the host withholds the last one's write from its archive. The
    # log fetched again holds that call, so the archive must hold its write.
    from libvms import verifier

    fetch = verifier.fetch_files_archive

    async def withhold_in_between(url, *args, **kwargs):
        await debug_calls(host, ("note", "/a", "1"), ("note", "/b", "2"))
        await host.rewrite(lambda es: [e for e in es if e.get("path") != "/b"], "files_archive")
        return await fetch(url, *args, **kwargs)

    monkeypatch.setattr(verifier, "fetch_files_archive", withhold_in_between)
    report = await audit(host, tmp_path)
    problem = only_problem(report)
    assert (problem.kind, problem.path) == ("archive-mismatch", "/b")
