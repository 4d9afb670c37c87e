"""The regulator's commands: admit and exit participants, register meters, veto; as signed txs.

Each command signs one transaction with the regulator's key (the site's
`secrets/regulator.key`, or `--key`), checks it locally against the
transaction schema, and publishes it to the aggregator on
`mc/<market>/c/regulator/tx` (QoS 1, as the broker user "regulator", waiting
for the broker's PUBACK). The aggregator dry-runs it against the ledger and
what is pending and puts it in the next block; a refusal is in its log and in
`meterchain_aggregator_txs_rejected_total{kind}`. A veto (M24) is a new record
with its published reason; it never changes what is recorded.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meterchain.keys import PrivateKey, PublicKey
from meterchain.ledger.transactions import Tx, signed
from meterchain.mqtt_auth import consensus_topic
from meterchain.site.layout import REGULATOR_ID, Site, SiteError


def transaction(site: Site, kind: str, terms: dict[str, Any], key: PrivateKey) -> Tx:
    """A regulator-signed `kind` transaction, stamped with the market clock's time."""
    body = dict(terms)
    body["time"] = int(site.clock.now())
    return signed(site.market, kind, body, key)


def admit(site: Site, key: PrivateKey, pid: str, role: str, public_key: str) -> Tx:
    point = PublicKey.from_hex(public_key).point
    return transaction(site, "participant", {"id": pid, "role": role, "key": point}, key)


def exit_participant(site: Site, key: PrivateKey, pid: str, mode: str, reason: str) -> Tx:
    return transaction(site, "participant_exit", {"id": pid, "mode": mode, "reason": reason}, key)


def register_meter(
    site: Site, key: PrivateKey, meter_id: str, owner: str, source: str, public_key: str
) -> Tx:
    point = PublicKey.from_hex(public_key).point
    terms = {"id": meter_id, "owner": owner, "key": point, "source": source}
    return transaction(site, "meter", terms, key)


def veto(site: Site, key: PrivateKey, target: str, reason: str) -> Tx:
    try:
        digest = bytes.fromhex(target)
    except ValueError:
        raise SiteError(f"veto target {target!r} is not a hex transaction hash") from None
    return transaction(site, "veto", {"target": digest, "reason": reason}, key)


def grid_network(site: Site, key: PrivateKey, path: Path) -> Tx:
    """The distribution network the weak centre checks clearings against (M25), from its
    site file (checked: ConfigError names the file and the key)."""
    from meterchain.market.network import load_network

    return transaction(site, "grid_network", {"network": load_network(path).to_cbor()}, key)


def decide(
    site: Site, key: PrivateKey, report: str, participant: str, action: str, fine: int, reason: str
) -> Tx:
    """The regulator's decision on a suspect of a recorded suspect report (M19)."""
    try:
        digest = bytes.fromhex(report)
    except ValueError:
        raise SiteError(f"report {report!r} is not a hex transaction hash") from None
    terms = {"report": digest, "participant": participant, "action": action, "fine": fine,
             "reason": reason}  # fmt: skip
    return transaction(site, "regulator_decision", terms, key)


def publish(site: Site, tx: Tx, *, timeout: float = 15.0) -> None:
    """Send `tx` to the aggregator as the regulator (raises SiteError if the broker refuses)."""
    import paho.mqtt.client as mqtt

    url = urlsplit(site.site.broker_url)
    tls = url.scheme == "mqtts"
    user = site.site.broker_username or REGULATOR_ID
    password = site.secret(f"{REGULATOR_ID}.pass").read_text().strip()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311
    )
    client.username_pw_set(user, password)
    ca = site.root / "ca" / "ca.crt"
    if tls:
        client.tls_set(ca_certs=str(ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    try:
        client.connect(url.hostname or "127.0.0.1", url.port or (8883 if tls else 1883), 30)
    except (OSError, ssl.SSLError) as exc:
        raise SiteError(f"cannot reach the broker at {site.site.broker_url}: {exc}") from exc
    client.loop_start()
    try:
        info = client.publish(consensus_topic(site.market, REGULATOR_ID, "tx"), tx.raw, qos=1)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise SiteError(f"the broker did not take the {tx.kind}: {exc}") from exc
        if not info.is_published():
            raise SiteError(f"the broker did not acknowledge the {tx.kind} in {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()


def regulator_key(site: Site, path: Path | None) -> PrivateKey:
    return PrivateKey.load(path or site.secret("regulator.key"))
