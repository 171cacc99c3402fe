"""Data altered or cut short between the host and the auditor.

A :class:`LyingProxy` stands in front of an honest server: it answers the
handshake with the server's own data (same keys, ledger URLs pointing at itself)
and relays the ledgers, changing them on the way. Whatever it sends must either
verify against the keys or make the audit fail: the report says ``tamper`` for
data that arrived and does not verify (``libvms verify`` exits 1), and the audit
raises :class:`ConnectError` when nothing usable arrived at all (exit 2).
"""

import pytest

from libvms.errors import ConnectError
from libvms.rpc import RPCClient, RPCServer
from libvms.verifier import Verifier
from libvms.vm import BackendVM

from .dishonest import LyingProxy, flip_byte

SCRIPT = """
exports.note = async (path, text) => { await System.files.writeFile(path, text); return path }
"""


@pytest.fixture
async def upstream(tmp_path):
    vm = BackendVM(SCRIPT)
    await vm.deploy(tmp_path / "vm")
    async with RPCServer(vm, port=0) as server:
        async with RPCClient(server.url(), user="alice") as client:
            for i in range(20):
                await client.note(f"/file-{i}", f"content number {i}")
        yield server
    await vm.close()


async def audit_through(proxy, tmp_path):
    return await Verifier.audit(proxy.url(), state_dir=tmp_path / "auditor")


def when(target):
    """Matches the relayed paths that contain ``target``."""
    return lambda path: target in path


def tampering(target, change=flip_byte):
    """Applies ``change`` to the bodies of the relayed paths that contain ``target``."""
    return lambda path, body: change(body) if target in path else body


async def test_honest_relay_passes(upstream, tmp_path):
    async with LyingProxy(upstream.http_url()) as proxy:
        report = await audit_through(proxy, tmp_path)
        assert report.ok, report.to_json()
        # The audit really went through the proxy.
        assert "/log/entries" in proxy.relayed
        assert any(p.startswith("/files/blobs/") for p in proxy.relayed)


@pytest.mark.parametrize(
    "target",
    ["/log/entries", "/files/entries", "/log/checkpoint", "/files/checkpoint", "/files/blobs/"],
)
async def test_flipped_byte_in_a_download_is_tamper(upstream, tmp_path, target):
    async with LyingProxy(upstream.http_url(), tamper=tampering(target)) as proxy:
        report = await audit_through(proxy, tmp_path)
    assert not report.ok
    assert [p.kind for p in report.problems] == ["tamper"], report.to_json()


async def test_value_changed_in_transit_that_stays_canonical_is_tamper(upstream, tmp_path):
    # One digit of one path changed: the page still parses, but no longer hashes
    # to the signed checkpoint.
    def change(body):
        at = body.index(b"/file-7") + len(b"/file-")
        return flip_byte(body, at)

    async with LyingProxy(upstream.http_url(), tamper=tampering("/log/entries", change)) as proxy:
        report = await audit_through(proxy, tmp_path)
    assert [p.kind for p in report.problems] == ["tamper"], report.to_json()
    assert "do not hash to the signed checkpoint" in report.problems[0].message


@pytest.mark.parametrize("target", ["/log/entries", "/files/entries"])
async def test_entries_page_cut_short_is_tamper(upstream, tmp_path, target):
    # A complete HTTP response whose body stops in the middle of an entry.
    tamper = tampering(target, lambda body: body[: len(body) // 2])
    async with LyingProxy(upstream.http_url(), tamper=tamper) as proxy:
        report = await audit_through(proxy, tmp_path)
    assert [p.kind for p in report.problems] == ["tamper"], report.to_json()


async def test_entries_page_missing_its_last_entry_is_tamper(upstream, tmp_path):
    # Whole entries left out: the client asks again from where the page stopped,
    # and a page that never brings the log to its signed size fails.
    def drop_last(body):
        lines = body.split(b"\n")[:-1]
        return b"".join(line + b"\n" for line in lines[:-1])

    async with LyingProxy(
        upstream.http_url(), tamper=tampering("/log/entries", drop_last)
    ) as proxy:
        report = await audit_through(proxy, tmp_path)
    assert [p.kind for p in report.problems] == ["tamper"], report.to_json()


async def test_connection_cut_in_the_middle_of_a_body_cannot_be_audited(upstream, tmp_path):
    # The response announces its full length, then the connection drops half-way:
    # a network failure, which proves nothing about the host.
    async with LyingProxy(upstream.http_url(), cut=when("/log/entries")) as proxy:
        with pytest.raises(ConnectError, match="broke off"):
            await audit_through(proxy, tmp_path)


async def test_connection_dropped_before_any_answer_cannot_be_audited(upstream, tmp_path):
    async with LyingProxy(upstream.http_url(), refuse=when("/log/entries")) as proxy:
        with pytest.raises(ConnectError):
            await audit_through(proxy, tmp_path)
