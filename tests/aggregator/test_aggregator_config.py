"""A bad aggregator configuration stops start-up with exit 2 naming the file, the key and why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator.cli import main as aggregator_main
from aggregator.config import ledger_target, load
from hil.broker import make_test_pki
from meterchain.ledger.sandbox import Sandbox

REPO = Path(__file__).resolve().parents[2]


def _site(tmp_path: Path, aggregator: str = "", broker: str = "", extra: str = "") -> Path:
    sb = Sandbox(market="m1")
    (tmp_path / "membership.toml").write_text(sb.membership.to_toml())
    pki = make_test_pki(tmp_path / "pki")
    (tmp_path / "ca.crt").write_bytes(pki["ca"].read_bytes())
    (tmp_path / "broker.pass").write_text("s3cret\n")
    (tmp_path / "broker.pass").chmod(0o600)
    regulator = sb.regulator.public_key().point.hex()
    text = (
        "[aggregator]\n"
        'market = "m1"\n'
        'ledger = "ledger.db"\n'
        'membership = "membership.toml"\n'
        f'regulator_key = "{regulator}"\n'
        f"{aggregator}"
        "\n[broker]\n"
        'url = "mqtts://127.0.0.1:8883"\n'
        'ca_file = "ca.crt"\n'
        'password_file = "broker.pass"\n'
        f"{broker}"
        f"{extra}"
    )
    path = tmp_path / "aggregator.toml"
    path.write_text(text)
    return path


def test_a_good_file_loads(tmp_path: Path, capsys) -> None:
    cfg = load(_site(tmp_path))
    assert cfg.aggregator.node_id == "aggregator" and cfg.membership.n == 3
    assert cfg.password == "s3cret" and cfg.tls and cfg.port == 8883
    assert ledger_target(cfg) == str(tmp_path / "ledger.db")
    assert aggregator_main(["check-config", "--config", str(tmp_path / "aggregator.toml")]) == 0
    assert "OK (market m1, 3 consensus members" in capsys.readouterr().out


BAD = [
    (
        'block_interval_s = "60"\n',
        "",
        "aggregator.block_interval_s: must be a number, not a string",
    ),
    ("colour = 3\n", "", "aggregator.colour: unknown key (known: block_interval_s"),
    (
        "vote_timeout_s = 90\n",
        "",
        "aggregator.vote_timeout_s: must be shorter than block_interval_s",
    ),
    ('node_id = "agg/1"\n', "", "aggregator.node_id: node_id 'agg/1' must be 1-64 characters"),
    (
        'log_level = "loud"\n',
        "",
        "aggregator.log_level: must be one of debug, info, warning, error",
    ),
    ("metrics_port = 70000\n", "", "aggregator.metrics_port: must be 0 (off) or a TCP port"),
    ('congestion_method = "shed"\n', "", "aggregator.congestion_method: must be one of adjust"),
    ('remedies = ["refund"]\n', "", "aggregator.remedies: must list distinct remedies of"),
    ('remedies = ["ftr", "ftr"]\n', "", "aggregator.remedies: must list distinct remedies of"),
    ("remedies = 3\n", "", "aggregator.remedies: must be an array, not an integer"),
    ("max_readings_per_block = 0\n", "", "aggregator.max_readings_per_block: must be > 0, got 0"),
    ("checkpoint_interval_blocks = 0\n", "", "aggregator.checkpoint_interval_blocks: must be > 0"),
    ("", "keepalive_s = -1\n", "broker.keepalive_s: must be > 0, got -1"),
    ("", "username = 5\n", "broker.username: must be a string, not an integer"),
    (
        "",
        "",
        "nope: unknown section (known: aggregator, broker, clock)",
    ),
]


@pytest.mark.parametrize(("aggregator", "broker", "message"), BAD)
def test_bad_values_are_named(tmp_path: Path, capsys, aggregator: str, broker: str,
                              message: str) -> None:  # fmt: skip
    extra = "\n[nope]\nx = 1\n" if message.startswith("nope") else ""
    path = _site(tmp_path, aggregator, broker, extra)
    assert aggregator_main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"config error: {path}: {message}")


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_broken_references_are_named(tmp_path: Path, capsys) -> None:
    path = _site(tmp_path)
    cases = [
        ('url = "mqtts://127.0.0.1:8883"', 'url = "http://x"',
         "broker.url: must look like mqtts://HOST:PORT or mqtt://HOST:PORT, not 'http://x'"),
        ('ledger = "ledger.db"', 'ledger = "missing/ledger.db"',
         f"aggregator.ledger: folder {tmp_path / 'missing'} does not exist"),
        ('ledger = "ledger.db"', 'ledger = "mysql://x/y"',
         "aggregator.ledger: must be a SQLite file path or a postgresql:// URL"),
        ('ledger = "ledger.db"', 'ledger = "postgresql://u@host"',
         "aggregator.ledger: PostgreSQL URL names no database"),
        ('password_file = "broker.pass"', 'password_file = "gone.pass"',
         f"broker.password_file: cannot read {tmp_path / 'gone.pass'}: No such file or directory"),
        ('membership = "membership.toml"', 'membership = "$NOT_SET_ANYWHERE/m.toml"',
         "aggregator.membership: '$NOT_SET_ANYWHERE/m.toml' uses environment variable "
         "$NOT_SET_ANYWHERE, which is not set"),
        ('regulator_key = "', 'regulator_key = "04',
         "aggregator.regulator_key: public key must be a 65-byte uncompressed P-256 point"),
    ]  # fmt: skip
    original = path.read_text()
    for old, new, message in cases:
        path.write_text(original)
        _replace(path, old, new)
        assert aggregator_main(["check-config", "--config", str(path)]) == 2, message
        err = capsys.readouterr().err
        assert err.startswith(f"config error: {path}: {message}"), err


def test_a_membership_not_signed_by_the_pinned_regulator_is_refused(tmp_path: Path, capsys) -> None:
    path = _site(tmp_path)
    other = Sandbox(market="m1").key("someone").public_key().point.hex()
    text = path.read_text()
    start = text.index('regulator_key = "') + len('regulator_key = "')
    path.write_text(text[:start] + other + text[start + 130 :])
    assert aggregator_main(["check-config", "--config", str(path)]) == 2
    assert "aggregator.membership: " in capsys.readouterr().err
    (tmp_path / "membership.toml").write_text("market = 3\n")
    path.write_text(text)
    assert aggregator_main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"config error: {tmp_path / 'membership.toml'}: epoch: missing"
    )


def test_missing_and_unreadable_files(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nowhere.toml"
    assert aggregator_main(["check-config", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"config error: {missing}: file does not exist\n"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[aggregator\n")
    assert aggregator_main(["check-config", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"config error: {bad}: not valid TOML")


def test_run_with_a_bad_config_exits_2_before_touching_anything(tmp_path: Path) -> None:
    path = _site(tmp_path, "settle_grace_s = -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "aggregator", "run", "--config", str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        f"config error: {path}: aggregator.settle_grace_s: must be >= 0, got -5\n"
    )
    assert not (tmp_path / "ledger.db").exists()


def _check_config(
    path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "aggregator", "check-config", "--config",
         str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60, env=env,
    )  # fmt: skip


def test_an_unset_variable_in_a_path_names_the_key_and_the_variable(tmp_path: Path) -> None:
    path = _site(tmp_path)
    _replace(path, 'ledger = "ledger.db"', 'ledger = "$STATE_DIRECTORY/ledger.db"')
    env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    proc = _check_config(path, env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"config error: {path}: aggregator.ledger: '$STATE_DIRECTORY/ledger.db' uses "
        "environment variable $STATE_DIRECTORY, which is not set\n"
    )
    # Set, the same file is good and the ledger lands in that folder.
    state = tmp_path / "state"
    state.mkdir()
    proc = _check_config(path, dict(env, STATE_DIRECTORY=str(state)))
    assert proc.returncode == 0, proc.stderr
    assert f"ledger {state}/ledger.db)" in proc.stdout


def test_mqtts_without_a_ca_file_is_refused(tmp_path: Path) -> None:
    path = _site(tmp_path)
    _replace(path, 'ca_file = "ca.crt"\n', "")
    proc = _check_config(path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"config error: {path}: broker.ca_file: missing (required for mqtts://)\n"
    )
    # Plain mqtt:// (a broker on the loopback) needs no CA.
    _replace(path, "mqtts://", "mqtt://")
    assert _check_config(path).returncode == 0


@pytest.mark.parametrize("content", ["", "not a certificate\n", "-----BEGIN CERTIFICATE-----\n"])
def test_a_ca_file_that_is_not_a_pem_certificate_is_refused(tmp_path: Path, content: str) -> None:
    path = _site(tmp_path)
    (tmp_path / "ca.crt").write_text(content)
    proc = _check_config(path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(
        f"config error: {path}: broker.ca_file: {tmp_path / 'ca.crt'} is not a PEM CA certificate"
    ), proc.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_password_file_others_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = _site(tmp_path)
    (tmp_path / "broker.pass").chmod(mode)
    proc = _check_config(path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"config error: {path}: broker.password_file: {tmp_path / 'broker.pass'} is accessible "
        f"by group/others (mode {mode:o}); chmod 600 it\n"
    )


@pytest.mark.parametrize(
    ("content", "problem"), [(b"\xff\xfe secret\n", "is not UTF-8 text"), (b" \n", "is empty")]
)
def test_a_password_file_that_is_not_utf8_text_or_is_empty_is_refused(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = _site(tmp_path)
    (tmp_path / "broker.pass").write_bytes(content)
    proc = _check_config(path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"config error: {path}: broker.password_file: {tmp_path / 'broker.pass'} {problem}\n"
    )
