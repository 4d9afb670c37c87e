"""The example configurations in deploy/ pass the real `check-config` once their files exist.

Each test installs an example as an operator would: the files it names are
created for real (a P-256 node key, a registry, a regulator-signed membership,
a CA certificate, owner-only password files), `/etc/meterchain/` is pointed at
a temporary folder and systemd's `$CREDENTIALS_DIRECTORY`/`$STATE_DIRECTORY`
are set, and `meterchain ... check-config` runs as a subprocess.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent.gateway import gateway_key
from hil.broker import make_test_pki
from meterchain.keys import PrivateKey
from meterchain.quorum import Member, Membership
from meterchain.registry import entry_text, make_meter

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
AGENT_EXAMPLE = DEPLOY / "agent.example.toml"
AGGREGATOR_EXAMPLE = DEPLOY / "aggregator.example.toml"
ETC = "/etc/meterchain/"


@dataclass
class Install:
    """A fake host: /etc/meterchain, the credentials folder and the state folder."""

    etc: Path
    credentials: Path
    state: Path
    regulator: PrivateKey
    node_key: PrivateKey

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            CREDENTIALS_DIRECTORY=str(self.credentials),
            STATE_DIRECTORY=str(self.state),
        )


def _secret(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


@pytest.fixture
def install(tmp_path: Path) -> Install:
    etc, creds, state = tmp_path / "etc" / "meterchain", tmp_path / "creds", tmp_path / "state"
    etc.mkdir(parents=True)
    creds.mkdir(mode=0o700)
    state.mkdir(mode=0o700)
    pki = make_test_pki(tmp_path / "pki", ("broker.example",))
    shutil.copy(pki["ca"], etc / "ca.crt")
    return Install(etc, creds, state, PrivateKey.generate(), PrivateKey.generate())


def _membership(install: Install, market: str, node_id: str) -> None:
    """The regulator signs a three-node membership that includes this agent's node."""
    members = [Member(node_id, install.node_key.public_key())]
    members += [Member(f"peer{i}", PrivateKey.generate().public_key()) for i in (2, 3)]
    signed = Membership(market, 1, tuple(members)).signed_by(install.regulator)
    (install.etc / "membership.toml").write_text(signed.to_toml())


def _installed(example: Path, install: Install, text: str | None = None) -> Path:
    """Copy `example` into the fake /etc, pointing only its /etc/meterchain/ paths there."""
    text = example.read_text() if text is None else text
    assert ETC in text  # the examples name their installed files absolutely
    copy = install.etc / example.name.replace(".example", "")
    copy.write_text(text.replace(ETC, f"{install.etc}/"))
    return copy


def _check_config(service: str, config: Path, install: Install) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterchain.cli", service, "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=install.env,
        cwd=REPO,
        timeout=120,
    )


def _with_regulator(text: str, key: str, install: Install) -> str:
    """`text` with the regulator's real key in place of the example's placeholder for `key`."""
    regulator = install.regulator.public_key().point.hex()
    text, count = re.subn(rf'^{key} = "[0-9a-f]+"', f'{key} = "{regulator}"', text, flags=re.M)
    assert count == 1
    return text


def _install_agent(install: Install) -> tuple[str, dict[str, object]]:
    """The agent example with the regulator's real key, and every file it names created."""
    text = _with_regulator(AGENT_EXAMPLE.read_text(), "regulator_public_key", install)
    doc = tomllib.loads(text)
    agent = doc["agent"]
    market, node_id, owner = agent["market"], agent["node_id"], agent["microgrid"]
    assert agent["key_file"].startswith("$CREDENTIALS_DIRECTORY/")
    assert agent["state_dir"].startswith("$STATE_DIRECTORY")
    install.node_key.save(install.credentials / "node.key")
    (install.credentials / "node.key").chmod(0o600)
    _secret(install.credentials / "broker.pass", b"agent-secret\n")
    # One board that signs its own readings, plus the Modbus meters the agent signs for.
    board = make_meter("mg1-pv-roof", PrivateKey.generate().public_key(), owner, "pv")
    entries = [entry_text(board)]
    for meter in doc["modbus"]["meter"]:
        key = gateway_key(install.node_key, market, meter["id"]).public_key()
        entries.append(entry_text(make_meter(meter["id"], key, owner, meter["source"])))
    (install.etc / "registry.toml").write_text("\n".join(entries))
    _membership(install, market, node_id)
    return text, doc


def test_the_agent_example_passes_check_config(install: Install) -> None:
    text, doc = _install_agent(install)
    buses = {b["kind"] for b in doc["modbus"]["bus"]}
    assert buses == {"tcp", "rtu"} and doc["consensus"]["role"] == "node"
    assert doc["broker"]["url"] == "mqtts://broker.example:8883"
    config = _installed(AGENT_EXAMPLE, install, text)
    proc = _check_config("agent", config, install)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{config}: OK (2 Modbus meter(s), 3 registered meter(s))"


def test_check_config_works_outside_systemd_given_the_units_folders(install: Install) -> None:
    """No $CREDENTIALS_DIRECTORY, no $STATE_DIRECTORY (a shell, not the unit): the folders the
    unit would hand the service are named on the command line instead."""
    text, _ = _install_agent(install)
    config = _installed(AGENT_EXAMPLE, install, text)
    env = {k: v for k, v in install.env.items()
           if k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")}  # fmt: skip
    command = [sys.executable, "-m", "meterchain.cli", "agent", "check-config", "--config",
               str(config)]  # fmt: skip
    proc = subprocess.run(
        [*command, "--credentials", str(install.credentials), "--state-dir", str(install.state)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "$CREDENTIALS_DIRECTORY, which is not set" in proc.stderr


def test_the_agent_example_refuses_a_membership_the_regulator_did_not_sign(
    install: Install,
) -> None:
    # The placeholder regulator key left in place: nobody holds its private key.
    _install_agent(install)
    config = _installed(AGENT_EXAMPLE, install)
    proc = _check_config("agent", config, install)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"config error: {config}: consensus.membership: {install.etc}/membership.toml: "
        "membership of market 'm1' epoch 1: regulator signature does not verify\n"
    )


def test_the_agent_example_without_systemd_variables_names_the_unset_one(
    install: Install,
) -> None:
    text, _ = _install_agent(install)
    config = _installed(AGENT_EXAMPLE, install, text)
    env = {k: v for k, v in install.env.items() if k != "CREDENTIALS_DIRECTORY"}
    proc = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "agent", "check-config", "--config", str(config)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"config error: {config}: agent.key_file: '$CREDENTIALS_DIRECTORY/node.key' uses "
        "environment variable $CREDENTIALS_DIRECTORY, which is not set\n"
    )


def test_a_misspelled_agent_key_exits_2_naming_file_and_key(install: Install) -> None:
    text, _ = _install_agent(install)
    bad = text.replace("\nmetrics_port = ", "\nmetrics_prot = ", 1)
    assert bad != text
    config = _installed(AGENT_EXAMPLE, install, bad)
    proc = _check_config("agent", config, install)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"config error: {config}: agent.metrics_prot: unknown key" in proc.stderr


def _install_aggregator(install: Install) -> str:
    """The example with the regulator's real key in place of its placeholder (not a path)."""
    text = AGGREGATOR_EXAMPLE.read_text()
    agg = tomllib.loads(text)["aggregator"]
    assert agg["ledger"].startswith("$STATE_DIRECTORY/")
    _membership(install, agg["market"], "node1")
    _secret(install.credentials / "broker.pass", b"aggregator-secret\n")
    return _with_regulator(text, "regulator_key", install)


def test_the_aggregator_example_passes_check_config(install: Install) -> None:
    config = _installed(AGGREGATOR_EXAMPLE, install, _install_aggregator(install))
    proc = _check_config("aggregator", config, install)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"{config}: OK (market m1, 3 consensus members, ledger {install.state}/ledger.db)"
    )


def test_the_aggregator_example_refuses_a_membership_the_regulator_did_not_sign(
    install: Install,
) -> None:
    # The placeholder regulator key left in place: nobody holds its private key.
    _install_aggregator(install)
    config = _installed(AGGREGATOR_EXAMPLE, install)
    proc = _check_config("aggregator", config, install)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"config error: {config}: aggregator.membership:" in proc.stderr
    assert "regulator signature does not verify" in proc.stderr


def test_a_misspelled_aggregator_key_exits_2_naming_file_and_key(install: Install) -> None:
    text = _install_aggregator(install)
    bad = text.replace("\nkeepalive_s = ", "\nkeepalive = ", 1)
    assert bad != text
    config = _installed(AGGREGATOR_EXAMPLE, install, bad)
    proc = _check_config("aggregator", config, install)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"config error: {config}: broker.keepalive: unknown key" in proc.stderr


@pytest.mark.parametrize(
    ("example", "unit"),
    [
        (AGENT_EXAMPLE, "meterchain-agent.service"),
        (AGGREGATOR_EXAMPLE, "meterchain-aggregator.service"),
    ],
)
def test_every_credential_an_example_reads_is_loaded_by_its_unit(example: Path, unit: str) -> None:
    """A `$CREDENTIALS_DIRECTORY/X` with no `LoadCredential=X:` would not exist under systemd."""
    wanted = set(re.findall(r"\$CREDENTIALS_DIRECTORY/([\w.-]+)", example.read_text()))
    unit_text = (DEPLOY / "systemd" / unit).read_text()
    loaded = set(re.findall(r"^LoadCredential=([^:]+):", unit_text, flags=re.M))
    assert wanted and wanted <= loaded
