"""The MeterChain exception family: every error the core raises derives from MeterChainError.

Foreign errors (cbor2, cryptography, sqlite3, ...) are wrapped at the boundary
into one of these, so callers catch one family and read a specific reason.
"""

from __future__ import annotations


class MeterChainError(Exception):
    """Base of every error MeterChain raises on purpose."""


class ConfigError(MeterChainError):
    """A configuration or registry file is missing, unreadable or has a bad key.

    The message names the file, the key and the problem.
    """

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")


class CodecError(MeterChainError):
    """Bytes that should be canonical CBOR are not decodable or not canonical."""


class SignatureError(MeterChainError):
    """A signature does not verify, or a key is malformed."""


class RejectedReading(MeterChainError):
    """A signed reading was refused; subclasses say why.

    `reason` is a short stable identifier used as a metrics label.
    """

    reason = "rejected"


class RegistryError(MeterChainError):
    """A meter cannot be added to a registry: its id or key clashes with an existing entry."""


# --- Why a signed reading was refused (meterchain.reading.verify) -------------------------


class MalformedCBOR(RejectedReading):
    """The bytes are not exactly one well-formed CBOR item (or the payload is not)."""

    reason = "malformed_cbor"


class NotCoseSign1(RejectedReading):
    """Well-formed CBOR, but not a tag-18 COSE_Sign1 array of [bstr, map, bstr, bstr]."""

    reason = "not_cose_sign1"


class WrongAlgorithm(RejectedReading):
    """The protected header does not name ES256 (alg -7)."""

    reason = "wrong_algorithm"


class BadHeader(RejectedReading):
    """A COSE header carries parameters other than the ones the wire format allows."""

    reason = "bad_header"


class NonCanonical(RejectedReading):
    """Decodable, but not the deterministic encoding the board produces (malleability)."""

    reason = "non_canonical"


class MissingKid(RejectedReading):
    """The unprotected header has no byte-string kid (label 4)."""

    reason = "missing_kid"


class KidMismatch(RejectedReading):
    """The kid is not the UTF-8 bytes of the payload's meter id."""

    reason = "kid_mismatch"


class UnknownMeter(RejectedReading):
    """The payload's meter id is not in the registry."""

    reason = "unknown_meter"


class SourceMismatch(RejectedReading):
    """The payload's source type differs from the one the meter is registered with."""

    reason = "source_mismatch"


class BadSignature(RejectedReading):
    """The ES256 signature does not verify with the registered key of the meter."""

    reason = "bad_signature"


class NotAReading(RejectedReading):
    """The payload is well-formed CBOR but not a map, so it cannot be a reading."""

    reason = "not_a_reading"


class FieldError(RejectedReading):
    """A payload field is missing, unknown, of the wrong type or out of range.

    `field` names it ("seq", "power_w", ... or "key 9" for an unknown key).
    """

    reason = "bad_field"

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"reading field {field}: {problem}")


class MissingField(FieldError):
    reason = "missing_field"


class UnknownField(FieldError):
    reason = "unknown_field"


class FieldWrongType(FieldError):
    reason = "field_wrong_type"


class FieldOutOfRange(FieldError):
    reason = "field_out_of_range"


class ClockSkew(RejectedReading):
    """The reading claims a time too far ahead of the verifier's clock."""

    reason = "clock_skew"


# --- Why the sequence guard refused a verified reading (meterchain.sequence) --------------


class ReplayedReading(RejectedReading):
    """The meter's sequence number was already accepted.

    `duplicate` is True only for a byte-identical copy of an accepted reading
    (see DuplicateReading), which ingest treats as an idempotent re-delivery.
    """

    reason = "replayed"
    duplicate = False


class DuplicateReading(ReplayedReading):
    """A byte-identical copy of a reading already accepted (e.g. an MQTT QoS 1 re-delivery)."""

    reason = "duplicate"
    duplicate = True


class OutOfOrder(RejectedReading):
    """The sequence number is below the last accepted one and was never accepted itself."""

    reason = "out_of_order"


class CounterBackwards(RejectedReading):
    """A cumulative energy register is lower than last accepted, without the counter-reset flag."""

    reason = "counter_backwards"
