"""The firmware's SDM driver against a pymodbus RTU server over a pseudo-terminal pair.

The meter is `hil.emulated_meter`'s SDM630 (pymodbus, RTU framer) on one end of a
`NullModem` (two ptys joined by a relay that can corrupt or drop bytes); the board
side is the unchanged firmware driver on a pyserial-backed UART.  CRC errors and
timeouts must give a flagged reading, never a crash and never a made-up value.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import board_config, public_key_of
from mc.app import App
from mc.config import load
from mc.flash import Flash
from mc.keystore import load as load_key
from mc.meters import MeterError
from mc.meters.sdm import ModbusRtu, Sdm

from edge_agent.sdm630 import kwh_to_wh
from hil.emulated_meter import MeterThread, NullModem
from meterchain.board.emulated import EmulatedBoard, SerialUart
from meterchain.reading import FLAG_METER_READ_ERROR, verify
from meterchain.registry import Registry


@pytest.fixture
def rtu_meter() -> Iterator[tuple[MeterThread, NullModem]]:
    modem = NullModem()
    meter = MeterThread(serial_port=modem.port_a, baudrate=19200, unit=1, profile="load", seed=3)
    meter.start()
    try:
        yield meter, modem
    finally:
        meter.stop()
        modem.close()


# Reply to "read 4 input registers": unit, function, byte count, 8 data bytes, CRC.
_ENERGY_REPLY = 3 + 8 + 2


class FlippingUart(SerialUart):
    """The pty UART with a manipulator: flip byte `index` of the next `replies` replies."""

    def __init__(self, port: str, baud: int) -> None:
        super().__init__(port, baud)
        self.index = 0
        self.replies = 0
        self._pos = 0

    def write(self, buf: bytes | bytearray | memoryview) -> int:
        self._pos = 0  # a request starts a new reply
        return super().write(buf)

    def readinto(self, buf: memoryview | bytearray) -> int | None:
        n = super().readinto(buf)
        if n and self.replies and self._pos <= self.index < self._pos + n:
            buf[self.index - self._pos] ^= 0x10
            self.replies -= 1
        self._pos += n or 0
        return n


def _float32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


def test_driver_reads_the_pymodbus_meter_over_a_pty(rtu_meter, tmp_path: Path) -> None:
    meter, modem = rtu_meter
    board = EmulatedBoard(tmp_path / "b", settings={"meter": "none", "ntp": True, "wifi": True})
    uart = FlippingUart(modem.port_b, 19200)
    try:
        sdm = Sdm(ModbusRtu(uart, board, unit=1, timeout_ms=500, retries=2), "sdm630")
        meter.freeze()  # hold the registers still while we compare
        values = meter.values()
        import_wh, export_wh, power_w, flags = sdm.sample()
        assert import_wh == kwh_to_wh(_float32(values["import_kwh"]))
        assert export_wh == kwh_to_wh(_float32(values["export_kwh"]))
        assert power_w == round(_float32(values["total_power_w"]))
        assert flags == 0

        uart.index, uart.replies = 5, 3  # a data byte of all three attempts' replies
        with pytest.raises(MeterError, match="CRC error"):
            sdm.sample()
        modem.corrupt(3 * _ENERGY_REPLY)  # line noise from the first byte on
        with pytest.raises(MeterError, match="reply from unit"):
            sdm.sample()
        time.sleep(0.2)
        modem.cut()  # a loose RS-485 terminal: no reply at all
        with pytest.raises(MeterError, match="timeout"):
            sdm.sample()
        modem.mend()
        assert sdm.sample()[0] == import_wh, "the driver recovers once the line is good"
    finally:
        uart.close()
        board.close()


def test_app_flags_crc_errors_and_timeouts_and_keeps_running(
    rtu_meter, make_board_dir, tmp_path: Path
) -> None:
    meter, modem = rtu_meter
    cfg = board_config(**{"meter.baud": 19200, "meter.timeout_ms": 200, "meter.retries": 1})
    folder = make_board_dir(cfg=cfg)
    settings = {"meter": f"serial:{modem.port_b}", "ntp": True, "wifi": False}
    board = EmulatedBoard(folder, settings=settings)
    try:
        application = App(board, load(Flash(str(folder))), load_key(Flash(str(folder))))
        registry = Registry()
        registry.add(cfg["meter_id"], public_key_of(folder), "mg1", cfg["source"])

        def reading(seq: int):
            return verify(bytes(application.spool.payload(seq)), registry)

        first = reading(application.sample())
        modem.corrupt(2 * _ENERGY_REPLY)  # both attempts of the energy read
        bad_crc = reading(application.sample())
        time.sleep(0.3)
        modem.cut()
        timed_out = reading(application.sample())
        modem.mend()
        time.sleep(0.3)
        good_again = reading(application.sample())
    finally:
        board.close()
    assert not first.flags & FLAG_METER_READ_ERROR
    for flagged in (bad_crc, timed_out):
        assert flagged.flags & FLAG_METER_READ_ERROR
        # No made-up values: the last good registers, and no claim about power.
        assert (flagged.import_wh, flagged.export_wh, flagged.power_w) == (
            first.import_wh,
            first.export_wh,
            0,
        )
    assert not good_again.flags & FLAG_METER_READ_ERROR
    assert good_again.import_wh >= first.import_wh
    assert application.read_errors == 2
