"""Who signed what: the consensus Signer/Keyring interface, with P-256 and a sim-only scheme.

Production nodes sign with their P-256 key (`P256Signer`) and check every
signature through a `Keyring` built from the regulator-signed membership and
the registered submit-only participants. The keyring caches the outcome of
identical (key, message, signature) checks: a vote forwarded in five other
messages is verified once. `HashSigner`/`hash_keyring` is a deterministic
keyed-hash stand-in used ONLY by the simulator to run thousands of schedules
quickly; it has the same interface, and a share of the simulated schedules
always runs with real P-256 keys.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from meterchain.keys import PrivateKey, PublicKey
from meterchain.quorum import Member, Membership


class Signer(Protocol):
    """Signs canonical statement bytes as one node."""

    @property
    def node_id(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


class VerificationCache:
    """Bounded memo of signature checks keyed by (public point, signature, message)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[bytes, bytes, bytes], bool] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[bytes, bytes, bytes]) -> bool | None:
        hit = self._entries.get(key)
        if hit is not None:
            self.hits += 1
        return hit

    def put(self, key: tuple[bytes, bytes, bytes], ok: bool) -> None:
        self.misses += 1
        self._entries[key] = ok
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class CachingKey(PublicKey):
    """A P-256 public key whose verifications are remembered in a shared cache."""

    cache: VerificationCache = field(default_factory=VerificationCache, compare=False)

    @classmethod
    def wrap(cls, key: PublicKey, cache: VerificationCache) -> CachingKey:
        return cls(key.point, key._key, cache)

    def verify(self, signature: bytes, message: bytes) -> bool:
        memo = (self.point, bytes(signature), bytes(message))
        known = self.cache.get(memo)
        if known is None:
            known = PublicKey.verify(self, signature, message)
            self.cache.put(memo, known)
        return known


@dataclass(frozen=True)
class P256Signer:
    """A node's real signing identity: its id and P-256 private key."""

    node_id: str
    key: PrivateKey

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


class Keyring:
    """Public keys of members (who vote) and participants (who may only submit requests)."""

    def __init__(
        self,
        membership: Membership,
        participants: Mapping[str, PublicKey] | None = None,
        *,
        cache: VerificationCache | None = None,
    ) -> None:
        self.cache = cache if cache is not None else VerificationCache()
        members = tuple(Member(m.node_id, self._wrap(m.public_key)) for m in membership.members)
        # A Membership whose keys go through the cache, so QuorumCertificate.verify
        # (meterchain.quorum) checks each signature at most once per process.
        self.membership = Membership(
            membership.market, membership.epoch, members, membership.regulator_signature
        )
        self._keys: dict[str, PublicKey] = {m.node_id: m.public_key for m in members}
        self._members = frozenset(self._keys)
        for node_id, key in (participants or {}).items():
            self._keys.setdefault(node_id, self._wrap(key))

    def _wrap(self, key: PublicKey) -> PublicKey:
        if isinstance(key, CachingKey | HashKey):
            return key
        return CachingKey.wrap(key, self.cache)

    def is_member(self, node_id: str) -> bool:
        return node_id in self._members

    @property
    def size(self) -> int:
        """How many identities (members and participants) may sign requests."""
        return len(self._keys)

    def knows(self, node_id: str) -> bool:
        return node_id in self._keys

    def verify(self, node_id: str, message: bytes, signature: bytes) -> bool:
        key = self._keys.get(node_id)
        if key is None:
            return False
        if isinstance(key, CachingKey):
            return key.verify(signature, message)
        memo = (key.point, signature, message)
        known = self.cache.get(memo)
        if known is None:
            known = key.verify(signature, message)
            self.cache.put(memo, known)
        return known


# --- simulator-only keyed-hash scheme -------------------------------------------------


@dataclass(frozen=True)
class HashKey(PublicKey):
    """Simulator-only verification key: HMAC-SHA256 under a per-node secret.

    It is NOT a public-key scheme (whoever verifies could sign); it exists so
    the seeded simulator can run thousands of schedules fast behind the same
    interface. Byzantine nodes in the simulator only ever hold their own
    `HashSigner`, so they cannot forge other nodes' messages.
    """

    secret: bytes = b""

    def verify(self, signature: bytes, message: bytes) -> bool:
        return hmac.compare_digest(signature, _hash_sign(self.secret, message))


def _hash_sign(secret: bytes, message: bytes) -> bytes:
    tag = hmac.digest(secret, message, "sha256")
    return tag + tag[::-1]  # 64 bytes, the size of a real r||s signature


@dataclass(frozen=True)
class HashSigner:
    """Simulator-only signer paired with `HashKey`."""

    node_id: str
    secret: bytes

    def sign(self, message: bytes) -> bytes:
        return _hash_sign(self.secret, message)

    def public_key(self) -> HashKey:
        digest = hashlib.sha256(b"hash-key" + self.secret).digest()
        point = b"\x04" + digest + hashlib.sha256(digest).digest()
        return HashKey(point, None, self.secret)  # type: ignore[arg-type]


def p256_identities(node_ids: list[str], *, seed: int = 1) -> dict[str, P256Signer]:
    """Deterministic P-256 identities for tests and benchmarks (secret derived from `seed`)."""
    out = {}
    for i, node_id in enumerate(node_ids):
        secret = int.from_bytes(hashlib.sha256(f"{seed}/{i}/{node_id}".encode()).digest(), "big")
        out[node_id] = P256Signer(node_id, PrivateKey.from_secret(secret % (2**255) + 1))
    return out


def hash_identities(node_ids: list[str], *, seed: int = 1) -> dict[str, HashSigner]:
    """Simulator-only keyed-hash identities (see `HashKey`)."""
    return {
        node_id: HashSigner(node_id, hashlib.sha256(f"{seed}/{node_id}".encode()).digest())
        for node_id in node_ids
    }


def public_keys(signers: Mapping[str, P256Signer | HashSigner]) -> dict[str, PublicKey]:
    out: dict[str, PublicKey] = {}
    for node_id, signer in signers.items():
        out[node_id] = (
            signer.public_key() if isinstance(signer, HashSigner) else signer.key.public_key()
        )
    return out
