"""The ``libvms`` command line: serve a VM, call it, read its call log, make keys.

Every command is a function decorated with ``@main.command()``; it parses its
arguments, calls the library and formats the result. Asynchronous work goes
through :func:`_run`, which turns the failures a user can cause (a bad URL, a
refused connection, a missing file, data that does not verify...) into one line
on stderr and an exit code, never a traceback:

* 0: success;
* 1: the command failed (:data:`EXIT_FAILURE`);
* 2: the command line itself is wrong (click's usage errors);
* 130: interrupted (Ctrl-C) before the command finished (:data:`EXIT_INTERRUPTED`).

A command needing another code for its failures defines a subclass of
:class:`CLIError` with that ``exit_code`` and passes it to :func:`_run` as
``error=``, or raises it itself.

Importing this module loads click and little else: each command imports what
it uses (the library's modules, asyncio, uvloop, rich) when it runs. So
``libvms --help`` and ``libvms keygen`` stay quick, and a command given a local
directory never loads aiohttp, whose client makes SSL contexts when imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import click

from . import encoding
from .errors import EncodingError, LibVMSError, VMCallError

if TYPE_CHECKING:
    import asyncio

    from rich.text import Text

    from .evidence import Evidence, Finding
    from .keys import Keypair
    from .log import CallLog
    from .rpc.client import RPCClient
    from .verifier import AuditReport, Outage, ReceiptCheck

T = TypeVar("T")


def _uvloop() -> ModuleType | None:
    """uvloop, which serves connections with less overhead than asyncio; None where it
    does not import (a build for another platform), and the commands use asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for the commands: uvloop's where it imports, else asyncio's."""
    uvloop = _uvloop()
    if uvloop is not None:
        return uvloop.new_event_loop()
    import asyncio

    return asyncio.new_event_loop()


EXIT_FAILURE = 1

#: Exit code of a command interrupted by Ctrl-C (128 + SIGINT, as shells report it).
#: Not 1: for ``verify`` that would claim the host was caught.
EXIT_INTERRUPTED = 130

#: Where ``libvms keygen`` writes a key when no file is named.
DEFAULT_KEY_FILE = "libvms-user.key"

#: Failures a user can cause; :func:`_run` reports them in one line, as it does
#: timeouts and aiohttp's client errors (see :func:`_expected_errors`).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (LibVMSError, OSError)

# asyncio and aiohttp are slow to import, and commands such as `keygen` use
# neither. An error of a module that is not loaded cannot have been raised, so
# the checks below count a module's errors only once it is loaded.


def _timeout_errors() -> tuple[type[BaseException], ...]:
    """The classes of timeouts: before Python 3.11, asyncio's is not the built-in one."""
    if "asyncio" not in sys.modules:
        return (TimeoutError,)
    import asyncio

    return (TimeoutError, asyncio.TimeoutError)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """:data:`EXPECTED_ERRORS`, timeouts, and aiohttp's client errors once aiohttp is loaded."""
    errors = (*EXPECTED_ERRORS, *_timeout_errors())
    if "aiohttp" not in sys.modules:
        return errors
    import aiohttp

    return (*errors, aiohttp.ClientError)


# -- errors and the event loop -------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class CLIError(click.ClickException):
    """An expected failure: ``error: <message>`` on stderr, then exit with ``exit_code``."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message) or "failed")

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", file=file, err=file is None)


def describe_error(exc: BaseException) -> str:
    """What went wrong, for a user: a script error as ``Name: message``, else the message."""
    if isinstance(exc, VMCallError):
        return f"{exc.name}: {exc.message}"
    if isinstance(exc, _timeout_errors()):
        return "timed out"
    if isinstance(exc, OSError) and not isinstance(exc, LibVMSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return _one_line(str(exc)) or type(exc).__name__


@contextlib.contextmanager
def expected_errors(error: type[CLIError] = CLIError) -> Iterator[None]:
    """Turn the failures of :func:`_expected_errors` raised inside into ``error``."""
    try:
        yield
    except _expected_errors() as exc:
        raise error(describe_error(exc)) from exc


def _run(coro: Coroutine[Any, Any, T], *, error: type[CLIError] = CLIError) -> T:
    """Run ``coro`` in a fresh event loop; expected failures are raised as ``error``."""
    with expected_errors(error):
        uvloop = _uvloop()
        if uvloop is not None:
            return uvloop.run(coro)
        import asyncio

        return asyncio.run(coro)


def _dump(value: Any) -> str:
    """A JSON value on one line, as commands print results."""
    return json.dumps(value, ensure_ascii=False)


def _parse_arg(text: str) -> Any:
    """A command-line argument: its JSON value when it is JSON, else the string itself."""
    try:
        return encoding.parse(text)
    except EncodingError:
        return text


# -- shared options ------------------------------------------------------------


def _limit_options(time_help: str, memory_help: str) -> Callable[[F], F]:
    """``--call-timeout`` and ``--memory-limit``: the sandbox's limits, for a VM or a replay."""

    def add(f: F) -> F:
        f = click.option(
            "--memory-limit",
            type=_ByteSize(),
            default="64M",
            show_default=True,
            callback=_check_limit,
            help=f"Memory {memory_help}, in bytes (K, M and G suffixes are powers of 1024; "
            "the sandbox itself needs about half a megabyte).",
        )(f)
        return click.option(
            "--call-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=5.0,
            show_default=True,
            callback=_check_limit,
            help=f"Seconds {time_help}.",
        )(f)

    return add


def _check_limit(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Refuse a limit the sandbox cannot use (too little memory, a NaN time) as a usage error."""
    from .runtime.js import check_limits

    try:
        if param.name == "memory_limit":
            check_limits(1.0, value)
        else:
            check_limits(value, 2**26)
    except ValueError as exc:
        # "memory_limit must be ..." -> "Invalid value for '--memory-limit': must be ..."
        raise click.BadParameter("must " + str(exc).split(" must ", 1)[1], ctx, param) from None
    return value


F = TypeVar("F", bound=Callable[..., Any])


def _caller_options(f: F) -> F:
    f = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        help="Give up on a call whose reply has not come within SECONDS, and on "
        "connecting after as long (default: wait as long as a call takes, and 10 s to "
        "connect).",
    )(f)
    f = click.option(
        "--key",
        "key_file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Sign every call with this key file (see `libvms keygen`); "
        "your user id is its public key.",
    )(f)
    f = click.option(
        "-u",
        "--user",
        help="Debug mode: call unsigned as this user id, which the server takes on trust.",
    )(f)
    return f


def _caller(user: str | None, key_file: Path | None) -> tuple[str | None, Keypair | None]:
    if user is not None and key_file is not None:
        raise click.UsageError("use either --user or --key, not both")
    if key_file is None:
        return user, None
    from .keys import Keypair

    with expected_errors():
        key = Keypair.load(key_file)
        if key_file.stat().st_mode & 0o077:
            click.echo(
                f"warning: {key_file} can be read by other users: `chmod 600 {key_file}`",
                err=True,
            )
        return None, key


class _ByteSize(click.ParamType):
    """A size in bytes: ``67108864``, ``64M``, ``512K``, ``1G`` (powers of 1024)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if match is None or int(match[1]) == 0:
            self.fail(f"{value!r} is not a size such as 67108864, 64M or 1G", param, ctx)
        return int(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")


class _Commands(click.Group):
    """The command group: Ctrl-C ends any command with :data:`EXIT_INTERRUPTED`.

    click would print "Aborted!" and exit 1, which for ``libvms verify`` means
    that verification failed.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            command = ctx.invoked_subcommand
            hint = ""
            if command in ("call", "repl"):
                hint = " (a call already sent may still run and be logged)"
            elif command == "verify":
                hint = ": the audit did not finish, nothing was decided"
            click.echo(f"interrupted{hint}", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="libvms")
def main() -> None:
    """Run cryptographically auditable VMs, call them and read their call logs.

    A VM is a JavaScript backend script whose exported functions are called over
    JSON-RPC. Every call goes into a signed, append-only call log that anyone can
    fetch, verify and replay.
    """


# -- exec ----------------------------------------------------------------------


def _read_script(script: Path) -> str:
    try:
        return script.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"cannot read script {script}: it is not UTF-8 text") from None
    except OSError as exc:
        raise CLIError(f"cannot read script {script}: {exc.strerror or exc}") from None


def _log_to_stderr() -> None:
    """Show the library's log (scripts' console output among it) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    library = logging.getLogger("libvms")
    library.addHandler(handler)
    library.setLevel(logging.INFO)


@contextlib.contextmanager
def _stop_signals() -> Iterator[asyncio.Event]:
    """An event that the first SIGINT or SIGTERM sets, from the moment this is entered.

    Entered before the banner is printed, so that whoever reads the banner may
    signal at once. The handlers are removed on leaving, so that a second Ctrl-C
    interrupts a slow shutdown. Where the loop cannot handle signals, Ctrl-C
    still raises KeyboardInterrupt as usual.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        yield stop
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _serve(
    code: str,
    *,
    host: str,
    port: int,
    data_dir: Path,
    title: str,
    call_timeout: float,
    memory_limit: int,
) -> None:
    from .rpc.protocol import HANDSHAKE, rpc_methods
    from .rpc.server import RPCServer
    from .vm import BackendVM

    vm = BackendVM(code, call_timeout=call_timeout, memory_limit=memory_limit)
    try:
        await vm.deploy(data_dir, title=title)
        server = RPCServer(vm, port=port, host=host)
        await server.start()
        try:
            with _stop_signals() as stopping:
                for warning in vm.warnings:
                    click.echo(f"warning: {warning}", err=True)
                click.echo(f"Serving at {server.url()}")
                click.echo(f"Data directory: {data_dir.resolve()}")
                click.echo(f"Call log URL: {vm.call_log.url}")
                click.echo(f"Files archive URL: {vm.files_archive.url}")
                methods = rpc_methods(vm.methods)
                click.echo(f"Methods: {', '.join(methods) or '(none)'}")
                if len(methods) < len(vm.methods):
                    click.echo(
                        f"warning: the script exports {HANDSHAKE!r}, which the protocol "
                        "answers itself: it cannot be called over RPC",
                        err=True,
                    )
                sys.stdout.flush()
                await stopping.wait()
        finally:
            await server.close()
    finally:
        await vm.close()


@main.command("exec")
@click.argument("script", type=click.Path(path_type=Path))
@click.option(
    "-p",
    "--port",
    type=click.IntRange(0, 65535),
    default=5555,
    show_default=True,
    help="TCP port to listen on; 0 picks a free one.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--dir",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Data directory of the VM's ledgers.  [default: ./<script name without extension>]",
)
@click.option("--title", help="Title of the files archive.  [default: '<script file name> files']")
@_limit_options("a call may run before it is aborted", "the script may use")
def exec_(
    script: Path,
    port: int,
    host: str,
    data_dir: Path | None,
    title: str | None,
    call_timeout: float,
    memory_limit: int,
) -> None:
    """Deploy SCRIPT as a VM and serve it over JSON-RPC on WebSocket.

    A data directory that already holds this script's VM is reopened: its
    ledgers are verified and the script's state is rebuilt by replaying the
    call log. The served URLs are printed, one per line; Ctrl-C or SIGTERM
    stops the server once the calls in progress are logged.
    """
    from .store import DB_FILENAME, Store
    from .vm import foreign_files

    code = _read_script(script)
    directory = data_dir if data_dir is not None else Path(script.stem)
    if (directory / DB_FILENAME).exists() and not Store.holds_nothing(directory):
        click.echo(f"Reopening {directory}: verifying it and replaying its call log", err=True)
    elif directory.exists():
        if not directory.is_dir():
            raise CLIError(f"{directory} is a file: give --dir a new or empty directory")
        others = foreign_files(directory)
        if others:
            raise CLIError(
                f"{directory} is not a VM's data directory (it holds {others[0]!r}): "
                "give --dir a new or empty directory"
            )
    _log_to_stderr()
    _run(
        _serve(
            code,
            host=host,
            port=port,
            data_dir=directory,
            title=title if title is not None else f"{script.name} files",
            call_timeout=call_timeout,
            memory_limit=memory_limit,
        )
    )


# -- call ----------------------------------------------------------------------


_VM_URL_SCHEMES = ("ws", "wss", "http", "https")


def _check_vm_url(url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed [IPv6 literal, for one
        parts = None
    if parts is None or parts.scheme.lower() not in _VM_URL_SCHEMES or not parts.netloc:
        raise CLIError(f"{url!r} is not a VM's URL such as ws://127.0.0.1:5555/")


@contextlib.asynccontextmanager
async def _connected(
    url: str, user: str | None, key: Keypair | None, timeout: float | None = None
) -> AsyncIterator[RPCClient]:

    _check_vm_url(url)
    client = _client(url, user, key, timeout)
    await client.connect()
    try:
        yield client
    except BaseException:
        # Timed out, interrupted or failed: a server still busy with the call
        # would keep the close handshake waiting.
        await client.close(wait=False)
        raise
    await client.close()


def _client(url: str, user: str | None, key: Keypair | None, timeout: float | None) -> RPCClient:
    """A client for ``call`` and ``repl``: ``--timeout`` bounds connecting too, since
    a server busy with a long call answers the handshake late."""
    from .rpc.client import RPCClient

    if timeout is None:
        return RPCClient(url, user=user, key=key)
    return RPCClient(url, user=user, key=key, call_timeout=timeout, connect_timeout=timeout)


def _check_method(client: RPCClient, method: str) -> None:
    methods = client.backend_info.methods
    if method not in methods:
        exported = ", ".join(methods) or "nothing"
        raise CLIError(f"the VM exports no method {method!r} (it exports: {exported})")


async def _call(
    url: str,
    method: str,
    args: list[Any],
    user: str | None,
    key: Keypair | None,
    receipts: list[dict[str, Any]],
    timeout: float | None = None,
) -> Any:
    """The call's result; its receipt, if any, is appended to ``receipts`` (also
    when the script threw: a failed call is logged, and receipted, too)."""
    async with _connected(url, user, key, timeout) as client:
        _check_method(client, method)
        try:
            return await client.call(method, *args)
        finally:
            if client.receipts:
                receipts.append(client.receipts[-1].to_dict())


def _save_receipt(file: Path, receipts: list[dict[str, Any]]) -> bool:
    """Write the call's receipt to ``file``; False (with a warning) if it cannot be."""
    if not receipts:
        return True
    try:
        file.write_text(json.dumps(receipts[-1], indent=2) + "\n")
    except OSError as exc:
        click.echo(
            f"warning: the call was logged, but its receipt could not be written to {file}: "
            f"{exc.strerror or exc}",
            err=True,
        )
        return False
    return True


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("url")
@click.argument("method")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@_caller_options
@click.option(
    "--save-receipt",
    "receipt_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --key: write the call's verified receipt to this file.",
)
def call(
    url: str,
    method: str,
    args: tuple[str, ...],
    user: str | None,
    key_file: Path | None,
    timeout: float | None,
    receipt_file: Path | None,
) -> None:
    """Call METHOD of the VM at URL once and print its result as JSON.

    Each of ARGS is passed as its JSON value when it parses as JSON (1, true,
    '"1"', '{"a": 1}'), else as a string. A method that returns nothing
    prints null. A script error prints `error: Name: message` and exits 1.
    """
    caller, key = _caller(user, key_file)
    values = [_parse_arg(a) for a in args]
    for text, value in zip(args, values, strict=True):
        # Negative numbers pass through click as arguments; anything else like an
        # option is more likely a mistyped option than a string meant for the VM.
        if text.startswith("-") and isinstance(value, str):
            raise click.UsageError(
                f"no such option: {text} (to pass it as a string, quote it as JSON: '\"{text}\"')"
            )
    if receipt_file is not None:
        if key is None:
            raise click.UsageError("--save-receipt needs a signed call (--key FILE)")
        folder = receipt_file.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            # Checked before the call: a call that is logged but whose receipt is
            # lost would tempt a retry, and the retry would run a second time.
            raise click.BadParameter(f"cannot write into {folder}", param_hint="'--save-receipt'")
    receipts: list[dict[str, Any]] = []
    try:
        result = _run(_call(url, method, values, caller, key, receipts, timeout))
    finally:
        saved = receipt_file is None or _save_receipt(receipt_file, receipts)
    click.echo(_dump(result))
    if not saved:
        sys.exit(EXIT_FAILURE)


# -- repl ----------------------------------------------------------------------


class _LoopThread:
    """An event loop running in a daemon thread.

    The prompt blocks in ``input()`` on the main thread, where Ctrl-C and
    readline work as usual, while the connection keeps answering the server's
    pings in this loop.
    """

    def __init__(self) -> None:
        self._loop = _new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="libvms-repl", daemon=True
        )

    def __enter__(self) -> _LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        import asyncio

        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise


class ReplSyntaxError(ValueError):
    """A REPL line that is neither a dot command nor a call."""


_IDENTIFIER = re.compile(r"[A-Za-z_$][\w$]*")
_CALL_FORM = re.compile(r"(?:await\s+)?(?:client\s*\.\s*)?([A-Za-z_$][\w$]*)\s*\(")


def _no_constant(name: str) -> Any:
    raise ReplSyntaxError(f"{name} is not a JSON value")


_JSON = json.JSONDecoder(strict=False, parse_constant=_no_constant)


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _single_quoted(text: str, i: int) -> tuple[str, int]:
    """The string literal in single quotes at ``text[i]``, with JSON's escapes."""
    out: list[str] = []
    j = i + 1
    while j < len(text):
        ch = text[j]
        if ch == "\\" and j + 1 < len(text):
            out.append("'" if text[j + 1] == "'" else text[j : j + 2])
            j += 2
        elif ch == "'":
            try:
                return json.loads('"' + "".join(out) + '"', strict=False), j + 1
            except ValueError:
                raise ReplSyntaxError(f"bad escape in the string at column {i + 1}") from None
        else:
            out.append('\\"' if ch == '"' else ch)
            j += 1
    raise ReplSyntaxError(f"the string at column {i + 1} is not closed")


def _items(text: str, i: int, close: str, item: Callable[[int], int]) -> int:
    """Parse ``item, item, ...`` up to ``close`` (a trailing comma is allowed)."""
    i = _skip_space(text, i)
    if text.startswith(close, i):
        return i + 1
    while True:
        i = _skip_space(text, item(_skip_space(text, i)))
        if text.startswith(",", i):
            i = _skip_space(text, i + 1)
            if text.startswith(close, i):
                return i + 1
        elif text.startswith(close, i):
            return i + 1
        else:
            raise ReplSyntaxError(f"expected ',' or '{close}' at column {i + 1}")


def _literal(text: str, i: int) -> tuple[Any, int]:
    """The value at ``text[i]``: JSON, plus 'single-quoted' strings and bare object keys."""
    if i >= len(text):
        raise ReplSyntaxError("a value is missing at the end of the line")
    ch = text[i]
    if ch == "'":
        return _single_quoted(text, i)
    if ch == "[":
        values: list[Any] = []

        def element(j: int) -> int:
            value, end = _literal(text, j)
            values.append(value)
            return end

        return values, _items(text, i + 1, "]", element)
    if ch == "{":
        obj: dict[str, Any] = {}

        def member(j: int) -> int:
            name = _IDENTIFIER.match(text, j)
            if name is not None:
                key, j = name[0], name.end()
            else:
                key, j = _literal(text, j)
                if not isinstance(key, str):
                    raise ReplSyntaxError(f"an object key must be a name or a string: {key!r}")
            j = _skip_space(text, j)
            if not text.startswith(":", j):
                raise ReplSyntaxError(f"expected ':' at column {j + 1}")
            obj[key], j = _literal(text, _skip_space(text, j + 1))
            return j

        return obj, _items(text, i + 1, "}", member)
    try:
        return _JSON.raw_decode(text, i)
    except ReplSyntaxError:
        raise
    except ValueError:
        raise ReplSyntaxError(f"cannot read a value at column {i + 1}: {text[i:]!r}") from None


def parse_repl_line(line: str) -> tuple[str, list[Any]]:
    """The method and arguments of a REPL call, in either of its forms.

    * ``foo 1 "x"``: shell-like words, each its JSON value when it is JSON, else
      a string (as ``libvms call`` takes its arguments);
    * ``foo(1, 'x')``, ``client.foo(1)`` or ``await client.foo(1)``: a call with
      JSON arguments, where strings may also be single-quoted and object keys
      bare names.
    """
    match = _CALL_FORM.match(line)
    if match is not None:
        args: list[Any] = []

        def argument(j: int) -> int:
            value, end = _literal(line, j)
            args.append(value)
            return end

        end = _items(line, match.end(), ")", argument)
        rest = line[end:].strip()
        if rest not in ("", ";"):
            raise ReplSyntaxError(f"unexpected {rest!r} after the call")
        return match[1], args
    text = line.rstrip()
    if text.endswith(";"):  # it may end the call, as in the call form
        text = text[:-1]
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ReplSyntaxError(str(exc)) from None
    if words and words[0] == "await":
        words = words[1:]
    if not words:
        raise ReplSyntaxError("nothing to call")
    method = words[0].removeprefix("client.")
    if _IDENTIFIER.fullmatch(method) is None:
        raise ReplSyntaxError(f"{words[0]!r} is not a method name")
    return method, [_parse_arg(word) for word in words[1:]]


REPL_HELP = """\
Call an exported method in either form:
  increment 2 "x"            words, each its JSON value when it is JSON, else a string
  await client.increment(2)  or increment(2, 'x'): a call with JSON arguments
                             ('single quotes' and bare object keys are accepted)
Commands:
  .methods   list the VM's exported methods
  .help      show this help
  .exit      leave (Ctrl-D too)"""

_DOT_COMMANDS = (".methods", ".help", ".exit")


def _history_file() -> Path:
    import platformdirs

    return platformdirs.user_state_path("libvms") / "repl_history"


def _setup_readline(words: Sequence[str]) -> Callable[[], None] | None:
    """Enable line editing, history and completion; returns the history saver."""
    try:
        import readline
    except ImportError:
        return None
    history = _history_file()
    with contextlib.suppress(OSError):
        readline.read_history_file(history)
    readline.set_history_length(1000)

    def complete(text: str, state: int) -> str | None:
        prefix = "client." if text.startswith("client.") else ""
        options = [prefix + w for w in words if (prefix + w).startswith(text)]
        return options[state] if state < len(options) else None

    readline.set_completer(complete)
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")

    def save() -> None:
        with contextlib.suppress(OSError):
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)

    return save


@dataclass
class _Repl:
    loop: _LoopThread
    client: RPCClient

    def execute(self, line: str) -> bool:
        """Run one line, printing its result; False once the user asked to leave.

        Raises :class:`CLIError` (or an expected error) when the line fails.
        """
        line = line.strip()
        if not line or line.startswith("//"):
            return True
        if line.startswith("."):
            command = line.split()[0]
            if command in (".exit", ".quit"):
                return False
            if command == ".methods":
                click.echo("\n".join(self.client.backend_info.methods) or "(no methods)")
            elif command == ".help":
                click.echo(REPL_HELP)
            else:
                raise CLIError(f"unknown command {command}: try .help")
            return True
        try:
            method, args = parse_repl_line(line)
        except ReplSyntaxError as exc:
            raise CLIError(f"cannot read the line: {exc}") from None
        _check_method(self.client, method)
        with expected_errors():
            result = self.loop.run(self.client.call(method, *args))
        click.echo(_dump(result))
        return True

    def interact(self) -> int:
        """Read lines until ``.exit`` or end of input; the exit code.

        When input is not a terminal (a piped script) no prompt is shown, and the
        exit code is 1 if any line failed.
        """
        interactive = sys.stdin.isatty()
        save_history = None
        if interactive:
            methods = self.client.backend_info.methods
            save_history = _setup_readline([*methods, *_DOT_COMMANDS])
            click.echo(f"Connected to {self.client.url} ({len(methods)} methods). Type .help.")
        failed = False
        try:
            while True:
                try:
                    line = input("libvms> " if interactive else "")
                except EOFError:
                    if interactive:
                        click.echo()
                    break
                except KeyboardInterrupt:
                    click.echo()
                    continue
                try:
                    if not self.execute(line):
                        break
                except KeyboardInterrupt:
                    click.echo("error: interrupted; the call may still be logged", err=True)
                except CLIError as exc:
                    failed = True
                    exc.show()
                    if not self.client.connected:
                        raise CLIError(f"the connection to {self.client.url} is lost") from None
        finally:
            if save_history is not None:
                save_history()
        return EXIT_FAILURE if failed and not interactive else 0


@main.command()
@click.argument("url")
@_caller_options
@click.option(
    "-e",
    "--eval",
    "expression",
    metavar="EXPR",
    help="Run EXPR (a call or a dot command), print its result and exit.",
)
def repl(
    url: str, user: str | None, key_file: Path | None, timeout: float | None, expression: str | None
) -> None:
    """Call the methods of the VM at URL from an interactive prompt.

    Type `increment 2` or `await client.increment(2)`; `.methods` lists the
    methods, `.help` shows the syntax and `.exit` (or Ctrl-D) leaves.
    """

    caller, key = _caller(user, key_file)
    with _LoopThread() as loop:
        _check_vm_url(url)
        client = _client(url, caller, key, timeout)
        with expected_errors():
            loop.run(client.connect())
        try:
            session = _Repl(loop, client)
            if expression is not None:
                session.execute(expression)
                code = 0
            else:
                code = session.interact()
        finally:
            loop.run(client.close())
    if code:
        sys.exit(code)


# -- keygen --------------------------------------------------------------------


@main.command()
@click.argument("file", default=DEFAULT_KEY_FILE, type=click.Path(dir_okay=False, path_type=Path))
def keygen(file: Path) -> None:
    """Create a user key in FILE (./libvms-user.key by default) and print its user id.

    The file is created with mode 0600 and an existing file is never
    overwritten. Sign calls with it using `--key FILE`.
    """
    from .keys import Keypair

    if not file.name:
        raise click.BadParameter("name a file to write the key to", param_hint="'FILE'")
    key = Keypair.generate()
    with expected_errors():
        key.save(file)
    click.echo(key.user_id)


# -- log -----------------------------------------------------------------------


@dataclass(frozen=True)
class _LogSlice:
    url: str
    length: int
    start: int
    entries: list[bytes]
    public_key: bytes  # the call log's: signed calls are bound to it


def _is_url(source: str) -> bool:
    return "://" in source or source.startswith("libvms:")


async def _open_log(source: str) -> CallLog:
    """The call log at ``source``: a data directory, a VM's URL or a call log URL."""
    from . import remote
    from .keys import parse_ledger_url
    from .log import CallLog

    if not _is_url(source):
        if not Path(source).is_dir():
            raise CLIError(f"{source} is neither a data directory nor a URL")
        return await CallLog.open(source)
    url = source
    if "#" not in url and not url.startswith("libvms:"):
        # A VM's URL: its server names its call log.
        async with _connected(url, None, None) as client:
            url = client.backend_info.call_log_url
    try:
        location, _ = parse_ledger_url(url)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if location is None:
        raise CLIError(f"{url} names a call log but not where to fetch it")
    return await remote.fetch_call_log(url)


async def _read_log(source: str, start: int, end: int | None, tail: int | None) -> _LogSlice:
    log = await _open_log(source)
    try:
        last = log.length if end is None else min(end, log.length)
        first = min(start, last)
        if tail is not None:
            first = max(first, last - tail)
        entries = [await log.get_raw(seq) for seq in range(first, last)]
        return _LogSlice(log.url, log.length, first, entries, log.public_key)
    finally:
        await log.close()


def _short(text: str, limit: int) -> str:
    """``text`` on one line, its runs of white space made one space, shown as
    :func:`_visible` shows it, cut to ``limit`` characters."""
    text = _visible(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _visible(text: str) -> str:
    """``text`` with each character a terminal would not print as itself written as
    an escape (``\\x1b``, ``\\u200b``): control and format characters, separators.

    A log's strings come from its callers: printed raw, one could move the cursor,
    clear or recolour the screen, or hide characters from the auditor reading it.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    point = ord(char)
    if point < 0x100:
        return f"\\x{point:02x}"
    return f"\\u{point:04x}" if point < 0x10000 else f"\\U{point:08x}"


def _signed_cell(entry: dict[str, Any], seq: int, log_key: bytes) -> Text:
    """The signed column: "yes" for a call whose signature verifies, "FORGED" for one
    that claims a signature that does not; empty for a debug-mode id (a claim)."""
    from rich.text import Text

    from .signed import verify_call_entry

    try:
        signed = verify_call_entry(entry, log_key, index=seq)
    except LibVMSError:
        return Text("FORGED", style="bold red")
    return Text("yes" if signed is not None else "")


def _user_cell(user: object) -> str:
    """The user column: the id as logged, quoted when white space begins or ends it,
    so that ``" ed25519:..."`` (a debug-mode name) never reads as a signed user."""
    if not isinstance(user, str):
        return ""
    shown = _visible(user)
    if user != user.strip() or not user:
        shown = f'"{shown}"'
    return shown if len(shown) <= 24 else shown[:23] + "…"


def _outcome(entry: dict[str, Any]) -> tuple[str, str]:
    """The result cell of an entry and its style."""
    if entry.get("type") == "init":
        code = entry.get("code")
        size = len(code.encode("utf-8")) if isinstance(code, str) else 0
        return f"script of {size} bytes", "dim"
    result = entry.get("result")
    if not isinstance(result, dict):
        return "", ""
    if "err" in result:
        err = result["err"]
        if isinstance(err, dict) and "name" in err and "message" in err:
            text = f"{err['name']}: {err['message']}"
        else:
            text = _dump(err)
        prefix = "aborted" if result.get("aborted") else "error"
        return f"{prefix}: {text}", "red"
    return (_dump(result["res"]), "") if "res" in result else ("", "")


def _print_table(view: _LogSlice) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not console.is_terminal:
        # Piped output is read by people and greps, not squeezed into 80 columns.
        console.width = max(console.width, 160)
    end = view.start + len(view.entries)
    span = f"entries {view.start}–{end - 1}" if view.entries else "no entries"
    table = Table(title=f"call log {view.url}", caption=f"{span} of {view.length}")
    columns = ("#", "type", "user", "signed", "method", "args", "result / err", "filesVersion")
    for name in columns:
        numeric = name in ("#", "filesVersion")
        table.add_column(
            name, justify="right" if numeric else "left", no_wrap=True, overflow="ellipsis"
        )
    for seq, raw in enumerate(view.entries, start=view.start):
        entry = encoding.parse(raw)
        if not isinstance(entry, dict):
            table.add_row(str(seq), "?", "", "", "", "", Text(_short(_dump(entry), 40)), "")
            continue
        call = entry.get("call")
        call = call if isinstance(call, dict) else {}
        result = entry.get("result")
        result = result if isinstance(result, dict) else {}
        user = call.get("userId")
        args = call.get("args")
        outcome, style = _outcome(entry)
        version = result.get("filesVersion")
        table.add_row(
            str(seq),
            Text(_short(str(entry.get("type", "?")), 8)),
            Text(_user_cell(user)),
            _signed_cell(entry, seq, view.public_key),
            Text(_short(str(call.get("methodName", "")), 30)),
            Text(_short(_dump(args), 40) if args is not None else ""),
            Text(_short(outcome, 48), style=style),
            str(version) if version is not None else "",
        )
    console.print(table)


@main.command("log")
@click.argument("source", metavar="URL_OR_DIR")
@click.option(
    "--start",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Index of the first entry.",
)
@click.option(
    "--end",
    type=click.IntRange(min=0),
    help="Index after the last entry.  [default: the log's length]",
)
@click.option(
    "--tail",
    type=click.IntRange(min=1),
    metavar="N",
    help="Only the last N entries (of those --start and --end select).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print each entry as canonical JSON, one per line."
)
def log_(source: str, start: int, end: int | None, tail: int | None, as_json: bool) -> None:
    """Print the entries of a call log.

    URL_OR_DIR is a VM's data directory, a VM's URL (ws://host:port/, whose
    server names its call log) or a call log URL (http://host:port/log#key).
    Fetched entries are verified against the call log's key, and a directory
    against its signed checkpoint, before anything is printed.
    """
    view = _run(_read_log(source, start, end, tail))
    if as_json:
        for raw in view.entries:
            click.echo(raw.decode("utf-8"))
    else:
        _print_table(view)


# -- verify, evidence, receipt -------------------------------------------------

EXIT_COULD_NOT_AUDIT = 2


class CouldNotAudit(CLIError):
    """The audit could not run: unreachable, not a libvms server, bad arguments."""

    exit_code = EXIT_COULD_NOT_AUDIT


_PHASES = {"fetch": "Fetching and verifying ledgers", "replay": "Replaying calls"}


def _print_report(report: AuditReport) -> None:
    click.echo(report.verdict)
    for problem in report.problems[1:]:
        click.echo(f"  also ({problem.kind}): {problem.message}")
    for warning in report.warnings:
        click.echo(f"  warning: {warning}")
    if report.oracle_entries:
        shown = ", ".join(str(i) for i in report.oracle_entries[:20])
        more = " ..." if len(report.oracle_entries) > 20 else ""
        click.echo(
            f"  note: {len(report.oracle_entries)} entries depend on oracle results, which "
            f"replay takes from the log as trusted inputs: {shown}{more}"
        )


async def _verify(
    url: str,
    state_dir: Path | None,
    pin_key: str | None,
    follow: bool,
    quiet: bool,
    max_outage: float,
    limits: dict[str, Any],
    following: list[bool],
) -> AuditReport:
    """The audit of ``verify``; with ``follow``, the monitor after a first verdict,
    announced by appending to ``following``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    from .verifier import Auditor

    try:
        _check_vm_url(url)
    except CLIError as exc:
        raise CouldNotAudit(exc.message) from None
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def tick(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(_PHASES.get(phase, phase), total=total)
            progress.update(tasks[phase], completed=done, total=total)

        auditor = Auditor(url, state_dir=state_dir, pin_key=pin_key, progress=tick, **limits)
        try:
            report = await auditor.run()
        except BaseException:
            await auditor.close()
            raise
    if not follow or not report.ok:
        await auditor.close()
        return report
    if not quiet:
        _print_report(report)
    following.append(True)

    def batch(report: AuditReport, added: int) -> None:
        if not quiet:
            checkpoint = report.checkpoint or {}
            click.echo(
                f"Verified {added} new entries: {report.entries - 1} calls up to checkpoint "
                f"{checkpoint.get('size')}/{str(checkpoint.get('root'))[:12]}"
            )

    def outage(event: Outage) -> None:
        # On stderr even with --json, whose final report lists the outages too.
        retries = f"{event.retries} {'retry' if event.retries == 1 else 'retries'}"
        if event.recovered:
            message = f"Reachable again after {event.duration:.1f} s ({retries})"
        elif event.next_retry is None:
            return  # giving up: the error itself is the last line
        elif event.retries == 0:
            message = (
                f"Cannot reach the VM: {event.error}; retrying in {event.next_retry:.1f} s "
                f"(giving up after {max_outage:g} s)"
            )
        else:
            message = (
                f"Still unreachable after {event.duration:.1f} s ({retries}); "
                f"retrying in {event.next_retry:.1f} s"
            )
        click.echo(message, err=True)

    try:
        return await auditor.follow(batch, max_outage=max_outage, on_outage=outage)
    finally:
        await auditor.close()


class _DeferredDefault(click.Option):
    """An option whose default is a function's result, shown as such in ``--help``.

    The function runs only when the default is needed or shown, so it may import
    what is slow to import; click would show such a default as "(dynamic)".
    """

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        return super().get_default(ctx, call=True)


def _default_max_outage() -> float:
    """The default of ``libvms verify --max-outage``: the auditor's."""
    from .verifier import DEFAULT_MAX_OUTAGE

    return DEFAULT_MAX_OUTAGE


def _default_signature_window() -> float:
    """The default of ``libvms verify --signature-window``: the server's, in seconds."""
    from .signed import DEFAULT_WINDOW_MS

    return DEFAULT_WINDOW_MS / 1000


def _check_given_key(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse a ``--key`` that names no call log key as a usage error, before connecting."""
    from .verifier import call_log_key_given

    if value is not None:
        try:
            call_log_key_given(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return value


def _write_evidence(file: Path | None, found: Evidence | None) -> None:
    """Write ``found`` to ``file``; a file that cannot be written is a warning only,
    so that the finding's exit code stands."""
    if file is None or found is None:
        return
    try:
        file.write_text(found.to_json())
    except OSError as exc:
        click.echo(f"warning: cannot write evidence to {file}: {exc.strerror or exc}", err=True)
        return
    click.echo(f"Evidence written to {file} (check it with: libvms evidence check)")


@main.command()
@click.argument("url")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where pinned keys and verified checkpoints are kept.  [default: per-user data dir]",
)
@click.option(
    "--key",
    "pin_key",
    metavar="KEY",
    callback=_check_given_key,
    help="The call log key to require instead of trust on first use: the call log's "
    "URL as `libvms exec` prints it (http://...#<key>), libvms:<key>, the key alone, "
    "or its verifier key (name+id+key).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--follow", is_flag=True, help="Stay on as a live monitor of new calls.")
@click.option(
    "--max-outage",
    cls=_DeferredDefault,
    type=click.FloatRange(min=0),
    default=_default_max_outage,
    show_default=True,
    metavar="SECONDS",
    help="With --follow: how long to keep retrying a server that stops answering "
    "before exiting 2 (0: exit at once).",
)
@click.option(
    "--evidence",
    "evidence_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="When the host is caught, write self-contained evidence to this file.",
)
@_limit_options(
    "a replayed call may run (raise it for a host with a higher limit or a faster machine)",
    "a replayed call may use (raise it for a host with a higher limit)",
)
@click.option(
    "--signature-window",
    cls=_DeferredDefault,
    type=click.FloatRange(min=0, min_open=True),
    default=_default_signature_window,
    show_default=True,
    metavar="SECONDS",
    help="The host's signature window (a signed request may be logged up to twice it "
    "after its time).",
)
def verify(
    url: str,
    state_dir: Path | None,
    pin_key: str | None,
    as_json: bool,
    follow: bool,
    max_outage: float,
    evidence_file: Path | None,
    call_timeout: float,
    memory_limit: int,
    signature_window: float,
) -> None:
    """Audit the VM at URL: fetch both ledgers, verify them, replay every call, compare.

    Exits 0 when verified, 1 when verification failed (tampering, a fork, a
    mismatch), 2 when the audit could not run (unreachable, not a libvms
    server, bad arguments). With --follow it keeps verifying new calls and
    exits 1 at the first problem; when the server stops answering it retries
    (0.5 s, doubling up to 30 s between attempts, each shown on stderr) and
    exits 2 only once the outage has lasted --max-outage seconds. When the
    server is back, following goes on with every check, from the last
    checkpoint verified. A call whose replay runs past --call-timeout or
    --memory-limit, which the host's run did not, cannot be decided: exit 2.
    """
    limits = {
        "call_timeout": call_timeout,
        "memory_limit": memory_limit,
        "signature_window_ms": round(signature_window * 1000),
    }
    following: list[bool] = []
    try:
        report = _run(
            _verify(url, state_dir, pin_key, follow, as_json, max_outage, limits, following),
            error=CouldNotAudit,
        )
    except KeyboardInterrupt:
        if not following:
            raise  # before the first verdict: nothing was decided
        sys.exit(0)  # a monitor stopped: everything it reported was verified
    if as_json:
        click.echo(report.to_json())
    else:
        _print_report(report)
    _write_evidence(evidence_file, report.evidence)
    sys.exit(0 if report.ok else EXIT_FAILURE)


@main.group()
def evidence() -> None:
    """Check evidence files written by `libvms verify --evidence`."""


@evidence.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_limit_options(
    "the replayed call may run (replay evidence)", "the replayed call may use (replay evidence)"
)
def evidence_check(file: Path, call_timeout: float, memory_limit: int) -> None:
    """Verify an evidence FILE offline and print what it proves.

    Exits 0 when it proves the host misbehaved, 1 when it proves nothing, and
    2 when the file itself is unreadable or does not verify. Replay evidence
    whose replay runs past --call-timeout or --memory-limit proves nothing.
    """
    from .evidence import Evidence
    from .evidence import check as check_evidence

    async def run() -> Finding:
        return await check_evidence(
            Evidence.from_json(file.read_bytes()),
            call_timeout=call_timeout,
            memory_limit=memory_limit,
        )

    finding = _run(run(), error=CouldNotAudit)
    click.echo(("PROVEN: " if finding.proven else "not proven: ") + finding.statement)
    sys.exit(0 if finding.proven else EXIT_FAILURE)


@main.group()
def receipt() -> None:
    """Check receipts kept from signed calls (`libvms call --save-receipt`)."""


@receipt.command("check")
@click.argument("receipt_file", metavar="RECEIPT", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("url")
@click.option(
    "--evidence",
    "evidence_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="When the entry is gone or changed, write fork evidence to this file.",
)
def receipt_check(receipt_file: Path, url: str, evidence_file: Path | None) -> None:
    """Check that the call a RECEIPT proves is still, unchanged, in the VM's log at URL.

    Exits 0 when it is, 1 when the log no longer holds it, 2 when the check
    could not run (unreadable receipt, unreachable VM).
    """
    from .signed import CallReceipt
    from .verifier import check_receipt

    async def run() -> ReceiptCheck:
        try:
            fields = json.loads(receipt_file.read_text())
        except ValueError as exc:
            raise LibVMSError(f"{receipt_file} is not a receipt file: {exc}") from exc
        return await check_receipt(CallReceipt.from_wire(fields), url)

    result = _run(run(), error=CouldNotAudit)
    click.echo(("OK: " if result.ok else "FAILED: ") + result.message)
    _write_evidence(evidence_file, result.evidence)
    sys.exit(0 if result.ok else EXIT_FAILURE)


if __name__ == "__main__":
    main(prog_name="libvms")
