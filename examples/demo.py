"""The main job, end to end: build both ledgers, tamper with one, watch it get caught."""

import asyncio
import shutil
import sqlite3
import tempfile
from pathlib import Path

from libvms import CallLog, FilesArchive, TamperError
from libvms.checkpoint import open_checkpoint
from libvms.keys import VerifierKey


async def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="libvms-demo-"))
    try:
        archive = await FilesArchive.create(workdir, title="demo files")
        log = await CallLog.create(workdir, "exports.hello = () => 'world'", archive.url)
        async with log.batch():
            for i in range(1000):
                await log.append_call(method_name="hello", args=[i], res="world", files_version=1)
        await archive.write_file("/greeting.txt", "hello, auditor")
        note = await log.checkpoint()
        checkpoint = open_checkpoint(note, VerifierKey.parse(log.verifier_key))
        print(f"call log {log.url}: {log.length} entries")
        print(f"files archive {archive.url}: version {archive.version}")
        print("signed checkpoint:\n" + note)
        print(f"checkpoint verified: size {checkpoint.size}, root {checkpoint.root_hash.hex()}")
        await log.close()
        await archive.close()

        print("host edits entry 500 on disk ...")
        conn = sqlite3.connect(workdir / "libvms.db")
        conn.execute(
            "UPDATE call_log_entries SET data = CAST(replace(data, 'world', 'WORLD') AS BLOB) "
            "WHERE seq = 500"
        )
        conn.commit()
        conn.close()
        try:
            await CallLog.open(workdir)
        except TamperError as exc:
            print(f"verdict: tampering detected — {exc}")
        else:
            raise SystemExit("verdict: tampering NOT detected")
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    asyncio.run(main())
