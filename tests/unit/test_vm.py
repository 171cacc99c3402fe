"""BackendVM: the seed's behaviour, plus logging, replay and limits."""

import asyncio
import hashlib
import logging
import sqlite3
import struct

import pytest

from libvms.archive import FilesArchive
from libvms.encoding import canonical, parse_canonical
from libvms.errors import (
    LibVMSError,
    LimitExceeded,
    NotFoundError,
    ReplayLimitError,
    ScriptError,
    TamperError,
    VerificationError,
    VMCallError,
)
from libvms.log import CallLog
from libvms.merkle import leaf_hash
from libvms.verifier import Verifier
from libvms.vm import BackendVM

SCRIPT = """
exports.foo = () => 'bar'
exports.whoami = () => System.caller.id
exports.writeToFile = async (v) => { await System.files.writeFile('/file', v) }
exports.readFile = (path) => System.files.readFile(path)
exports.add = (a, b) => a + b
exports.fail = () => { throw new TypeError('no good') }
exports.answer = 42
"""


async def deployed(tmp_path=None, code=SCRIPT, **kw):
    vm = BackendVM(code, **kw)
    await vm.deploy(dir=tmp_path, title="Test VM")
    return vm


async def test_exports_in_script_order_and_methods(tmp_path):
    vm = await deployed(tmp_path)
    assert list(vm.exports) == ["foo", "whoami", "writeToFile", "readFile", "add", "fail", "answer"]
    assert vm.exports["answer"] == 42
    assert vm.methods == ["foo", "whoami", "writeToFile", "readFile", "add", "fail"]
    assert await vm.exports["foo"]() == "bar"
    await vm.close()


async def test_module_exports_replacement():
    vm = await deployed(code="module.exports = {b: () => 1, a: () => 2}")
    assert vm.methods == ["b", "a"]
    assert await vm.execute_call("a") == 2
    await vm.close()


async def test_init_entry(tmp_path):
    vm = await deployed(tmp_path)
    init = await vm.call_log.get(0)
    assert init["type"] == "init"
    assert init["code"] == SCRIPT
    assert init["filesArchiveUrl"] == vm.files_archive.url
    assert init["runtime"]["engine"] == "quickjs-ng"
    assert isinstance(init["timestamp"], int)
    await vm.close()


async def test_call_entries_have_the_seeds_shape_and_versions(tmp_path):
    vm = await deployed(tmp_path)
    assert await vm.execute_call("foo") == "bar"
    for value in ["foo", "bar", "baz"]:
        assert await vm.execute_call("writeToFile", [value], user_id="alice") is None
    entries = await vm.call_log.list(start=1)
    assert [e["result"]["filesVersion"] for e in entries] == [1, 2, 3, 4]
    first = entries[0]
    assert first == {
        "type": "call",
        "call": {"methodName": "foo", "args": [], "timestamp": first["call"]["timestamp"]},
        "result": {"res": "bar", "filesVersion": 1, "filesRoot": first["result"]["filesRoot"]},
    }
    last = entries[-1]
    assert last["call"]["userId"] == "alice"
    assert "res" not in last["result"]  # undefined is omitted, never null
    assert last["result"]["filesRoot"] == vm.files_archive.state_root
    assert await vm.files_archive.read_file("/file") == "baz"
    await vm.close()


async def test_errors_are_logged_and_raised():
    vm = await deployed()
    with pytest.raises(VMCallError) as info:
        await vm.execute_call("fail")
    assert info.value.name == "TypeError" and info.value.message == "no good"
    entry = await vm.call_log.get(vm.call_log.length - 1)
    assert entry["result"]["err"] == {"name": "TypeError", "message": "no good"}
    with pytest.raises(VMCallError, match="MethodNotFound"):
        await vm.execute_call("answer")
    with pytest.raises(VMCallError, match="JSON"):
        await vm.execute_call("add", [float("nan"), 1])
    assert vm.call_log.length == 2
    await vm.close()


async def test_caller_id():
    vm = await deployed()
    assert await vm.execute_call("whoami", user_id="bob") == "bob"
    assert await vm.execute_call("whoami") is None
    await vm.close()


async def test_replay_reproduces_the_log_and_archive(tmp_path):
    vm = await deployed(tmp_path / "a")
    for value in ["foo", "bar", "baz"]:
        await vm.execute_call("writeToFile", [value])
    replay = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True
    )
    assert await replay.files_archive.read_file("/file") == "baz"
    await Verifier.compare_logs(vm.call_log, replay.call_log)
    await Verifier.compare_archives(vm.files_archive, replay.files_archive)
    await replay.close()
    await vm.close()


async def test_doubles_past_2_53_in_arguments_and_results_replay_and_reopen(tmp_path):
    # JSON numbers are doubles: 1e16 is logged as 10000000000000000, which must be
    # read back as the double it is, not refused as an unsafe integer.
    code = "exports.echo = (...a) => a\nexports.big = () => ({n: 2 ** 60, m: -1e20})"
    vm = await deployed(tmp_path, code=code)
    args = [{"t": 1e16}, [2.0**53 + 2, 1]]
    assert await vm.execute_call("echo", args) == args
    assert await vm.execute_call("big") == {"n": 2.0**60, "m": -1e20}
    replay = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True
    )
    await replay.close()
    await vm.close()
    again = BackendVM(code)
    await again.deploy(dir=tmp_path)
    assert await again.execute_call("echo", [1e17]) == [1e17]
    await again.close()


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"memory_limit": 0}, "memory_limit must be from 1"),
        ({"memory_limit": 10**30}, "memory_limit must be from"),
        ({"memory_limit": 64.5 * 2**20}, "whole number of bytes"),
        ({"call_timeout": float("nan")}, "above 0 and at most"),
        ({"call_timeout": 1e7}, "above 0 and at most"),
        ({"call_timeout": 0}, "above 0 and at most"),
        ({"call_timeout": "5"}, "number of seconds"),
    ],
)
def test_limits_the_sandbox_cannot_use_are_refused_at_once(limits, message):
    # Not an engine failure at deploy (a too-small limit could not even load the prelude).
    with pytest.raises(ValueError, match=message):
        BackendVM(SCRIPT, **limits)


async def test_rebuilding_after_an_abort_does_not_show_old_console_lines_again(caplog):
    vm = await deployed(
        code="exports.hi = (n) => { console.log('hi', n) }\nexports.spin = () => { for (;;) {} }",
        call_timeout=0.3,
    )
    await vm.execute_call("hi", [1])
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="libvms")
    with pytest.raises(LimitExceeded):
        await vm.execute_call("spin")  # the state is rebuilt by running call 1 again
    await vm.execute_call("hi", [2])
    shown = [(r.levelno, r.getMessage()) for r in caplog.records if "console" in r.getMessage()]
    assert shown == [(logging.DEBUG, "console.log: hi 1"), (logging.INFO, "console.log: hi 2")]
    await vm.close()


async def test_the_event_loop_keeps_serving_while_an_abort_rebuilds_the_state():
    vm = await deployed(
        code="exports.add = (a, b) => a + b\nexports.spin = () => { for (;;) {} }",
        call_timeout=0.3,
    )
    for start in range(0, 2048, 256):
        await asyncio.gather(*(vm.execute_call("add", [i, 1]) for i in range(start, start + 256)))
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0)
    with pytest.raises(LimitExceeded):
        await vm.execute_call("spin")  # then 2,048 calls are replayed
    task.cancel()
    assert ticks >= 2048 // 128 - 1
    assert await vm.execute_call("add", [1, 1]) == 2
    await vm.close()


async def test_a_memory_limit_too_small_for_the_sandbox_fails_the_deploy_cleanly(tmp_path):
    vm = BackendVM(SCRIPT, memory_limit=200 * 1024)
    with pytest.raises(LimitExceeded, match="the sandbox itself needs more than"):
        await vm.deploy(dir=tmp_path / "vm")
    assert not (tmp_path / "vm" / "libvms.db").exists()
    again = await deployed(tmp_path / "vm")  # nothing was left that stands in the way
    await again.close()


async def test_a_thrown_null_from_exhausted_memory_is_undecided_under_another_limit():
    # When memory runs out completely, QuickJS throws null instead of its error:
    # where that happens depends on the limit, so a replay under another limit
    # cannot decide the entry (and must never prove the honest host wrong).
    code = (
        "exports.grab = (n) => { try { const a = []; for (let i = 0; i < n; i++) "
        "a.push('x'.repeat(100) + i); return 'ok ' + a.length } "
        "catch (e) { return 'caught ' + e.name } }\nexports.ping = () => 'pong'"
    )
    vm = await deployed(code=code, memory_limit=768 * 1024)
    with pytest.raises(VMCallError, match="Error: null"):
        await vm.execute_call("grab", [4000])
    assert await vm.execute_call("ping") == "pong"
    assertions = {"files_archive_url": vm.files_archive.url}
    same = await BackendVM.from_call_log(
        vm.call_log, assertions, check=True, memory_limit=768 * 1024
    )
    await same.close()
    with pytest.raises(ReplayLimitError, match="entry 1: one run ended with a thrown null"):
        await BackendVM.from_call_log(vm.call_log, assertions, check=True)
    await vm.close()


async def test_replay_rejects_the_wrong_files_url():
    vm = await deployed()
    other = await FilesArchive.create(None, "other")
    with pytest.raises(VerificationError, match="files archive"):
        await BackendVM.from_call_log(vm.call_log, {"files_archive_url": other.url})
    await other.close()
    await vm.close()


async def test_init_is_called_once_logged_and_not_callable(tmp_path):
    code = """
    let n = 0
    exports.init = async () => { n++; await System.files.mkdir('/keys') }
    exports.count = () => n
    """
    vm = await deployed(tmp_path, code=code)
    entry = await vm.call_log.get(1)
    assert entry["call"]["methodName"] == "init" and entry["call"]["args"] == []
    assert vm.methods == ["count"]
    assert await vm.execute_call("count") == 1
    with pytest.raises(VMCallError, match="MethodNotFound"):
        await vm.execute_call("init")
    await vm.close()
    again = BackendVM(code)
    await again.deploy(dir=tmp_path)
    assert await again.execute_call("count") == 1  # state rebuilt by replay, init not rerun
    assert again.call_log.length == 4
    await again.close()


async def test_modified_archive_fails_compare_archives():
    vm = await deployed()
    await vm.execute_call("writeToFile", ["honest"])
    replay = await BackendVM.from_call_log(vm.call_log, {"files_archive_url": vm.files_archive.url})
    await vm.files_archive.write_file("/file", "tampered")
    with pytest.raises(VerificationError) as info:
        await Verifier.compare_archives(vm.files_archive, replay.files_archive)
    assert info.value.path == "/file"
    await replay.close()
    await vm.close()


async def test_falsified_result_fails_compare_logs_after_replay():
    vm = await deployed()
    await vm.execute_call("add", [2, 3])
    forged = await _forge(_with_result(await vm.call_log.list(), 6))
    replay = await BackendVM.from_call_log(forged, {"files_archive_url": vm.files_archive.url})
    with pytest.raises(VerificationError) as info:
        await Verifier.compare_logs(forged, replay.call_log)
    assert info.value.index == 1
    assert info.value.field == "result.res"
    assert (info.value.expected, info.value.found) == (6, 5)
    with pytest.raises(VerificationError, match=r"result\.res"):
        await BackendVM.from_call_log(
            forged, {"files_archive_url": vm.files_archive.url}, check=True
        )
    await replay.close()
    await vm.close()


def _open_stores_in(directory) -> list:
    from libvms.store import Store

    return [path for path in Store._registry if path.parent == directory]


async def test_one_vm_at_a_time_holds_a_directory(tmp_path):
    from libvms.errors import DirectoryInUseError

    first = BackendVM(SCRIPT)
    second = BackendVM(SCRIPT)
    results = await asyncio.gather(
        first.deploy(dir=tmp_path), second.deploy(dir=tmp_path), return_exceptions=True
    )
    assert results[0] is None and isinstance(results[1], DirectoryInUseError)
    assert await first.execute_call("add", [1, 2]) == 3  # the refusal took nothing from it
    with pytest.raises(DirectoryInUseError, match="in this process"):
        await BackendVM(SCRIPT).deploy(dir=tmp_path)
    with pytest.raises(DirectoryInUseError):
        await BackendVM.from_call_log(
            first.call_log, {"files_archive_url": first.files_archive.url}, tmp_path
        )
    await first.close()
    again = BackendVM(SCRIPT)
    await again.deploy(dir=tmp_path)  # free once the holder closed
    assert again.call_log.length == 2
    await again.close()


async def test_a_database_with_nothing_committed_is_deployed_afresh(tmp_path):
    # What a deploy killed before its one commit leaves: the tables, the key files
    # and the marker saying they are that deploy's.
    from libvms.store import Store
    from libvms.vm import DEPLOYING_FILENAME

    store = Store.open(tmp_path)
    CallLog._new(tmp_path, store=store)
    store.close()
    (tmp_path / DEPLOYING_FILENAME).touch()
    assert Store.holds_nothing(tmp_path) and (tmp_path / "call-log.key").exists()
    vm = await deployed(tmp_path)
    assert await vm.execute_call("add", [1, 2]) == 3
    await vm.close()
    assert not Store.holds_nothing(tmp_path)
    assert not (tmp_path / DEPLOYING_FILENAME).exists()
    again = await deployed(tmp_path)
    assert again.call_log.length == 2
    await again.close()


async def test_key_files_without_their_database_are_never_replaced(tmp_path):
    # A database lost or moved aside (a backup being restored): the keys are the
    # VM's, and a deploy must not make a new VM under new keys in their place.
    from libvms.store import Store

    vm = await deployed(tmp_path)
    await vm.close()
    keys = {p.name: p.read_bytes() for p in tmp_path.glob("*.key")}
    for name in ("libvms.db", "libvms.db-wal", "libvms.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(LibVMSError, match="holds key files but no database"):
        await BackendVM(SCRIPT).deploy(dir=tmp_path)
    assert not Store.exists(tmp_path)  # refused before making one
    Store.open(tmp_path).close()  # an empty database, made by anything else
    with pytest.raises(LibVMSError, match=r"holds key files, but its libvms\.db holds nothing"):
        await BackendVM(SCRIPT).deploy(dir=tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.key")} == keys


@pytest.mark.parametrize("lost", ["call-log.key", "files-archive.key"])
async def test_a_database_without_its_key_files_is_refused_not_run_read_only(tmp_path, lost):
    # A database restored without its keys: run read-only, every write would fail
    # and be logged as the call's result, and the directory never audit again.
    vm = await deployed(tmp_path)
    await vm.execute_call("writeToFile", ["kept"])
    await vm.close()
    key = (tmp_path / lost).read_bytes()
    (tmp_path / lost).unlink()
    with pytest.raises(LibVMSError, match=f"not its key file {lost}: restore"):
        await BackendVM(SCRIPT).deploy(dir=tmp_path)
    assert _open_stores_in(tmp_path) == []
    (tmp_path / lost).write_bytes(key)
    again = await deployed(tmp_path)
    await again.execute_call("writeToFile", ["more"])
    assert await again.files_archive.read_file("/file") == "more"
    await again.close()


async def test_close_during_a_reopen_waits_for_it_then_releases_everything(tmp_path):
    vm = await deployed(tmp_path)
    for start in range(0, 600, 200):
        await asyncio.gather(*(vm.execute_call("add", [i, start]) for i in range(200)))
    await vm.close()
    again = BackendVM(SCRIPT)
    deploying = asyncio.get_running_loop().create_task(again.deploy(dir=tmp_path))
    for _ in range(3):
        await asyncio.sleep(0)  # the reopen's replay is under way
    await again.close()
    await deploying  # finished (the close waited for it), not a false TamperError
    assert _open_stores_in(tmp_path) == []
    with pytest.raises(LibVMSError, match="closed"):
        await again.execute_call("add", [1, 2])
    third = await deployed(tmp_path)  # the directory lock was released
    assert third.call_log.length == 601
    await third.close()


async def test_init_asked_for_while_the_deploy_runs_it_is_refused(tmp_path):
    vm = BackendVM(INIT_SCRIPT)
    deploying = asyncio.get_running_loop().create_task(vm.deploy(dir=tmp_path))
    while vm.call_log is None:  # the deploy has made its ledgers and is running init
        await asyncio.sleep(0)
    with pytest.raises(LibVMSError, match="deploy the VM before calling it"):
        await vm.execute_call("init")
    await deploying
    with pytest.raises(VMCallError, match="MethodNotFound"):
        await vm.execute_call("init")
    assert [e["call"]["methodName"] for e in (await vm.call_log.list())[1:]] == ["init"]
    await vm.close()


async def test_a_second_deploy_of_one_vm_waits_then_is_refused_holding_nothing(tmp_path):
    from libvms.rpc import RPCServer

    source = await deployed(tmp_path / "a")
    for start in range(0, 600, 200):
        await asyncio.gather(*(source.execute_call("add", [i, start]) for i in range(200)))
    await source.close()
    vm = BackendVM(SCRIPT)
    first = asyncio.get_running_loop().create_task(vm.deploy(dir=tmp_path / "a"))
    while vm.call_log is None:  # reopening: the ledgers are open, the replay runs
        await asyncio.sleep(0)
    with pytest.raises(LibVMSError, match="deploy the VM before mounting it"):
        RPCServer(vm, port=0)  # not half-way through its reopen
    with pytest.raises(LibVMSError, match="already deployed"):
        await vm.deploy(dir=tmp_path / "b")
    await first
    await vm.close()
    assert _open_stores_in(tmp_path / "a") == [] and _open_stores_in(tmp_path / "b") == []
    for directory in ("a", "b"):  # neither is held
        other = await deployed(tmp_path / directory)
        await other.close()


async def test_a_deploy_cancelled_while_init_runs_commits_nothing(tmp_path):
    code = """
    exports.init = async () => { await System.oracles.slow() }
    exports.ping = () => 'pong'
    """
    started = asyncio.Event()

    async def slow():
        started.set()
        await asyncio.Event().wait()

    vm = BackendVM(code)
    vm.add_oracle("slow", slow)
    deploy = asyncio.ensure_future(vm.deploy(dir=tmp_path))
    await started.wait()
    deploy.cancel()
    with pytest.raises(asyncio.CancelledError):
        await deploy
    from libvms.store import Store

    assert Store.holds_nothing(tmp_path)  # neither the genesis nor the init entry
    again = BackendVM(code)
    again.add_oracle("slow", lambda: None)
    await again.deploy(dir=tmp_path)  # afresh: init runs, as entry 1
    assert await again.execute_call("ping") == "pong"
    assert [e["call"]["methodName"] for e in await again.call_log.list(1)] == ["init", "ping"]
    await again.close()


INIT_SCRIPT = """
exports.init = async () => {
  await System.files.writeFile('/count', '0')
  if (globalThis.failInit) throw new Error('init failed')
}
exports.bump = async () => {
  const n = Number(await System.files.readFile('/count')) + 1
  await System.files.writeFile('/count', String(n))
  return n
}
"""


@pytest.mark.parametrize("failure", ["throw new Error('init failed')", "for (;;) {}"])
async def test_an_init_that_fails_deploys_nothing_and_the_fixed_script_deploys(tmp_path, failure):
    code = INIT_SCRIPT.replace("throw new Error('init failed')", failure)
    broken = "globalThis.failInit = true\n" + code
    for _ in range(2):  # the same script fails the same way every time
        vm = BackendVM(broken, call_timeout=0.3)
        with pytest.raises(ScriptError, match=r"the script's init failed \(.*nothing was deployed"):
            await vm.deploy(dir=tmp_path)
        with pytest.raises(LibVMSError, match="closed"):
            await vm.execute_call("bump")
        assert _open_stores_in(tmp_path) == []
    fixed = BackendVM(code)
    await fixed.deploy(dir=tmp_path)  # afresh: no trace of the failed deploys
    entries = await fixed.call_log.list()
    assert [e["type"] for e in entries] == ["init", "call"]
    assert "err" not in entries[1]["result"]
    assert fixed.files_archive.version == 2  # the genesis and init's one write
    assert await fixed.execute_call("bump") == 1
    await fixed.close()


def _with_result(entries, res):
    """``entries`` with every call's result changed to ``res``."""
    for entry in entries:
        if entry["type"] == "call":
            entry["result"]["res"] = res
    return entries


async def _forge(entries):
    """The host's own re-signed log holding ``entries``."""
    forged = CallLog._new(None)
    for entry in entries:
        forged.stage(entry)
    await forged.ledger.store.flush()
    return forged


async def test_init_runs_first_and_only_first_in_every_replay():
    vm = await deployed(code=INIT_SCRIPT)
    for _ in range(2):
        await vm.execute_call("bump")
    assertions = {"files_archive_url": vm.files_archive.url}
    # A host that runs init again resets the script's state behind its users; each
    # entry is one a VM makes (the replay of its own steps succeeds), but not there.
    async with vm._lock:  # what only a modified host does: no call may run init
        await vm._execute("init", [], None, None, True)
    await vm._store.flush()
    assert await vm.execute_call("bump") == 1
    with pytest.raises(VerificationError, match="entry 4 calls init") as raised:
        await BackendVM.from_call_log(vm.call_log, assertions)
    assert raised.value.index == 4
    entries = await vm.call_log.list()
    # A log that skips init, or stops before it.
    for forged_entries, match in [
        ([entries[0], *entries[2:4]], "entry 1 calls 'bump', but the script exports init"),
        (entries[:1], "holds no init call"),
    ]:
        forged = await _forge(forged_entries)
        with pytest.raises(VerificationError, match=match):
            await BackendVM.from_call_log(forged, assertions)
        await forged.close()
    # An init call in the log of a script without one.
    plain = await deployed()
    await plain.execute_call("foo")
    entries = await plain.call_log.list()
    entries[1]["call"]["methodName"] = "init"
    forged = await _forge(entries)
    with pytest.raises(VerificationError, match="exports no init function"):
        await BackendVM.from_call_log(forged, {"files_archive_url": plain.files_archive.url})
    await forged.close()
    await plain.close()
    await vm.close()


async def test_get_info_shows_the_same_archive_live_and_in_every_replay(tmp_path):
    # A replay's own archive has another key (and once had another title): the
    # script must still see the VM's.
    code = "exports.info = () => System.files.getInfo()\n"
    vm = BackendVM(code)
    await vm.deploy(dir=tmp_path, title="My title")
    served_at = vm.files_archive.url
    vm.files_archive.location = "http://127.0.0.1:5555/files"  # as RPCServer does
    info = await vm.execute_call("info")
    # The URL the init entry names, wherever (and whether) the archive is served.
    assert (info["url"], info["title"]) == (served_at, "My title")
    replay = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True
    )
    assert replay.files_archive.title == "My title"
    await replay.close()
    await vm.close()
    again = BackendVM(code)
    await again.deploy(dir=tmp_path)  # its own rebuild replays it too
    assert (await again.execute_call("info"))["title"] == "My title"
    await again.close()


async def test_a_replay_past_its_own_limits_is_undecided_not_a_mismatch():
    from libvms.errors import ReplayLimitError

    code = "exports.big = (mib) => 'x'.repeat(mib * 1024 * 1024).length\n"
    vm = await deployed(code=code, memory_limit=256 * 2**20)
    await vm.execute_call("big", [96])
    assertions = {"files_archive_url": vm.files_archive.url}
    with pytest.raises(ReplayLimitError, match="MemoryLimitExceeded") as raised:
        await BackendVM.from_call_log(vm.call_log, assertions, check=True)
    assert raised.value.index == 1 and not isinstance(raised.value, VerificationError)
    replay = await BackendVM.from_call_log(
        vm.call_log, assertions, check=True, memory_limit=256 * 2**20
    )
    await replay.close()
    await vm.close()


async def test_a_limit_in_a_timer_under_another_limit_is_undecided_not_a_mismatch():
    # The allocation runs in a timer callback: a host with room for it logs the
    # call's result; an auditor without must say "undecided", not "mismatch".
    code = """
    let state = [];
    exports.build = (n) => new Promise(r => {
      setTimeout(() => {
        const a = []; for (let i = 0; i < n; i++) a.push({i, s: 'x' + i}); state = a
      }, 0);
      setTimeout(() => r(state.length), 1);
    });
    exports.size = () => state.length
    """
    vm = await deployed(code=code)
    assert await vm.execute_call("build", [200_000]) == 200_000
    assertions = {"files_archive_url": vm.files_archive.url}
    with pytest.raises(ReplayLimitError) as raised:
        await BackendVM.from_call_log(vm.call_log, assertions, check=True, memory_limit=4 << 20)
    assert raised.value.index == 1 and not isinstance(raised.value, VerificationError)
    replay = await BackendVM.from_call_log(vm.call_log, assertions, check=True)
    await replay.close()
    await vm.close()


EXPORTS_RUN_CODE = """
let counter = 0, snap = -1, reads = 0;
exports.config = { toJSON() { snap = counter; reads++; return 1 } };
exports.inc = () => ++counter;
exports.snap = () => [snap, reads];
exports.spin = () => { for (;;) {} };
exports.plugin = () => { exports.extra = () => 'extra'; delete exports.inc; return 'ok' };
exports.poison = () => { exports.config = NaN; return 'poisoned' };
"""


async def test_exports_are_read_once_right_after_the_load_on_every_path(tmp_path):
    """Reading the exports runs script code (a toJSON, a Proxy's traps): it happens
    once, right after the load, live, on a reopen, after an abort and in every
    replay, so that all of them hold the same state and list the same methods."""
    methods = ["inc", "snap", "spin", "plugin", "poison"]
    vm = await deployed(tmp_path, code=EXPORTS_RUN_CODE, call_timeout=0.5)
    assert vm.exports["config"] == 1 and vm.methods == methods
    assert await vm.execute_call("inc") == 1
    assert await vm.execute_call("inc") == 2
    assert await vm.execute_call("snap") == [0, 1]
    with pytest.raises(LimitExceeded):
        await vm.execute_call("spin")  # the state is rebuilt by replaying the log
    assert await vm.execute_call("snap") == [0, 1]
    # A call that exports another function, or unexports one, changes no method:
    assert await vm.execute_call("plugin") == "ok"
    assert vm.methods == methods
    with pytest.raises(VMCallError, match="not an exported function"):
        await vm.execute_call("extra")
    # A method the call removed is logged as the script's TypeError, and costs no
    # rebuild of the state (a request for it could otherwise force one each time).
    runtime = vm._runtime
    with pytest.raises(VMCallError, match="TypeError: inc is not a function"):
        await vm.execute_call("inc")
    assert vm._runtime is runtime
    assert (await vm.call_log.get(vm.call_log.length - 1))["result"]["err"]["name"] == "TypeError"
    # ... and one that leaves an export that is not JSON does not stop a reopen.
    assert await vm.execute_call("poison") == "poisoned"
    await vm.close()
    vm = await deployed(tmp_path, code=EXPORTS_RUN_CODE, call_timeout=0.5)
    assert vm.methods == methods and vm.exports["config"] == 1
    assert await vm.execute_call("snap") == [0, 1]
    log = vm.call_log
    assertions = {"files_archive_url": vm.files_archive.url}
    replay = await BackendVM.from_call_log(log, assertions, check=True)
    assert replay.methods == methods
    await replay.close()
    await vm.close()


async def test_a_following_replay_reads_the_exports_only_once(tmp_path):
    code = """
    let k = 0;
    module.exports = new Proxy({ get: () => k }, { ownKeys(t) { k++; return Reflect.ownKeys(t) } });
    """
    vm = await deployed(code=code)
    assert await vm.execute_call("get") == 1
    follower = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True
    )
    for _ in range(2):
        assert await vm.execute_call("get") == 1
        assert await follower.replay_more(vm.call_log) == 1
    await follower.close()
    await vm.close()


WORK_CODE = """
exports.work = (n) => { let x = 0; for (let i = 0; i < n; i++) x = (x + i * 7) % 1000003; return x }
exports.spin = () => { for (;;) {} };
exports.ping = () => 'pong';
"""


async def test_a_burst_of_calls_lets_the_event_loop_serve_others_meanwhile():
    # Calls that arrive together and finish without awaiting used to run all in
    # one turn of the event loop: one connection's burst froze every other one.
    vm = await deployed(code=WORK_CODE)
    loop = asyncio.get_running_loop()
    seen: list[int] = []
    burst = 40

    def probe() -> None:
        seen.append(vm.call_log.length)
        if vm.call_log.length < burst + 1:
            loop.call_soon(probe)

    calls = [asyncio.ensure_future(vm.submit("work", [300_000])) for _ in range(burst)]
    loop.call_soon(probe)
    await asyncio.gather(*calls)
    assert any(2 < length < burst for length in seen), seen
    await vm.close()


async def test_a_rebuild_gives_the_calls_it_reruns_more_time_than_live_ones(monkeypatch):
    from libvms.runtime import JSRuntime
    from libvms.vm import REBUILD_TIME_FACTOR

    timeouts: list[tuple[bool, float]] = []
    real_call = JSRuntime.call

    async def call(self, *args, **kwargs):
        timeouts.append((self.rerunning, self.call_timeout))
        return await real_call(self, *args, **kwargs)

    monkeypatch.setattr(JSRuntime, "call", call)
    vm = await deployed(code=WORK_CODE, call_timeout=0.5)
    assert await vm.execute_call("ping") == "pong"
    with pytest.raises(LimitExceeded):
        await vm.execute_call("spin")
    assert await vm.execute_call("ping") == "pong"
    assert timeouts == [(False, 0.5), (False, 0.5), (True, 0.5 * REBUILD_TIME_FACTOR), (False, 0.5)]
    await vm.close()


@pytest.mark.parametrize(
    "failure",
    [
        ReplayLimitError("entry 1: the replay ran past its own limits", index=1),
        sqlite3.OperationalError("disk I/O error"),
    ],
)
async def test_an_aborted_call_is_reported_as_logged_even_if_the_rebuild_fails(
    tmp_path, monkeypatch, failure
):
    vm = await deployed(tmp_path, code=WORK_CODE, call_timeout=0.5)
    real_rebuild = vm._rebuild
    failures = []

    async def failing_rebuild():
        if not failures:
            failures.append(1)
            raise failure
        return await real_rebuild()

    monkeypatch.setattr(vm, "_rebuild", failing_rebuild)
    result = await vm.submit("spin")
    assert isinstance(result.error, LimitExceeded) and result.seq == 1
    reopened = await CallLog.open(tmp_path)  # durable, as its caller was told
    assert (await reopened.get(1))["result"]["aborted"] is True
    await reopened.close()
    assert await vm.execute_call("ping") == "pong"  # the next call rebuilds
    await vm.close()


async def test_a_script_that_does_not_load_within_the_auditors_limits_is_undecided():
    code = (
        "const big = []; for (let i = 0; i < 100000; i++) big.push({i});\n"
        "exports.n = () => big.length"
    )
    vm = await deployed(code=code)
    assert await vm.execute_call("n") == 100_000
    assertions = {"files_archive_url": vm.files_archive.url}
    for limit in (1536 * 1024, 4 << 20):  # out of memory, or so far out that it throws null
        with pytest.raises(ReplayLimitError, match="does not load within the replay's limits"):
            await BackendVM.from_call_log(vm.call_log, assertions, check=True, memory_limit=limit)
    await vm.close()


async def test_requests_a_call_made_before_a_limit_ended_it_are_not_served():
    code = """
    exports.f = () => new Promise(() => {
      setTimeout(() => { System.files.writeFile('/late', 'x'); throw null }, 0);
    });
    exports.ls = () => System.files.readdir('/');
    """
    vm = await deployed(code=code)
    with pytest.raises(VMCallError, match="Error: null"):
        await vm.execute_call("f")
    assert await vm.execute_call("ls") == []
    await _replays(vm)


async def test_a_log_keeps_the_behaviour_version_it_was_begun_with(tmp_path, monkeypatch):
    """A log begun under prelude 2 replays and reopens under 2's rules: a limit in a
    timer went to the console, a failed conversion gave the placeholder, and the
    deploy listed the exports twice (what a Proxy's traps saw)."""
    import libvms.vm as vm_module

    code = """
    let listed = 0;
    module.exports = new Proxy({
      timer: () => new Promise(r => {
        setTimeout(() => { throw null }, 0);
        setTimeout(() => r('on'), 5);
      }),
      conv: () => { throw { toString() { throw null } } },
      listed: () => listed,
    }, { ownKeys(t) { listed++; return Reflect.ownKeys(t) } });
    """
    placeholder = "Error: <the thrown value could not be converted to a string>"
    monkeypatch.setattr(vm_module, "PRELUDE_VERSION", "2")
    old = await deployed(tmp_path, code=code)
    monkeypatch.undo()
    assert (await old.call_log.get(0))["runtime"]["prelude"] == "2"
    assert await old.execute_call("timer") == "on"
    with pytest.raises(VMCallError, match=placeholder):
        await old.execute_call("conv")
    assert await old.execute_call("listed") == 2
    await old.close()
    vm = await deployed(tmp_path, code=code)  # reopened by this libvms: still version 2
    assert await vm.execute_call("timer") == "on"
    assert await vm.execute_call("listed") == 2
    replay = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True
    )
    assert replay.warnings == []
    await replay.close()
    await vm.close()
    new = await deployed(code=code)  # a new log runs this version's rules
    with pytest.raises(VMCallError, match="Error: null"):
        await new.execute_call("timer")
    assert await new.execute_call("listed") == 1
    await new.close()


async def test_a_method_gone_is_a_logged_error_from_prelude_3_on(monkeypatch):
    import libvms.vm as vm_module

    code = "exports.drop = () => { delete exports.gone; return 1 };\nexports.gone = () => 2"
    monkeypatch.setattr(vm_module, "PRELUDE_VERSION", "2")
    old = await deployed(code=code)
    monkeypatch.undo()
    assert await old.execute_call("drop") == 1
    with pytest.raises(VMCallError, match="MethodNotFound"):
        await old.execute_call("gone")  # as version 2 hosts did: refused, not logged
    assert old.call_log.length == 2
    await old.close()
    new = BackendVM(code)
    new._prelude_version = "2"  # as a failed reopen of a version 2 directory leaves it
    await new.deploy(None)  # a new log runs this libvms's rules all the same
    assert (await new.call_log.get(0))["runtime"]["prelude"] == "3"
    assert await new.execute_call("drop") == 1
    with pytest.raises(VMCallError, match="TypeError"):
        await new.execute_call("gone")
    assert new.call_log.length == 3
    await _replays(new)
    await new.close()


async def test_a_logged_call_of_a_method_the_script_never_had_fails_the_audit():
    vm = await deployed()
    await vm.execute_call("foo")
    entries = await vm.call_log.list()
    entries[1]["call"]["methodName"] = "transferAll"  # a modified host's invention
    forged = await _forge(entries)
    with pytest.raises(VerificationError, match="entry 1: MethodNotFound"):
        await BackendVM.from_call_log(forged, {"files_archive_url": vm.files_archive.url})
    await forged.close()
    await vm.close()


async def test_calls_that_arrive_together_still_share_commits(monkeypatch):
    # Bursts of calls make the VM let the event loop turn now and then; done while
    # holding the VM's lock, that put every later call through the lock's
    # hand-off, one per turn, and commits fell from hundreds of calls to a few.
    import libvms.vm as vm_module
    from libvms.store import Store

    commits = []
    real_commit = Store._commit

    def counting(self, *args, **kwargs):
        commits.append(1)
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(Store, "_commit", counting)
    vm = await deployed(code=WORK_CODE)
    # A clock that the VM sees advance 1 ms each time it looks, whatever the
    # machine's speed: a burst lets the loop turn every 20 calls or so.
    ticks = iter(range(10**9))
    monkeypatch.setattr(vm_module, "_monotonic", lambda: next(ticks) / 1000)
    commits.clear()
    for _ in range(4):
        await asyncio.gather(*(vm.execute_call("work", [300]) for _ in range(256)))
    assert 4 <= len(commits) <= 1024 // 8, len(commits)
    await vm.close()


async def test_the_file_data_a_call_holds_is_bounded(monkeypatch):
    # The host holds a call's written files until the call commits: bounded by
    # size, not by how long the call may run (prelude 3 logs on).
    import libvms.vm as vm_module

    monkeypatch.setattr(vm_module, "MAX_CALL_WRITE_BYTES", 2**20)
    code = """
    exports.fill = async (n, size) => {
      let done = 0;
      try {
        for (; done < n; done++) {
          await System.files.writeFile('/f' + done, String(done).padEnd(size, 'x'));
        }
      } catch (e) { return [done, e.name, e.message] }
      return [done];
    };
    exports.same = async (n, size) => {
      for (let i = 0; i < n; i++) await System.files.writeFile('/s' + i, 'y'.repeat(size));
      return (await System.files.readdir('/')).length;
    };
    """
    vm = await deployed(code=code)
    done, name, message = await vm.execute_call("fill", [10, 300_000])
    assert (done, name) == (3, "RangeError") and "more than 1048576 bytes" in message
    assert await vm.execute_call("same", [10, 300_000]) == 13  # one content, held once
    await _replays(vm)
    monkeypatch.setattr(vm_module, "PRELUDE_VERSION", "2")
    old = await deployed(code=code)
    assert await old.execute_call("fill", [10, 300_000]) == [10]  # version 2: no bound
    await old.close()


async def test_readdir_takes_the_seeds_recursive_and_stat_options(monkeypatch):
    import libvms.vm as vm_module

    code = """
    exports.setup = async () => {
      await System.files.mkdir('/a'); await System.files.mkdir('/a/b');
      await System.files.writeFile('/a/x.txt', 'x');
      await System.files.writeFile('/a/b/c.txt', 'cc');
    };
    exports.ls = async (p, o) => (await System.files.readdir(p, o))
      .map(e => typeof e === 'string' ? e : [e.name, e.stat.isFile(), e.stat.size]);
    """
    vm = await deployed(code=code)
    await vm.execute_call("setup")
    assert await vm.execute_call("ls", ["/a"]) == ["b", "x.txt"]
    assert await vm.execute_call("ls", ["/a", {"recursive": True}]) == ["b", "b/c.txt", "x.txt"]
    assert await vm.execute_call("ls", ["/a", {"stat": True}]) == [
        ["b", False, 0],
        ["x.txt", True, 1],
    ]
    assert await vm.execute_call("ls", ["/", {"recursive": True, "stat": True}]) == [
        ["a", False, 0],
        ["a/b", False, 0],
        ["a/b/c.txt", True, 2],
        ["a/x.txt", True, 1],
    ]
    for opts in ("yes", {"stat": 1}, {"stat": 0}, {"recursive": "true"}):
        with pytest.raises(VMCallError, match="TypeError"):
            await vm.execute_call("ls", ["/a", opts])
    assert await vm.execute_call("ls", ["/a", {"stat": None, "recursive": None}]) == ["b", "x.txt"]
    await _replays(vm)
    # A recursive listing is built in the host's memory: it is bounded.
    monkeypatch.setattr(vm_module, "MAX_LISTED_ENTRIES", 3)
    bounded = await deployed(code=code)
    await bounded.execute_call("setup")
    with pytest.raises(VMCallError, match=r"RangeError: .* more than 3 entries"):
        await bounded.execute_call("ls", ["/", {"recursive": True}])
    assert await bounded.execute_call("ls", ["/a", {"recursive": True}]) == [
        "b",
        "b/c.txt",
        "x.txt",
    ]
    await _replays(bounded)
    monkeypatch.undo()
    monkeypatch.setattr(vm_module, "PRELUDE_VERSION", "2")
    old = await deployed(code=code)
    await old.execute_call("setup")
    assert await old.execute_call("ls", ["/a", {"recursive": True}]) == ["b", "x.txt"]  # as then
    await old.close()


async def test_files_errors_have_the_seeds_names_and_flags(monkeypatch):
    import libvms.vm as vm_module

    code = """
    const f = System.files;
    const tries = {
      mkdirTwice: () => f.mkdir('/d'),
      writeOntoDir: () => f.writeFile('/d', 'x'),
      noParent: () => f.writeFile('/none/x', 'x'),
      parentIsFile: () => f.mkdir('/file/sub'),
      readDir: () => f.readFile('/d'),
      unlinkDir: () => f.unlink('/d'),
      rmdirFile: () => f.rmdir('/file'),
      notEmpty: () => f.rmdir('/d'),
      missing: () => f.stat('/missing'),
    };
    exports.setup = async () => {
      await f.mkdir('/d'); await f.writeFile('/d/x', 'x'); await f.writeFile('/file', 'y');
    };
    exports.errors = async () => {
      const out = {};
      for (const k of Object.keys(tries)) {
        try { await tries[k]() } catch (e) {
          out[k] = [e.name, Object.keys(e).filter(p => e[p] === true)];
        }
      }
      return out;
    };
    """
    expected = {
        "mkdirTwice": ["EntryAlreadyExistsError", ["entryAlreadyExists"]],
        "writeOntoDir": ["EntryAlreadyExistsError", ["entryAlreadyExists"]],
        "noParent": ["ParentFolderDoesntExistError", ["parentFolderDoesntExist"]],
        "parentIsFile": ["ParentFolderDoesntExistError", ["parentFolderDoesntExist"]],
        "readDir": ["NotAFileError", ["notAFile"]],
        "unlinkDir": ["NotAFileError", ["notAFile"]],
        "rmdirFile": ["NotAFolderError", ["notAFolder"]],
        "notEmpty": ["DestDirectoryNotEmpty", ["destDirectoryNotEmpty"]],
        "missing": ["NotFoundError", ["notFound"]],
    }
    vm = await deployed(code=code)
    await vm.execute_call("setup")
    assert await vm.execute_call("errors") == expected
    await _replays(vm)
    monkeypatch.setattr(vm_module, "PRELUDE_VERSION", "2")
    old = await deployed(code=code)
    await old.execute_call("setup")
    names = {k: v[0] for k, v in (await old.execute_call("errors")).items()}
    assert names["mkdirTwice"] == "AlreadyExistsError"  # version 2 logs keep libvms's names
    assert names["notEmpty"] == "DirectoryNotEmptyError"
    assert all(flags == [] for _, flags in (await old.execute_call("errors")).values())
    await old.close()


async def test_set_immediate_and_trailing_slashes_as_in_the_seeds_sandbox(monkeypatch):
    import libvms.vm as vm_module

    code = """
    exports.order = () => new Promise(r => {
      const seen = [];
      setTimeout(() => seen.push('timeout'), 0);
      setImmediate((x) => seen.push(x), 'immediate');
      clearImmediate(setImmediate(() => seen.push('cleared')));
      Promise.resolve().then(() => seen.push('job'));
      setTimeout(() => r(seen), 1);
    });
    exports.slash = async () => {
      try { await System.files.writeFile('/t/', 'x') } catch (e) { return e.name }
      return (await System.files.readdir('/')).join();
    };
    exports.immediate = () => typeof setImmediate;
    """
    vm = await deployed(code=code)
    assert await vm.execute_call("order") == ["job", "timeout", "immediate"]
    assert await vm.execute_call("slash") == "InvalidPathError"
    await _replays(vm)
    monkeypatch.setattr(vm_module, "PRELUDE_VERSION", "2")
    old = await deployed(code=code)
    assert await old.execute_call("immediate") == "undefined"  # version 2's environment
    assert await old.execute_call("slash") == "t"
    await old.close()


async def test_a_log_written_under_prelude_2_still_audits_and_goes_on_under_its_rules(tmp_path):
    import shutil
    from pathlib import Path

    directory = tmp_path / "vm"
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "prelude2-vm"
    shutil.copytree(fixture, directory, ignore=shutil.ignore_patterns("README.md"))
    log = await CallLog.open(directory)
    init = await log.get(0)
    assert init["runtime"]["prelude"] == "2"
    replay = await BackendVM.from_call_log(log, {}, check=True)
    assert replay.warnings == []
    await replay.close()
    await log.close()
    vm = await deployed(directory, code=init["code"])
    assert await vm.execute_call("timerNull") == "went on"
    assert await vm.execute_call("listed") == 2
    assert await vm.execute_call("immediate") == "undefined"
    assert [name for name, _ in await vm.execute_call("errors")] == [
        "AlreadyExistsError",
        "DirectoryNotEmptyError",
        "IsADirectoryError",
        "NotFoundError",
    ]
    length = vm.call_log.length
    with pytest.raises(VMCallError, match="MethodNotFound"):
        await vm.execute_call("gone")  # deleted by a logged call: refused, not logged
    assert vm.call_log.length == length
    await _replays(vm)


async def test_rmdir_deletes_recursively_only_when_told_so_plainly():
    code = """
    exports.setup = async () => {
      await System.files.mkdir('/d')
      await System.files.writeFile('/d/f', 'x')
    }
    exports.rmdir = async (opts) => {
      try { await System.files.rmdir('/d', opts) } catch (e) { return e.name }
      return (await System.files.readdir('/')).length
    }
    """
    vm = await deployed(code=code)
    await vm.execute_call("setup")
    for opts in ("no", [1], {"recursive": "false"}, {"recursive": 1}, True):
        assert await vm.execute_call("rmdir", [opts]) == "TypeError", opts
    assert await vm.execute_call("rmdir", [{"recursive": False}]) == "DestDirectoryNotEmpty"
    assert await vm.execute_call("rmdir", [None]) == "DestDirectoryNotEmpty"
    assert await vm.execute_call("rmdir", [{"recursive": True}]) == 0
    await _replays(vm)
    await vm.close()


async def test_reopen_refuses_a_different_script(tmp_path):
    vm = await deployed(tmp_path)
    await vm.close()
    with pytest.raises(LibVMSError, match="different script"):
        await BackendVM("exports.x = () => 1").deploy(dir=tmp_path)
    assert _open_stores_in(tmp_path) == []  # the refused deploy holds nothing open


async def test_a_failed_reopen_or_replay_holds_nothing_open(tmp_path):
    vm = await deployed(tmp_path / "vm")
    await vm.execute_call("add", [2, 3])
    forged = await _forge(_with_result(await vm.call_log.list(), 6))
    with pytest.raises(VerificationError):
        await BackendVM.from_call_log(
            forged, {"files_archive_url": vm.files_archive.url}, tmp_path / "replay", check=True
        )
    assert _open_stores_in(tmp_path / "replay") == []
    await vm.close()
    await forged.close()
    # The directory's log no longer replays (its archive moved on behind its back).
    archive = await FilesArchive.open(tmp_path / "vm")
    await archive.write_file("/file", "tampered")
    await archive.close()
    reopened = BackendVM(SCRIPT)
    with pytest.raises(TamperError, match="files archive does not match"):
        await reopened.deploy(dir=tmp_path / "vm")
    assert reopened.call_log is None
    assert _open_stores_in(tmp_path / "vm") == []


async def test_calls_never_interleave_and_log_order_is_archive_order():
    code = """
    exports.append = async (tag) => {
      const before = await System.files.readFile('/log').catch(() => '')
      await new Promise(r => setTimeout(r, 10))
      await System.files.writeFile('/log', before + tag + ',')
      return tag
    }
    """
    vm = await deployed(code=code)
    tags = [f"t{i}" for i in range(30)]
    results = await asyncio.gather(*(vm.execute_call("append", [t]) for t in tags))
    assert results == tags
    logged = [e["call"]["args"][0] for e in await vm.call_log.list(start=1)]
    assert await vm.files_archive.read_file("/log") == "".join(f"{t}," for t in logged)
    await vm.close()


async def test_limit_exceeded_is_logged_discarded_and_replays():
    code = """
    let n = 0
    exports.inc = async () => { n++; await System.files.writeFile('/n', String(n)); return n }
    exports.spin = async () => { await System.files.writeFile('/junk', 'x'); while (true) {} }
    """
    vm = await deployed(code=code, call_timeout=0.3)
    assert await vm.execute_call("inc") == 1
    with pytest.raises(LimitExceeded):
        await vm.execute_call("spin")
    aborted = await vm.call_log.get(vm.call_log.length - 1)
    assert aborted["result"]["aborted"] is True
    assert aborted["result"]["filesVersion"] == 2
    with pytest.raises(NotFoundError):
        await vm.files_archive.read_file("/junk")
    assert await vm.execute_call("inc") == 2  # state rebuilt, VM keeps serving
    replay = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True, call_timeout=0.3
    )
    await Verifier.compare_logs(vm.call_log, replay.call_log)
    await Verifier.compare_archives(vm.files_archive, replay.files_archive)
    await replay.close()
    await vm.close()


async def test_oracles_are_recorded_and_replayed_without_calling_the_host():
    code = """
    exports.price = async (sym) => {
      const p = await System.oracles.price(sym)
      await System.files.writeFile('/last', String(p))
      return p * 2
    }
    exports.missing = () => System.oracles.nope()
    """
    calls = []

    async def price(sym):
        calls.append(sym)
        return 21

    vm = BackendVM(code)
    vm.add_oracle("price", price)
    await vm.deploy()
    assert await vm.execute_call("price", ["ACME"]) == 42
    with pytest.raises(VMCallError, match="OracleNotFound"):
        await vm.execute_call("missing")
    entry = await vm.call_log.get(1)
    assert entry["result"]["oracles"] == [{"name": "price", "args": ["ACME"], "res": 21}]
    replay = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True
    )
    assert calls == ["ACME"]
    await Verifier.compare_logs(vm.call_log, replay.call_log)
    await replay.close()
    await vm.close()


async def test_replay_with_different_oracle_arguments_fails():
    vm = BackendVM("exports.p = (s) => System.oracles.price(s)")
    vm.add_oracle("price", lambda s: 1)
    await vm.deploy()
    await vm.execute_call("p", ["A"])
    forged = CallLog._new(None)
    for entry in await vm.call_log.list():
        if entry["type"] == "call":
            entry["call"]["args"] = ["B"]
        forged.stage(entry)
    await forged.ledger.store.flush()
    with pytest.raises(VerificationError, match="oracle"):
        await BackendVM.from_call_log(forged, {"files_archive_url": vm.files_archive.url})
    await vm.close()


async def test_queue_limit():
    release = asyncio.Event()
    entered = asyncio.Event()

    async def gate():
        entered.set()
        await release.wait()
        return 1

    vm = BackendVM("exports.slow = () => System.oracles.gate()", max_queue=3)
    vm.add_oracle("gate", gate)
    await vm.deploy()
    first = asyncio.ensure_future(vm.execute_call("slow"))
    await entered.wait()  # the first call now holds the VM
    more = [asyncio.ensure_future(vm.execute_call("slow")) for _ in range(3)]
    done, pending = await asyncio.wait(more, return_when=asyncio.FIRST_COMPLETED)
    assert [t.exception().name for t in done] == ["QueueFullError"]
    assert more[2] in done  # the fourth call found three already queued
    release.set()
    assert await asyncio.gather(first, *pending) == [1, 1, 1]
    assert await vm.execute_call("slow") == 1  # the queue drained: calls are accepted again
    await vm.close()


async def test_entry_bytes_identical_between_original_and_replay():
    vm = await deployed()
    await vm.execute_call("add", [1, 2], user_id="carol")
    replay = await BackendVM.from_call_log(vm.call_log, {"files_archive_url": vm.files_archive.url})
    for seq in range(vm.call_log.length):
        assert await vm.call_log.get_raw(seq) == await replay.call_log.get_raw(seq)
    assert canonical(await vm.call_log.get(1)) == await replay.call_log.get_raw(1)
    await replay.close()
    await vm.close()


async def test_sandbox_and_limits_keep_the_vm_serving_and_replay_verifies():
    code = """
    let n = 0
    exports.inc = () => ++n
    exports.reach = () => [typeof require, typeof process, typeof std, typeof os,
                           typeof WeakRef, typeof SharedArrayBuffer, typeof performance,
                           Object.getOwnPropertyNames(globalThis)
                             .filter(k => /bridge|host|py/i.test(k))]
    exports.dynamicImport = async () => { await import('os') }
    exports.bomb = () => { const a = []; while (true) a.push(new Array(1e6).fill(1)) }
    exports.deep = () => { const f = (x) => f(x + 1) + 1; return f(0) }
    exports.spin = () => { for (;;) {} }
    """
    vm = BackendVM(code, call_timeout=0.5, memory_limit=32 * 2**20)
    await vm.deploy()
    assert await vm.execute_call("inc") == 1
    reach = await vm.execute_call("reach")
    assert reach[:7] == ["undefined"] * 7 and reach[7] == []
    with pytest.raises(VMCallError):
        await vm.execute_call("dynamicImport")
    for method in ["bomb", "deep", "spin"]:
        with pytest.raises(VMCallError) as info:
            await vm.execute_call(method)
        assert isinstance(info.value, LimitExceeded) or info.value.name == "RangeError"
        assert await vm.execute_call("inc") > 1  # still serving, state intact
    assert await vm.execute_call("inc") == 5
    replay = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True, call_timeout=0.5
    )
    await Verifier.compare_logs(vm.call_log, replay.call_log)
    await replay.close()
    await vm.close()


@pytest.mark.parametrize(
    ("args", "fields"),
    [
        ([1, "a"], None),
        ([1.5, 1e21, -0.0], None),
        ([{"\U0001f600": 1, "\uffee": 2}], None),  # UTF-16 order differs from code points
        ([1], {"note": 2.25}),
        ([{"deep": [[[[0.1]]]]}], None),
    ],
)
async def test_logged_entries_are_canonical_whatever_the_values(args, fields):
    vm = BackendVM(
        "exports.echo = (...a) => a\n"
        "exports.half = (x) => ({ v: x / 2, '\\u{1F600}': 1, '\\uFFEE': 2 })"
    )
    await vm.deploy()
    await vm.execute_call("echo", args, call_fields=fields)
    await vm.execute_call("half", [3])
    raws = vm.call_log.ledger.raw_range(0, vm.call_log.length)
    for raw in raws:
        assert canonical(parse_canonical(raw)) == raw
    await vm.close()


def _xoshiro_random(seed: bytes, draws: int) -> list[float]:
    """Math.random as docs/formats.md specifies it, written from the text alone."""
    mask = 0xFFFFFFFF
    s = list(struct.unpack("<4I", hashlib.sha256(seed).digest()[:16]))

    def rotl(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    def next_u32() -> int:
        result = (rotl((s[1] * 5) & mask, 7) * 9) & mask
        t = (s[1] << 9) & mask
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 11)
        return result

    values = []
    for _ in range(draws):
        hi, lo = next_u32() >> 5, next_u32() >> 6
        values.append((hi * 2**26 + lo) / 2**53)
    return values


async def test_math_random_follows_the_documented_seed():
    code = "exports.r = () => [Math.random(), Math.random(), Math.random()]\n"
    vm, other = await deployed(code=code), await deployed(code=code)
    init_leaf = leaf_hash(await vm.call_log.get_raw(0))
    for seq in (1, 2):
        seed = hashlib.sha256(b"libvms/random/v2\x00" + init_leaf + seq.to_bytes(8, "big")).digest()
        assert await vm.execute_call("r") == _xoshiro_random(seed, 3)
    # Another VM with the same script and the same call index draws other numbers.
    first = await other.execute_call("r")
    assert first != _xoshiro_random(
        hashlib.sha256(b"libvms/random/v2\x00" + init_leaf + (1).to_bytes(8, "big")).digest(), 3
    )
    await vm.close()
    await other.close()


VALUES_SCRIPT = """
exports.keys = (o) => Object.keys(o).join(',')
exports.isNegativeZero = (x) => Object.is(x, -0)
exports.quote = (o) => JSON.stringify(o)
exports.oracleKeys = async () => Object.keys(await System.oracles.obj()).join(',')
exports.oracleNegativeZero = async () => Object.is(await System.oracles.zero(), -0)
exports.oracleBytes = async () => {
  try { await System.oracles.obj(new Uint8Array([1])) } catch (e) { return e.name }
}
exports.deep = (n) => { let v = 0; for (let i = 0; i < n; i++) v = [v]; return v }
exports.count = () => (globalThis.calls = (globalThis.calls || 0) + 1)
"""


async def _replays(vm):
    replay = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True
    )
    await replay.close()


async def test_arguments_and_oracle_results_look_the_same_live_and_in_replay():
    # A replay reads arguments and oracle results back from the log, in canonical
    # form: keys sorted, -0 written as 0. Live calls must show the script the same.
    vm = await deployed(code=VALUES_SCRIPT)
    vm.add_oracle("obj", lambda *args: {"z": 1, "a": 2})
    vm.add_oracle("zero", lambda: -0.0)
    assert await vm.execute_call("keys", [{"b": 1, "a": 2}]) == "a,b"
    assert await vm.execute_call("quote", [{"name": "x", "age": 3}]) == '{"age":3,"name":"x"}'
    assert await vm.execute_call("isNegativeZero", [-0.0]) is False
    assert await vm.execute_call("isNegativeZero", [[-0.0]]) is False
    assert await vm.execute_call("oracleKeys") == "a,z"
    assert await vm.execute_call("oracleNegativeZero") is False
    # Bytes cannot be logged as an oracle's arguments: the script gets a TypeError.
    assert await vm.execute_call("oracleBytes") == "TypeError"
    await _replays(vm)
    await vm.close()


@pytest.mark.parametrize(
    ("args", "user"), [(["\ud800"], None), ([{"k\udc00": 1}], None), ([1], "al\udfffice")]
)
async def test_a_lone_surrogate_is_refused_before_the_call_runs(args, user):
    vm = await deployed(code=VALUES_SCRIPT)
    with pytest.raises(VMCallError, match="surrogate"):
        await vm.execute_call("count", args, user_id=user)
    assert vm.call_log.length == 1
    assert await vm.execute_call("count") == 1  # the refused call never ran
    await _replays(vm)
    await vm.close()


async def test_values_too_deep_for_the_entry_are_refused_or_logged_as_errors(tmp_path):
    from libvms.vm import MAX_VALUE_DEPTH

    vm = await deployed(tmp_path, code=VALUES_SCRIPT)
    args: list = [0]  # the arguments' list is one level
    for _ in range(MAX_VALUE_DEPTH - 1):
        args = [args]
    assert await vm.execute_call("count", args) == 1
    with pytest.raises(VMCallError, match="nested deeper"):
        await vm.execute_call("count", [args])
    # A result the entry cannot hold is logged as the script's error, and replays so.
    assert await vm.execute_call("deep", [MAX_VALUE_DEPTH]) is not None
    with pytest.raises(VMCallError, match="EncodingError: the result cannot be logged"):
        await vm.execute_call("deep", [MAX_VALUE_DEPTH + 1])
    await _replays(vm)
    await vm.close()
    reopened = await CallLog.open(tmp_path)  # every entry within the parser's bounds
    assert reopened.length == 4
    await reopened.close()


async def test_arguments_and_results_too_large_for_an_entry(tmp_path):
    from libvms.vm import MAX_ARGS_BYTES, MAX_RESULT_BYTES

    code = (
        VALUES_SCRIPT
        + """
exports.big = (n) => 'x'.repeat(n)
exports.write = async (n) => { await System.files.writeFile('/f', 'y'); return 'x'.repeat(n) }
"""
    )
    vm = await deployed(tmp_path, code=code)
    with pytest.raises(VMCallError, match="more than the"):
        await vm.execute_call("count", ["x" * MAX_ARGS_BYTES])
    assert vm.call_log.length == 1
    assert len(await vm.execute_call("big", [MAX_RESULT_BYTES - 2])) == MAX_RESULT_BYTES - 2
    # One byte more: logged as an error; the call's file write stands, as after a throw.
    with pytest.raises(VMCallError, match="the result cannot be logged"):
        await vm.execute_call("write", [MAX_RESULT_BYTES - 1])
    assert await vm.files_archive.read_file("/f") == "y"
    await _replays(vm)
    await vm.close()
    again = BackendVM(code)
    await again.deploy(tmp_path)  # the directory reopens: its log replays
    assert again.call_log.length == 3
    await again.close()


BUDGET_SCRIPT = """
exports.oracles = async (n, size) => {
  await System.files.writeFile('/f', 'written')
  const seen = []
  for (let i = 0; i < n; i++) {
    try { seen.push((await System.oracles.blob(size)).length) } catch (e) { seen.push(e.name) }
  }
  return seen
}
exports.failing = async () => {
  try { await System.oracles.fail() } catch (e) {
    return [e.name, e.message.length, e.message.slice(0, 5)]
  }
}
exports.longName = async (size) => {
  try { await System.oracles['o'.repeat(size)]() } catch (e) { return e.name + ': ' + e.message }
}
exports.sendBig = async (size) => {
  try { await System.oracles.echo('x'.repeat(size)) } catch (e) { return e.name + ': ' + e.message }
}
exports.throwBig = async (size, nameSize) => {
  await System.files.writeFile('/g', 'written')
  const e = new Error('m'.repeat(size))
  if (nameSize) e.name = 'N'.repeat(nameSize)
  throw e
}
"""


async def test_oracle_records_stay_within_their_budget(tmp_path):
    # Oracle results were once bounded only by the entry: a few large ones made an
    # entry that could not be logged after the call's writes were staged, and the
    # directory no longer reopened.
    from libvms.vm import MAX_ERROR_MESSAGE_CHARS, MAX_ORACLE_BYTES

    vm = await deployed(tmp_path, code=BUDGET_SCRIPT)
    vm.add_oracle("blob", lambda size: "b" * size)
    vm.add_oracle("echo", lambda text: len(text))
    third = MAX_ORACLE_BYTES // 3
    # Two thirds fit; the third answer would pass the budget and becomes a RangeError.
    assert await vm.execute_call("oracles", [3, third]) == [third, third, "RangeError"]
    # One answer larger than the whole budget: refused as it is recorded.
    assert await vm.execute_call("oracles", [1, MAX_ORACLE_BYTES]) == ["EncodingError"]
    # Arguments beyond the budget: the oracle is not called, nothing is recorded.
    assert (await vm.execute_call("sendBig", [MAX_ORACLE_BYTES])).startswith("TypeError: ")
    # A name counts too (a script may make it of any length).
    assert (await vm.execute_call("longName", [MAX_ORACLE_BYTES])).startswith("TypeError: ")

    # A host exception's text is logged cut, with its lone surrogates replaced.
    def fail() -> None:
        raise ValueError("\udc80bad" + "x" * 2**20)

    vm.add_oracle("fail", fail)
    cut = MAX_ERROR_MESSAGE_CHARS
    assert await vm.execute_call("failing") == ["ValueError", cut, "\ufffdbadx"]
    entries = await vm.call_log.list(1)
    assert [len(e["result"]["oracles"]) for e in entries[:2]] == [3, 1]
    assert "oracles" not in entries[2]["result"] and "oracles" not in entries[3]["result"]
    await _replays(vm)
    await vm.close()
    again = BackendVM(BUDGET_SCRIPT)
    await again.deploy(tmp_path)  # every entry was logged: the log replays
    assert again.call_log.length == 6
    await again.close()


async def test_a_huge_thrown_error_is_logged_cut(tmp_path):
    from libvms.vm import MAX_ERROR_MESSAGE_CHARS, MAX_ERROR_NAME_CHARS

    vm = await deployed(tmp_path, code=BUDGET_SCRIPT)
    size = 9 * 2**20  # larger than an entry
    with pytest.raises(VMCallError) as raised:
        await vm.execute_call("throwBig", [size, 0])
    assert raised.value.message == "m" * MAX_ERROR_MESSAGE_CHARS
    with pytest.raises(VMCallError) as raised:
        await vm.execute_call("throwBig", [10, size])
    assert raised.value.name == "N" * MAX_ERROR_NAME_CHARS
    entry = await vm.call_log.get(1)
    assert entry["result"]["err"] == {"name": "Error", "message": "m" * MAX_ERROR_MESSAGE_CHARS}
    assert entry["result"]["filesVersion"] == 2  # the write stands, as after any throw
    await _replays(vm)
    await vm.close()
    again = BackendVM(BUDGET_SCRIPT)
    await again.deploy(tmp_path)
    assert again.call_log.length == 3
    await again.close()
