"""Broker credentials and ACL lines: who may publish where on a MeterChain Mosquitto.

Topic layout (DESIGN.md): meters publish readings to `mc/<market>/r/<meter_id>`
and their online state to `mc/<market>/status/<meter_id>`, and read only
their own acknowledgement `mc/<market>/ack/<meter_id>`, which agents write;
consensus nodes publish to `mc/<market>/c/<node_id>/...` and read the whole
`mc/<market>/c/#` tree; agents and the aggregator read readings. The ACL makes
"a meter can publish only as itself" and "a node can sign only as itself"
hold at the broker as well as in the signatures.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re

# Mosquitto 2.x password file format: $7$ = PBKDF2-HMAC-SHA512.
_PBKDF2_ITERATIONS = 101
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def check_name(kind: str, name: str) -> str:
    """Refuse names that could escape a topic level or an ACL line."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . : -")
    return name


def password_hash(password: str, *, salt: bytes | None = None) -> str:
    """A Mosquitto 2.x password-file hash (`$7$` PBKDF2-SHA512) of `password`."""
    salt = os.urandom(12) if salt is None else salt
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS, 64)
    salt_b64 = base64.b64encode(salt).decode()
    return f"$7${_PBKDF2_ITERATIONS}${salt_b64}${base64.b64encode(derived).decode()}"


def password_line(username: str, password: str) -> str:
    return f"{check_name('user', username)}:{password_hash(password)}"


def reading_topic(market: str, meter_id: str) -> str:
    return f"mc/{check_name('market', market)}/r/{check_name('meter id', meter_id)}"


def consensus_topic(market: str, node_id: str, kind: str) -> str:
    return f"mc/{check_name('market', market)}/c/{check_name('node id', node_id)}/{kind}"


def ack_topic(market: str, meter_id: str) -> str:
    """Where the edge agent acknowledges a meter's committed readings (end-to-end delivery)."""
    return f"mc/{check_name('market', market)}/ack/{check_name('meter id', meter_id)}"


def status_topic(market: str, meter_id: str) -> str:
    """Where a board keeps its retained online state (and its last will)."""
    return f"mc/{check_name('market', market)}/status/{check_name('meter id', meter_id)}"


def meter_acl(market: str, meter_id: str) -> str:
    """ACL block for a meter: publish its own readings and status, read its own acknowledgement."""
    return (
        f"user {meter_id}\n"
        f"topic write {reading_topic(market, meter_id)}\n"
        f"topic write {status_topic(market, meter_id)}\n"
        f"topic read {ack_topic(market, meter_id)}\n"
    )


def node_acl(market: str, node_id: str, *, user: str | None = None) -> str:
    """ACL block for an agent: publish as itself and acknowledgements, read the market.

    It reads the consensus tree, readings and boards' online states (its /status).
    `user` is the broker user when it is not the node id (one of an agent's several
    connections on a broker with `use_username_as_clientid`).
    """
    check_name("market", market)
    check_name("node id", node_id)
    return (
        f"user {check_name('user', user or node_id)}\n"
        f"topic write mc/{market}/c/{node_id}/#\n"
        f"topic write mc/{market}/ack/#\n"
        f"topic read mc/{market}/c/#\n"
        f"topic read mc/{market}/r/#\n"
        f"topic read mc/{market}/status/#\n"
    )


def observer_acl(market: str, user: str) -> str:
    """ACL block for the aggregator or a monitor: read everything of the market."""
    check_name("market", market)
    return f"user {check_name('user', user)}\ntopic read mc/{market}/#\n"
