"""Signed meter readings: build, sign and (above all) strictly verify COSE_Sign1 ES256 readings.

This is the CPython counterpart of the board's `firmware/lib/mc/cose.py` and
`reading.py` (wire format in DESIGN.md). `verify` is the one door through
which a reading enters any node: it accepts exactly the bytes an honest board
produces and refuses everything else with a specific `RejectedReading`
subclass whose `reason` is a stable metrics label.

What "exactly" means here:
- the input is one CBOR item, tag 18, `[protected bstr, unprotected map,
  payload bstr, signature bstr]`, in canonical (deterministic) encoding, with
  no trailing bytes; so one (payload, signature, kid) has one byte form and
  one `digest` for the ledger's Merkle trees;
- protected header is exactly the bytes of `{1: -7}` (ES256); the unprotected
  header is exactly `{4: kid}` with kid the UTF-8 meter id;
- the payload is the canonical encoding of a map with keys 1..8 and nothing
  else; a non-canonical payload would still verify (it is what was signed)
  but a board never makes one, so it is refused as malleability;
- fields are range-checked (see the constants below), the meter must be in
  the registry with the same source type, and the signature must verify over
  `["Signature1", protected, b"", payload]` with the meter's key.
CBOR tags with a built-in meaning in cbor2 (datetimes, bignums, regexps,
value sharing, ...) are decoded as plain tags, never interpreted, so no
attacker-chosen bytes reach a regexp compiler or a MIME parser.

ECDSA implementation, chosen by measurement (`meterchain bench verify`: P-256
verify of the same readings in the same run, on the 2-core CI box shared with
other jobs, so the ranges are run-to-run spread):
  `cryptography` (OpenSSL), bare verify      15,000-16,000 verifies/s
  `ecdsa` (pure Python)                      220-540 verifies/s (about 800/s
                                             with its per-key precomputation)
OpenSSL is 30 to 70 times faster, so the hot path verifies through
`meterchain.keys.PublicKey` (which wraps `cryptography`); `ecdsa` only serves
as the independent cross-check in the benchmark. The whole of `verify` runs at
13,900-14,400 readings/s, 0.88-0.90 of the bare OpenSSL rate (target 0.8):
decoding, the strict checks, the registry lookup and the digest cost about
7 microseconds per reading against about 65 for the signature. Most of that
saving over a full decode (0.85-0.86) comes from splitting the envelope by
slicing when it is byte for byte the one canonical layout (`_split_canonical`);
any other input takes the full decode, which names the reason for a refusal.

`verify` is a pure function (no I/O, no clock unless `now` is passed) and is
safe to call from many threads.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import cbor2

from meterchain import codec
from meterchain.errors import (
    BadHeader,
    BadSignature,
    ClockSkew,
    FieldOutOfRange,
    FieldWrongType,
    KidMismatch,
    MalformedCBOR,
    MissingField,
    MissingKid,
    NonCanonical,
    NotAReading,
    NotCoseSign1,
    SourceMismatch,
    UnknownField,
    UnknownMeter,
    WrongAlgorithm,
)
from meterchain.keys import PrivateKey

if TYPE_CHECKING:
    from meterchain.registry import Registry

# Status flag bits, shared with firmware/lib/mc/reading.py.
FLAG_CLOCK_NOT_SYNCED = 1 << 0
FLAG_METER_READ_ERROR = 1 << 1
FLAG_COUNTER_RESET = 1 << 2
FLAG_TAMPER = 1 << 3
FLAG_SPOOL_OVERFLOW = 1 << 4
FLAG_GATEWAY_ATTESTED = 1 << 5  # signed by an edge gateway for a meter that cannot sign
KNOWN_FLAGS = (1 << 6) - 1

SOURCES = frozenset({"pv", "wind", "hydro", "biomass", "load", "bidir", "storage", "chp"})
RENEWABLE_SOURCES = frozenset({"pv", "wind", "hydro", "biomass"})

# Payload map keys (DESIGN.md wire format), in canonical order.
FIELDS = ("meter_id", "seq", "time", "import_wh", "export_wh", "power_w", "flags", "source")
_KEYS = frozenset(range(1, 9))
_KEY_ORDER = list(range(1, 9))
_KEY_TYPES = (int,) * 8

# Meter ids and owners are MQTT topic levels and ACL words (meterchain.mqtt_auth).
# fullmatch, not match with "$": "$" also matches before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
NAME_RULE = "1-64 characters of A-Z a-z 0-9 _ . : -"

UINT64_LIMIT = 1 << 64
# A synced clock before 2020-01-01T00:00Z is a board that never got NTP but did not say so.
MIN_SYNCED_TIME = 1_577_836_800
# 2100-01-01T00:00Z: beyond any meter's service life, even from an unsynced clock.
MAX_TIME = 4_102_444_800
# Sanity bound on average active power: 10 MW either way. A microgrid meter
# (the largest are MV feeders of a few MW) never reads more; a larger value is
# a scaling bug (W vs mW) or a forged register, never a real measurement.
MAX_POWER_W = 10_000_000
# How far ahead of the verifier's clock a synced reading may be (when `now` is given).
DEFAULT_MAX_CLOCK_AHEAD_S = 300

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_KID = 4
ALG_ES256 = -7
PROTECTED_ES256 = codec.encode({HEADER_ALG: ALG_ES256})  # b"\xa1\x01\x26"
SIGNATURE_LEN = 64

# cbor2 turns these tags into Python objects (datetime, Decimal, re.Pattern,
# email.Message, shared references, ...). A reading needs none of them, so each
# is decoded as an inert CBORTag and later refused by the type checks.
_INTERPRETED_TAGS = (
    0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004,
    43000, 55799,
)  # fmt: skip


def _inert(tag: int) -> Any:
    def decode(value: Any, immutable: bool) -> cbor2.CBORTag:
        return cbor2.CBORTag(tag, value)

    return decode


_INERT_TAGS = {tag: _inert(tag) for tag in _INTERPRETED_TAGS}
_MAPS = (dict, cbor2.frozendict)
_ARRAYS = (list, tuple)


@dataclass(frozen=True)
class Reading:
    """A verified reading: the payload fields plus the exact signed bytes and their SHA-256.

    Energy in Wh (cumulative registers), power in W, time in Unix seconds.
    """

    meter_id: str
    seq: int
    time: int
    import_wh: int
    export_wh: int
    power_w: int
    flags: int
    source: str
    signed: bytes = field(repr=False)  # the COSE_Sign1 bytes, exactly as received
    digest: bytes = field(repr=False)  # SHA-256 of `signed`: the ledger's Merkle leaf

    @property
    def clock_synced(self) -> bool:
        return not self.flags & FLAG_CLOCK_NOT_SYNCED

    @property
    def meter_read_error(self) -> bool:
        return bool(self.flags & FLAG_METER_READ_ERROR)

    @property
    def counter_reset(self) -> bool:
        return bool(self.flags & FLAG_COUNTER_RESET)

    @property
    def tamper(self) -> bool:
        return bool(self.flags & FLAG_TAMPER)

    @property
    def spool_overflow(self) -> bool:
        return bool(self.flags & FLAG_SPOOL_OVERFLOW)

    @property
    def gateway_attested(self) -> bool:
        return bool(self.flags & FLAG_GATEWAY_ATTESTED)

    @property
    def renewable(self) -> bool:
        """True when the source type earns green certificates (M22)."""
        return self.source in RENEWABLE_SOURCES

    def payload_map(self) -> dict[int, int | str]:
        """The payload as the integer-keyed map that was signed."""
        return {
            1: self.meter_id,
            2: self.seq,
            3: self.time,
            4: self.import_wh,
            5: self.export_wh,
            6: self.power_w,
            7: self.flags,
            8: self.source,
        }


# --- The COSE_Sign1 structure, built in this one place ----------------------------------


def _head(major: int, n: int) -> bytes:
    """Shortest CBOR head for major type `major` (already shifted: 0x00, 0x20, 0x40, 0x60)."""
    if n < 24:
        return _SMALL_HEADS[major | n]
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major | 26,)) + n.to_bytes(4, "big")
    return bytes((major | 27,)) + n.to_bytes(8, "big")


_SMALL_HEADS = {
    major | n: bytes((major | n,)) for major in (0x00, 0x20, 0x40, 0x60) for n in range(24)
}
_SIG_STRUCTURE_PREFIX = b"\x84\x6aSignature1"
# The constant leading bytes for the one protected header readings use.
_SIG_STRUCTURE_ES256 = _SIG_STRUCTURE_PREFIX + b"\x43" + PROTECTED_ES256 + b"\x40"
_SIGN1_ES256 = b"\xd2\x84\x43" + PROTECTED_ES256 + b"\xa1\x04"


def sig_structure(payload: bytes, protected: bytes = PROTECTED_ES256) -> bytes:
    """The bytes ES256 signs: canonical `["Signature1", protected, b"", payload]`.

    Assembled directly (it is on the verify hot path); tests check it equals
    `codec.encode` of the same list.
    """
    if protected == PROTECTED_ES256:
        return b"".join((_SIG_STRUCTURE_ES256, _head(0x40, len(payload)), payload))
    return b"".join(
        (
            _SIG_STRUCTURE_PREFIX,
            _head(0x40, len(protected)),
            protected,
            b"\x40",
            _head(0x40, len(payload)),
            payload,
        )
    )


def encode_sign1(
    kid: bytes, payload: bytes, signature: bytes, protected: bytes = PROTECTED_ES256
) -> bytes:
    """Canonical `18([protected, {4: kid}, payload, signature])`, the one valid byte form."""
    if protected == PROTECTED_ES256:
        start = _SIGN1_ES256
    else:
        start = b"\xd2\x84" + _head(0x40, len(protected)) + protected + b"\xa1\x04"
    return b"".join(
        (
            start,
            _head(0x40, len(kid)),
            kid,
            _head(0x40, len(payload)),
            payload,
            _head(0x40, len(signature)),
            signature,
        )
    )


# --- Field validation, shared by encode_payload and verify ------------------------------


def _uint(name: str, value: Any) -> int:
    if type(value) is not int:
        raise FieldWrongType(name, f"must be an unsigned integer, got {_kind(value)}")
    if not 0 <= value < UINT64_LIMIT:
        raise FieldOutOfRange(name, f"{value} is outside 0 .. 2**64-1")
    return value


def _text(name: str, value: Any) -> str:
    if type(value) is not str:
        raise FieldWrongType(name, f"must be a text string, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, cbor2.CBORTag):
        return f"CBOR tag {value.tag}"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a text string",
        bytes: "a byte string",
        list: "an array",
        tuple: "an array",
        dict: "a map",
        cbor2.frozendict: "a map",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _check_fields(
    meter_id: Any,
    seq: Any,
    time: Any,
    import_wh: Any,
    export_wh: Any,
    power_w: Any,
    flags: Any,
    source: Any,
) -> None:
    """Raise the specific FieldError for the first bad field (in key order)."""
    _text("meter_id", meter_id)
    if not _NAME.fullmatch(meter_id):
        raise FieldOutOfRange("meter_id", f"{meter_id!r} is not {NAME_RULE}")
    _uint("seq", seq)
    _uint("flags", flags)
    if flags & ~KNOWN_FLAGS:
        raise FieldOutOfRange(
            "flags", f"unknown bits 0x{flags & ~KNOWN_FLAGS:x} set (known bits: 0x{KNOWN_FLAGS:x})"
        )
    _uint("time", time)
    if flags & FLAG_CLOCK_NOT_SYNCED:
        if time >= MAX_TIME:
            raise FieldOutOfRange("time", f"{time} is after 2100-01-01 ({MAX_TIME})")
    elif not MIN_SYNCED_TIME <= time < MAX_TIME:
        raise FieldOutOfRange(
            "time",
            f"{time} is outside 2020-01-01 .. 2100-01-01 ({MIN_SYNCED_TIME} .. {MAX_TIME}) "
            "and the clock-not-synced flag is not set",
        )
    _uint("import_wh", import_wh)
    _uint("export_wh", export_wh)
    if type(power_w) is not int:
        raise FieldWrongType("power_w", f"must be an integer (W), got {_kind(power_w)}")
    if not -MAX_POWER_W <= power_w <= MAX_POWER_W:
        raise FieldOutOfRange(
            "power_w", f"{power_w} W is beyond the +/-{MAX_POWER_W} W (10 MW) sanity bound"
        )
    _text("source", source)
    if source not in SOURCES:
        raise FieldOutOfRange(
            "source", f"unknown source type {source!r} (known: {', '.join(sorted(SOURCES))})"
        )


def valid_name(text: str) -> bool:
    """True when `text` may be a meter id or owner: it is safe as a topic level and ACL word."""
    return _NAME.fullmatch(text) is not None


def _check_keys(fields: Any) -> None:
    """Raise UnknownField/MissingField unless the keys are exactly the integers 1..8."""
    for key in fields:
        # type() and not ==: CBOR true/1.0 compare equal to 1 in Python but are other keys.
        if type(key) is not int or key not in _KEYS:
            raise UnknownField(f"key {key!r}", "not a reading field (keys are the integers 1..8)")
    if len(fields) != len(_KEYS):
        # The keys are distinct members of 1..8, so fewer than 8 means some are absent.
        missing = min(_KEYS - set(fields))
        raise MissingField(FIELDS[missing - 1], f"key {missing} is missing from the payload")


# --- Building and signing (tests, gateways, emulators) ---------------------------------


def encode_payload(
    meter_id: str,
    seq: int,
    time: int,
    import_wh: int,
    export_wh: int,
    power_w: int,
    flags: int,
    source: str,
) -> bytes:
    """Canonical CBOR payload of a reading; the same checks as `verify` (raises FieldError)."""
    _check_fields(meter_id, seq, time, import_wh, export_wh, power_w, flags, source)
    return codec.encode(
        {1: meter_id, 2: seq, 3: time, 4: import_wh, 5: export_wh, 6: power_w, 7: flags, 8: source}
    )


def sign_payload(key: PrivateKey, payload: bytes, kid: bytes) -> bytes:
    """COSE_Sign1 ES256 over arbitrary payload bytes (tests use it to sign bad payloads)."""
    return encode_sign1(kid, payload, key.sign(sig_structure(payload)))


def sign_reading(
    key: PrivateKey,
    meter_id: str,
    seq: int,
    time: int,
    import_wh: int,
    export_wh: int,
    power_w: int,
    flags: int,
    source: str,
) -> bytes:
    """A signed reading exactly as a board makes it (kid = meter id), ready for `verify`.

    Gateways set FLAG_GATEWAY_ATTESTED when they sign for a meter that cannot.
    """
    payload = encode_payload(meter_id, seq, time, import_wh, export_wh, power_w, flags, source)
    return sign_payload(key, payload, meter_id.encode())


# --- Verification ---------------------------------------------------------------------
#
# `verify` runs a lean happy path (one combined check per stage) and hands any
# input that fails it to a `_refuse_*` function that works out the precise
# reason and raises. The happy path is what `bench verify` measures against a
# bare OpenSSL verify; the refusal paths are what the tests pin down.


def _loads(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data, semantic_decoders=_INERT_TAGS)
    except Exception as exc:
        # cbor2 is a foreign decoder fed untrusted bytes: whatever it raises
        # (CBORDecodeError, ValueError, OverflowError, MemoryError, ...) means
        # the bytes are not one acceptable CBOR item.
        raise MalformedCBOR(f"{what}: {exc}") from None


def _refuse_duplicate_keys(data: bytes, what: str) -> None:
    """Raise MalformedCBOR if a map in `data` repeats a key (the fast decode keeps the last)."""
    try:
        cbor2.loads(data, semantic_decoders=_INERT_TAGS, allow_duplicate_keys=False)
    except Exception as exc:
        raise MalformedCBOR(f"{what}: {exc}") from None


def _refuse_envelope(envelope: Any) -> NoReturn:
    """Say precisely why a decoded item is not an acceptable COSE_Sign1 envelope."""
    if type(envelope) is not cbor2.CBORTag:
        if type(envelope) in _ARRAYS:
            raise NotCoseSign1("untagged array: a signed reading must carry CBOR tag 18")
        raise NotCoseSign1(f"expected CBOR tag 18 (COSE_Sign1), got {_kind(envelope)}")
    if envelope.tag != COSE_SIGN1_TAG:
        raise NotCoseSign1(f"CBOR tag {envelope.tag} is not COSE_Sign1 (18)")
    body = envelope.value
    if type(body) not in _ARRAYS or len(body) != 4:
        raise NotCoseSign1(f"COSE_Sign1 must be an array of 4 items, got {_describe(body)}")
    protected, unprotected, payload, signature = body
    if type(protected) is not bytes:
        raise NotCoseSign1(f"protected header must be a byte string, got {_kind(protected)}")
    if type(unprotected) not in _MAPS:
        raise NotCoseSign1(f"unprotected header must be a map, got {_kind(unprotected)}")
    if payload is None:
        raise NotCoseSign1("detached payload (nil) is not supported: the reading must be inline")
    if type(payload) is not bytes:
        raise NotCoseSign1(f"payload must be a byte string, got {_kind(payload)}")
    if type(signature) is not bytes:
        raise NotCoseSign1(f"signature must be a byte string, got {_kind(signature)}")
    if protected != PROTECTED_ES256:
        _refuse_protected(protected)
    _kid(unprotected)
    if len(signature) != SIGNATURE_LEN:
        raise BadSignature(f"signature is {len(signature)} bytes; ES256 r||s is 64")
    raise AssertionError("_refuse_envelope called on an acceptable envelope")  # pragma: no cover


def _refuse_protected(protected: bytes) -> NoReturn:
    """Say precisely why a protected header that is not the bytes of {1: -7} is refused."""
    if not protected:
        raise WrongAlgorithm("protected header is empty: no alg, ES256 (-7) required")
    header = _loads(protected, "protected header")
    if type(header) not in _MAPS:
        raise BadHeader(f"protected header must encode a map, got {_kind(header)}")
    _refuse_duplicate_keys(protected, "protected header")
    alg = [value for key, value in header.items() if type(key) is int and key == HEADER_ALG]
    if not alg:
        raise WrongAlgorithm("protected header has no alg (label 1); ES256 (-7) required")
    if type(alg[0]) is not int or alg[0] != ALG_ES256:
        raise WrongAlgorithm(f"alg {alg[0]!r} is not ES256 (-7)")
    extra = [key for key in header if not (type(key) is int and key == HEADER_ALG)]
    if extra:
        raise BadHeader(f"protected header may hold only alg; also found labels {extra!r}")
    raise NonCanonical(f"protected header {{1: -7}} is encoded as {protected.hex()}, not a10126")


def _kid(unprotected: Any) -> bytes:
    kid: Any = None
    extra: list[Any] = []
    for key, value in unprotected.items():
        if type(key) is int and key == HEADER_KID:
            kid = value
        else:
            extra.append(key)
    if kid is None:
        raise MissingKid(f"unprotected header has no kid (label 4); labels: {extra!r}")
    if type(kid) is not bytes:
        raise MissingKid(f"kid (label 4) must be a byte string, got {_kind(kid)}")
    if extra:
        raise BadHeader(f"unprotected header may hold only kid; also found labels {extra!r}")
    return kid


def _refuse_envelope_bytes(data: bytes, canonical: bytes, unprotected: Any) -> NoReturn:
    """The envelope decoded to acceptable values but `data` is not their canonical bytes."""
    _refuse_duplicate_keys(data, "COSE_Sign1")
    _kid(unprotected)  # a label like 4.0 finds the kid in Python but is another label
    # CBOR items are self-delimiting: if the canonical form is a prefix, the
    # decoder read exactly it and the rest is trailing garbage.
    if data.startswith(canonical):
        raise MalformedCBOR(
            f"{len(data) - len(canonical)} trailing bytes after the COSE_Sign1 item"
        )
    raise NonCanonical("COSE_Sign1 envelope is not in canonical (deterministic) encoding")


def _ulen(n: int) -> int:
    """Length of the shortest CBOR head carrying argument `n`."""
    if n < 24:
        return 1
    if n < 0x100:
        return 2
    if n < 0x10000:
        return 3
    if n < 0x100000000:
        return 5
    return 9


def _canonical_payload_len(
    meter_id: str, seq: int, time: int, import_wh: int, export_wh: int, power_w: int, flags: int,
    source: str,
) -> int:  # fmt: skip
    """Byte length of the canonical payload for validated fields (ASCII text fields).

    Map head and the eight one-byte keys make 9 bytes; each value is its
    shortest head plus, for text, its bytes. Validated fields bound three heads
    (meter id at most 64 bytes, source at most 7, flags below 64), so those are
    worked out inline: this runs on every reading.
    """
    return (
        12  # 9 plus the first head byte of meter id, flags and source
        + len(meter_id)
        + (len(meter_id) >= 24)  # a second meter id head byte
        + (flags >= 24)  # a second flags head byte
        + len(source)
        + _ulen(seq)
        + _ulen(time)
        + _ulen(import_wh)
        + _ulen(export_wh)
        + _ulen(power_w if power_w >= 0 else -1 - power_w)
    )


def _refuse_payload(payload: bytes, fields: Any) -> None:
    """Raise the precise reason a payload failed the fast checks (returns if it is fine).

    Returns only for a valid payload the fast check does not cover (a reading
    from an unsynced clock with an early time).
    """
    if type(fields) not in _MAPS:
        raise NotAReading(f"payload must be a map, got {_kind(fields)}")
    _refuse_duplicate_keys(payload, "payload")
    _check_keys(fields)
    values = [fields[key] for key in range(1, 9)]
    _check_fields(*values)
    canonical = codec.encode(dict(zip(range(1, 9), values, strict=True)))
    if payload != canonical:
        if payload.startswith(canonical):
            raise MalformedCBOR(f"payload: {len(payload) - len(canonical)} trailing bytes")
        raise NonCanonical("payload is not in canonical (deterministic) CBOR encoding")


def _new_reading(
    meter_id: str, seq: int, time: int, import_wh: int, export_wh: int, power_w: int, flags: int,
    source: str, signed: bytes, digest: bytes,
) -> Reading:  # fmt: skip
    """`Reading(...)` for already validated values, without the frozen dataclass's per-field
    `object.__setattr__` calls (a tenth of verify's own cost); tests check it equals `Reading(...)`.
    """
    reading = _object_new(Reading)
    _object_setattr(
        reading,
        "__dict__",
        {
            "meter_id": meter_id,
            "seq": seq,
            "time": time,
            "import_wh": import_wh,
            "export_wh": export_wh,
            "power_w": power_w,
            "flags": flags,
            "source": source,
            "signed": signed,
            "digest": digest,
        },
    )
    return reading


_cbor_loads = cbor2.loads
_object_new = object.__new__
_object_setattr = object.__setattr__
_sha256 = hashlib.sha256
_SIGNATURE_HEAD = b"\x58\x40"  # bstr of 64 bytes


def _split_canonical(data: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """`(kid, payload, payload item, signature)` when `data` is byte for byte the canonical
    `encode_sign1(kid, payload, signature)`; None for anything else (`_split_strict` decides).

    The payload item is the payload with its bstr head, as it appears in the
    Sig_structure. Only shortest heads are recognised (a one-byte length from
    24 up after 0x58), which is what makes a match canonical; kid and payload
    longer than 255 bytes never pass verify and are left to the full decode.
    Tests hold this against `_split_strict` on valid, mutated and random bytes.
    """
    try:
        # Tag 18, array of 4, bstr(a10126) = {1: -7}, then {4: followed by the kid.
        if data[:8] != _SIGN1_ES256:
            return None
        head = data[8]
        if 0x40 <= head <= 0x57:
            start = 9
            end = start + head - 0x40
        elif head == 0x58 and data[9] >= 24:
            start = 10
            end = start + data[9]
        else:
            return None
        kid = data[start:end]
        item = end
        head = data[item]
        if 0x40 <= head <= 0x57:
            start = item + 1
            end = start + head - 0x40
        elif head == 0x58 and data[item + 1] >= 24:
            start = item + 2
            end = start + data[item + 1]
        else:
            return None
        # Every index only grows, so a length that overran the data fails here.
        if data[end : end + 2] != _SIGNATURE_HEAD or len(data) != end + 2 + SIGNATURE_LEN:
            return None
        return kid, data[start:end], data[item:end], data[end + 2 :]
    except IndexError:
        return None


def _split_strict(data: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """`_split_canonical`'s result by a full decode, or the specific RejectedReading."""
    # Tag 18 over [protected {1: -7}, {4: kid}, payload, 64-byte signature] ...
    envelope = _loads(data, "COSE_Sign1")
    try:
        protected, unprotected, payload, signature = envelope.value
        kid = unprotected[HEADER_KID]
    except (AttributeError, ValueError, TypeError, LookupError):
        _refuse_envelope(envelope)
    if not (
        envelope.tag == COSE_SIGN1_TAG
        and protected == PROTECTED_ES256
        and type(kid) is bytes
        and len(unprotected) == 1
        and type(payload) is bytes
        and type(signature) is bytes
        and len(signature) == SIGNATURE_LEN
    ):
        _refuse_envelope(envelope)
    # ... in exactly its canonical bytes, nothing after it. (A header label 4.0
    # or a reordered item also lands here: they encode differently.)
    canonical = encode_sign1(kid, payload, signature)
    if data != canonical:
        _refuse_envelope_bytes(data, canonical, unprotected)
    return kid, payload, _head(0x40, len(payload)) + payload, signature


def verify(
    data: bytes | bytearray | memoryview,
    registry: Registry,
    *,
    now: int | None = None,
    max_clock_ahead_s: int = DEFAULT_MAX_CLOCK_AHEAD_S,
) -> Reading:
    """Decode and verify one signed reading; raise the specific RejectedReading otherwise.

    `registry` maps meter ids to registered meters (`meterchain.registry.Registry`).
    With `now` (Unix seconds), a reading from a synced clock more than
    `max_clock_ahead_s` in the future is refused as ClockSkew.
    """
    if type(data) is not bytes:
        if not isinstance(data, bytearray | memoryview):
            raise MalformedCBOR(f"expected bytes, got {type(data).__name__}")
        data = bytes(data)

    # Envelope: the one canonical layout, split by slicing; anything else goes
    # through the full decode, which accepts the same inputs and names the reason.
    parts = _split_canonical(data)
    if parts is None:
        parts = _split_strict(data)
    kid, payload, payload_item, signature = parts

    # Payload: exactly the keys 1..8 in canonical order, valid fields, canonical bytes.
    try:
        fields = _cbor_loads(payload, semantic_decoders=_INERT_TAGS)
    except Exception as exc:
        raise MalformedCBOR(f"payload: {exc}") from None
    # type() and not ==: a CBOR true key compares equal to 1 in Python but is another key.
    if not (
        type(fields) in _MAPS
        and list(fields) == _KEY_ORDER
        and tuple(map(type, fields)) == _KEY_TYPES
    ):
        _refuse_payload(payload, fields)
    meter_id = fields[1]
    seq = fields[2]
    time = fields[3]
    import_wh = fields[4]
    export_wh = fields[5]
    power_w = fields[6]
    flags = fields[7]
    source = fields[8]
    if not (
        type(meter_id) is str
        and type(seq) is int
        and type(time) is int
        and type(import_wh) is int
        and type(export_wh) is int
        and type(power_w) is int
        and type(flags) is int
        and 0 <= seq < UINT64_LIMIT
        and MIN_SYNCED_TIME <= time < MAX_TIME
        and 0 <= import_wh < UINT64_LIMIT
        and 0 <= export_wh < UINT64_LIMIT
        and -MAX_POWER_W <= power_w <= MAX_POWER_W
        and 0 <= flags <= KNOWN_FLAGS
        and type(source) is str
        and source in SOURCES
        and _NAME.fullmatch(meter_id)
    ):
        _refuse_payload(payload, fields)
    # Every value now has a checked type and bounded size, so any other encoding
    # of the same map is strictly longer than the canonical one (longer heads,
    # indefinite-length framing), and the key order was checked above: equal
    # length means canonical bytes. A property test holds this against codec.encode.
    if len(payload) != _canonical_payload_len(
        meter_id, seq, time, import_wh, export_wh, power_w, flags, source
    ):
        _refuse_payload(payload, fields)

    # Who signed it: kid, registry, source type, clock, signature.
    if kid != meter_id.encode():
        raise KidMismatch(f"kid {kid!r} is not the payload's meter id {meter_id!r}")
    meter = registry.get(meter_id)
    if meter is None:
        raise UnknownMeter(f"meter {meter_id!r} is not in the registry")
    if source != meter.source:
        raise SourceMismatch(
            f"meter {meter_id!r} is registered as {meter.source!r} but the reading says {source!r}"
        )
    if now is not None and not flags & FLAG_CLOCK_NOT_SYNCED and time > now + max_clock_ahead_s:
        raise ClockSkew(
            f"reading time {time} is {time - now} s ahead of this node's clock "
            f"(allowed {max_clock_ahead_s} s)"
        )
    if not meter.public_key.verify(signature, _SIG_STRUCTURE_ES256 + payload_item):
        raise BadSignature(
            f"ES256 signature does not verify with meter {meter_id!r}'s registered key "
            f"{meter.public_key.fingerprint}"
        )
    return _new_reading(
        meter_id,
        seq,
        time,
        import_wh,
        export_wh,
        power_w,
        flags,
        source,
        data,
        _sha256(data).digest(),
    )


def _describe(value: Any) -> str:
    if type(value) in _ARRAYS:
        return f"an array of {len(value)}"
    return _kind(value)
