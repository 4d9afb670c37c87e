"""Gateway attestation: the agent signs readings for local meters that cannot sign themselves.

A Modbus meter (an SDM630 on RS-485) has no key, so the agent signs each
sample it reads, with FLAG_GATEWAY_ATTESTED set in the status bits. The
registry allows one public key per meter (a shared key would let one
signer pose as another), so the agent does not sign with its node key
itself: it derives one key per (market, meter) from its node key with
HKDF-SHA256. The derived keys need no files or backups of their own, and
`meterchain agent gateway-keys --config FILE` prints the registry entries to
register them. A gateway reading then goes through the same verification and
sequence guard as a board's.

Gateway readings are published to `mc/<market>/c/<node_id>/gw/<meter_id>`:
the broker ACL for a node (meterchain.mqtt_auth.node_acl) lets it write
only under its own `mc/<market>/c/<node_id>/` tree, never to a meter's
`mc/<market>/r/<meter_id>` topic; the aggregator and the other agents read
both trees.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meterchain.keys import ORDER, PrivateKey
from meterchain.mqtt_auth import check_name
from meterchain.reading import FLAG_GATEWAY_ATTESTED, sign_reading

_SALT = b"meterchain gateway key v1"


def gateway_key(node_key: PrivateKey, market: str, meter_id: str) -> PrivateKey:
    """The P-256 key the agent with `node_key` uses to attest `meter_id` in `market`.

    48 bytes of HKDF output reduced mod n-1 (plus 1): the bias is below 2^-128.
    """
    check_name("market", market)
    check_name("meter id", meter_id)
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=48,
        salt=_SALT,
        info=f"{market}/{meter_id}".encode(),
    ).derive(node_key.secret.to_bytes(32, "big"))
    return PrivateKey.from_secret(int.from_bytes(okm, "big") % (ORDER - 1) + 1)


def gateway_topic(market: str, node_id: str, meter_id: str) -> str:
    """Where the agent `node_id` publishes the readings it attests for `meter_id`."""
    for kind, name in (("market", market), ("node id", node_id), ("meter id", meter_id)):
        check_name(kind, name)
    return f"mc/{market}/c/{node_id}/gw/{meter_id}"


def gateway_subscription(market: str) -> str:
    """Topic filter matching every agent's gateway readings in `market`."""
    return f"mc/{check_name('market', market)}/c/+/gw/+"


def sign_gateway_reading(
    key: PrivateKey,
    meter_id: str,
    seq: int,
    time: int,
    import_wh: int,
    export_wh: int,
    power_w: int,
    source: str,
    flags: int = 0,
) -> bytes:
    """A COSE_Sign1 reading for a Modbus meter, flagged as gateway-attested."""
    return sign_reading(
        key,
        meter_id,
        seq,
        time,
        import_wh,
        export_wh,
        power_w,
        flags | FLAG_GATEWAY_ATTESTED,
        source,
    )
