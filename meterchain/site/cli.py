"""`meterchain site ...`: create a market site, start and stop it, and the regulator's commands.

    meterchain site init DIR [--microgrids N] [--members K1] [--emulated] [--speed X]
                             [--market NAME] [--broker URL --ca FILE]
    meterchain site up DIR [--settle S]      start every process (returns once it is up)
    meterchain site wait DIR --hours N [--timeout S]   until N market hours are settled
    meterchain site status DIR [--json]
    meterchain site down DIR                 stop in order, after the ledger has every reading
    meterchain site admit DIR ID --key HEX [--role microgrid]
    meterchain site exit DIR ID --mode voluntary|inactive|expelled|banned --reason TEXT
    meterchain site register-meter DIR METER --owner ID --source pv|wind|load|bidir|... --key HEX
    meterchain site veto DIR TX_HASH --reason TEXT
    meterchain site keygen FILE              a new P-256 key (0600); prints its public key
    meterchain site network DIR FILE         record the grid network (M25 congestion checks)
    meterchain site decide DIR REPORT_HASH ID --action dismiss|warn|fine|expel [--fine N]
                             --reason TEXT   answer a suspect report (M19)

Exit status 0 on success, 1 when the site refused or failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meterchain.errors import ConfigError, MeterChainError


def _init(ns: argparse.Namespace) -> int:
    from meterchain.site.init import LAB_SPEED, InitOptions, init_site

    speed = ns.speed if ns.speed is not None else (LAB_SPEED if ns.emulated else 1.0)
    site = init_site(
        ns.dir,
        InitOptions(
            microgrids=ns.microgrids, members=ns.members, market=ns.market,
            emulated=ns.emulated, speed=speed, broker=ns.broker or "", ca_file=ns.ca,
        ),
    )  # fmt: skip
    print(
        f"site {site.root}: market {site.market}, {len(site.microgrids)} microgrids "
        f"({len(site.site.members)} consensus members), broker {site.site.broker_url}"
        + (", emulated meters and boards" if site.site.emulated else "")
        + (f", clock x{site.clock.speed:g}" if not site.clock.real_time else "")
    )
    print(f"next: meterchain site up {site.root}")
    return 0


def _up(ns: argparse.Namespace) -> int:
    from meterchain.site.supervisor import up

    site = up(ns.dir, settle_s=ns.settle)
    print(f"site {site.root} is up (logs and status in {site.run_dir})")
    return 0


def _wait(ns: argparse.Namespace) -> int:
    from meterchain.site import layout
    from meterchain.site.supervisor import wait_settled

    site = layout.load(ns.dir)
    done = wait_settled(
        site, ns.hours, ns.timeout, note=lambda n: print(f"{n} hour(s) settled", flush=True)
    )
    print(f"{done} market hours settled on {site.ledger}")
    return 0


def _keygen(ns: argparse.Namespace) -> int:
    from meterchain.keys import PrivateKey

    if ns.file.exists():
        print(f"meterchain site keygen: {ns.file} exists; a key is never overwritten",
              file=sys.stderr)  # fmt: skip
        return 1
    key = PrivateKey.generate()
    ns.file.parent.mkdir(parents=True, exist_ok=True)
    key.save(ns.file)
    print(key.public_key().point.hex())
    return 0


def _status(ns: argparse.Namespace) -> int:
    from meterchain.site import layout
    from meterchain.site.supervisor import status

    current = status(layout.load(ns.dir))
    if ns.json:
        print(json.dumps(current, indent=2))
        return 0
    print(f"state {current.get('state')}, ledger height {current.get('ledger_height', -1)}")
    for name, proc in current.get("processes", {}).items():
        alive = "running" if proc["alive"] else (proc["failed"] or "stopped")
        print(f"  {name:<28} pid {proc['pid']:<8} {alive}, restarts {proc['restarts']}")
    return 0


def _down(ns: argparse.Namespace) -> int:
    from meterchain.site.supervisor import down

    final = down(ns.dir)
    note = final.get("note") or ""
    print(f"site {ns.dir} is {final.get('state')}" + (f": {note}" if note else ""))
    return 0 if final.get("state") == "down" and not note else 1


def _regulator(ns: argparse.Namespace) -> int:
    from meterchain.site import layout, regulator

    site = layout.load(ns.dir)
    key = regulator.regulator_key(site, ns.regulator_key)
    if ns.command == "admit":
        tx = regulator.admit(site, key, ns.id, ns.role, ns.key)
    elif ns.command == "exit":
        tx = regulator.exit_participant(site, key, ns.id, ns.mode, ns.reason)
    elif ns.command == "register-meter":
        tx = regulator.register_meter(site, key, ns.id, ns.owner, ns.source, ns.key)
    elif ns.command == "network":
        tx = regulator.grid_network(site, key, ns.file)
    elif ns.command == "decide":
        tx = regulator.decide(site, key, ns.report, ns.id, ns.action, ns.fine, ns.reason)
    else:
        tx = regulator.veto(site, key, ns.target, ns.reason)
    regulator.publish(site, tx)
    print(f"{tx.kind} {tx.hash.hex()} sent to the aggregator (next block)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from meterchain.ledger.transactions import DECISIONS, EXIT_MODES, ROLES, SOURCES

    parser = argparse.ArgumentParser(
        prog="meterchain site", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("init", help="write a new site folder")
    p.add_argument("dir", type=Path)
    p.add_argument("--microgrids", type=int, default=4, help="N microgrids (4: the reference day)")
    p.add_argument("--members", type=int, default=3, help="K+1 consensus members (the first ones)")
    p.add_argument("--market", default="lab")
    p.add_argument("--emulated", action="store_true", help="emulated meters and boards (a lab)")
    p.add_argument("--speed", type=float, help="market clock speed (default 1; 1440 emulated)")
    p.add_argument("--broker", help="an external broker mqtt(s)://[user:pass@]host[:port]")
    p.add_argument("--ca", type=Path, help="the external broker's CA certificate (mqtts://)")
    p.set_defaults(func=_init)
    p = sub.add_parser("up", help="start the site's processes")
    p.add_argument("dir", type=Path)
    p.add_argument("--settle", type=float, default=2.0,
                   help="real seconds between genesis and the start of the market day")  # fmt: skip
    p.set_defaults(func=_up)
    p = sub.add_parser("wait", help="wait until the aggregator has settled N market hours")
    p.add_argument("dir", type=Path)
    p.add_argument("--hours", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300.0, help="real seconds")
    p.set_defaults(func=_wait)
    p = sub.add_parser("keygen", help="write a new P-256 private key (0600), print its public key")
    p.add_argument("file", type=Path)
    p.set_defaults(func=_keygen)
    p = sub.add_parser("status", help="the site's processes and ledger height")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_status)
    p = sub.add_parser("down", help="stop the site in order")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_down)
    for name, what in (("admit", "admit a participant"), ("exit", "a participant leaves"),
                       ("register-meter", "register a meter to its owner"),
                       ("veto", "veto a recorded transaction, with a reason"),
                       ("network", "record the grid network the weak centre checks"),
                       ("decide", "decide on a suspect of a recorded report")):  # fmt: skip
        p = sub.add_parser(name, help=f"regulator: {what}")
        p.add_argument("dir", type=Path)
        p.add_argument("--regulator-key", type=Path, help="default: the site's secrets/")
        p.set_defaults(func=_regulator)
        if name == "network":
            p.add_argument("file", type=Path, help="the network site file (TOML)")
            continue
        if name == "decide":
            p.add_argument("report", help="hash of the suspect report transaction (hex)")
            p.add_argument("id", help="the suspect")
            p.add_argument("--action", required=True, choices=DECISIONS)
            p.add_argument("--fine", type=int, default=0, help="minor units from the bond")
            p.add_argument("--reason", required=True)
            continue
        if name == "veto":
            p.add_argument("target", help="hash of the transaction (hex)")
            p.add_argument("--reason", required=True)
            continue
        p.add_argument("id")
        if name == "admit":
            p.add_argument("--key", required=True, help="its P-256 public key (hex)")
            p.add_argument("--role", default="microgrid", choices=ROLES)
        elif name == "exit":
            p.add_argument("--mode", default="voluntary", choices=EXIT_MODES)
            p.add_argument("--reason", required=True)
        else:
            p.add_argument("--owner", required=True)
            p.add_argument("--source", required=True, choices=SOURCES)
            p.add_argument("--key", required=True, help="the meter's P-256 public key (hex)")
    return parser


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (MeterChainError, ValueError) as exc:
        print(f"meterchain site {ns.command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"meterchain site {ns.command}: {exc}", file=sys.stderr)
        return 1
