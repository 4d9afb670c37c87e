"""Blocks: a hash-chained header over a Merkle root of typed transactions, plus a QC.

The header is the canonical CBOR array ["header", market, height, previous header
hash, body root, time, round, proposer]; its hash is SHA-256 of those bytes. A block
is valid only with a quorum certificate of more than n/2 consensus members over
["block", market, height, header hash] (M7, M12). Verified readings are stored beside
the block, each reading batch transaction carrying the Merkle root of its readings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from meterchain import codec
from meterchain.errors import CodecError, MeterChainError
from meterchain.ledger.merkle import root_of_hashes
from meterchain.ledger.transactions import Tx
from meterchain.quorum import QuorumCertificate

GENESIS_PREV = bytes(32)


class BlockError(MeterChainError):
    """A block or header is malformed."""


@dataclass(frozen=True)
class Header:
    market: str
    height: int
    prev: bytes
    root: bytes
    time: int
    round: int
    proposer: str

    def encode(self) -> bytes:
        return codec.encode(
            [
                "header",
                self.market,
                self.height,
                self.prev,
                self.root,
                self.time,
                self.round,
                self.proposer,
            ]
        )

    @property
    def hash(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        try:
            value = codec.decode(raw)
        except CodecError as exc:
            raise BlockError(f"header is not canonical CBOR: {exc}") from exc
        if not isinstance(value, list) or len(value) != 8 or value[0] != "header":
            raise BlockError('header is not a ["header", ...] array of 8 items')
        _, market, height, prev, root, time, round_, proposer = value
        ints = (height, time, round_)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise BlockError("header height, time and round must be unsigned integers")
        if not (isinstance(prev, bytes) and len(prev) == 32):
            raise BlockError("header previous hash must be 32 bytes")
        if not (isinstance(root, bytes) and len(root) == 32):
            raise BlockError("header body root must be 32 bytes")
        if not (isinstance(market, str) and isinstance(proposer, str)):
            raise BlockError("header market and proposer must be text")
        return cls(market, height, prev, root, time, round_, proposer)


def block_statement(market: str, height: int, header_hash: bytes) -> list[object]:
    """The array the consensus members sign to certify a block."""
    return ["block", market, height, header_hash]


def body_root(txs: Sequence[Tx]) -> bytes:
    return root_of_hashes([tx.hash for tx in txs])


@dataclass(frozen=True)
class Block:
    header: Header
    txs: tuple[Tx, ...]
    qc: QuorumCertificate | None = None

    @property
    def height(self) -> int:
        return self.header.height

    @property
    def hash(self) -> bytes:
        return self.header.hash

    def statement(self) -> bytes:
        """Canonical bytes of the block statement consensus members sign."""
        h = self.header
        return codec.encode(block_statement(h.market, h.height, self.hash))

    def with_qc(self, qc: QuorumCertificate) -> Block:
        return Block(self.header, self.txs, qc)

    @classmethod
    def build(
        cls,
        *,
        market: str,
        height: int,
        prev: bytes,
        time: int,
        round: int,
        proposer: str,
        txs: Sequence[Tx],
    ) -> Block:
        """An unsigned block whose header commits to `txs`."""
        header = Header(market, height, prev, body_root(txs), time, round, proposer)
        return cls(header, tuple(txs))
