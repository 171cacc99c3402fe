"""The seed README's three examples, in Python, against a real server on loopback."""

from libvms import (
    BackendVM,
    CallLog,
    DatArchive,
    RPCClient,
    RPCServer,
    Verifier,
)


async def test_run_connect_and_audit_like_the_seed(tmp_path):
    # Run a VM
    script_code = """
    exports.foo = () => 'bar'
    exports.writeFoo = async (v) => { await System.files.writeFile('/foo', v); return v }
    """
    backend_vm = BackendVM(script_code)
    await backend_vm.deploy(dir=tmp_path / "bobs-vm-data", title="Bobs VM")
    assert list(backend_vm.exports) == ["foo", "writeFoo"]
    async with RPCServer(backend_vm, port=0) as rpc_server:
        # Connect to run commands
        async with RPCClient(rpc_server.url(), user="bob") as client:
            assert await client.foo() == "bar"
            assert await client.writeFoo("baz") == "baz"

        # Audit the VM state
        async with RPCClient(rpc_server.url()) as client:
            call_log = await CallLog.fetch(client.backend_info.call_log_url)
            files_archive = DatArchive(client.backend_info.files_archive_url)
            await files_archive.download("/")
            assert await files_archive.read_file("/foo") == "baz"
            replayed = await BackendVM.from_call_log(
                call_log, client.backend_info, dir=tmp_path / "replay"
            )
            await Verifier.compare_logs(call_log, replayed.call_log)
            await Verifier.compare_archives(files_archive, replayed.files_archive)

            # the copy can be brought up to date
            await client.writeFoo("qux")
            await files_archive.download("/")
            assert await files_archive.read_file("/foo") == "qux"
            await replayed.close()
            await call_log.close()
            await files_archive.close()
    await backend_vm.close()
