"""The edge agent's configuration: defaults in dataclasses, a per-site TOML file, secrets apart.

`load(path)` reads the site file, checks every key against the dataclasses
below (unknown keys, wrong types, out-of-range values, missing files, broken
references between sections), reads the secrets it points to (the node's
PEM key, the broker password file) and returns an `AgentConfig`. Anything
wrong raises `ConfigError(file, key, problem)`; `meterchain agent run` prints
it as `config error: FILE: KEY: PROBLEM` and exits with status 2.

Relative paths in the file are relative to the file's own folder, so a site
folder (agent.toml, node.key, broker.pass, registry.toml, ...) can move as a
whole; `$VARIABLES` in paths are expanded and must be set, so under systemd
secrets can come from `$CREDENTIALS_DIRECTORY` and state go to
`$STATE_DIRECTORY` (see deploy/systemd/meterchain-agent.service). The file
checks are shared with the aggregator (meterchain.config_files). A minimal file:

    [agent]
    node_id = "mg1"
    market = "m1"
    key_file = "node.key"
    registry = "registry.toml"
    state_dir = "state"

    [broker]
    url = "mqtts://broker.example:8883"
    ca_file = "ca.crt"
    password_file = "broker.pass"
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterchain import config_files
from meterchain.config_files import TableChecker, toml_kind
from meterchain.errors import MeterChainError
from meterchain.keys import PrivateKey, PublicKey
from meterchain.ledger.checkpoint import DEFAULT_INTERVAL_BLOCKS
from meterchain.quorum import Membership, QuorumError
from meterchain.reading import SOURCES
from meterchain.site.clock import REAL_TIME, MarketClock, check_clock

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_INGEST_WORKERS = os.cpu_count() or 1  # one ingest process per core
MAX_INGEST_WORKERS = 64
ROLES = ("node", "submitter", "standalone")
SETPOINT_KINDS = ("storage_charge_w", "storage_discharge_w", "storage_power_w", "gas_turbine_w")


@dataclass(frozen=True)
class AgentSection:
    node_id: str = ""
    market: str = ""
    microgrid: str = ""  # owner name in the registry; defaults to node_id
    key_file: Path = Path()
    registry: Path = Path()
    state_dir: Path = Path()
    log_level: str = "info"
    metrics_port: int = 0  # 0: no /metrics endpoint
    metrics_host: str = "127.0.0.1"
    max_clock_ahead_s: int = 300


@dataclass(frozen=True)
class BrokerSection:
    url: str = ""
    ca_file: Path | None = None
    username: str = ""  # defaults to node_id
    password_file: Path | None = None
    client_id: str = ""  # defaults to "agent-<node_id>"
    # The SDBFT link and the block reviewer connect on their own (same password file);
    # a broker with `use_username_as_clientid` needs one user per connection. Default: username.
    consensus_username: str = ""
    review_username: str = ""
    keepalive_s: int = 30
    # Group commit: up to `batch_max` readings share one SQLite transaction and
    # their PUBACKs wait for it; `batch_wait_ms` is how long a batch waits for
    # company. The broker sends at most its max_inflight_messages unacknowledged
    # readings, so set that to at least batch_max for full batches.
    batch_max: int = 64
    batch_wait_ms: int = 2
    publish_gateway_readings: bool = True
    # End-to-end delivery (edge_agent.delivery): a reading above a sequence gap is held
    # until it has waited this long as the lowest one pending (s); keep it above the
    # boards' ack_timeout_s, in real seconds whatever the market clock's speed.
    gap_hold_s: float = 300.0
    # Ingest worker processes (edge_agent.ingest_pool), each owning the meters a stable
    # hash assigns it: its own MQTT session with one filter per meter, verification,
    # commits to the shared database and acknowledgements. 0: ingest in the agent
    # process, subscribed to the whole market (unregistered meters' readings included),
    # as with an empty registry (never more workers than registered meters).
    ingest_workers: int = DEFAULT_INGEST_WORKERS
    # Worker k connects as f"{ingest_username}{k}" (a broker with
    # `use_username_as_clientid` needs one user per connection). Default: username.
    ingest_username: str = ""

    def ingest_user(self, worker: int) -> str:
        """The broker user ingest worker `worker` connects as."""
        return f"{self.ingest_username}{worker}" if self.ingest_username else self.username


@dataclass(frozen=True)
class ModbusBusSection:
    name: str = ""
    kind: str = ""  # "tcp" or "rtu"
    host: str = ""
    port: int = 502
    serial_port: str = ""
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    timeout_s: float = 1.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass(frozen=True)
class ModbusMeterSection:
    id: str = ""
    bus: str = ""
    unit: int = 1
    model: str = "sdm630"
    source: str = "load"
    poll_interval_s: float = 10.0


@dataclass(frozen=True)
class SetpointSection:
    """Where one setpoint of the cleared schedule is written (holding registers)."""

    kind: str = ""  # one of SETPOINT_KINDS
    bus: str = ""
    unit: int = 1
    address: int = 0  # PDU address (0-based) of the first register
    scale: float = 1.0  # register value = round(setpoint_w * scale)
    words: int = 1  # 1: int16 (function 06), 2: int32 big-endian (function 16)
    signed: bool = True


@dataclass(frozen=True)
class ForecastSection:
    kind: str = "persistence"  # "persistence" or "profile"
    profile_file: Path | None = None
    horizon_h: int = 24


@dataclass(frozen=True)
class GasSection:
    """Gas turbine, cost a*P^2 + b*P (meterchain.market.model.GasTurbine units)."""

    a_per_mw2h: int = 0  # money minor units per MW^2 h
    b_per_kwh: int = 0  # money minor units per kWh
    p_max_w: int = 0
    p_min_w: int = 0


@dataclass(frozen=True)
class StorageSection:
    """Battery (meterchain.market.model.Storage units); `soc_wh` is the energy at first start."""

    charge_max_w: int = 0
    discharge_max_w: int = 0
    efficiency_ppm: int = 950_000  # one-way efficiency
    e_min_wh: int = 0
    e_max_wh: int = 0
    soc_wh: int = 0


@dataclass(frozen=True)
class MicrogridSection:
    """The microgrid's M1 parameters in the market model's integer units (W, Wh, minor units)."""

    retail_price_per_kwh: tuple[int, ...] = ()  # lambda_t for each hour of the day (24 values)
    feed_in_tariff_per_kwh: int = 0  # gamma
    green_loss_per_kwh: int = 0  # c_i of the linear green deficit loss (M1a)
    green_share_pct: int = 0  # G = L * pct / 100: the share of the load that must be green
    grid_import_limit_w: int = 0  # 0: no limit
    deposit: int = 0  # SC1 deposit per trade request, minor units
    gas: GasSection | None = None
    storage: StorageSection | None = None


@dataclass(frozen=True)
class MarketSection:
    """Market-wide rules (meterchain.market.model.Market); the same on every node."""

    wheeling_fee_per_kwh: int = 0
    flow_wear_per_mw2h: int = 50_000
    min_deposit: int = 0
    # A consensus node signs a checkpoint of its ledger state after every this many blocks
    # (the aggregator's `checkpoint_interval_blocks`, which proposes them, must match).
    checkpoint_interval_blocks: int = DEFAULT_INTERVAL_BLOCKS


@dataclass(frozen=True)
class ConsensusSection:
    # "node": one of the consensus set; "submitter": bids through the consensus
    # nodes; "standalone": clears its own request alone (no market partners).
    role: str = "standalone"
    membership: Path | None = None
    # Role "node": the submit-only microgrids whose requests this node accepts
    # (TOML `[[participant]]` tables with `id` and `public_key`, see load_participants).
    participants: Path | None = None
    bid_lead_s: float = 300.0  # how long before each hour the bid goes out
    delta_s: float = 5.0  # the synchronous bound of SDBFT
    # The regulator's P-256 point (hex); when set, the membership must carry its signature.
    regulator_public_key: str = ""
    # Role "node": the aggregator whose block proposals this node reviews (re-executes on
    # its own ledger copy, `ledger` under state_dir, then signs or refuses) and to which it
    # sends each committed clearing; "" turns block review off.
    aggregator: str = "aggregator"


@dataclass(frozen=True)
class AgentConfig:
    """A validated configuration with its secrets loaded."""

    path: Path
    agent: AgentSection
    broker: BrokerSection
    buses: tuple[ModbusBusSection, ...] = ()
    modbus_meters: tuple[ModbusMeterSection, ...] = ()
    setpoints: tuple[SetpointSection, ...] = ()
    forecast: ForecastSection = field(default_factory=ForecastSection)
    microgrid: MicrogridSection = field(default_factory=MicrogridSection)
    market: MarketSection = field(default_factory=MarketSection)
    consensus: ConsensusSection = field(default_factory=ConsensusSection)
    clock: MarketClock = REAL_TIME
    node_key: PrivateKey | None = field(default=None, repr=False)
    broker_password: str = field(default="", repr=False)

    @property
    def owner(self) -> str:
        return self.agent.microgrid or self.agent.node_id

    @property
    def database(self) -> Path:
        return self.agent.state_dir / "agent.sqlite"

    @property
    def ledger(self) -> Path:
        """The node's own full copy of the ledger (role "node" with block review)."""
        return self.agent.state_dir / "ledger.db"

    def bus(self, name: str) -> ModbusBusSection:
        return next(b for b in self.buses if b.name == name)


_SECTIONS = (
    "agent", "broker", "modbus", "setpoint", "forecast", "microgrid", "market", "consensus",
    "clock",
)


def load(path: str | Path) -> AgentConfig:
    """Read, check and return the configuration at `path` (raises ConfigError)."""
    path = Path(path)
    check = TableChecker(path)
    doc = config_files.load_toml(path)
    for key in doc:
        if key not in _SECTIONS:
            check.fail(key, f"unknown section (known: {', '.join(_SECTIONS)})")
    for key in ("agent", "broker"):
        if key not in doc:
            check.fail(key, "missing section (required)")

    agent = _check_agent(check, check.table(doc["agent"], AgentSection, "agent"))
    broker = _check_broker(check, check.table(doc["broker"], BrokerSection, "broker"), agent)
    buses, meters = _check_modbus(check, doc.get("modbus", {}))
    setpoints = _check_setpoints(check, doc.get("setpoint", []), buses)
    forecast = _check_forecast(
        check, check.table(doc.get("forecast", {}), ForecastSection, "forecast")
    )
    microgrid = check.table(doc.get("microgrid", {}), MicrogridSection, "microgrid")
    market = check.table(doc.get("market", {}), MarketSection, "market")
    _check_market_model(check, microgrid, market, agent)
    check.positive(market.checkpoint_interval_blocks, "market.checkpoint_interval_blocks")
    consensus = _check_consensus(
        check, check.table(doc.get("consensus", {}), ConsensusSection, "consensus")
    )
    clock = check_clock(check, doc.get("clock", {}))

    # Checked as a secret (regular file, owner-only) before the PEM is parsed.
    config_files.secret_bytes(agent.key_file, path, "agent.key_file")
    try:
        node_key = PrivateKey.load(agent.key_file)
    except MeterChainError as exc:
        check.fail("agent.key_file", str(exc))
    if consensus.role in ("node", "submitter"):
        _check_membership(check, consensus, agent, node_key)
    password = ""
    if broker.password_file is not None:
        password = config_files.read_secret_file(
            broker.password_file, path, "broker.password_file"
        )
    return AgentConfig(
        path=path,
        agent=agent,
        broker=broker,
        buses=buses,
        modbus_meters=meters,
        setpoints=setpoints,
        forecast=forecast,
        microgrid=microgrid,
        market=market,
        consensus=consensus,
        clock=clock,
        node_key=node_key,
        broker_password=password,
    )


def _check_agent(check: TableChecker, agent: AgentSection) -> AgentSection:
    check.require(agent, "agent", "node_id", "market", "key_file", "registry", "state_dir")
    check.name(agent.node_id, "agent.node_id", "node id")
    check.name(agent.market, "agent.market", "market")
    if agent.microgrid:
        check.name(agent.microgrid, "agent.microgrid", "microgrid")
    if agent.log_level not in LOG_LEVELS:
        check.fail(
            "agent.log_level", f"must be one of {', '.join(LOG_LEVELS)}, not {agent.log_level!r}"
        )
    if not 0 <= agent.metrics_port < 65536:
        check.fail("agent.metrics_port", f"must be 0 (off) or a TCP port, got {agent.metrics_port}")
    check.positive(agent.max_clock_ahead_s, "agent.max_clock_ahead_s", allow_zero=True)
    check.readable_file(agent.registry, "agent.registry")
    if agent.state_dir.exists() and not agent.state_dir.is_dir():
        check.fail("agent.state_dir", f"{agent.state_dir} exists and is not a directory")
    return agent


def _check_broker(check: TableChecker, broker: BrokerSection, agent: AgentSection) -> BrokerSection:
    check.require(broker, "broker", "url")
    url = check.broker_url(broker.url, "broker.url")
    if url.scheme == "mqtts":
        config_files.require_ca_file(broker.ca_file, check.path, "broker.ca_file")
    if broker.username and broker.password_file is None:
        check.fail("broker.password_file", "missing (a username needs a password file)")
    check.positive(broker.keepalive_s, "broker.keepalive_s")
    if not 1 <= broker.batch_max <= 1000:
        check.fail("broker.batch_max", f"must be 1 .. 1000, got {broker.batch_max}")
    check.positive(broker.batch_wait_ms, "broker.batch_wait_ms", allow_zero=True)
    check.positive(broker.gap_hold_s, "broker.gap_hold_s")
    if not 0 <= broker.ingest_workers <= MAX_INGEST_WORKERS:
        check.fail(
            "broker.ingest_workers",
            f"must be 0 .. {MAX_INGEST_WORKERS} (0: ingest in the agent process), "
            f"got {broker.ingest_workers}",
        )
    for key in ("username", "consensus_username", "review_username", "ingest_username"):
        if getattr(broker, key):
            check.name(getattr(broker, key), f"broker.{key}", "user")
    username = broker.username or (agent.node_id if broker.password_file else "")
    return dataclasses.replace(
        broker,
        username=username,
        consensus_username=broker.consensus_username or username,
        review_username=broker.review_username or username,
        client_id=broker.client_id or f"agent-{agent.node_id}",
    )


def _check_modbus(
    check: TableChecker, raw: Any
) -> tuple[tuple[ModbusBusSection, ...], tuple[ModbusMeterSection, ...]]:
    if not isinstance(raw, dict):
        check.fail("modbus", f"must be a table, not {toml_kind(raw)}")
    for key in raw:
        if key not in ("bus", "meter"):
            check.fail(f"modbus.{key}", "unknown key (known: bus, meter)")
    buses: list[ModbusBusSection] = []
    for i, entry in enumerate(_array(check, raw.get("bus", []), "modbus.bus")):
        where = f"modbus.bus[{i}]"
        bus = check.table(entry, ModbusBusSection, where)
        check.require(bus, where, "name", "kind")
        check.name(bus.name, f"{where}.name", "bus name")
        if any(b.name == bus.name for b in buses):
            check.fail(f"{where}.name", f"duplicate bus name {bus.name!r}")
        if bus.kind == "tcp":
            check.require(bus, where, "host")
            if not 0 < bus.port < 65536:
                check.fail(f"{where}.port", f"must be a TCP port, got {bus.port}")
        elif bus.kind == "rtu":
            check.require(bus, where, "serial_port")
            if bus.parity not in ("N", "E", "O"):
                check.fail(f"{where}.parity", f"must be N, E or O, not {bus.parity!r}")
            if bus.stopbits not in (1, 2):
                check.fail(f"{where}.stopbits", f"must be 1 or 2, got {bus.stopbits}")
            check.positive(bus.baudrate, f"{where}.baudrate")
        else:
            check.fail(f"{where}.kind", f'must be "tcp" or "rtu", not {bus.kind!r}')
        check.positive(bus.timeout_s, f"{where}.timeout_s")
        check.positive(bus.backoff_initial_s, f"{where}.backoff_initial_s")
        if bus.backoff_max_s < bus.backoff_initial_s:
            check.fail(f"{where}.backoff_max_s", "must be >= backoff_initial_s")
        buses.append(bus)
    meters: list[ModbusMeterSection] = []
    for i, entry in enumerate(_array(check, raw.get("meter", []), "modbus.meter")):
        where = f"modbus.meter[{i}]"
        meter = check.table(entry, ModbusMeterSection, where)
        check.require(meter, where, "id", "bus")
        check.name(meter.id, f"{where}.id", "meter id")
        if any(m.id == meter.id for m in meters):
            check.fail(f"{where}.id", f"duplicate meter id {meter.id!r}")
        if not any(b.name == meter.bus for b in buses):
            check.fail(f"{where}.bus", f"no [[modbus.bus]] named {meter.bus!r}")
        if not 1 <= meter.unit <= 247:
            check.fail(f"{where}.unit", f"must be a Modbus unit id 1 .. 247, got {meter.unit}")
        if meter.model != "sdm630":
            check.fail(
                f"{where}.model", f"unsupported meter model {meter.model!r} (supported: sdm630)"
            )
        if meter.source not in SOURCES:
            check.fail(
                f"{where}.source",
                f"unknown source {meter.source!r} (known: {', '.join(sorted(SOURCES))})",
            )
        check.positive(meter.poll_interval_s, f"{where}.poll_interval_s")
        meters.append(meter)
    return tuple(buses), tuple(meters)


def _check_setpoints(
    check: TableChecker, raw: Any, buses: tuple[ModbusBusSection, ...]
) -> tuple[SetpointSection, ...]:
    setpoints: list[SetpointSection] = []
    for i, entry in enumerate(_array(check, raw, "setpoint")):
        where = f"setpoint[{i}]"
        sp = check.table(entry, SetpointSection, where)
        check.require(sp, where, "kind", "bus")
        if sp.kind not in SETPOINT_KINDS:
            check.fail(
                f"{where}.kind", f"must be one of {', '.join(SETPOINT_KINDS)}, not {sp.kind!r}"
            )
        if any(s.kind == sp.kind for s in setpoints):
            check.fail(f"{where}.kind", f"duplicate setpoint {sp.kind!r}")
        if not any(b.name == sp.bus for b in buses):
            check.fail(f"{where}.bus", f"no [[modbus.bus]] named {sp.bus!r}")
        if not 0 <= sp.address <= 0xFFFF - sp.words + 1:
            check.fail(
                f"{where}.address", f"must be a register address 0 .. 65535, got {sp.address}"
            )
        if sp.words not in (1, 2):
            check.fail(f"{where}.words", f"must be 1 (16-bit) or 2 (32-bit), got {sp.words}")
        if sp.scale == 0:
            check.fail(f"{where}.scale", "must not be 0")
        if not 0 <= sp.unit <= 247:
            check.fail(f"{where}.unit", f"must be a Modbus unit id 0 .. 247, got {sp.unit}")
        setpoints.append(sp)
    return tuple(setpoints)


def _check_forecast(check: TableChecker, forecast: ForecastSection) -> ForecastSection:
    if forecast.kind not in ("persistence", "profile"):
        check.fail("forecast.kind", f'must be "persistence" or "profile", not {forecast.kind!r}')
    if forecast.kind == "profile":
        if forecast.profile_file is None:
            check.fail("forecast.profile_file", 'missing (required for kind = "profile")')
        check.readable_file(forecast.profile_file, "forecast.profile_file")
    if not 1 <= forecast.horizon_h <= 24:
        check.fail("forecast.horizon_h", f"must be 1 .. 24, got {forecast.horizon_h}")
    return forecast


def _check_market_model(
    check: TableChecker, mg: MicrogridSection, market: MarketSection, agent: AgentSection
) -> None:
    """Refuse parameters the market model would refuse, naming the config key."""
    from edge_agent.bid import build_assets, build_market, build_microgrid
    from edge_agent.forecast import Forecast
    from meterchain.market.errors import InvalidModel

    if mg.retail_price_per_kwh and len(mg.retail_price_per_kwh) != 24:
        check.fail("microgrid.retail_price_per_kwh",
                   f"must have 24 hourly values, got {len(mg.retail_price_per_kwh)}")
    if not 0 <= mg.green_share_pct <= 100:
        check.fail("microgrid.green_share_pct", f"must be 0 .. 100, got {mg.green_share_pct}")
    try:
        build_market(market)
    except InvalidModel as exc:
        check.fail(f"market.{exc.field}", exc.problem)
    try:
        build_assets(mg)
    except InvalidModel as exc:
        check.fail(f"microgrid.{exc.field}", exc.problem)
    if not mg.retail_price_per_kwh:
        return  # no bidding configured: the agent meters only
    try:
            # A flat day with zero forecasts exercises every parameter and every price.
        build_microgrid(agent.microgrid or agent.node_id, mg, Forecast(0, (0,) * 24, (0,) * 24))
    except InvalidModel as exc:
        check.fail(f"microgrid.{exc.field}", exc.problem)


def _check_consensus(check: TableChecker, cons: ConsensusSection) -> ConsensusSection:
    if cons.role not in ROLES:
        check.fail("consensus.role", f"must be one of {', '.join(ROLES)}, not {cons.role!r}")
    if cons.membership is not None:
        check.readable_file(cons.membership, "consensus.membership")
    elif cons.role in ("node", "submitter"):
        check.fail("consensus.membership", f'missing (required for role = "{cons.role}")')
    if cons.participants is not None:
        if cons.role != "node":
            check.fail("consensus.participants", 'only a role = "node" agent accepts participants')
        load_participants(cons.participants, check.path)
    if not 0 < cons.bid_lead_s <= 3600:
        check.fail("consensus.bid_lead_s", f"must be in (0, 3600], got {cons.bid_lead_s}")
    check.positive(cons.delta_s, "consensus.delta_s")
    if cons.regulator_public_key:
        _regulator(check, cons.regulator_public_key)
    if cons.aggregator:
        check.name(cons.aggregator, "consensus.aggregator", "node id")
    return cons


def _regulator(check: TableChecker, text: str) -> PublicKey:
    try:
        return PublicKey.from_hex(text)
    except MeterChainError as exc:
        check.fail("consensus.regulator_public_key", str(exc))


def _check_membership(
    check: TableChecker, cons: ConsensusSection, agent: AgentSection, node_key: PrivateKey
) -> None:
    """The membership: our market, signed if pinned; a node is listed with our key, a
    submitter is not listed at all (it only submits), and no participant is a member."""
    assert cons.membership is not None  # _check_consensus requires it for these roles
    where = "consensus.membership"
    membership = Membership.load(cons.membership)  # raises ConfigError naming that file
    if membership.market != agent.market:
        check.fail(
            where, f"{cons.membership} is for market {membership.market!r}, not {agent.market!r}"
        )
    own = membership.key_of(agent.node_id)
    if cons.role == "submitter":
        if own is not None:
            check.fail(
                "consensus.role",
                f'{cons.membership} lists {agent.node_id!r} as a member: use role = "node"',
            )
    elif own is None:
        check.fail(where, f"{cons.membership} does not list node {agent.node_id!r}")
    elif own.point != node_key.public_key().point:
        check.fail(
            "agent.key_file",
            f"{agent.key_file} is not the key {cons.membership} lists for {agent.node_id!r}",
        )
    if cons.participants is not None:
        for node_id in load_participants(cons.participants, check.path):
            if membership.key_of(node_id) is not None:
                check.fail(
                    "consensus.participants",
                    f"{cons.participants}: {node_id!r} is a member of {cons.membership}, "
                    "not a submit-only participant",
                )
    if cons.regulator_public_key:
        try:
            membership.verify(_regulator(check, cons.regulator_public_key))
        except QuorumError as exc:
            check.fail(where, f"{cons.membership}: {exc}")


def load_participants(path: Path, config: Path | None = None) -> dict[str, PublicKey]:
    """The submit-only participants file: `[[participant]]` tables of `id` and `public_key`.

    Raises ConfigError naming the participants file and the bad key; `config`
    (the agent file that points to it) is checked for readability first.
    """
    if config is not None:
        config_files.readable_file(path, config, "consensus.participants")
    check = TableChecker(path)
    doc = config_files.load_toml(path)
    for key in doc:
        if key != "participant":
            check.fail(key, "unknown key (known: participant)")
    out: dict[str, PublicKey] = {}
    for i, raw in enumerate(_array(check, doc.get("participant", []), "participant")):
        where = f"participant[{i}]"
        if not isinstance(raw, dict):
            check.fail(where, f"must be a table, not {toml_kind(raw)}")
        for key in raw:
            if key not in ("id", "public_key"):
                check.fail(f"{where}.{key}", "unknown key (known: id, public_key)")
        node_id, point = raw.get("id"), raw.get("public_key")
        if not isinstance(node_id, str):
            check.fail(f"{where}.id", "missing or not a string (required)")
        check.name(node_id, f"{where}.id", "node id")
        if not isinstance(point, str):
            check.fail(f"{where}.public_key", "missing or not a string (required)")
        try:
            key = PublicKey.from_hex(point)
        except MeterChainError as exc:
            check.fail(f"{where}.public_key", str(exc))
        if node_id in out:
            check.fail(f"{where}.id", f"{node_id!r} is listed twice")
        out[node_id] = key
    return out


def _array(check: TableChecker, raw: Any, where: str) -> list[Any]:
    if not isinstance(raw, list):
        check.fail(where, f"must be an array of tables ([[{where}]]), not {toml_kind(raw)}")
    return raw
