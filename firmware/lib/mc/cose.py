"""COSE_Sign1 (RFC 9052) with ES256, in the one shape MeterChain uses for signed readings.

18([ h'A10126',          protected header {1: -7} (alg ES256), as a byte string
     {4: kid},           unprotected header: key id = the meter id's bytes
     payload,            byte string (the reading's deterministic CBOR)
     signature ])        64-byte r||s over Sig_structure
                         ["Signature1", protected, h'', payload]
"""

from . import cbor, p256

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


TAG_SIGN1 = const(18)
_HEADER_ALG = const(1)
_HEADER_KID = const(4)
_ALG_ES256 = const(-7)

PROTECTED_ES256 = cbor.encode({_HEADER_ALG: _ALG_ES256})  # b"\xa1\x01\x26"


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The bytes ES256 signs: CBOR ["Signature1", protected, h'', payload] (RFC 9052 4.4)."""
    return cbor.encode(["Signature1", protected, b"", payload])


def _require_bytes(name: str, value: object) -> None:
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"{name} must be bytes")


def sign1(payload: bytes, secret: int, kid: bytes) -> bytes:
    """Tagged COSE_Sign1 message carrying `payload`, signed ES256 with private scalar `secret`."""
    _require_bytes("payload", payload)
    _require_bytes("kid", kid)
    payload = bytes(payload)
    signature = p256.sign(secret, sig_structure(PROTECTED_ES256, payload))
    return cbor.encode(
        cbor.Tag(TAG_SIGN1, [PROTECTED_ES256, {_HEADER_KID: bytes(kid)}, payload, signature])
    )


def decode_sign1(data: bytes) -> tuple[bytes, dict, bytes, bytes]:
    """Split a tagged ES256 COSE_Sign1 message into (protected, unprotected, payload, signature).

    `protected` is the serialized protected header exactly as signed (bytes), `unprotected`
    the header map, `payload` and the 64-byte `signature` bytes.  Raises ValueError unless
    `data` is well-formed CBOR with tag 18, four fields of the right types, alg ES256.
    The signature is not checked here; see `verify1`.
    """
    message = cbor.decode(data)
    if not isinstance(message, cbor.Tag) or message.tag != TAG_SIGN1:
        raise ValueError("not a tagged COSE_Sign1 message")
    fields = message.value
    if not isinstance(fields, list) or len(fields) != 4:
        raise ValueError("COSE_Sign1 must be an array of 4 fields")
    protected, unprotected, payload, signature = fields
    if not isinstance(protected, bytes):
        raise ValueError("protected header must be a byte string")
    header = cbor.decode(protected) if protected else {}
    if not isinstance(header, dict) or header.get(_HEADER_ALG) != _ALG_ES256:
        raise ValueError("protected header must say alg ES256 (-7)")
    if not isinstance(unprotected, dict):
        raise ValueError("unprotected header must be a map")
    if not isinstance(payload, bytes):
        raise ValueError("payload must be an attached byte string")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise ValueError("ES256 signature must be 64 bytes")
    return protected, unprotected, payload, signature


def verify1(data: bytes, public_key: bytes) -> bytes:
    """Payload of COSE_Sign1 `data` if its ES256 signature verifies under the 65-byte point.

    Raises ValueError for a malformed message or a bad signature.
    """
    protected, _, payload, signature = decode_sign1(data)
    if not p256.verify(public_key, sig_structure(protected, payload), signature):
        raise ValueError("COSE_Sign1 signature does not verify")
    return payload
