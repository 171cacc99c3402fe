"""A following auditor rides out a server that goes away and comes back on the same port.

The server is really stopped (its port closed) and a new one is started for the
same VM directory on the same port. Every step waits on what the follower
reports (``on_outage`` events, or the CLI's output lines), never on time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from libvms.errors import ConnectError
from libvms.evidence import Evidence, check
from libvms.rpc import RPCClient, RPCServer
from libvms.verifier import Auditor, AuditReport, Outage
from libvms.vm import BackendVM

from ..tamper.dishonest import Edit, LyingProxy, flip_byte, resign, serve_as_is

SCRIPT = """
let total = 0
exports.add = (n) => (total += n)
"""

#: Retry quickly: the tests wait on events, these only bound how fast a retry comes.
FAST = {"retry_delay": 0.01, "max_retry_delay": 0.05}

TIMEOUT = 20


class RestartableHost:
    """One VM directory served on one fixed port, by a server that can be stopped and restarted."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0  # the first start picks a free port; every restart reuses it
        self.vm: BackendVM | None = None
        self.server: RPCServer | None = None

    async def start(self, *, honest: bool = True, directory: Path | None = None) -> None:
        """Serve the VM of ``directory`` (default: this host's), reopened and replayed.

        ``honest=False`` serves it as a dishonest host would, without replaying.
        """
        directory = directory or self.directory
        if honest:
            self.vm = BackendVM(SCRIPT)
            await self.vm.deploy(directory, title="outage")
        else:
            self.vm = await serve_as_is(directory, SCRIPT)
        self.server = RPCServer(self.vm, port=self.port)
        await self.server.start()
        self.port = self.server.port

    async def stop(self) -> None:
        """Close the server (its port stops listening) and the VM."""
        if self.server is not None:
            await self.server.close()
            self.server = None
        if self.vm is not None:
            await self.vm.close()
            self.vm = None

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def calls(self, *numbers: int) -> None:
        async with RPCClient(self.url(), user="alice") as client:
            for n in numbers:
                await client.add(n)


@pytest.fixture
async def host(tmp_path):
    host = RestartableHost(tmp_path / "vm")
    await host.start()
    await host.calls(1, 2)
    yield host
    await host.stop()


class Follower:
    """An audited VM followed in a task, its batches and outage events in queues."""

    def __init__(self, auditor: Auditor, **options: object) -> None:
        self.auditor = auditor
        self.batches: asyncio.Queue[int] = asyncio.Queue()
        self.events: asyncio.Queue[Outage] = asyncio.Queue()
        self.task = asyncio.ensure_future(
            auditor.follow(
                lambda _report, added: self.batches.put_nowait(added),
                # A copy: the follower updates its Outage as the outage goes on.
                on_outage=lambda event: self.events.put_nowait(replace(event)),
                **options,  # type: ignore[arg-type]
            )
        )

    @classmethod
    async def start(cls, host: RestartableHost, state: Path, **options: object) -> Follower:
        auditor = Auditor(host.url(), state_dir=state)
        report = await auditor.run()
        assert report.ok, report.problems
        return cls(auditor, **options)

    async def event(self) -> Outage:
        return await asyncio.wait_for(self.events.get(), TIMEOUT)

    async def until_entries(self, entries: int) -> None:
        while self.auditor.report.entries < entries:
            await asyncio.wait_for(self.batches.get(), TIMEOUT)

    async def result(self) -> AuditReport:
        return await asyncio.wait_for(self.task, TIMEOUT)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.auditor.close()


async def test_follower_rides_out_a_restart_and_verifies_the_calls_after_it(host, tmp_path):
    follower = await Follower.start(host, tmp_path / "state", max_outage=60, **FAST)
    try:
        await host.stop()
        first = await follower.event()
        assert (first.recovered, first.retries) == (False, 0)
        assert first.next_retry is not None and first.error
        await host.start()
        await host.calls(3, 4)
        await follower.until_entries(5)  # the init entry and four calls
        event = await follower.event()
        while not event.recovered:
            assert event.next_retry is not None
            event = await follower.event()
        report = follower.auditor.report
        assert report.ok and not report.problems, report.problems
        assert report.entries == 5
        assert [o.recovered for o in report.outages] == [True]
        assert json.loads(report.to_json())["outages"][0]["recovered"] is True
        assert not follower.task.done()
    finally:
        await follower.close()
    # What the follower verified was saved: a new audit of the restarted VM agrees.
    auditor = Auditor(host.url(), state_dir=tmp_path / "state")
    try:
        assert (await auditor.run()).ok
    finally:
        await auditor.close()


async def test_outage_longer_than_max_outage_gives_up(host, tmp_path):
    follower = await Follower.start(host, tmp_path / "state", max_outage=0.2, **FAST)
    try:
        await host.stop()
        with pytest.raises(ConnectError, match=r"longer than the 0\.2 s allowed"):
            await follower.result()
        (outage,) = follower.auditor.report.outages
        assert not outage.recovered and outage.duration >= 0.2 and outage.retries >= 1
    finally:
        await follower.close()


async def test_no_max_outage_gives_up_at_the_first_failure(host, tmp_path):
    follower = await Follower.start(host, tmp_path / "state", max_outage=0)
    try:
        await host.stop()
        with pytest.raises(ConnectError):
            await follower.result()
        assert follower.events.empty() and not follower.auditor.report.outages
    finally:
        await follower.close()


def change_result(entries):
    entries[2]["result"]["res"] = 1000
    return entries


def drop_last(entries):
    return entries[:2]


@pytest.mark.parametrize(
    ("edit", "kind"), [(change_result, "fork"), (drop_last, "rollback"), (None, "tamper")]
)
async def test_server_back_with_another_history_is_caught(
    host, tmp_path, edit: Edit | None, kind: str
):
    follower = await Follower.start(host, tmp_path / "state", max_outage=60, **FAST)
    try:
        await host.stop()
        await follower.event()
        if edit is None:
            # Another VM, with its own keys, where the followed one was.
            other = tmp_path / "other"
            await host.start(directory=other)
            await host.calls(1, 2)
        else:
            resign(host.directory, edit=edit)
            await host.start(honest=False)
        report = await follower.result()
    finally:
        await follower.close()
    assert [p.kind for p in report.problems] == [kind], report.problems
    assert [o.recovered for o in report.outages] == [True]
    if kind == "fork":
        assert report.evidence is not None
        assert (await check(Evidence.from_json(report.evidence.to_json()))).proven


async def test_checkpoint_that_does_not_verify_is_tamper_even_if_the_server_then_drops(
    host, tmp_path
):
    """A bad answer is a finding: losing the server right after it does not make it an outage."""
    lying = False
    dropped: list[str] = []

    def tamper(path: str, body: bytes) -> bytes:
        return flip_byte(body) if lying and path.endswith("/checkpoint") else body

    def refuse(path: str) -> bool:
        if dropped:
            return True
        if lying and path.endswith("/checkpoint"):
            dropped.append(path)  # the next request, and all after it, are dropped
        return False

    upstream = f"http://127.0.0.1:{host.port}"
    async with LyingProxy(upstream, tamper=tamper, refuse=refuse) as proxy:
        auditor = Auditor(proxy.url(), state_dir=tmp_path / "state")
        assert (await auditor.run()).ok
        follower = Follower(auditor, max_outage=60, **FAST)
        try:
            lying = True
            report = await follower.result()
        finally:
            await follower.close()
    assert [p.kind for p in report.problems] == ["tamper"], report.problems
    assert "again to look for a fork failed" in report.problems[0].message
    assert not report.outages and follower.events.empty()


# -- the command ---------------------------------------------------------------------


class Command:
    """``libvms verify --follow`` in a subprocess, its output read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []

    @classmethod
    async def start(cls, *args: object) -> Command:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "libvms.cli",
            "verify",
            *map(str, args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def _line(self, stream: asyncio.StreamReader | None, into: list[str]) -> str:
        assert stream is not None
        line = (await asyncio.wait_for(stream.readline(), TIMEOUT)).decode()
        assert line, f"the command ended early: {self.out} {self.err}"
        into.append(line)
        return line

    async def stdout_until(self, text: str) -> str:
        while text not in (line := await self._line(self.proc.stdout, self.out)):
            pass
        return line

    async def stderr_until(self, text: str) -> str:
        while text not in (line := await self._line(self.proc.stderr, self.err)):
            pass
        return line

    async def wait(self) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.proc.communicate(), TIMEOUT)
        code = self.proc.returncode
        assert code is not None
        return code, "".join(self.out) + out.decode(), "".join(self.err) + err.decode()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def test_command_rides_out_a_restart(host, tmp_path):
    command = await Command.start(
        host.url(), "--follow", "--state-dir", tmp_path / "state", "--max-outage", 60
    )
    try:
        assert (await command.stdout_until("Verified")).startswith("Verified 2 calls")
        await host.stop()
        await command.stderr_until("Cannot reach the VM: ")
        await host.start()
        await host.calls(3, 4)
        await command.stdout_until("4 calls up to checkpoint 5/")
        await command.stderr_until("Reachable again after ")
        command.proc.send_signal(signal.SIGINT)
        code, out, err = await command.wait()
    finally:
        command.kill()
    assert code == 0, err
    assert "FAILED" not in out and "Traceback" not in err and "error" not in err


async def test_command_gives_up_after_max_outage_with_exit_2(host, tmp_path):
    command = await Command.start(
        host.url(), "--follow", "--state-dir", tmp_path / "state", "--max-outage", 0.5
    )
    try:
        await command.stdout_until("Verified 2 calls")
        await host.stop()
        code, _out, err = await command.wait()
    finally:
        command.kill()
    assert code == 2, err
    assert "Cannot reach the VM: " in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: gave up following ")
    assert "longer than the 0.5 s allowed" in err


async def test_command_catches_a_fork_served_after_an_outage(host, tmp_path):
    evidence = tmp_path / "evidence.json"
    command = await Command.start(
        host.url(),
        "--follow",
        "--state-dir",
        tmp_path / "state",
        "--evidence",
        evidence,
        "--max-outage",
        60,
    )
    try:
        await command.stdout_until("Verified 2 calls")
        await host.stop()
        await command.stderr_until("Cannot reach the VM: ")
        resign(host.directory, edit=change_result)
        await host.start(honest=False)
        code, out, err = await command.wait()
    finally:
        command.kill()
    assert code == 1, err
    assert "Reachable again after " in err
    assert "FAILED (fork)" in out
    assert (await check(Evidence.from_json(evidence.read_bytes()))).proven
