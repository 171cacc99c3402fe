"""Audit benchmarks: full audits of a served VM by phase, and how fast a follower keeps up.

Run from the repository root::

    .venv/bin/python benchmarks/audit.py              # full run, about 40 seconds on 2 cores
    .venv/bin/python benchmarks/audit.py --quick      # smaller logs, fewer batches, ~10 s
    .venv/bin/python benchmarks/audit.py --profile    # also cProfile the largest audit

Each VM runs in its own server process (this script started with the hidden ``--serve``
option), durable in a temporary directory, behind a real ``RPCServer`` on 127.0.0.1 with
an ephemeral port. The auditor runs in this process: ``Verifier.audit(url, state_dir=...)``
fetches both ledgers over HTTP, verifies them against their signed checkpoints, checks
signed calls, replays the log in a fresh sandbox comparing every entry, and compares the
files archive. Its report's ``timings`` split the time by phase.

Follow latency: an ``Auditor`` runs once, then ``follow()`` in a task. The server process
makes batches of calls on request and reports the moment the batch's last
``execute_call`` returned (its entries are then durable and covered by a signed
checkpoint); the latency is the time from that moment to the follower's ``on_batch``
for a report covering the batch. Both processes read ``time.monotonic()``, which is one
system-wide clock on Linux and macOS.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import percentile, print_profile, record, run_and_report, scratch_dir, split

from libvms import AuditReport, BackendVM, RPCServer, Verifier
from libvms.verifier import Auditor

SCRIPT = "exports.add = (a, b) => a + b\n"

BUILD_CALLERS = 256  # concurrent callers that build the served logs
BATCH_CALLS = 16  # calls per batch in the follow measurement, gathered together
FOLLOW_TIMEOUT = 10.0  # seconds to wait for the follower to report a batch


@dataclass(frozen=True)
class Sizes:
    audits: tuple[int, ...]  # pure calls in the logs that are audited
    follow_log: int  # pure calls already in the log a follower starts from
    batches: int  # batches the follower must report


FULL = Sizes(audits=(10_000, 100_000), follow_log=1_000, batches=20)
QUICK = Sizes(audits=(1_000, 10_000), follow_log=1_000, batches=10)


# --- server process ----------------------------------------------------------------------------


async def call_concurrently(vm: BackendVM, calls: int, callers: int) -> None:
    async def caller(k: int, count: int) -> None:
        for i in range(count):
            await vm.execute_call("add", [i, k])

    await asyncio.gather(*(caller(k, n) for k, n in enumerate(split(calls, callers))))


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve(calls: int) -> None:
    """Server process: build a VM with ``calls`` pure calls, serve it, make batches on request.

    Reads commands on stdin, one per line: ``batch N`` makes N calls at once and answers
    with the time the last one returned; end of input stops the server.
    """
    with tempfile.TemporaryDirectory(prefix="libvms-bench-") as tmp:
        vm = BackendVM(SCRIPT)
        await vm.deploy(dir=tmp, title="bench")
        start = time.perf_counter()
        await call_concurrently(vm, calls, BUILD_CALLERS)
        build = time.perf_counter() - start
        loop = asyncio.get_running_loop()
        async with RPCServer(vm, port=0) as server:
            say({"url": server.url(), "length": vm.call_log.length, "build": build})
            while True:
                line = await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                command, _, argument = line.strip().partition(" ")
                if command == "batch":
                    await call_concurrently(vm, int(argument), int(argument))
                    say({"done": time.monotonic(), "length": vm.call_log.length})
        await vm.close()


class Server:
    """The parent's handle on a server process."""

    def __init__(self, process: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self.process = process
        self.url: str = ready["url"]
        self.length: int = ready["length"]
        self.build: float = ready["build"]

    @classmethod
    async def start(cls, calls: int) -> Server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            str(calls),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process, await cls._read(process))

    @staticmethod
    async def _read(process: asyncio.subprocess.Process) -> dict[str, Any]:
        assert process.stdout is not None
        line = await process.stdout.readline()
        if not line:
            raise RuntimeError("the server process ended early")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def batch(self, calls: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"batch {calls}\n".encode())
        await self.process.stdin.drain()
        return await self._read(self.process)

    async def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await self.process.wait()


# --- measurements ------------------------------------------------------------------------------


async def bench_audit(root: Path, calls: int, profile: bool) -> None:
    server = await Server.start(calls)
    try:
        record(
            f"Build the served log: {calls:,} pure calls",
            calls / server.build,
            "calls/s",
            note=f"{server.build:,.1f} s, {BUILD_CALLERS} concurrent callers, durable",
        )
        state_dir = root / f"state-{calls}"
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        report = await Verifier.audit(server.url, state_dir=state_dir)
        wall = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
    finally:
        await server.stop()
    if not report.ok:
        raise AssertionError(f"the audit failed: {report.verdict}")
    audited = report.entries - 1
    t = report.timings
    fetch, signatures, replay, total = t["fetch"], t["signatures"], t["replay"], t["total"]
    record(f"Audit {audited:,} calls: fetch (HTTP + verify)", fetch, "s")
    record(f"Audit {audited:,} calls: signatures", signatures, "s", note="no signed calls here")
    verify = fetch + signatures
    if calls == 100_000:
        target, ok = "< 5 s at 10^5 entries", verify < 5
    else:
        target, ok = "-", None
    record(
        f"Audit {audited:,} calls: fetch + verify",
        verify,
        "s",
        target=target,
        ok=ok,
        note=f"{report.entries / verify:,.0f} entries/s",
    )
    record(
        f"Audit {audited:,} calls: replay (check=True)",
        replay,
        "s",
        note=f"{audited / replay:,.0f} calls/s",
    )
    rest = total - fetch - signatures - replay
    record(
        f"Audit {audited:,} calls: connect + compare archive",
        rest,
        "s",
        note=f"whole audit {total:,.2f} s ({wall:,.2f} s with closing)",
    )
    rate = audited / total
    record(
        f"Audit {audited:,} calls: whole audit",
        rate,
        "calls/s",
        target=">= 10,000 calls/s",
        ok=rate >= 10_000,
        note=f"{total:,.2f} s from connect to verdict",
    )
    if profiler is not None:
        print_profile(profiler, f"audit of {audited:,} calls")


async def bench_follow(root: Path, sizes: Sizes) -> None:
    server = await Server.start(sizes.follow_log)
    auditor = Auditor(server.url, state_dir=root / "state-follow")
    seen: list[tuple[float, int]] = []  # (time of on_batch, entries covered)
    changed = asyncio.Event()
    catch_ups: list[float] = []
    inner = auditor._catch_up

    async def timed_catch_up() -> int:
        start = time.monotonic()
        added = await inner()
        if added:
            catch_ups.append(time.monotonic() - start)
        return added

    auditor._catch_up = timed_catch_up  # type: ignore[method-assign]

    def on_batch(report: AuditReport, added: int) -> None:
        seen.append((time.monotonic(), report.entries))
        changed.set()

    task: asyncio.Task[AuditReport] | None = None
    latencies: list[float] = []
    rng = random.Random(1)
    try:
        report = await auditor.run()
        if not report.ok:
            raise AssertionError(f"the audit failed: {report.verdict}")
        task = asyncio.create_task(auditor.follow(on_batch))
        for _ in range(sizes.batches):
            # Land each batch at a random point of the follower's polling cycle.
            await asyncio.sleep(rng.uniform(0.1, 0.3))
            reply = await server.batch(BATCH_CALLS)
            deadline = time.monotonic() + FOLLOW_TIMEOUT
            while not any(entries >= reply["length"] for _, entries in seen):
                if task.done():
                    raise AssertionError(f"the follower stopped: {task.result().verdict}")
                changed.clear()
                await asyncio.wait_for(changed.wait(), deadline - time.monotonic())
            reached = min(when for when, entries in seen if entries >= reply["length"])
            latencies.append(reached - reply["done"])
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await auditor.close()
        await server.stop()
    ms = [x * 1000 for x in latencies]
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    note = f"{len(ms)} batches of {BATCH_CALLS} calls; max {max(ms):,.1f} ms"
    record("Follow: commit to on_batch, p50", p50, "ms", note=note)
    record(
        "Follow: commit to on_batch, p99",
        p99,
        "ms",
        target="< 100 ms",
        ok=p99 < 100,
        note=note,
    )
    work = [x * 1000 for x in catch_ups]
    record(
        "Follow: one catch-up that found entries, median",
        percentile(work, 50),
        "ms",
        note=(
            f"refresh both ledgers, verify, replay; max {max(work):,.1f} ms; "
            "the follower polls every 50 ms"
        ),
    )


# --- driver ------------------------------------------------------------------------------------


async def run(sizes: Sizes, profile: bool) -> None:
    with scratch_dir() as root:
        for calls in sizes.audits:
            await bench_audit(root, calls, profile and calls == sizes.audits[-1])
        await bench_follow(root, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller logs, fewer batches")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest audit")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve))
        return
    sizes = QUICK if args.quick else FULL
    run_and_report("libvms audit benchmarks", args.quick, run(sizes, args.profile))


if __name__ == "__main__":
    main()
