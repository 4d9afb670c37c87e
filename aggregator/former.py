"""Block formation: what is waiting becomes the next proposal; a proposal plus votes, a block.

`BlockFormer.propose(now)` gathers, in this order: pending transactions
(registrations, exits, orders, vetoes, committed clearings, certificate
transfers and retirements) that still pass the ledger rules; the verified
readings in the inbox, one batch per hour; the settlement of every cleared
hour that ended more than `settle_grace_s` ago (SC2 at v+2), each preceded by the
weak centre's congestion record when the cleared schedule breaks a line limit of
the recorded grid network (M25, `congestion_method` "adjust" or "price") and
followed by the remedies for trades that fell short (M21, `remedies` in the
order to try them, `meterchain.ledger.weakcentre`) and, when a settled hour
closes a day, the monitoring contract's suspect report if it names anyone
(M19); certificate issues
for renewable meters whose new readings earn a certificate; and the contract
client's firings and forfeits (M26). Each piece is applied to a working copy of
the state, so the proposal is exactly what reviewers will re-execute.
`commit(proposal, votes)` seals it with the members' quorum certificate and
stores it in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from meterchain import codec, reading
from meterchain.errors import MeterChainError
from meterchain.ledger import settle, weakcentre
from meterchain.ledger.block import GENESIS_PREV, Block, BlockError
from meterchain.ledger.chain import StoreReadings
from meterchain.ledger.contracts import due_actions
from meterchain.ledger.readings import HOUR, LedgerReading
from meterchain.ledger.review import Proposal, accept_block, genesis_state
from meterchain.ledger.state import LedgerState, TxContext
from meterchain.ledger.store import LedgerStore
from meterchain.ledger.transactions import Tx, TxError, reading_batch
from meterchain.market import congestion, failed_execution, monitoring
from meterchain.quorum import QuorumCertificate

log = logging.getLogger("meterchain.aggregator.former")
MONITOR_WINDOW_H = 24  # the monitoring contract runs over each settled day (M19)


@dataclass
class Formation:
    """What went into (or was turned away from) one proposal."""

    proposal: Proposal | None
    dropped: list[tuple[Tx, str]] = field(default_factory=list)
    readings: int = 0
    settled_hours: list[int] = field(default_factory=list)


class BlockFormer:
    def __init__(
        self,
        store: LedgerStore,
        state: LedgerState | None,
        *,
        proposer: str,
        settle_grace_s: int = 300,
        max_readings: int = 50_000,
        congestion_method: str = congestion.ADJUST,
        remedies: tuple[str, ...] = failed_execution.REMEDIES,
    ) -> None:
        self.store = store
        self.congestion_method = congestion_method
        self.remedies = remedies
        self._within_limits: set[tuple[bytes, bytes]] = set()  # (clearing, network) checked
        self.state = state
        self.proposer = proposer
        self.settle_grace_s = settle_grace_s
        self.max_readings = max_readings
        self.source = StoreReadings(store)
        self.round = 0

    # --- proposing ------------------------------------------------------------------
    def propose_genesis(self, genesis: Tx, txs: Sequence[Tx], now: int) -> Proposal:
        """Block 0: the genesis transaction founding the market, then `txs`."""
        block = Block.build(
            market=genesis.body["market"], height=0, prev=GENESIS_PREV, time=now, round=0,
            proposer=self.proposer, txs=[genesis, *txs],
        )  # fmt: skip
        genesis_state(block, self.source)  # refuse here what reviewers would refuse
        return Proposal(block, {})

    def propose(self, now: int) -> Formation:
        """The next block from everything waiting, or a Formation without a proposal."""
        if self.state is None:
            raise BlockError("the ledger has no genesis block yet")
        head = self.store.head()
        assert head is not None
        height = head[0] + 1
        time = max(now, self.state.time)
        work = self.state.copy()
        work.begin_block(height, time)
        txs: list[Tx] = []
        batches: dict[int, tuple[LedgerReading, ...]] = {}
        formation = Formation(None)

        def include(tx: Tx, rows: Sequence[LedgerReading] = ()) -> bool:
            nonlocal work
            trial = work.copy()
            ctx = TxContext(
                height, len(txs), time, [(p, r.row()) for p, r in enumerate(rows)], False,
                self.source,
            )  # fmt: skip
            try:
                trial.apply(tx, ctx)
            except TxError as exc:
                formation.dropped.append((tx, str(exc)))
                return False
            work = trial
            if tx.kind == "readings":
                batches[len(txs)] = tuple(rows)
            txs.append(tx)
            return True

        for tx in self.store.pending_txs():
            if not include(tx):
                # It broke a rule against the ledger as it stands; it never will pass later
                # (a replay, a bad signature) or must be resubmitted (e.g. after a change).
                self.store.drop_pending_tx(tx.hash)
        for hour, group in _by_hour(self._inbox(work, time)):
            batch_tx, ordered = reading_batch(hour, group)
            if include(batch_tx, ordered):
                formation.readings += len(ordered)
        for tx in self._congestion_records(work):
            include(tx)
        for hour in sorted(work.clearings):
            if hour in work.settlements or time < (hour + 1) * HOUR + self.settle_grace_s:
                continue
            try:
                tx = settle.settlement_tx(work, hour)
            except TxError as exc:
                log.error("hour %d cannot be settled: %s", hour, exc)
                continue
            if include(tx):
                formation.settled_hours.append(hour)
        for hour in formation.settled_hours:
            try:
                remedy = weakcentre.remedy_tx(work, hour, self.remedies)
            except TxError as exc:
                log.error("remedies of hour %d: %s", hour, exc)
                continue
            if remedy is not None:
                include(remedy)
        for hour in formation.settled_hours:
            if (hour + 1) % MONITOR_WINDOW_H == 0:
                report = self._suspect_report(work, hour + 1 - MONITOR_WINDOW_H, hour + 1, time)
                if report is not None:
                    include(report)
        for tx in self._certificate_issues(work, height):
            include(tx)
        for tx in due_actions(work, time):
            include(tx)
        work.end_block()
        if not txs:
            return formation
        block = Block.build(
            market=work.market, height=height, prev=head[1], time=time, round=self.round,
            proposer=self.proposer, txs=txs,
        )  # fmt: skip
        formation.proposal = Proposal(block, batches)
        return formation

    def _congestion_records(self, work: LedgerState) -> Iterable[Tx]:
        """The weak centre's check of every cleared, unsettled hour against the line limits."""
        if work.network is None:
            return
        network = weakcentre.network_from(work.network).digest
        for hour, clearing in sorted(work.clearings.items()):
            key = (clearing.tx, network)
            if hour in work.settlements or hour in work.congestion or key in self._within_limits:
                continue
            try:
                tx = weakcentre.congestion_tx(work, hour, self.congestion_method)
            except TxError as exc:
                log.error("congestion check of hour %d: %s", hour, exc)
                continue
            if tx is None:
                self._within_limits.add(key)
            else:
                yield tx

    def _suspect_report(self, work: LedgerState, start: int, end: int, time: int) -> Tx | None:
        """The monitoring contract (M19) over a settled day: a report if it names suspects."""
        try:
            report = monitoring.monitor(work.monitoring_activity(start, end))
        except (TxError, monitoring.MonitoringError) as exc:
            log.error("monitoring of hours %d..%d: %s", start, end - 1, exc)
            return None
        if not report.suspects:
            return None
        log.warning("suspects reported to the regulator: %s",
                    ", ".join(s.participant for s in report.suspects))  # fmt: skip
        body = {"reporter": self.proposer, "report": codec.encode(report.suspect_dict()),
                "time": time}  # fmt: skip
        return Tx.make("suspect_report", body)

    def _inbox(self, work: LedgerState, time: int) -> list[LedgerReading]:
        """Inbox readings of registered meters (others wait), no more than one block holds."""
        active = {m.id for m in work.meters.values() if m.active}
        out = [r for r in self.store.inbox_readings(before_time=time + 1) if r.meter_id in active]
        return out[: self.max_readings]

    def _certificate_issues(self, work: LedgerState, height: int) -> Iterable[Tx]:
        """An issue for each renewable meter whose committed readings earn a certificate now."""
        for meter_id, account in sorted(work.certificates.accounts.items()):
            meter = work.meters.get(meter_id)
            last = self.store.meter_last_seq(meter_id)
            if meter is None or not meter.active or last is None or last <= account.last_seq:
                continue
            earned = work.earnable_certificates(meter_id, last, self.source, height)
            if earned:
                yield Tx.make("cert_issue", {"meter": meter_id, "to_seq": last, "certs": earned})

    # --- committing -----------------------------------------------------------------
    def commit(self, proposal: Proposal, votes: Iterable[tuple[str, bytes]]) -> Block:
        """Seal `proposal` with the members' votes and store it; the state moves on."""
        block = proposal.block
        sealed = block.with_qc(QuorumCertificate.collect(block.statement(), votes))
        state = accept_block(self.state, sealed, proposal.readings, self.source, signatures=False)
        self.store.append(sealed, proposal.readings)
        self.state = state
        self.round += 1
        return sealed


def _by_hour(readings: Sequence[LedgerReading]) -> list[tuple[int, list[LedgerReading]]]:
    groups: dict[int, list[LedgerReading]] = {}
    for r in readings:
        groups.setdefault(r.hour, []).append(r)
    return sorted(groups.items())


def verify_for_ingest(
    data: bytes, state: LedgerState, now: int
) -> tuple[LedgerReading | None, str | None]:
    """A signed reading checked against the meters on the ledger: (reading, None) or (None, why)."""
    try:
        verified = reading.verify(data, state.registry(), now=now)
    except MeterChainError as exc:
        return None, f"{getattr(exc, 'reason', 'rejected')}: {exc}"
    return LedgerReading.from_reading(verified, verified.signed), None
