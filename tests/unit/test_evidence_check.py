"""Evidence that must not prove anything against an honest host."""

import os

from libvms import merkle
from libvms.checkpoint import Checkpoint, sign_checkpoint
from libvms.evidence import Evidence, check, fork_evidence, replay_evidence
from libvms.keys import Keypair, ledger_url
from libvms.vm import BackendVM


def _signed(keypair, size, root):
    return sign_checkpoint(Checkpoint(ledger_url(keypair.public_key), size, root), keypair)


async def test_a_size_0_checkpoint_is_a_prefix_of_any_log():
    # No consistency proof binds the root of an empty prefix: whatever prefix root
    # the evidence claims, two honest checkpoints prove no fork.
    keypair = Keypair.generate()
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(3)]
    empty = _signed(keypair, 0, merkle.EMPTY_ROOT)
    full = _signed(keypair, 3, merkle.root_of(leaves))
    for prefix_root in (os.urandom(32), merkle.EMPTY_ROOT):
        evidence = Evidence("fork", (empty, full), proof=(), prefix_root=prefix_root)
        finding = await check(Evidence.from_json(evidence.to_json()))
        assert not finding.proven, finding.statement
    # A signed size-0 checkpoint whose root is not the empty tree's is a lie itself.
    bogus = _signed(keypair, 0, os.urandom(32))
    finding = await check(fork_evidence(bogus, full))
    assert finding.proven and "size 0" in finding.statement


LIMIT_SCRIPT = "exports.big = (mib) => 'x'.repeat(mib * 1024 * 1024).length\n"


async def test_a_replay_past_the_checkers_limits_proves_nothing():
    # The host ran with a higher memory limit than the checker's default: the call
    # is honest, and a replay that runs out of memory says nothing about it.
    vm = BackendVM(LIMIT_SCRIPT, memory_limit=256 * 2**20)
    await vm.deploy(None)
    assert await vm.execute_call("big", [96]) == 96 * 2**20
    ledger = vm.call_log.ledger
    evidence = replay_evidence(ledger.checkpoint_text, ledger.raw_range(0, 2), 1, "")
    finding = await check(evidence)
    assert not finding.proven
    assert "cannot decide" in finding.statement and "MemoryLimitExceeded" in finding.statement
    # With the host's limit, the replay decides it: the host was honest.
    finding = await check(evidence, memory_limit=256 * 2**20)
    assert not finding.proven and "replays exactly" in finding.statement
    await vm.close()
