"""The shipped systemd unit runs the agent the way the agent expects to be run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent import config as agent_config

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "meterchain-agent.service"


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_unit_is_a_watched_notify_service_for_an_unprivileged_user() -> None:
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert int(d["WatchdogSec"][0]) > 0
    assert d["Restart"] == ["on-failure"]
    assert d["RestartPreventExitStatus"] == ["2"]  # config errors exit 2 (see edge_agent.cli)
    assert d["DynamicUser"] == ["yes"] and "User" not in d
    assert d["StateDirectory"] == ["meterchain-agent"]
    assert d["KillSignal"] == ["SIGTERM"]
    # `systemctl reload`: SIGHUP to the agent (not its workers), which reads the registry again.
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    (exec_start,) = d["ExecStart"]
    assert exec_start.split()[1:4] == ["agent", "run", "--config"]
    credentials = {c.split(":")[0] for c in d["LoadCredential"]}
    assert credentials == {"node.key", "broker.pass"}


def test_config_paths_expand_the_directories_systemd_provides(tmp_path: Path, monkeypatch) -> None:
    from meterchain.keys import PrivateKey

    creds, state = tmp_path / "creds", tmp_path / "state"
    creds.mkdir(mode=0o700)
    PrivateKey.generate().save(creds / "node.key")
    (creds / "broker.pass").write_text("pw\n")
    (creds / "broker.pass").chmod(0o400)
    (tmp_path / "registry.toml").write_text("")
    (tmp_path / "agent.toml").write_text(
        '[agent]\nnode_id = "mg1"\nmarket = "m1"\nregistry = "registry.toml"\n'
        'key_file = "$CREDENTIALS_DIRECTORY/node.key"\nstate_dir = "$STATE_DIRECTORY"\n'
        '[broker]\nurl = "mqtt://127.0.0.1:1883"\n'
        'password_file = "$CREDENTIALS_DIRECTORY/broker.pass"\n'
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    cfg = agent_config.load(tmp_path / "agent.toml")
    assert cfg.agent.key_file == creds / "node.key"
    assert cfg.database == state / "agent.sqlite"
    assert cfg.broker_password == "pw"


def systemd_verify_problems(unit: Path, tmp_path: Path) -> list[str]:
    """What `systemd-analyze verify` says about `unit`, with its install path pointed at this
    checkout's interpreter so the command is checked too ([] when systemd is absent)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:  # not a systemd host: the structural tests still ran
        return []
    text = unit.read_text().replace(
        "/opt/meterchain/bin/meterchain", f"{sys.executable} -m meterchain.cli"
    )
    copy = tmp_path / unit.name
    copy.write_text(text)
    proc = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    return [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if unit.name in line and "not executable" not in line
    ]


@pytest.mark.parametrize("name", ["meterchain-agent.service", "meterchain-aggregator.service"])
def test_systemd_analyze_accepts_the_unit(name: str, tmp_path: Path) -> None:
    unit = UNIT.parent / name
    assert "ExecStart=/opt/meterchain/bin/meterchain " in unit.read_text()  # the README install
    assert not systemd_verify_problems(unit, tmp_path)
