"""What importing libvms loads: no network code until a program uses the network.

aiohttp's client makes SSL contexts (reading the CA certificates) when imported,
which takes about half a second, and rich and uvloop are slow to import too; so
``import libvms``, a VM run in-process and the commands that never touch the
network must not load them. Each check runs in a fresh interpreter, since this
one has loaded everything for other tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import libvms
from libvms.vm import BackendVM

#: Modules that only some commands use: aiohttp the network ones, rich the
#: tables and progress bars, uvloop the event loop of a command.
HEAVY = ("aiohttp", "rich", "uvloop")


def run_fresh(code: str) -> object:
    """Run ``code`` in a fresh interpreter; the JSON value it printed last."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def heavy_loaded_by(code: str) -> set[str]:
    """Which of :data:`HEAVY` are imported after running ``code`` in a fresh interpreter."""
    probe = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    loaded = run_fresh(probe)
    assert isinstance(loaded, list)
    return set(loaded)


def cli(*args: str) -> str:
    """Code running ``libvms ARGS...`` in-process, as the ``libvms`` script does."""
    return f"""
        from libvms.cli import main
        assert main({list(args)!r}, prog_name="libvms", standalone_mode=False) in (0, None)
    """


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VM's data directory with one call in its log."""
    path = tmp_path_factory.mktemp("vm")

    async def deploy() -> None:
        vm = BackendVM("exports.foo = () => 'bar'")
        await vm.deploy(path)
        await vm.execute_call("foo")
        await vm.close()

    asyncio.run(deploy())
    return path


def test_the_probe_sees_aiohttp_when_it_is_used() -> None:
    assert "aiohttp" in heavy_loaded_by("from libvms import RPCClient")


@pytest.mark.parametrize(
    "code",
    [
        "import libvms",
        "import libvms.rpc, libvms.remote, libvms.evidence",
        "from libvms import BackendVM, CallLog, DatArchive, Keypair, LibVMSError",
        # Comparing logs and archives offline needs no HTTP client.
        "from libvms import AuditReport, Verifier",
    ],
)
def test_importing_loads_nothing_heavy(code: str) -> None:
    assert heavy_loaded_by(code) == set()


def test_a_vm_run_in_process_loads_nothing_heavy(tmp_path: Path) -> None:
    code = f"""
        import asyncio
        from libvms import BackendVM

        async def main():
            vm = BackendVM("exports.foo = () => 'bar'")
            await vm.deploy({str(tmp_path)!r})
            assert await vm.execute_call("foo") == "bar"
            await vm.close()

        asyncio.run(main())
    """
    assert heavy_loaded_by(code) == set()


def test_commands_load_nothing_heavy(tmp_path: Path) -> None:
    assert heavy_loaded_by(cli("--help")) == set()
    assert heavy_loaded_by(cli("keygen", str(tmp_path / "user.key"))) == set()
    assert heavy_loaded_by(cli("log", "--help")) == set()


def test_reading_a_local_log_loads_no_network_code(data_dir: Path) -> None:
    # uvloop runs the command's event loop, and rich draws the table.
    assert heavy_loaded_by(cli("log", str(data_dir), "--json")) <= {"uvloop"}
    assert heavy_loaded_by(cli("log", str(data_dir))) <= {"uvloop", "rich"}


def test_every_exported_name_resolves() -> None:
    resolved = run_fresh("""
        import json
        import libvms

        exported = {}
        for package in (libvms, libvms.rpc):  # libvms.rpc: a submodule, loaded on use
            for name in package.__all__:
                getattr(package, name)
            assert set(package.__all__) <= set(dir(package))
            namespace = {}
            exec(f"from {package.__name__} import *", namespace)
            exported[package.__name__] = sorted(set(namespace) - {"__builtins__"})
        print(json.dumps(exported))
    """)
    assert resolved == {
        "libvms": sorted(libvms.__all__),
        "libvms.rpc": sorted(libvms.rpc.__all__),
    }


def test_exported_names_are_the_modules_own() -> None:
    from libvms.rpc.client import RPCClient
    from libvms.verifier import Verifier

    assert libvms.RPCClient is libvms.rpc.RPCClient is RPCClient
    assert libvms.Verifier is Verifier
    assert libvms.BackendVM is BackendVM


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        _ = libvms.Nothing
    assert not hasattr(libvms.rpc, "Nothing")
    for name in ("", "a.b", "..", "vm.BackendVM"):  # never taken for a submodule's name
        assert not hasattr(libvms, name)


def test_commands_use_asyncio_where_uvloop_does_not_import(tmp_path: Path, data_dir: Path) -> None:
    fake = tmp_path / "uvloop"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise ImportError("a build for another platform")\n')
    command = "from libvms.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", command, "log", str(data_dir), "--json"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert [entry["type"] for entry in map(json.loads, result.stdout.splitlines())][:2] == [
        "init",
        "call",
    ]
