"""The aggregator's configuration: defaults in dataclasses, a per-site TOML file, checked early.

`load(path)` checks every key (unknown keys, wrong types, ranges, names, the
ledger target, the broker URL, files that must exist) and loads what the file
points to: the regulator-signed consensus membership (checked against the
pinned regulator key) and the broker password. Anything wrong raises
`ConfigError(file, key, problem)`; `meterchain aggregator run` prints it as
`config error: FILE: KEY: PROBLEM` and exits with status 2. Relative paths are
relative to the file's folder; `$VARIABLES` in paths are expanded and must be
set (systemd's `$STATE_DIRECTORY`, `$CREDENTIALS_DIRECTORY`). With mqtts:// a
PEM `ca_file` is required; the password file must be owner-only (mode 0600).
The file checks are shared with the edge agent (meterchain.config_files).
A minimal file:

    [aggregator]
    market = "m1"
    ledger = "$STATE_DIRECTORY/ledger.db"   # or postgresql://user@host/db
    membership = "membership.toml"
    regulator_key = "04..."                 # the regulator's P-256 point, hex

    [broker]
    url = "mqtts://broker.example:8883"
    ca_file = "ca.crt"
    password_file = "$CREDENTIALS_DIRECTORY/broker.pass"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from meterchain import config_files
from meterchain.config_files import TableChecker
from meterchain.errors import MeterChainError
from meterchain.keys import PublicKey
from meterchain.ledger.checkpoint import DEFAULT_INTERVAL_BLOCKS
from meterchain.mqtt_auth import check_name
from meterchain.quorum import Membership, QuorumError
from meterchain.site.clock import REAL_TIME, MarketClock, check_clock

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class AggregatorSection:
    market: str = ""
    node_id: str = "aggregator"  # broker user, topic level and block proposer name
    ledger: str = ""  # SQLite file or postgresql:// URL
    membership: Path = Path()
    regulator_key: str = ""
    # Regulator-signed transactions (participants, meters) that go into block 0 with the
    # genesis: a CBOR array of transactions, as `meterchain site init` writes it. Optional.
    genesis_txs: Path | None = None
    block_interval_s: float = 60.0  # market seconds between block rounds
    # A checkpoint of the ledger state is proposed to the members after every this many
    # blocks and stored once more than n/2 signed it (the agents' [market] key must match).
    checkpoint_interval_blocks: int = DEFAULT_INTERVAL_BLOCKS
    vote_timeout_s: float = 10.0  # real seconds the members have to answer a proposal
    settle_grace_s: int = 300
    max_readings_per_block: int = 50_000
    max_clock_ahead_s: int = 300
    log_level: str = "info"
    metrics_port: int = 0  # 0: no /metrics endpoint
    metrics_host: str = "127.0.0.1"
    # The weak centre: "adjust" cuts trades over a line limit by the least total energy,
    # "price" sets congestion prices and asks for re-bids (M25); remedies for trades
    # that fell short, in the order to try them (M21; [] turns them off).
    congestion_method: str = "adjust"
    remedies: tuple[str, ...] = ("reassign", "storage", "ftr")


@dataclass(frozen=True)
class BrokerSection:
    url: str = ""
    ca_file: Path | None = None
    username: str = ""  # defaults to node_id
    password_file: Path | None = None
    client_id: str = ""  # defaults to "aggregator-<node_id>"
    keepalive_s: int = 30


@dataclass(frozen=True)
class AggregatorConfig:
    path: Path
    aggregator: AggregatorSection
    broker: BrokerSection
    membership: Membership
    regulator: PublicKey
    password: str = field(default="", repr=False)
    clock: MarketClock = REAL_TIME
    genesis_txs: tuple[bytes, ...] = ()

    @property
    def host(self) -> str:
        return urlsplit(self.broker.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.broker.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker.url).scheme == "mqtts"


def load(path: str | Path) -> AggregatorConfig:
    """Read and check an aggregator configuration file (see the module doc)."""
    path = Path(path)
    check = TableChecker(path, sorted_known=True)
    doc = config_files.load_toml(path)
    for key in doc:
        if key not in ("aggregator", "broker", "clock"):
            check.fail(key, "unknown section (known: aggregator, broker, clock)")
    for key in ("aggregator", "broker"):
        if key not in doc:
            check.fail(key, "missing section")
    agg: AggregatorSection = check.table(doc["aggregator"], AggregatorSection, "aggregator")
    broker: BrokerSection = check.table(doc["broker"], BrokerSection, "broker")
    _check_aggregator(check, agg, "membership" in doc["aggregator"])
    regulator = _regulator(check, agg.regulator_key)
    membership = _membership(check, agg, regulator)
    password = _check_broker(check, broker)
    clock = check_clock(check, doc.get("clock", {}))
    if agg.vote_timeout_s >= clock.wall_seconds(agg.block_interval_s):
        check.fail(
            "aggregator.vote_timeout_s",
            "must be shorter than block_interval_s (in real seconds, at the clock's speed)",
        )
    genesis = _genesis_txs(check, agg.genesis_txs) if agg.genesis_txs else ()
    return AggregatorConfig(path, agg, broker, membership, regulator, password, clock, genesis)


def _genesis_txs(check: TableChecker, path: Path) -> tuple[bytes, ...]:
    """The raw transactions of the genesis file (each must decode; the ledger checks them)."""
    from meterchain import codec
    from meterchain.errors import CodecError
    from meterchain.ledger.transactions import Tx, TxError

    check.readable_file(path, "aggregator.genesis_txs")
    try:
        items = codec.decode(path.read_bytes())
        if not isinstance(items, list) or not all(isinstance(i, bytes) for i in items):
            raise CodecError("not a CBOR array of byte strings")
        for raw in items:
            Tx.decode(raw)
    except (CodecError, TxError) as exc:
        check.fail("aggregator.genesis_txs", f"{path}: {exc}")
    return tuple(items)

def _check_aggregator(check: TableChecker, agg: AggregatorSection, has_membership: bool) -> None:
    for key in ("market", "ledger", "regulator_key"):
        if not getattr(agg, key):
            check.fail(f"aggregator.{key}", "missing")
    if not has_membership:
        check.fail("aggregator.membership", "missing")
    for key, value in (("market", agg.market), ("node_id", agg.node_id)):
        try:
            check_name(key, value)
        except ValueError as exc:
            check.fail(f"aggregator.{key}", str(exc))
    if agg.ledger.startswith(("postgresql://", "postgres://")):
        try:
            parts = urlsplit(agg.ledger)
            parts.port  # noqa: B018 - urlsplit validates the port lazily
        except ValueError as exc:
            check.fail("aggregator.ledger", f"not a PostgreSQL URL: {exc}")
        if not parts.path.strip("/") and "dbname=" not in parts.query:
            check.fail("aggregator.ledger", "PostgreSQL URL names no database")
    elif "://" in agg.ledger:
        check.fail("aggregator.ledger", "must be a SQLite file path or a postgresql:// URL")
    else:
        folder = config_files.expand_path(agg.ledger, check.path, "aggregator.ledger").parent
        if not folder.is_dir():
            check.fail("aggregator.ledger", f"folder {folder} does not exist")
    for key in ("block_interval_s", "vote_timeout_s"):
        check.positive(getattr(agg, key), f"aggregator.{key}")
    for key in ("settle_grace_s", "max_clock_ahead_s"):
        check.positive(getattr(agg, key), f"aggregator.{key}", allow_zero=True)
    check.positive(agg.max_readings_per_block, "aggregator.max_readings_per_block")
    check.positive(agg.checkpoint_interval_blocks, "aggregator.checkpoint_interval_blocks")
    if agg.log_level not in LOG_LEVELS:
        check.fail("aggregator.log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    from meterchain.market.congestion import METHODS
    from meterchain.market.failed_execution import REMEDIES

    if agg.congestion_method not in METHODS:
        check.fail("aggregator.congestion_method", f"must be one of {', '.join(METHODS)}")
    if len(set(agg.remedies)) != len(agg.remedies) or not set(agg.remedies) <= set(REMEDIES):
        check.fail("aggregator.remedies", f"must list distinct remedies of {', '.join(REMEDIES)}")
    if not 0 <= agg.metrics_port <= 65535:
        check.fail("aggregator.metrics_port", "must be 0 (off) or a TCP port 1-65535")


def ledger_target(cfg: AggregatorConfig) -> str:
    """The ledger as `open_store` takes it: a URL, or the file path resolved like other paths."""
    target = cfg.aggregator.ledger
    if target.startswith(("postgresql://", "postgres://")):
        return target
    return str(config_files.expand_path(target, cfg.path, "aggregator.ledger"))


def _regulator(check: TableChecker, text: str) -> PublicKey:
    try:
        return PublicKey.from_hex(text)
    except MeterChainError as exc:
        check.fail("aggregator.regulator_key", str(exc))


def _membership(check: TableChecker, agg: AggregatorSection, regulator: PublicKey) -> Membership:
    check.readable_file(agg.membership, "aggregator.membership")
    membership = Membership.load(agg.membership)  # raises ConfigError naming that file
    if membership.market != agg.market:
        check.fail(
            "aggregator.membership",
            f"{agg.membership} is for market {membership.market!r}, not {agg.market!r}",
        )
    try:
        membership.verify(regulator)
    except QuorumError as exc:
        check.fail("aggregator.membership", f"{agg.membership}: {exc}")
    return membership


def _check_broker(check: TableChecker, broker: BrokerSection) -> str:
    if not broker.url:
        check.fail("broker.url", "missing")
    parts = check.broker_url(broker.url, "broker.url")
    if parts.scheme == "mqtts":
        config_files.require_ca_file(broker.ca_file, check.path, "broker.ca_file")
    check.positive(broker.keepalive_s, "broker.keepalive_s")
    if broker.password_file is None:
        return ""
    return config_files.read_secret_file(broker.password_file, check.path, "broker.password_file")
