"""The firmware app under real MicroPython (WebAssembly port) and CPython, with the fake HAL.

Several sampling cycles, a broker outage, a "reboot" (a second run on the same flash
folder), safe mode on bad configuration: the readings the board signs verify on the
CPython side against a registry holding the board's public key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import board_config, public_key_of

from meterchain.reading import FLAG_CLOCK_NOT_SYNCED, FLAG_METER_READ_ERROR, verify
from meterchain.registry import Registry

RUN_APP = """
import json, mcfakes
from mc import app
CFG = json.loads(%(cfg)r)
broker = mcfakes.FakeBroker()
broker.up = %(broker_up)s
board = mcfakes.FakeBoard(broker=broker, echo=False, ntp_ok=%(ntp)s,
                          meter_import_wh=%(import_wh)d, unix_start=%(unix)d)
status = app.main(board, cycles=%(cycles)d)
from mc.spool import Spool
spool = Spool(board.flash, CFG.get("spool", {}).get("max_records", 512))
print(json.dumps({
    "status": status,
    "published": [p.hex() for t, p in broker.messages],
    "topics": sorted(set(t for t, p in broker.messages)),
    "console": board.console_lines,
    "spooled": len(spool),
    "wdt_longest_ms": board.wdt.longest_ms if board.wdt else None,
    "meter_wh": board.meter.import_mwh // 1000 if board.meter else 0,
    "unix_end": board.time(),
}))
"""


def run_app(
    mpy,
    folder: Path,
    cycles: int,
    broker_up: bool = True,
    ntp: bool = True,
    import_wh: int = 1234500,
    unix: int = 1767225600,
) -> Any:
    path = folder / "config.json"
    cfg = json.loads(path.read_text()) if path.exists() else {}
    code = RUN_APP % {
        "cfg": json.dumps(cfg),
        "broker_up": broker_up,
        "ntp": ntp,
        "cycles": cycles,
        "import_wh": import_wh,
        "unix": unix,
    }
    result = mpy(code, fs_dir=folder).check()
    return json.loads(result.stdout.strip().splitlines()[-1])


def registry_for(folder: Path, cfg: dict[str, Any]) -> Registry:
    registry = Registry()
    registry.add(cfg["meter_id"], public_key_of(folder), "mg1", cfg["source"])
    return registry


def test_app_runs_cycles_under_micropython_and_survives_a_reboot(mpy, make_board_dir) -> None:
    cfg = board_config(**{"spool.batch": 2, "seq_block": 4})
    folder = make_board_dir(cfg=cfg)
    registry = registry_for(folder, cfg)

    # Boot 1: the broker is unreachable; readings pile up in the flash spool.
    first = run_app(mpy, folder, cycles=5, broker_up=False, ntp=False)
    assert first["status"] == 0
    assert first["published"] == []
    assert first["spooled"] == 5, "every reading kept in flash while the broker is down"
    assert first["wdt_longest_ms"] < 120_000
    lines = [line for line in first["console"] if line.startswith("MC-R ")]
    seqs1 = [verify(bytes.fromhex(line[5:]), registry).seq for line in lines]
    assert seqs1 == [1, 2, 3, 4, 5]

    # Boot 2 (same flash): the broker is back; the spooled readings go first, then new ones.
    # The meter kept counting and time went on while the board was off.
    second = run_app(
        mpy, folder, cycles=3, import_wh=first["meter_wh"] + 5, unix=first["unix_end"] + 60
    )
    readings = [verify(bytes.fromhex(p), registry) for p in second["published"]]
    seqs = [r.seq for r in readings]
    assert seqs[:5] == seqs1
    assert len(seqs) == 8 and seqs == sorted(seqs) and len(set(seqs)) == 8
    assert min(seqs[5:]) > max(seqs1), "no sequence number reused after the reboot"
    assert second["topics"] == ["mc/m1/r/mg1-load-01"]
    assert second["spooled"] == 0, "acknowledged readings left the spool"
    assert all(r.flags & FLAG_CLOCK_NOT_SYNCED for r in readings[:5])
    # Start-up order: the first reading before the network (not yet synced), then NTP.
    assert readings[5].flags & FLAG_CLOCK_NOT_SYNCED
    assert not any(r.flags & FLAG_CLOCK_NOT_SYNCED for r in readings[6:])
    # Cumulative registers never run backwards across the reboot.
    imports = [r.import_wh for r in readings]
    assert imports == sorted(imports) and imports[-1] > imports[0]
    assert all(r.power_w == 1500 for r in readings)


def test_same_firmware_runs_under_cpython(make_board_dir) -> None:
    import mcfakes
    from mc import app
    from mc.flash import Flash

    cfg = board_config()
    folder = make_board_dir(cfg=cfg)
    broker = mcfakes.FakeBroker()
    board = mcfakes.FakeBoard(flash=Flash(str(folder)), broker=broker, echo=False)
    assert app.main(board, cycles=4) == 0
    registry = registry_for(folder, cfg)
    assert [verify(p, registry).seq for _, p in broker.messages] == [1, 2, 3, 4]


def test_meter_faults_give_flagged_readings_not_made_up_values(make_board_dir) -> None:
    import mcfakes
    from mc.app import App
    from mc.config import load
    from mc.flash import Flash
    from mc.keystore import load as load_key

    cfg_doc = board_config()
    folder = make_board_dir(cfg=cfg_doc)
    flash = Flash(str(folder))
    board = mcfakes.FakeBoard(flash=flash, broker=mcfakes.FakeBroker(), echo=False)
    application = App(board, load(flash), load_key(flash))
    registry = registry_for(folder, cfg_doc)
    application.sample()
    good = verify(application.spool.payload(1), registry)
    board.meter_uart.unplug()  # RS-485 wire cut: every attempt times out
    board.sleep_ms(15_000)
    application.sample()
    bad = verify(bytes(application.spool.payload(2)), registry)
    assert bad.flags & FLAG_METER_READ_ERROR
    assert (bad.import_wh, bad.export_wh, bad.power_w) == (good.import_wh, good.export_wh, 0)
    board.meter_uart.plug()
    board.meter_uart.corrupt_next(1)  # one CRC error: the retry succeeds
    board.sleep_ms(15_000)
    application.sample()
    ok = verify(bytes(application.spool.payload(3)), registry)
    assert not ok.flags & FLAG_METER_READ_ERROR
    assert ok.import_wh > good.import_wh
    assert application.read_errors == 1


BAD_CONFIGS = [
    ({"meter.baud": 9601}, "config.json: meter.baud: must be one of"),
    ({"meter.type": "sdm999"}, "config.json: meter.type: must be one of"),
    ({"interval_s": "15"}, "config.json: interval_s: must be an integer"),
    ({"meter.pin": 4}, "config.json: meter.pin: not used by meter type sdm630"),
    ({"brokr": {"host": "x"}}, "config.json: brokr.host: unknown key"),
    ({"wdt_s": 5}, "config.json: wdt_s: must be 0 (off) or at least 60"),
    ({"broker.tls": True}, "config.json: broker.ca: ca.pem not found in flash"),
    ({"broker.reboot_after_s": 60}, "config.json: broker.reboot_after_s: must be 0 (never) or"),
    # Pins and buses the chip lacks or its module uses (per-chip checks).
    ({"chip": "esp32-wrover", "meter.tx": 17, "meter.rx": 16},
     "config.json: meter.tx: GPIO17 is wired to the module's flash or PSRAM on esp32-wrover"),
    ({"meter.tx": 6}, "config.json: meter.tx: GPIO6 is wired to the module's flash or PSRAM"),
    ({"meter.tx": 35}, "config.json: meter.tx: GPIO35 is input-only on esp32"),
    ({"meter.de": 24}, "config.json: meter.de: GPIO24 does not exist on esp32"),
    ({"meter.de": 16}, "config.json: meter.rx: GPIO16 is already meter.de"),
    ({"chip": "esp32c3", "meter.uart": 2}, "config.json: meter.uart: esp32c3 has no UART2"),
    ({"chip": "esp32c3", "meter.tx": 22},
     "config.json: meter.tx: GPIO22 does not exist on esp32c3"),
    ({"chip": "esp32c3", "meter": {"type": "atm90e32", "spi": 2}},
     "config.json: meter.spi: SPI(2) does not exist on esp32c3"),
    ({"chip": "esp32c3", "meter": {"type": "s0"}},
     "config.json: meter.type: s0 needs a hardware pulse counter (PCNT), which esp32c3 lacks"),
    ({"chip": "esp32s3", "meter": {"type": "s0", "pin": 30}},
     "config.json: meter.pin: GPIO30 is wired to the module's flash or PSRAM on esp32s3"),
    ({"meter.uart": 0}, "config.json: meter.uart: must be between 1 and 2"),
    ({"chip": "esp8266"}, "config.json: chip: must be one of"),
]


@pytest.mark.parametrize("chip", ["esp32", "esp32-wrover", "esp32s3", "esp32c3"])
@pytest.mark.parametrize("meter", ["sdm630", "s0", "atm90e32"])
def test_every_chips_default_pins_pass_its_own_checks(chip: str, meter: str) -> None:
    from mc import config

    if (chip, meter) == ("esp32c3", "s0"):
        pytest.skip("refused: no pulse counter on the C3")
    cfg = config.validate({"chip": chip, "meter_id": "m", "market": "m1", "meter.type": meter,
                           "broker.host": "b"})
    assert all(v != "chip default" for v in cfg.values())


@pytest.mark.parametrize(("change", "message"), BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_means_safe_mode_naming_the_key_under_cpython(
    make_board_dir, change: dict[str, Any], message: str
) -> None:
    import mcfakes
    from mc import app
    from mc.flash import Flash

    folder = make_board_dir(cfg=board_config(**change))
    broker = mcfakes.FakeBroker()
    board = mcfakes.FakeBoard(flash=Flash(str(folder)), broker=broker, echo=False)
    assert app.main(board, cycles=2) == 2
    safe = [line for line in board.console_lines if line.startswith("MC SAFE MODE")]
    assert safe and safe[0].startswith("MC SAFE MODE: " + message), board.console_lines
    assert broker.connects == 0 and broker.messages == [], "safe mode never publishes"


def test_safe_mode_under_micropython(mpy, make_board_dir, tmp_path: Path) -> None:
    folder = make_board_dir(cfg=board_config(**{"meter.baud": 9601}))
    out = run_app(mpy, folder, cycles=2)
    assert out["status"] == 2 and out["published"] == []
    assert out["console"][1].startswith("MC SAFE MODE: config.json: meter.baud: must be one of")
    no_key = run_app(mpy, make_board_dir("nokey", key=False), cycles=2)
    assert no_key["status"] == 2
    assert no_key["console"][1].startswith("MC SAFE MODE: key.bin: missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    blank = run_app(mpy, empty, cycles=1)
    assert blank["status"] == 2
    assert blank["console"][1].startswith("MC SAFE MODE: config.json: missing")


def test_long_outage_thins_the_spool_and_flags_the_overflow(make_board_dir) -> None:
    import mcfakes
    from mc.app import App
    from mc.config import load
    from mc.flash import Flash
    from mc.keystore import load as load_key

    from meterchain.reading import FLAG_SPOOL_OVERFLOW

    # A 10-minute outage grows the reconnect backoff; cap it well inside the drain
    # window below so the test is about thinning, not about when the jitter lands.
    cfg = board_config(
        **{"spool.max_records": 16, "spool.batch": 4, "broker.backoff_max_ms": 20_000}
    )
    folder = make_board_dir(cfg=cfg)
    flash = Flash(str(folder))
    broker = mcfakes.FakeBroker()
    broker.up = False
    board = mcfakes.FakeBoard(flash=flash, broker=broker, echo=False)
    application = App(board, load(flash), load_key(flash))
    application.run(cycles=40)
    assert application.spool.dropped > 0 and len(application.spool) <= 16
    broker.start()
    application.drain(120_000)
    registry = registry_for(folder, cfg)
    readings = [verify(p, registry) for _, p in broker.messages]
    assert len(readings) + application.spool.dropped == 40
    assert sum(1 for r in readings if r.flags & FLAG_SPOOL_OVERFLOW) >= 1
    # Thinning loses resolution, not energy: the newest reading carries the full register.
    assert readings[-1].seq == 40
    elapsed_s = readings[-1].time - 1767225600  # 39 intervals of 15 s since the first
    assert readings[-1].import_wh == 1234500 + round(1500 * elapsed_s / 3600)
    assert any("spool full" in line for line in board.console_lines)
