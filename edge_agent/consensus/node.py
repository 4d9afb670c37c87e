"""The SDBFT state machine of one consensus node: events in, actions out, no I/O and no clock.

`Node.step(event)` takes an `Open` (the application starts a round and
submits its own request), a `Message` (bytes received, with the current time)
or a `Tick` (time passed) and returns the actions to carry out, in order:
`Persist` records first (the transport must make them durable before it
publishes anything that follows), then `Broadcast`, `Commit` and `Final`.
`next_deadline()` says when the node next needs a `Tick`. The protocol is
described in the package docstring (`edge_agent.consensus`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_agent.consensus.contracts import Contract
from edge_agent.consensus.messages import (
    Decoder,
    Envelope,
    MessageError,
    Proposal,
    Request,
    RoundId,
    Value,
    blame_statement,
    final_statement,
    header,
    parse_qc,
    seal,
    statement,
    vote_statement,
)
from edge_agent.consensus.signing import Keyring, Signer
from meterchain import codec
from meterchain.errors import CodecError, MeterChainError
from meterchain.quorum import QuorumCertificate, QuorumError

LOOKAHEAD_ROUNDS = 2  # rounds not yet opened here whose messages are held back
# Held messages of a round not open here: at most HOLD_PER_SENDER distinct messages per
# sender and round (a correct member sends far fewer within the delta by which correct
# nodes' opens differ), so a flooding sender only ever loses its own messages.
HOLD_PER_SENDER = 16
# Before its first Open a node knows no current round to centre the window on, so it
# holds messages of any round, but at most PRE_OPEN_PER_SENDER rounds started by one
# sender and PRE_OPEN_ROUNDS_PER_MEMBER x n rounds in all; the first Open then keeps
# only the window around it.
PRE_OPEN_PER_SENDER = 2 * LOOKAHEAD_ROUNDS + 1
PRE_OPEN_ROUNDS_PER_MEMBER = PRE_OPEN_PER_SENDER
RETAIN_DECIDED = 512  # decided rounds kept in memory to answer catch-up requests
VOTES_PER_MEMBER_VIEW = 3  # digests one member may vote for in a view (a correct one: 1)
# A decided node answers these (from a member still working on the round) with its
# finality certificate, so a lagging node never depends on a timer an adversary resets.
HELP_TAGS = frozenset({"blame", "cert", "status", "sync"})


class ConsensusError(MeterChainError):
    """The application used the state machine wrongly (unknown round kind, bad config)."""


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Open:
    """The application starts round `round` here and (if `submit`) submits its own request."""

    now_ms: int
    round: RoundId
    deposit: bytes = b"\x00"
    body: Any = None
    submit: bool = True
    catch_up: bool = False  # opened after the fact (missed while down): learn, do not vote


@dataclass(frozen=True)
class Message:
    """Bytes received; `sender` is the node id the transport saw them come from, if known."""

    now_ms: int
    data: bytes
    sender: str | None = None


@dataclass(frozen=True)
class Tick:
    now_ms: int


Event = Open | Message | Tick


# --- actions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Persist:
    """Durable snapshot of one round's state; write it before any later action goes out."""

    round: RoundId
    record: bytes


@dataclass(frozen=True)
class Broadcast:
    """Publish `data` to every consensus node (MQTT: on this node's own topic of `kind`)."""

    kind: str
    data: bytes


@dataclass(frozen=True)
class Commit:
    """This node now treats `value` as the final result of `round`.

    `view` and `certificate` (the vote quorum certificate) are set when the
    node decided by its own 2-delta rule; after a catch-up through a finality
    certificate `view` is -1 and `certificate` may be None.
    """

    round: RoundId
    view: int
    digest: bytes
    value: Value
    certificate: QuorumCertificate | None


@dataclass(frozen=True)
class Final:
    """More than n/2 members attested that `value` is final: a proof anyone can check."""

    round: RoundId
    digest: bytes
    value: Value
    certificate: QuorumCertificate


Action = Persist | Broadcast | Commit | Final


# --- per-round state ------------------------------------------------------------------


@dataclass
class _Round:
    rid: RoundId
    opened_at: int
    recovering: bool = False
    my_request: bytes | None = None
    requests: dict[str, Request] = field(default_factory=dict)
    view: int = 0
    waiting: bool = False  # left view-1 after a change-primary certificate, not entered yet
    wait_until: int = 0
    status_early: int = 0  # when the status may go out before entering (see _check_vcc)
    status_sent: set[int] = field(default_factory=set)  # views we sent our status for
    entered_at: int = 0
    relayed: frozenset[str] = frozenset()  # submitters whose requests our request relayed
    # proposals: view -> signed statement -> signed header (at most two: an equivocation
    # proof); bodies: signed statement -> the whole proposal (value, vote, justification)
    headers: dict[int, dict[bytes, Envelope]] = field(default_factory=dict)
    bodies: dict[bytes, Proposal] = field(default_factory=dict)
    seen_proposals: set[bytes] = field(default_factory=set)
    evidence_sent: set[int] = field(default_factory=set)  # views whose equivocation we relayed
    fetch_wanted: set[tuple[int, bytes]] = field(default_factory=set)  # asked of us: (view, vd)
    fetch_answered: int = -(2**62)
    fetch_asked: dict[tuple[int, bytes], int] = field(default_factory=dict)  # we asked, when
    vote_digests: dict[tuple[str, int], set[bytes]] = field(default_factory=dict)
    verdicts: dict[bytes, str] = field(default_factory=dict)
    justified: dict[bytes, bool] = field(default_factory=dict)
    values: dict[bytes, Value] = field(default_factory=dict)
    proposed: set[int] = field(default_factory=set)
    voted: dict[int, bytes] = field(default_factory=dict)
    vote_time: dict[int, int] = field(default_factory=dict)
    votes: dict[tuple[int, bytes], dict[str, bytes]] = field(default_factory=dict)
    all_voted_time: dict[tuple[int, bytes], int] = field(default_factory=dict)  # n votes held
    qcs: dict[tuple[int, bytes], QuorumCertificate] = field(default_factory=dict)
    qc_time: dict[tuple[int, bytes], int] = field(default_factory=dict)
    qc_header: dict[tuple[int, bytes], bytes] = field(default_factory=dict)  # signed header
    lock: tuple[int, bytes] | None = None
    forwarded: dict[int, int] = field(default_factory=dict)
    blamed: set[int] = field(default_factory=set)
    blames: dict[int, dict[str, bytes]] = field(default_factory=dict)
    blame_first: dict[int, int] = field(default_factory=dict)
    vcc: dict[int, QuorumCertificate] = field(default_factory=dict)
    vcc_sent: set[int] = field(default_factory=set)
    statuses: dict[int, dict[str, bytes]] = field(default_factory=dict)
    status_locks: dict[int, dict[str, tuple[int, bytes]]] = field(default_factory=dict)
    committed: tuple[int, bytes] | None = None
    commit_time: int = 0
    finals: dict[bytes, dict[str, bytes]] = field(default_factory=dict)
    fc: tuple[bytes, QuorumCertificate] | None = None
    final_resent: bool = False
    next_sync: int = 0
    sync_after: int = 0  # after blaming: ask for the decision if nothing else helps
    dirty: bool = False


class Node:
    """One consensus node of one market (see the package docstring for the protocol)."""

    def __init__(
        self,
        signer: Signer,
        keyring: Keyring,
        contracts: Mapping[str, Contract],
        *,
        delta_ms: int,
        decoder: Decoder | None = None,
        records: Iterable[bytes] = (),
    ) -> None:
        if delta_ms < 2:
            raise ConsensusError("delta_ms must be at least 2 (timers add 1 ms margins)")
        self.signer = signer
        self.node_id = signer.node_id
        self.keyring = keyring
        self.membership = keyring.membership
        if not keyring.is_member(self.node_id):
            raise ConsensusError(f"{self.node_id!r} is not in the membership")
        self.market = self.membership.market
        self.n = self.membership.n
        self._rotation = self.membership.node_ids
        self.q = self.membership.quorum
        self.delta = delta_ms
        self.contracts = dict(contracts)
        self.decoder = decoder or Decoder()
        self.now = 0
        self.rounds: dict[RoundId, _Round] = {}
        self.decided: OrderedDict[RoundId, tuple[bytes, Value, QuorumCertificate]] = OrderedDict()
        self.max_seq = -1
        self.held: dict[RoundId, list[Envelope]] = {}
        self.held_raw: dict[RoundId, set[bytes]] = {}  # de-duplication of held messages
        self.held_per_sender: Counter[tuple[RoundId, str]] = Counter()
        self.overflowed: set[RoundId] = set()
        self.anchored = False  # an Open happened since start: the hold window has a centre
        self.lost_unrecorded = False  # a pre-open drop that `overflowed` had no room for
        self.sync_answered: dict[RoundId, int] = {}
        self.stats: Counter[str] = Counter()
        self.last_error = ""
        self._handlers = {
            "req": self._on_request,
            "prop": self._on_direct_proposal,
            "vote": self._on_vote,
            "blame": self._on_blame,
            "cert": self._on_cert,
            "status": self._on_status,
            "final": self._on_final,
            "sync": self._on_sync,
            "value": self._on_value,
        }
        self._restore(records)

    # --- public API ----------------------------------------------------------------

    def step(self, event: Event) -> list[Action]:
        self.now = max(self.now, event.now_ms)
        out: list[Action] = []
        if isinstance(event, Open):
            self._open(event, out)
        elif isinstance(event, Message):
            self._receive(event.data, event.sender, out)
        else:
            for rs in list(self.rounds.values()):
                self._advance(rs, out)
        return self._ordered(out)

    def next_deadline(self) -> int | None:
        """Earliest time a Tick can change something, or None when nothing is pending."""
        times = [t for rs in self.rounds.values() for t in self._deadlines(rs)]
        return min(times) if times else None

    def primary(self, rid: RoundId, view: int) -> str:
        """Rotation: k = seq + view, so k advances after every round and every change."""
        return self._rotation[(rid.seq + view) % self.n]

    def knows_round(self, rid: RoundId) -> bool:
        """True when the round is open or decided here (after a restart: on disk)."""
        return rid in self.rounds or rid in self.decided

    def view_of(self, rid: RoundId) -> int | None:
        rs = self.rounds.get(rid)
        return rs.view if rs is not None else None

    # --- persistence ---------------------------------------------------------------

    def _record(self, rs: _Round) -> bytes:
        lock = None
        if rs.lock is not None:
            lv, lvd = rs.lock
            lock = [lv, lvd, self._qc_cbor(rs.qcs[rs.lock]), rs.qc_header.get(rs.lock)]
        return codec.encode(
            {
                "round": rs.rid.to_cbor(),
                "request": rs.my_request,
                "view": rs.view,
                "votes": [[v, d] for v, d in sorted(rs.voted.items())],
                "lock": lock,
                "commit": list(rs.committed) if rs.committed else None,
            }
        )

    def _decided_record(
        self, rid: RoundId, vd: bytes, value: Value, fc: QuorumCertificate
    ) -> bytes:
        return codec.encode(
            {"round": rid.to_cbor(), "final": [vd, value.to_cbor(), self._qc_cbor(fc)]}
        )

    @staticmethod
    def _qc_cbor(qc: QuorumCertificate) -> list[Any]:
        return qc.to_cbor()

    def _restore(self, records: Iterable[bytes]) -> None:
        latest: dict[RoundId, dict[str, Any]] = {}
        for data in records:
            try:
                doc = codec.decode(data)
                rid = RoundId.from_cbor(doc["round"])
            except (CodecError, MessageError, KeyError, TypeError) as exc:
                raise ConsensusError(f"unreadable consensus record: {exc}") from exc
            latest[rid] = doc
        for rid, doc in sorted(latest.items()):
            self.max_seq = max(self.max_seq, rid.seq)
            try:
                if doc.get("final") is not None:
                    vd, value_cbor, fc_cbor = doc["final"]
                    value = self.decoder.value(self.market, rid, value_cbor)
                    self.decided[rid] = (vd, value, parse_qc(fc_cbor))
                    continue
                rs = _Round(rid, 0, recovering=True)
                rs.my_request = doc.get("request")
                rs.view = int(doc.get("view", 0))
                for v, d in doc.get("votes", []):
                    rs.voted[v] = d
                if doc.get("commit"):
                    v, d = doc["commit"]
                    rs.committed = (v, d)
                lock = doc.get("lock")
                if lock:
                    lv, lvd, qc_cbor, header_raw = lock
                    rs.qcs[(lv, lvd)] = parse_qc(qc_cbor)
                    rs.qc_time[(lv, lvd)] = 0
                    if header_raw:
                        # older records kept the whole proposal: the header is what a lock needs
                        rs.qc_header[(lv, lvd)] = header(self.decoder.envelope(header_raw))
                    rs.lock = (lv, lvd)
                self.rounds[rid] = rs
            except (MessageError, ValueError, TypeError, KeyError) as exc:
                raise ConsensusError(f"consensus record of {rid} is inconsistent: {exc}") from exc
        while len(self.decided) > RETAIN_DECIDED:
            self.decided.popitem(last=False)

    def _ordered(self, out: list[Action]) -> list[Action]:
        persists: list[Action] = []
        if not out:
            return out
        for rs in self.rounds.values():
            if rs.dirty:
                rs.dirty = False
                persists.append(Persist(rs.rid, self._record(rs)))
        early = [a for a in out if isinstance(a, Persist)]
        return early + persists + [a for a in out if not isinstance(a, Persist)]

    # --- opening rounds ------------------------------------------------------------

    def _open(self, event: Open, out: list[Action]) -> None:
        rid = event.round
        if rid.kind not in self.contracts:
            raise ConsensusError(f"no contract for round kind {rid.kind!r}")
        if rid in self.rounds or rid in self.decided:
            self.stats["reopen"] += 1
            return
        same_seq = [r for r in list(self.rounds) + list(self.decided) if r.seq == rid.seq]
        if same_seq:
            raise ConsensusError(f"round {rid.seq} is already open as {same_seq[0]}")
        rs = _Round(rid, self.now, entered_at=self.now)
        self.rounds[rid] = rs
        self.max_seq = max(self.max_seq, rid.seq)
        if not self.anchored:
            self._anchor(rid)
        self._forget_behind(keep=rid)
        # Not persisted yet: a request is not an acknowledgement, and signatures are
        # deterministic (RFC 6979), so after a crash the same request is re-signed
        # byte for byte. The round reaches the disk with our first vote or proposal.
        if rid in self.overflowed or event.catch_up:
            # Messages of this round were missed: the 2-delta rule needs every message
            # since the vote, so this node finishes through a finality certificate.
            rs.recovering = True
        for other in [r for r in self.held if r.seq == rid.seq and r != rid]:
            self.stats["other_round"] += len(self._unhold(other))
        held = self._unhold(rid)
        # Requests first: the ones held before we open are relayed with our own request,
        # and a fresh proposal that leaves any of them out gets our "no" (censorship).
        for env in held:
            if env.tag == "req":
                self._dispatch(rs, env, out)
        if event.submit and not rs.recovering:
            stmt = statement("req", self.market, rid, 0, event.deposit, self.node_id, event.body)
            sig = self.signer.sign(stmt)
            rs.my_request = seal(self.node_id, sig, stmt)
            relay = [rs.requests[s].raw for s in sorted(rs.requests) if s != self.node_id]
            rs.relayed = frozenset(s for s in rs.requests if s != self.node_id)
            rs.requests[self.node_id] = self.decoder.request(rs.my_request)
            out.append(Broadcast("req", seal(self.node_id, sig, stmt, relay or None)))
        for env in held:
            if env.tag != "req":
                self._dispatch(rs, env, out)
        self._advance(rs, out)

    def _unhold(self, rid: RoundId) -> list[Envelope]:
        self.held_raw.pop(rid, None)
        for key in [k for k in self.held_per_sender if k[0] == rid]:
            del self.held_per_sender[key]
        return self.held.pop(rid, [])

    # --- receiving -----------------------------------------------------------------

    def _verified(self, raw: Any, *, member: bool = True) -> Envelope | None:
        """Decode and check the signature of an embedded or received message."""
        try:
            env = self.decoder.envelope(raw)
        except MessageError:
            self.stats["malformed"] += 1
            return None
        return self._checked(env, member=member)

    def _checked(self, env: Envelope, *, member: bool = True) -> Envelope | None:
        if env.market != self.market:
            self.stats["other_market"] += 1
            return None
        known = self.keyring.is_member(env.sender) if member else self.keyring.knows(env.sender)
        if not known:
            self.stats["not_member"] += 1
            return None
        if not self.keyring.verify(env.sender, env.statement, env.signature):
            self.stats["bad_signature"] += 1
            return None
        return env

    def _receive(self, data: bytes, hint: str | None, out: list[Action]) -> None:
        try:
            env0 = self.decoder.envelope(data)
        except MessageError:
            self.stats["malformed"] += 1
            return
        if hint is not None and hint != env0.sender:
            self.stats["sender_mismatch"] += 1
            return
        if env0.sender == self.node_id:
            return  # our own publish, echoed back by the broker
        done = self.decided.get(env0.round)
        if done is not None and env0.tag not in HELP_TAGS:
            self.stats["late"] += 1  # the round is decided here: nothing left to learn
            return
        env = self._checked(env0, member=env0.tag != "req")
        if env is None:
            return
        rid = env.round
        if done is not None:
            # The sender still works on a round decided here (it blames, changes view,
            # asks): hand it the finality certificate at once (at most once per delta).
            self._answer_sync(rid, done, out)
            return
        rs = self.rounds.get(rid)
        if rs is None:
            self._hold(env)
            return
        self._dispatch(rs, env, out)
        self._advance(rs, out)

    def _in_window(self, seq: int) -> bool:
        return self.max_seq - LOOKAHEAD_ROUNDS <= seq <= self.max_seq + LOOKAHEAD_ROUNDS

    def _hold(self, env: Envelope) -> None:
        """Keep a verified message of a round not open here until the round opens.

        Bounded per sender and de-duplicated: a sender that floods a round only loses
        its own messages (a correct member never sends HOLD_PER_SENDER distinct ones
        within the delta by which correct opens differ), so it cannot make the round
        "recovering" for anyone.
        """
        rid = env.round
        if env.tag == "sync":
            self.stats["held_sync_ignored"] += 1  # nobody can answer it here before we open
            return
        if any(r.seq == rid.seq for r in list(self.rounds) + list(self.decided)):
            self.stats["other_round"] += 1  # same sequence number, another kind: a replay
            return
        if self.anchored and not self._in_window(rid.seq):
            self.stats["out_of_window"] += 1
            return
        seen = self.held_raw.get(rid)
        if seen is not None and env.raw in seen:
            self.stats["held_duplicate"] += 1
            return
        if self.held_per_sender[(rid, env.sender)] >= HOLD_PER_SENDER:
            self.stats["held_dropped"] += 1
            return
        held = self.held.get(rid)
        if held is None:
            if not self.anchored:
                room = self._pre_open_room(env.sender)
                if room != "ok":
                    self.stats["held_dropped"] += 1
                    if room == "full":
                        self._lost(rid)  # all senders' rounds: a correct one may be lost
                    return
            held = self.held[rid] = []
            seen = self.held_raw[rid] = set()
        assert seen is not None
        seen.add(env.raw)
        self.held_per_sender[(rid, env.sender)] += 1
        held.append(env)
        if self.anchored:
            self._forget_behind()

    def _pre_open_room(self, sender: str) -> str:
        """Whether a message of a round not held yet may start holding one before any Open:
        "ok", "sender" (this sender started its share of rounds) or "full"."""
        rounds_of_sender = sum(
            1 for envs in self.held.values() if any(e.sender == sender for e in envs)
        )
        if rounds_of_sender >= PRE_OPEN_PER_SENDER:
            return "sender"
        if len(self.held) >= PRE_OPEN_ROUNDS_PER_MEMBER * self.n:
            return "full"
        return "ok"

    def _lost(self, rid: RoundId) -> None:
        """Remember that a message of `rid` was dropped: that round must finish by catch-up."""
        if self.anchored or len(self.overflowed) < PRE_OPEN_ROUNDS_PER_MEMBER * self.n:
            self.overflowed.add(rid)  # anchored: within the window, so bounded by it
        else:
            # Before the first Open a faulty sender could name any number of rounds;
            # rather than grow without bound, taint the whole first window (_anchor).
            self.lost_unrecorded = True

    def _anchor(self, opening: RoundId) -> None:
        """First Open since start: keep held messages only of the window around max_seq."""
        self.anchored = True
        for rid in [r for r in self.held if r != opening and not self._in_window(r.seq)]:
            self.stats["out_of_window"] += len(self._unhold(rid))
        self.overflowed = {r for r in self.overflowed if r == opening or self._in_window(r.seq)}
        if self.lost_unrecorded:
            # Some dropped message may belong to any round of the window: all of them
            # finish through a finality certificate, as after any overflow.
            self.lost_unrecorded = False
            for seq in range(self.max_seq - LOOKAHEAD_ROUNDS, self.max_seq + LOOKAHEAD_ROUNDS + 1):
                self.overflowed.update(RoundId(seq, kind) for kind in self.contracts)

    def _forget_behind(self, keep: RoundId | None = None) -> None:
        """Drop (and count) held messages of rounds that fell behind the window."""
        floor = self.max_seq - LOOKAHEAD_ROUNDS
        for old in [r for r in self.held if r.seq < floor and r != keep]:
            self.stats["held_expired"] += len(self._unhold(old))
        self.overflowed = {r for r in self.overflowed if r.seq >= floor or r == keep}

    def _dispatch(self, rs: _Round, env: Envelope, out: list[Action]) -> None:
        if env.view > rs.view + 2 * self.n + 8:
            self.stats["far_view"] += 1
            return
        handler = self._handlers[env.tag]
        try:
            handler(rs, env)
        except (MessageError, QuorumError, CodecError) as exc:
            self.stats["invalid_" + env.tag] += 1
            self.last_error = str(exc)

    def _on_request(self, rs: _Round, env: Envelope) -> None:
        relay = env.attachment
        if relay is not None:
            # A member relays the requests it held when it opened (its own request's
            # attachment); the signed request itself is kept without it.
            env = self.decoder.envelope(seal(env.sender, env.signature, env.statement))
        req = self.decoder.request(env.raw)
        if req.submitter not in rs.requests:
            rs.requests[req.submitter] = req
        if relay is None or not self.keyring.is_member(req.submitter):
            return
        if not isinstance(relay, list) or len(relay) > self.keyring.size:
            raise MessageError("relayed requests must be a list of at most one per identity")
        for raw in relay:
            other = self._verified(raw, member=False)
            if other is None or other.tag != "req" or other.round != rs.rid:
                continue
            try:
                relayed = self.decoder.request(other.raw)
            except MessageError:
                self.stats["invalid_req"] += 1
                continue
            rs.requests.setdefault(relayed.submitter, relayed)

    def _take_proposal(
        self,
        rs: _Round,
        raw: Any,
        *,
        view: int | None = None,
        digest: bytes | None = None,
        named: bool | None = None,
    ) -> bool:
        """Take in a proposal (signed header, or whole) carried inside another message.

        With `view`/`digest` the carrying message is a signed statement naming exactly
        that proposal's value (a vote, a vote certificate, a status lock): its header is
        kept however many other proposals the primary signed for the view, and so is a
        body that comes with it (`named`, by default whenever a digest is given). Returns
        whether the proposal is the one named (or, unnamed, one of this round).
        """
        if not isinstance(raw, bytes):
            return False  # not a message at all
        env = self._verified(raw)
        if env is None or env.tag != "prop" or env.round != rs.rid:
            return False
        if view is not None and (env.view != view or (digest is not None and env.ref != digest)):
            return False
        if raw in rs.seen_proposals:
            return True  # the same whole proposal again
        try:
            self._on_proposal(rs, env, named=digest is not None if named is None else named)
        except MessageError as exc:
            self.stats["invalid_prop"] += 1
            self.last_error = str(exc)
            return False
        return True

    def _on_direct_proposal(self, rs: _Round, env: Envelope) -> None:
        self._on_proposal(rs, env, named=False)

    def _on_proposal(self, rs: _Round, env: Envelope, *, named: bool = True) -> None:
        if env.sender != self.primary(rs.rid, env.view):
            self.stats["not_primary"] += 1
            return
        if (
            not isinstance(env.ref, bytes)
            or len(env.ref) != 32
            or len(env.extra) != 1
            or not isinstance(env.extra[0], bytes)
        ):
            raise MessageError(
                "proposal must be [prop, market, round, view, value digest, justification digest]"
            )
        key = (env.view, env.ref)
        headers = rs.headers.setdefault(env.view, {})
        held = env.statement in headers
        if not held and len(headers) < 2:
            # two of them are the equivocation proof; the header is all the proof needs
            headers[env.statement] = self._header(env)
            held = True
        if not held and not named:
            self.stats["variant_dropped"] += 1  # a further variant: the proof is held already
            return
        # a signed header of the primary for (view, digest): with a QC, a lock
        rs.qc_header.setdefault(key, header(env))
        if key in rs.qcs:
            self._add_qc(rs, env.view, env.ref, rs.qcs[key])
        if env.attachment is None or env.statement in rs.bodies:
            return
        if not held and any(self._body_key(p) == key for p in rs.bodies.values()):
            self.stats["variant_dropped"] += 1  # named, but a body of its value is held
            return
        # A copy whose attachment does not match the signed digests is a relay's
        # corruption, not the primary's: skip it and wait for a good copy.
        prop = self.decoder.proposal(env.raw)
        rs.seen_proposals.add(env.raw)
        rs.bodies[env.statement] = prop
        if prop.value is not None:
            rs.values.setdefault(prop.digest, prop.value)
        vote_stmt = vote_statement(self.market, rs.rid, env.view, prop.digest)
        if self.keyring.verify(env.sender, vote_stmt, prop.primary_vote):
            self._add_vote(rs, env.view, prop.digest, env.sender, prop.primary_vote, header(env))

    def _header(self, env: Envelope) -> Envelope:
        return env if env.attachment is None else self.decoder.envelope(header(env))

    @staticmethod
    def _body_key(prop: Proposal) -> tuple[int, bytes]:
        return prop.env.view, prop.digest

    def _on_vote(self, rs: _Round, env: Envelope) -> None:
        if env.extra or not isinstance(env.ref, bytes) or len(env.ref) != 32:
            raise MessageError("vote must be [vote, market, round, view, digest]")
        named = rs.vote_digests.setdefault((env.sender, env.view), set())
        if env.ref not in named:
            if len(named) >= VOTES_PER_MEMBER_VIEW:
                self.stats["double_vote_dropped"] += 1  # a correct member votes once a view
                return
            named.add(env.ref)
        if env.attachment is not None:
            self._take_proposal(rs, env.attachment, view=env.view, digest=env.ref)
        self._add_vote(rs, env.view, env.ref, env.sender, env.signature, None)

    def _add_vote(
        self, rs: _Round, view: int, vd: bytes, node: str, sig: bytes, header_raw: bytes | None
    ) -> None:
        key = (view, vd)
        if header_raw is not None:
            rs.qc_header.setdefault(key, header_raw)
        votes = rs.votes.setdefault(key, {})
        if node in votes:
            return
        votes[node] = sig
        if len(votes) == self.n:
            rs.all_voted_time[key] = self.now  # every member voted: the fast commit's condition
        if len(votes) >= self.q and key not in rs.qcs:
            qc = QuorumCertificate.collect(
                vote_statement(self.market, rs.rid, view, vd), votes.items()
            )
            self._add_qc(rs, view, vd, qc)

    def _add_qc(self, rs: _Round, view: int, vd: bytes, qc: QuorumCertificate) -> None:
        key = (view, vd)
        if key not in rs.qcs:
            rs.qcs[key] = qc
            rs.qc_time[key] = self.now
        # A lock is a QC with the primary's signed header; its value may be fetched later.
        if key in rs.qc_header and (rs.lock is None or view > rs.lock[0]):
            rs.lock = key

    def _on_blame(self, rs: _Round, env: Envelope) -> None:
        if env.extra or env.ref != self.primary(rs.rid, env.view):
            raise MessageError("blame must name the primary of its view")
        evidence = env.attachment or []
        if not isinstance(evidence, list) or len(evidence) > 2:
            raise MessageError("blame evidence must be a list of at most two proposal headers")
        for raw in evidence:
            self._take_proposal(rs, raw, view=env.view)
        self._add_blame(rs, env.view, env.sender, env.signature)

    def _add_blame(self, rs: _Round, view: int, node: str, sig: bytes) -> None:
        blames = rs.blames.setdefault(view, {})
        if node in blames:
            return
        blames[node] = sig
        rs.blame_first.setdefault(view, self.now)
        if len(blames) >= self.q and view not in rs.vcc:
            stmt = blame_statement(self.market, rs.rid, view, self.primary(rs.rid, view))
            rs.vcc[view] = QuorumCertificate.collect(stmt, blames.items())

    def _check_vote_qc(self, rs: _Round, qc: QuorumCertificate) -> tuple[int, bytes]:
        fields = qc.fields()
        if len(fields) != 5 or fields[0] != "vote" or fields[2] != rs.rid.to_cbor():
            raise MessageError("not a vote certificate of this round")
        view, vd = fields[3], fields[4]
        if not isinstance(view, int) or not isinstance(vd, bytes):
            raise MessageError("vote certificate has a malformed statement")
        qc.verify(self.membership, expect=["vote", self.market, rs.rid.to_cbor(), view, vd])
        return view, vd

    def _on_cert(self, rs: _Round, env: Envelope) -> None:
        try:
            qc_cbor, prop_raw = env.attachment
        except (TypeError, ValueError) as exc:
            raise MessageError("certificate attachment must be [qc, proposal header]") from exc
        qc = parse_qc(qc_cbor)
        fields = qc.fields()
        if fields[0] == "vote":
            view, vd = self._check_vote_qc(rs, qc)
            self._add_qc(rs, view, vd, qc)
            if prop_raw is not None:
                # a certified header is kept whatever else its primary signed
                self._take_proposal(rs, prop_raw, view=view, digest=vd)
        elif fields[0] == "blame":
            if len(fields) != 5 or fields[2] != rs.rid.to_cbor() or not isinstance(fields[3], int):
                raise MessageError("not a change-primary certificate of this round")
            view = fields[3]
            expect = blame_statement(self.market, rs.rid, view, self.primary(rs.rid, view))
            qc.verify(self.membership, expect=codec.decode(expect))
            rs.vcc.setdefault(view, qc)
        else:
            raise MessageError(f"cannot forward a {fields[0]!r} certificate")

    def _on_status(self, rs: _Round, env: Envelope) -> None:
        if len(env.extra) != 1 or not isinstance(env.extra[0], int):
            raise MessageError(
                "status must be [status, market, round, view, lock digest, lock view]"
            )
        lock_view, lock_vd = env.extra[0], env.ref
        if lock_view >= 0:
            try:
                qc_cbor, prop_raw = env.attachment
            except (TypeError, ValueError) as exc:
                raise MessageError("status with a lock must attach [qc, header]") from exc
            qc = parse_qc(qc_cbor)
            view, vd = self._check_vote_qc(rs, qc)
            if (view, vd) != (lock_view, lock_vd) or view >= env.view:
                raise MessageError("status certificate does not match its claimed lock")
            self._add_qc(rs, view, vd, qc)
            if not self._take_proposal(rs, prop_raw, view=view, digest=vd):
                raise MessageError("status lock comes without its proposal header")
        elif lock_vd != b"" or lock_view != -1:
            raise MessageError("status without a lock must claim view -1")
        stripped = seal(env.sender, env.signature, env.statement)
        rs.statuses.setdefault(env.view, {}).setdefault(env.sender, stripped)
        rs.status_locks.setdefault(env.view, {}).setdefault(env.sender, (lock_view, lock_vd))

    def _on_final(self, rs: _Round, env: Envelope) -> None:
        if env.view != 0 or env.extra or not isinstance(env.ref, bytes):
            raise MessageError("final must be [final, market, round, 0, digest]")
        vd = env.ref
        if env.attachment is not None:
            try:
                value_cbor, qc_cbor, fc_cbor = env.attachment
            except (TypeError, ValueError) as exc:
                raise MessageError("final attachment must be [value, qc, fc]") from exc
            if value_cbor is not None:
                value = self.decoder.value(self.market, rs.rid, value_cbor)
                if value.digest != vd:
                    raise MessageError("final's value does not hash to its digest")
                rs.values.setdefault(vd, value)
            if qc_cbor is not None:
                qc = parse_qc(qc_cbor)
                view, qvd = self._check_vote_qc(rs, qc)
                if qvd == vd:
                    self._add_qc(rs, view, vd, qc)
            if fc_cbor is not None and rs.fc is None:
                fc = parse_qc(fc_cbor)
                fc.verify(
                    self.membership, expect=codec.decode(final_statement(self.market, rs.rid, vd))
                )
                rs.fc = (vd, fc)
        if vd not in rs.finals:
            named = rs.vote_digests.setdefault((env.sender, -1), set())
            if len(named) >= VOTES_PER_MEMBER_VIEW:
                self.stats["double_final_dropped"] += 1  # a correct member attests one value
                return
            named.add(vd)
        finals = rs.finals.setdefault(vd, {})
        finals.setdefault(env.sender, env.signature)

    def _on_sync(self, rs: _Round, env: Envelope) -> None:
        """Someone asks for the decision (ref b"") or fetches a value by (view, digest)."""
        if isinstance(env.ref, bytes) and any(p.digest == env.ref for p in rs.bodies.values()):
            rs.fetch_wanted.add((env.view, env.ref))  # answered by _answer_fetch
        else:
            self.stats["sync_unanswered"] += 1  # not decided here yet; others will answer

    def _on_value(self, rs: _Round, env: Envelope) -> None:
        """An answer to a fetch: a member forwards a primary's whole proposal.

        The body is kept when its header is one of the view's two held headers, or
        when a verified signature names its (view, digest) -- a vote, a QC, a final --
        and no body of that (view, digest) is held yet: so wrong, unasked or repeated
        answers cost nothing but their check.
        """
        if env.extra or not isinstance(env.ref, bytes):
            raise MessageError("value must be [value, market, round, view, digest]")
        key = (env.view, env.ref)
        named = key in rs.votes or key in rs.qcs or env.ref in rs.finals
        if not self._take_proposal(rs, env.attachment, view=env.view, digest=env.ref, named=named):
            self.stats["value_unusable"] += 1

    def _answer_sync(
        self, rid: RoundId, done: tuple[bytes, Value, QuorumCertificate], out: list[Action]
    ) -> None:
        last = self.sync_answered.get(rid)
        if last is not None and self.now - last < self.delta:
            return
        self.sync_answered[rid] = self.now
        vd, value, fc = done
        stmt = final_statement(self.market, rid, vd)
        attachment = [value.to_cbor(), None, fc.to_cbor()]
        out.append(Broadcast("final", seal(self.node_id, self.signer.sign(stmt), stmt, attachment)))

    # --- the protocol's decisions --------------------------------------------------

    def _advance(self, rs: _Round, out: list[Action]) -> None:
        for _ in range(6):
            before = len(out)
            self._advance_once(rs, out)
            if rs.rid not in self.rounds or len(out) == before:
                return

    def _advance_once(self, rs: _Round, out: list[Action]) -> None:
        if self._try_final(rs, out):
            return
        self._answer_fetch(rs, out)
        if rs.recovering:
            if rs.committed and not rs.final_resent:
                rs.final_resent = True
                self._send_final(rs, rs.committed[1], out)
            if self.now >= rs.next_sync:
                self._send_sync(rs, out)
            return
        self._relay_evidence(rs, out)
        self._check_vcc(rs, out)
        self._check_jump(rs)
        if rs.waiting and self.now >= rs.wait_until:
            self._enter(rs, out)
        if rs.waiting:
            if (
                rs.view not in rs.status_sent
                and self.now >= rs.status_early
                and self._may_report_early(rs)
            ):
                self._send_status(rs, out)
            self._primary_duty(rs, out)  # q statuses may be in before our own entry
            return
        self._primary_duty(rs, out)
        self._backup_duty(rs, out)
        self._commit_duty(rs, out)
        self._timeouts(rs, out)
        if rs.sync_after and self.now >= rs.sync_after:
            # We objected long ago and neither a view change nor a decision reached us
            # (messages lost?): ask the others for the decision.
            rs.sync_after = self.now + 8 * self.delta
            self._send_sync(rs, out)

    def _send_sync(self, rs: _Round, out: list[Action]) -> None:
        """Ask for the decision."""
        rs.next_sync = self.now + 4 * self.delta
        stmt = statement("sync", self.market, rs.rid, 0, b"")
        out.append(Broadcast("sync", seal(self.node_id, self.signer.sign(stmt), stmt)))

    def _fetch(self, rs: _Round, view: int, vd: bytes, out: list[Action]) -> None:
        """Ask for the value `vd` (the whole proposal of `view`, if anyone has it), again
        strictly after 3 delta without it: a correct holder answers within 2 delta of
        the question reaching it (_answer_fetch), so one question per 3 delta suffices."""
        asked = rs.fetch_asked.get((view, vd))
        if asked is not None and self.now <= asked + 3 * self.delta:
            return
        rs.fetch_asked[(view, vd)] = self.now
        self.stats["fetch"] += 1
        stmt = statement("sync", self.market, rs.rid, view, vd)
        out.append(Broadcast("sync", seal(self.node_id, self.signer.sign(stmt), stmt)))

    def _answer_fetch(self, rs: _Round, out: list[Action]) -> None:
        """Forward the whole proposal of each value asked for by digest: the one of the asked
        view if held, else any with that value; at most one batch per delta, each proposal
        once per batch, so answering costs at most the bodies held per delta."""
        if not rs.fetch_wanted or self.now - rs.fetch_answered < self.delta:
            return
        rs.fetch_answered = self.now
        chosen: dict[bytes, Proposal] = {}
        for view, vd in sorted(rs.fetch_wanted):
            matches = [p for p in rs.bodies.values() if p.digest == vd]
            best = [p for p in matches if p.env.view == view] or matches
            if best:
                chosen.setdefault(best[0].env.statement, best[0])
        rs.fetch_wanted.clear()
        for prop in chosen.values():
            stmt = statement("value", self.market, rs.rid, prop.env.view, prop.digest)
            sig = self.signer.sign(stmt)
            out.append(Broadcast("value", seal(self.node_id, sig, stmt, prop.env.raw)))

    def _check_vcc(self, rs: _Round, out: list[Action]) -> None:
        if not rs.vcc:
            return
        ready = [v for v in rs.vcc if v >= rs.view]
        if not ready:
            return
        v = max(ready)
        # Leave view v: stop voting and committing in it, forward the certificate so
        # every node leaves within one delta, then wait two deltas so that every vote
        # and vote certificate sent before anyone left reaches us before we report our
        # lock (docs/consensus.md, lemma 3: a fast commit's honest votes). A node that
        # voted in no view above its lock's reports after one delta (_may_report_early).
        rs.view = v + 1
        rs.waiting = True
        rs.wait_until = self.now + 2 * self.delta
        rs.status_early = self.now + self.delta
        if v not in rs.vcc_sent:
            rs.vcc_sent.add(v)
            qc = rs.vcc[v]
            stmt = statement("cert", self.market, rs.rid, v, codec.digest(qc.statement))
            attachment = [qc.to_cbor(), None]
            out.append(
                Broadcast("cert", seal(self.node_id, self.signer.sign(stmt), stmt, attachment))
            )

    def _check_jump(self, rs: _Round) -> None:
        if (
            not rs.headers
            or max(rs.headers) < rs.view
            or (max(rs.headers) == rs.view and not rs.waiting)
        ):
            return
        best = None
        for view, headers in rs.headers.items():
            if view == 0 or view < rs.view or (view == rs.view and not rs.waiting):
                continue
            for stmt in headers:
                prop = rs.bodies.get(stmt)
                if prop is not None and self._is_justified(rs, prop):
                    best = view if best is None else max(best, view)
        if best is not None:
            rs.view = best
            rs.waiting = False
            rs.entered_at = self.now

    def _enter(self, rs: _Round, out: list[Action]) -> None:
        rs.waiting = False
        rs.entered_at = self.now
        if rs.view not in rs.status_sent:
            self._send_status(rs, out)

    def _status_lock(self, rs: _Round) -> tuple[int, bytes] | None:
        """The lock a status for the current view reports: ours, or -- when a QC of this
        view formed while we waited -- the highest of an earlier view (`_on_status`
        refuses any other)."""
        lock = rs.lock
        if lock is not None and lock[0] >= rs.view:
            lock = max((k for k in rs.qcs if k[0] < rs.view and k in rs.qc_header), default=None)
        return lock

    def _may_report_early(self, rs: _Round) -> bool:
        """A fast commit needs every member's vote, ours included: if we voted in no view
        above our lock's, no fast commit can rest on votes we have not seen, and only a
        forwarded certificate (at most one delta in flight) can still raise our lock."""
        lock = self._status_lock(rs)
        return max(rs.voted, default=-1) <= (lock[0] if lock is not None else -1)

    def _send_status(self, rs: _Round, out: list[Action]) -> None:
        rs.status_sent.add(rs.view)
        lock_view, lock_vd, attachment = -1, b"", None
        lock = self._status_lock(rs)
        if lock is not None:
            lock_view, lock_vd = lock
            attachment = [rs.qcs[lock].to_cbor(), rs.qc_header[lock]]
        stmt = statement("status", self.market, rs.rid, rs.view, lock_vd, lock_view)
        sig = self.signer.sign(stmt)
        rs.statuses.setdefault(rs.view, {})[self.node_id] = seal(self.node_id, sig, stmt)
        rs.status_locks.setdefault(rs.view, {})[self.node_id] = (lock_view, lock_vd)
        out.append(Broadcast("status", seal(self.node_id, sig, stmt, attachment)))

    # primary -----------------------------------------------------------------------

    def _primary_duty(self, rs: _Round, out: list[Action]) -> None:
        v = rs.view
        if self.primary(rs.rid, v) != self.node_id or v in rs.proposed:
            return
        if v == 0:
            self._propose_fresh(rs, None, out)
            return
        statuses = rs.statuses.get(v, {})
        if len(statuses) < self.q:
            return
        locks = rs.status_locks[v]
        top = max(lv for lv, _ in locks.values())
        justification_statuses = [statuses[node] for node in sorted(statuses)]
        if top < 0:
            self._propose_fresh(rs, [justification_statuses, None], out)
            return
        vd = min(d for lv, d in locks.values() if lv == top)
        if rs.committed is not None and rs.committed[1] != vd:
            self.stats["conflicting_lock"] += 1
            return
        value = rs.values.get(vd)
        if value is None:
            # a lock is a QC and a signed header: the QC's correct voters hold the value
            self._fetch(rs, top, vd, out)
            return
        qc = rs.qcs[(top, vd)]
        self._publish_proposal(rs, value, [justification_statuses, qc.to_cbor()], out)

    def _propose_fresh(self, rs: _Round, justification: Any, out: list[Action]) -> None:
        # Correct members open within delta of us and their requests (with what they
        # relay) take at most delta more: strictly after 2 delta every one is here.
        have_all = all(m in rs.requests for m in self.membership.node_ids)
        if not have_all and self.now <= rs.opened_at + 2 * self.delta:
            return
        requests = tuple(rs.requests[s] for s in sorted(rs.requests))
        try:
            result = self.make_result(rs.rid, requests)
        except (MeterChainError, ValueError, TypeError, ArithmeticError) as exc:
            self.stats["contract_error"] += 1
            self.last_error = f"contract {rs.rid.kind}: {exc}"
            rs.proposed.add(rs.view)
            return
        value = self.decoder.value(self.market, rs.rid, [[r.raw for r in requests], result])
        self._publish_proposal(rs, value, justification, out)

    def make_result(self, rid: RoundId, requests: tuple[Request, ...]) -> Any:
        """The contract result a primary proposes (a dishonest test primary overrides this)."""
        return self.contracts[rid.kind].execute(requests)

    def sign_proposal(self, rs: _Round, value: Value, justification: Any) -> tuple[bytes, bytes]:
        """(proposal message, primary's vote signature) for `value` in the current view."""
        v = rs.view
        stmt = statement("prop", self.market, rs.rid, v, value.digest, codec.digest(justification))
        vote_sig = self.signer.sign(vote_statement(self.market, rs.rid, v, value.digest))
        attachment = [value.to_cbor(), vote_sig, justification]
        return seal(self.node_id, self.signer.sign(stmt), stmt, attachment), vote_sig

    def _publish_proposal(
        self, rs: _Round, value: Value, justification: Any, out: list[Action]
    ) -> None:
        raw, _ = self.sign_proposal(rs, value, justification)
        rs.proposed.add(rs.view)
        env = self.decoder.envelope(raw)
        self._on_proposal(rs, env)
        rs.voted[rs.view] = value.digest
        rs.vote_time[rs.view] = self.now
        rs.dirty = True
        out.append(Broadcast("prop", raw))

    # backup ------------------------------------------------------------------------

    def _is_justified(self, rs: _Round, prop: Proposal) -> bool:
        """A view > 0 proposal carries more than n/2 signed statuses and the top lock."""
        key = prop.env.statement
        known = rs.justified.get(key)
        if known is not None:
            return known
        ok = self._check_justification(rs, prop)
        rs.justified[key] = ok
        return ok

    def _check_justification(self, rs: _Round, prop: Proposal) -> bool:
        view = prop.env.view
        if view == 0:
            return prop.statuses is None and prop.justify is None
        if prop.statuses is None:
            return False
        claims: dict[str, tuple[int, bytes]] = {}
        for env in prop.statuses:
            if (
                env.tag != "status"
                or env.market != self.market
                or env.round != rs.rid
                or env.view != view
                or len(env.extra) != 1
                or not isinstance(env.extra[0], int)
                or env.extra[0] >= view  # a lock is from an earlier view
                or not self.keyring.is_member(env.sender)
                or not self.keyring.verify(env.sender, env.statement, env.signature)
            ):
                return False
            claims[env.sender] = (env.extra[0], env.ref)
        if len(claims) < self.q:
            return False
        top = max(lv for lv, _ in claims.values())
        if top < 0:
            return prop.justify is None
        if prop.justify is None or (top, prop.digest) not in claims.values():
            return False
        try:
            prop.justify.verify(
                self.membership, expect=["vote", self.market, rs.rid.to_cbor(), top, prop.digest]
            )
        except QuorumError:
            return False
        return True

    def _verdict(self, rs: _Round, prop: Proposal) -> str:
        """ "ok", "censored" (our own request left out of a fresh proposal) or a defect."""
        key = prop.env.statement
        known = rs.verdicts.get(key)
        if known is None:
            known = self._judge(rs, prop)
            rs.verdicts[key] = known
        return known

    def _judge(self, rs: _Round, prop: Proposal) -> str:
        if prop.value is None or prop.defect is not None:
            return prop.defect or "no value"
        vote_stmt = vote_statement(self.market, rs.rid, prop.env.view, prop.digest)
        if not self.keyring.verify(prop.env.sender, vote_stmt, prop.primary_vote):
            return "primary's vote signature does not verify"
        for req in prop.value.requests:
            if not self.keyring.knows(req.submitter) or not self.keyring.verify(
                req.submitter, req.env.statement, req.env.signature
            ):
                return f"request of {req.submitter!r} is not validly signed"
        if not self._is_justified(rs, prop):
            return "view change not justified"
        try:
            ok = self.contracts[rs.rid.kind].check(prop.value.requests, prop.value.result)
        except (MeterChainError, ValueError, TypeError, ArithmeticError, KeyError):
            ok = False
        if not ok:
            return "contract check failed"
        fresh = prop.env.view == 0 or prop.justify is None
        if fresh:
            # Censorship: a fresh value must hold our own request and every request we
            # relayed to the primary with it (held before we opened: participants' bids
            # sent ahead, members that opened earlier). A correct primary has them all.
            included = {r.submitter: r for r in prop.value.requests}
            if rs.my_request is not None:
                mine = included.get(self.node_id)
                if mine is None or mine.raw != rs.my_request:
                    return "censored"
            if any(s not in included for s in rs.relayed):
                return "censored"
        return "ok"

    def _backup_duty(self, rs: _Round, out: list[Action]) -> None:
        v = rs.view
        if v in rs.voted:
            return
        headers = rs.headers.get(v, {})
        if len(headers) != 1:
            return  # nothing yet, or an equivocation (handled by _timeouts)
        stmt, signed = next(iter(headers.items()))
        prop = rs.bodies.get(stmt)
        if prop is None:
            self._fetch(rs, v, signed.ref, out)  # a signed header without its value
            return
        if rs.committed is not None and rs.committed[1] != prop.digest:
            return  # never support anything but what we already treat as final
        verdict = self._verdict(rs, prop)
        if verdict == "ok" or (verdict == "censored" and (v, prop.digest) in rs.qcs):
            # A censored backup votes no (blames); once a quorum certified the value
            # anyway it accepts it, so that it can still reach a final result.
            self._vote(rs, prop, out)
        elif v not in rs.blamed:
            self.stats["rejected_proposal"] += 1
            self._blame(rs, v, [signed.raw], out)

    def _vote(self, rs: _Round, prop: Proposal, out: list[Action]) -> None:
        v, vd = prop.env.view, prop.digest
        sig = self.signer.sign(vote_statement(self.market, rs.rid, v, vd))
        rs.voted[v] = vd
        rs.vote_time[v] = self.now
        rs.dirty = True
        signed = header(prop.env)  # the vote names the primary's signed header, not the value
        self._add_vote(rs, v, vd, self.node_id, sig, signed)
        stmt = vote_statement(self.market, rs.rid, v, vd)
        out.append(Broadcast("vote", seal(self.node_id, sig, stmt, signed)))

    def _blame(self, rs: _Round, v: int, evidence: list[bytes], out: list[Action]) -> None:
        if v in rs.blamed:
            return
        rs.blamed.add(v)
        if not rs.sync_after:
            # Set once per round, never reset by a view change the adversary can drive.
            rs.sync_after = self.now + 8 * self.delta
        stmt = blame_statement(self.market, rs.rid, v, self.primary(rs.rid, v))
        sig = self.signer.sign(stmt)
        self._add_blame(rs, v, self.node_id, sig)
        out.append(Broadcast("blame", seal(self.node_id, sig, stmt, evidence)))

    # finality ----------------------------------------------------------------------

    def _commit_duty(self, rs: _Round, out: list[Action]) -> None:
        v = rs.view
        if rs.committed is not None or v not in rs.voted or len(rs.headers.get(v, {})) > 1:
            return
        vd = rs.voted[v]
        tv = rs.vote_time[v]
        window_end = tv + 2 * self.delta  # the equivocation window: 2 delta after our vote
        if (v, vd) not in rs.qcs:
            return
        all_at = rs.all_voted_time.get((v, vd))
        if all_at is not None and all_at <= window_end:
            # Every member voted for it by the window's end, so every correct member holds
            # the value and the correct votes reach everyone before any status (lemma 3).
            if self.now > window_end:
                self._commit(rs, v, vd, out)
            return
        # Not every member voted (or someone objected): a correct member may lack the
        # certificate, so forward it with the signed header and give it one delta. After
        # a change of primary a member is likely down and its vote will not come: forward
        # as soon as the certificate forms, so the commit is due at the window's end.
        blame_at = rs.blame_first.get(v)
        if v not in rs.forwarded and (blame_at is not None or self.now > window_end or v > 0):
            rs.forwarded[v] = self.now
            qc = rs.qcs[(v, vd)]
            stmt = statement("cert", self.market, rs.rid, v, codec.digest(qc.statement))
            attachment = [qc.to_cbor(), rs.qc_header.get((v, vd))]
            out.append(
                Broadcast("cert", seal(self.node_id, self.signer.sign(stmt), stmt, attachment))
            )
        sent = rs.forwarded.get(v)
        if sent is not None and self.now > max(window_end, sent + self.delta):
            self._commit(rs, v, vd, out)

    def _commit(self, rs: _Round, v: int, vd: bytes, out: list[Action]) -> None:
        value = rs.values[vd]
        rs.committed = (v, vd)
        rs.commit_time = self.now
        # No disk write before the `final` attestation: a node restarted from its log is
        # passive in rounds it was in and attests again only from a finality certificate,
        # so a lost commit record can never lead to a different attestation. The commit
        # reaches the disk with the decision (or the round's next write).
        out.append(Commit(rs.rid, v, vd, value, rs.qcs.get((v, vd))))
        self._send_final(rs, vd, out)

    def _send_final(self, rs: _Round, vd: bytes, out: list[Action]) -> None:
        stmt = final_statement(self.market, rs.rid, vd)
        sig = self.signer.sign(stmt)
        attachment = None
        committed_view = rs.committed[0] if rs.committed else -1
        if committed_view >= 0 and self.primary(rs.rid, committed_view) == self.node_id:
            # The primary publishes the result with its vote certificate (step 4). The
            # value rides along only for submit-only participants, who read finals alone;
            # members hold it or fetch it by digest.
            qc = rs.qcs.get((committed_view, vd))
            value = rs.values[vd].to_cbor() if self.keyring.size > self.n else None
            attachment = [value, qc.to_cbor() if qc else None, None]
        rs.finals.setdefault(vd, {})[self.node_id] = sig
        out.append(Broadcast("final", seal(self.node_id, sig, stmt, attachment)))

    def _try_final(self, rs: _Round, out: list[Action]) -> bool:
        if rs.fc is None and rs.finals:
            for vd, sigs in rs.finals.items():
                if len(sigs) >= self.q:
                    stmt = final_statement(self.market, rs.rid, vd)
                    rs.fc = (vd, QuorumCertificate.collect(stmt, sigs.items()))
                    break
        if rs.fc is None:
            return False
        vd, fc = rs.fc
        value = rs.values.get(vd)
        if value is None:
            # fetch the certified value by its digest (the highest view known to name it)
            views = [v for (v, d) in [*rs.qcs, *rs.qc_header] if d == vd]
            self._fetch(rs, max(views, default=0), vd, out)
            return False
        if rs.committed is None:
            qc_views = [v for (v, d) in rs.qcs if d == vd]
            qc = rs.qcs[(max(qc_views), vd)] if qc_views else None
            out.append(Commit(rs.rid, -1, vd, value, qc))
        elif rs.committed[1] != vd:
            self.stats["conflict"] += 1  # cannot happen with fewer than n/2 faulty nodes
        out.append(Final(rs.rid, vd, value, fc))
        out.append(Persist(rs.rid, self._decided_record(rs.rid, vd, value, fc)))
        del self.rounds[rs.rid]
        self.decided[rs.rid] = (vd, value, fc)
        while len(self.decided) > RETAIN_DECIDED:
            old, _ = self.decided.popitem(last=False)
            self.sync_answered.pop(old, None)
        return True

    # timers ------------------------------------------------------------------------

    def _backoff(self, view: int) -> int:
        """Timeout multiplier: 1 up to view (n-1)//2, then doubling per view (capped at 64).

        With fewer than n/2 faulty nodes and delta respected, a round ends by view
        (n-1)//2 (at most that many faulty primaries in a row), so the liveness bound
        is unaffected; a later view means delta was too small for the real network,
        and longer timeouts let views succeed again (eventual liveness). The 2-delta
        finality window and the view-change wait (2 delta, 1 for an early status)
        never grow: safety rests on them.
        """
        f_max = (self.n - 1) // 2
        return 1 if view <= f_max else 2 ** min(view - f_max, 6)

    def _proposal_deadline(self, rs: _Round) -> int:
        # view 0: open skew (delta) + the primary's request collection (2 delta + 1 ms)
        # + delivery; later views: entry skew + statuses to the primary (a fresh value
        # also waits for the requests, at most 2 delta + 1 ms after the primary's open,
        # which is at most 2 delta + 1 ms after the first correct entry) + fetching the
        # top lock's value by digest (3 delta) + delivery.
        # Blame strictly after the latest time a correct primary's proposal can arrive.
        k = self._backoff(rs.view)
        if rs.view == 0:
            return rs.entered_at + 4 * self.delta + 2
        return rs.entered_at + k * 6 * self.delta + 2

    def _after_vote_deadline(self, rs: _Round) -> int:
        tv = rs.vote_time[rs.view]
        # A node that is already final only blames as a safety net (others might need
        # a view change it has to join), so it waits long enough that jitter in the
        # finality attestations never makes it do so needlessly.
        span = 10 * self.delta + 2 if rs.committed else 3 * self.delta + 2
        deadline = tv + self._backoff(rs.view) * span
        sent = rs.forwarded.get(rs.view)
        if sent is not None and not rs.committed:
            # the certificate is out and the commit due one delta later: do not object
            # first (with delays within delta `sent` is at most tv + 2 delta anyway)
            deadline = max(deadline, sent + self.delta + 2)
        return deadline

    def _relay_evidence(self, rs: _Round, out: list[Action]) -> None:
        """Two signed proposals of one primary in one view prove equivocation: blame with
        both and relay them to everyone, once per view, whether or not we blamed it already
        (a node about to treat a value as final must see them within its 2-delta window)."""
        for view, headers in rs.headers.items():
            if len(headers) < 2 or view in rs.evidence_sent:
                continue
            rs.evidence_sent.add(view)
            self.stats["equivocation"] += 1
            evidence = [env.raw for env in headers.values()]
            rs.blamed.add(view)
            if not rs.sync_after:
                rs.sync_after = self.now + 8 * self.delta
            stmt = blame_statement(self.market, rs.rid, view, self.primary(rs.rid, view))
            sig = self.signer.sign(stmt)
            self._add_blame(rs, view, self.node_id, sig)
            out.append(Broadcast("blame", seal(self.node_id, sig, stmt, evidence)))

    def _timeouts(self, rs: _Round, out: list[Action]) -> None:
        v = rs.view
        if v in rs.blamed:
            return
        if v not in rs.voted:
            if self.now >= self._proposal_deadline(rs):
                self._blame(rs, v, [], out)
        elif self.now >= self._after_vote_deadline(rs):
            self._blame(rs, v, [], out)

    def _deadlines(self, rs: _Round) -> list[int]:
        # fetches: our questions are repeated strictly after 3 delta, others' answered
        # once per delta
        times = [t + 3 * self.delta + 1 for t in rs.fetch_asked.values()]
        if rs.fetch_wanted:
            times.append(rs.fetch_answered + self.delta)
        if rs.recovering or rs.fc is not None:
            return [t for t in [*times, rs.next_sync] if t > self.now]
        if rs.sync_after:
            times.append(rs.sync_after)
        if rs.waiting:
            return [t for t in [*times, rs.status_early, rs.wait_until] if t > self.now]
        v = rs.view
        if self.primary(rs.rid, v) == self.node_id and v not in rs.proposed:
            times.append(rs.opened_at + 2 * self.delta + 1)
        if v in rs.voted:
            if rs.committed is None:
                window_end = rs.vote_time[v] + 2 * self.delta
                times.append(window_end + 1)
                if v in rs.forwarded:
                    times.append(rs.forwarded[v] + self.delta + 1)
            if v not in rs.blamed:
                times.append(self._after_vote_deadline(rs))
        elif v not in rs.blamed:
            times.append(self._proposal_deadline(rs))
        return [t for t in times if t > self.now]


def liveness_bound_ms(delta_ms: int, faulty: int) -> int:
    """Latest commit time after a round's first honest open, with `faulty` < n/2 faulty nodes.

    Derived in docs/consensus.md ("Liveness") from the timers above with every
    delay between correct nodes at most delta and correct nodes opening within
    delta of each other: with a correct view-0 primary every correct node
    commits within 7 delta + 2 ms of the round's first open. A view led by a
    faulty primary costs at most 18 delta + 4 ms (view 0, from the open) or
    20 delta + 4 ms (a later view, from its first correct entry) until the next
    view's first correct entry (each includes the 2-delta wait before the
    status); a view led by a correct primary after a change commits within
    9 delta + 2 ms of its first correct entry (3 delta of it to fetch the top
    lock's value by digest). With f faulty nodes at most f consecutive
    primaries are faulty, so the bound is 7 delta + 2 for f = 0 and
    27 delta + 6 + (f - 1)(20 delta + 4) ms otherwise. A correct node that
    learns the result from a finality certificate (a decided node answers its
    blame, status or sync) does so sooner than that.
    """
    d = delta_ms
    if faulty <= 0:
        return 7 * d + 2
    return 18 * d + 4 + (faulty - 1) * (20 * d + 4) + 9 * d + 2
