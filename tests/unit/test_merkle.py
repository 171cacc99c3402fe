"""Tests for libvms.merkle against a naive RFC 9162 §2.1 reference and known vectors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvms.errors import TamperError
from libvms.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    MerkleMap,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_inclusion,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# ---------------------------------------------------------------------------
# Naive reference, written straight from the recursive definitions of RFC 9162 §2.1.
# ---------------------------------------------------------------------------


def ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def ref_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def largest_power_of_two_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


class Naive:
    """MTH, PATH and PROOF/SUBPROOF over a list D of leaf hashes (RFC 9162 §2.1.1-2.1.4).

    Ranges are half-open [lo, hi) into D; MTH results are memoised so that checking every
    position of a tree stays cheap, but the definitions are the recursive ones.
    """

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.d = list(leaves)
        self._mth: dict[tuple[int, int], bytes] = {}

    def mth(self, lo: int, hi: int) -> bytes:
        n = hi - lo
        if n == 0:
            return hashlib.sha256(b"").digest()
        if n == 1:
            return self.d[lo]
        key = (lo, hi)
        if key not in self._mth:
            k = largest_power_of_two_below(n)
            self._mth[key] = ref_node(self.mth(lo, lo + k), self.mth(lo + k, hi))
        return self._mth[key]

    def root(self, n: int) -> bytes:
        return self.mth(0, n)

    def path(self, m: int, n: int) -> list[bytes]:
        return self._path(m, 0, n)

    def _path(self, m: int, lo: int, hi: int) -> list[bytes]:
        n = hi - lo
        if n == 1:
            return []
        k = largest_power_of_two_below(n)
        if m < k:
            return [*self._path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self._path(m - k, lo + k, hi), self.mth(lo, lo + k)]

    def proof(self, m: int, n: int) -> list[bytes]:
        assert 0 < m < n
        return self._subproof(m, 0, n, True)

    def _subproof(self, m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        n = hi - lo
        if m == n:
            return [] if b else [self.mth(lo, hi)]
        k = largest_power_of_two_below(n)
        if m <= k:
            return [*self._subproof(m, lo, lo + k, b), self.mth(lo + k, hi)]
        return [*self._subproof(m - k, lo + k, hi, False), self.mth(lo, lo + k)]


# ---------------------------------------------------------------------------
# Helpers and strategies
# ---------------------------------------------------------------------------


def distinct_leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [ref_leaf(salt + i.to_bytes(4, "big")) for i in range(n)]


def flip(value: bytes, bit: int) -> bytes:
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def flipped_variants(proof: list[bytes]) -> Iterator[list[bytes]]:
    """Every proof that differs from ``proof`` in exactly one bit."""
    for i, element in enumerate(proof):
        for bit in range(8 * len(element)):
            yield [*proof[:i], flip(element, bit), *proof[i + 1 :]]


def swapped_variants(proof: list[bytes]) -> Iterator[list[bytes]]:
    """Every proof obtained by swapping two of its (distinct) elements."""
    for i in range(len(proof)):
        for j in range(i + 1, len(proof)):
            if proof[i] != proof[j]:
                swapped = list(proof)
                swapped[i], swapped[j] = swapped[j], swapped[i]
                yield swapped


def length_variants(proof: list[bytes], extra: bytes) -> Iterator[list[bytes]]:
    """The proof one element too short (either end) and one element too long (either end)."""
    if proof:
        yield proof[:-1]
        yield proof[1:]
    yield [*proof, extra]
    yield [extra, *proof]


def rejects(check: Callable[..., object], *args: object) -> None:
    """``check(*args)`` must raise :class:`TamperError`."""
    with pytest.raises(TamperError):
        check(*args)


# Sizes spread evenly over 0..70 (plain st.lists favours short lists); duplicates allowed.
leaf_lists = (
    st.integers(0, 70)
    .flatmap(lambda n: st.lists(st.binary(max_size=12), min_size=n, max_size=n))
    .map(lambda ds: [ref_leaf(d) for d in ds])
)
salts = st.binary(min_size=1, max_size=8)


def hsettings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


# ---------------------------------------------------------------------------
# Hash primitives and known vectors
# ---------------------------------------------------------------------------

CT_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]

CT_ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}


def test_hash_primitives() -> None:
    assert HASH_SIZE == 32
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    left, right = b"L" * 32, b"R" * 32
    assert node_hash(left, right) == hashlib.sha256(b"\x01" + left + right).digest()
    assert node_hash(left, right) != node_hash(right, left)
    assert hashlib.sha256(b"").digest() == EMPTY_ROOT
    # Domain separation: a leaf never hashes like a node over the same bytes.
    assert leaf_hash(left + right) != node_hash(left, right)


def test_empty_tree() -> None:
    tree = MerkleTree()
    assert tree.size == 0
    assert tree.root() == tree.root(0) == EMPTY_ROOT == root_of([])
    assert tree.consistency_proof(0) == []
    assert MerkleTree.from_leaf_hashes([]).root() == EMPTY_ROOT


@pytest.mark.parametrize("size", sorted(CT_ROOTS))
def test_ct_vector_roots(size: int) -> None:
    hashes = [leaf_hash(d) for d in CT_LEAVES]
    expected = bytes.fromhex(CT_ROOTS[size])
    assert root_of(hashes[:size]) == expected
    assert MerkleTree.from_leaf_hashes(hashes).root(size) == expected
    assert MerkleTree.from_leaf_hashes(hashes[:size]).root() == expected
    incremental = MerkleTree()
    for h in hashes[:size]:
        incremental.append(h)
    assert incremental.root() == expected
    assert Naive(hashes).root(size) == expected


def test_ct_vector_proofs_all_pairs() -> None:
    hashes = [leaf_hash(d) for d in CT_LEAVES]
    tree = MerkleTree.from_leaf_hashes(hashes)
    naive = Naive(hashes)
    for size in range(1, 9):
        root = bytes.fromhex(CT_ROOTS[size])
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert proof == naive.path(index, size)
            verify_inclusion(hashes[index], index, size, proof, root)
            assert root_from_inclusion(hashes[index], index, size, proof) == root
        for old in range(1, size):
            proof = tree.consistency_proof(old, size)
            assert proof == naive.proof(old, size)
            verify_consistency(old, size, bytes.fromhex(CT_ROOTS[old]), root, proof)


def test_rfc9162_example() -> None:
    """The worked example of RFC 9162 §2.1.5 (7 leaves, nodes named a..l)."""
    d = [f"d{i}".encode() for i in range(7)]
    a, b, c, dd, e, f, j = (leaf_hash(x) for x in d)
    g, h, i = node_hash(a, b), node_hash(c, dd), node_hash(e, f)
    k, l_ = node_hash(g, h), node_hash(i, j)
    root = node_hash(k, l_)
    hash0, hash1, hash2 = node_hash(g, c), k, node_hash(k, i)

    tree = MerkleTree.from_leaf_hashes(leaf_hash(x) for x in d)
    assert tree.root() == root
    assert tree.root(3) == hash0
    assert tree.root(4) == hash1
    assert tree.root(6) == hash2

    assert tree.inclusion_proof(0) == [b, h, l_]
    assert tree.inclusion_proof(3) == [c, g, l_]
    assert tree.inclusion_proof(4) == [f, j, k]
    assert tree.inclusion_proof(6) == [i, k]
    for index, path in [(0, [b, h, l_]), (3, [c, g, l_]), (4, [f, j, k]), (6, [i, k])]:
        verify_inclusion(leaf_hash(d[index]), index, 7, path, root)

    assert tree.consistency_proof(3) == [c, dd, g, l_]
    assert tree.consistency_proof(4) == [l_]
    assert tree.consistency_proof(6) == [i, j, k]
    verify_consistency(3, 7, hash0, root, [c, dd, g, l_])
    verify_consistency(4, 7, hash1, root, [l_])
    verify_consistency(6, 7, hash2, root, [i, j, k])


# ---------------------------------------------------------------------------
# Agreement with the naive reference
# ---------------------------------------------------------------------------


def test_every_position_up_to_70_matches_naive() -> None:
    """Proof shapes depend only on (index, size): one 70-leaf tree covers every shape."""
    hashes = distinct_leaves(70)
    tree = MerkleTree.from_leaf_hashes(hashes)
    naive = Naive(hashes)
    roots = [naive.root(n) for n in range(71)]
    for size in range(71):
        assert tree.root(size) == roots[size]
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert proof == naive.path(index, size)
            verify_inclusion(hashes[index], index, size, proof, roots[size])
        for old in range(1, size):
            proof = tree.consistency_proof(old, size)
            assert proof == naive.proof(old, size)
            verify_consistency(old, size, roots[old], roots[size], proof)
        assert tree.consistency_proof(0, size) == []
        assert tree.consistency_proof(size, size) == []
        verify_consistency(0, size, EMPTY_ROOT, roots[size], [])
        verify_consistency(size, size, roots[size], roots[size], [])


@hsettings(60)
@given(hashes=leaf_lists, data=st.data())
def test_random_trees_match_naive(hashes: list[bytes], data: st.DataObject) -> None:
    tree = MerkleTree.from_leaf_hashes(hashes)
    naive = Naive(hashes)
    n = len(hashes)
    assert tree.size == n
    assert tree.root() == root_of(hashes) == naive.root(n)
    for k in range(n + 1):
        assert tree.root(k) == naive.root(k) == root_of(hashes[:k])
    for index in range(n):
        assert tree.leaf(index) == hashes[index]
        proof = tree.inclusion_proof(index)
        assert proof == naive.path(index, n)
        verify_inclusion(hashes[index], index, n, proof, naive.root(n))
    for old in range(1, n):
        proof = tree.consistency_proof(old)
        assert proof == naive.proof(old, n)
        verify_consistency(old, n, naive.root(old), naive.root(n), proof)
    if n:
        size = data.draw(st.integers(1, n), label="size")
        index = data.draw(st.integers(0, size - 1), label="index")
        proof = tree.inclusion_proof(index, size)
        assert proof == naive.path(index, size)
        verify_inclusion(hashes[index], index, size, proof, naive.root(size))
        old = data.draw(st.integers(0, size), label="old")
        proof = tree.consistency_proof(old, size)
        assert proof == (naive.proof(old, size) if 0 < old < size else [])
        verify_consistency(old, size, naive.root(old), naive.root(size), proof)


@hsettings(12)
@given(n=st.integers(71, 3000), salt=salts, data=st.data())
def test_larger_trees_match_naive(n: int, salt: bytes, data: st.DataObject) -> None:
    hashes = distinct_leaves(n, salt)
    tree = MerkleTree.from_leaf_hashes(hashes)
    naive = Naive(hashes)
    assert tree.root() == root_of(hashes) == naive.root(n)
    for _ in range(10):
        size = data.draw(st.integers(1, n), label="size")
        index = data.draw(st.integers(0, size - 1), label="index")
        assert tree.root(size) == naive.root(size)
        proof = tree.inclusion_proof(index, size)
        assert proof == naive.path(index, size)
        verify_inclusion(hashes[index], index, size, proof, naive.root(size))
        if size > 1:
            old = data.draw(st.integers(1, size - 1), label="old")
            proof = tree.consistency_proof(old, size)
            assert proof == naive.proof(old, size)
            verify_consistency(old, size, naive.root(old), naive.root(size), proof)


@hsettings(40)
@given(hashes=leaf_lists)
def test_append_matches_bulk_build(hashes: list[bytes]) -> None:
    bulk = MerkleTree.from_leaf_hashes(hashes)
    incremental = MerkleTree()
    for count, h in enumerate(hashes, start=1):
        incremental.append(h)
        assert incremental.size == count
        assert incremental.root() == bulk.root(count)
    n = len(hashes)
    for k in range(n + 1):
        assert incremental.root(k) == bulk.root(k)
    for index in range(n):
        assert incremental.leaf(index) == bulk.leaf(index)
        assert incremental.inclusion_proof(index) == bulk.inclusion_proof(index)
    for old in range(n + 1):
        assert incremental.consistency_proof(old) == bulk.consistency_proof(old)


@hsettings(40)
@given(hashes=leaf_lists, extra=leaf_lists, data=st.data())
def test_truncate(hashes: list[bytes], extra: list[bytes], data: st.DataObject) -> None:
    keep = data.draw(st.integers(0, len(hashes)), label="keep")
    expected = MerkleTree.from_leaf_hashes(hashes[:keep] + extra)
    for tree in (MerkleTree.from_leaf_hashes(hashes), MerkleTree()):
        if tree.size == 0:
            for h in hashes:
                tree.append(h)
        tree.truncate(keep)
        assert tree.size == keep
        assert tree.root() == root_of(hashes[:keep])
        for k in range(keep + 1):
            assert tree.root(k) == expected.root(k)
        with pytest.raises(ValueError):
            tree.leaf(keep)
        for h in extra:
            tree.append(h)
        n = keep + len(extra)
        assert tree.size == n
        for k in range(n + 1):
            assert tree.root(k) == expected.root(k)
        for index in range(n):
            assert tree.inclusion_proof(index) == expected.inclusion_proof(index)
        for old in range(n + 1):
            assert tree.consistency_proof(old) == expected.consistency_proof(old)


def test_truncate_edges() -> None:
    hashes = distinct_leaves(9)
    tree = MerkleTree.from_leaf_hashes(hashes)
    tree.truncate(9)
    assert tree.root() == root_of(hashes)
    with pytest.raises(ValueError):
        tree.truncate(10)
    with pytest.raises(ValueError):
        tree.truncate(-1)
    tree.truncate(0)
    assert tree.size == 0
    assert tree.root() == EMPTY_ROOT
    for h in hashes:
        tree.append(h)
    assert tree.root() == root_of(hashes)


# ---------------------------------------------------------------------------
# Rejection of malformed inclusion proofs
# ---------------------------------------------------------------------------


def test_inclusion_every_bit_flip_rejected_small() -> None:
    hashes = distinct_leaves(8, b"bits")
    tree = MerkleTree.from_leaf_hashes(hashes)
    for size in range(1, 9):
        root = tree.root(size)
        for index in range(size):
            leaf = hashes[index]
            proof = tree.inclusion_proof(index, size)
            for bad in flipped_variants(proof):
                rejects(verify_inclusion, leaf, index, size, bad, root)
            for bit in range(8 * HASH_SIZE):
                bad_leaf, bad_root = flip(leaf, bit), flip(root, bit)
                rejects(verify_inclusion, bad_leaf, index, size, proof, root)
                rejects(verify_inclusion, leaf, index, size, proof, bad_root)


def test_inclusion_structural_tampering_rejected() -> None:
    n = 20
    hashes = distinct_leaves(n, b"struct")
    tree = MerkleTree.from_leaf_hashes(hashes)
    roots = [tree.root(k) for k in range(n + 1)]
    for size in range(1, n + 1):
        root = roots[size]
        for index in range(size):
            leaf = hashes[index]
            proof = tree.inclusion_proof(index, size)
            verify_inclusion(leaf, index, size, proof, root)
            for bad in length_variants(proof, hashes[-1]):
                rejects(verify_inclusion, leaf, index, size, bad, root)
            for bad in swapped_variants(proof):
                rejects(verify_inclusion, leaf, index, size, bad, root)
            for other in range(size + 3):
                if other != index:
                    rejects(verify_inclusion, leaf, other, size, proof, root)
            # Another size, checked against that size's root (an audit path is only bound to
            # its tree size through the root it is checked against).
            for other in range(index + 1, n + 1):
                if other != size:
                    rejects(verify_inclusion, leaf, index, other, proof, roots[other])
            for other in range(index + 1):
                rejects(verify_inclusion, leaf, index, other, proof, root)
            for other_root in roots:
                if other_root != root:
                    rejects(verify_inclusion, leaf, index, size, proof, other_root)
            # A different leaf at the same position.
            other_leaf = hashes[(index + 1) % n]
            rejects(verify_inclusion, other_leaf, index, size, proof, root)


@hsettings(60)
@given(n=st.integers(2, 5000), salt=salts, data=st.data())
def test_inclusion_tampering_rejected_large(n: int, salt: bytes, data: st.DataObject) -> None:
    hashes = distinct_leaves(n, salt)
    tree = MerkleTree.from_leaf_hashes(hashes)
    size = data.draw(st.integers(2, n), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    root = tree.root(size)
    leaf = hashes[index]
    proof = tree.inclusion_proof(index, size)
    verify_inclusion(leaf, index, size, proof, root)
    position = data.draw(st.integers(0, len(proof) - 1), label="position")
    bit = data.draw(st.integers(0, 8 * HASH_SIZE - 1), label="bit")
    bad = list(proof)
    bad[position] = flip(bad[position], bit)
    rejects(verify_inclusion, leaf, index, size, bad, root)
    rejects(verify_inclusion, flip(leaf, bit), index, size, proof, root)
    rejects(verify_inclusion, leaf, index, size, proof, flip(root, bit))
    other_index = data.draw(st.integers(0, size - 1).filter(lambda i: i != index), label="i2")
    rejects(verify_inclusion, leaf, other_index, size, proof, root)
    other_size = data.draw(st.integers(index + 1, n).filter(lambda s: s != size), label="s2")
    rejects(verify_inclusion, leaf, index, other_size, proof, tree.root(other_size))
    for bad in length_variants(proof, leaf):
        rejects(verify_inclusion, leaf, index, size, bad, root)
    if len(proof) >= 2:
        i, j = data.draw(
            st.lists(st.integers(0, len(proof) - 1), min_size=2, max_size=2, unique=True)
        )
        swapped = list(proof)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        rejects(verify_inclusion, leaf, index, size, swapped, root)


def test_inclusion_bad_arguments() -> None:
    hashes = distinct_leaves(5)
    tree = MerkleTree.from_leaf_hashes(hashes)
    proof = tree.inclusion_proof(2)
    root = tree.root()
    rejects(verify_inclusion, hashes[0], 0, 0, [], EMPTY_ROOT)
    rejects(root_from_inclusion, hashes[0], 5, 5, proof)
    rejects(verify_inclusion, hashes[2], 2, 5, [*proof[:-1], proof[-1][:31]], root)
    rejects(verify_inclusion, hashes[2], 2, 5, [*proof[:-1], proof[-1] + b"\0"], root)
    with pytest.raises(ValueError):
        verify_inclusion(hashes[2], -1, 5, proof, root)
    with pytest.raises(ValueError):
        root_from_inclusion(hashes[2], 2, -5, proof)
    # A single-leaf tree's root is the leaf hash itself, with an empty path.
    verify_inclusion(hashes[0], 0, 1, [], hashes[0])
    rejects(verify_inclusion, hashes[0], 0, 1, [hashes[1]], hashes[0])


# ---------------------------------------------------------------------------
# Rejection of malformed consistency proofs
# ---------------------------------------------------------------------------


def test_consistency_every_bit_flip_rejected_small() -> None:
    hashes = distinct_leaves(8, b"cbits")
    tree = MerkleTree.from_leaf_hashes(hashes)
    for new in range(2, 9):
        new_root = tree.root(new)
        for old in range(1, new):
            old_root = tree.root(old)
            proof = tree.consistency_proof(old, new)
            for bad in flipped_variants(proof):
                rejects(verify_consistency, old, new, old_root, new_root, bad)
            for bit in range(8 * HASH_SIZE):
                bad_old, bad_new = flip(old_root, bit), flip(new_root, bit)
                rejects(verify_consistency, old, new, bad_old, new_root, proof)
                rejects(verify_consistency, old, new, old_root, bad_new, proof)


def test_consistency_structural_tampering_rejected() -> None:
    n = 20
    hashes = distinct_leaves(n, b"cstruct")
    tree = MerkleTree.from_leaf_hashes(hashes)
    roots = [tree.root(k) for k in range(n + 1)]
    for new in range(2, n + 1):
        for old in range(1, new):
            old_root, new_root = roots[old], roots[new]
            proof = tree.consistency_proof(old, new)
            verify_consistency(old, new, old_root, new_root, proof)

            for bad in length_variants(proof, hashes[0]):
                rejects(verify_consistency, old, new, old_root, new_root, bad)
            for bad in swapped_variants(proof):
                rejects(verify_consistency, old, new, old_root, new_root, bad)
            rejects(verify_consistency, old, new, new_root, old_root, proof)
            rejects(verify_consistency, new, old, new_root, old_root, proof)
            # Another size, checked against that size's root (as for audit paths, the sizes
            # only shape the computation; the roots are what bind the proof to its trees).
            for other in range(n + 1):
                if other != old:
                    rejects(verify_consistency, other, new, roots[other], new_root, proof)
                if other != new:
                    rejects(verify_consistency, old, other, old_root, roots[other], proof)
                if roots[other] != old_root:
                    rejects(verify_consistency, old, new, roots[other], new_root, proof)
                if roots[other] != new_root:
                    rejects(verify_consistency, old, new, old_root, roots[other], proof)


@hsettings(60)
@given(n=st.integers(3, 5000), salt=salts, data=st.data())
def test_consistency_tampering_rejected_large(n: int, salt: bytes, data: st.DataObject) -> None:
    hashes = distinct_leaves(n, salt)
    tree = MerkleTree.from_leaf_hashes(hashes)
    new = data.draw(st.integers(2, n), label="new")
    old = data.draw(st.integers(1, new - 1), label="old")
    old_root, new_root = tree.root(old), tree.root(new)
    proof = tree.consistency_proof(old, new)
    verify_consistency(old, new, old_root, new_root, proof)
    position = data.draw(st.integers(0, len(proof) - 1), label="position")
    bit = data.draw(st.integers(0, 8 * HASH_SIZE - 1), label="bit")
    bad = list(proof)
    bad[position] = flip(bad[position], bit)
    rejects(verify_consistency, old, new, old_root, new_root, bad)
    rejects(verify_consistency, old, new, flip(old_root, bit), new_root, proof)
    rejects(verify_consistency, old, new, old_root, flip(new_root, bit), proof)
    other_old = data.draw(st.integers(1, n).filter(lambda m: m != old), label="old2")
    rejects(verify_consistency, other_old, new, tree.root(other_old), new_root, proof)
    other_new = data.draw(st.integers(1, n).filter(lambda m: m != new), label="new2")
    rejects(verify_consistency, old, other_new, old_root, tree.root(other_new), proof)
    for bad in length_variants(proof, hashes[0]):
        rejects(verify_consistency, old, new, old_root, new_root, bad)
    if len(proof) >= 2:
        i, j = data.draw(
            st.lists(st.integers(0, len(proof) - 1), min_size=2, max_size=2, unique=True)
        )
        swapped = list(proof)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        rejects(verify_consistency, old, new, old_root, new_root, swapped)


def test_consistency_special_sizes() -> None:
    hashes = distinct_leaves(6)
    tree = MerkleTree.from_leaf_hashes(hashes)
    r3, r6 = tree.root(3), tree.root(6)
    proof = tree.consistency_proof(3, 6)
    verify_consistency(6, 6, r6, r6, [])
    rejects(verify_consistency, 6, 6, r6, r3, [])
    rejects(verify_consistency, 6, 6, r6, r6, proof)
    verify_consistency(0, 6, EMPTY_ROOT, r6, [])
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    rejects(verify_consistency, 0, 6, EMPTY_ROOT, r6, proof)
    rejects(verify_consistency, 3, 6, r3, r6, [])
    rejects(verify_consistency, 6, 3, r6, r3, proof)
    rejects(verify_consistency, 3, 6, r3, r6, [*proof[:-1], proof[-1][:31]])
    with pytest.raises(ValueError):
        verify_consistency(-1, 6, r3, r6, proof)
    with pytest.raises(ValueError):
        verify_consistency(3, -6, r3, r6, proof)


def test_proof_too_short_for_claimed_size_rejected() -> None:
    """A valid proof for a smaller tree, presented with that tree's root as a larger size.

    Every hash checks out; only the leftover size bits (``sn != 0``) reveal the lie.
    """
    hashes = distinct_leaves(5)
    tree = MerkleTree.from_leaf_hashes(hashes)
    path = tree.inclusion_proof(0, 2)
    assert root_from_inclusion(hashes[0], 0, 2, path) == tree.root(2)
    rejects(verify_inclusion, hashes[0], 0, 3, path, tree.root(2))
    rejects(root_from_inclusion, hashes[0], 0, 3, path)
    proof = tree.consistency_proof(2, 4)
    verify_consistency(2, 4, tree.root(2), tree.root(4), proof)
    rejects(verify_consistency, 2, 5, tree.root(2), tree.root(4), proof)


# ---------------------------------------------------------------------------
# Caller mistakes
# ---------------------------------------------------------------------------


def test_tree_rejects_bad_arguments() -> None:
    hashes = distinct_leaves(5)
    tree = MerkleTree.from_leaf_hashes(hashes)
    bad_calls: list[Callable[[], object]] = [
        lambda: tree.leaf(-1),
        lambda: tree.leaf(5),
        lambda: tree.root(-1),
        lambda: tree.root(6),
        lambda: tree.inclusion_proof(-1),
        lambda: tree.inclusion_proof(5),
        lambda: tree.inclusion_proof(3, 3),
        lambda: tree.inclusion_proof(0, 6),
        lambda: tree.inclusion_proof(0, 0),
        lambda: tree.consistency_proof(-1),
        lambda: tree.consistency_proof(6),
        lambda: tree.consistency_proof(4, 3),
        lambda: tree.consistency_proof(1, 6),
        lambda: tree.append(b"x" * 31),
        lambda: tree.append(b"x" * 33),
        lambda: MerkleTree.from_leaf_hashes([hashes[0], b"short"]),
        lambda: root_of([hashes[0], b"x" * 64]),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    # Failed calls leave the tree unchanged.
    assert tree.size == 5
    assert tree.root() == root_of(hashes)


def test_outputs_are_bytes() -> None:
    hashes = distinct_leaves(5)
    tree = MerkleTree.from_leaf_hashes(iter(hashes))
    assert tree.root() == root_of(tuple(hashes))
    assert all(type(tree.leaf(i)) is bytes for i in range(5))
    assert all(type(p) is bytes for p in tree.inclusion_proof(2))
    assert all(type(p) is bytes for p in tree.consistency_proof(3))
    assert type(tree.root(3)) is bytes


def naive_trie_root(leaves: dict[str, bytes]) -> bytes:
    """The state-root trie of docs/formats.md §9, written independently of MerkleMap."""

    def bits(key: str) -> str:
        return "".join(f"{byte:08b}" for byte in hashlib.sha256(key.encode()).digest())

    def node(items: list[tuple[str, bytes]], depth: int) -> bytes:
        if not items:
            return hashlib.sha256(b"").digest()
        if len(items) == 1:
            return items[0][1]
        zero = [item for item in items if item[0][depth] == "0"]
        one = [item for item in items if item[0][depth] == "1"]
        return hashlib.sha256(b"\x01" + node(zero, depth + 1) + node(one, depth + 1)).digest()

    return node([(bits(k), v) for k, v in leaves.items()], 0)


map_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "set", "delete", "root"]),
        st.text("ab/", max_size=4),
        st.binary(min_size=32, max_size=32),
    ),
    max_size=60,
)


@hsettings(150)
@given(ops=map_ops)
def test_merkle_map_root_is_the_trie_root_of_its_content(
    ops: list[tuple[str, str, bytes]],
) -> None:
    tree = MerkleMap()
    model: dict[str, bytes] = {}
    snapshots: list[tuple[MerkleMap, dict[str, bytes]]] = []
    for op, key, leaf in ops:
        if op == "set":
            tree.set(key, leaf)
            model[key] = leaf
        elif op == "delete":
            if key in model:
                tree.delete(key)
                del model[key]
            else:
                with pytest.raises(KeyError):
                    tree.delete(key)
        else:
            assert tree.root() == naive_trie_root(model)
            snapshots.append((tree.copy(), dict(model)))
        assert len(tree) == len(model)
    assert tree.root() == naive_trie_root(model)
    assert tree.keys() == sorted(model)
    for key in {k for _, k, _ in ops}:
        assert tree.get(key) == model.get(key)
        assert (key in tree) == (key in model)
    for copy, old in snapshots:  # copies are unaffected by later changes
        assert copy.root() == naive_trie_root(old)


@hsettings(30)
@given(keys=st.lists(st.text(max_size=6), unique=True, max_size=40), data=st.data())
def test_merkle_map_root_does_not_depend_on_the_order_of_changes(
    keys: list[str], data: st.DataObject
) -> None:
    leaves = {k: hashlib.sha256(k.encode()).digest() for k in keys}
    a, b = MerkleMap(), MerkleMap()
    for k in keys:
        a.set(k, leaves[k])
    for k in data.draw(st.permutations(keys)):
        b.set(k, b"\x00" * 32)  # a first value, changed below
        b.root()
    for k in data.draw(st.permutations(keys)):
        b.set(k, leaves[k])
    assert a.root() == b.root() == naive_trie_root(leaves)


def test_merkle_map_small_cases() -> None:
    tree = MerkleMap()
    assert tree.root() == EMPTY_ROOT
    leaf = hashlib.sha256(b"x").digest()
    tree.set("/a", leaf)
    assert tree.root() == leaf  # one key: its leaf
    tree.set("/b", leaf)
    assert tree.root() == naive_trie_root({"/a": leaf, "/b": leaf})
    tree.delete("/a")
    tree.delete("/b")
    assert tree.root() == EMPTY_ROOT


def test_merkle_map_rejects_bad_leaves() -> None:
    tree = MerkleMap()
    with pytest.raises(ValueError):
        tree.set("/a", b"short")
    assert "/a" not in tree
    assert tree.root() == EMPTY_ROOT


@hsettings(100)
@given(
    leaves=st.dictionaries(
        st.text("ab/", max_size=6), st.binary(min_size=32, max_size=32), max_size=60
    )
)
def test_merkle_map_built_in_one_pass_is_the_map_built_key_by_key(
    leaves: dict[str, bytes],
) -> None:
    built = MerkleMap.from_items(leaves.items())
    assert built.root() == naive_trie_root(leaves)
    assert len(built) == len(leaves) and built.keys() == sorted(leaves)
    for key, leaf in leaves.items():
        assert built.get(key) == leaf
    # It goes on changing like any other map.
    changed = built.copy()
    for key in list(leaves)[::2]:
        changed.delete(key)
    changed.set("/new", b"\x07" * 32)
    expected = {k: v for k, v in list(leaves.items())[1::2]} | {"/new": b"\x07" * 32}
    assert changed.root() == naive_trie_root(expected)
    assert built.root() == naive_trie_root(leaves)  # the copy's changes stay its own


def test_merkle_map_built_in_one_pass_refuses_a_key_given_twice() -> None:
    with pytest.raises(ValueError, match="given twice"):
        MerkleMap.from_items([("/a", b"\x01" * 32), ("/a", b"\x02" * 32)])
    with pytest.raises(ValueError):
        MerkleMap.from_items([("/a", b"short")])
