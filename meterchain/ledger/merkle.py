"""Merkle trees with domain-separated hashing (RFC 6962/9162): roots, inclusion proofs, checks.

Leaves hash as SHA-256(0x00 || data) and interior nodes as SHA-256(0x01 || left || right),
so a node can never be passed off as a leaf (no second-preimage forgery of a proof).
The tree is the RFC 6962 left-balanced tree: pairing level by level and promoting
an unpaired last node unchanged gives exactly the same root as RFC 6962's recursive split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from meterchain.errors import MeterChainError

_sha256 = hashlib.sha256
EMPTY_ROOT = _sha256(b"").digest()


class ProofError(MeterChainError):
    """An inclusion proof is malformed or does not lead to the expected root."""


def leaf_hash(data: bytes) -> bytes:
    """Hash of one leaf's bytes: SHA-256(0x00 || data)."""
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash of an interior node: SHA-256(0x01 || left || right)."""
    return _sha256(b"\x01" + left + right).digest()


def root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    """Root over leaf hashes already computed with `leaf_hash`."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        odd = level[-1] if len(level) % 2 else None
        # Pair (0,1), (2,3), ...; the unpaired last node moves up unchanged.
        level = [
            _sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if odd is not None:
            level.append(odd)
    return level[0]


def root(leaves: Sequence[bytes]) -> bytes:
    """Root over raw leaf data."""
    return root_of_hashes([_sha256(b"\x00" + leaf).digest() for leaf in leaves])


@dataclass(frozen=True)
class InclusionProof:
    """The audit path of leaf `index` in a tree of `size` leaves, bottom-up."""

    index: int
    size: int
    path: tuple[bytes, ...]

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "size": self.size, "path": [p.hex() for p in self.path]}

    @classmethod
    def from_json(cls, value: object) -> InclusionProof:
        try:
            assert isinstance(value, dict)
            index, size, path = value["index"], value["size"], value["path"]
            assert isinstance(index, int) and isinstance(size, int) and isinstance(path, list)
            return cls(index, size, tuple(bytes.fromhex(p) for p in path))
        except (AssertionError, KeyError, TypeError, ValueError) as exc:
            raise ProofError(f"malformed inclusion proof: {exc!r}") from exc


def prove(hashes: Sequence[bytes], index: int) -> InclusionProof:
    """Inclusion proof for leaf `index` among leaf hashes `hashes`."""
    if not 0 <= index < len(hashes):
        raise ProofError(f"leaf {index} is outside a tree of {len(hashes)} leaves")
    path: list[bytes] = []
    level = list(hashes)
    i = index
    while len(level) > 1:
        sibling = i ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        odd = level[-1] if len(level) % 2 else None
        level = [node_hash(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if odd is not None:
            level.append(odd)
        i //= 2
    return InclusionProof(index, len(hashes), tuple(path))


def root_from_proof(leaf_digest: bytes, proof: InclusionProof) -> bytes:
    """The root that `proof` leads to from a leaf hash (RFC 9162 section 2.1.3.2)."""
    if not 0 <= proof.index < proof.size:
        raise ProofError(f"leaf index {proof.index} outside tree size {proof.size}")
    fn, sn = proof.index, proof.size - 1
    r = leaf_digest
    for p in proof.path:
        if len(p) != 32:
            raise ProofError("proof path element is not 32 bytes")
        if sn == 0:
            raise ProofError("proof path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("proof path is shorter than the tree is deep")
    return r


def verify_proof(leaf: bytes, proof: InclusionProof, expected_root: bytes) -> None:
    """Raise ProofError unless raw leaf data `leaf` is at `proof.index` under `expected_root`."""
    if root_from_proof(leaf_hash(leaf), proof) != expected_root:
        raise ProofError("inclusion proof does not lead to the expected root")
