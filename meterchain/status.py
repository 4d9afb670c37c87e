"""`meterchain status`: what a running agent or aggregator is doing, read from its local status API.

Reads `/status` from the service's HTTP port (the one that serves
`/metrics`): `--url http://HOST:PORT`, or `--config FILE` to take the port
from the service's own configuration. Prints it for people, every time in
ISO-8601 UTC with the local time beside it, or `--json` as served. Exit
status 0 when the service is live and ready, 1 when it answers but is not,
2 when it cannot be reached (or the configuration has the API off).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from meterchain.errors import ConfigError, MeterChainError
from meterchain.site.clock import MarketClock
from meterchain.times import iso_local, iso_utc

DEFAULT_URL = "http://127.0.0.1:9464"
_ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def market_clock(clock: MarketClock) -> dict[str, Any]:
    """The /status view of a service's market clock: now, the current hour, how fast it runs."""
    now = clock.now()
    return {
        "now": iso_utc(now),
        "hour": iso_utc(now // 3600 * 3600),
        "speed": clock.speed,
        "real_time": clock.real_time,
    }


def ledger_head(target: str) -> dict[str, Any]:
    """Height, head hash and what waits for a block, read on a connection of its own.

    Safe from any thread: the service's own store connection is never touched.
    """
    from meterchain.ledger.store import open_store

    try:
        with open_store(target, create=False) as store:
            head = store.head()
            waiting = {"inbox_readings": store.inbox_count(),
                       "pending_txs": len(store.pending_txs())}  # fmt: skip
    except (MeterChainError, OSError) as exc:
        return {"height": None, "head_hash": None, "error": str(exc)}
    if head is None:
        return {"height": None, "head_hash": None, **waiting}
    return {"height": head[0], "head_hash": head[1].hex(), **waiting}


def url_from_config(path: Path) -> str:
    """http://host:port of the status API named by an agent or aggregator configuration."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read it: {exc}") from exc
    for section in ("agent", "aggregator"):
        table = doc.get(section)
        if isinstance(table, dict):
            port = table.get("metrics_port", 0)
            host = table.get("metrics_host", "127.0.0.1")
            if not isinstance(port, int) or not port:
                raise ConfigError(str(path), f"{section}.metrics_port",
                                  "is 0: the service serves no status API")  # fmt: skip
            if host in ("0.0.0.0", "::"):
                host = "127.0.0.1" if host == "0.0.0.0" else "::1"
            return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
    raise ConfigError(str(path), None, "has no [agent] or [aggregator] table")


def fetch(url: str, timeout_s: float) -> dict[str, Any]:
    """The /status document; OSError when the service cannot be reached."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout_s) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        raise OSError(f"{url}/status answered {exc.code}: {body.strip()[:300]}") from exc
    except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
        raise OSError(f"cannot read {url}/status: {getattr(exc, 'reason', exc)}") from exc


def _value(key: str, value: Any) -> str:
    if isinstance(value, str) and _ISO_UTC.match(value):
        when = dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
        return f"{value} (local {iso_local(when.timestamp())})"
    if key.endswith("_s") and isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,.3f} s" if abs(value) < 10 else f"{value:,.1f} s"
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render(doc: Mapping[str, Any], out: TextIO) -> None:
    """The status document as indented `key: value` lines."""
    health = doc.get("health", {})
    state = "ready" if health.get("live") and health.get("ready") else "NOT READY"
    name = " ".join(str(doc[k]) for k in ("service", "node_id", "role") if doc.get(k))
    out.write(f"{name} (market {doc.get('market', '?')}, {doc.get('version', '?')}): {state}\n")
    for reason in health.get("reasons", []):
        out.write(f"  ! {reason}\n")
    for key, value in doc.items():
        if key in ("service", "node_id", "role", "market", "version", "health"):
            continue
        _write(key, value, out, 1)


def _label(key: str) -> str:
    """`last_reading_age_s` -> `last reading age` (the unit goes with the value)."""
    return (key[:-2] if key.endswith("_s") else key).replace("_", " ")


def _write(key: str, value: Any, out: TextIO, depth: int) -> None:
    pad = "  " * depth
    label = _label(key)
    if isinstance(value, Mapping):
        out.write(f"{pad}{label}:{' (none)' if not value else ''}\n")
        for k, v in value.items():
            _write(str(k), v, out, depth + 1)
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        out.write(f"{pad}{label}:\n")
        for item in value:
            out.write(f"{pad}  - " + ", ".join(f"{_label(k)} {_value(k, v)}"
                                              for k, v in item.items()) + "\n")  # fmt: skip
    elif isinstance(value, list):
        out.write(f"{pad}{label}: {', '.join(_value(key, v) for v in value) or '(none)'}\n")
    else:
        out.write(f"{pad}{label}: {_value(key, value)}\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="meterchain status",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help=f"the service's HTTP address (default {DEFAULT_URL})")
    where.add_argument("--config", type=Path, help="agent.toml or aggregator.toml: use its port")
    parser.add_argument("--json", action="store_true", help="print the /status JSON as served")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    ns = parser.parse_args(argv)
    try:
        url = url_from_config(ns.config) if ns.config else (ns.url or DEFAULT_URL)
        doc = fetch(url, ns.timeout)
    except ConfigError as exc:
        print(f"meterchain status: config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"meterchain status: {exc}", file=sys.stderr)
        return 2
    if ns.json:
        print(json.dumps(doc, indent=2))
    else:
        render(doc, sys.stdout)
    health = doc.get("health", {})
    return 0 if health.get("live") and health.get("ready") else 1
