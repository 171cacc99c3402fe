"""Ledger benchmarks: call log appends, Merkle proofs, disk overhead, archive writes, reopening.

Run from the repository root::

    .venv/bin/python benchmarks/ledgers.py            # full run, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/ledgers.py --quick    # smaller sizes, well under a minute
    .venv/bin/python benchmarks/ledgers.py --profile open   # cProfile one stage as well

Every append measured here is durable: it has been committed with ``synchronous=FULL``
(fsync) and covered by a signed checkpoint when its ``await`` returns. Everything runs in
temporary directories that are removed afterwards. Inputs come from a seeded RNG, so two
runs do the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import ROWS, median_and_range, plural, profiled, record, run_and_report, scratch_dir

from libvms import CallLog, FilesArchive, merkle
from libvms.checkpoint import open_checkpoint
from libvms.keys import Keypair, VerifierKey, ledger_url

STAGES = ("sequential", "batch", "concurrent", "merkle", "big", "open", "archive")
METHODS = ("transfer", "deposit", "withdraw", "getBalance", "setProfile", "postMessage")
USERS = tuple(Keypair.from_private_bytes(bytes([i]) * 32).user_id for i in range(1, 9))
ARCHIVE_URL = ledger_url(Keypair.from_private_bytes(bytes([9]) * 32).public_key)


@dataclass(frozen=True)
class Sizes:
    sequential: int  # appends awaited one at a time
    batch: int  # appends inside one ``async with log.batch()``
    appenders: int  # concurrent appenders gathered together
    per_appender: int  # appends each concurrent appender awaits in turn
    tree: int  # leaves of the Merkle tree built from hashes
    proofs: int  # inclusion proofs generated and verified per measurement
    big_log: int  # entries of the log that is reopened and proved against
    build_batch: int  # appends per commit while building that log
    archive_writes: int  # concurrent 1 KiB write_file calls
    archive_sequential: int  # 1 KiB write_file calls awaited one at a time


FULL = Sizes(
    sequential=500,
    batch=10_000,
    appenders=64,
    per_appender=160,
    tree=1_000_000,
    proofs=100_000,
    big_log=1_000_000,
    build_batch=10_000,
    archive_writes=4_000,
    archive_sequential=300,
)
QUICK = Sizes(
    sequential=100,
    batch=10_000,
    appenders=64,
    per_appender=40,
    tree=100_000,
    proofs=20_000,
    big_log=100_000,
    build_batch=10_000,
    archive_writes=1_000,
    archive_sequential=100,
)


# --- realistic entries ----------------------------------------------------------------------


class Calls:
    """A deterministic stream of call entries of roughly 100-200 canonical bytes."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.version = 1

    def next(self) -> dict[str, Any]:
        rng = self.rng
        method = rng.choice(METHODS)
        kwargs: dict[str, Any] = {"method_name": method, "files_version": self.version}
        if rng.random() < 0.75:
            kwargs["user_id"] = rng.choice(USERS)
        if method in ("transfer", "deposit", "withdraw"):
            amount = rng.randrange(1, 100_000)
            kwargs["args"] = [{"to": f"acct-{rng.randrange(10_000):04d}", "amount": amount}]
            kwargs["res"] = {"ok": True, "balance": rng.randrange(1_000_000)}
        elif method == "getBalance":
            kwargs["args"] = [f"acct-{rng.randrange(10_000):04d}"]
            kwargs["res"] = rng.randrange(1_000_000)
        elif method == "setProfile":
            kwargs["args"] = [{"name": f"user {rng.randrange(1000)}", "bio": "hello " * 3}]
            if rng.random() < 0.1:
                kwargs["err"] = "profile is locked"
            else:
                kwargs["res"] = None
            self.version += 1
        else:
            kwargs["args"] = [f"message number {rng.randrange(1_000_000)}", ["general"]]
            kwargs["res"] = {"id": rng.randrange(1 << 40)}
        return kwargs


def new_log(root: Path, name: str) -> Awaitable[CallLog]:
    return CallLog.create(root / name, "exports.transfer = (to, amount) => ...", ARCHIVE_URL)


# --- stages ----------------------------------------------------------------------------------


async def bench_sequential(root: Path, sizes: Sizes) -> None:
    log = await new_log(root, "sequential")
    calls = Calls(1)
    start = time.perf_counter()
    for _ in range(sizes.sequential):
        await log.append_call(**calls.next())
    elapsed = time.perf_counter() - start
    await log.close()
    record(
        "Durable appends, one at a time",
        sizes.sequential / elapsed,
        "/s",
        note=f"{sizes.sequential:,} sequential awaits, one fsync each",
    )


async def bench_batch(root: Path, sizes: Sizes) -> None:
    log = await new_log(root, "batch")
    calls = Calls(2)
    start = time.perf_counter()
    async with log.batch():
        for _ in range(sizes.batch):
            await log.append_call(**calls.next())
    elapsed = time.perf_counter() - start
    await log.close()
    rate = sizes.batch / elapsed
    record(
        "Durable appends, async with log.batch()",
        rate,
        "/s",
        target=">= 5,000/s (stretch 20,000)",
        ok=rate >= 5_000,
        note=f"{sizes.batch:,} appends, one commit",
    )


async def bench_concurrent(root: Path, sizes: Sizes) -> None:
    log = await new_log(root, "concurrent")
    store = log.ledger.store
    commits_before = store.commits

    async def appender(seed: int) -> None:
        calls = Calls(100 + seed)
        for _ in range(sizes.per_appender):
            await log.append_call(**calls.next())

    start = time.perf_counter()
    await asyncio.gather(*(appender(i) for i in range(sizes.appenders)))
    elapsed = time.perf_counter() - start
    commits = store.commits - commits_before
    await log.close()
    total = sizes.appenders * sizes.per_appender
    rate = total / elapsed
    record(
        f"Durable appends, {sizes.appenders} concurrent appenders",
        rate,
        "/s",
        target=">= 5,000/s (stretch 20,000)",
        ok=rate >= 5_000,
        note=f"{total:,} appends in {commits:,} commit{plural(commits)}",
    )


def sample_indices(size: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(size) for _ in range(count)]


ROUNDS = 3  # proof measurements are repeated; the median is reported


def rates(count: int, work: Callable[[], object]) -> tuple[float, str]:
    """Median rate of ``ROUNDS`` runs of ``work`` (``count`` operations each), and the range."""
    measured = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        work()
        measured.append(count / (time.perf_counter() - start))
    return median_and_range(measured)


async def async_rates(count: int, work: Callable[[], Awaitable[None]]) -> tuple[float, str]:
    """:func:`rates` for a coroutine function."""
    measured = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        await work()
        measured.append(count / (time.perf_counter() - start))
    return median_and_range(measured)


def bench_verify(
    what: str,
    jobs: list[tuple[int, bytes]],
    proofs: list[list[bytes]],
    size: int,
    root: bytes,
    note: str,
) -> None:
    """Time verifying ``proofs`` of the ``(index, leaf hash)`` ``jobs`` against ``root``."""
    verify = merkle.verify_inclusion

    def check() -> None:
        for (i, leaf), proof in zip(jobs, proofs, strict=True):
            verify(leaf, i, size, proof, root)

    rate, spread = rates(len(jobs), check)
    record(
        f"Inclusion proofs verified, {what}",
        rate,
        "/s",
        target=">= 20,000/s",
        ok=rate >= 20_000,
        note=f"{note}; {spread}",
    )


def bench_merkle(sizes: Sizes) -> None:
    n = sizes.tree
    leaves = [merkle.leaf_hash(i.to_bytes(8, "big")) for i in range(n)]
    start = time.perf_counter()
    tree = merkle.MerkleTree.from_leaf_hashes(leaves)
    record(
        f"MerkleTree.from_leaf_hashes, {n:,} leaves",
        time.perf_counter() - start,
        "s",
    )
    root = tree.root()
    indices = sample_indices(n, sizes.proofs, 3)
    jobs = [(i, leaves[i]) for i in indices]
    proofs: list[list[bytes]] = []

    def generate() -> None:
        proofs[:] = [tree.inclusion_proof(i) for i in indices]

    rate, spread = rates(len(indices), generate)
    record(f"Inclusion proofs generated, tree of {n:,}", rate, "/s", note=spread)
    bench_verify(f"tree of {n:,}", jobs, proofs, n, root, f"{len(proofs[0])} hashes per proof")


async def build_big_log(root: Path, sizes: Sizes) -> Path:
    log = await new_log(root, "big")
    calls = Calls(4)
    remaining = sizes.big_log - log.length
    start = time.perf_counter()
    while remaining > 0:
        count = min(sizes.build_batch, remaining)
        async with log.batch():
            for _ in range(count):
                await log.append_call(**calls.next())
        remaining -= count
    elapsed = time.perf_counter() - start
    record(
        f"Build a {sizes.big_log:,}-entry call log",
        elapsed,
        "s",
        note=f"batches of {sizes.build_batch:,}; {sizes.big_log / elapsed:,.0f} appends/s",
    )
    directory = root / "big"
    db = directory / "libvms.db"
    open_bytes = sum(f.stat().st_size for f in directory.glob("libvms.db*"))
    await log.close()
    closed_bytes = db.stat().st_size
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        count, entry_bytes = conn.execute(
            "SELECT count(*), sum(length(data)) FROM call_log_entries"
        ).fetchone()
    finally:
        conn.close()
    for label, total in (("open, db + -wal + -shm", open_bytes), ("closed, db only", closed_bytes)):
        per_entry = (total - entry_bytes) / count
        record(
            f"Disk bytes per entry beyond the entry ({label})",
            per_entry,
            "B",
            target="<= 100 B",
            ok=per_entry <= 100,
            note=f"mean entry {entry_bytes / count:,.0f} B, {count:,} entries",
        )
    return directory


async def bench_open(directory: Path, sizes: Sizes) -> None:
    start = time.perf_counter()
    log = await CallLog.open(directory)
    elapsed = time.perf_counter() - start
    await log.close()
    record(
        f"Open and verify a {sizes.big_log:,}-entry call log",
        elapsed,
        "s",
        target="< 10 s",
        ok=elapsed < 10,
        note="re-hashes every entry, checks the signed checkpoint (warm page cache)",
    )


async def bench_log_proofs(directory: Path, sizes: Sizes) -> None:
    log = await CallLog.open(directory)
    try:
        key = VerifierKey.parse(log.verifier_key)
        checkpoint = open_checkpoint(await log.checkpoint(), key)
        size, root = checkpoint.size, checkpoint.root_hash
        indices = sample_indices(size, sizes.proofs, 5)
        tree = log.ledger.tree
        jobs = [(i, tree.leaf(i)) for i in indices]
        proofs: list[list[bytes]] = []

        async def generate() -> None:
            proofs[:] = [await log.inclusion_proof(i, size) for i in indices]

        rate, spread = await async_rates(len(indices), generate)
        record(f"Inclusion proofs generated, CallLog of {size:,}", rate, "/s", note=spread)
        bench_verify(
            f"CallLog of {size:,}", jobs, proofs, size, root, "against the signed checkpoint's root"
        )
        verify = merkle.verify_inclusion
        count = min(len(indices), 20_000)
        start = time.perf_counter()
        for i in indices[:count]:
            data = await log.get_raw(i)
            verify(merkle.leaf_hash(data), i, size, await log.inclusion_proof(i, size), root)
        rate = count / (time.perf_counter() - start)
        record(
            f"Read entry + prove + verify, CallLog of {size:,}",
            rate,
            "/s",
            note=f"{count:,} random entries read from SQLite",
        )
    finally:
        await log.close()


async def bench_archive(root: Path, sizes: Sizes) -> None:
    rng = random.Random(6)

    def kib() -> bytes:
        return rng.randbytes(1024)

    archive = await FilesArchive.create(root / "archive-seq", title="bench")
    await archive.mkdir("/seq")
    start = time.perf_counter()
    for i in range(sizes.archive_sequential):
        await archive.write_file(f"/seq/f{i % 64}.bin", kib())
    elapsed = time.perf_counter() - start
    await archive.close()
    record(
        "Archive write_file 1 KiB, one at a time",
        sizes.archive_sequential / elapsed,
        "/s",
        note=f"{sizes.archive_sequential:,} sequential awaits",
    )

    for label, paths in (
        ("64 paths overwritten", [f"/f{i % 64}.bin" for i in range(sizes.archive_writes)]),
        ("all paths new", [f"/d{i % 16}/f{i}.bin" for i in range(sizes.archive_writes)]),
    ):
        archive = await FilesArchive.create(root / f"archive-{len(ROWS)}", title="bench")
        for d in range(16):
            await archive.mkdir(f"/d{d}")
        blobs = [kib() for _ in paths]
        commits_before = archive.ledger.store.commits
        start = time.perf_counter()
        await asyncio.gather(*(archive.write_file(p, b) for p, b in zip(paths, blobs, strict=True)))
        elapsed = time.perf_counter() - start
        commits = archive.ledger.store.commits - commits_before
        await archive.close()
        record(
            f"Archive write_file 1 KiB, {len(paths):,} gathered, {label}",
            len(paths) / elapsed,
            "/s",
            note=f"{commits:,} commit{plural(commits)}",
        )


# --- driver ----------------------------------------------------------------------------------


def profiled_stage(stage: str, wanted: str | None) -> AbstractContextManager[None]:
    """cProfile ``stage`` if it is the one asked for: its top 20 functions by internal time."""
    return profiled(stage == wanted, stage, top=20, orders=(("tottime", "internal time"),))


async def run(sizes: Sizes, profile: str | None) -> None:
    with scratch_dir() as root:
        stages: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("sequential", lambda: bench_sequential(root, sizes)),
            ("batch", lambda: bench_batch(root, sizes)),
            ("concurrent", lambda: bench_concurrent(root, sizes)),
        ]
        for stage, bench in stages:
            with profiled_stage(stage, profile):
                await bench()
        with profiled_stage("merkle", profile):
            bench_merkle(sizes)
        with profiled_stage("big", profile):
            directory = await build_big_log(root, sizes)
        with profiled_stage("open", profile):
            await bench_open(directory, sizes)
        await bench_log_proofs(directory, sizes)
        shutil.rmtree(directory)
        with profiled_stage("archive", profile):
            await bench_archive(root, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^5-entry log, fewer samples")
    parser.add_argument("--profile", choices=STAGES, help="print a cProfile of one stage")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    run_and_report("libvms ledger benchmarks", args.quick, run(sizes, args.profile))


if __name__ == "__main__":
    main()
