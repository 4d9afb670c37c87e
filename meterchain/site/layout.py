"""Where everything of a site lives in its folder, and the site description `site.toml`.

`meterchain site init DIR` writes the folder; `site up|down|status` and the
regulator commands read `DIR/site.toml` to find the rest. Secrets (private
keys, broker passwords) live under `secrets/` (folder 0700, files 0600),
apart from the configurations that point at them:

    site.toml                 what init was asked (market, members, clock, broker)
    ca/ca.crt ca/ca.key       the site's CA (the key is a secret: 0600)
    broker/                   mosquitto.conf, passwd, acl (0600, owned by the user the
                              broker runs as), server.crt/.key, persistence/
    membership.toml           consensus members, signed by the regulator
    participants.toml         submit-only microgrids the members accept bids from
    registry.toml             every meter: id, owner, source, public key
    genesis.cbor              regulator-signed admissions and meter registrations of block 0
    secrets/                  regulator.key, <node>.key, <user>.pass
    agents/<id>/agent.toml    one edge agent per microgrid (+ profile.toml, its typical day)
    aggregator/aggregator.toml
    systemd/                  units for this site's paths
    lab/                      --emulated: lab.toml and boards/<meter>/ (each board's flash)
    state/                    what the services write (ledgers, agent databases)
    run/                      site up: pids, logs, the supervisor's status, clock-anchor
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from meterchain import config_files
from meterchain.config_files import TableChecker
from meterchain.errors import MeterChainError
from meterchain.site.clock import MarketClock, check_clock

SITE_FILE = "site.toml"
AGGREGATOR_ID = "aggregator"
REGULATOR_ID = "regulator"


class SiteError(MeterChainError):
    """A site folder is missing, incomplete or cannot be started; the message says what."""


@dataclass(frozen=True)
class Timing:
    """The market's timers: market seconds for the market, real seconds for the network."""

    bid_lead_s: float = 300.0  # market s before each hour that bids go out
    delta_s: float = 5.0  # real s: the SDBFT synchronous bound
    block_interval_s: float = 60.0  # market s between block rounds
    vote_timeout_s: float = 10.0  # real s the members have to answer a proposal
    settle_grace_s: int = 300  # market s after an hour before it is settled
    sample_interval_s: int = 900  # market s between two readings of a meter (lab boards)


@dataclass(frozen=True)
class SiteSection:
    market: str = ""
    members: tuple[str, ...] = ()
    submitters: tuple[str, ...] = ()
    emulated: bool = False
    broker_url: str = ""  # what the services connect to
    broker_username: str = ""  # an external broker's single user ("": per-client users)
    run_broker: bool = True  # site up starts Mosquitto from broker/mosquitto.conf


@dataclass(frozen=True)
class Site:
    root: Path
    site: SiteSection
    timing: Timing
    clock: MarketClock = field(default_factory=MarketClock)

    @property
    def market(self) -> str:
        return self.site.market

    @property
    def microgrids(self) -> tuple[str, ...]:
        return self.site.members + self.site.submitters

    # --- paths ----------------------------------------------------------------------
    def secret(self, name: str) -> Path:
        return self.root / "secrets" / name

    def agent_config(self, node_id: str) -> Path:
        return self.root / "agents" / node_id / "agent.toml"

    @property
    def aggregator_config(self) -> Path:
        return self.root / "aggregator" / "aggregator.toml"

    @property
    def ledger(self) -> Path:
        return self.root / "state" / "aggregator" / "ledger.db"

    @property
    def broker_config(self) -> Path:
        return self.root / "broker" / "mosquitto.conf"

    @property
    def lab_config(self) -> Path:
        return self.root / "lab" / "lab.toml"

    @property
    def lab_status(self) -> Path:
        return self.root / "lab" / "status.json"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def clock_anchor(self) -> Path:
        """Written by `site up` when the market day starts (meterchain.site.clock)."""
        return self.run_dir / "clock-anchor"

    def service_configs(self) -> list[Path]:
        """Every config file that carries the market clock."""
        configs = [self.aggregator_config, *(self.agent_config(m) for m in self.microgrids)]
        return configs + ([self.lab_config] if self.site.emulated else [])


def load(root: Path) -> Site:
    """The site in folder `root` (SiteError when there is none, ConfigError when it is bad)."""
    root = Path(root).resolve()
    path = root / SITE_FILE
    if not path.is_file():
        raise SiteError(f"{root} is not a site folder (no {SITE_FILE}; run `meterchain site init`)")
    check = TableChecker(path)
    doc = config_files.load_toml(path)
    for key in doc:
        if key not in ("site", "timing", "clock"):
            check.fail(key, "unknown section (known: site, timing, clock)")
    site: SiteSection = check.table(doc.get("site", {}), SiteSection, "site")
    check.require(site, "site", "market", "members", "broker_url")
    timing: Timing = check.table(doc.get("timing", {}), Timing, "timing")
    clock = check_clock(check, doc.get("clock", {}))
    return Site(root, site, timing, clock)
