"""Merkle tree code against published test vectors.

Vectors, embedded as data:
- The RFC 6962 reference vectors (8 leaves, roots of every prefix, inclusion and consistency
  proofs) as published by transparency-dev/merkle in proof/verify_test.go (also used by the
  certificate-transparency project).
- Files from transparency-dev/merkle testdata/: inclusion/1/happy-path.json,
  inclusion/1/trailing-root.json, inclusion/2/happy-path.json, consistency/1/happy-path.json,
  consistency/2/happy-path.json, consistency/2/trailing-garbage.json.
The corruption probes below follow that project's list (wrong index/size, wrong leaf/root,
garbage before/after, flipped bits, removed/inserted components).
"""

import base64
import itertools
import random

import pytest

from gateway.trace.merkle import (
    EMPTY_ROOT,
    CompactRange,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    leaf_hashes,
    perfect_root,
    root_of_nodes,
    tree_root,
    verify_consistency,
    verify_inclusion,
)
from gateway.trace.tiles import TiledTree, TileError

h = bytes.fromhex
b64 = base64.b64decode

LEAVES = [h(""), h("00"), h("10"), h("2021"), h("3031"), h("40414243"), h("5051525354555657"),
          h("606162636465666768696a6b6c6d6e6f")]
ROOTS = [h(x) for x in [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]]
# (1-based leaf, tree size, proof)
INCLUSION = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (3, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (2, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 7, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
SOME_HASH = h("abacaba000000000000000000000000000000000000000000060061e00123456")

# transparency-dev/merkle testdata files (JSON fields kept as published).
TESTDATA_INCLUSION = [
    {"leafIdx": 0, "treeSize": 8, "root": "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     "leafHash": "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
     "proof": ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=", "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
               "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="], "desc": "happy path", "wantErr": False},
    {"leafIdx": 0, "treeSize": 8, "root": "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     "leafHash": "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
     "proof": ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=", "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
               "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ=", "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg="],
     "desc": "trailing root", "wantErr": True},
    {"leafIdx": 5, "treeSize": 8, "root": "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     "leafHash": "QnGia+DYqE8L1UyMMC58s6O10fpngKQLzOKHNHfatlg=",
     "proof": ["vBoGQ7EuTS18d5GPROD095qDi2z57FtcKD4fTYhZnms=", "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
               "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="], "desc": "happy path", "wantErr": False},
]
TESTDATA_CONSISTENCY = [
    {"size1": 1, "size2": 8, "root1": "bjQLnP+zepicpUTmu3gKLHiQHT+zNzh2hRGjBhevoB0=",
     "root2": "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     "proof": ["lqKW0iTyhcZ77pPDD4owkVfw2qNdxbh+QQt4YwoJz8c=", "Xwg/ChozygdqlSeYMlgNs+DvRYS9/x9UyKNg9Q3jAx4=",
               "a0eq8p7jwq+a+Im8H7klTavTEXfxYjLdaqsDXKOb9uQ="], "desc": "happy path", "wantErr": False},
    {"size1": 6, "size2": 8, "root1": "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=",
     "root2": "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     "proof": ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=", "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
               "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc="], "desc": "happy path", "wantErr": False},
    {"size1": 6, "size2": 8, "root1": "duZ9rbzfHhDht03cYIq9L5jfsW+851J3tSMqEn8gh+8=",
     "root2": "XcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
     "proof": ["DrxdNDf74tsVi58Sah0RjjCBgQMdCpSfje3t68VY72o=", "yoVOoSjtBQtBs1/8G4e46yveRh6eO1WW7Oa51ZdaCuA=",
               "037kGJdt2VdTwcc4Yrk5j6Kiz5tP8P3+izDNlSCWFLc=", ""], "desc": "trailing garbage", "wantErr": True},
]


def _leaf_source(leaves):
    hashes = [leaf_hash(x) for x in leaves]

    def get(height: int, index: int) -> bytes:
        return perfect_root(hashes[index << height:(index + 1) << height])
    return get


def test_roots_of_every_prefix():
    for n in range(1, 9):
        assert tree_root(_leaf_source(LEAVES[:n]), n) == ROOTS[n - 1], n
    assert tree_root(_leaf_source([]), 0) == EMPTY_ROOT == h(
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def test_compact_range_matches_roots():
    cr = CompactRange()
    for n, leaf in enumerate(LEAVES, start=1):
        cr.push(0, leaf_hash(leaf))
        assert root_of_nodes([v for _, v in cr.nodes]) == ROOTS[n - 1]


def test_tiled_tree_matches_the_compact_range_however_leaves_are_batched():
    """The writer's batch hashing (a row at a time inside each tile) against the leaf-at-a-time
    compact range: roots after every batch, tiles handed back, and a tree resumed from tiles."""
    rng = random.Random(6962)
    leaves = leaf_hashes(i.to_bytes(4, "big") for i in range(66_000))  # past one full level 1 tile
    tree, reference, tiles = TiledTree(), CompactRange(), {}
    while tree.size < len(leaves):
        batch = leaves[tree.size:tree.size + rng.choice([1, 2, 3, 7, 255, 256, 257, 1000, 5000])]
        for level, n, hashes in tree.append(batch):
            assert len(hashes) == 256 and (level, n) not in tiles
            tiles[level, n] = hashes
        for leaf in batch:
            reference.push(0, leaf)
        assert tree.root() == root_of_nodes([value for _, value in reference.nodes]), tree.size
    assert leaf_hashes([b"x", b""]) == [leaf_hash(b"x"), leaf_hash(b"")]
    assert tiles[0, 3] == leaves[768:1024]
    assert tiles[1, 0] == [perfect_root(tiles[0, n]) for n in range(256)]
    assert sorted(tiles) == [(0, n) for n in range(257)] + [(1, 0)]
    size = 257 * 256  # resumed from the level 1 and level 2 rows a restart reads from full tiles
    resumed = TiledTree(size, [[perfect_root(tiles[0, 256])], [perfect_root(tiles[1, 0])]])
    resumed.append(leaves[size:])
    assert resumed.root() == tree.root()
    with pytest.raises(TileError):
        TiledTree(size, [[perfect_root(tiles[0, 256])]])  # the level 2 row is missing


def _inclusion_probes(index, size, leaf, proof, root):
    probes = [
        (index - 1, size, leaf, proof, root), (index + 1, size, leaf, proof, root),
        (index ^ 2, size, leaf, proof, root), (index, size * 2, leaf, proof, root),
        (index, size // 2, leaf, proof, root), (index, size, b"WrongLeaf", proof, root),
        (index, size, leaf, proof, EMPTY_ROOT), (index, size, leaf, proof, SOME_HASH),
        (index, size, leaf, proof + [b""], root), (index, size, leaf, proof + [root], root),
        (index, size, leaf, [b""] + proof, root), (index, size, leaf, [root] + proof, root),
    ]
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 8]) + wrong[i][1:]
        probes.append((index, size, leaf, wrong, root))
    if proof:
        probes.append((index, size, leaf, proof[:-1], root))
    if len(proof) > 1:
        probes.append((index, size, leaf, [proof[0], SOME_HASH] + proof[1:], root))
    return probes


@pytest.mark.parametrize("leaf1,size,proof_hex", INCLUSION)
def test_inclusion_vectors(leaf1, size, proof_hex):
    proof = [h(x) for x in proof_hex]
    leaf = leaf_hash(LEAVES[leaf1 - 1])
    root = ROOTS[size - 1]
    verify_inclusion(leaf1 - 1, size, leaf, proof, root)
    assert inclusion_proof(_leaf_source(LEAVES[:size]), leaf1 - 1, size) == proof
    for probe in _inclusion_probes(leaf1 - 1, size, leaf, proof, root):
        with pytest.raises(ProofError):
            verify_inclusion(*probe)


def _consistency_probes(s1, s2, r1, r2, proof):
    probes = [
        (s1 - 1, s2, r1, r2, proof), (s1 + 1, s2, r1, r2, proof), (s1 ^ 2, s2, r1, r2, proof),
        (s1, s2 * 2, r1, r2, proof), (s1, s2 // 2, r1, r2, proof),
        (s1, s2, b"WrongRoot", r2, proof), (s1, s2, r1, b"WrongRoot", proof), (s1, s2, r2, r1, proof),
        (s1, s2, r1, r2, []), (s1, s2, r1, r2, proof + [b""]), (s1, s2, r1, r2, proof + [r1]),
        (s1, s2, r1, r2, proof + [r2]), (s1, s2, r1, r2, [b""] + proof), (s1, s2, r1, r2, [r1] + proof),
        (s1, s2, r1, r2, [r2] + proof), (s1, s2, r1, r2, [proof[0]] + proof),
        (s1, s2, r1, r2, proof[:-1]),
    ]
    for i in range(len(proof)):
        wrong = list(proof)
        wrong[i] = bytes([wrong[i][0] ^ 16]) + wrong[i][1:]
        probes.append((s1, s2, r1, r2, wrong))
    return probes


@pytest.mark.parametrize("s1,s2,proof_hex", CONSISTENCY)
def test_consistency_vectors(s1, s2, proof_hex):
    proof = [h(x) for x in proof_hex]
    r1, r2 = ROOTS[s1 - 1], ROOTS[s2 - 1]
    verify_consistency(s1, s2, r1, r2, proof)
    assert consistency_proof(_leaf_source(LEAVES[:s2]), s1, s2) == proof
    if proof:
        for probe in _consistency_probes(s1, s2, r1, r2, proof):
            with pytest.raises(ProofError):
                verify_consistency(*probe)


def test_consistency_edge_cases():
    # Mirrors transparency-dev/merkle TestVerifyConsistency, with 32-byte stand-in roots.
    r1, r2 = SOME_HASH, EMPTY_ROOT
    verify_consistency(0, 0, r1, r1, [])
    verify_consistency(0, 1, r1, r2, [])
    verify_consistency(1, 1, r2, r2, [])
    bad = [(0, 0, r1, r2, []), (1, 1, r1, r2, []), (1, 0, r1, r2, []), (2, 1, r1, r2, []),
           (1, 2, r1, r2, []), (0, 0, r2, r2, [EMPTY_ROOT]), (0, 1, r2, r2, [EMPTY_ROOT]),
           (1, 1, r2, r2, [EMPTY_ROOT]), (0, 0, b"short", b"short", [])]
    for probe in bad:
        with pytest.raises(ProofError):
            verify_consistency(*probe)


def test_transparency_dev_testdata_files():
    for case in TESTDATA_INCLUSION:
        args = (case["leafIdx"], case["treeSize"], b64(case["leafHash"]),
                [b64(p) for p in case["proof"]], b64(case["root"]))
        if case["wantErr"]:
            with pytest.raises(ProofError):
                verify_inclusion(*args)
        else:
            verify_inclusion(*args)
    for case in TESTDATA_CONSISTENCY:
        args = (case["size1"], case["size2"], b64(case["root1"]), b64(case["root2"]),
                [b64(p) for p in case["proof"]])
        if case["wantErr"]:
            with pytest.raises(ProofError):
                verify_consistency(*args)
        else:
            verify_consistency(*args)


def test_generated_proofs_round_trip_for_all_small_sizes():
    leaves = [i.to_bytes(4, "big") for i in range(70)]
    get = _leaf_source(leaves)
    roots = [tree_root(get, n) for n in range(71)]
    for size in range(1, 71):
        for index in range(size):
            verify_inclusion(index, size, leaf_hash(leaves[index]), inclusion_proof(get, index, size),
                             roots[size])
    for old, new in itertools.combinations_with_replacement(range(0, 71, 3), 2):
        verify_consistency(old, new, roots[old], roots[new], consistency_proof(get, old, new))
