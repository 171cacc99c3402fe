"""Helpers shared by the benchmark scripts: result rows, formatting, the results table,
the machine description, the scratch directory, the driver and profiling.

The scripts are run directly (``python benchmarks/ledgers.py``), which puts this
directory on ``sys.path``, so they import this module as ``common``.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import platform
import pstats
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for the table when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 150, log_path=False)


# --- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    target: str
    value: float
    unit: str
    ok: bool | None = None  # None: no target
    note: str = ""


ROWS: list[Row] = []


def record(
    name: str,
    value: float,
    unit: str,
    *,
    target: str = "-",
    ok: bool | None = None,
    note: str = "",
) -> None:
    ROWS.append(Row(name, target, value, unit, ok, note))
    console.log(f"{name}: {fmt(value, unit)} {note}".rstrip())


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:,.2f} s"
    if unit in ("B", "µs", "ms", "MiB"):
        return f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}"


def plural(count: int) -> str:
    return "" if count == 1 else "s"


def split(total: int, parts: int) -> list[int]:
    """``total`` calls spread as evenly as possible over ``parts`` callers."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def median_and_range(values: list[float]) -> tuple[float, str]:
    ordered = sorted(values)
    spread = f"{ordered[0]:,.0f}-{ordered[-1]:,.0f} over {len(ordered)} runs"
    return ordered[len(ordered) // 2], spread


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1))
    return ordered[rank]


# --- report ------------------------------------------------------------------------------------


def machine() -> str:
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        usable = cores
    return (
        f"{platform.system()} {platform.machine()}, {cores} cores ({usable} usable), "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"SQLite {sqlite3.sqlite_version}"
    )


def report_table(title: str, quick: bool, elapsed: float) -> None:
    """Print the recorded rows as a table titled ``title``, then the machine and total time."""
    table = Table(title=title + (" (--quick)" if quick else ""))
    table.add_column("Measurement")
    table.add_column("Target")
    table.add_column("Measured", justify="right")
    table.add_column("Met", justify="center")
    table.add_column("Notes")
    for row in ROWS:
        met = {True: "[green]yes[/]", False: "[red]NO[/]", None: ""}[row.ok]
        table.add_row(row.name, row.target, fmt(row.value, row.unit), met, row.note)
    console.print(table)
    console.print(f"Machine: {machine()}")
    console.print(f"Total time: {elapsed:,.0f} s")


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory for one run's files, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="libvms-bench-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_and_report(title: str, quick: bool, benchmarks: Coroutine[Any, Any, None]) -> None:
    """Print the machine, run ``benchmarks`` and print the table of what they recorded."""
    console.print(f"Machine: {machine()}")
    start = time.perf_counter()
    asyncio.run(benchmarks)
    report_table(title, quick, time.perf_counter() - start)


# --- profiling ---------------------------------------------------------------------------------

# (pstats sort key, how the heading names it)
BY_TIME_AND_CUMULATIVE = (("tottime", "tottime"), ("cumulative", "cumulative"))


def print_profile(
    profiler: cProfile.Profile,
    title: str,
    *,
    top: int = 15,
    orders: tuple[tuple[str, str], ...] = BY_TIME_AND_CUMULATIVE,
) -> None:
    """Print the ``top`` functions of ``profiler`` for each of ``orders``."""
    for order, heading in orders:
        console.rule(f"cProfile: {title} (top {top} by {heading})")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats(order).print_stats(top)
    sys.stdout.flush()


@contextmanager
def profiled(
    enabled: bool,
    title: str,
    *,
    top: int = 15,
    orders: tuple[tuple[str, str], ...] = BY_TIME_AND_CUMULATIVE,
) -> Iterator[None]:
    """cProfile the body when ``enabled`` and print the result (see :func:`print_profile`)."""
    if not enabled:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        print_profile(profiler, title, top=top, orders=orders)
