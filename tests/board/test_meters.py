"""Meter drivers against simulated hardware: SDM Modbus framing, S0 pulses, ATM90E32 over SPI."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import mcfakes
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mc.flash import Flash
from mc.meters import MeterError, f32_scaled
from mc.meters.atm90e32 import Atm90e32
from mc.meters.s0 import EdgeCounter, S0Meter, WrapCounter
from mc.meters.sdm import ModbusRtu, Sdm, crc16
from pymodbus.framer.rtu import FramerRTU


@settings(max_examples=300, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False), st.sampled_from([1, 1000]))
def test_float32_to_integer_is_exact(value: float, scale: int) -> None:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    exact = value * scale  # a float32 times 1000 is exact in a double
    expected = math.floor(abs(exact) + 0.5) * (1 if exact >= 0 else -1)
    assert f32_scaled(hi, lo, scale) == expected


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7F800000, 0xFF800000])
def test_nan_and_infinity_are_meter_errors(bits: int) -> None:
    with pytest.raises(MeterError, match="NaN or infinity"):
        f32_scaled(bits >> 16, bits & 0xFFFF, 1000)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=64))
def test_crc16_matches_pymodbus(data: bytes) -> None:
    ours = crc16(data, len(data))
    assert FramerRTU.compute_CRC(data) == ((ours & 0xFF) << 8) | (ours >> 8)


def _sdm(board: mcfakes.FakeBoard, model: str = "sdm630", retries: int = 2) -> Sdm:
    uart = board.sim_meter_uart({"meter.unit": 7})
    board.meter.model = model
    return Sdm(ModbusRtu(uart, board, unit=7, timeout_ms=200, retries=retries), model)


@pytest.mark.parametrize("model", ["sdm630", "sdm120"])
def test_sdm_reads_registers_and_averages_power(model: str) -> None:
    board = mcfakes.FakeBoard(echo=False, meter_power_w=2000)
    sdm = _sdm(board, model)
    board.sleep_ms(5000)
    sdm.poll()
    board.meter.set_power(-1000)  # the site starts exporting
    board.sleep_ms(5000)
    import_wh, export_wh, power, flags = sdm.sample()
    assert power == 500  # mean of 2000 and -1000
    assert flags == 0
    # The meter shows float32 kWh; the board turns them into Wh exactly.
    assert import_wh == _register_wh(board.meter.import_mwh) == 1234503
    assert export_wh == _register_wh(board.meter.export_mwh) == 56701


def _register_wh(mwh: int) -> int:
    (kwh,) = struct.unpack(">f", struct.pack(">f", mwh / 1e6))
    return math.floor(kwh * 1000 + 0.5)


def test_sdm_retries_a_crc_error_then_reports_a_persistent_one() -> None:
    board = mcfakes.FakeBoard(echo=False)
    sdm = _sdm(board)
    board.meter_uart.corrupt_next(1)
    sdm.sample()  # the retry succeeds
    assert sdm.bus.errors == 1
    assert "CRC" in sdm.bus.last_error
    board.meter_uart.corrupt_next(3)  # every attempt of the next read
    with pytest.raises(MeterError):
        sdm.sample()


def test_sdm_timeout_is_a_meter_error_within_the_deadline() -> None:
    board = mcfakes.FakeBoard(echo=False)
    sdm = _sdm(board, retries=1)
    board.meter_uart.drop_next(2)
    start = board.ticks_ms()
    with pytest.raises(MeterError, match="timeout"):
        sdm.sample()
    elapsed = board.ticks_ms() - start
    assert 2 * 200 <= elapsed < 2 * 200 + 200, "two attempts of 200 ms each, plus settle time"


def test_sdm_exception_reply_is_reported() -> None:
    board = mcfakes.FakeBoard(echo=False)
    uart = board.sim_meter_uart({"meter.unit": 1})
    bus = ModbusRtu(uart, board, unit=1, timeout_ms=100, retries=0)
    with pytest.raises(MeterError, match="exception code 2"):
        bus.read_input(0x0400, 2)  # unmapped register block


def test_sdm_wrong_unit_does_not_answer() -> None:
    board = mcfakes.FakeBoard(echo=False)
    uart = board.sim_meter_uart({"meter.unit": 1})
    bus = ModbusRtu(uart, board, unit=2, timeout_ms=100, retries=0)
    with pytest.raises(MeterError, match="timeout"):
        bus.read_input(0x0048, 4)


# -- S0 -------------------------------------------------------------------------


def test_scheduled_edges_that_run_back_to_back_all_count() -> None:
    # The ESP32 port queues pin IRQ handlers (8 deep) while the firmware blocks: when they
    # finally run, they run microseconds apart.  Every one is a real pulse.
    counter = EdgeCounter()
    for _ in range(8):
        counter.edge(None)
    assert counter.count == 8


def test_wrapping_hardware_counter_gives_a_running_total() -> None:
    hw = {"value": 31990}
    counter = WrapCounter(lambda: hw["value"], 32000)
    assert counter.count == 0
    hw["value"] = 5  # 15 pulses: 31990 -> 31999, wrap to 0, -> 5
    assert counter.count == 15
    hw["value"] = 31999
    assert counter.count == 15 + 31994
    hw["value"] = 31999
    assert counter.count == 15 + 31994, "no pulse, no count"


def test_s0_poll_reads_a_wrapping_counter_often_enough(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    board = mcfakes.FakeBoard(flash=flash, echo=False)
    hw = {"value": 0}
    meter = S0Meter(WrapCounter(lambda: hw["value"], 32000), flash, board, pulses_per_kwh=1000)
    for _ in range(10):  # 10 x 20000 pulses an hour, polled in between: six wraps
        hw["value"] = (hw["value"] + 20000) % 32000
        meter.poll()
        board.sleep_ms(3_600_000)
    import_wh, _, power, flags = meter.sample()
    assert (import_wh, power, flags) == (200_000, 20_000, 0)


def test_s0_total_survives_reboots_and_never_double_counts(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    board = mcfakes.FakeBoard(flash=flash, echo=False)
    counter = board.pulse_counter(4, 20)
    meter = S0Meter(counter, flash, board, pulses_per_kwh=800)
    for _ in range(1600):  # 2 kWh at 800 imp/kWh, over one hour
        board.sleep_ms(2250)
        counter.edge(None)
    import_wh, export_wh, power, flags = meter.sample()
    assert (import_wh, export_wh, flags) == (2000, 0, 0)
    assert power == 2000  # 2 kWh in one hour
    meter.persist()
    # Reboot: a new counter starts at zero, the total resumes from flash.
    board2 = mcfakes.FakeBoard(flash=flash, echo=False)
    counter2 = board2.pulse_counter(4, 20)
    meter2 = S0Meter(counter2, flash, board2, pulses_per_kwh=800)
    for _ in range(8):
        board2.sleep_ms(1000)
        counter2.edge(board2.ticks_ms())
    assert meter2.sample()[0] == 2010
    # Pulses after the last save are lost on a power cut, never counted twice.
    meter3 = S0Meter(board2.pulse_counter(4, 20), flash, board2, pulses_per_kwh=800)
    assert meter3.sample()[0] == 2000


def test_s0_export_direction_and_implausible_rate_flags_tamper(tmp_path: Path) -> None:
    from mc.reading import FLAG_TAMPER

    board = mcfakes.FakeBoard(flash=Flash(str(tmp_path)), echo=False)
    counter = board.pulse_counter(4, 1)
    meter = S0Meter(counter, board.flash, board, pulses_per_kwh=1000, direction="export")
    for _ in range(10):
        board.sleep_ms(1000)
        counter.edge(None)
    assert meter.sample() == (0, 10, -3600, 0)
    for _ in range(2000):  # 2 kWh in 4 s: a noisy line, not a meter
        board.sleep_ms(2)
        counter.edge(None)
    assert meter.sample()[3] == FLAG_TAMPER


# -- ATM90E32 -------------------------------------------------------------------


def test_atm90e32_accumulates_read_clear_registers_and_persists(tmp_path: Path) -> None:
    flash = Flash(str(tmp_path))
    chip = mcfakes.FakeAtm90e32Spi()
    meter = Atm90e32(chip, chip.cs, flash, None, constant=3200)
    chip.add_energy(forward=32000, reverse=3200)  # 100 Wh in, 10 Wh out
    chip.set_power(-31250)  # -10 W
    assert meter.sample() == (100, 10, -10, 0)
    chip.add_energy(forward=60000)
    meter.poll()  # folded in before the 16-bit register could wrap
    chip.add_energy(forward=60000)
    assert meter.sample()[0] == 100 + 375
    meter.persist()
    again = Atm90e32(chip, chip.cs, flash, None, constant=3200)
    assert again.sample()[:2] == (475, 10)


CALIBRATION = {"mmode0": 0x0187, "mmode1": 0x002A, "ugain_a": 0xA4B1, "igain_a": 0x7A30,
               "pqgain_a": 0x0102, "phi_a": 0x0007, "poffset_a": 0xFFDC}


def test_atm90e32_writes_its_calibration_at_start_and_after_a_chip_reset(tmp_path: Path) -> None:
    from mc.meters.atm90e32 import CALIBRATION as REGISTERS
    from mc.reading import FLAG_METER_READ_ERROR

    chip = mcfakes.FakeAtm90e32Spi()
    meter = Atm90e32(chip, chip.cs, Flash(str(tmp_path)), None, 3200, CALIBRATION)
    assert meter.sample()[3] == 0
    regs = dict(REGISTERS)
    for name, value in CALIBRATION.items():
        assert chip.regs[regs[name]] == value, name
    assert (chip.regs[0x31] << 16) | chip.regs[0x32] == 140_625_000, "PLconst for 3200 imp/kWh"
    assert chip.regs[0x7F] == 0, "configuration locked again"
    chip.power_cycle()  # the chip browned out: its registers are back to reset values
    chip.add_energy(forward=3200)
    assert meter.sample()[3] == FLAG_METER_READ_ERROR and meter.resets == 1
    assert chip.regs[regs["ugain_a"]] == 0xA4B1 and chip.regs[0x7F] == 0
    assert meter.sample()[3] == 0


def test_atm90e32_calibration_keys_match_the_drivers_registers() -> None:
    from mc import config
    from mc.meters.atm90e32 import CALIBRATION as REGISTERS

    cfg = config.validate({"meter_id": "m", "market": "m1", "meter.type": "atm90e32",
                           "broker.host": "b", "meter.ugain_a": 0xA4B1})
    assert {k[6:] for k in cfg if k.startswith("meter.") and cfg[k] == -1} | {"ugain_a"} == {
        name for name, _ in REGISTERS
    }


def test_atm90e32_missing_chip_is_a_meter_error(tmp_path: Path) -> None:
    chip = mcfakes.FakeAtm90e32Spi()
    chip.present = False
    meter = Atm90e32(chip, chip.cs, Flash(str(tmp_path)), None)
    with pytest.raises(MeterError, match="not responding"):
        meter.sample()


@pytest.mark.parametrize("baud", [2400, 9600, 19200, 115200])
def test_requests_keep_three_and_a_half_characters_of_silence(baud: int) -> None:
    board = mcfakes.FakeBoard(echo=False)
    meter = mcfakes.SimulatedSdm(board, unit=1)
    uart = mcfakes.SdmUart(meter, board, baud=baud)
    sdm = Sdm(ModbusRtu(uart, board, unit=1, timeout_ms=500, retries=0, baud=baud), "sdm630")
    for _ in range(20):
        sdm.poll()
        sdm.sample()  # energy and power back to back: two transactions
    assert uart.merged == 0 and sdm.bus.errors == 0
    # Without the gap the second request runs into the first reply: the meter ignores it.
    hasty = ModbusRtu(uart, board, unit=1, timeout_ms=100, retries=0, baud=baud)
    hasty.gap_ms = 0
    board.sleep_ms(100)
    hasty.read_input(0x0048, 4)
    with pytest.raises(MeterError, match="timeout"):
        hasty.read_input(0x0034, 2)
    assert uart.merged == 1


def test_echo_of_an_always_on_receiver_is_skipped() -> None:
    board = mcfakes.FakeBoard(echo=False, meter_power_w=1200)
    meter = mcfakes.SimulatedSdm(board, unit=3, power_w=1200)
    uart = mcfakes.SdmUart(meter, board, echo=True)
    bus = ModbusRtu(uart, board, unit=3, timeout_ms=300, retries=0)
    import_wh, export_wh, power, _ = Sdm(bus, "sdm630").sample()
    assert power == 1200 and import_wh == 1234500 and bus.echoes == 2 and bus.errors == 0


def test_garbled_echo_is_a_meter_error() -> None:
    board = mcfakes.FakeBoard(echo=False)
    uart = mcfakes.SdmUart(mcfakes.SimulatedSdm(board, unit=3), board, echo=True)
    bus = ModbusRtu(uart, board, unit=3, timeout_ms=300, retries=0)
    real_write = uart.write

    def garble(buf) -> int:
        n = real_write(buf)
        uart._segments[0][1][5] ^= 0xFF  # a bit error in the echoed count
        return n

    uart.write = garble  # type: ignore[method-assign]
    with pytest.raises(MeterError, match="garbled echo"):
        bus.read_input(0x0048, 4)
