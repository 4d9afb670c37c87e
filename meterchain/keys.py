"""P-256 keys for CPython processes: load, generate, sign and verify raw r||s signatures.

Nodes (edge agents, aggregator, regulator) sign with keys kept in PEM files;
meters are known by their 65-byte uncompressed public points. Signatures on
the wire are 64 bytes r||s, the COSE ES256 form, and are verified through
OpenSSL (the `cryptography` package).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from meterchain.errors import SignatureError

CURVE = ec.SECP256R1()
ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
# RFC 6979 nonces, as on the boards: the same message signed twice gives the same
# bytes, so a re-signed reading is a duplicate, never a "replay" with new bytes.
_ECDSA_SHA256_DETERMINISTIC = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)


@dataclass(frozen=True)
class PublicKey:
    """A P-256 public key, parsed once and reused for every verification."""

    point: bytes  # 65-byte uncompressed SEC1 point
    _key: ec.EllipticCurvePublicKey

    @classmethod
    def from_point(cls, point: bytes) -> PublicKey:
        if len(point) != 65 or point[0] != 4:
            raise SignatureError("public key must be a 65-byte uncompressed P-256 point")
        try:
            key = ec.EllipticCurvePublicKey.from_encoded_point(CURVE, bytes(point))
        except ValueError as exc:
            raise SignatureError(f"not a point on P-256: {exc}") from exc
        return cls(bytes(point), key)

    @classmethod
    def from_hex(cls, text: str) -> PublicKey:
        try:
            return cls.from_point(bytes.fromhex(text))
        except ValueError as exc:
            raise SignatureError(f"public key is not hex: {exc}") from exc

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when `signature` (64-byte r||s) is valid ES256 over `message`."""
        if len(signature) != 64:
            return False
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        if not (0 < r < ORDER and 0 < s < ORDER):
            return False
        try:
            self._key.verify(encode_dss_signature(r, s), message, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True

    @property
    def fingerprint(self) -> str:
        """Short stable identifier: first 16 hex digits of SHA-256 of the point."""
        return hashlib.sha256(self.point).hexdigest()[:16]


@dataclass(frozen=True)
class PrivateKey:
    """A node's P-256 signing key."""

    _key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(ec.generate_private_key(CURVE))

    @classmethod
    def from_secret(cls, secret: int) -> PrivateKey:
        if not 0 < secret < ORDER:
            raise SignatureError("secret scalar out of range")
        return cls(ec.derive_private_key(secret, CURVE))

    @classmethod
    def load(cls, path: str | Path) -> PrivateKey:
        data = Path(path).read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"{path}: not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
            raise SignatureError(f"{path}: not a P-256 private key")
        return cls(key)

    def save(self, path: str | Path) -> None:
        """Write the key as PKCS#8 PEM, mode 0600, replacing (never following) what is there."""
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(Path(path), pem)

    @property
    def secret(self) -> int:
        return self._key.private_numbers().private_value

    def public_key(self) -> PublicKey:
        point = self._key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return PublicKey(point, self._key.public_key())

    def sign(self, message: bytes) -> bytes:
        """64-byte r||s ES256 signature over `message` (RFC 6979 deterministic nonce)."""
        der = self._key.sign(message, _ECDSA_SHA256_DETERMINISTIC)
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def write_private_file(path: Path, data: bytes, *, keep_access: bool = False) -> None:
    """Atomically replace `path` with `data`, written and synced before the rename.

    The bytes go to a fresh temporary file (O_EXCL | O_NOFOLLOW) beside `path` that
    is then renamed over it, so a symlink at `path` is replaced, never followed, and
    no reader sees a partial file. The new file is mode 0600 owned by this process,
    unless `keep_access` and a regular file is already there: then it gets that
    file's owner, group and mode (a broker password file must stay readable by the
    broker's user after a root tool rewrites it).
    """
    mode, owner = 0o600, None
    if keep_access:
        try:
            old = path.lstat()
        except FileNotFoundError:
            old = None
        if old is not None and stat.S_ISREG(old.st_mode):
            mode, owner = stat.S_IMODE(old.st_mode), (old.st_uid, old.st_gid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                os.fchown(out.fileno(), *owner)
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
