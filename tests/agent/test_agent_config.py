"""Each kind of bad configuration makes `meterchain agent run` exit 2 with a precise message."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_site import agent_command

from edge_agent import config as agent_config
from hil.broker import make_test_pki
from meterchain.keys import PrivateKey
from meterchain.quorum import Member, Membership
from meterchain.registry import entry_text, make_meter

GOOD = """\
[agent]
node_id = "mg1"
market = "m1"
key_file = "node.key"
registry = "registry.toml"
state_dir = "state"

[broker]
url = "mqtts://127.0.0.1:8883"
ca_file = "ca.crt"
password_file = "broker.pass"

[[modbus.bus]]
name = "rs485"
kind = "rtu"
serial_port = "/dev/ttyUSB0"

[[modbus.meter]]
id = "mg1-sdm"
bus = "rs485"
unit = 2

[[setpoint]]
kind = "storage_power_w"
bus = "rs485"
unit = 5
address = 100
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    PrivateKey.generate().save(tmp_path / "node.key")
    (tmp_path / "broker.pass").write_text("secret\n")
    (tmp_path / "broker.pass").chmod(0o600)
    make_test_pki(tmp_path / "pki")
    (tmp_path / "ca.crt").write_bytes((tmp_path / "pki" / "ca.crt").read_bytes())
    meter = make_meter("mg1-pv", PrivateKey.generate().public_key(), "mg1", "pv")
    (tmp_path / "registry.toml").write_text(entry_text(meter))
    (tmp_path / "agent.toml").write_text(GOOD)
    return tmp_path


def _replace(old: str, new: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / "agent.toml"
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))

    return edit


def _append(extra: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        with (root / "agent.toml").open("a") as out:
            out.write(extra)

    return edit


def _chmod(name: str, mode: int) -> Callable[[Path], None]:
    return lambda root: (root / name).chmod(mode)


def _append_to_broker(line: str) -> Callable[[Path], None]:
    return _replace('password_file = "broker.pass"', f'password_file = "broker.pass"\n{line}')


def _write(name: str, text: str, mode: int = 0o600) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / name).write_text(text)
        (root / name).chmod(mode)

    return edit


# (case id, edit of the good site, expected "KEY: PROBLEM" after "FILE: ")
CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("not-toml", _write("agent.toml", "[agent\nnode_id = 1\n"), "not valid TOML"),
    ("unknown-section", _append("[gateway]\nx = 1\n"), "gateway: unknown section"),
    (
        "unknown-key",
        _replace('node_id = "mg1"', 'node_id = "mg1"\nnodeid = "x"'),
        "agent.nodeid: unknown key (known: node_id, market,",
    ),
    ("missing-section", _replace("[broker]", "[forecast]"), "broker: missing section"),
    ("missing-key", _replace('market = "m1"\n', ""), "agent.market: missing (required)"),
    (
        "wrong-type",
        _replace('state_dir = "state"', 'state_dir = "state"\nmetrics_port = "80"'),
        "agent.metrics_port: must be an integer, not a string",
    ),
    (
        "out-of-range",
        _replace('state_dir = "state"', 'state_dir = "state"\nmetrics_port = 70000'),
        "agent.metrics_port: must be 0 (off) or a TCP port, got 70000",
    ),
    (
        "too-many-ingest-workers",
        _append_to_broker("ingest_workers = 65"),
        "broker.ingest_workers: must be 0 .. 64 (0: ingest in the agent process), got 65",
    ),
    (
        "bad-ingest-user",
        _append_to_broker('ingest_username = "a b"'),
        "broker.ingest_username: user 'a b' must be",
    ),
    (
        "bad-name",
        _replace('node_id = "mg1"', 'node_id = "mg 1"'),
        "agent.node_id: node id 'mg 1' must be 1-64 characters",
    ),
    (
        "bad-choice",
        _replace('state_dir = "state"', 'state_dir = "state"\nlog_level = "loud"'),
        "agent.log_level: must be one of debug, info, warning, error, not 'loud'",
    ),
    (
        "key-file-missing",
        _replace('key_file = "node.key"', 'key_file = "gone.key"'),
        "agent.key_file: cannot read {root}/gone.key: No such file or directory",
    ),
    (
        "key-file-too-open",
        _chmod("node.key", 0o644),
        "agent.key_file: {root}/node.key is accessible by group/others (mode 644); chmod 600 it",
    ),
    (
        "key-file-not-a-key",
        _write("node.key", "hello\n"),
        "agent.key_file: {root}/node.key: not an unencrypted PEM private key",
    ),
    (
        "password-file-empty",
        _write("broker.pass", "\n"),
        "broker.password_file: {root}/broker.pass is empty",
    ),
    (
        "ca-file-missing",
        _replace('ca_file = "ca.crt"', 'ca_file = "none.crt"'),
        "broker.ca_file: cannot read {root}/none.crt: No such file or directory",
    ),
    (
        "bad-url",
        _replace("mqtts://127.0.0.1:8883", "http://broker"),
        "broker.url: must look like mqtts://HOST:PORT or mqtt://HOST:PORT, not 'http://broker'",
    ),
    (
        "bad-reference",
        _replace('bus = "rs485"\nunit = 2', 'bus = "rs-485"\nunit = 2'),
        "modbus.meter[0].bus: no [[modbus.bus]] named 'rs-485'",
    ),
    (
        "duplicate-meter",
        _append('[[modbus.meter]]\nid = "mg1-sdm"\nbus = "rs485"\n'),
        "modbus.meter[1].id: duplicate meter id 'mg1-sdm'",
    ),
    (
        "bad-unit",
        _replace("unit = 2", "unit = 300"),
        "modbus.meter[0].unit: must be a Modbus unit id 1 .. 247, got 300",
    ),
    (
        "bad-setpoint",
        _replace('kind = "storage_power_w"', 'kind = "boiler_w"'),
        "setpoint[0].kind: must be one of storage_charge_w, storage_discharge_w",
    ),
    (
        "profile-without-file",
        _append('[forecast]\nkind = "profile"\n'),
        'forecast.profile_file: missing (required for kind = "profile")',
    ),
    (
        "node-without-membership",
        _append('[consensus]\nrole = "node"\n'),
        'consensus.membership: missing (required for role = "node")',
    ),
    (
        "bad-microgrid",
        _append("[microgrid.storage]\nefficiency_ppm = 1500000\n"),
        "microgrid.storage.efficiency_ppm: (1500000) > 1000000",
    ),
    (
        "bad-prices",
        _append("[microgrid]\nretail_price_per_kwh = [5, 6]\n"),
        "microgrid.retail_price_per_kwh: must have 24 hourly values, got 2",
    ),
    (
        "price-below-feed-in",
        _append(
            "[microgrid]\nfeed_in_tariff_per_kwh = 900\nretail_price_per_kwh = "
            + str([2000] * 23 + [800])
            + "\n"
        ),
        "microgrid.retail_price_per_kwh[23]: (800) <= feed_in_tariff_per_kwh (900)",
    ),
    (
        "ca-file-not-pem",
        _write("ca.crt", "-----BEGIN CERTIFICATE-----\n", 0o644),
        "broker.ca_file: {root}/ca.crt is not a PEM CA certificate",
    ),
    (
        "submitter-without-membership",
        _append(
            '[consensus]\nrole = "submitter"\n[microgrid]\nretail_price_per_kwh = '
            + str([2000] * 24)
            + "\n"
        ),
        'consensus.membership: missing (required for role = "submitter")',
    ),
    (
        "bad-role",
        _append('[consensus]\nrole = "leader"\n'),
        "consensus.role: must be one of node, submitter, standalone, not 'leader'",
    ),
    (
        "bid-lead-over-an-hour",
        _append("[consensus]\nbid_lead_s = 3600.5\n"),
        "consensus.bid_lead_s: must be in (0, 3600], got 3600.5",
    ),
    (
        "no-checkpoint-interval",
        _append("[market]\ncheckpoint_interval_blocks = 0\n"),
        "market.checkpoint_interval_blocks: must be > 0, got 0",
    ),
]


@pytest.mark.parametrize(("edit", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_exits_2_naming_file_key_and_problem(
    site: Path, edit: Callable[[Path], None], expected: str
) -> None:
    edit(site)
    config = site / "agent.toml"
    proc = subprocess.run(
        agent_command("run", "--config", str(config)), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"config error: {config}: " + expected.format(root=site)), (
        proc.stderr
    )
    assert not (site / "state").exists(), "a refused config must not create state"


def test_missing_config_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        agent_command("run", "--config", str(tmp_path / "nope.toml")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == f"config error: {tmp_path}/nope.toml: file does not exist\n"


def test_bad_registry_is_a_config_error_naming_the_registry(site: Path) -> None:
    (site / "registry.toml").write_text(
        '[[meter]]\nid = "mg1-pv"\npublic_key = "zz"\nowner = "mg1"\nsource = "pv"\n'
    )
    proc = subprocess.run(
        agent_command("run", "--config", str(site / "agent.toml")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        f"config error: {site}/registry.toml: meter[0].public_key: meter 'mg1-pv': not hex"
    ), proc.stderr


def test_good_config_loads_with_defaults_and_resolved_paths(site: Path) -> None:
    cfg = agent_config.load(site / "agent.toml")
    assert cfg.agent.key_file == site / "node.key"
    assert cfg.database == site / "state" / "agent.sqlite"
    assert cfg.broker.username == "mg1" and cfg.broker.client_id == "agent-mg1"
    assert cfg.broker_password == "secret"
    assert cfg.buses[0].baudrate == 9600 and cfg.buses[0].parity == "N"
    assert cfg.modbus_meters[0].poll_interval_s == 10.0
    assert cfg.setpoints[0].words == 1 and cfg.setpoints[0].scale == 1.0
    assert cfg.owner == "mg1"
    # The example's range is inclusive: a bid a whole hour ahead is allowed.
    with (site / "agent.toml").open("a") as f:
        f.write("[consensus]\nbid_lead_s = 3600\n")
    assert agent_config.load(site / "agent.toml").consensus.bid_lead_s == 3600
    proc = subprocess.run(
        agent_command("check-config", "--config", str(site / "agent.toml")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK (1 Modbus meter(s), 1 registered meter(s))" in proc.stdout


def _check_config(
    config: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent_command("check-config", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_an_unset_variable_in_a_path_is_refused_naming_key_and_variable(site: Path) -> None:
    _replace('state_dir = "state"', 'state_dir = "$STATE_DIRECTORY"')(site)
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    config = site / "agent.toml"
    proc = _check_config(config, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"config error: {config}: agent.state_dir: '$STATE_DIRECTORY' uses environment "
        "variable $STATE_DIRECTORY, which is not set\n"
    )
    assert not (site / "$STATE_DIRECTORY").exists()
    proc = _check_config(config, dict(env, STATE_DIRECTORY=str(site / "var")))
    assert proc.returncode == 0, proc.stderr


def _node_site(
    site: Path,
    *,
    market: str = "m1",
    node_id: str = "mg1",
    node_key: PrivateKey | None = None,
    signer: PrivateKey | None = None,
    pinned: PrivateKey | None = None,
) -> Path:
    """`site` as a consensus node: a membership of three, signed by `signer`, pinning `pinned`."""
    key = node_key or PrivateKey.load(site / "node.key")
    members = [Member(node_id, key.public_key())]
    members += [Member(f"peer{i}", PrivateKey.generate().public_key()) for i in (2, 3)]
    regulator = signer or PrivateKey.generate()
    membership = Membership(market, 1, tuple(members)).signed_by(regulator)
    (site / "membership.toml").write_text(membership.to_toml())
    pin = pinned or regulator
    _append(
        '[consensus]\nrole = "node"\nmembership = "membership.toml"\n'
        f'regulator_public_key = "{pin.public_key().point.hex()}"\n'
    )(site)
    return site / "agent.toml"


def test_a_node_with_a_good_regulator_signed_membership_passes(site: Path) -> None:
    config = _node_site(site)
    proc = _check_config(config)
    assert proc.returncode == 0, proc.stderr
    assert agent_config.load(config).consensus.regulator_public_key


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"market": "m2"},
            "consensus.membership: {root}/membership.toml is for market 'm2', not 'm1'\n",
        ),
        (
            {"node_id": "mg9"},
            "consensus.membership: {root}/membership.toml does not list node 'mg1'\n",
        ),
        (
            {"node_key": PrivateKey.generate()},
            "agent.key_file: {root}/node.key is not the key {root}/membership.toml lists for "
            "'mg1'\n",
        ),
        (
            {"pinned": PrivateKey.generate()},
            "consensus.membership: {root}/membership.toml: membership of market 'm1' epoch 1: "
            "regulator signature does not verify\n",
        ),
    ],
    ids=["other-market", "not-listed", "other-key", "not-the-regulator"],
)
def test_a_node_membership_that_does_not_fit_is_refused(
    site: Path, kwargs: dict[str, Any], expected: str
) -> None:
    config = _node_site(site, **kwargs)
    proc = _check_config(config)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == f"config error: {config}: " + expected.format(root=site)


def test_a_bad_regulator_public_key_is_refused(site: Path) -> None:
    config = _node_site(site)
    text = config.read_text()
    start = text.index('regulator_public_key = "') + len('regulator_public_key = "')
    config.write_text(text[:start] + "04abcd" + text[start + 130 :])
    proc = _check_config(config)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"config error: {config}: consensus.regulator_public_key: public key must be a 65-byte "
        "uncompressed P-256 point\n"
    )
