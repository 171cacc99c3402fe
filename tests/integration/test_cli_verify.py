"""`libvms verify`, `evidence check` and `receipt check`, run as real processes."""

import asyncio
import json
import signal
import socket
import sys

import pytest

from libvms.keys import Keypair
from libvms.rpc import RPCClient, RPCServer
from libvms.vm import BackendVM

from ..tamper.dishonest import DishonestHost

SCRIPT = """
let total = 0
exports.add = (n) => (total += n)
"""


async def libvms(*args, cwd=None):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "libvms.cli",
        *map(str, args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def host(tmp_path):
    host = DishonestHost(tmp_path / "vm", SCRIPT)
    await host.start()
    async with RPCClient(host.url(), user="alice") as client:
        for n in (1, 2, 3):
            await client.add(n)
    yield host
    await host.close()


async def test_verify_honest_then_caught_with_evidence(host, tmp_path):
    state = tmp_path / "state"
    code, out, err = await libvms("verify", host.url(), "--state-dir", state)
    assert code == 0, err
    assert out.startswith("Verified 3 calls up to checkpoint 4/")
    code, out, _ = await libvms("verify", host.url(), "--state-dir", state, "--json")
    assert code == 0 and json.loads(out)["ok"] is True

    def change(entries):
        entries[2]["result"]["res"] = 99
        return entries

    await host.rewrite(change)
    evidence = tmp_path / "evidence.json"
    code, out, err = await libvms(
        "verify", host.url(), "--state-dir", state, "--evidence", evidence
    )
    assert code == 1, err
    assert out.startswith("FAILED (fork)")
    assert "Traceback" not in err
    code, out, _ = await libvms("evidence", "check", evidence)
    assert code == 0
    assert out.startswith("PROVEN: ")
    # Evidence that cannot be written does not hide the finding.
    unwritable = tmp_path / "no-such-dir" / "evidence.json"
    code, out, err = await libvms(
        "verify", host.url(), "--state-dir", state, "--evidence", unwritable
    )
    assert code == 1 and out.startswith("FAILED (fork)")
    assert err.startswith("warning: cannot write evidence to") and "Traceback" not in err

    fresh = tmp_path / "fresh-state"
    code, out, _ = await libvms("verify", host.url(), "--state-dir", fresh, "--evidence", evidence)
    assert code == 1 and out.startswith("FAILED (replay-mismatch)")
    code, out, _ = await libvms("evidence", "check", evidence)
    assert code == 0 and "replays it differently" in out


async def test_verify_could_not_audit_exits_2(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = await libvms("verify", f"ws://127.0.0.1:{port}/", "--state-dir", tmp_path)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    code, _, err = await libvms("verify", "not-a-url", "--state-dir", tmp_path)
    assert code == 2 and "Traceback" not in err
    code, _, err = await libvms("verify", f"ws://127.0.0.1:{port}/", "--key", "garbage")
    assert code == 2 and "names no call log key" in err and "Traceback" not in err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = await libvms("evidence", "check", bad)
    assert code == 2 and err.startswith("error: ")


async def test_ctrl_c_before_a_verdict_exits_130_not_0_or_1(tmp_path):
    # A listener that accepts and never answers: the audit is under way when
    # Ctrl-C comes. 0 would say "verified", 1 "the host was caught".
    connected = asyncio.Event()

    async def silent(reader, writer):
        connected.set()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "libvms.cli",
        "verify",
        f"ws://127.0.0.1:{port}/",
        "--state-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.wait_for(connected.wait(), 30)
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    server.close()
    assert proc.returncode == 130
    assert out == b""
    assert err.decode().strip() == "interrupted: the audit did not finish, nothing was decided"


async def test_receipt_check(host, tmp_path):
    key_file = tmp_path / "alice.key"
    Keypair.generate().save(key_file)
    receipt = tmp_path / "receipt.json"
    code, out, err = await libvms(
        "call", host.url(), "add", "10", "--key", key_file, "--save-receipt", receipt
    )
    assert (code, out.strip()) == (0, "16"), err
    code, out, _ = await libvms("receipt", "check", receipt, host.url())
    assert code == 0 and out.startswith("OK: entry 4")
    # The VM's address over http:// too, as the other commands take it.
    http_url = "http://" + host.url().split("://", 1)[1]
    code, out, err = await libvms("receipt", "check", receipt, http_url)
    assert code == 0 and out.startswith("OK: entry 4"), err
    for bad in ("ftp://127.0.0.1:1/log#xyz", http_url + "log#xyz"):
        code, out, err = await libvms("receipt", "check", receipt, bad)
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err

    def drop_signed_call(entries):
        return entries[:4]

    await host.rewrite(drop_signed_call)
    async with RPCClient(host.url(), user="bob") as client:
        await client.add(1)  # the log grows back past the receipt's size, without the entry
    evidence = tmp_path / "fork.json"
    code, out, _ = await libvms("receipt", "check", receipt, host.url(), "--evidence", evidence)
    assert code == 1 and out.startswith("FAILED: ")
    code, out, _ = await libvms("evidence", "check", evidence)
    assert code == 0 and out.startswith("PROVEN: ")


async def test_a_receipt_that_cannot_be_saved_never_hides_the_call(host, tmp_path):
    key_file = tmp_path / "alice.key"
    Keypair.generate().save(key_file)
    # A folder that does not exist: refused before the call runs.
    missing = tmp_path / "no-such-dir" / "receipt.json"
    code, out, err = await libvms(
        "call", host.url(), "add", "10", "--key", key_file, "--save-receipt", missing
    )
    assert code == 2 and out == "" and "--save-receipt" in err
    # A file that cannot be written after all: the call ran, so its result is shown.
    dangling = tmp_path / "receipt.json"
    dangling.symlink_to(tmp_path / "gone" / "receipt.json")
    code, out, err = await libvms(
        "call", host.url(), "add", "10", "--key", key_file, "--save-receipt", dangling
    )
    assert (code, out.strip()) == (1, "16")  # 1 + 2 + 3 + 10: the refused call never ran
    assert err.startswith("warning: the call was logged, but its receipt could not be written")


async def test_verify_of_a_host_with_higher_limits_is_undecided_until_raised(tmp_path):
    # The host runs with 256 MiB; a replay at the auditor's default 64 MiB runs out
    # of memory, which says nothing about the host: exit 2, no verdict, no evidence.
    vm = BackendVM(
        "exports.big = (mib) => 'x'.repeat(mib * 1024 * 1024).length\n", memory_limit=256 * 2**20
    )
    await vm.deploy(tmp_path / "vm")
    async with RPCServer(vm, port=0) as server:
        async with RPCClient(server.url(), user="alice") as client:
            assert await client.big(96) == 96 * 2**20
        state, evidence = tmp_path / "state", tmp_path / "evidence.json"
        code, out, err = await libvms(
            "verify", server.url(), "--state-dir", state, "--evidence", evidence
        )
        assert (code, out) == (2, "")
        assert err.startswith("error: entry 1: the replay ran past its own limits")
        assert "MemoryLimitExceeded" in err and not evidence.exists()
        code, out, err = await libvms(
            "verify", server.url(), "--state-dir", state, "--memory-limit", "256M"
        )
        assert code == 0, err
        assert out.startswith("Verified 1 call up to")
    await vm.close()
