"""SDBFT wire format: signed canonical-CBOR statements, their envelope, and strict decoding.

Every message is the canonical CBOR array `[statement, sender, signature,
attachment]`. The `statement` is itself canonical CBOR
`[tag, market, [seq, kind], view, ref, ...]` and is what the sender signs
(64-byte P-256 r||s): it names the market, the round (sequence number and
round kind, so a clearing and a settlement never share an identity), the view
and the hash or id of what the message refers to. Statements of one kind are
byte-identical across senders, so their signatures aggregate into a
`meterchain.quorum.QuorumCertificate`. The attachment carries
self-authenticating evidence (forwarded signed proposals, certificates,
signed requests) and is never trusted on its own. A proposal's value travels
only in the primary's own proposal and in answers to a fetch by digest
(`value`); everything else carries the proposal's signed `header`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from meterchain import codec
from meterchain.errors import CodecError, MeterChainError
from meterchain.quorum import QuorumCertificate, QuorumError

TAGS = ("req", "prop", "vote", "blame", "cert", "status", "final", "sync", "value")
MAX_DEPOSIT_REF = 64


class MessageError(MeterChainError):
    """A consensus message is malformed or does not fit the protocol; the message says why."""


@dataclass(frozen=True, order=True)
class RoundId:
    """A round's identity: its sequence number and kind ("clear", "settle", ...)."""

    seq: int
    kind: str

    def to_cbor(self) -> list[Any]:
        return [self.seq, self.kind]

    @classmethod
    def from_cbor(cls, value: Any) -> RoundId:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not isinstance(value[0], int)
            or isinstance(value[0], bool)
            or value[0] < 0
            or not isinstance(value[1], str)
            or not value[1]
        ):
            raise MessageError(f"round must be [seq >= 0, kind], got {value!r}")
        return cls(value[0], value[1])

    def __str__(self) -> str:
        return f"{self.kind}#{self.seq}"


def statement(tag: str, market: str, rid: RoundId, view: int, ref: Any, *extra: Any) -> bytes:
    """Canonical bytes a sender signs."""
    return codec.encode([tag, market, rid.to_cbor(), view, ref, *extra])


@lru_cache(maxsize=4096)
def vote_statement(market: str, rid: RoundId, view: int, digest: bytes) -> bytes:
    """What a quorum certificate of votes certifies (see meterchain.quorum)."""
    return statement("vote", market, rid, view, digest)


@lru_cache(maxsize=4096)
def final_statement(market: str, rid: RoundId, digest: bytes) -> bytes:
    """What a finality certificate certifies; view-independent, so it carries view 0."""
    return statement("final", market, rid, 0, digest)


@lru_cache(maxsize=4096)
def blame_statement(market: str, rid: RoundId, view: int, primary: str) -> bytes:
    return statement("blame", market, rid, view, primary)


@dataclass(frozen=True)
class Envelope:
    """A decoded, not yet signature-checked message."""

    raw: bytes
    statement: bytes
    tag: str
    market: str
    round: RoundId
    view: int
    ref: Any
    extra: tuple[Any, ...]
    sender: str
    signature: bytes
    attachment: Any


def seal(signer_id: str, signature: bytes, stmt: bytes, attachment: Any = None) -> bytes:
    return codec.encode([stmt, signer_id, signature, attachment])


def header(env: Envelope) -> bytes:
    """A signed message without its attachment: for a proposal, the primary's signed
    header [prop, market, round, view, value digest, justification digest], which is what
    votes, certificates, statuses and equivocation evidence carry instead of the value."""
    return seal(env.sender, env.signature, env.statement)


def _parse_envelope(data: bytes) -> Envelope:
    try:
        outer = codec.decode(data)
    except CodecError as exc:
        raise MessageError(f"not canonical CBOR: {exc}") from exc
    if not isinstance(outer, list) or len(outer) != 4:
        raise MessageError("message must be [statement, sender, signature, attachment]")
    stmt, sender, signature, attachment = outer
    if (
        not isinstance(stmt, bytes)
        or not isinstance(sender, str)
        or not isinstance(signature, bytes)
    ):
        raise MessageError("statement and signature must be bytes, sender a string")
    try:
        fields = codec.decode(stmt)
    except CodecError as exc:
        raise MessageError(f"statement is not canonical CBOR: {exc}") from exc
    if not isinstance(fields, list) or len(fields) < 5:
        raise MessageError("statement must be [tag, market, round, view, ref, ...]")
    tag, market, rnd, view, ref, *extra = fields
    if tag not in TAGS:
        raise MessageError(f"unknown message tag {tag!r}")
    if not isinstance(market, str):
        raise MessageError("market must be a string")
    if not isinstance(view, int) or isinstance(view, bool) or view < 0:
        raise MessageError(f"view must be a non-negative integer, got {view!r}")
    return Envelope(
        bytes(data),
        stmt,
        tag,
        market,
        RoundId.from_cbor(rnd),
        view,
        ref,
        tuple(extra),
        sender,
        signature,
        attachment,
    )


@dataclass(frozen=True)
class Request:
    """A participant's signed submission for one round: deposit reference and contract input."""

    env: Envelope
    submitter: str
    deposit: bytes
    body: Any

    @property
    def raw(self) -> bytes:
        return self.env.raw


def _parse_request(env: Envelope) -> Request:
    if env.tag != "req" or env.view != 0 or len(env.extra) != 2:
        raise MessageError("request must be [req, market, round, 0, deposit, submitter, body]")
    deposit = env.ref
    submitter, body = env.extra
    if not isinstance(deposit, bytes) or not 1 <= len(deposit) <= MAX_DEPOSIT_REF:
        raise MessageError(f"deposit reference must be 1..{MAX_DEPOSIT_REF} bytes")
    if submitter != env.sender:
        raise MessageError(f"request names submitter {submitter!r} but is sent by {env.sender!r}")
    if env.attachment is not None:
        raise MessageError("a request carries no attachment")
    return Request(env, submitter, deposit, body)


@dataclass(frozen=True)
class Value:
    """What a round agrees on: the exact request set used and the contract result."""

    requests: tuple[Request, ...]
    result: Any
    digest: bytes

    def to_cbor(self) -> list[Any]:
        return [[r.raw for r in self.requests], self.result]


def value_digest(market: str, rid: RoundId, request_raws: Sequence[bytes], result: Any) -> bytes:
    """SHA-256 over the exact signed request messages (in order) and the result."""
    return codec.digest(["value", market, rid.to_cbor(), list(request_raws), result])


@dataclass(frozen=True)
class Proposal:
    """A primary's signed proposal with its value, its own vote and (view > 0) justification.

    `defect` is set when the signed content itself is unusable (a request that
    does not parse, a malformed justification): that is the primary's fault.
    """

    env: Envelope
    value: Value | None
    primary_vote: bytes
    statuses: tuple[Envelope, ...] | None
    justify: QuorumCertificate | None
    defect: str | None = None

    @property
    def digest(self) -> bytes:
        return self.env.ref


class Decoder:
    """Parses wire bytes into envelopes, requests, proposals; memoises by the exact bytes.

    Parsing is a pure function of the bytes, so the memo (bounded LRU) never
    changes an outcome; in the simulator all nodes share one decoder.
    """

    def __init__(self, capacity: int = 50_000) -> None:
        self.capacity = capacity
        self._memo: OrderedDict[tuple[str, bytes], Any] = OrderedDict()

    def _cached(self, kind: str, data: bytes, build: Any) -> Any:
        key = (kind, data)
        hit = self._memo.get(key)
        if hit is None:
            try:
                hit = build(data)
            except MessageError as exc:
                hit = exc
            self._memo[key] = hit
            if len(self._memo) > self.capacity:
                self._memo.popitem(last=False)
        if isinstance(hit, MessageError):
            raise hit
        return hit

    def envelope(self, data: bytes) -> Envelope:
        if not isinstance(data, bytes):
            raise MessageError("message must be bytes")
        return self._cached("env", data, _parse_envelope)

    def request(self, data: bytes) -> Request:
        return self._cached("req", data, lambda d: _parse_request(self.envelope(d)))

    def proposal(self, data: bytes) -> Proposal:
        return self._cached("prop", data, self._parse_proposal)

    def value(self, market: str, rid: RoundId, cbor: Any) -> Value:
        try:
            raws, result = cbor
        except (TypeError, ValueError) as exc:
            raise MessageError("value must be [requests, result]") from exc
        if not isinstance(raws, list) or not all(isinstance(r, bytes) for r in raws):
            raise MessageError("value requests must be a list of signed request messages")
        requests = tuple(self.request(r) for r in raws)
        for req in requests:
            if req.env.market != market or req.env.round != rid:
                raise MessageError(f"value includes a request for {req.env.round}, not {rid}")
        submitters = [r.submitter for r in requests]
        if submitters != sorted(set(submitters)):
            raise MessageError("value requests must be sorted by submitter, one each")
        return Value(requests, result, value_digest(market, rid, raws, result))

    def _parse_proposal(self, data: bytes) -> Proposal:
        """Raises MessageError for a copy that does not match its signed digests."""
        env = self.envelope(data)
        if (
            env.tag != "prop"
            or not isinstance(env.ref, bytes)
            or len(env.ref) != 32
            or len(env.extra) != 1
            or not isinstance(env.extra[0], bytes)
        ):
            raise MessageError(
                "proposal must be [prop, market, round, view, value digest, justification digest]"
            )
        try:
            value_cbor, primary_vote, justification = env.attachment
            raws, result = value_cbor
        except (TypeError, ValueError) as exc:
            raise MessageError(
                "proposal attachment must be [[requests, result], vote, justification]"
            ) from exc
        if not isinstance(raws, list) or not all(isinstance(r, bytes) for r in raws):
            raise MessageError("proposal requests must be a list of byte strings")
        if value_digest(env.market, env.round, raws, result) != env.ref:
            raise MessageError("proposal value does not hash to the signed digest")
        if codec.digest(justification) != env.extra[0]:
            raise MessageError("proposal justification does not hash to the signed digest")
        if not isinstance(primary_vote, bytes):
            raise MessageError("proposal's primary vote must be bytes")
        defect = None
        value: Value | None = None
        try:
            value = self.value(env.market, env.round, value_cbor)
        except MessageError as exc:
            defect = f"bad request set: {exc}"
        statuses: tuple[Envelope, ...] | None = None
        justify = None
        if justification is not None:
            try:
                status_raws, justify_cbor = justification
                statuses = tuple(self.envelope(s) for s in status_raws)
                if justify_cbor is not None:
                    justify = QuorumCertificate.from_cbor(justify_cbor)
            except (TypeError, ValueError, MessageError, QuorumError) as exc:
                defect = defect or f"bad justification: {exc}"
        return Proposal(env, value, primary_vote, statuses, justify, defect)


def parse_qc(value: Any) -> QuorumCertificate:
    try:
        return QuorumCertificate.from_cbor(value)
    except QuorumError as exc:
        raise MessageError(str(exc)) from exc
