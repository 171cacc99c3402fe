"""A process killed mid-append leaves a log that reopens with every acknowledged entry."""

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

from libvms.archive import FilesArchive
from libvms.log import CallLog
from libvms.vm import BackendVM

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


DEPLOYER = textwrap.dedent(
    """
    import asyncio, sys
    from libvms.vm import BackendVM

    CODE = sys.argv[2]

    async def main(d):
        vm = BackendVM(CODE)

        async def ready():
            print("init is running", flush=True)
            await asyncio.Event().wait()  # killed while init waits here

        vm.add_oracle("ready", ready)
        await vm.deploy(dir=d, title="crash test")

    asyncio.run(main(sys.argv[1]))
    """
)

INIT_SCRIPT = """
exports.init = async () => {
  await System.files.writeFile('/config.json', JSON.stringify({ admin: 'root' }))
  await System.oracles.ready()
}
exports.admin = async () => JSON.parse(await System.files.readFile('/config.json')).admin
"""


async def test_sigkill_during_deploy_leaves_a_directory_that_deploys_afresh(tmp_path):
    # Killed while init runs: the archive's genesis, the init entry and the init
    # call commit together, so nothing was committed and the directory is free.
    proc = subprocess.Popen(
        [sys.executable, "-c", DEPLOYER, str(tmp_path), INIT_SCRIPT],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "init is running"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert (tmp_path / "libvms.db").exists()
    vm = BackendVM(INIT_SCRIPT)
    vm.add_oracle("ready", lambda: None)
    await vm.deploy(dir=tmp_path)  # waits for the dead deploy's writer to let go
    assert await vm.execute_call("admin") == "root"
    assert [e["call"]["methodName"] for e in await vm.call_log.list(1)] == ["init", "admin"]
    await vm.close()
    again = BackendVM(INIT_SCRIPT)
    await again.deploy(dir=tmp_path)  # and it reopens like any other
    assert again.call_log.length == 3
    await again.close()
