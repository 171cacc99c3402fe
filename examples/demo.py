"""The main job, end to end: serve a VM, call it, audit it, tamper with it, audit again.

Run with `make demo`. Everything happens on 127.0.0.1 in a temporary directory.
"""

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from libvms import BackendVM, Keypair, RPCClient, RPCServer

EXAMPLES = Path(__file__).resolve().parent


def banner(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


async def libvms(*args: str) -> int:
    """Run the `libvms` command line as a user would, showing what it prints."""
    print("$ libvms " + " ".join(args), flush=True)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "libvms.cli", *args)
    return await proc.wait()


async def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="libvms-demo-"))
    try:
        banner("serve examples/keyserver.js")
        vm = BackendVM((EXAMPLES / "keyserver.js").read_text())
        await vm.deploy(dir=workdir / "keyserver", title="keyserver.js files")
        async with RPCServer(vm, port=0) as server:
            url = server.url()
            print(f"Serving at {url}")
            print(f"Call log URL: {vm.call_log.url}")
            print(f"Files archive URL: {vm.files_archive.url}")

            banner("make calls: alice signs hers, carol is a debug-mode user")
            alice = Keypair.generate()
            async with RPCClient(url, key=alice) as client:
                await client.setAdmins([alice.user_id])
                await client.setKey("bob", "ssh-ed25519 AAAAC3Nza...bob")
                print(f"alice ({alice.user_id[:20]}...) set bob's key")
                print(f"alice holds {len(client.receipts)} verified receipts")
            async with RPCClient(url, user="carol") as client:
                print("carol reads bob's key:", await client.getKey("bob"))
                try:
                    await client.setKey("bob", "carol's key")
                except Exception as exc:
                    print(f"carol may not change it: {exc}")

            state = str(workdir / "auditor")
            banner("audit: fetch both ledgers, verify signatures, replay every call")
            honest = await libvms("verify", url, "--state-dir", state)

            banner("the host quietly replaces bob's key in its files archive")
            await vm.files_archive.write_file("/keys/bob", "ssh-ed25519 AAAAC3Nza...mallory")
            print("the host now serves:", await vm.files_archive.read_file("/keys/bob"))

            banner("audit again")
            caught = await libvms("verify", url, "--state-dir", state)
        await vm.close()
        banner("verdict")
        if honest == 0 and caught == 1:
            print("The honest VM verified; the tampered one was caught. Demo OK.")
            return 0
        print(f"Unexpected exit codes: honest run {honest}, tampered run {caught}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
