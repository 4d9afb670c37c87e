"""`meterchain site init`: every file a site needs, with the modes, signatures and ACLs it needs.

These run no services (fast); the site's processes are exercised by the demo
tests, the README quick-start test and the HIL rig's kill -9 scenarios.
"""

from __future__ import annotations

import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from aggregator import config as aggregator_config
from edge_agent import config as agent_config
from meterchain import codec
from meterchain.keys import PrivateKey
from meterchain.ledger.transactions import Tx
from meterchain.quorum import Membership
from meterchain.registry import Registry
from meterchain.site import layout
from meterchain.site.clock import MarketClock, start_clock
from meterchain.site.init import InitOptions, init_site
from meterchain.site.layout import SiteError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))

from test_agent_systemd_unit import systemd_verify_problems  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> layout.Site:
    return init_site(tmp_path_factory.mktemp("s") / "lab", InitOptions(emulated=True, speed=1440))


def test_secrets_are_owner_only_and_apart_from_the_configs(site: layout.Site) -> None:
    secrets = site.root / "secrets"
    assert mode(secrets) == 0o700
    names = {p.name for p in secrets.iterdir()}
    assert {"regulator.key", "aggregator.pass", "regulator.pass"} <= names
    assert {f"{mg}.key" for mg in site.microgrids} <= names
    for path in [*secrets.iterdir(), site.root / "ca" / "ca.key", site.root / "broker" / "passwd",
                 site.root / "broker" / "acl", site.root / "broker" / "server.key"]:  # fmt: skip
        assert mode(path) == 0o600, path
    for board in (site.root / "lab" / "boards").iterdir():
        assert mode(board / "secrets.json") == 0o600
    for config in site.service_configs():
        assert "PRIVATE KEY" not in config.read_text()


def test_every_service_config_passes_its_own_checks(site: layout.Site) -> None:
    regulator = PrivateKey.load(site.secret("regulator.key")).public_key()
    agg = aggregator_config.load(site.aggregator_config)
    assert agg.membership.node_ids == site.site.members
    assert agg.regulator.point == regulator.point
    kinds = [Tx.decode(raw).kind for raw in agg.genesis_txs]
    assert kinds.count("participant") == len(site.microgrids)
    assert kinds.count("meter") == 3 * len(site.microgrids)
    for mg in site.microgrids:
        cfg = agent_config.load(site.agent_config(mg))
        assert cfg.consensus.role == ("node" if mg in site.site.members else "submitter")
        assert cfg.clock.speed == 1440 and not cfg.clock.real_time
        # one broker user per connection (use_username_as_clientid)
        assert {cfg.broker.username, cfg.broker.consensus_username,
                cfg.broker.review_username} == {mg, f"{mg}.sdbft", f"{mg}.review"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "agent", "check-config", "--config",
         str(site.agent_config(site.microgrids[0]))],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_membership_genesis_and_registry_are_the_regulators(site: layout.Site) -> None:
    regulator = PrivateKey.load(site.secret("regulator.key")).public_key()
    membership = Membership.load(site.root / "membership.toml")
    membership.verify(regulator)  # raises unless the regulator signed it
    assert membership.node_ids == site.site.members
    registry = Registry.load(site.root / "registry.toml")
    assert len(registry) == 3 * len(site.microgrids)
    txs = [Tx.decode(raw) for raw in codec.decode((site.root / "genesis.cbor").read_bytes())]
    assert {"meter", "participant"} <= {t.kind for t in txs}
    meters = {t.body["id"]: t.body for t in txs if t.kind == "meter"}
    assert set(meters) == {m.id for m in registry}
    for m in registry:
        assert meters[m.id]["key"] == m.public_key.point and meters[m.id]["owner"] == m.owner
    for tx in txs:
        assert regulator.verify(tx.body["regulator_sig"], tx.statement(site.market))


def test_the_broker_acl_lets_each_client_write_only_its_own_topics(site: layout.Site) -> None:
    conf = (site.root / "broker" / "mosquitto.conf").read_text()
    assert "use_username_as_clientid true" in conf and "allow_anonymous false" in conf
    blocks = {}
    for block in (site.root / "broker" / "acl").read_text().split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
        if lines:
            blocks[lines[0].removeprefix("user ")] = set(lines[1:])
    market = site.market
    assert blocks["mg1-pv"] == {f"topic write mc/{market}/r/mg1-pv",
                                f"topic read mc/{market}/ack/mg1-pv",
                                f"topic write mc/{market}/status/mg1-pv"}  # fmt: skip
    for user in ("mg1-campus", "mg1-campus.sdbft", "mg1-campus.review"):
        writes = {ln for ln in blocks[user] if ln.startswith("topic write")}
        assert writes == {f"topic write mc/{market}/c/mg1-campus/#",
                          f"topic write mc/{market}/ack/#"}  # fmt: skip
    # the aggregator publishes its proposals: it must be able to write under its own id,
    # and nowhere else (an acknowledgement it could forge would free a board's spool)
    for operator in ("aggregator", "regulator"):
        writes = {ln for ln in blocks[operator] if ln.startswith("topic write")}
        assert writes == {f"topic write mc/{market}/c/{operator}/#"}
    users = {line.split(":")[0] for line in (site.root / "broker" / "passwd").read_text().split()}
    assert users == set(blocks)


def test_the_generated_units_pass_systemd_analyze(site: layout.Site, tmp_path: Path) -> None:
    units = sorted((site.root / "systemd").iterdir())
    assert len(units) == len(site.microgrids) + 1
    for unit in units:
        text = unit.read_text()
        assert "ExecStart=/opt/meterchain/bin/meterchain " in text
        # Agents reload their registry on SIGHUP; the aggregator has no reload.
        assert ("ExecReload=/bin/kill -HUP $MAINPID" in text) == ("agent" in unit.name), unit
        assert f"ReadWritePaths={site.root / 'state'}" in text
        assert not systemd_verify_problems(unit, tmp_path)


def test_the_market_clock_stands_still_until_the_site_starts_it(tmp_path: Path) -> None:
    anchor = tmp_path / "run" / "clock-anchor"
    clock = MarketClock(1_000_000, 3600.0, anchor_file=anchor)
    assert clock.now() == 1_000_000 and clock.wall_until(1_003_600) > 0
    started = start_clock(anchor, 1_700_000_000.0)
    assert start_clock(anchor, 1_800_000_000.0) == started  # a started clock keeps its start
    later = MarketClock(1_000_000, 3600.0, anchor_file=anchor)
    assert later.now() > 1_000_000 + 3600 * 1e6  # ran for years of market time since 2023
    assert later.wall_until(later.now() + 7200) == pytest.approx(2.0, abs=0.05)


def test_init_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SiteError, match="not empty"):
        init_site(tmp_path / "full", InitOptions())
    with pytest.raises(SiteError, match="--members"):
        init_site(tmp_path / "a", InitOptions(microgrids=4, members=5))
    with pytest.raises(SiteError, match="--broker"):
        init_site(tmp_path / "b", InitOptions(broker="http://x"))
    with pytest.raises(SiteError, match="--ca"):
        init_site(tmp_path / "c", InitOptions(broker="mqtts://broker.example:8883"))
    proc = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "site", "up", str(tmp_path / "nothing")],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "not a site folder" in proc.stderr


def test_site_toml_is_what_up_reads(site: layout.Site) -> None:
    doc = tomllib.loads((site.root / "site.toml").read_text())
    assert doc["site"]["members"] == list(site.site.members)
    assert doc["clock"]["anchor_file"] == "run/clock-anchor"
    assert layout.load(site.root).timing.delta_s == site.timing.delta_s


def test_regulator_commands_sign_ledger_transactions(site: layout.Site) -> None:
    """Each regulator command is one transaction the regulator's key signs (schema-checked)."""
    from meterchain.site import regulator

    key = regulator.regulator_key(site, None)
    point = PrivateKey.generate().public_key().point.hex()
    txs = [
        regulator.admit(site, key, "mg9", "microgrid", point),
        regulator.exit_participant(site, key, "mg9", "expelled", "unpaid settlements"),
        regulator.register_meter(site, key, "mg9-load", "mg9", "load", point),
        regulator.veto(site, key, "ab" * 32, "dispatch found a line limit"),
    ]
    assert [t.kind for t in txs] == ["participant", "participant_exit", "meter", "veto"]
    for tx in txs:
        assert Tx.decode(tx.raw) == tx  # canonical and schema-valid
        assert key.public_key().verify(tx.body["regulator_sig"], tx.statement(site.market))
        assert tx.body["time"] == site.clock.start  # the clock stands still until `site up`
    with pytest.raises(SiteError, match="not a hex transaction hash"):
        regulator.veto(site, key, "not-hex", "why")
    proc = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "site", "admit", str(site.root), "mg9",
         "--key", "04zz"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1 and "not hex" in proc.stderr
