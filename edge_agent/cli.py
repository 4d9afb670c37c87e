"""`meterchain agent ...`: run the edge agent, check its config, show its energy and gateway keys.

Exit status 2 means the configuration (or the registry it names) is wrong;
the message on stderr reads `config error: FILE: KEY: PROBLEM`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

from edge_agent import config as agent_config
from meterchain.errors import ConfigError
from meterchain.times import iso_utc

Handler = Callable[[argparse.Namespace], int]


def _load(ns: argparse.Namespace) -> agent_config.AgentConfig:
    return agent_config.load(ns.config)


def _run(ns: argparse.Namespace) -> int:
    cfg = _load(ns)
    # The registry is part of the configuration: a bad one is a config error too.
    from meterchain.registry import Registry

    Registry.load(cfg.agent.registry)
    from edge_agent.agent import run_agent
    from meterchain import service

    service.setup_logging("meterchain-agent", ns.log_level or cfg.agent.log_level)
    return run_agent(cfg)


def _check(ns: argparse.Namespace) -> int:
    from meterchain.config_files import systemd_directories

    systemd_directories(ns.credentials, ns.state_dir, service="agent")
    cfg = _load(ns)
    from meterchain.registry import Registry

    registry = Registry.load(cfg.agent.registry)
    print(
        f"{cfg.path}: OK ({len(cfg.modbus_meters)} Modbus meter(s), "
        f"{len(registry)} registered meter(s))"
    )
    return 0


def _gateway_keys(ns: argparse.Namespace) -> int:
    """Registry entries for the Modbus meters this agent attests."""
    cfg = _load(ns)
    from edge_agent.gateway import gateway_key
    from meterchain.registry import entry_text, make_meter

    assert cfg.node_key is not None
    for meter in cfg.modbus_meters:
        key = gateway_key(cfg.node_key, cfg.agent.market, meter.id).public_key()
        print(entry_text(make_meter(meter.id, key, cfg.owner, meter.source)))
    return 0


def _energy(ns: argparse.Namespace) -> int:
    """Hourly energy per meter from the agent's database."""
    cfg = _load(ns)
    from edge_agent.store import StoreView

    if not cfg.database.exists():
        print(f"no database yet at {cfg.database}", file=sys.stderr)
        return 1
    view = StoreView(cfg.database)
    rows = view.hourly(owner=ns.owner)
    view.close()
    if ns.json:
        doc = [{**dataclasses.asdict(row), "hour_utc": iso_utc(row.hour)} for row in rows]
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for row in rows:  # the hour is named by its start (ISO-8601 UTC)
            print(
                f"{iso_utc(row.hour)} {row.owner} {row.meter_id} {row.source} "
                f"import={row.import_wh} Wh export={row.export_wh} Wh"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterchain agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", required=True, metavar="FILE", help="the agent's TOML file")
        p.set_defaults(func=handler)
        return p

    run = add("run", _run, "run the agent until SIGTERM")
    run.add_argument("--log-level", choices=agent_config.LOG_LEVELS, default=None)
    check = add("check-config", _check, "validate the configuration and exit")
    check.add_argument(
        "--credentials", type=Path, metavar="DIR",
        help="$CREDENTIALS_DIRECTORY when unset (default: /etc/meterchain/secrets if present)",
    )  # fmt: skip
    check.add_argument(
        "--state-dir", type=Path, metavar="DIR",
        help="$STATE_DIRECTORY when unset (default: /var/lib/meterchain-agent if present)",
    )  # fmt: skip
    add(
        "gateway-keys",
        _gateway_keys,
        "print registry entries for the Modbus meters this agent signs for",
    )
    energy = add("energy", _energy, "print hourly energy per meter")
    energy.add_argument("--owner", default=None, help="only this microgrid")
    energy.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    handler: Handler = ns.func
    try:
        return handler(ns)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
