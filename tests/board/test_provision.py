"""`meterchain board provision|deploy|monitor` end to end against emulated boards and Mosquitto.

Provisioning a blank emulated board writes its firmware, config and secrets, makes
the board generate its key, registers the public key and adds the broker password
and ACL lines; the board then publishes readings that verify with that registry
entry.  Re-running changes nothing; a dry run changes nothing either.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from hil.broker import MosquittoBroker
from hil.emulated_board import EmulatedBoardProcess, write_emulator_settings
from meterchain.board.cli import main
from meterchain.board.firmware import IMAGE_FILE
from meterchain.mqtt_auth import observer_acl
from meterchain.registry import Registry


@pytest.fixture
def broker(mosquitto_factory) -> MosquittoBroker:
    return mosquitto_factory(users={"agg": "pw-agg"}, acl=observer_acl("m1", "agg"))


def _snapshot(*paths: Path) -> dict[str, str]:
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _provision_args(board: Path, broker: MosquittoBroker, registry: Path, *extra: str) -> list[str]:
    return [
        "provision",
        "--port", f"emulated:{board}",
        "--meter-id", "mg1-pv-01",
        "--market", "m1",
        "--broker", broker.url,
        "--broker-ca", str(broker.ca_file),
        "--registry", str(registry),
        "--owner", "mg1",
        "--source", "pv",
        "--meter-type", "sim",
        "--broker-passwd", str(broker.workdir / "passwd"),
        "--broker-acl", str(broker.workdir / "acl"),
        "--set", "broker.backoff_min_ms=100",
        *extra,
    ]  # fmt: skip


def test_provision_end_to_end_then_the_board_publishes_verified_readings(
    broker: MosquittoBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    board = tmp_path / "board"
    registry = tmp_path / "registry.toml"
    args = _provision_args(board, broker, registry)
    broker_files = [broker.workdir / "passwd", broker.workdir / "acl"]

    # Dry run on a blank board: says what it would do, touches nothing.
    before = _snapshot(*broker_files)
    assert main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "would generate the signing key on the board" in dry
    assert "would add meter mg1-pv-01" in dry
    assert not board.exists() and not registry.exists()
    assert _snapshot(*broker_files) == before

    # The broker reads its files as its own user: provisioning keeps their owner and mode.
    for f in broker_files:
        f.chmod(0o640)
    assert main(args) == 0
    first = capsys.readouterr().out
    assert [stat.S_IMODE(f.stat().st_mode) for f in broker_files] == [0o640, 0o640]
    # The board's flash holds its key and secrets: owner only, on the emulator too.
    assert stat.S_IMODE(board.stat().st_mode) == 0o700
    for name in ("key.bin", "secrets.json"):
        assert stat.S_IMODE((board / name).stat().st_mode) == 0o600, name
    public = next(line.split()[-1] for line in first.splitlines() if line.startswith("public key"))
    meter = Registry.load(registry).get("mg1-pv-01")
    assert meter is not None and meter.public_key.point.hex() == public
    assert (meter.owner, meter.source) == ("mg1", "pv")
    secret = (board / "key.bin").read_bytes()[4:36].hex()
    assert secret not in first, "the private key never leaves the board"
    assert "mg1-pv-01:" in (broker.workdir / "passwd").read_text()
    assert "topic write mc/m1/r/mg1-pv-01" in (broker.workdir / "acl").read_text()

    # Idempotent: nothing changes on a second run, least of all the key.
    state = _snapshot(board, registry, *broker_files)
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "nothing to do" in again and "signing key present on the board (kept)" in again
    assert _snapshot(board, registry, *broker_files) == state
    assert (broker.workdir / "passwd").read_text().count("mg1-pv-01:") == 1
    assert (broker.workdir / "acl").read_text().count("user mg1-pv-01") == 1

    # The board boots with what provisioning wrote and publishes; readings verify.
    broker.reload()
    write_emulator_settings(board, interval_ms=200)
    with EmulatedBoardProcess(board) as proc:
        proc.wait_for_readings(3, timeout=30)
        monkeypatch.setenv("MC_BROKER_PASSWORD", "pw-agg")
        status = main([
            "monitor", "--broker", broker.url, "--market", "m1", "--registry", str(registry),
            "--ca", str(broker.ca_file), "--username", "agg", "--count", "3", "--timeout", "30",
        ])  # fmt: skip
        watched = capsys.readouterr().out
        assert status == 0, watched
        assert watched.count("OK mg1-pv-01 seq=") == 3
        assert main(["monitor", "--port", f"emulated:{board}", "--registry", str(registry),
                     "--count", "3", "--timeout", "10", "--from-start"]) == 0  # fmt: skip
    assert "REJECTED" not in capsys.readouterr().out


def test_deploy_updates_firmware_and_keeps_key_config_and_spool(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    board = tmp_path / "board"
    assert main(_provision_args(board, broker, tmp_path / "registry.toml")) == 0
    (board / "spool.log").write_bytes(b"pretend spooled readings")
    data = _snapshot(*(board / n for n in ("key.bin", "config.json", "secrets.json", "spool.log")))
    assert main(["deploy", "--port", f"emulated:{board}"]) == 0
    assert "already runs firmware image" in capsys.readouterr().out

    # An older image on the board: a module that no longer exists, a different stamp.
    (board / "lib" / "mc" / "retired.py").write_text("raise ImportError\n")
    (board / IMAGE_FILE).write_text("sha256 0\n")
    assert main(["deploy", "--port", f"emulated:{board}", "--dry-run"]) == 0
    assert (board / "lib" / "mc" / "retired.py").exists()
    assert main(["deploy", "--port", f"emulated:{board}"]) == 0
    out = capsys.readouterr().out
    assert "removed stale firmware files: lib/mc/retired.py" in out
    assert not (board / "lib" / "mc" / "retired.py").exists()
    assert _snapshot(*(board / n for n in ("key.bin", "config.json", "secrets.json",
                                            "spool.log"))) == data  # fmt: skip


def test_provisioning_refuses_to_rename_a_board_or_clash_in_the_registry(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    board = tmp_path / "board"
    registry = tmp_path / "registry.toml"
    assert main(_provision_args(board, broker, registry)) == 0
    key = (board / "key.bin").read_bytes()
    capsys.readouterr()
    renamed = _provision_args(board, broker, registry)
    renamed[renamed.index("--meter-id") + 1] = "mg1-pv-02"
    assert main(renamed) == 2
    assert "already provisioned as meter 'mg1-pv-01'" in capsys.readouterr().err
    # A second board claiming the registered id: its new key must not replace the entry.
    other = tmp_path / "other"
    text = registry.read_text()
    assert main(_provision_args(other, broker, registry)) == 2
    assert "different public key" in capsys.readouterr().err
    assert registry.read_text() == text and (board / "key.bin").read_bytes() == key


def test_bad_settings_are_refused_before_anything_is_written(
    broker: MosquittoBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    board = tmp_path / "board"
    args = _provision_args(board, broker, tmp_path / "registry.toml", "--set", "meter.baud=9601")
    assert main(args) == 2
    assert "config.json: meter.baud: must be one of" in capsys.readouterr().err
    assert not board.exists()


def test_key_comes_from_the_rf_on_entropy_source_not_urandom(tmp_path: Path) -> None:
    import mcfakes
    from mc import keystore
    from mc.flash import Flash

    board = mcfakes.FakeBoard(flash=Flash(str(tmp_path)), echo=False)
    board.urandom = None  # type: ignore[method-assign]  # must not be used for a key
    keystore.provision(board)
    assert board.key_draws == 1 and (tmp_path / "key.bin").stat().st_size == 40
    keystore.provision(board)
    assert board.key_draws == 1, "an existing key is never replaced"
