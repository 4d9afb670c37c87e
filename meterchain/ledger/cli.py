"""`meterchain ledger verify|show|prove|check-proof|checkpoint`: check, show, prove, checkpoint.

DB is a SQLite file path or a postgresql:// URL. `verify` exits 0 when every
block checks out and 1 naming the first bad block and why; 2 is a usage error
or a ledger that cannot be opened. With a stored signed checkpoint, `verify`
replays only the blocks after it (`--full`: from genesis). `checkpoint sign`
is run by each consensus member on its own replica (it verifies, then signs the
state at the head); `checkpoint combine` stores the checkpoint once more than
n/2 members' signatures agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import string
import sys
from pathlib import Path
from typing import Any

from meterchain import codec
from meterchain.errors import CodecError, MeterChainError
from meterchain.keys import PrivateKey, PublicKey
from meterchain.ledger import checkpoint as cp
from meterchain.ledger.block import BlockError, Header
from meterchain.ledger.chain import ChainError, check_head, latest_checkpoint, verify_store
from meterchain.ledger.merkle import ProofError
from meterchain.ledger.proof import build_proof, check_proof, resolve_reading
from meterchain.ledger.state import LedgerState
from meterchain.ledger.store import LedgerStore, StoreError, open_store
from meterchain.ledger.transactions import Tx, TxError
from meterchain.quorum import Membership, QuorumCertificate, QuorumError
from meterchain.times import iso_utc


def _open(target: str) -> LedgerStore:
    if not target.startswith(("postgresql://", "postgres://")) and not Path(target).exists():
        raise StoreError(f"{target}: no such ledger file")
    return open_store(target, create=False)


def _signed_head(text: str) -> QuorumCertificate:
    """A block certificate given as hex of its CBOR, or as the path of a file holding that hex."""
    raw = text
    if not all(c in string.hexdigits for c in text):
        try:
            raw = Path(text).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--signed-head: cannot read {text}: {exc}") from None
    try:
        return QuorumCertificate.from_cbor(codec.decode(bytes.fromhex(raw)))
    except (CodecError, QuorumError, ValueError) as exc:
        raise ValueError(f"--signed-head: not a hex CBOR block certificate: {exc}") from None


def _cmd_verify(ns: argparse.Namespace) -> int:
    regulator = PublicKey.from_hex(ns.regulator) if ns.regulator else None
    pinned = bytes.fromhex(ns.head) if ns.head else None
    if pinned is not None and len(pinned) != 32:
        raise ValueError("--head must be a 64-hex-digit block hash")
    signed_head = _signed_head(ns.signed_head) if ns.signed_head else None
    with _open(ns.db) as store:
        try:
            state, report = verify_store(
                store,
                signatures=not ns.no_signatures,
                regulator=regulator,
                checkpoint=None if ns.full else latest_checkpoint(store),
            )
            check_head(
                store,
                state,
                report,
                head=pinned,
                min_height=ns.min_height,
                signed_head=signed_head,
            )
            head_qc = store.stored_block(report.height).qc_raw.hex() if report.blocks else ""
        except ChainError as exc:
            if ns.json:
                print(json.dumps({"valid": False, "height": exc.height, "reason": exc.reason}))
            else:
                print(f"INVALID: {exc}", file=sys.stderr)
            return 1
    summary = {
        "valid": True,
        "market": report.market,
        "blocks": report.blocks,
        "transactions": report.transactions,
        "readings": report.readings,
        "reading_signatures_checked": report.signatures_checked,
        "height": report.height,
        "head": report.head.hex(),
        "head_certificate": head_qc,
        "regulator": report.regulator,
        "seconds": round(report.seconds, 3),
        "checkpoint": report.checkpoint,
    }
    if ns.json:
        print(json.dumps(summary))
    else:
        if report.blocks == 0:
            print("valid: the ledger is empty")
        else:
            print(
                f"valid: market {report.market}, {report.blocks} blocks, {report.transactions} "
                f"transactions, {report.readings} readings ({report.signatures_checked} reading "
                f"signatures checked), head {report.height} {report.head.hex()}, regulator "
                f"{report.regulator}, {report.seconds:.2f} s"
                + (
                    f", replayed after checkpoint {report.checkpoint}"
                    if report.checkpoint >= 0
                    else ""
                )
            )
    return 0


def _verified_head(store: LedgerStore, regulator: str | None) -> tuple[LedgerState, bytes]:
    """The state at the ledger's head, verified (after the stored checkpoint, if any)."""
    pinned = PublicKey.from_hex(regulator) if regulator else None
    state, report = verify_store(store, regulator=pinned, checkpoint=latest_checkpoint(store))
    if state is None:
        raise ValueError("the ledger is empty: nothing to checkpoint")
    return state, report.head


def _cmd_checkpoint_sign(ns: argparse.Namespace) -> int:
    key = PrivateKey.load(ns.key)
    with _open(ns.db) as store:
        try:
            state, head = _verified_head(store, ns.regulator)
        except ChainError as exc:
            print(f"INVALID: {exc}: refusing to sign", file=sys.stderr)
            return 1
    node, signature = cp.sign_checkpoint(state, head, ns.node, key)
    doc = {
        "market": state.market,
        "height": state.height,
        "hash": head.hex(),
        "digest": hashlib.sha256(cp.state_bytes(state)).hexdigest(),
        "node": node,
        "signature": signature.hex(),
    }
    text = json.dumps(doc)
    if ns.out:
        Path(ns.out).write_text(text + "\n")
    else:
        print(text)
    return 0


def _cmd_checkpoint_combine(ns: argparse.Namespace) -> int:
    with _open(ns.db) as store:
        try:
            state, head = _verified_head(store, ns.regulator)
        except ChainError as exc:
            print(f"INVALID: {exc}", file=sys.stderr)
            return 1
        signatures = []
        for path in ns.signatures:
            try:
                doc = json.loads(Path(path).read_text())
                where = (doc["market"], doc["height"], doc["hash"])
                signatures.append((str(doc["node"]), bytes.fromhex(doc["signature"])))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: not a checkpoint signature: {exc}") from None
            if where != (state.market, state.height, head.hex()):
                raise ValueError(
                    f"{path}: signs {where[0]} height {where[1]}, the verified head is "
                    f"{state.height} {head.hex()[:16]}"
                )
        checkpoint = cp.combine(state, head, signatures)
        stored = store.put_checkpoint(
            checkpoint.height,
            checkpoint.block_hash,
            checkpoint.digest,
            checkpoint.state,
            codec.encode(checkpoint.qc.to_cbor()),
        )
    print(
        f"checkpoint at height {checkpoint.height} "
        f"({'stored' if stored else 'already stored'}), signed by "
        f"{', '.join(checkpoint.qc.signers)}, state {len(checkpoint.state)} bytes"
    )
    return 0


def summary(store: LedgerStore, last: int = 10) -> dict[str, Any]:
    """What a ledger holds, read straight from the store (no verification)."""
    head = store.head()
    out: dict[str, Any] = {
        "height": head[0] if head else None,
        "head": head[1].hex() if head else None,
    }
    if head is None:
        return out
    kinds: dict[str, int] = {}
    participants: dict[str, dict[str, Any]] = {}
    meters: dict[str, dict[str, Any]] = {}
    blocks: list[dict[str, Any]] = []
    market = ""
    for stored in store.stored_blocks():
        try:
            header = Header.decode(stored.header_raw)
            qc = QuorumCertificate.from_cbor(codec.decode(stored.qc_raw))
        except (BlockError, CodecError, QuorumError) as exc:
            raise StoreError(f"block {stored.height} is unreadable: {exc}") from exc
        market = header.market
        counts: dict[str, int] = {}
        for kind, _, raw in stored.txs:
            counts[kind] = counts.get(kind, 0) + 1
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind in ("participant", "participant_exit", "meter", "meter_exit"):
                try:
                    body = Tx.decode(raw).body
                except TxError:
                    continue
                if kind == "participant":
                    participants[body["id"]] = {"role": body["role"], "active": True}
                elif kind == "participant_exit" and body["id"] in participants:
                    participants[body["id"]].update(active=False, exit=body["mode"])
                elif kind == "meter":
                    meters[body["id"]] = {
                        "owner": body["owner"],
                        "source": body["source"],
                        "active": True,
                    }
                elif kind == "meter_exit" and body["id"] in meters:
                    meters[body["id"]]["active"] = False
        blocks.append(
            {
                "height": header.height,
                "hash": stored.hash.hex(),
                "time": header.time,
                "time_utc": iso_utc(header.time),
                "round": header.round,
                "proposer": header.proposer,
                "signers": list(qc.signers),
                "transactions": counts,
            }
        )
        blocks = blocks[-last:]
    out.update(
        market=market,
        transactions=kinds,
        readings=store.reading_count(),
        participants=participants,
        meters=meters,
        last_blocks=blocks,
    )
    return out


def _cmd_show(ns: argparse.Namespace) -> int:
    with _open(ns.db) as store:
        info = summary(store, ns.last)
    if ns.json:
        print(json.dumps(info, indent=2))
        return 0
    if info["height"] is None:
        print("empty ledger")
        return 0
    print(f"market {info['market']}: height {info['height']}, head {info['head'][:16]}")
    print(f"readings: {info['readings']}")
    print("transactions: " + ", ".join(f"{k} {v}" for k, v in sorted(info["transactions"].items())))
    active = [p for p, v in info["participants"].items() if v["active"]]
    print(f"participants: {len(info['participants'])} ({len(active)} active): {', '.join(active)}")
    print(f"meters: {len(info['meters'])}")
    print(f"last {len(info['last_blocks'])} blocks:")
    for b in info["last_blocks"]:
        txs = ", ".join(f"{k} {v}" for k, v in sorted(b["transactions"].items()))
        print(
            f"  {b['height']:>6}  {b['hash'][:16]}  {iso_utc(b['time'])}  by {b['proposer']}  "
            f"signed {','.join(b['signers'])}  [{txs}]"
        )
    return 0


def _cmd_prove(ns: argparse.Namespace) -> int:
    with _open(ns.db) as store:
        digest = resolve_reading(store, ns.reading)
        proof = build_proof(store, digest)
    text = json.dumps(proof, indent=2)
    if ns.out:
        Path(ns.out).write_text(text + "\n")
    else:
        print(text)
    return 0


def _cmd_check_proof(ns: argparse.Namespace) -> int:
    try:
        doc = json.loads(Path(ns.proof).read_text())
    except (OSError, ValueError) as exc:
        raise ProofError(f"{ns.proof}: cannot read a JSON proof: {exc}") from exc
    header_hash = bytes.fromhex(ns.header_hash) if ns.header_hash else None
    membership = Membership.load(ns.membership) if ns.membership else None
    if membership is not None and ns.regulator:
        membership.verify(PublicKey.from_hex(ns.regulator))
    meter_key = PublicKey.from_hex(ns.meter_key) if ns.meter_key else None
    try:
        result = check_proof(
            doc, header_hash=header_hash, membership=membership, meter_key=meter_key
        )
    except ProofError as exc:
        print(f"INVALID proof: {exc}", file=sys.stderr)
        return 1
    print(
        f"valid: reading {result.meter_id}:{result.seq} is in block {result.height} "
        f"({result.header_hash.hex()[:16]}), anchored by {', '.join(result.anchored_by)}"
    )
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meterchain ledger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every hash, Merkle root, QC, signature, settlement")
    p.add_argument("db", help="SQLite file or postgresql:// URL")
    p.add_argument("--no-signatures", action="store_true", help="skip reading signature checks")
    p.add_argument("--regulator", help="pin the regulator's public key (hex point)")
    p.add_argument("--head", help="a block hash (hex) the ledger must hold: no truncation")
    p.add_argument("--min-height", type=int, help="a height the ledger must reach")
    p.add_argument(
        "--signed-head",
        help="a block certificate (hex CBOR, or a file of it; `verify --json` prints one as "
        "head_certificate) the ledger must hold: freshness against more than n/2 members",
    )
    p.add_argument(
        "--full", action="store_true", help="replay from genesis, ignoring a stored checkpoint"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("checkpoint", help="sign and store checkpoints of the verified state")
    csub = p.add_subparsers(dest="step", required=True)
    c = csub.add_parser("sign", help="verify, then sign the state at the head as one member")
    c.add_argument("db")
    c.add_argument("--node", required=True, help="this member's node id")
    c.add_argument("--key", required=True, help="this member's private key file")
    c.add_argument("--regulator", help="pin the regulator's public key (hex point)")
    c.add_argument("--out", help="write the signature JSON here instead of stdout")
    c.set_defaults(func=_cmd_checkpoint_sign)
    c = csub.add_parser("combine", help="store a checkpoint from > n/2 members' signatures")
    c.add_argument("db")
    c.add_argument("signatures", nargs="+", help="signature JSON files from `checkpoint sign`")
    c.add_argument("--regulator", help="pin the regulator's public key (hex point)")
    c.set_defaults(func=_cmd_checkpoint_combine)
    p = sub.add_parser("show", help="summarise a ledger")
    p.add_argument("db")
    p.add_argument("--json", action="store_true")
    p.add_argument("--last", type=int, default=10, help="how many recent blocks to list")
    p.set_defaults(func=_cmd_show)
    p = sub.add_parser("prove", help="inclusion proof of one reading (JSON)")
    p.add_argument("db")
    p.add_argument("reading", help="reading digest (64 hex digits) or METER:SEQ")
    p.add_argument("--out", help="write the proof here instead of stdout")
    p.set_defaults(func=_cmd_prove)
    p = sub.add_parser("check-proof", help="check a reading inclusion proof without the ledger")
    p.add_argument("proof", help="proof JSON from `ledger prove`")
    p.add_argument("--header-hash", help="a block header hash you trust (hex)")
    p.add_argument("--membership", help="membership TOML to check the block's QC against")
    p.add_argument("--regulator", help="regulator key (hex) the membership must be signed by")
    p.add_argument("--meter-key", help="the meter's public key (hex) to check the signature")
    p.set_defaults(func=_cmd_check_proof)
    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns))
    except (StoreError, ProofError, MeterChainError, ValueError) as exc:
        print(f"meterchain ledger {ns.command}: {exc}", file=sys.stderr)
        return 2
