"""Verifier: compare a VM's ledgers with a replay of them.

``compare_logs`` and ``compare_archives`` are the seed's two checks. Entries
compare by their canonical bytes; no field is exempt, because an honest replay
reproduces every one of them (the replay copies the logged inputs and
recomputes the results).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs

from . import encoding
from .archive import ArchiveView, FilesArchive
from .checkpoint import open_checkpoint
from .errors import ConnectError, LibVMSError, TamperError, VerificationError
from .evidence import Evidence, fork_evidence, key_of, replay_evidence
from .keys import VerifierKey, ledger_url, parse_ledger_url
from .ledger import Ledger
from .log import CallLog
from .remote import fetch_call_log, fetch_files_archive, http_timeout, refresh
from .rpc import protocol
from .rpc.protocol import BackendInfo
from .signed import DEFAULT_WINDOW_MS, CallReceipt, verify_call_entry
from .vm import BackendVM, ReplayStats, compare_entry, differences, runtime_warnings

if TYPE_CHECKING:
    import aiohttp

#: How long, in seconds, :meth:`Auditor.follow` keeps retrying a server it cannot
#: reach before giving up (``libvms verify --follow --max-outage``).
DEFAULT_MAX_OUTAGE = 300.0

#: The first wait before retrying an unreachable server, in seconds; it doubles
#: after each failed retry, up to :data:`MAX_RETRY_DELAY`.
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0


class Verifier:
    """The seed's ``Verifier``: static comparisons that raise :class:`VerificationError`."""

    @staticmethod
    async def compare_logs(a: CallLog, b: CallLog) -> None:
        """Raise unless both logs hold the same entries, byte for byte.

        The error names the first differing entry, the field that differs and
        both values (``expected`` from ``a``, ``found`` from ``b``).
        """
        common = min(a.length, b.length)
        differing = _first_difference(a.ledger, b.ledger, 0, common)
        if differing is not None:
            seq, x, y = differing
            compare_entry(seq, x, encoding.parse(y))
        if a.length != b.length:
            raise VerificationError(
                f"the logs differ in length: {a.length} vs {b.length} entries",
                index=common,
                field="length",
                expected=a.length,
                found=b.length,
            )

    @staticmethod
    async def audit(
        url: str,
        *,
        state_dir: str | Path | None = None,
        pin_key: str | None = None,
        follow: bool = False,
        on_batch: Callable[[AuditReport, int], None] | None = None,
        progress: Progress | None = None,
        max_outage: float | None = DEFAULT_MAX_OUTAGE,
        on_outage: Callable[[Outage], None] | None = None,
        call_timeout: float = 5.0,
        memory_limit: int = 64 * 2**20,
        signature_window_ms: int = DEFAULT_WINDOW_MS,
    ) -> AuditReport:
        """Audit the VM served at ``url`` (``ws://...``): fetch, verify, replay, compare.

        Raises :class:`~libvms.errors.ConnectError` when the VM cannot be reached
        or is not a libvms server, and :class:`~libvms.errors.ReplayLimitError`
        when a call's replay runs past ``call_timeout`` or ``memory_limit``
        (which proves nothing about the host: audit again with the host's limits);
        every finding about the VM itself is in the report. ``signature_window_ms``
        is the host's (``RPCServer(signature_window_ms=...)``). With ``follow``,
        keeps monitoring new batches until a problem appears (``on_batch`` is
        told of each verified one), riding out outages of the server of up to
        ``max_outage`` seconds (``None`` or 0: none; see :meth:`Auditor.follow`).
        """
        auditor = Auditor(
            url,
            state_dir=state_dir,
            pin_key=pin_key,
            progress=progress,
            call_timeout=call_timeout,
            memory_limit=memory_limit,
            signature_window_ms=signature_window_ms,
        )
        try:
            report = await auditor.run()
            if follow and report.ok:
                report = await auditor.follow(
                    on_batch or (lambda _r, _n: None),
                    max_outage=max_outage,
                    on_outage=on_outage,
                )
            return report
        finally:
            await auditor.close()

    @staticmethod
    async def compare_archives(a: FilesArchive, b: FilesArchive) -> None:
        """Raise unless both archives hold the same files at the same version, with
        the same history.

        The error names the first differing path (in sorted order) and what
        differs there: presence, kind, or content hash; or, for the same files
        with another history, the first differing entry.
        """
        _compare_files(a, b)
        _compare_history(a.ledger, b.ledger)


def _compare_files(a: FilesArchive | ArchiveView, b: FilesArchive | ArchiveView) -> None:
    """The files and version half of :meth:`Verifier.compare_archives`."""
    if a.state_root != b.state_root:
        files_a, files_b = a.files(), b.files()
        for path in sorted(set(files_a) | set(files_b)):
            x, y = files_a.get(path), files_b.get(path)
            if x is None or y is None or x.kind != y.kind or x.hash != y.hash:
                raise VerificationError(
                    f"archives differ at {path}: {_describe(x)} vs {_describe(y)}",
                    path=path,
                    field="content",
                    expected=_describe(x),
                    found=_describe(y),
                )
        raise VerificationError(
            "archive state roots differ",
            field="stateRoot",
            expected=a.state_root,
            found=b.state_root,
        )
    if a.version != b.version:
        raise VerificationError(
            f"archives hold the same files but differ in version: {a.version} vs {b.version}",
            field="version",
            expected=a.version,
            found=b.version,
        )


def _compare_history(a: Ledger, b: Ledger, start: int = 1, end: int | None = None) -> None:
    """Raise unless two archive ledgers hold the same mutations from entry ``start``
    to ``end`` (default: ``a``'s length, which must then be ``b``'s too).

    The same files at the same version can still hide another history: other
    mtimes, another order, a version whose content no call wrote. Entry 0, the
    genesis, holds only the title, which a replay may not know (older logs).
    """
    differing = _first_difference(a, b, max(start, 1), a.length if end is None else end)
    if differing is None:
        return
    seq, x, y = differing
    expected, found = encoding.parse(x), encoding.parse(y)
    where, one, other = next(differences(expected, found), ("entry", expected, found))
    raise VerificationError(
        f"archives hold the same files at the same version, but their histories differ at "
        f"entry {seq} ({where}): {one!r} vs {other!r}",
        index=seq,
        field=f"history.{where}",
        expected=expected,
        found=found,
    )


def _first_difference(
    a: Ledger, b: Ledger, start: int, end: int
) -> tuple[int, bytes, bytes] | None:
    """The first index in ``start..end-1`` where two ledgers' entries differ, with
    both entries' bytes; read a thousand at a time."""
    for base in range(start, end, 1000):
        stop = min(end, base + 1000)
        pairs = zip(a.raw_range(base, stop), b.raw_range(base, stop), strict=True)
        for seq, (x, y) in enumerate(pairs, base):
            if x != y:
                return seq, x, y
    return None


def _describe(stat: Any) -> str:
    if stat is None:
        return "absent"
    if stat.kind == "dir":
        return "directory"
    return f"file sha256:{stat.hash}"


# -- the audit ---------------------------------------------------------------------

#: Problem kinds, from the most to the least fundamental.
PROBLEM_KINDS = (
    "key-changed",  # the VM's keys are not the ones pinned for this URL
    "tamper",  # fetched data does not verify against its key and checkpoint
    "fork",  # the log rewrote history it signed before (evidence available)
    "rollback",  # the log is shorter than a checkpoint it signed before
    "signature",  # a signed call's signature or nonce does not verify
    "assertion",  # the init entry or the script's methods are not what the server announced
    "replay-mismatch",  # replay computes a different entry (evidence available)
    "archive-mismatch",  # the files archive differs from what the calls produced
)


@dataclass
class Problem:
    """One thing an audit found wrong: its kind and exactly where.

    ``expected``/``found``: for ``replay-mismatch`` the logged and the replayed
    value; for ``archive-mismatch`` what the logged calls produce and what the
    host serves; for ``fork``, ``rollback`` and ``key-changed`` what was
    verified or pinned before and what is served now.
    """

    kind: str
    message: str
    index: int | None = None
    path: str | None = None
    field: str | None = None
    expected: Any = None
    found: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Outage:
    """A time a following auditor could not reach the server, as it stands so far.

    ``error`` is the last transport failure, ``retries`` how many retries have
    failed, ``duration`` the seconds since the first failure, ``next_retry`` the
    wait before the next attempt (``None`` once the outage is over: ``recovered``
    says whether the server answered again or the auditor gave up).
    """

    error: str
    started_at: str
    retries: int = 0
    duration: float = 0.0
    next_retry: float | None = None
    recovered: bool = False
    _started: float = field(default=0.0, repr=False, compare=False)
    _delay: float = field(default=FIRST_RETRY_DELAY, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "startedAt": self.started_at,
            "duration": round(self.duration, 3),
            "retries": self.retries,
            "recovered": self.recovered,
            "lastError": self.error,
        }


@dataclass
class AuditReport:
    """The outcome of :meth:`Verifier.audit`. ``ok`` only when nothing is wrong."""

    url: str
    entries: int = 0
    checkpoint: dict[str, Any] | None = None
    files_checkpoint: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    oracle_entries: list[int] = field(default_factory=list)
    aborted_entries: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    evidence: Evidence | None = None
    outages: list[Outage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checkpoint is not None and not self.problems

    @property
    def verdict(self) -> str:
        """One line for a person: what was verified, or the first problem in plain words."""
        if self.ok and self.checkpoint is not None:
            calls = max(self.entries - 1, 0)
            return (
                f"Verified {calls} {'call' if calls == 1 else 'calls'} up to checkpoint "
                f"{self.checkpoint['size']}/{self.checkpoint['root'][:12]}"
            )
        if self.problems:
            return f"FAILED ({self.problems[0].kind}): {self.problems[0].message}"
        return "FAILED: nothing was verified"

    def to_json(self) -> str:
        obj = {
            "url": self.url,
            "ok": self.ok,
            "verdict": self.verdict,
            "entries": self.entries,
            "checkpoint": self.checkpoint,
            "filesCheckpoint": self.files_checkpoint,
            "problems": [p.to_dict() for p in self.problems],
            "warnings": self.warnings,
            "oracleEntries": self.oracle_entries,
            "abortedEntries": self.aborted_entries,
            "timings": self.timings,
            "outages": [o.to_dict() for o in self.outages],
        }
        return json.dumps(obj, indent=2, default=repr)


#: How many times an auditor fetches the log and the archive again, in turn, to
#: catch a busy host's two ledgers at one state before comparing them.
_CATCH_UP_ROUNDS = 4


def _checkpoint_summary(ledger: Ledger) -> dict[str, Any]:
    """A report's account of a ledger's latest signed checkpoint: size, root, note."""
    note = ledger.checkpoint_text
    checkpoint = open_checkpoint(note, ledger.verifier)
    return {"size": checkpoint.size, "root": checkpoint.root_hash.hex(), "note": note}


def _archive_message(exc: VerificationError) -> str:
    if exc.path is not None:
        return (
            f"the files archive is not what the logged calls produced: at {exc.path} the "
            f"host serves {exc.expected}, the calls produce {exc.found}"
        )
    return f"the files archive is not what the logged calls produced: {exc}"


def default_state_dir() -> Path:
    """Where an auditor remembers pinned keys and the last checkpoints it verified."""
    return Path(platformdirs.user_data_dir("libvms")) / "audits"


class _AuditState:
    """Pins (trust on first use) by VM URL, and the last verified checkpoint by log key."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _path(self, kind: str, name: str) -> Path:
        return self.dir / f"{kind}-{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def _write(self, path: Path, value: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=2))
        tmp.replace(path)

    def pins(self, url: str) -> dict[str, Any] | None:
        return self._read(self.pin_file(url))

    def pin_file(self, url: str) -> Path:
        """The file that holds ``url``'s pinned keys."""
        return self._path("pin", url)

    def pin(self, url: str, call_log_key: str, files_archive_key: str) -> None:
        value = {"url": url, "callLogKey": call_log_key, "filesArchiveKey": files_archive_key}
        self._write(self._path("pin", url), value)

    def last_checkpoint(self, log_key: str, which: str) -> str | None:
        state = self._read(self._path("log", log_key)) or {}
        note = state.get(which)
        return note if isinstance(note, str) else None

    def save(self, log_key: str, which: str, note: str) -> None:
        path = self._path("log", log_key)
        state = self._read(path) or {"key": log_key}
        state[which] = note
        self._write(path, state)


Progress = Callable[[str, int, int], None]


def call_log_key_given(text: str) -> bytes:
    """The call log public key named by ``text``, in any form libvms shows it.

    The call log's URL (``http://host/log#<key>``, as ``libvms exec`` prints
    it), its ``libvms:<key>`` origin, the base64url key alone, or its signed-note
    verifier key (``<name>+<key id>+<base64>``). Raises :class:`ValueError` for
    anything else.
    """
    text = text.strip()
    try:
        if text.count("+") >= 2 and "://" not in text:
            return VerifierKey.parse(text).public_key
        if ":" in text:
            return parse_ledger_url(text)[1]
        return parse_ledger_url(f"libvms:{text}")[1]
    except ValueError:
        raise ValueError(
            f"{text!r} names no call log key: give the call log's URL (http://...#<key>), "
            "libvms:<key>, the key alone, or its verifier key"
        ) from None


class Auditor:
    """The audit workflow, readable top to bottom; kept alive by ``--follow``.

    1. connect and learn the ledgers' URLs and keys (pinned on first use);
    2. fetch both ledgers, verifying every entry against signed checkpoints,
       and check the log against the last checkpoint this auditor verified;
    3. verify every signed call's signature and nonce uniqueness;
    4. replay the log in a fresh sandbox, comparing each entry as produced;
    5. compare the fetched archive with the replayed one.
    """

    def __init__(
        self,
        url: str,
        *,
        state_dir: str | Path | None = None,
        pin_key: str | None = None,
        progress: Progress | None = None,
        call_timeout: float = 5.0,
        memory_limit: int = 64 * 2**20,
        signature_window_ms: int = DEFAULT_WINDOW_MS,
    ) -> None:
        self.url = url
        #: The host's signature window: a signed request's time may be up to twice
        #: it from its entry's timestamp (the window, and as much again queued).
        self.signature_window_ms = signature_window_ms
        self.state = _AuditState(Path(state_dir) if state_dir else default_state_dir())
        self.pin_key = pin_key
        self._given_key = None if pin_key is None else call_log_key_given(pin_key)
        self.progress = progress
        self.call_timeout = call_timeout
        self.memory_limit = memory_limit
        self.info: BackendInfo | None = None
        self.log: CallLog | None = None
        self.archive: FilesArchive | None = None
        self.replay: BackendVM | None = None
        self.report = AuditReport(url)
        self._stats = ReplayStats()
        self._history_compared = 1  # archive entries found equal to the replay's
        self._nonces: dict[tuple[str, str], int] = {}
        self._last_timestamp = 0
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        # One HTTP session for the auditor's life: a follower polls often.
        if self._http is None:
            import aiohttp  # only auditors of a server need the HTTP client

            self._http = aiohttp.ClientSession(timeout=http_timeout())
        return self._http

    def _tick(self, phase: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, done, total)

    async def run(self) -> AuditReport:
        """The full audit. Raises :class:`ConnectError` when the VM cannot be audited at all."""
        report = self.report
        started = time.perf_counter()
        info = await self._connect()
        if not self._check_pins(info):
            return report
        phase = time.perf_counter()
        try:
            self._tick("fetch", 0, 2)
            self.log = await fetch_call_log(info.call_log_url, session=self._session())
            self._tick("fetch", 1, 2)
            self.archive = await fetch_files_archive(
                info.files_archive_url, session=self._session()
            )
            self._tick("fetch", 2, 2)
        except TamperError as exc:
            report.problems.append(Problem("tamper", f"fetched data does not verify: {exc}"))
            return report
        report.timings["fetch"] = time.perf_counter() - phase
        if not self._check_history():
            return report
        phase = time.perf_counter()
        self._verify_signatures(0)
        report.timings["signatures"] = time.perf_counter() - phase
        if report.problems:
            return report
        phase = time.perf_counter()
        await self._replay()
        report.timings["replay"] = time.perf_counter() - phase
        if not report.problems:
            await self._compare_archive()
        report.timings["total"] = time.perf_counter() - started
        self._finish()
        return report

    async def _connect(self) -> BackendInfo:
        from .rpc.client import RPCClient

        async with RPCClient(self.url) as client:
            self.info = client.backend_info
        return self.info

    def _check_pins(self, info: BackendInfo) -> bool:
        pinned = self.state.pins(self.url)
        if self._given_key is not None:
            if self._given_key != info.call_log_public_key:
                self.report.problems.append(
                    Problem(
                        "key-changed",
                        "the call log key is not the one given to check it against",
                        field="callLogKey",
                        expected=self.pin_key,
                        found=info.call_log_key,
                    )
                )
                return False
        elif pinned is not None:
            # Trust on first use: the keys seen at the first audit of this URL.
            where = (
                f"pinned for this URL at its first audit (in {self.state.pin_file(self.url)}; "
                "remove that file only if the VM was replaced on purpose)"
            )
            for field, found in (
                ("callLogKey", info.call_log_key),
                ("filesArchiveKey", info.files_archive_key),
            ):
                if pinned.get(field) != found:
                    what = "call log" if field == "callLogKey" else "files archive"
                    self.report.problems.append(
                        Problem(
                            "key-changed",
                            f"the {what} key is not the one {where}",
                            field=field,
                            expected=pinned.get(field),
                            found=found,
                        )
                    )
                    return False
        if pinned is None:
            self.state.pin(self.url, info.call_log_key, info.files_archive_key)
        return True

    def _check_history(self) -> bool:
        """Compare the fetched ledgers with the last checkpoints this auditor verified."""
        assert self.log is not None and self.archive is not None
        report = self.report
        for which, ledger in (("log", self.log.ledger), ("files", self.archive.ledger)):
            summary = _checkpoint_summary(ledger)
            if which == "log":
                report.checkpoint = summary
                report.entries = summary["size"]
            else:
                report.files_checkpoint = summary
            previous = self.state.last_checkpoint(ledger.verifier.to_text(), which)
            if previous is not None:
                self._compare_with(previous, ledger, which)
        return not report.problems

    def _compare_with(self, previous: str, ledger: Ledger, which: str) -> None:
        """Report a rollback or fork of ``ledger`` against a checkpoint verified before."""
        report = self.report
        try:
            before = open_checkpoint(previous, ledger.verifier)
        except TamperError:
            report.warnings.append(f"ignored an unreadable saved {which} checkpoint")
            return
        name = "call log" if which == "log" else "files archive"
        size = ledger.tree.size
        if before.size > size:
            report.problems.append(
                Problem(
                    "rollback",
                    f"the {name} has {size} entries but this auditor verified a signed "
                    f"checkpoint of {before.size} before",
                    field="size",
                    expected=before.size,
                    found=size,
                )
            )
        elif ledger.tree.root(before.size) != before.root_hash:
            message = (
                f"the {name} rewrote its history: its first {before.size} entries no longer "
                "match the checkpoint this auditor verified before"
            )
            report.problems.append(
                Problem(
                    "fork",
                    message,
                    field="root",
                    expected=before.root_hash.hex(),
                    found=ledger.tree.root(before.size).hex(),
                )
            )
            report.evidence = fork_evidence(previous, ledger.checkpoint_text, ledger.tree, message)

    def _verify_signatures(self, start: int) -> None:
        assert self.log is not None
        ledger = self.log.ledger
        for seq, raw in enumerate(ledger.raw_range(start, ledger.length), start):
            entry = encoding.parse_verified(raw)
            call = entry.get("call") if isinstance(entry, dict) else None
            if isinstance(call, dict) and "signed" in call:
                # The signed bytes re-encode the arguments, so they are read as the
                # signer and the server read them: whole numbers past 2^53 as the
                # doubles they are (the fast parse leaves them Python ints).
                entry = encoding.parse(raw)
            try:
                # A host accepts a signed request only within the signature window
                # of its time; one logged later was held back or replayed.
                signed = verify_call_entry(
                    entry, ledger.public_key, index=seq, max_skew_ms=2 * self.signature_window_ms
                )
            except TamperError as exc:
                self.report.problems.append(Problem("signature", str(exc), index=seq))
                return
            if signed is not None:
                key = (entry["call"]["userId"], signed.nonce)
                first = self._nonces.setdefault(key, seq)
                if first != seq:
                    self.report.problems.append(
                        Problem(
                            "signature",
                            f"entries {first} and {seq} hold the same signed request (a replay)",
                            index=seq,
                            field="call.signed.nonce",
                            found=signed.nonce,
                        )
                    )
                    return
            if not self._check_order(seq, entry):
                return

    def _check_order(self, seq: int, entry: Any) -> bool:
        """Timestamps never decrease along the log; a host that reorders calls breaks that."""
        call = entry.get("call") if seq else entry
        timestamp = call.get("timestamp") if isinstance(call, dict) else None
        if type(timestamp) is not int:
            return True
        if timestamp < self._last_timestamp:
            self.report.problems.append(
                Problem(
                    "replay-mismatch",
                    f"entry {seq} is timestamped before the entry preceding it",
                    index=seq,
                    field="call.timestamp",
                    expected=self._last_timestamp,
                    found=timestamp,
                )
            )
            return False
        self._last_timestamp = timestamp
        return True

    async def _replay(self) -> None:
        assert self.log is not None and self.info is not None
        total = self.log.length

        def progress(done: int, _total: int) -> None:
            self._tick("replay", done, total)

        # Said whatever the replay finds: a mismatch under another runtime may
        # be the runtime's, not the host's.
        self.report.warnings.extend(runtime_warnings(await self.log.get(0)))
        try:
            self.replay = await BackendVM.from_call_log(
                self.log,
                self.info,
                check=True,
                progress=progress,
                stats=self._stats,
                call_timeout=self.call_timeout,
                memory_limit=self.memory_limit,
            )
        except VerificationError as exc:
            self._replay_problem(exc)
            return
        announced, exported = list(self.info.methods), protocol.rpc_methods(self.replay.methods)
        if announced != exported:
            self.report.problems.append(
                Problem(
                    "assertion",
                    f"the server announces the methods {announced}, but the logged script "
                    f"exports {exported} for calls",
                    field="methods",
                    expected=exported,
                    found=announced,
                )
            )

    def _replay_problem(self, exc: VerificationError) -> None:
        assert self.log is not None
        kind = "assertion" if exc.index == 0 else "replay-mismatch"
        problem = Problem(
            kind, str(exc), index=exc.index, field=exc.field, expected=exc.expected, found=exc.found
        )
        self.report.problems.append(problem)
        if kind == "replay-mismatch" and exc.index is not None:
            ledger = self.log.ledger
            self.report.evidence = replay_evidence(
                ledger.checkpoint_text,
                ledger.raw_range(0, ledger.length),
                exc.index,
                summary=str(exc),
            )

    async def _compare_archive(self) -> None:
        """Compare the fetched archive with the replay's, at the version the log reached."""
        assert self.archive is not None and self.replay is not None and self.log is not None
        replayed = self.replay.files_archive
        # The archive is always fetched after the log, and each commit writes both
        # ledgers: an honest archive is never behind the fetched log. A busy
        # host's may be ahead, holding the changes of calls the fetched log does
        # not; the log fetched once more holds those calls (and maybe more).
        last = "files"  # which ledger was fetched last: the archive, after the log
        for _ in range(_CATCH_UP_ROUNDS):
            if self.archive.version > replayed.version and last == "files":
                await self._catch_up(("log",))
                last = "log"
            elif self.archive.version < replayed.version and last == "log":
                # Calls landed while the log was fetched again: fetch the archive
                # again too, so that it covers them.
                await self._catch_up(("files",))
                last = "files"
            else:
                break
            if self.report.problems:
                return
        fetched: Any = self.archive
        try:
            if fetched.version > replayed.version and last == "files":
                # Still chasing a busy host after a few rounds: compare the two at
                # the version both reached; the rest is compared by the next audit,
                # or by a follower once the log holds those calls.
                _compare_files(await fetched.checkout(replayed.version), replayed)
                end = replayed.version
            elif fetched.version < replayed.version and last == "log":
                _compare_files(fetched, await replayed.checkout(fetched.version))
                end = fetched.version
            else:
                # Otherwise the versions must be equal (an archive fetched after the
                # log cannot lag it, nor lead the log fetched after it); if not, the
                # first differing path, or the versions, say how.
                _compare_files(fetched, replayed)
                end = fetched.version
            # Entries compared before are held under verified checkpoints: a
            # follower compares only what each batch added.
            _compare_history(fetched.ledger, replayed.ledger, self._history_compared, end)
            self._history_compared = end
            # The genesis (not compared above) holds the title, which logs since the
            # init entry's filesArchiveTitle name, and scripts see through getInfo.
            title = self.log.ledger.get(0).get("filesArchiveTitle")
            if isinstance(title, str) and title != fetched.title:
                raise VerificationError(
                    f"the archive's title is {fetched.title!r}, the call log's init "
                    f"entry names {title!r}",
                    index=0,
                    field="history.title",
                    expected=fetched.title,
                    found=title,
                )
        except VerificationError as exc:
            self.report.problems.append(
                Problem(
                    "archive-mismatch",
                    _archive_message(exc),
                    index=exc.index,
                    path=exc.path,
                    field=exc.field,
                    expected=exc.found,
                    found=exc.expected,
                )
            )

    async def _catch_up(self, ledgers: tuple[str, ...] = ("log", "files")) -> int:
        """Fetch what the ledgers gained since (both, or only ``("log",)``), verify
        it and replay it.

        Returns how many entries the ledgers gained together. A new
        checkpoint that does not extend the one held is examined with a fresh
        download: a fork or rollback with evidence if the host signed it, a
        ``tamper`` problem if the data does not verify at all.
        """
        assert self.log is not None and self.archive is not None and self.replay is not None
        added = 0
        for which in ledgers:
            copy: CallLog | FilesArchive = self.log if which == "log" else self.archive
            try:
                added += await refresh(copy, session=self._session())
            except TamperError as exc:
                await self._examine_divergence(copy, which, exc)
                return added
        new_calls = self.log.length - self.replay.call_log.length
        if new_calls:
            self._verify_signatures(self.replay.call_log.length)
            if self.report.problems:
                return added
            try:
                await self.replay.replay_more(self.log, check=True, stats=self._stats)
            except VerificationError as exc:
                self._replay_problem(exc)
        return added

    async def _examine_divergence(
        self, copy: CallLog | FilesArchive, which: str, error: TamperError
    ) -> None:
        held = copy.ledger.checkpoint_text
        location = copy.location
        assert location is not None
        url = ledger_url(copy.ledger.public_key, location)
        try:
            fresh: CallLog | FilesArchive = await (
                fetch_call_log(url, session=self._session())
                if which == "log"
                else fetch_files_archive(url, session=self._session())
            )
        except TamperError as exc:
            self.report.problems.append(Problem("tamper", f"fetched data does not verify: {exc}"))
            return
        except ConnectError as exc:
            # What the server sent did not verify: that stands, even if it cannot
            # be asked again to tell a fork from a corrupt answer.
            self.report.problems.append(
                Problem(
                    "tamper",
                    f"the new checkpoint could not be verified: {error} (fetching the "
                    f"{'call log' if which == 'log' else 'files archive'} again to look "
                    f"for a fork failed: {exc})",
                )
            )
            return
        try:
            self._compare_with(held, fresh.ledger, which)
        finally:
            await fresh.close()
        if not self.report.problems:
            self.report.problems.append(
                Problem("tamper", f"the new checkpoint could not be verified: {error}")
            )

    def _finish(self) -> None:
        assert self.log is not None and self.archive is not None
        report = self.report
        report.oracle_entries = list(self._stats.oracle_entries)
        report.aborted_entries = list(self._stats.aborted_entries)
        note = self.log.ledger.checkpoint_text
        report.checkpoint = _checkpoint_summary(self.log.ledger)
        report.entries = report.checkpoint["size"]
        report.files_checkpoint = _checkpoint_summary(self.archive.ledger)
        if not any(
            p.kind in ("fork", "rollback", "key-changed", "tamper") for p in report.problems
        ):
            self.state.save(self.log.ledger.verifier.to_text(), "log", note)
            self.state.save(
                self.archive.ledger.verifier.to_text(), "files", self.archive.ledger.checkpoint_text
            )

    async def follow(
        self,
        on_batch: Callable[[AuditReport, int], None],
        poll_interval: float = 0.05,
        *,
        max_outage: float | None = DEFAULT_MAX_OUTAGE,
        on_outage: Callable[[Outage], None] | None = None,
        retry_delay: float = FIRST_RETRY_DELAY,
        max_retry_delay: float = MAX_RETRY_DELAY,
    ) -> AuditReport:
        """Stay as a live monitor after :meth:`run`: verify and replay each new batch.

        Returns the report when a problem is found (cancel the task to stop).

        A server that cannot be reached (:class:`ConnectError`: refused, reset,
        timed out, an HTTP error) is an outage, not a finding: the auditor
        retries after ``retry_delay`` seconds, doubling the wait after each
        failure up to ``max_retry_delay``, and ``on_outage`` is told of each
        failure, then of the recovery. Once the server answers, following goes
        on from the checkpoints held, with every check. An outage longer than
        ``max_outage`` seconds (``None`` or 0: none at all) raises
        :class:`ConnectError`. Anything the server answers that does not verify
        ends the follow at once, outage or not; each outage is listed in
        ``report.outages``.
        """
        assert self.log is not None and self.archive is not None
        baseline = self._held()
        outage: Outage | None = None
        while self.report.ok:
            added = 0
            compared = False
            try:
                await self._catch_up()
                added = self._held() - baseline
                assert self.replay is not None
                pending = self._history_compared < self.replay.files_archive.version
                if (added or pending) and not self.report.problems:
                    compared = True
                    await self._compare_archive()
            except ConnectError as exc:
                if self.report.problems:
                    break
                outage = await self._wait_out(
                    outage, exc, max_outage, retry_delay, max_retry_delay, on_outage
                )
                continue
            if outage is not None:
                outage.duration = time.monotonic() - outage._started
                outage.next_retry = None
                outage.recovered = True
                if on_outage is not None:
                    on_outage(outage)
                outage = None
            if self.report.problems:
                if compared:
                    self._finish()  # the report names the checkpoints it found them at
                break  # a batch with a problem is not a verified one: no on_batch
            if added:
                self._finish()
                baseline = self._held()
                on_batch(self.report, added)
            else:
                await asyncio.sleep(poll_interval)
        return self.report

    def _held(self) -> int:
        """Entries held in both ledgers together: what a batch is counted against."""
        assert self.log is not None and self.archive is not None
        return self.log.length + self.archive.ledger.length

    async def _wait_out(
        self,
        outage: Outage | None,
        exc: ConnectError,
        max_outage: float | None,
        retry_delay: float,
        max_retry_delay: float,
        on_outage: Callable[[Outage], None] | None,
    ) -> Outage:
        """Record a failed attempt at reaching the server, then wait before the next one.

        Raises :class:`ConnectError` once the outage has lasted ``max_outage``.
        """
        limit = max_outage or 0.0
        if limit <= 0:
            raise exc
        now = time.monotonic()
        message = " ".join(str(exc).split()) or type(exc).__name__
        if outage is None:
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            outage = Outage(message, started, _started=now, _delay=retry_delay)
            self.report.outages.append(outage)
        else:
            outage.retries += 1
            outage.error = message
        outage.duration = now - outage._started
        remaining = limit - outage.duration
        if remaining <= 0:
            outage.next_retry = None
            if on_outage is not None:
                on_outage(outage)
            retries = f"{outage.retries} {'retry' if outage.retries == 1 else 'retries'}"
            raise ConnectError(
                f"gave up following {self.url}: unreachable for {outage.duration:.1f} s "
                f"({retries}), longer than the {limit:g} s allowed; last error: {message}"
            ) from exc
        wait = min(outage._delay, remaining)
        outage._delay = min(outage._delay * 2, max_retry_delay)
        outage.next_retry = wait
        if on_outage is not None:
            on_outage(outage)
        await asyncio.sleep(wait)
        return outage

    async def close(self) -> None:
        for item in (self.replay, self.log, self.archive):
            if item is not None:
                await item.close()
        if self._http is not None:
            await self._http.close()


@dataclass
class ReceiptCheck:
    """What :func:`check_receipt` found: whether the receipt's entry is still in the log."""

    ok: bool
    message: str
    evidence: Evidence | None = None


async def check_receipt(receipt: CallReceipt, url: str) -> ReceiptCheck:
    """Check that a receipt a client kept is included, unchanged, in the VM's current log.

    ``url`` is the VM's ``ws://`` URL or its call log URL. The receipt's
    checkpoint must be a prefix of the current log (its root equals the
    current tree's root at that size), which also fixes the entry at the
    receipt's index. When it is not, the result carries fork evidence: the
    receipt's signed checkpoint, the current one, and the consistency proof.
    Raises :class:`TamperError` if the receipt itself does not verify.
    """
    key = key_of(receipt.proof.checkpoint)
    promised = receipt.verify(key)
    if url.startswith(("ws://", "wss://")) or "#" not in url:
        # A VM's address (ws://, or http:// as the other commands take it); a call
        # log URL names its key after '#'.
        from .rpc.client import RPCClient

        async with RPCClient(url) as client:
            url = client.backend_info.call_log_url
    try:
        log = await fetch_call_log(url)
    except ValueError as exc:
        raise LibVMSError(f"{url} is not a VM or call log URL: {exc}") from None
    try:
        if log.public_key != key.public_key:
            return ReceiptCheck(False, "the URL serves a different call log than the receipt's")
        note = log.ledger.checkpoint_text
        if log.length < promised.size:
            return ReceiptCheck(
                False,
                f"the log has {log.length} entries, fewer than the {promised.size} its receipt "
                "checkpoint signed",
            )
        if log.ledger.tree.root(promised.size) == promised.root_hash:
            return ReceiptCheck(
                True,
                f"entry {receipt.index} is in the current log ({log.length} entries), unchanged",
            )
        message = (
            f"the log no longer holds entry {receipt.index} as the receipt shows: its first "
            f"{promised.size} entries differ from the receipt's signed checkpoint"
        )
        evidence = fork_evidence(receipt.proof.checkpoint, note, log.ledger.tree, message)
        return ReceiptCheck(False, message, evidence)
    finally:
        await log.close()
