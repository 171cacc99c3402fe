"""Verifier: compare a VM's ledgers with a replay of them.

``compare_logs`` and ``compare_archives`` are the seed's two checks. Entries
compare by their canonical bytes; no field is exempt, because an honest replay
reproduces every one of them (the replay copies the logged inputs and
recomputes the results).
"""

from __future__ import annotations

from typing import Any

from . import encoding
from .archive import FilesArchive
from .errors import VerificationError
from .log import CallLog
from .vm import compare_entry


class Verifier:
    """The seed's ``Verifier``: static comparisons that raise :class:`VerificationError`."""

    @staticmethod
    async def compare_logs(a: CallLog, b: CallLog) -> None:
        """Raise unless both logs hold the same entries, byte for byte.

        The error names the first differing entry, the field that differs and
        both values (``expected`` from ``a``, ``found`` from ``b``).
        """
        common = min(a.length, b.length)
        step = 1000
        for start in range(0, common, step):
            end = min(common, start + step)
            left = a.ledger.raw_range(start, end)
            right = b.ledger.raw_range(start, end)
            for offset, (x, y) in enumerate(zip(left, right, strict=True)):
                if x != y:
                    compare_entry(start + offset, x, encoding.parse(y))
        if a.length != b.length:
            raise VerificationError(
                f"the logs differ in length: {a.length} vs {b.length} entries",
                index=common,
                field="length",
                expected=a.length,
                found=b.length,
            )

    @staticmethod
    async def compare_archives(a: FilesArchive, b: FilesArchive) -> None:
        """Raise unless both archives hold the same files at the same version.

        The error names the first differing path (in sorted order) and what
        differs there: presence, kind, or content hash.
        """
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


def _describe(stat: Any) -> str:
    if stat is None:
        return "absent"
    if stat.kind == "dir":
        return "directory"
    return f"file sha256:{stat.hash}"
