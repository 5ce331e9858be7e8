"""RFC 6962 / RFC 9162 Merkle tree hashing, proof construction and proof verification.

Leaves are hashed as SHA-256(0x00 || data) and interior nodes as SHA-256(0x01 || left || right).
A node is addressed by (height, index): it covers leaves [index * 2**height, (index + 1) * 2**height).
Proof construction works over any `node_hash(height, index)` source, so the same code serves the
in-memory writer and an on-disk tile reader.
"""

from collections.abc import Callable, Iterable, Sequence
from hashlib import sha256

HASH_SIZE = 32
EMPTY_ROOT = sha256(b"").digest()

NodeHashFn = Callable[[int, int], bytes]


class ProofError(ValueError):
    """A proof, hash or size does not check out."""


def leaf_hash(data: bytes) -> bytes:
    return sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right).digest()


_LEAF_PREFIX = sha256(b"\x00")


def leaf_hashes(entries: Iterable[bytes]) -> list[bytes]:
    """leaf_hash of each entry, in one loop for a whole batch: for leaves of a few hundred bytes
    the cost of a Python call per hash is as large as the hashing itself. (Copying a hash that has
    taken the prefix beats concatenating it and starting a new one.)"""
    start = _LEAF_PREFIX.copy
    hashes: list[bytes] = []
    append = hashes.append
    for entry in entries:
        h = start()
        h.update(entry)
        append(h.digest())
    return hashes


_NODE_PREFIX = sha256(b"\x01")


def parent_hashes(row: Sequence[bytes], start: int = 0) -> list[bytes]:
    """node_hash of the pairs (row[start], row[start + 1]), (row[start + 2], row[start + 3]), ...;
    an unpaired last hash is left out. (As in leaf_hashes, a copy of the prefixed hash, and pairs
    taken from one iterator rather than by index.)"""
    pairs = iter(row[start:] if start else row)
    begin = _NODE_PREFIX.copy
    hashes: list[bytes] = []
    append = hashes.append
    for left, right in zip(pairs, pairs):
        h = begin()
        h.update(left)
        h.update(right)
        append(h.digest())
    return hashes


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{name} is {len(value)} bytes, a SHA-256 hash is {HASH_SIZE}")


def perfect_root(hashes: Sequence[bytes]) -> bytes:
    """Root of a perfect subtree whose bottom row is `hashes` (a power-of-two count)."""
    row = hashes
    while len(row) > 1:
        row = parent_hashes(row)
    return row[0]


class CompactRange:
    """The right edge of a growing tree: perfect subtrees of strictly decreasing height.

    Invariant: `nodes` holds (height, hash) pairs left to right, heights strictly decreasing, and
    together they cover exactly the leaves pushed so far. Pushing merges equal heights, like a
    binary counter carrying.
    """

    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes: list[tuple[int, bytes]] = []

    def push(self, height: int, value: bytes) -> None:
        nodes = self.nodes
        while nodes and nodes[-1][0] == height:
            value = node_hash(nodes.pop()[1], value)
            height += 1
        nodes.append((height, value))


def root_of_nodes(nodes: Sequence[bytes]) -> bytes:
    """MTH of a tree given its compact range, left to right (RFC 6962: each split takes the
    largest power of two on the left, so the root is H(n0, H(n1, ... H(nk-1, nk))))."""
    if not nodes:
        return EMPTY_ROOT
    root = nodes[-1]
    for value in reversed(nodes[:-1]):
        root = node_hash(value, root)
    return root


def _largest_power_of_two_below(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_hash(get: NodeHashFn, start: int, end: int) -> bytes:
    """MTH(D[start:end]) where `start` is aligned to the largest power of two <= end - start,
    which holds for every range that the RFC 6962 recursion produces."""
    size = end - start
    if size <= 0:
        raise ProofError(f"empty range [{start}, {end})")
    if size & (size - 1) == 0:
        height = size.bit_length() - 1
        return get(height, start >> height)
    k = _largest_power_of_two_below(size)
    return node_hash(range_hash(get, start, start + k), range_hash(get, start + k, end))


def tree_root(get: NodeHashFn, size: int) -> bytes:
    return EMPTY_ROOT if size == 0 else range_hash(get, 0, size)


def inclusion_proof(get: NodeHashFn, index: int, size: int) -> list[bytes]:
    """RFC 6962 PATH(index, D[0:size]), leaf sibling first."""
    if not 0 <= index < size:
        raise ProofError(f"index {index} is outside a tree of size {size}")
    proof: list[bytes] = []
    start, end = 0, size
    # Invariant: the leaf lies in D[start:end]; `proof` holds the siblings of the splits above
    # it, top-down (reversed at the end: the proof lists the leaf's sibling first).
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if index < start + k:
            proof.append(range_hash(get, start + k, end))
            end = start + k
        else:
            proof.append(range_hash(get, start, start + k))
            start += k
    proof.reverse()
    return proof


def consistency_proof(get: NodeHashFn, old_size: int, new_size: int) -> list[bytes]:
    """RFC 6962 PROOF(old_size, D[0:new_size])."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"cannot prove size {old_size} against size {new_size}")
    if old_size == 0 or old_size == new_size:
        return []
    proof: list[bytes] = []
    start, end, whole = 0, new_size, True
    m = old_size
    # Invariant: the old tree's right edge lies in D[start:end] at offset m; `whole` says whether
    # D[start:start+m] is a complete subtree of the old tree that the verifier already knows.
    while True:
        n = end - start
        if m == n:
            if not whole:
                proof.append(range_hash(get, start, end))
            break
        k = _largest_power_of_two_below(n)
        if m <= k:
            proof.append(range_hash(get, start + k, end))
            end = start + k
        else:
            proof.append(range_hash(get, start, start + k))
            start += k
            m -= k
            whole = False
    proof.reverse()
    return proof


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """Root implied by an inclusion proof (RFC 9162 section 2.1.3.2); rejects surplus elements."""
    if not 0 <= index < size:
        raise ProofError(f"index {index} is outside a tree of size {size}")
    _check_hash("leaf hash", leaf)
    fn, sn, r = index, size - 1, leaf
    # Invariant: r is the hash of the subtree containing the leaf at the current level; fn is
    # its index there and sn the index of the last node at that level.
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
        if sn == 0:
            raise ProofError(f"inclusion proof has {len(proof) - i} surplus element(s)")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # A right-edge node with no sibling is promoted unchanged through empty levels.
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is too short")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    _check_hash("root", root)
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """RFC 9162 section 2.1.4.2; rejects wrong-length hashes and surplus elements."""
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    if old_size > new_size:
        raise ProofError(f"old size {old_size} is larger than new size {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("roots differ for the same size")
        return
    if old_size == 0:
        if proof:
            raise ProofError("proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        # The old tree is a complete subtree of the new one; its root starts the walk.
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    # Invariant: fr is the hash of the old tree's node at the current level on the path of its
    # last leaf, sr the same position's node in the new tree.
    for i, c in enumerate(path[1:], start=1):
        if sn == 0:
            raise ProofError(f"consistency proof has {len(path) - i} surplus element(s)")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is too short")
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")
