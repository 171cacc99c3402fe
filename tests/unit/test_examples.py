"""Every example script works, replays and verifies."""

from pathlib import Path

import pytest

from libvms.errors import VMCallError
from libvms.verifier import Verifier
from libvms.vm import BackendVM

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def deploy(name, tmp_path=None):
    vm = BackendVM((EXAMPLES / name).read_text())
    await vm.deploy(dir=tmp_path, title=name)
    return vm


async def replay_and_compare(vm):
    replay = await BackendVM.from_call_log(
        vm.call_log, {"files_archive_url": vm.files_archive.url}, check=True
    )
    await Verifier.compare_logs(vm.call_log, replay.call_log)
    await Verifier.compare_archives(vm.files_archive, replay.files_archive)
    await replay.close()


async def test_counter(tmp_path):
    vm = await deploy("counter.js", tmp_path)
    assert [await vm.execute_call("increment") for _ in range(3)] == [1, 2, 3]
    assert await vm.execute_call("increment", [10]) == 13
    with pytest.raises(VMCallError, match="TypeError"):
        await vm.execute_call("increment", ["x"])
    await replay_and_compare(vm)
    await vm.close()
    again = BackendVM((EXAMPLES / "counter.js").read_text())
    await again.deploy(dir=tmp_path)
    assert await again.execute_call("get") == 13  # rebuilt by replay
    await again.close()


async def test_persisted_counter():
    vm = await deploy("persisted-counter.js")
    assert await vm.execute_call("get") == 0
    assert await vm.execute_call("increment", user_id="ann") == 1
    assert await vm.execute_call("increment") == 2
    assert "counter.json" in await vm.files_archive.readdir("/")
    await replay_and_compare(vm)
    await vm.close()


async def test_files_service():
    vm = await deploy("files-service.js")
    await vm.execute_call("mkdir", ["/docs"])
    assert await vm.execute_call("writeFile", ["/docs/a.txt", "hello"]) == 5
    assert await vm.execute_call("readFile", ["/docs/a.txt"]) == "hello"
    assert await vm.execute_call("readdir", ["/docs"]) == ["a.txt"]
    with pytest.raises(VMCallError, match="NotFoundError"):
        await vm.execute_call("readFile", ["/nope"])
    await vm.execute_call("remove", ["/docs"])
    assert await vm.execute_call("readdir") == []
    history = await vm.execute_call("history")
    assert [h["type"] for h in history] == ["mkdir", "write", "rmdir"]
    await replay_and_compare(vm)
    await vm.close()


async def test_whoami():
    vm = await deploy("whoami.js")
    assert await vm.execute_call("whoami", user_id="alice") == "alice"
    assert await vm.execute_call("whoami") == "anonymous"
    await replay_and_compare(vm)
    await vm.close()


async def test_keyserver_permissions():
    vm = await deploy("keyserver.js")
    assert await vm.execute_call("listKeys") == []
    with pytest.raises(VMCallError, match="anonymous"):
        await vm.execute_call("setAdmins", [["alice"]])
    await vm.execute_call("setAdmins", [["alice"]], user_id="alice")
    with pytest.raises(VMCallError, match="PermissionDenied"):
        await vm.execute_call("setKey", ["bob", "k1"], user_id="mallory")
    with pytest.raises(VMCallError, match="PermissionDenied"):
        await vm.execute_call("setAdmins", [["mallory"]], user_id="mallory")
    await vm.execute_call("setKey", ["bob", "ssh-ed25519 AAAA"], user_id="alice")
    assert await vm.execute_call("getKey", ["bob"]) == "ssh-ed25519 AAAA"
    assert await vm.execute_call("listKeys") == ["bob"]
    for name in ("../escape", "..", "."):
        with pytest.raises(VMCallError, match="TypeError"):
            await vm.execute_call("setKey", [name, "k"], user_id="alice")
        with pytest.raises(VMCallError, match="TypeError"):
            await vm.execute_call("getKey", [name])
    # An empty admin list would hand the server to its next caller: refused.
    with pytest.raises(VMCallError, match="non-empty"):
        await vm.execute_call("setAdmins", [[]], user_id="alice")
    with pytest.raises(VMCallError, match="PermissionDenied"):
        await vm.execute_call("setAdmins", [["mallory"]], user_id="mallory")
    await vm.execute_call("delKey", ["bob"], user_id="alice")
    assert await vm.execute_call("getKey", ["bob"]) is None
    await replay_and_compare(vm)
    await vm.close()
