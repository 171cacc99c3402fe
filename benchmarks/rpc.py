"""RPC benchmarks: calls per second and latency over WebSocket, debug and signed mode.

Run from the repository root::

    .venv/bin/python benchmarks/rpc.py               # full run, about two minutes
    .venv/bin/python benchmarks/rpc.py --quick       # shorter runs, well under a minute
    .venv/bin/python benchmarks/rpc.py --store memory   # VM ledgers in memory, not on disk
    .venv/bin/python benchmarks/rpc.py --loop asyncio   # asyncio's event loop, not uvloop

The server runs in its own process (as it would in production), the clients in
this one, all on 127.0.0.1; both run on uvloop (as ``libvms exec`` does) unless
``--loop asyncio`` is given. One client process is enough: the table shows the
CPU each side used, and the clients use well under one core while the server is
saturated. Each scenario runs closed-loop clients, each with its
own connection and one call in flight, for a fixed time, and reports calls per
second and the p50/p99 latency of one call. A last scenario offers 1,000 calls/s
open-loop (calls start on a fixed schedule whatever the replies do) and
measures latency from each call's scheduled start, so a slow reply is not hidden
by the calls that would have been sent while it was pending.

Every measured call is durable when its reply arrives: with ``--store disk``
(the default) it has been committed with fsync and covered by a signed
checkpoint; in signed mode the client has also verified the call's receipt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from libvms.keys import Keypair
from libvms.rpc import RPCClient, RPCServer
from libvms.vm import BackendVM

SCRIPT = """
exports.pure = (x) => x
exports.write = async (v) => { await System.files.writeFile('/f', v); return v }
"""

console = Console(width=None if sys.stdout.isatty() else 150, log_path=False)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``coro`` on a fresh event loop of the kind named (``uvloop`` or ``asyncio``)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def default_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


class CPUMeter:
    """CPU time used by this process and by the server process with its children, the
    store's writer processes (Linux: from /proc)."""

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _cpu(self, pid: int | str) -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime

    def server(self) -> float | None:
        try:
            total = self._cpu(self._pid)
            with open(f"/proc/{self._pid}/task/{self._pid}/children") as f:
                children = f.read().split()
        except OSError:
            return None
        for child in children:
            with contextlib.suppress(OSError):  # it may have just exited
                total += self._cpu(child)
        return total

    def sample(self) -> tuple[float, float | None]:
        return time.process_time(), self.server()


# --- server process ----------------------------------------------------------------------------


async def serve(store: str) -> None:
    with tempfile.TemporaryDirectory(prefix="libvms-bench-") as tmp:
        vm = BackendVM(SCRIPT)
        await vm.deploy(None if store == "memory" else tmp, title="bench")
        async with RPCServer(vm, port=0) as server:
            print(server.port, flush=True)
            # Serve until the parent closes our stdin.
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await vm.close()


# --- clients -----------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    clients: int
    calls: int
    seconds: float
    latencies: list[float]
    #: CPU time over wall time during the measurement, in % of one core.
    client_cpu: float | None = None
    server_cpu: float | None = None

    def set_cpu(
        self, before: tuple[float, float | None], after: tuple[float, float | None]
    ) -> None:
        self.client_cpu = (after[0] - before[0]) / self.seconds * 100
        if before[1] is not None and after[1] is not None:
            self.server_cpu = (after[1] - before[1]) / self.seconds * 100

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def connect(url: str, count: int, signed: bool) -> list[RPCClient]:
    clients = [
        RPCClient(url, key=Keypair.generate(), keep_receipts=False)
        if signed
        else RPCClient(url, user=f"user{i}")
        for i in range(count)
    ]
    await asyncio.gather(*(c.connect() for c in clients))
    return clients


async def closed_loop(
    url: str, method: str, signed: bool, count: int, seconds: float, cpu: CPUMeter
) -> Result:
    clients = await connect(url, count, signed)
    latencies: list[float] = []
    stop = 0.0

    async def run(client: RPCClient, measure: bool) -> int:
        done = 0
        clock = time.perf_counter
        while clock() < stop:
            start = clock()
            await client.call(method, "v")
            if measure:
                latencies.append(clock() - start)
            done += 1
        return done

    try:
        stop = time.perf_counter() + min(0.3, seconds / 4)  # warm up
        await asyncio.gather(*(run(c, False) for c in clients))
        before = cpu.sample()
        started = time.perf_counter()
        stop = started + seconds
        counts = await asyncio.gather(*(run(c, True) for c in clients))
        elapsed = time.perf_counter() - started
        after = cpu.sample()
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    mode = "signed" if signed else "debug"
    result = Result(f"{method}, {mode}", count, sum(counts), elapsed, latencies)
    result.set_cpu(before, after)
    return result


async def open_loop(
    url: str, rate: float, seconds: float, connections: int, cpu: CPUMeter
) -> Result:
    clients = await connect(url, connections, signed=False)
    latencies: list[float] = []
    total = int(rate * seconds)

    async def one(client: RPCClient, due: float) -> None:
        await client.call("pure", "v")
        latencies.append(time.perf_counter() - due)

    try:
        tasks = []
        before = cpu.sample()
        started = time.perf_counter()
        for i in range(total):
            due = started + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(clients[i % connections], due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        after = cpu.sample()
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    result = Result(f"pure, debug, {rate:.0f}/s offered", connections, total, elapsed, latencies)
    result.set_cpu(before, after)
    return result


# --- main --------------------------------------------------------------------------------------


def start_server(store: str, loop: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--store", store, "--loop", loop],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise SystemExit(f"the server process did not start: {line!r}")
    return proc, int(line)


async def run_all(url: str, quick: bool, cpu: CPUMeter) -> list[Result]:
    seconds = 0.8 if quick else 3.0
    results = []
    for signed in (False, True):
        for method in ("pure", "write"):
            for count in (1, 8, 64):
                result = await closed_loop(url, method, signed, count, seconds, cpu)
                console.log(
                    f"{result.name:>15} x{count:<3} {result.rate:8.0f} calls/s  "
                    f"p50 {result.percentile(50):6.2f} ms  p99 {result.percentile(99):6.2f} ms"
                )
                results.append(result)
    results.append(await open_loop(url, 1000.0, 1.5 if quick else 5.0, 64, cpu))
    return results


def report(results: list[Result], store: str, loop: str) -> None:
    table = Table(
        title=f"libvms RPC, {store} store, {loop} ({platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()})"
    )
    columns = ("scenario", "clients", "calls", "calls/s", "p50 ms", "p99 ms", "mean ms")
    for column in (*columns, "server CPU", "client CPU"):
        table.add_column(column, justify="left" if column == "scenario" else "right")

    def percent(value: float | None) -> str:
        return "?" if value is None else f"{value:.0f}%"

    for r in results:
        table.add_row(
            r.name,
            str(r.clients),
            str(r.calls),
            f"{r.rate:,.0f}",
            f"{r.percentile(50):.2f}",
            f"{r.percentile(99):.2f}",
            f"{statistics.fmean(r.latencies) * 1000:.2f}",
            percent(r.server_cpu),
            percent(r.client_cpu),
        )
    console.print(table)
    console.print(
        "CPU: time used over wall time, in % of one core "
        "(the server's with its writer process, from /proc)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--store", choices=("disk", "memory"), default="disk")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default=default_loop(),
        help="event loop of both processes (default: uvloop where installed)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        run(serve(args.store), args.loop)
        return
    proc, port = start_server(args.store, args.loop)
    try:
        cpu = CPUMeter(proc.pid)
        results = run(run_all(f"ws://127.0.0.1:{port}/", args.quick, cpu), args.loop)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
    report(results, args.store, args.loop)


if __name__ == "__main__":
    main()
