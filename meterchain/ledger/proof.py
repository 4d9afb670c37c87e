"""Reading inclusion proofs an extension node checks without the ledger (M10).

A proof chains one signed reading to a certified block: the reading's digest
is a leaf of its batch's Merkle tree, the batch transaction is a leaf of the
block body's Merkle tree, the body root is in the header, and the header hash
is what the consensus members' quorum certificate signs. `check_proof` walks
that chain; the checker anchors it either with a header hash it already
trusts (synced from a consensus node) or with the membership list the
regulator signed (then the QC itself is checked).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from meterchain import codec, reading
from meterchain.errors import CodecError, MeterChainError, RejectedReading
from meterchain.keys import PublicKey
from meterchain.ledger.block import BlockError, Header, block_statement
from meterchain.ledger.merkle import InclusionProof, ProofError, leaf_hash, prove, root_from_proof
from meterchain.ledger.readings import ReadingFormatError, parse, source_of
from meterchain.ledger.store import LedgerStore
from meterchain.ledger.transactions import Tx, TxError
from meterchain.quorum import Membership, QuorumCertificate, QuorumError
from meterchain.registry import Registry, make_meter

PROOF_VERSION = 1


def resolve_reading(store: LedgerStore, ref: str) -> bytes:
    """A reading reference (64 hex digits of its digest, or METER:SEQ) to its digest."""
    text = ref.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    meter_id, sep, seq = text.rpartition(":")
    if sep and meter_id and seq.isdigit():
        digest = store.digest_of(meter_id, int(seq))
        if digest is None:
            raise ProofError(f"no reading {meter_id}:{seq} in the ledger")
        return digest
    raise ProofError(f"{ref!r} is neither a 64-hex-digit reading digest nor METER:SEQ")


def build_proof(store: LedgerStore, digest: bytes) -> dict[str, Any]:
    """The JSON-able inclusion proof of a committed reading."""
    found = store.find_reading(digest)
    if found is None:
        raise ProofError(f"reading {digest.hex()} is not committed in a block (yet)")
    height, idx, pos, row = found
    rows = store.batch_rows(height, idx)
    sha256 = hashlib.sha256
    reading_proof = prove([sha256(b"\x00" + r[0]).digest() for _, r in rows], pos)
    stored = store.stored_block(height)
    tx_proof = prove([leaf_hash(body) for _, _, body in stored.txs], idx)
    return {
        "version": PROOF_VERSION,
        "reading": {
            "cose": row[6].hex(),
            "digest": digest.hex(),
            "meter_id": row[1],
            "seq": row[2],
            "time": row[3],
        },
        "batch": {"tx": stored.txs[idx][2].hex(), "proof": reading_proof.to_json()},
        "block": {
            "height": height,
            "header": stored.header_raw.hex(),
            "hash": stored.hash.hex(),
            "tx_proof": tx_proof.to_json(),
            "qc": stored.qc_raw.hex(),
        },
    }


@dataclass(frozen=True)
class ProofResult:
    height: int
    header_hash: bytes
    meter_id: str
    seq: int
    anchored_by: tuple[str, ...]  # "header-hash", "quorum-certificate", "meter-key"


def _hex(doc: dict[str, Any], section: str, key: str) -> bytes:
    try:
        return bytes.fromhex(doc[section][key])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProofError(f"proof field {section}.{key} is missing or not hex") from exc


def check_proof(
    doc: dict[str, Any],
    *,
    header_hash: bytes | None = None,
    membership: Membership | None = None,
    meter_key: PublicKey | None = None,
    meter_source: str | None = None,
) -> ProofResult:
    """Raise ProofError unless the proof leads from its reading to a trusted header.

    Trust comes from `header_hash` (a header the checker already holds) and/or
    `membership` (the QC in the proof must carry more than n/2 member signatures).
    With `meter_key` the reading's COSE signature is checked too.
    """
    if not isinstance(doc, dict) or doc.get("version") != PROOF_VERSION:
        raise ProofError(f"not a version {PROOF_VERSION} MeterChain inclusion proof")
    if header_hash is None and membership is None:
        raise ProofError("give a trusted header hash or the membership to anchor the proof")
    cose = _hex(doc, "reading", "cose")
    digest = hashlib.sha256(cose).digest()
    if digest != _hex(doc, "reading", "digest"):
        raise ProofError("reading digest does not match the reading's bytes")
    try:
        tx = Tx.decode(_hex(doc, "batch", "tx"))
    except TxError as exc:
        raise ProofError(f"batch transaction: {exc}") from exc
    if tx.kind != "readings":
        raise ProofError(f"batch transaction is a {tx.kind}, not a reading batch")
    reading_proof = InclusionProof.from_json(doc["batch"].get("proof"))
    if reading_proof.size != tx.body["count"]:
        raise ProofError("reading proof is for a tree of another size than the batch")
    if root_from_proof(leaf_hash(digest), reading_proof) != tx.body["root"]:
        raise ProofError("reading is not in the batch (Merkle path leads elsewhere)")
    try:
        header_raw = _hex(doc, "block", "header")
        header = Header.decode(header_raw)
    except BlockError as exc:
        raise ProofError(f"block header: {exc}") from exc
    tx_proof = InclusionProof.from_json(doc["block"].get("tx_proof"))
    if root_from_proof(leaf_hash(tx.raw), tx_proof) != header.root:
        raise ProofError("batch transaction is not in the block body (Merkle path leads elsewhere)")
    actual_hash = hashlib.sha256(header_raw).digest()
    anchors: list[str] = []
    if header_hash is not None:
        if actual_hash != header_hash:
            raise ProofError("block header is not the trusted header")
        anchors.append("header-hash")
    if membership is not None:
        try:
            qc = QuorumCertificate.from_cbor(codec.decode(_hex(doc, "block", "qc")))
            qc.verify(membership, expect=block_statement(header.market, header.height, actual_hash))
        except (QuorumError, CodecError) as exc:
            raise ProofError(f"quorum certificate: {exc}") from exc
        anchors.append("quorum-certificate")
    try:
        parsed = parse(cose)
    except ReadingFormatError as exc:
        raise ProofError(f"reading: {exc}") from exc
    if meter_key is not None:
        # The reading must claim the registered source; absent a registry, take its own claim.
        source = meter_source or source_of(cose) or "load"
        try:
            registry = Registry([make_meter(parsed.meter_id, meter_key, "owner", source)])
            reading.verify(cose, registry)
        except (RejectedReading, MeterChainError) as exc:
            raise ProofError(f"reading signature: {exc}") from exc
        anchors.append("meter-key")
    return ProofResult(header.height, actual_hash, parsed.meter_id, parsed.seq, tuple(anchors))
