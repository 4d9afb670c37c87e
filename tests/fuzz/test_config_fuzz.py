"""Config fuzzing: whatever a site file holds, check-config exits 0 or 2 with `config error: ...`.

A valid agent and aggregator configuration is parsed, one to three values are
replaced by hostile ones (NaN and infinities, NUL bytes, over-long paths,
malformed IPv6 URLs, wrong types, unset variables, huge numbers) or keys are
dropped or added, and the file goes through the real `check-config` handler.
Anything but exit 0, or exit 2 with one `config error:` line, fails the test.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator.cli import main as aggregator_main
from edge_agent.cli import main as agent_main
from hil.broker import make_test_pki
from meterchain.keys import PrivateKey
from meterchain.ledger.sandbox import Sandbox
from meterchain.registry import entry_text, make_meter
from tests.fuzz import corpus

REPO = Path(__file__).resolve().parents[2]

AGENT = {
    "agent": {
        "node_id": "mg1",
        "market": "m1",
        "key_file": "node.key",
        "registry": "registry.toml",
        "state_dir": "state",
        "max_clock_ahead_s": 300,
    },
    "broker": {"url": "mqtts://127.0.0.1:8883", "ca_file": "ca.crt",
               "password_file": "broker.pass", "keepalive_s": 30},
    "modbus": {
        "bus": [{"name": "rs485", "kind": "rtu", "serial_port": "/dev/ttyUSB0", "timeout_s": 1.0}],
        "meter": [{"id": "mg1-sdm", "bus": "rs485", "unit": 2, "poll_interval_s": 10.0}],
    },
    "setpoint": [{"kind": "storage_power_w", "bus": "rs485", "unit": 5, "address": 100,
                  "scale": 1.0}],
    "consensus": {"role": "standalone", "delta_s": 5.0, "bid_lead_s": 300.0},
}  # fmt: skip

AGGREGATOR = {
    "aggregator": {
        "market": "m1",
        "ledger": "ledger.db",
        "membership": "membership.toml",
        "regulator_key": "",  # filled in by the site
        "block_interval_s": 60.0,
        "vote_timeout_s": 10.0,
        "settle_grace_s": 5,
    },
    "broker": {"url": "mqtts://127.0.0.1:8883", "ca_file": "ca.crt",
               "password_file": "broker.pass", "keepalive_s": 30},
}  # fmt: skip

EVIL: list[Any] = [
    float("nan"), float("inf"), float("-inf"), 0, -1, 0.0, 1e308, 2**63 - 1, -(2**63),
    "", " ", "\x00", "a\x00b", "state\x00/x", "x" * 5000, "/" + "y" * 300, "z/" * 2100,
    "mqtts://[::1", "mqtts://[::1]:99999", "mqtts://[fe80::1%25eth0]:8883", "mqtt://:0",
    "mqtts://host:-1", "mqtts://[not-ipv6]:1", "postgresql://[::1", "postgresql://h:x/db",
    "$MC_FUZZ_UNSET_VARIABLE/x", "${}", "~no-such-user-mc/x", "/dev/null", "/dev/zero", "/",
    "mg9\n", "né", "../../../../../../../../etc/passwd", True, [1, 2], ["a"], {"t": 1},
]  # fmt: skip


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(doc: dict[str, Any]) -> str:
    """A TOML text of `doc`: top-level tables of values, nested tables, arrays of tables."""
    lines: list[str] = []

    def table(name: str, body: dict[str, Any], header: str) -> None:
        lines.append(header)
        nested = []
        for key, value in body.items():
            if isinstance(value, dict) and name:
                nested.append((key, value))
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                nested.append((key, value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, value in nested:
            full = f"{name}.{key}" if name else key
            if isinstance(value, list):
                for item in value:
                    table(full, item, f"[[{full}]]")
            else:
                table(full, value, f"[{full}]")

    for key, value in doc.items():
        if isinstance(value, list):
            for item in value:
                table(key, item, f"[[{key}]]")
        elif isinstance(value, dict):
            table(key, value, f"[{key}]")
        else:
            lines.insert(0, f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _leaves(doc: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in _leaves(v, (*path, k))] or [path]
    if isinstance(doc, list) and doc and all(isinstance(v, dict) for v in doc):
        return [p for i, v in enumerate(doc) for p in _leaves(v, (*path, i))]
    return [path]


def mutate(rng: random.Random, good: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(good))
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_leaves(doc))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        op = rng.randrange(10)
        if op == 0 and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif op == 1 and isinstance(parent, dict):
            parent[rng.choice(["extra", "delta_s", "url", "membership"])] = rng.choice(EVIL)
        else:
            parent[path[-1]] = rng.choice(EVIL)
    return doc


def _site(root: Path) -> tuple[Path, Path]:
    """Files both configurations point at; returns (agent.toml, aggregator.toml)."""
    root.mkdir(parents=True, exist_ok=True)
    PrivateKey.generate().save(root / "node.key")
    (root / "broker.pass").write_text("secret\n")
    (root / "broker.pass").chmod(0o600)
    pki = make_test_pki(root / "pki")
    (root / "ca.crt").write_bytes(pki["ca"].read_bytes())
    meter = make_meter("mg1-pv", PrivateKey.generate().public_key(), "mg1", "pv")
    (root / "registry.toml").write_text(entry_text(meter))
    sb = Sandbox(market="m1")
    (root / "membership.toml").write_text(sb.membership.to_toml())
    AGGREGATOR["aggregator"]["regulator_key"] = sb.regulator.public_key().point.hex()
    return root / "agent.toml", root / "aggregator.toml"


Main = Callable[[list[str]], int]


def _check(main: Main, path: Path, doc: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    path.write_text(to_toml(doc), encoding="utf-8")
    try:
        status = main(["check-config", "--config", str(path)])
    except SystemExit as exc:  # argparse only: never for a file's content
        raise AssertionError(f"check-config exited via SystemExit({exc.code})") from exc
    except Exception as exc:
        raise AssertionError(f"check-config raised {exc!r} on:\n{path.read_text()}") from exc
    out, err = capsys.readouterr()
    if status == 0:
        assert err == "", err
        return
    assert status == 2, f"exit {status}: {err}\n{path.read_text()}"
    assert err.startswith("config error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("name", "main", "good"),
    [("agent", agent_main, AGENT), ("aggregator", aggregator_main, AGGREGATOR)],
)
def test_check_config_only_ever_exits_0_or_2_with_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, main: Main, good: dict[str, Any]
) -> None:
    agent_toml, aggregator_toml = _site(tmp_path)
    path = agent_toml if name == "agent" else aggregator_toml
    path.write_text(to_toml(good), encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    rng = random.Random(f"config-{name}")
    for _ in range(corpus.examples(300)):
        _check(main, path, mutate(rng, good), capsys)


@pytest.mark.parametrize(
    ("service", "section", "key", "value", "says"),
    [
        ("agent", "agent", "key_file", "node\x00.key",
         "agent.key_file: must not contain control character '\\x00'"),
        ("agent", "broker", "url", "mqtts://[::1:8883", "broker.url: 'mqtts://[::1:8883' is not"),
        ("agent", "agent", "state_dir", "s" * 300, "agent.state_dir: path is too long"),
        ("agent", "consensus", "delta_s", float("nan"), "consensus.delta_s: must be a finite"),
        ("agent", "setpoint", "scale", float("inf"), "setpoint[0].scale: must be a finite"),
        ("aggregator", "aggregator", "block_interval_s", float("nan"),
         "aggregator.block_interval_s: must be a finite number, not nan"),
        ("aggregator", "aggregator", "vote_timeout_s", float("inf"), "must be a finite"),
        ("aggregator", "aggregator", "membership", "m\x00.toml", "control character '\\x00'"),
    ],
)  # fmt: skip
def test_the_real_cli_exits_2_for_the_reported_inputs(
    tmp_path: Path, service: str, section: str, key: str, value: Any, says: str
) -> None:
    agent_toml, aggregator_toml = _site(tmp_path)
    doc = json.loads(json.dumps(AGENT if service == "agent" else AGGREGATOR))
    target = doc[section][0] if isinstance(doc[section], list) else doc[section]
    target[key] = value
    path = agent_toml if service == "agent" else aggregator_toml
    path.write_text(to_toml(doc), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", service, "check-config", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"config error: {path}: ") and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
