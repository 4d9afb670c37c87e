"""Typed ledger transactions: their canonical form, field schemas and signing statements.

A transaction is the canonical CBOR array [kind, body] with `body` a map of
named fields. Its identity is its Merkle leaf hash (SHA-256(0x00 || bytes)), which
is also what a veto or a settlement uses to refer to it. Fields named `*_sig`,
`audit`, `security` and `signatures` are signatures over `statement(...)`: the
transaction without its signature fields, bound to the market, so a signature
cannot be moved to another market, kind or set of terms.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meterchain import codec, reading
from meterchain.errors import CodecError, MeterChainError
from meterchain.keys import PrivateKey
from meterchain.ledger.merkle import leaf_hash, root_of_hashes
from meterchain.ledger.readings import LedgerReading


class TxError(MeterChainError):
    """A transaction is malformed or breaks a ledger rule; the message says which field or rule."""


_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

ROLES = ("microgrid", "generator", "consumer", "dispatch", "grid", "consensus", "observer")
EXIT_MODES = ("voluntary", "inactive", "expelled", "banned")
DECISIONS = ("dismiss", "warn", "fine", "expel")  # a regulator's answer to a suspect (M19)
SOURCES = tuple(sorted(reading.SOURCES))
SIGNATURE_FIELDS = frozenset({"regulator_sig", "audit", "security", "signatures", "owner_sig"})


def _uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _view(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -1 <= v < 2**63


def _name(v: Any) -> bool:
    return isinstance(v, str) and bool(_NAME.fullmatch(v))


def _text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v.strip()) and len(v) <= 2000


def _bytes_of(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, bytes) and len(v) == n


def _one_of(options: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: v in options


def _bytes(v: Any) -> bool:
    return isinstance(v, bytes)


def _members(v: Any) -> bool:
    return (
        isinstance(v, list)
        and bool(v)
        and all(
            isinstance(m, list) and len(m) == 2 and _name(m[0]) and _bytes_of(65)(m[1]) for m in v
        )
    )


def _sig_map(v: Any) -> bool:
    return isinstance(v, dict) and all(_name(k) and _bytes_of(64)(s) for k, s in v.items())


def _byte_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, bytes) for x in v)


def _cert_ids_or_none(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(c, str) and c for c in v)


def _qc(v: Any) -> bool:
    return (
        isinstance(v, list) and len(v) == 2 and isinstance(v[0], bytes) and isinstance(v[1], list)
    )


def _cert_ids(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(c, str) and c for c in v)


_H32 = _bytes_of(32)
_SIG = _bytes_of(64)
_POINT = _bytes_of(65)

# kind -> field -> (check, description for the error message)
SCHEMAS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "genesis": {
        "market": (_name, "a market name"),
        "time": (_uint, "Unix seconds"),
        "regulator": (_POINT, "a 65-byte P-256 point"),
        "epoch": (_uint, "an unsigned integer"),
        "members": (_members, "a list of [node id, 65-byte point]"),
        "regulator_sig": (_SIG, "a 64-byte signature"),
    },
    "membership": {
        "epoch": (_uint, "an unsigned integer"),
        "members": (_members, "a list of [node id, 65-byte point]"),
        "regulator_sig": (_SIG, "a 64-byte signature"),
    },
    "participant": {
        "id": (_name, "a participant id"),
        "role": (_one_of(ROLES), f"one of {', '.join(ROLES)}"),
        "key": (_POINT, "a 65-byte P-256 point"),
        "time": (_uint, "Unix seconds"),
        "regulator_sig": (_SIG, "a 64-byte signature"),
    },
    "participant_exit": {
        "id": (_name, "a participant id"),
        "mode": (_one_of(EXIT_MODES), f"one of {', '.join(EXIT_MODES)}"),
        "reason": (_text, "a non-empty reason"),
        "time": (_uint, "Unix seconds"),
        "regulator_sig": (_SIG, "a 64-byte signature"),
    },
    "meter": {
        "id": (_name, "a meter id"),
        "owner": (_name, "a participant id"),
        "key": (_POINT, "a 65-byte P-256 point"),
        "source": (_one_of(SOURCES), f"one of {', '.join(SOURCES)}"),
        "time": (_uint, "Unix seconds"),
        "regulator_sig": (_SIG, "a 64-byte signature"),
    },
    "meter_exit": {
        "id": (_name, "a meter id"),
        "reason": (_text, "a non-empty reason"),
        "time": (_uint, "Unix seconds"),
        "regulator_sig": (_SIG, "a 64-byte signature"),
    },
    "readings": {
        "hour": (_uint, "an hour index (Unix seconds // 3600)"),
        "count": (_uint, "an unsigned integer"),
        "root": (_H32, "a 32-byte Merkle root"),
    },
    "clearing": {
        "round": (_uint, "the consensus round's sequence number"),
        "round_kind": (_name, "the consensus round's kind"),
        "view": (_view, "the view the round committed in (-1: by a finality certificate)"),
        "hour": (_uint, "the delivery hour index it executes"),
        "requests": (_byte_list, "the list of signed request messages of the round"),
        "value": (_bytes, "canonical CBOR of the value the round agreed"),
        "request": (_bytes, "canonical CBOR of the SC1 clearing request"),
        "result": (_bytes, "canonical CBOR of the SC1 clearing result"),
        "qc": (_qc, "a quorum certificate [statement, [[node, sig], ...]]"),
    },
    "settlement": {
        "hour": (_uint, "an hour index"),
        "clearing": (_H32, "the 32-byte hash of the clearing transaction"),
        "metered": (_bytes, "canonical CBOR bytes of the metered values"),
        "result": (_bytes, "canonical CBOR bytes of the settlement"),
    },
    "order": {
        "id": (_name, "an order id"),
        "creator": (_name, "a participant id"),
        "created": (_uint, "Unix seconds"),
        "seller": (_name, "a participant id"),
        "buyer": (_name, "a participant id"),
        "grid": (_name, "the grid company's participant id"),
        "dispatch": (_name, "the dispatch centre's participant id"),
        "energy_wh": (_uint, "energy in Wh"),
        "price": (_uint, "price in minor units per kWh"),
        "delivery": (_uint, "the delivery hour index"),
        "deposit": (_uint, "deposit in minor units per party"),
        "audit": (_SIG, "the trading centre's (regulator's) 64-byte signature"),
        "security": (_SIG, "the dispatch centre's 64-byte signature"),
        "signatures": (_sig_map, "a map of party id to 64-byte signature"),
    },
    "order_change": {
        "order": (_name, "an order id"),
        "version": (_uint, "the new version number"),
        "energy_wh": (_uint, "energy in Wh"),
        "price": (_uint, "price in minor units per kWh"),
        "delivery": (_uint, "the delivery hour index"),
        "audit": (_SIG, "the trading centre's (regulator's) 64-byte signature"),
        "security": (_SIG, "the dispatch centre's 64-byte signature"),
        "signatures": (_sig_map, "a map of party id to 64-byte signature"),
    },
    "veto": {
        "target": (_H32, "the 32-byte hash of the vetoed transaction"),
        "reason": (_text, "a non-empty published reason"),
        "time": (_uint, "Unix seconds"),
        "regulator_sig": (_SIG, "a 64-byte signature"),
    },
    "cert_issue": {
        "meter": (_name, "a renewable meter id"),
        "to_seq": (_uint, "the last reading sequence number counted"),
        "certs": (_cert_ids_or_none, "the list of certificate ids the readings earn"),
    },
    "cert_transfer": {
        "certs": (_cert_ids, "a non-empty list of certificate ids"),
        "from": (_name, "a participant id"),
        "to": (_name, "a participant id"),
        "time": (_uint, "Unix seconds"),
        "owner_sig": (_SIG, "the owner's 64-byte signature"),
    },
    "cert_retire": {
        "certs": (_cert_ids, "a non-empty list of certificate ids"),
        "owner": (_name, "a participant id"),
        "period": (_uint, "the compliance period it is retired for"),
        "purpose": (_text, "a non-empty purpose"),
        "time": (_uint, "Unix seconds"),
        "owner_sig": (_SIG, "the owner's 64-byte signature"),
    },
    "contract_fire": {
        "order": (_name, "an order id"),
        "delivered_wh": (_uint, "energy delivered in Wh"),
        "payment": (_uint, "payment in minor units"),
        "refund": (_uint, "refund to the buyer in minor units"),
    },
    "deposit_forfeit": {
        "order": (_name, "an order id"),
        "party": (_name, "the defaulting participant id"),
        "amount": (_uint, "forfeited deposit in minor units"),
        "reason": (_text, "a non-empty reason"),
    },
    # The weak centre (M24, M25, M21) and violation monitoring (M19).
    "grid_network": {
        "network": (_bytes, "canonical CBOR of the distribution network model"),
        "time": (_uint, "Unix seconds"),
        "regulator_sig": (_SIG, "a 64-byte signature"),
    },
    "congestion": {
        "hour": (_uint, "the delivery hour index"),
        "clearing": (_H32, "the 32-byte hash of the clearing transaction"),
        "record": (_bytes, "canonical CBOR of the congestion record (check, cut or prices)"),
    },
    "remedy": {
        "hour": (_uint, "the settled hour index"),
        "settlement": (_H32, "the 32-byte hash of the settlement transaction"),
        "case": (_bytes, "canonical CBOR of the failed-execution case"),
        "result": (_bytes, "canonical CBOR of the remedies and their settlement"),
    },
    "reserve_offer": {
        "owner": (_name, "the storage owner's participant id"),
        "hour": (_uint, "the delivery hour index the reserve stands ready for"),
        "energy_wh": (_uint, "reserve energy in Wh"),
        "price": (_uint, "price in minor units per kWh"),
        "time": (_uint, "Unix seconds"),
        "owner_sig": (_SIG, "the owner's 64-byte signature"),
    },
    "transmission_right": {
        "holder": (_name, "the holder's participant id"),
        "seller": (_name, "the trade's seller"),
        "buyer": (_name, "the trade's buyer"),
        "hour": (_uint, "the delivery hour index"),
        "energy_wh": (_uint, "energy covered in Wh"),
        "rate": (_uint, "compensation in minor units per kWh short"),
        "time": (_uint, "Unix seconds"),
        "owner_sig": (_SIG, "the holder's 64-byte signature"),
    },
    "suspect_report": {
        "reporter": (_name, "the reporting node's id"),
        "report": (_bytes, "canonical CBOR of the monitoring report's suspects"),
        "time": (_uint, "Unix seconds"),
    },
    "regulator_decision": {
        "report": (_H32, "the 32-byte hash of the suspect report"),
        "participant": (_name, "the suspected participant's id"),
        "action": (_one_of(DECISIONS), f"one of {', '.join(DECISIONS)}"),
        "fine": (_uint, "fine from the bond in minor units (0 unless fined)"),
        "reason": (_text, "a non-empty published reason"),
        "time": (_uint, "Unix seconds"),
        "regulator_sig": (_SIG, "a 64-byte signature"),
    },
}

KINDS = tuple(SCHEMAS)


def validate(kind: str, body: Mapping[str, Any]) -> None:
    """Raise TxError unless `body` has exactly the fields of `kind`, each well-formed."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise TxError(f"unknown transaction kind {kind!r}")
    if not isinstance(body, Mapping):
        raise TxError(f"{kind}: body is not a map")
    for key in body:
        if key not in schema:
            raise TxError(f"{kind}: unknown field {key!r}")
    for key, (check, what) in schema.items():
        if key not in body:
            raise TxError(f"{kind}: missing field {key!r}")
        if not check(body[key]):
            raise TxError(f"{kind}: field {key!r} must be {what}")


@dataclass(frozen=True)
class Tx:
    """One transaction with its canonical bytes kept, so hashes never depend on re-encoding."""

    kind: str
    body: Mapping[str, Any]
    raw: bytes

    @classmethod
    def make(cls, kind: str, body: Mapping[str, Any]) -> Tx:
        validate(kind, body)
        return cls(kind, dict(body), codec.encode([kind, dict(body)]))

    @classmethod
    def decode(cls, raw: bytes) -> Tx:
        try:
            value = codec.decode(raw)
        except CodecError as exc:
            raise TxError(f"transaction is not canonical CBOR: {exc}") from exc
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not isinstance(value[0], str)
            or not isinstance(value[1], dict)
        ):
            raise TxError("transaction is not a [kind, body] array")
        validate(value[0], value[1])
        return cls(value[0], value[1], bytes(raw))

    @property
    def hash(self) -> bytes:
        """The transaction's identity: its Merkle leaf hash."""
        return leaf_hash(self.raw)

    def statement(self, market: str) -> bytes:
        return statement(market, self.kind, self.body)

    def describe(self) -> str:
        """A short human label: kind and its main identifying field."""
        for key in ("id", "order", "meter", "hour", "target"):
            if key in self.body:
                value = self.body[key]
                shown = value.hex()[:16] if isinstance(value, bytes) else value
                return f"{self.kind} {key}={shown}"
        return self.kind


def statement(market: str, kind: str, body: Mapping[str, Any]) -> bytes:
    """Canonical bytes every signature inside a transaction signs: [kind, market, terms]."""
    terms = {k: v for k, v in body.items() if k not in SIGNATURE_FIELDS}
    return codec.encode([kind, market, terms])


def signed(
    market: str,
    kind: str,
    terms: Mapping[str, Any],
    signer: PrivateKey,
    field: str = "regulator_sig",
) -> Tx:
    """A transaction whose one signature field `field` is `signer`'s signature over the terms."""
    body = dict(terms)
    body[field] = signer.sign(statement(market, kind, terms))
    return Tx.make(kind, body)


def reading_batch(
    hour: int, readings: Iterable[LedgerReading]
) -> tuple[Tx, tuple[LedgerReading, ...]]:
    """A reading batch transaction over `readings` and the readings sorted by (meter, seq)."""
    ordered = tuple(sorted(readings, key=lambda r: (r.meter_id, r.seq)))
    sha256 = hashlib.sha256
    root = root_of_hashes([sha256(b"\x00" + r.digest).digest() for r in ordered])
    return Tx.make("readings", {"hour": hour, "count": len(ordered), "root": root}), ordered
