"""A log written here replays byte for byte in another process with another TZ and hash seed."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

from libvms.vm import BackendVM

SCRIPT = """
let ticks = []
exports.clock = async () => {
  const d = new Date()
  const started = Date.now()
  await new Promise(r => setTimeout(r, 250))
  await new Promise(r => setTimeout(() => setTimeout(r, 5), 7))
  return { hours: d.getHours(), day: d.getDay(), tz: d.getTimezoneOffset(),
           text: d.toString(), local: d.toLocaleString(), waited: Date.now() - started }
}
exports.random = () => [Math.random(), Math.random(), Math.floor(Math.random() * 1e9)]
exports.interval = () => new Promise(resolve => {
  let n = 0
  const id = setInterval(() => {
    ticks.push(Date.now())
    if (++n === 4) { clearInterval(id); resolve(ticks.length) }
  }, 3)
})
exports.race = async () => {
  const order = []
  const timer = (ms, tag) => new Promise(r => setTimeout(() => { order.push(tag); r(tag) }, ms))
  await Promise.all([
    timer(30, 'slow'),
    System.files.writeFile('/a', 'x').then(() => order.push('write-a')),
    timer(1, 'fast'),
    System.files.writeFile('/b', String(Math.random())).then(() => order.push('write-b')),
  ])
  await System.files.writeFile('/order', JSON.stringify(order))
  return order
}
"""

CHILD = textwrap.dedent(
    """
    import asyncio, hashlib, json, sys
    from libvms.log import CallLog
    from libvms.vm import BackendVM

    async def main(directory):
        log = await CallLog.open(directory)
        init = await log.get(0)
        replay = await BackendVM.from_call_log(
            log, {"files_archive_url": init["filesArchiveUrl"]}, check=True
        )
        digest = hashlib.sha256()
        for seq in range(replay.call_log.length):
            digest.update(await replay.call_log.get_raw(seq))
        print(json.dumps({"log": digest.hexdigest(), "root": replay.files_archive.state_root}))
        await replay.close()
        await log.close()

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_replay_in_another_process_and_time_zone_is_byte_identical(tmp_path):
    vm = BackendVM(SCRIPT)
    await vm.deploy(dir=tmp_path / "vm")
    first = await vm.execute_call("clock")
    assert first["waited"] == 262 and first["tz"] == 0
    for method in ["random", "interval", "race", "clock", "random"]:
        await vm.execute_call(method)
    digest = hashlib.sha256()
    for seq in range(vm.call_log.length):
        digest.update(await vm.call_log.get_raw(seq))
    expected = {"log": digest.hexdigest(), "root": vm.files_archive.state_root}
    await vm.close()
    for tz, seed in [("America/New_York", "1"), ("Asia/Kolkata", "12345")]:
        env = {**os.environ, "TZ": tz, "PYTHONHASHSEED": seed, "LC_ALL": "C.UTF-8"}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path / "vm")],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=120,
        )
        assert json.loads(out.stdout) == expected, out.stderr
