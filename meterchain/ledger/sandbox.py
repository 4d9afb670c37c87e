"""A self-contained market for tests, benchmarks and demos: deterministic keys and records.

`Sandbox` holds a regulator key, consensus member keys and every participant's
and meter's key (all derived from names, so runs are reproducible), and builds
correctly signed transactions, signed readings and sealed blocks. `Chain` drives
a store the way the aggregator does: apply a block to the state with every
check, collect the members' signatures, commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meterchain import reading
from meterchain.keys import ORDER, PrivateKey
from meterchain.ledger.block import GENESIS_PREV, Block
from meterchain.ledger.readings import LedgerReading
from meterchain.ledger.review import accept_block
from meterchain.ledger.state import LedgerState, ReadingSource, membership_fields
from meterchain.ledger.store import LedgerStore
from meterchain.ledger.transactions import Tx, reading_batch, signed, statement
from meterchain.quorum import Member, Membership, QuorumCertificate


def named_key(name: str) -> PrivateKey:
    """A deterministic P-256 key derived from a name (never use outside tests and demos)."""
    secret = int.from_bytes(hashlib.sha256(b"meterchain-sandbox:" + name.encode()).digest(), "big")
    return PrivateKey.from_secret(secret % (ORDER - 1) + 1)


@dataclass
class Sandbox:
    market: str = "m1"
    members: int = 3
    keys: dict[str, PrivateKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.regulator = named_key(f"{self.market}/regulator")
        self.node_ids = [f"node{i}" for i in range(self.members)]
        self.membership = Membership(
            self.market,
            1,
            tuple(Member(n, self.key(n).public_key()) for n in self.node_ids),
        ).signed_by(self.regulator)

    def key(self, name: str) -> PrivateKey:
        if name not in self.keys:
            self.keys[name] = named_key(f"{self.market}/{name}")
        return self.keys[name]

    # --- transactions ---------------------------------------------------------------
    def genesis_tx(self, time: int) -> Tx:
        return Tx.make(
            "genesis",
            {
                "market": self.market,
                "time": time,
                "regulator": self.regulator.public_key().point,
                **membership_fields(self.membership),
            },
        )

    def participant(self, pid: str, role: str, time: int) -> Tx:
        terms = {"id": pid, "role": role, "key": self.key(pid).public_key().point, "time": time}
        return signed(self.market, "participant", terms, self.regulator)

    def participant_exit(self, pid: str, mode: str, reason: str, time: int) -> Tx:
        terms = {"id": pid, "mode": mode, "reason": reason, "time": time}
        return signed(self.market, "participant_exit", terms, self.regulator)

    def meter(self, meter_id: str, owner: str, source: str, time: int) -> Tx:
        terms = {
            "id": meter_id,
            "owner": owner,
            "key": self.key(meter_id).public_key().point,
            "source": source,
            "time": time,
        }
        return signed(self.market, "meter", terms, self.regulator)

    def veto(self, target: bytes, reason: str, time: int) -> Tx:
        terms = {"target": target, "reason": reason, "time": time}
        return signed(self.market, "veto", terms, self.regulator)

    def order(self, terms: Mapping[str, Any], signers: Sequence[str] | None = None) -> Tx:
        """An order signed by the trading centre, dispatch and (default) all three parties."""
        return self._multi_signed("order", terms, signers)

    def order_change(self, terms: Mapping[str, Any], signers: Sequence[str]) -> Tx:
        return self._multi_signed("order_change", terms, signers)

    def _multi_signed(
        self, kind: str, terms: Mapping[str, Any], signers: Sequence[str] | None
    ) -> Tx:
        message = statement(self.market, kind, terms)
        if signers is None:
            signers = [terms["buyer"], terms["seller"], terms["grid"]]
        dispatch = terms.get("dispatch", "dispatch")
        body = dict(terms)
        body["audit"] = self.regulator.sign(message)
        body["security"] = self.key(dispatch).sign(message)
        body["signatures"] = {s: self.key(s).sign(message) for s in signers}
        return Tx.make(kind, body)

    def owner_signed(self, kind: str, terms: Mapping[str, Any], owner: str) -> Tx:
        return signed(self.market, kind, terms, self.key(owner), field="owner_sig")

    def clearing(
        self,
        hour: int,
        request: Any,
        result: Any,
        *,
        round: int = 1,
        view: int = 0,
        signers: Sequence[str] | None = None,
        final: bool = False,
    ) -> Tx:
        """A committed clearing as the consensus agents certify it (SDBFT vote statement,
        or with `final` the view-independent finality statement and view -1).

        `request`/`result` are `meterchain.market.clearing` objects; each microgrid's
        consensus request is signed with its participant key.
        """
        from meterchain import codec
        from meterchain.ledger.settle import value_digest

        round_id = [round, "clear"]
        requests = []
        for trade_request in request.requests:
            who = trade_request.microgrid.id
            stmt = codec.encode(
                ["req", self.market, round_id, 0, b"deposit:" + who.encode(), who,
                 trade_request.to_dict()]
            )  # fmt: skip
            requests.append(codec.encode([stmt, who, self.key(who).sign(stmt), None]))
        value = result.to_dict()
        digest = value_digest(self.market, round_id, requests, value)
        if final:
            view = -1
            stmt = codec.encode(["final", self.market, round_id, 0, digest])
        else:
            stmt = codec.encode(["vote", self.market, round_id, view, digest])
        names = self.node_ids if signers is None else signers
        qc = QuorumCertificate.collect(stmt, [(n, self.key(n).sign(stmt)) for n in names])
        return Tx.make(
            "clearing",
            {
                "round": round, "round_kind": "clear", "view": view, "hour": hour,
                "requests": requests, "value": codec.encode(value),
                "request": request.to_cbor(), "result": result.to_cbor(), "qc": qc.to_cbor(),
            },
        )  # fmt: skip

    def reading(
        self,
        meter_id: str,
        seq: int,
        time: int,
        import_wh: int,
        export_wh: int,
        source: str,
        power_w: int = 0,
    ) -> LedgerReading:
        cose = reading.sign_reading(
            self.key(meter_id), meter_id, seq, time, import_wh, export_wh, power_w, 0, source
        )
        digest = hashlib.sha256(cose).digest()
        return LedgerReading(digest, meter_id, seq, time, import_wh, export_wh, cose)

    # --- blocks -------------------------------------------------------------------------
    def seal(self, block: Block, signers: Sequence[str] | None = None) -> Block:
        """`block` with a QC signed by `signers` (default: every member)."""
        message = block.statement()
        names = self.node_ids if signers is None else signers
        return block.with_qc(
            QuorumCertificate.collect(message, [(n, self.key(n).sign(message)) for n in names])
        )


@dataclass
class Chain:
    """Drives a store like the aggregator: check each block against the state, seal, commit."""

    sandbox: Sandbox
    store: LedgerStore
    state: LedgerState | None = None
    proposer: str = "aggregator"

    def source(self) -> ReadingSource:
        from meterchain.ledger.chain import StoreReadings

        return StoreReadings(self.store)

    def genesis(self, time: int, txs: Sequence[Tx] = ()) -> Block:
        """Found the market: block 0 with the genesis transaction and `txs`, all members signing."""
        block = Block.build(
            market=self.sandbox.market, height=0, prev=GENESIS_PREV, time=time, round=0,
            proposer=self.proposer, txs=[self.sandbox.genesis_tx(time), *txs],
        )  # fmt: skip
        sealed = self.sandbox.seal(block)
        state = accept_block(None, sealed, {}, self.source())
        self.store.append(sealed)
        self.state = state
        return sealed

    def build(
        self,
        txs: Sequence[Tx],
        time: int,
        readings: Mapping[int, Sequence[LedgerReading]] | None = None,
        round: int = 0,
    ) -> Block:
        """An unsealed block on top of the store's head."""
        head = self.store.head()
        assert head is not None, "genesis first"
        return Block.build(
            market=self.sandbox.market, height=head[0] + 1, prev=head[1], time=time,
            round=round, proposer=self.proposer, txs=txs,
        )  # fmt: skip

    def commit(
        self,
        txs: Sequence[Tx],
        time: int,
        readings: Mapping[int, Sequence[LedgerReading]] | None = None,
        *,
        signatures: bool = True,
        signers: Sequence[str] | None = None,
    ) -> Block:
        """Check, seal and store one block; the state moves on only when all of that worked."""
        assert self.state is not None, "genesis first"
        readings = readings or {}
        if signers is None:
            signers = self.state.membership.node_ids
        sealed = self.sandbox.seal(self.build(txs, time, readings), signers)
        state = accept_block(self.state, sealed, readings, self.source(), signatures=signatures)
        self.store.append(sealed, readings)
        self.state = state
        return sealed

    def commit_readings(
        self, readings: Iterable[LedgerReading], time: int, *, signatures: bool = True
    ) -> Block:
        """One block holding one batch per hour of `readings`."""
        by_hour: dict[int, list[LedgerReading]] = {}
        for r in readings:
            by_hour.setdefault(r.hour, []).append(r)
        txs: list[Tx] = []
        batches: dict[int, tuple[LedgerReading, ...]] = {}
        for hour in sorted(by_hour):
            tx, ordered = reading_batch(hour, by_hour[hour])
            batches[len(txs)] = ordered
            txs.append(tx)
        return self.commit(txs, time, batches, signatures=signatures)
