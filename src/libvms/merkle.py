"""Merkle tree algorithms of RFC 9162 (Certificate Transparency 2.0), section 2.1.

Leaf and node hashes, tree heads of any size, and inclusion and consistency proofs:
producing them from a :class:`MerkleTree` and verifying them with nothing but hashes.
Pure computation, no I/O.

Everything works on *leaf hashes* (``leaf_hash(entry_bytes)``), 32 bytes each. Indices
and sizes are 0-based counts of leaves. A proof that does not verify raises
:class:`~libvms.errors.TamperError`; a call that makes no sense (an index outside the
tree, a hash of the wrong length handed to the tree) raises :class:`ValueError`.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Iterable, Sequence

from .errors import TamperError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "MerkleMap",
    "MerkleTree",
    "leaf_hash",
    "node_hash",
    "root_from_inclusion",
    "root_of",
    "verify_consistency",
    "verify_inclusion",
]

#: Size in bytes of every hash in the tree (SHA-256).
HASH_SIZE = 32

_sha256 = hashlib.sha256
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

# Hashing state after the node prefix; copying it is cheaper than starting a new hash.
_NODE_STATE = _sha256(_NODE_PREFIX)

#: Root of the empty tree: ``SHA-256("")`` (RFC 9162 §2.1.1).
EMPTY_ROOT: bytes = _sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """Hash of one entry as a leaf: ``SHA-256(0x00 || data)`` (RFC 9162 §2.1.1)."""
    h = _sha256(_LEAF_PREFIX)
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an interior node: ``SHA-256(0x01 || left || right)`` (RFC 9162 §2.1.1)."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ValueError(f"{what} must be {HASH_SIZE} bytes, got {len(value)}")


def _fold_right(pieces: list[bytes]) -> bytes:
    """Combine the perfect subtrees a range splits into, largest (leftmost) first."""
    acc = pieces[-1]
    for piece in reversed(pieces[:-1]):
        acc = _sha256(_NODE_PREFIX + piece + acc).digest()
    return acc


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """Merkle Tree Hash MTH(D[n]) of a list of leaf hashes (RFC 9162 §2.1.1), in O(n).

    Uses O(log n) memory: it keeps only the roots of the perfect subtrees seen so far.
    """
    # stack[i] is the root of a perfect subtree of 2**heights[i] leaves; heights decrease.
    stack: list[bytes] = []
    heights: list[int] = []
    for position, lh in enumerate(leaf_hashes):
        _check_hash(lh, f"leaf hash {position}")
        acc = bytes(lh)
        height = 0
        while heights and heights[-1] == height:
            heights.pop()
            acc = _sha256(_NODE_PREFIX + stack.pop() + acc).digest()
            height += 1
        stack.append(acc)
        heights.append(height)
    if not stack:
        return EMPTY_ROOT
    # MTH splits at the largest power of two below n, so the perfect subtrees nest to the right.
    return _fold_right(stack)


def _largest_power_of_two_below(n: int) -> int:
    """The k of RFC 9162 §2.1.1: the largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """In-memory tree over leaf hashes that keeps every perfect-subtree hash, so roots of
    any earlier size, inclusion and consistency proofs cost O(log n) hash lookups plus at
    most O(log n) hashes for the one subtree on the right edge that is not perfect.

    Level ``k`` holds, as one ``bytearray`` of concatenated 32-byte hashes, the hash of
    every perfect subtree over leaves ``[i * 2**k, (i + 1) * 2**k)`` that exists yet;
    level 0 is the leaf hashes. Together they take about ``2 * 32 * n`` bytes.
    """

    __slots__ = ("_frontier", "_levels", "_root", "_size")

    def __init__(self) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        # The perfect subtrees the whole tree splits into, largest first: the root
        # of the current size folds them without slicing the levels.
        self._frontier: list[bytes] = []
        self._root: bytes | None = EMPTY_ROOT

    @classmethod
    def from_leaf_hashes(cls, hashes: Iterable[bytes]) -> MerkleTree:
        """Build a tree over ``hashes`` in one pass per level (faster than repeated appends)."""
        tree = cls()
        base = tree._levels[0]
        count = 0
        for lh in hashes:
            _check_hash(lh, f"leaf hash {count}")
            base += lh
            count += 1
        tree._size = count
        levels = tree._levels
        sha, prefix = _sha256, _NODE_PREFIX
        step = 2 * HASH_SIZE
        below = base
        while len(below) >= step:
            view = memoryview(below)
            level = bytearray(
                b"".join(
                    [
                        sha(prefix + view[off : off + step]).digest()
                        for off in range(0, len(below) - step + 1, step)
                    ]
                )
            )
            view.release()
            levels.append(level)
            below = level
        tree._reset_frontier()
        return tree

    def _reset_frontier(self) -> None:
        self._frontier = self._pieces(0, self._size)
        self._root = None

    @property
    def size(self) -> int:
        """Number of leaves."""
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf hash at index :attr:`size`; amortised O(1) hashing."""
        _check_hash(leaf_hash, "leaf hash")
        levels = self._levels
        frontier = self._frontier
        levels[0] += leaf_hash
        frontier.append(bytes(leaf_hash))
        self._size += 1
        self._root = None
        count = self._size
        height = 0
        # A perfect subtree of 2**(height+1) leaves completes whenever the count at a level
        # becomes even: hash its two halves (the frontier's last two) into the level above.
        while not count & 1:
            node = _sha256(_NODE_PREFIX + frontier[-2] + frontier[-1]).digest()
            del frontier[-2:]
            frontier.append(node)
            height += 1
            if height == len(levels):
                levels.append(bytearray())
            levels[height] += node
            count >>= 1

    def leaf(self, index: int) -> bytes:
        """The stored leaf hash at ``index``."""
        if not 0 <= index < self._size:
            raise ValueError(f"leaf index {index} out of range for tree of size {self._size}")
        offset = index * HASH_SIZE
        return bytes(self._levels[0][offset : offset + HASH_SIZE])

    def truncate(self, size: int) -> None:
        """Drop every leaf at index ``size`` and beyond (roll back uncommitted appends)."""
        if not 0 <= size <= self._size:
            raise ValueError(f"cannot truncate tree of size {self._size} to {size}")
        levels = self._levels
        del levels[max(1, size.bit_length()) :]
        for height, level in enumerate(levels):
            del level[(size >> height) * HASH_SIZE :]
        self._size = size
        self._reset_frontier()

    def root(self, size: int | None = None) -> bytes:
        """Root hash MTH of the first ``size`` leaves (default: all), RFC 9162 §2.1.1."""
        if size is None or size == self._size:
            if self._root is None:
                self._root = _fold_right(self._frontier) if self._frontier else EMPTY_ROOT
            return self._root
        size = self._resolve_size(size)
        if size == 0:
            return EMPTY_ROOT
        return self._range_hash(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """Audit path PATH(index, D[size]) of RFC 9162 §2.1.3.1, leaf side first."""
        size = self._resolve_size(size)
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} out of range for tree of size {size}")
        levels = self._levels
        proof: list[bytes] = []
        # Below the level where the paths to `index` and to the last leaf meet, the sibling
        # is a stored perfect subtree, except possibly one that sticks out past `size`: that
        # one is the right-edge subtree over [start, size) (RFC 9162 §2.1.3.1, MTH(D[k:n])).
        inner = (index ^ (size - 1)).bit_length()
        for height in range(inner):
            sibling = (index >> height) ^ 1
            start = sibling << height
            if start + (1 << height) <= size:
                offset = sibling * HASH_SIZE
                proof.append(bytes(levels[height][offset : offset + HASH_SIZE]))
            else:
                proof.append(self._range_hash(start, size))
        # Above it, `index` lies on the right edge: each left sibling is a perfect subtree.
        node = index >> inner
        height = inner
        while node:
            if node & 1:
                offset = (node - 1) * HASH_SIZE
                proof.append(bytes(levels[height][offset : offset + HASH_SIZE]))
            node >>= 1
            height += 1
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """Consistency proof PROOF(old_size, D[new_size]) of RFC 9162 §2.1.4.1.

        Empty when ``old_size`` is 0 or equals ``new_size``.
        """
        new_size = self._resolve_size(new_size)
        if not 0 <= old_size <= new_size:
            raise ValueError(f"old size {old_size} out of range for new size {new_size}")
        if old_size in (0, new_size):
            return []
        # RFC 9162 §2.1.4.1 SUBPROOF(m, D[lo:hi], b), unrolled: the recursion appends its node
        # after the recursive call, so collect top-down and reverse.
        nodes: list[bytes] = []
        lo, hi, whole = 0, new_size, True
        while hi != old_size:
            k = _largest_power_of_two_below(hi - lo)
            if old_size - lo <= k:
                # m <= k: SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
                nodes.append(self._range_hash(lo + k, hi))
                hi = lo + k
            else:
                # m > k: SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
                nodes.append(self._range_hash(lo, lo + k))
                lo += k
                whole = False
        if not whole:
            # SUBPROOF(m, D[m], false) = {MTH(D[m])}
            nodes.append(self._range_hash(lo, hi))
        nodes.reverse()
        return nodes

    def _resolve_size(self, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise ValueError(f"size {size} out of range for tree of size {self._size}")
        return size

    def _range_hash(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for a subtree of the RFC 9162 tree (``lo`` aligned to its split)."""
        levels = self._levels
        length = hi - lo
        if not length & (length - 1):
            height = length.bit_length() - 1
            offset = (lo >> height) * HASH_SIZE
            return bytes(levels[height][offset : offset + HASH_SIZE])
        return _fold_right(self._pieces(lo, hi))

    def _pieces(self, lo: int, hi: int) -> list[bytes]:
        """The perfect subtrees of ``[lo, hi)``, largest first.

        MTH splits at the largest power of two below the length, repeatedly, so a
        range is its binary decomposition into perfect subtrees, nested to the right.
        """
        levels = self._levels
        pieces: list[bytes] = []
        while lo < hi:
            height = (hi - lo).bit_length() - 1
            offset = (lo >> height) * HASH_SIZE
            pieces.append(bytes(levels[height][offset : offset + HASH_SIZE]))
            lo += 1 << height
        return pieces


class MerkleMap:
    """Leaf hashes by string key, with a root that commits to the whole map.

    The root is that of a binary trie on the keys' SHA-256 digests (the files
    archive's state root, docs/formats.md §9): for the keys whose digests share
    their first ``d`` bits,

    * none: the empty root ``SHA-256("")``;
    * one: that key's leaf hash;
    * more: ``SHA-256(0x01 || R0 || R1)``, where ``R0`` and ``R1`` are the roots of
      those whose bit ``d`` (most significant bit first) is 0 and 1.

    The root depends only on the map's content, never on the order of changes.
    The map is a path-compressed trie whose nodes never change once made (only
    their cached roots are filled in): a change makes new nodes on its key's path
    and shares the rest, so it costs O(log n) whatever the map holds, and so does
    the new root; :meth:`copy` costs O(1).
    """

    __slots__ = ("_root", "_size", "_top")

    def __init__(self) -> None:
        self._top: _Leaf | _Branch | None = None
        self._size = 0
        self._root: bytes | None = EMPTY_ROOT

    @classmethod
    def from_items(cls, items: Iterable[tuple[str, bytes]]) -> MerkleMap:
        """A map of ``items`` (key, leaf hash), each key once, built in one pass:
        about two nodes per key, where setting them one by one makes about 17."""
        leaves = []
        for key, leaf in items:
            _check_hash(leaf, "leaf hash")
            leaves.append(_Leaf(_key_value(key), key, bytes(leaf)))
        leaves.sort(key=lambda node: node.value)
        for a, b in itertools.pairwise(leaves):
            if a.value == b.value:
                raise ValueError(f"key {b.key!r} is given twice")
        made = cls()
        made._top = _build(leaves, 0, len(leaves)) if leaves else None
        made._size = len(leaves)
        made._root = None if leaves else EMPTY_ROOT
        return made

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def get(self, key: str) -> bytes | None:
        """The leaf hash of ``key``, or None."""
        value = _key_value(key)
        node = self._top
        while type(node) is _Branch:
            node = node.right if (value >> (255 - node.depth)) & 1 else node.left
        if type(node) is _Leaf and node.value == value:
            return node.leaf
        return None

    def keys(self) -> list[str]:
        """Every key, in order."""
        return sorted(leaf.key for leaf in self._leaves())

    def _leaves(self) -> Iterable[_Leaf]:
        stack = [] if self._top is None else [self._top]
        while stack:
            node = stack.pop()
            if type(node) is _Branch:
                stack.append(node.right)
                stack.append(node.left)
            else:
                yield node  # type: ignore[misc]

    def set(self, key: str, leaf: bytes) -> None:
        """Give ``key`` the leaf hash ``leaf``, adding the key if it is new."""
        _check_hash(leaf, "leaf hash")
        value = _key_value(key)
        new = _Leaf(value, key, bytes(leaf))
        # Walk down to where the key is, or where it parts from the keys below.
        path: list[tuple[_Branch, int]] = []
        node = self._top
        while type(node) is _Branch:
            if (node.value ^ value) >> (256 - node.depth):
                break  # the key parts from this subtree above its split
            side = (value >> (255 - node.depth)) & 1
            path.append((node, side))
            node = node.right if side else node.left
        if node is None:  # the map was empty
            replacement: _Leaf | _Branch = new
            self._size += 1
        elif type(node) is _Leaf and node.value == value:
            if node.leaf == new.leaf:
                return
            replacement = new
        else:
            # A new split where the key's bits first differ from the subtree's.
            depth = 256 - (node.value ^ value).bit_length()
            if (value >> (255 - depth)) & 1:
                replacement = _Branch(depth, value, node, new)
            else:
                replacement = _Branch(depth, value, new, node)
            self._size += 1
        self._top = _rebuild_path(path, replacement)
        self._root = None

    def delete(self, key: str) -> None:
        """Remove ``key``; :class:`KeyError` if it is absent."""
        value = _key_value(key)
        path: list[tuple[_Branch, int]] = []
        node = self._top
        while type(node) is _Branch:
            side = (value >> (255 - node.depth)) & 1
            path.append((node, side))
            node = node.right if side else node.left
        if node is None or node.value != value:
            raise KeyError(key)
        # The leaf's parent split goes; its other side takes the parent's place.
        replacement: _Leaf | _Branch | None = None
        if path:
            parent, side = path.pop()
            replacement = parent.left if side else parent.right
        self._top = _rebuild_path(path, replacement) if replacement is not None else None
        self._size -= 1
        self._root = None

    def copy(self) -> MerkleMap:
        """An independent copy (the nodes are shared: none of them ever changes)."""
        other = MerkleMap.__new__(MerkleMap)
        other._top = self._top
        other._size = self._size
        other._root = self._root
        return other

    def root(self) -> bytes:
        """The trie root described above; the empty root when the map is empty."""
        if self._root is None:
            top = self._top
            self._root = EMPTY_ROOT if top is None else _node_root(top, 0)
        return self._root


class _Leaf:
    """One key of a :class:`MerkleMap`: its digest as an integer, the key, its leaf hash."""

    __slots__ = ("key", "leaf", "value")

    def __init__(self, value: int, key: str, leaf: bytes) -> None:
        self.value = value
        self.key = key
        self.leaf = leaf


class _Branch:
    """Keys whose digests share their first ``depth`` bits (those of ``value``) and
    part at bit ``depth``: ``left`` holds the 0s, ``right`` the 1s, neither empty.

    ``cached`` is the root of these keys seen from depth ``cached_from`` (above
    ``depth``, every level they all share adds a node with one empty side): the
    same for every map that shares the branch, so it is kept once computed.
    """

    __slots__ = ("cached", "cached_from", "depth", "left", "right", "value")

    def __init__(
        self, depth: int, value: int, left: _Leaf | _Branch, right: _Leaf | _Branch
    ) -> None:
        self.depth = depth
        self.value = value
        self.left = left
        self.right = right
        self.cached: bytes | None = None
        self.cached_from = 0


def _build(leaves: list[_Leaf], lo: int, hi: int) -> _Leaf | _Branch:
    """The trie of ``leaves[lo:hi]`` (sorted by digest, at least one)."""
    if hi - lo == 1:
        return leaves[lo]
    first, last = leaves[lo].value, leaves[hi - 1].value
    depth = 256 - (first ^ last).bit_length()  # the first bit where they part
    boundary = ((first >> (255 - depth)) | 1) << (255 - depth)  # smallest with that bit set
    mid = bisect.bisect_left(leaves, boundary, lo, hi, key=lambda node: node.value)
    return _Branch(depth, first, _build(leaves, lo, mid), _build(leaves, mid, hi))


def _rebuild_path(path: list[tuple[_Branch, int]], node: _Leaf | _Branch) -> _Leaf | _Branch:
    """New branches for ``path`` (top first, with the side taken at each) whose
    bottom child is now ``node``; returns the new top."""
    for branch, side in reversed(path):
        if side:
            node = _Branch(branch.depth, branch.value, branch.left, node)
        else:
            node = _Branch(branch.depth, branch.value, node, branch.right)
    return node


def _node_root(node: _Leaf | _Branch, depth: int) -> bytes:
    """The root of ``node``'s keys seen from ``depth`` (they share its first bits)."""
    if type(node) is _Leaf:
        return node.leaf
    branch: _Branch = node  # type: ignore[assignment]
    if branch.cached is not None and branch.cached_from == depth:
        return branch.cached
    d = branch.depth
    root = _sha256(
        _NODE_PREFIX + _node_root(branch.left, d + 1) + _node_root(branch.right, d + 1)
    ).digest()
    value = branch.value
    # Each level all these keys share has them on one side and no key (the empty
    # root) on the other.
    for level in range(d - 1, depth - 1, -1):
        if (value >> (255 - level)) & 1:
            root = _sha256(_NODE_PREFIX + EMPTY_ROOT + root).digest()
        else:
            root = _sha256(_NODE_PREFIX + root + EMPTY_ROOT).digest()
    branch.cached, branch.cached_from = root, depth
    return root


def _key_value(key: str) -> int:
    """The key's SHA-256 digest, as the integer whose bits the trie follows."""
    return int.from_bytes(_sha256(key.encode("utf-8", "surrogatepass")).digest(), "big")


def root_from_inclusion(leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root that the audit path ``proof`` yields for ``leaf_hash`` at ``index`` of ``size``.

    Raises :class:`TamperError` when the proof is malformed for that position (wrong
    length, an element not 32 bytes, ``index >= size``); compare the result to a trusted
    root, or use :func:`verify_inclusion`.
    """
    if index < 0 or size < 0:
        raise ValueError(f"negative leaf index {index} or tree size {size}")
    where = f"inclusion proof for leaf {index} of {size}"
    if index >= size:
        raise TamperError(f"leaf index {index} is not below tree size {size}", where=where)
    new_node = _NODE_STATE.copy
    # RFC 9162 §2.1.3.2
    fn = index
    sn = size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            raise TamperError("inclusion proof is too long", where=where)
        if len(p) != HASH_SIZE:
            raise TamperError("inclusion proof element is not a hash", where=where)
        h = new_node()
        if fn & 1 or fn == sn:
            h.update(p + r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            h.update(r + p)
        r = h.digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise TamperError("inclusion proof is too short", where=where)
    return r


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` leaves with ``root``.

    RFC 9162 §2.1.3.2. Returns ``None`` on success, raises :class:`TamperError` otherwise.
    The proof binds the leaf to ``root``; ``size`` only shapes the computation (a path for
    one size can fit another size too), so take ``size`` and ``root`` from the same trusted
    tree head.
    """
    if root_from_inclusion(leaf_hash, index, size, proof) != root:
        raise TamperError(
            "inclusion proof does not lead to the expected root",
            where=f"inclusion proof for leaf {index} of {size}",
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``new_size`` leaves with ``new_root`` extends the one of
    ``old_size`` leaves with ``old_root`` (RFC 9162 §2.1.4.2).

    ``old_size == new_size`` needs an empty proof and equal roots; ``old_size == 0`` needs
    an empty proof and is always consistent (``old_root`` is not examined). Raises
    :class:`TamperError` otherwise. As with :func:`verify_inclusion`, take each size from
    the same trusted tree head as its root.
    """
    if old_size < 0 or new_size < 0:
        raise ValueError(f"negative tree size {old_size} or {new_size}")
    where = f"consistency proof from {old_size} to {new_size}"
    if old_size > new_size:
        raise TamperError(f"tree shrank from {old_size} to {new_size} leaves", where=where)
    if old_size == new_size or old_size == 0:
        if proof:
            raise TamperError("consistency proof should be empty", where=where)
        if old_size == new_size and old_root != new_root:
            raise TamperError("roots differ for the same tree size", where=where)
        return
    # RFC 9162 §2.1.4.2, steps 1-2: non-empty; prepend first_hash if first is a power of 2.
    if not proof:
        raise TamperError("consistency proof is empty", where=where)
    for c in proof:
        if len(c) != HASH_SIZE:
            raise TamperError("consistency proof element is not a hash", where=where)
    new_node = _NODE_STATE.copy
    path: Sequence[bytes] = proof
    if not old_size & (old_size - 1):
        path = [old_root, *proof]
    # Steps 3-4.
    fn = old_size - 1
    sn = new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # Steps 5-6.
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise TamperError("consistency proof is too long", where=where)
        if fn & 1 or fn == sn:
            h = new_node()
            h.update(c + fr)
            fr = h.digest()
            h = new_node()
            h.update(c + sr)
            sr = h.digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            h = new_node()
            h.update(sr + c)
            sr = h.digest()
        fn >>= 1
        sn >>= 1
    # Step 7.
    if sn != 0:
        raise TamperError("consistency proof is too short", where=where)
    if fr != old_root:
        raise TamperError("consistency proof does not lead to the old root", where=where)
    if sr != new_root:
        raise TamperError("consistency proof does not lead to the new root", where=where)
