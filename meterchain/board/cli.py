"""`meterchain board provision|deploy|monitor|run`: field tooling for meter boards.

PORT is a serial port of a real board (/dev/ttyUSB0, driven through mpremote) or
`emulated:FOLDER` for an emulated board whose flash is FOLDER (see driver.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from meterchain.errors import MeterChainError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterchain board",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("provision", help="install firmware, config and key; register the meter")
    p.add_argument("--port", required=True, help="serial port, or emulated:FOLDER")
    p.add_argument("--meter-id", required=True)
    p.add_argument("--market", required=True)
    p.add_argument("--broker", help="mqtts://HOST[:PORT] (TLS) or mqtt://HOST[:PORT]")
    p.add_argument(
        "--broker-ca", type=Path, help="CA certificate (PEM) the board verifies the broker with"
    )
    p.add_argument("--registry", type=Path, help="meter registry (TOML) to append the entry to")
    p.add_argument("--owner", help="owner of the meter in the registry (default: the market)")
    p.add_argument(
        "--source",
        default="load",
        help="pv wind hydro biomass load bidir storage chp (default: load)",
    )
    p.add_argument(
        "--meter-type",
        choices=("sdm630", "sdm120", "s0", "atm90e32", "sim"),
        help="meter on the board (default: sdm630, or what the board has)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config.json setting, e.g. meter.tx=17 interval_s=15 (repeatable)",
    )
    p.add_argument("--broker-passwd", type=Path, help="Mosquitto password file to add the meter to")
    p.add_argument("--broker-acl", type=Path, help="Mosquitto ACL file to add the meter's block to")
    p.add_argument("--wifi-ssid")
    p.add_argument(
        "--wifi-password-env",
        default="MC_WIFI_PASSWORD",
        help="environment variable holding the WiFi password (default MC_WIFI_PASSWORD)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be done, change nothing"
    )

    d = sub.add_parser("deploy", help="update the firmware, keeping key, config and spool")
    d.add_argument("--port", required=True)
    d.add_argument("--dry-run", action="store_true")

    m = sub.add_parser("monitor", help="tail readings and verify each against the registry")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--port", help="read the board's console (serial port or emulated:FOLDER)")
    src.add_argument("--broker", help="subscribe at mqtts://HOST[:PORT]")
    m.add_argument("--registry", type=Path, required=True)
    m.add_argument("--market", help="market to watch (required with --broker)")
    m.add_argument("--ca", type=Path, help="broker CA certificate (PEM)")
    m.add_argument("--username", help="broker user (a monitor/observer account)")
    m.add_argument(
        "--password-env",
        default="MC_BROKER_PASSWORD",
        help="environment variable holding the broker password",
    )
    m.add_argument("--count", type=int, help="stop after this many readings")
    m.add_argument("--timeout", type=float, default=3600.0, help="stop after this many seconds")
    m.add_argument(
        "--from-start",
        action="store_true",
        help="emulated board: read its console log from the beginning",
    )
    m.add_argument("--verbose", action="store_true", help="also print the board's log lines")

    r = sub.add_parser("run", help="run an emulated board (firmware under CPython) until killed")
    r.add_argument("--port", required=True, help="emulated:FOLDER")
    r.add_argument("--duration", type=float, help="power off after this many seconds")
    r.add_argument(
        "--quiet", action="store_true", help="keep the console in the folder's console.log only"
    )
    return parser


def _provision(ns: argparse.Namespace) -> int:
    from meterchain.board.driver import open_board
    from meterchain.board.provision import ProvisionRequest, parse_setting, provision

    settings = dict(parse_setting(item) for item in ns.set)
    req = ProvisionRequest(
        meter_id=ns.meter_id,
        market=ns.market,
        broker_url=ns.broker,
        registry=ns.registry,
        owner=ns.owner,
        source=ns.source,
        meter_type=ns.meter_type,
        settings=settings,
        broker_ca=ns.broker_ca,
        broker_passwd=ns.broker_passwd,
        broker_acl=ns.broker_acl,
        wifi_ssid=ns.wifi_ssid,
        wifi_password=os.environ.get(ns.wifi_password_env) if ns.wifi_ssid else None,
        dry_run=ns.dry_run,
    )
    provision(open_board(ns.port), req)
    return 0


def _monitor(ns: argparse.Namespace) -> int:
    from meterchain.board.monitor import exit_status, monitor_broker, monitor_port
    from meterchain.registry import Registry

    registry = Registry.load(ns.registry)
    if ns.broker:
        if not ns.market:
            print("meterchain board monitor: --market is required with --broker", file=sys.stderr)
            return 2
        stats = monitor_broker(
            ns.broker,
            ns.market,
            registry,
            ca_file=ns.ca,
            username=ns.username,
            password=os.environ.get(ns.password_env),
            count=ns.count,
            timeout=ns.timeout,
        )
    else:
        stats = monitor_port(
            ns.port,
            registry,
            count=ns.count,
            timeout=ns.timeout,
            from_start=ns.from_start,
            verbose=ns.verbose,
        )
    return exit_status(stats, ns.count)


def _run(ns: argparse.Namespace) -> int:
    from meterchain.board.driver import EMULATED_PREFIX

    if not ns.port.startswith(EMULATED_PREFIX):
        print(
            "meterchain board run: only emulated:FOLDER boards run on this machine", file=sys.stderr
        )
        return 2
    from meterchain.board import emulated

    args = ["run", ns.port[len(EMULATED_PREFIX) :]]
    if not ns.quiet:
        args.append("--console")
    if ns.duration is not None:
        args += ["--duration", str(ns.duration)]
    return emulated.main(args)


def main(argv: list[str]) -> int:
    ns = _parser().parse_args(argv)
    try:
        if ns.command == "provision":
            return _provision(ns)
        if ns.command == "deploy":
            from meterchain.board.driver import open_board
            from meterchain.board.provision import deploy

            deploy(open_board(ns.port), dry_run=ns.dry_run)
            return 0
        if ns.command == "monitor":
            return _monitor(ns)
        return _run(ns)
    except MeterChainError as exc:
        print(f"meterchain board {ns.command}: {exc}", file=sys.stderr)
        return 2
