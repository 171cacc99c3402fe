"""The ``libvms`` command line, run as a real process against real servers on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import queue
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from libvms import encoding
from libvms.keys import Keypair
from libvms.store import DB_FILENAME
from libvms.vm import BackendVM

CLI = [sys.executable, "-m", "libvms.cli"]
COUNTER = Path(__file__).resolve().parents[2] / "examples" / "counter.js"
TIMEOUT = 30
COMMANDS = ["exec", "call", "repl", "keygen", "log"]


def start(*args: object, cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start ``libvms ARGS...``; several may run at once, then :func:`finish` each."""
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        cwd=cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    stdout, stderr = proc.communicate(stdin, timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def libvms(*args: object, cwd: Path | None = None) -> str:
    """Run a command that must succeed; its stdout."""
    result = finish(start(*args, cwd=cwd))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def failure(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """Check that a command failed cleanly: one ``error:`` line on stderr, no traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def fails(*args: object, cwd: Path | None = None) -> str:
    return failure(finish(start(*args, cwd=cwd)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """``libvms exec`` running in the background, with the lines it printed."""

    def __init__(self, cwd: Path, *args: object) -> None:
        self._stderr = open(cwd / "exec.stderr", "w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [*CLI, "exec", *map(str, args), "--port", "0"],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            self.banner = self._read_banner()
        except BaseException:
            self.close()
            raise
        self.url = self.banner["Serving at"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_banner(self) -> dict[str, str]:
        banner: dict[str, str] = {}
        while "Methods" not in banner:
            line = self._lines.get(timeout=TIMEOUT)
            if line is None:
                self.proc.wait(TIMEOUT)
                self._stderr.seek(0)
                raise AssertionError(f"exec exited early: {self._stderr.read()}")
            prefix = "Serving at" if line.startswith("Serving at ") else line.partition(":")[0]
            banner[prefix] = line[len(prefix) :].lstrip(": ")
        return banner

    def stop(self, sig: int = signal.SIGINT) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(TIMEOUT)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self._stderr.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def served(workdir: Path):
    """counter.js served with the default data directory (./counter)."""
    vm = Served(workdir, COUNTER)
    yield vm
    vm.close()


@pytest.fixture(scope="module")
def key_file(workdir: Path) -> tuple[Path, Keypair]:
    path = workdir / "alice.key"
    key = Keypair.generate()
    key.save(path)
    return path, key


# -- help and keygen -------------------------------------------------------------


def test_every_command_has_help():
    procs = {name: start(*([name] if name else []), "--help") for name in ["", *COMMANDS]}
    results = {name: finish(proc) for name, proc in procs.items()}
    for name, result in results.items():
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Usage: "), name
        assert result.stderr == ""
    for name in COMMANDS:
        assert name in results[""].stdout


def test_python_dash_m_libvms_is_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "libvms", "--help"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: libvms ")
    assert all(name in result.stdout for name in COMMANDS)


def test_keygen_writes_a_private_key_and_refuses_to_overwrite_it(tmp_path: Path):
    user_id = libvms("keygen", cwd=tmp_path).strip()
    path = tmp_path / "libvms-user.key"
    assert user_id.startswith("ed25519:")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keypair.load(path).user_id == user_id

    before = path.read_bytes()
    assert "overwrite" in fails("keygen", cwd=tmp_path)
    assert path.read_bytes() == before


# -- exec and call ---------------------------------------------------------------


def test_exec_prints_where_it_serves(served: Served, workdir: Path):
    banner = served.banner
    assert served.url.startswith("ws://127.0.0.1:")
    port = served.url.removeprefix("ws://127.0.0.1:").rstrip("/")
    assert banner["Data directory"] == str((workdir / "counter").resolve())
    assert banner["Call log URL"].startswith(f"http://127.0.0.1:{port}/log#")
    assert banner["Files archive URL"].startswith(f"http://127.0.0.1:{port}/files#")
    assert banner["Methods"] == "increment, get"


def test_exec_leaves_out_and_warns_of_an_export_the_protocol_answers(tmp_path: Path):
    script = tmp_path / "hs.js"
    script.write_text("exports.handshake = () => 1\nexports.z = () => 2\n")
    vm = Served(tmp_path, script)
    try:
        assert vm.banner["Methods"] == "z"
        assert vm.stop() == 0
        assert "warning: the script exports 'handshake'" in vm.stderr()
    finally:
        vm.close()


def test_call_as_a_debug_user(served: Served):
    count = int(libvms("call", served.url, "increment", "5", "-u", "alice"))
    # A negative number is an argument, not an option.
    assert libvms("call", "-u", "alice", served.url, "increment", "-2") == f"{count - 2}\n"


def test_signed_call_with_a_key_file(served: Served, key_file: tuple[Path, Keypair]):
    path, key = key_file
    libvms("call", served.url, "increment", "--key", path)
    last = json.loads(libvms("log", served.url, "--json").splitlines()[-1])
    assert last["call"]["userId"] == key.user_id
    assert last["call"]["methodName"] == "increment"
    assert "signed" in last["call"]
    shared = path.with_name("shared.key")
    shared.write_bytes(path.read_bytes())
    shared.chmod(0o644)
    quiet, warned = (
        finish(start("call", served.url, "get", "--key", key)) for key in (path, shared)
    )
    assert quiet.returncode == warned.returncode == 0
    assert quiet.stderr == ""
    assert warned.stderr.startswith(f"warning: {shared} can be read by other users")


def test_call_failures(served: Served, key_file: tuple[Path, Keypair]):
    script_error = start("call", served.url, "increment", "abc", "-u", "alice")
    unknown = start("call", served.url, "nope")
    both_callers = start("call", served.url, "get", "-u", "alice", "--key", key_file[0])
    assert failure(finish(script_error)) == "error: TypeError: by must be an integer"
    assert "increment, get" in failure(finish(unknown))
    usage = finish(both_callers)
    assert usage.returncode == 2
    assert "Traceback" not in usage.stderr


# -- repl ------------------------------------------------------------------------


def test_repl_eval_runs_one_expression(served: Served):
    script_error = start("repl", served.url, "-e", "increment('x')")
    bad_syntax = start("repl", served.url, "-e", "increment(1,")
    count = int(libvms("repl", served.url, "-u", "bob", "-e", "await client.increment(2)"))
    assert libvms("repl", served.url, "-e", "increment 3") == f"{count + 3}\n"
    assert failure(finish(script_error)) == "error: TypeError: by must be an integer"
    assert failure(finish(bad_syntax)).startswith("error: cannot read the line")


def test_repl_reads_lines_from_stdin(served: Served):
    lines = [
        ".methods",
        "increment 1",
        "await client.increment(2);",
        "increment({by: 1})",
        "client.get()",
        ".exit",
        "increment 100",
    ]
    result = finish(start("repl", served.url), "\n".join(lines) + "\n")
    assert result.returncode == 1  # a line failed
    out = result.stdout.splitlines()
    assert out[:2] == ["increment", "get"]
    count = int(out[2])
    assert out[3:] == [str(count + 2), str(count + 2)]
    assert result.stderr == "error: TypeError: by must be an integer\n"


# -- log -------------------------------------------------------------------------


def test_log_from_the_vm_url_and_the_call_log_url(served: Served):
    call_log_url = served.banner["Call log URL"]
    table = start("log", served.url)
    everything = start("log", call_log_url, "--json")
    one = start("log", call_log_url, "--json", "--start", "1", "--end", "2")
    last_two = start("log", served.url, "--json", "--tail", "2")
    lines = finish(everything).stdout.splitlines()
    assert finish(last_two).stdout.splitlines() == lines[-2:]
    first = json.loads(lines[0])
    assert first["type"] == "init"
    assert first["code"] == COUNTER.read_text()
    for line in lines:
        assert encoding.canonical(json.loads(line)).decode() == line
    assert finish(one).stdout == lines[1] + "\n"
    shown = finish(table).stdout
    assert "init" in shown
    assert "increment" in shown
    assert call_log_url.partition("#")[2] in shown


def test_sigint_stops_cleanly_then_the_directory_reopens(tmp_path: Path):
    script = tmp_path / "counter.js"
    script.write_text(COUNTER.read_text() + "exports.nothing = () => {}\n")
    data = tmp_path / "data"
    vm = Served(tmp_path, script, "--dir", data, "--title", "Counter")
    try:
        libvms("call", vm.url, "increment", "7", "-u", "dave")
        served_log = libvms("log", vm.url, "--json")
        assert vm.stop(signal.SIGINT) == 0
        assert "Traceback" not in vm.stderr()
    finally:
        vm.close()
    as_json, as_table = start("log", data, "--json"), start("log", data)
    assert finish(as_json).stdout == served_log
    table = finish(as_table).stdout
    assert "dave" in table
    assert "increment" in table

    again = Served(tmp_path, script, "--dir", data)
    try:
        count, nothing = start("call", again.url, "get"), start("call", again.url, "nothing")
        assert finish(count).stdout == "7\n"  # rebuilt by replaying the log
        assert finish(nothing).stdout == "null\n"
        assert again.stop(signal.SIGTERM) == 0
        assert f"Reopening {data}: verifying it and replaying its call log" in again.stderr()
    finally:
        again.close()


# -- failures a user can cause ----------------------------------------------------


def test_bad_urls_and_refused_connections_fail_in_one_line(tmp_path: Path):
    refused = f"ws://127.0.0.1:{free_port()}/"
    bad = [
        start("call", "not-a-url", "get"),
        start("call", "ws://[::1", "get"),  # urlsplit raises on an unclosed IPv6 literal
        start("log", tmp_path / "no-such-dir"),
    ]
    closed = start("repl", refused, "-e", "get")
    no_port = start("call", "ws://127.0.0.1:99999/", "get")
    for proc in bad:
        failure(finish(proc))
    assert failure(finish(closed)) == f"error: cannot connect to {refused}: connection refused"
    assert failure(finish(no_port)).endswith("not a valid URL (a bad port or host?)")


def test_exec_failures_are_one_line(tmp_path: Path):
    (tmp_path / "broken.js").write_text("exports.x = (\n")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        procs = [
            start("exec", tmp_path / "missing.js", "--port", "0", cwd=tmp_path),
            start("exec", tmp_path / "broken.js", "--port", "0", cwd=tmp_path),
            start("exec", COUNTER, "--port", port, "--dir", tmp_path / "busy", cwd=tmp_path),
            start("exec", COUNTER, "--port", "0", "--dir", tmp_path / "project"),
        ]
        missing, broken, in_use, elsewhere = (failure(finish(p)) for p in procs)
    assert "not a VM's data directory (it holds 'notes.txt')" in elsewhere
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["notes.txt"]
    assert "missing.js" in missing
    assert "SyntaxError" in broken
    assert str(port) in in_use


async def test_log_table_shows_callers_strings_inert_and_marks_signed_calls(tmp_path: Path):
    from libvms import signed
    from libvms.rpc import RPCClient, RPCServer

    vm = BackendVM("exports.echo = (x) => x\nexports.fail = (m) => { throw new Error(m) }")
    await vm.deploy(tmp_path, title="inert")
    key = Keypair.generate()
    await vm.execute_call("echo", [1], user_id="evil\x1b[2J\x1b[31mRED\x1b]0;title\x07")
    await vm.execute_call("echo", [2], user_id=" " + key.user_id)  # a debug-mode look-alike
    await vm.execute_call("echo", [3], user_id="zero\u200bwidth")
    with pytest.raises(Exception, match="boom"):
        await vm.execute_call("fail", ["boom\x1b[2J"], user_id="bob")
    async with RPCServer(vm, port=0) as server, RPCClient(server.url(), key=key) as client:
        assert await client.echo(4) == 4
    # A host that logs a call in a signed user's name, with a signature it made up.
    forged = {"nonce": "A" * 22, "time": 1, "sig": base64.b64encode(bytes(64)).decode()}
    await vm.execute_call("echo", [6], user_id=key.user_id, call_fields={"signed": forged})
    await vm.close()
    assert signed.USER_ID_PREFIX in key.user_id
    shown = libvms("log", tmp_path)
    assert "\x1b" not in shown and "\x07" not in shown and "\u200b" not in shown
    assert "evil\\x1b[2J" in shown and "zero\\u200bwidth" in shown and "boom\\x1b[2J" in shown
    rows = {line.split("│")[1].strip(): line for line in shown.splitlines() if line.count("│") > 3}
    assert rows["2"].split("│")[3].strip().startswith('" ed25519:')  # quoted: not signed
    assert rows["2"].split("│")[4].strip() == ""
    assert rows["5"].split("│")[4].strip() == "yes"
    assert rows["6"].split("│")[4].strip() == "FORGED"


def test_limits_the_sandbox_cannot_use_are_usage_errors(tmp_path: Path):
    procs = [
        start("exec", COUNTER, "--port", "0", "--dir", tmp_path / "a", *bad, cwd=tmp_path)
        for bad in (("--memory-limit", "99999999999G"), ("--call-timeout", "nan"))
    ] + [start("verify", "ws://127.0.0.1:1/", "--call-timeout", "inf", cwd=tmp_path)]
    too_small = start(
        "exec", COUNTER, "--port", "0", "--dir", tmp_path / "a", "--memory-limit", "200K"
    )
    for proc in procs:
        result = finish(proc)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "Invalid value for '--" in result.stderr
    # Allowed, but too small for the sandbox to start: one line, nothing deployed.
    assert "the sandbox itself needs more than memory_limit=204800" in failure(finish(too_small))
    assert not (tmp_path / "a" / "libvms.db").exists()


async def test_tampered_directory_fails_in_one_line(tmp_path: Path):
    vm = BackendVM(COUNTER.read_text())
    await vm.deploy(tmp_path, title="tamper")
    await vm.execute_call("increment", [1], user_id="alice")
    await vm.close()
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    (data,) = conn.execute("SELECT data FROM call_log_entries WHERE seq = 1").fetchone()
    forged = data.replace(b'"alice"', b'"mallory"')
    conn.execute("UPDATE call_log_entries SET data = ? WHERE seq = 1", (forged,))
    conn.commit()
    conn.close()
    assert "call_log entry 1" in fails("log", tmp_path)


def test_call_gives_up_after_its_timeout(tmp_path: Path):
    script = tmp_path / "spin.js"
    script.write_text("exports.spin = () => { for (;;) {} }\nexports.ok = () => 1\n")
    vm = Served(tmp_path, script, "--call-timeout", "4")
    try:
        # Its own timeout, not the server's limit (which would name TimeLimitExceeded).
        assert failure(finish(start("call", vm.url, "spin", "--timeout", "0.5"))) == (
            "error: timed out"
        )
        assert libvms("call", vm.url, "ok", "--timeout", "30").strip() == "1"
    finally:
        vm.close()
