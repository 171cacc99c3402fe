"""VM benchmarks: durable execute_call throughput, replay speed and memory, per-call costs.

Run from the repository root::

    .venv/bin/python benchmarks/vm.py              # full run, about 90 seconds on 2 cores
    .venv/bin/python benchmarks/vm.py --quick      # smaller sizes, about 20 seconds
    .venv/bin/python benchmarks/vm.py --profile    # also cProfile pure calls and the largest replay

Every call measured here is durable when its ``await`` returns: its log entry (and its
file writes) are committed with ``synchronous=FULL`` (fsync) and covered by a signed
checkpoint. The exceptions are the reference rows marked "ledgers in memory", which run
the same calls with ``deploy(dir=None)`` to show what the CPU alone allows. VMs live in
temporary directories that are removed afterwards. Replays run in a child process
(started with this script's hidden ``--replay-child`` option) so that their peak memory
is their own.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    median_and_range,
    print_profile,
    profiled,
    record,
    run_and_report,
    scratch_dir,
    split,
)

from libvms import BackendVM, CallLog, merkle
from libvms.checkpoint import Checkpoint, sign_checkpoint
from libvms.encoding import canonical, parse
from libvms.keys import Keypair, ledger_url
from libvms.runtime.js import JSRuntime
from libvms.store import Store

SCRIPT = """
exports.init = async () => {
  await System.files.writeFile('/counter.json', JSON.stringify({ count: 0 }))
}
exports.add = (a, b) => a + b
exports.write = async (text) => {
  await System.files.writeFile('/data.txt', text)
  return text.length
}
exports.increment = async () => {
  const state = JSON.parse(await System.files.readFile('/counter.json'))
  state.count += 1
  await System.files.writeFile('/counter.json', JSON.stringify(state))
  return state.count
}
"""

# The replayed logs hold nothing but calls of this (no ``init`` call).
PURE_SCRIPT = "exports.add = (a, b) => a + b\n"

CONCURRENT = 16  # callers gathered together in the concurrent measurements
BUILD_CALLERS = 256  # callers used to build the logs that are replayed
ROUNDS = 3  # throughput measurements are repeated; the median is reported


@dataclass(frozen=True)
class Sizes:
    sequential: int  # calls awaited one at a time, per round
    concurrent: int  # calls per round, spread over CONCURRENT callers
    replays: tuple[int, ...]  # calls in the logs that are replayed
    parts: int  # repetitions of each per-call cost measurement
    archive_files: int  # files in the archive that large-archive writes go into


FULL = Sizes(
    sequential=500, concurrent=8_000, replays=(10_000, 100_000), parts=20_000, archive_files=20_000
)
QUICK = Sizes(
    sequential=150, concurrent=2_000, replays=(1_000, 10_000), parts=5_000, archive_files=2_000
)


# --- workloads ---------------------------------------------------------------------------------

Workload = Callable[[BackendVM, int, int], Awaitable[Any]]


def pure(vm: BackendVM, caller: int, i: int) -> Awaitable[Any]:
    return vm.execute_call("add", [i, caller])


def write(vm: BackendVM, caller: int, i: int) -> Awaitable[Any]:
    # 64 bytes of new content each time, so every call stores a new blob.
    return vm.execute_call("write", [f"caller {caller:03d} call {i:07d} ".ljust(64, ".")])


def counter(vm: BackendVM, caller: int, i: int) -> Awaitable[Any]:
    return vm.execute_call("increment", [])


WORKLOADS: tuple[tuple[str, str, Workload, int | None], ...] = (
    # (label, description, call, target in calls/s for 16 callers)
    ("pure", "exports.add = (a, b) => a + b", pure, 10_000),
    ("write", "one writeFile of 64 bytes", write, 5_000),
    ("counter", "readFile + JSON.parse + writeFile", counter, 5_000),
)


class CommitTimer:
    """Counts the store's commits and the time each takes, from its start on the event loop
    to the loop taking the writer process's reply (the SQLite transaction and its fsync)."""

    def __init__(self, store: Store) -> None:
        self.count = 0
        self.seconds = 0.0
        started: dict[int, float] = {}
        start_commit, finish = store._start_commit, store._finish

        def timed_start(loop: Any) -> Any:
            commit = start_commit(loop)
            started[id(commit)] = time.perf_counter()
            return commit

        def timed_finish(commit: Any) -> None:
            began = started.pop(id(commit), None)
            if began is not None and commit.wrote:
                self.seconds += time.perf_counter() - began
                self.count += 1
            finish(commit)

        store._start_commit = timed_start  # type: ignore[method-assign]
        store._finish = timed_finish  # type: ignore[method-assign]

    def reset(self) -> None:
        self.count = 0
        self.seconds = 0.0


async def run_callers(vm: BackendVM, workload: Workload, counts: list[int], offset: int) -> None:
    async def caller(k: int, count: int) -> None:
        for i in range(count):
            await workload(vm, k, offset + i)

    await asyncio.gather(*(caller(k, n) for k, n in enumerate(counts)))


# --- throughput --------------------------------------------------------------------------------


async def bench_throughput(root: Path, sizes: Sizes) -> None:
    for label, description, workload, target in WORKLOADS:
        vm = BackendVM(SCRIPT)
        await vm.deploy(dir=root / label, title="bench")
        timer = CommitTimer(vm.call_log.ledger.store)
        try:
            await run_callers(vm, workload, [50], 0)  # warm up
            done = 50
            seq_rates = []
            for _ in range(ROUNDS):
                start = time.perf_counter()
                await run_callers(vm, workload, [sizes.sequential], done)
                seq_rates.append(sizes.sequential / (time.perf_counter() - start))
                done += sizes.sequential
            rate, spread = median_and_range(seq_rates)
            record(
                f"{label}: 1 caller, sequential awaits",
                rate,
                "calls/s",
                note=f"{description}; {spread}",
            )
            conc_rates = []
            timer.reset()
            counts = split(sizes.concurrent, CONCURRENT)
            for _ in range(ROUNDS):
                start = time.perf_counter()
                await run_callers(vm, workload, counts, done)
                conc_rates.append(sizes.concurrent / (time.perf_counter() - start))
                done += sizes.concurrent
            rate, spread = median_and_range(conc_rates)
            calls = ROUNDS * sizes.concurrent
            per_commit = calls / max(timer.count, 1)
            commit_ms = timer.seconds / max(timer.count, 1) * 1000
            record(
                f"{label}: {CONCURRENT} concurrent callers",
                rate,
                "calls/s",
                target=f">= {target:,} calls/s" if target else "-",
                ok=rate >= target if target else None,
                note=(
                    f"{spread}; {per_commit:.1f} calls per commit, "
                    f"{commit_ms:.2f} ms per commit, start to reply"
                ),
            )
            if label == "counter":
                count = await vm.execute_call("increment", [])
                expected = done + 1
                if count != expected:
                    raise AssertionError(f"counter reached {count}, expected {expected}")
        finally:
            await vm.close()
        shutil.rmtree(root / label, ignore_errors=True)


async def bench_memory_vm(sizes: Sizes) -> None:
    """The same calls on VMs whose ledgers are in memory: the CPU ceiling without fsync."""
    for label, _description, workload, _target in WORKLOADS:
        vm = BackendVM(SCRIPT)
        await vm.deploy(dir=None, title="bench")
        try:
            await run_callers(vm, workload, [50], 0)
            rates = []
            counts = split(sizes.concurrent, CONCURRENT)
            for r in range(ROUNDS):
                start = time.perf_counter()
                await run_callers(vm, workload, counts, 50 + r * sizes.concurrent)
                rates.append(sizes.concurrent / (time.perf_counter() - start))
            rate, spread = median_and_range(rates)
            record(
                f"{label}: {CONCURRENT} concurrent callers, ledgers in memory",
                rate,
                "calls/s",
                note=f"reference: no fsync, not durable; {spread}",
            )
        finally:
            await vm.close()


# --- large archives ----------------------------------------------------------------------------

KEYS_SCRIPT = """
exports.init = async () => { await System.files.mkdir('/keys') }
exports.put = async (name, value) => { await System.files.writeFile('/keys/' + name, value) }
"""


async def bench_large_archive(root: Path, sizes: Sizes) -> None:
    """Write calls into an archive that already holds many files: their cost must not grow
    with it (a write rehashes O(log n) nodes of the state root; a new file shifts the
    leaves after it)."""
    files = sizes.archive_files
    vm = BackendVM(KEYS_SCRIPT)
    await vm.deploy(dir=root / "keys", title="bench")
    try:
        names = [f"k{(i * 7_919) % files:08d}" for i in range(files)]  # scattered order
        for start in range(0, files, 1_000):
            chunk = names[start : start + 1_000]
            await asyncio.gather(*(vm.execute_call("put", [name, "v1"]) for name in chunk))
        for label, new_names in (
            ("overwrite an existing file", [names[(i * 31) % files] for i in range(files)]),
            ("create a new file", [f"k{(i * 7_919) % files:08d}x" for i in range(files)]),
        ):
            count = min(files, sizes.concurrent)
            start_time = time.perf_counter()

            async def writer(k: int, batch: list[str] = new_names[:count]) -> None:
                for name in batch[k::CONCURRENT]:
                    await vm.execute_call("put", [name, "v2"])

            await asyncio.gather(*(writer(k) for k in range(CONCURRENT)))
            rate = count / (time.perf_counter() - start_time)
            record(
                f"write: {CONCURRENT} callers, archive of {files:,} files, {label}",
                rate,
                "calls/s",
                note="durable; compare with the one-file write above",
            )
    finally:
        await vm.close()
    shutil.rmtree(root / "keys", ignore_errors=True)


# --- per-call costs ----------------------------------------------------------------------------


def per_op_us(count: int, work: Callable[[], object]) -> float:
    start = time.perf_counter()
    for _ in range(count):
        work()
    return (time.perf_counter() - start) / count * 1e6


async def bench_parts(sizes: Sizes) -> None:
    n = sizes.parts
    runtime = JSRuntime()
    runtime.load(SCRIPT, timestamp_ms=0, seed=b"seed")

    async def no_host(op: str, args: list[Any]) -> Any:
        raise AssertionError(op)

    start = time.perf_counter()
    for i in range(n):
        await runtime.call(
            "add", [i, 1], caller_id=None, timestamp_ms=1, seed=b"seed", host=no_host
        )
    runtime.close()
    record(
        "Cost: JSRuntime.call of add() alone",
        (time.perf_counter() - start) / n * 1e6,
        "µs",
        note="QuickJS plus the prelude's JSON bridge",
    )
    entry = {
        "type": "call",
        "call": {"methodName": "add", "args": [12345, 7], "timestamp": 1_700_000_000_000},
        "result": {"res": 12352, "filesVersion": 2, "filesRoot": "ab" * 32},
    }
    data = canonical(entry)
    record(
        "Cost: encoding.canonical of a pure call's entry",
        per_op_us(n, lambda: canonical(entry)),
        "µs",
        note=f"{len(data)} bytes; once per live call, once per checked replayed entry",
    )
    record(
        "Cost: encoding.parse of a pure call's entry",
        per_op_us(n, lambda: parse(data)),
        "µs",
        note="strict json.loads plus a value walk",
    )
    tree = merkle.MerkleTree.from_leaf_hashes(
        merkle.leaf_hash(i.to_bytes(8, "big")) for i in range(100_000)
    )
    leaf = merkle.leaf_hash(b"next")

    def append_and_root() -> None:
        tree.append(leaf)
        tree.root()

    record(
        "Cost: MerkleTree append + root at 10^5 entries",
        per_op_us(n, append_and_root),
        "µs",
        note="the root is folded once per commit, for its checkpoint",
    )
    keypair = Keypair.from_private_bytes(bytes([7]) * 32)
    checkpoint = Checkpoint(ledger_url(keypair.public_key), tree.size, tree.root())
    record(
        "Cost: sign_checkpoint (Ed25519 signed note)",
        per_op_us(max(n // 10, 100), lambda: sign_checkpoint(checkpoint, keypair)),
        "µs",
        note="once per commit per changed ledger",
    )


# --- replay ------------------------------------------------------------------------------------


async def build_log(directory: Path, calls: int) -> str:
    """A VM in ``directory`` with ``calls`` pure calls logged; returns its files archive URL."""
    vm = BackendVM(PURE_SCRIPT)
    await vm.deploy(dir=directory, title="bench")
    start = time.perf_counter()
    await run_callers(vm, pure, split(calls, BUILD_CALLERS), 0)
    elapsed = time.perf_counter() - start
    url = vm.files_archive.url
    commits = vm.call_log.ledger.store.commits
    await vm.close()
    record(
        f"Build a log of {calls:,} pure calls, {BUILD_CALLERS} concurrent callers",
        calls / elapsed,
        "calls/s",
        note=f"{elapsed:,.1f} s, {commits:,} commits",
    )
    return url


def maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
    """Resident set size now (Linux); the peak so far elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return maxrss_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


async def replay_child(directory: str, url: str, profile: bool, trace: bool) -> None:
    """Run in a child process: open the log, replay it with check=True, print JSON results."""
    log = await CallLog.open(directory)
    calls = log.length - 1
    rss_before = current_rss_bytes()
    profiler = cProfile.Profile() if profile else None
    if trace:
        tracemalloc.start()
    if profiler is not None:
        profiler.enable()
    start = time.perf_counter()
    replay = await BackendVM.from_call_log(log, {"files_archive_url": url}, check=True)
    elapsed = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    traced_peak = tracemalloc.get_traced_memory()[1] if trace else 0
    tracemalloc.stop()
    rss_after = maxrss_bytes()
    if replay.call_log.length != log.length:
        raise AssertionError("the replay did not reproduce every entry")
    await replay.close()
    await log.close()
    if profiler is not None:
        print_profile(profiler, f"replay of {calls:,} pure calls, check=True")
    result = {
        "calls": calls,
        "seconds": elapsed,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "traced_peak": traced_peak,
    }
    print(json.dumps(result), flush=True)


def run_child(directory: Path, url: str, *, profile: bool = False, trace: bool = False) -> Any:
    command = [sys.executable, __file__, "--replay-child", str(directory), url]
    if profile:
        command.append("--profile")
    if trace:
        command.append("--tracemalloc")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    lines = out.rstrip("\n").split("\n")
    if len(lines) > 1:
        print("\n".join(lines[:-1]))
    return json.loads(lines[-1])


async def bench_replay(root: Path, sizes: Sizes, profile: bool) -> None:
    for calls in sizes.replays:
        directory = root / f"replay-{calls}"
        url = await build_log(directory, calls)
        result = await asyncio.to_thread(run_child, directory, url)
        rate = result["calls"] / result["seconds"]
        record(
            f"Replay {calls:,} pure calls, from_call_log(check=True)",
            rate,
            "calls/s",
            target=">= 20,000 calls/s",
            ok=rate >= 20_000,
            note=f"{result['seconds']:,.2f} s; replayed into memory, as an auditor does",
        )
        grown = (result["rss_after"] - result["rss_before"]) / 2**20
        record(
            f"Replay {calls:,} pure calls: peak RSS (ru_maxrss)",
            result["rss_after"] / 2**20,
            "MiB",
            note=f"whole process; {grown:+,.1f} MiB over its RSS when the replay began",
        )
        if calls == sizes.replays[0]:
            traced = await asyncio.to_thread(run_child, directory, url, trace=True)
            peak = traced["traced_peak"]
            record(
                f"Replay {calls:,} pure calls: tracemalloc peak",
                peak / 2**20,
                "MiB",
                note=(
                    f"{peak / calls:,.0f} B per call of Python heap; "
                    f"{traced['seconds'] / result['seconds']:.1f}x slower when traced"
                ),
            )
        if profile and calls == sizes.replays[-1]:
            await asyncio.to_thread(run_child, directory, url, profile=True)
        shutil.rmtree(directory, ignore_errors=True)


# --- driver ------------------------------------------------------------------------------------


async def profile_pure(root: Path, sizes: Sizes) -> None:
    vm = BackendVM(SCRIPT)
    await vm.deploy(dir=root / "profile", title="bench")
    try:
        await run_callers(vm, pure, [50], 0)
        counts = split(sizes.concurrent, CONCURRENT)
        with profiled(True, f"{sizes.concurrent:,} pure calls, {CONCURRENT} callers"):
            await run_callers(vm, pure, counts, 50)
    finally:
        await vm.close()


async def run(sizes: Sizes, profile: bool) -> None:
    with scratch_dir() as root:
        await bench_throughput(root, sizes)
        await bench_memory_vm(sizes)
        await bench_large_archive(root, sizes)
        await bench_parts(sizes)
        await bench_replay(root, sizes, profile)
        if profile:
            await profile_pure(root, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer calls")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile pure calls and the largest replay"
    )
    parser.add_argument("--replay-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay_child:
        directory, url = args.replay_child
        asyncio.run(replay_child(directory, url, args.profile, args.tracemalloc))
        return
    sizes = QUICK if args.quick else FULL
    run_and_report("libvms VM benchmarks", args.quick, run(sizes, args.profile))


if __name__ == "__main__":
    main()
