"""Merkle trees: RFC 6962 roots and audit paths, and proofs that cannot be forged."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterchain.ledger.merkle import (
    EMPTY_ROOT,
    InclusionProof,
    ProofError,
    leaf_hash,
    node_hash,
    prove,
    root,
    root_from_proof,
    verify_proof,
)

# RFC 6962 / certificate-transparency reference leaves and the roots of their prefixes.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
              "606162636465666768696a6b6c6d6e6f")
]  # fmt: skip
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1 Merkle Tree Hash, written as the RFC's recursion."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def _path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 6962 section 2.1.1 audit path, as the RFC's recursion."""
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return _path(m, leaves[:k]) + [_mth(leaves[k:])]
    return _path(m - k, leaves[k:]) + [_mth(leaves[:k])]


def test_roots_match_the_certificate_transparency_vectors() -> None:
    assert root([]) == EMPTY_ROOT
    for n, expected in enumerate(CT_ROOTS, start=1):
        assert root(CT_LEAVES[:n]).hex() == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=8), min_size=1, max_size=70), st.data())
def test_root_and_audit_paths_equal_the_rfc_recursion(leaves: list[bytes], data) -> None:
    index = data.draw(st.integers(0, len(leaves) - 1))
    assert root(leaves) == _mth(leaves)
    proof = prove([leaf_hash(x) for x in leaves], index)
    assert list(proof.path) == _path(index, leaves)
    verify_proof(leaves[index], proof, root(leaves))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=8), min_size=2, max_size=40, unique=True), st.data())
def test_a_proof_for_one_leaf_does_not_prove_another(leaves: list[bytes], data) -> None:
    i = data.draw(st.integers(0, len(leaves) - 1))
    j = data.draw(st.integers(0, len(leaves) - 1).filter(lambda x: x != i))
    proof = prove([leaf_hash(x) for x in leaves], i)
    with pytest.raises(ProofError):
        verify_proof(leaves[j], proof, root(leaves))
    moved = InclusionProof(j, proof.size, proof.path)
    with pytest.raises(ProofError):
        verify_proof(leaves[i], moved, root(leaves))


def test_an_interior_node_cannot_pass_as_a_leaf() -> None:
    leaves = [b"a", b"b", b"c", b"d"]
    hashes = [leaf_hash(x) for x in leaves]
    # Without domain separation, left||right of an inner node would be a valid "leaf".
    inner = hashes[0] + hashes[1]
    forged = InclusionProof(0, 2, (node_hash(hashes[2], hashes[3]),))
    with pytest.raises(ProofError):
        verify_proof(inner, forged, root(leaves))


def test_malformed_proofs_are_refused() -> None:
    hashes = [leaf_hash(bytes([i])) for i in range(5)]
    proof = prove(hashes, 4)
    for bad in (
        InclusionProof(5, 5, proof.path),
        InclusionProof(4, 5, proof.path + (bytes(32),)),
        InclusionProof(4, 5, proof.path[:-1]),
        InclusionProof(4, 5, (b"short",)),
    ):
        with pytest.raises(ProofError):
            root_from_proof(hashes[4], bad)
    with pytest.raises(ProofError):
        prove(hashes, 5)
    with pytest.raises(ProofError, match="malformed"):
        InclusionProof.from_json({"index": 1, "size": 2, "path": ["zz"]})
    assert InclusionProof.from_json(proof.to_json()) == proof
