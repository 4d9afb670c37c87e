"""`meterchain aggregator run|check-config|veto`: the market operator's service and tools.

Exit status 2 means the configuration is wrong; the message on stderr reads
`config error: FILE: KEY: PROBLEM`. `run` exits 1 when the ledger does not
verify at start-up (it never serves from a ledger it cannot vouch for).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from aggregator import config as agg_config
from meterchain.errors import ConfigError, MeterChainError


def _run(ns: argparse.Namespace) -> int:
    cfg = agg_config.load(ns.config)
    from aggregator.service import Aggregator
    from meterchain import service
    from meterchain.ledger.chain import ChainError

    log = service.setup_logging("meterchain-aggregator", ns.log_level or cfg.aggregator.log_level)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        return Aggregator(cfg).run(stop)
    except ChainError as exc:
        log.error("the ledger does not verify: %s", exc)
        return 1
    except MeterChainError as exc:
        log.error("cannot run: %s", exc)
        return 1


def _check(ns: argparse.Namespace) -> int:
    from meterchain.config_files import systemd_directories

    systemd_directories(ns.credentials, ns.state_dir, service="aggregator")
    cfg = agg_config.load(ns.config)
    print(
        f"{cfg.path}: OK (market {cfg.aggregator.market}, {cfg.membership.n} consensus "
        f"members, ledger {agg_config.ledger_target(cfg)})"
    )
    return 0


def _veto(ns: argparse.Namespace) -> int:
    """The regulator halts a recorded trade (M24): a signed veto with its published reason."""
    from meterchain.keys import PrivateKey
    from meterchain.ledger.chain import StoreReadings, verify_store
    from meterchain.ledger.state import TxContext
    from meterchain.ledger.store import open_store
    from meterchain.ledger.transactions import TxError, signed

    key = PrivateKey.load(ns.key)
    with open_store(ns.ledger, create=False) as store:
        state, _ = verify_store(store, signatures=False)
        if state is None:
            print("meterchain aggregator veto: the ledger is empty", file=sys.stderr)
            return 1
        now = int(time.time())
        terms = {"target": bytes.fromhex(ns.target), "reason": ns.reason, "time": now}
        tx = signed(state.market, "veto", terms, key)
        trial = state.copy()
        head = store.head()
        assert head is not None
        trial.begin_block(head[0] + 1, max(now, state.time))
        try:
            trial.apply(tx, TxContext(head[0] + 1, 0, trial.time, (), False, StoreReadings(store)))
        except TxError as exc:
            print(f"meterchain aggregator veto: refused: {exc}", file=sys.stderr)
            return 1
        store.submit_tx(tx, now)
    print(f"veto {tx.hash.hex()} pending for the next block")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meterchain aggregator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the aggregator service")
    p.add_argument("--config", required=True, help="aggregator.toml")
    p.add_argument("--log-level", choices=agg_config.LOG_LEVELS)
    p.set_defaults(func=_run)
    p = sub.add_parser("check-config", help="check a configuration file and exit")
    p.add_argument("--config", required=True)
    p.add_argument("--credentials", type=Path, help="$CREDENTIALS_DIRECTORY when unset "
                   "(default: /etc/meterchain/secrets if present)")
    p.add_argument("--state-dir", type=Path, help="$STATE_DIRECTORY when unset "
                   "(default: /var/lib/meterchain-aggregator if present)")  # fmt: skip
    p.set_defaults(func=_check)
    p = sub.add_parser("veto", help="regulator: veto a recorded transaction, with a reason")
    p.add_argument("--ledger", required=True, help="SQLite file or postgresql:// URL")
    p.add_argument("--key", required=True, help="the regulator's PEM private key")
    p.add_argument("--target", required=True, help="hash of the transaction to veto (hex)")
    p.add_argument("--reason", required=True, help="the published reason")
    p.set_defaults(func=_veto)
    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (MeterChainError, ValueError, OSError) as exc:
        print(f"meterchain aggregator {ns.command}: {exc}", file=sys.stderr)
        return 1
