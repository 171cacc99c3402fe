"""A process killed mid-append leaves a log that reopens with every acknowledged entry."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

from libvms.archive import FilesArchive
from libvms.log import CallLog

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from libvms.archive import FilesArchive
    from libvms.log import CallLog

    async def main(d):
        log = await CallLog.create(d, "code", "libvms:files")
        archive = await FilesArchive.create(d, "crash test")
        print("ready", flush=True)
        i = 0
        while True:
            batch = [log.append({"type": "x", "i": i + k}) for k in range(7)]
            batch.append(archive.write_file(f"/f{i}", "v" * (i % 50)))
            await asyncio.gather(*batch)
            i += 7
            print(i, flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_sigkill_mid_append_keeps_every_acknowledged_entry(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    acknowledged = 0
    for _ in range(40):
        acknowledged = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = await CallLog.open(tmp_path)
    archive = await FilesArchive.open(tmp_path)
    assert log.length >= acknowledged + 1
    entries = await log.list(1, acknowledged + 1)
    assert [e["i"] for e in entries] == list(range(acknowledged))
    assert archive.version >= acknowledged // 7 + 1
    await asyncio.gather(log.close(), archive.close())
