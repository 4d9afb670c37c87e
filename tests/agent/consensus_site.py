"""Agent sites for in-process consensus tests: one config folder per microgrid, one round driver."""

from __future__ import annotations

from pathlib import Path

from edge_agent import config as agent_config
from edge_agent.forecast import HourlyProfile, ProfileForecaster
from edge_agent.rounds import Clearing, RoundDriver
from edge_agent.setpoints import SetpointWriter
from edge_agent.store import AgentStore, StoreView
from meterchain.keys import PrivateKey
from meterchain.market.units import MONEY_SCALE

PRICES = [int(MONEY_SCALE * 0.30)] * 24


def write_site(
    root: Path,
    node_id: str,
    key: PrivateKey,
    broker_url: str,
    ca_file: str,
    consensus: str,
    delta_s: float,
) -> Path:
    """A site folder (key, broker password, empty registry, agent.toml); returns the config path.

    `consensus` is the role-specific body of the [consensus] table.
    """
    root.mkdir(parents=True)
    key.save(root / "node.key")
    (root / "broker.pass").write_text(f"pw-{node_id}\n")
    (root / "broker.pass").chmod(0o600)
    (root / "registry.toml").write_text("")
    (root / "agent.toml").write_text(f"""
[agent]
node_id = "{node_id}"
market = "m1"
key_file = "node.key"
registry = "registry.toml"
state_dir = "state"

[broker]
url = "{broker_url}"
ca_file = "{ca_file}"
password_file = "broker.pass"

[consensus]
{consensus}
delta_s = {delta_s}
bid_lead_s = 60

[market]
wheeling_fee_per_kwh = {int(MONEY_SCALE * 0.01)}

[microgrid]
retail_price_per_kwh = {PRICES}
feed_in_tariff_per_kwh = {int(MONEY_SCALE * 0.04)}
green_loss_per_kwh = {int(MONEY_SCALE * 0.20)}
green_share_pct = 80
""")
    return root / "agent.toml"


def round_driver(
    cfg: agent_config.AgentConfig, clearing: Clearing, profile: HourlyProfile, hour: int
) -> RoundDriver:
    """The agent's round driver for `hour`, forecasting from `profile`, a minute before it."""
    AgentStore(cfg.database).close()  # the schedule table lives in the agent database
    return RoundDriver(
        microgrid_id=cfg.agent.node_id,
        section=cfg.microgrid,
        forecaster=ProfileForecaster(profile),
        history=lambda t: {},
        clearing=clearing,
        writer=SetpointWriter((), {}),
        store=StoreView(cfg.database),
        clock=lambda: hour - 60,
    )
