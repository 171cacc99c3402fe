"""A fixed amount of work to count instructions of, under valgrind's callgrind.

The machine's speed varies from run to run; instruction counts do not. Run a size
and twice that size, and the difference divided by the extra work is the cost of
one call or one replayed entry, start-up excluded::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/count.py calls 2048      # then 6144
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/count.py replay 4096     # then 8192

``calls N``: N pure calls from 16 concurrent callers, ledgers in memory.
``writes N``: N calls that each write a new 64-byte file content, the same way.
``replay N``: a child process builds a log of N pure calls in a temporary
directory, then this process replays it with ``check=True``. callgrind does not
follow the child (no ``--trace-children``), so only the replay is counted: the
build's commits group differently from run to run, with the machine's timing.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile

import libvms.vm
from libvms.log import CallLog
from libvms.vm import BackendVM

# Under callgrind a program runs about 50 times slower, but the VM lets the
# event loop run after holding it for a fixed wall time (20 ms): scaled alike,
# so that commits group as they do at full speed.
libvms.vm._MAX_LOOP_HOLD = getattr(libvms.vm, "_MAX_LOOP_HOLD", 0) * 50

SCRIPT = """
exports.add = (a, b) => a + b
exports.write = async (text) => {
  await System.files.writeFile('/data.txt', text)
  return text.length
}
"""
CALLERS = 16


async def calls(n: int, writes: bool = False) -> None:
    vm = BackendVM(SCRIPT)
    await vm.deploy(None, title="count")

    async def caller(k: int) -> None:
        for i in range(n // CALLERS):
            if writes:
                await vm.execute_call("write", [f"caller {k:03d} call {i:07d} ".ljust(64, ".")])
            else:
                await vm.execute_call("add", [i, k])

    await asyncio.gather(*(caller(k) for k in range(CALLERS)))
    await vm.close()


async def build(directory: str, n: int) -> None:
    """Build the log ``replay`` replays (in a child process); print its archive's URL."""
    vm = BackendVM(SCRIPT)
    await vm.deploy(directory, title="count")
    for start in range(0, n, 256):
        await asyncio.gather(
            *(vm.execute_call("add", [i, 1]) for i in range(start, min(n, start + 256)))
        )
    print(vm.files_archive.url)
    await vm.close()


async def replay(n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="libvms-count-") as tmp:
        command = [sys.executable, __file__, "build", str(n), "--dir", tmp]
        url = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
        log = await CallLog.open(tmp)
        replayed = await BackendVM.from_call_log(log, {"files_archive_url": url}, check=True)
        await replayed.close()
        await log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["calls", "writes", "replay", "build"])
    parser.add_argument("n", type=int)
    parser.add_argument("--dir", help=argparse.SUPPRESS)  # build: where
    args = parser.parse_args()
    if args.kind == "build":
        asyncio.run(build(args.dir, args.n))
    elif args.kind == "replay":
        asyncio.run(replay(args.n))
    else:
        asyncio.run(calls(args.n, writes=args.kind == "writes"))


if __name__ == "__main__":
    main()
