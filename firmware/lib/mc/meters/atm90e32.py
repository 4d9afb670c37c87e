"""Microchip ATM90E32 poly-phase energy-metering IC over SPI (mode 3, <= 200 kHz).

A register access is a 16-bit address word (bit 15 set for a read) followed by a
16-bit data word, both MSB first, framed by chip select.  The total energy registers
APenergyT (0x80, forward) and ANenergyT (0x84, reverse) count in 0.01 CF and clear on
read, so this driver accumulates them into lifetime totals kept in a crash-safe slot
store; 1 CF = 1/constant kWh (constant = the IC's meter constant, 3200 imp/kWh by
default), so one count is 10/constant Wh.  PmeanT/PmeanTLSB (0xB0/0xC0) is the total
active power, 0.00032 W per count, signed.  Calibration (gains, offsets) is the
installer's job and is left as configured; the driver enables metering and checks the
chip answers.
"""

from ..slots import SlotStore
from . import MeterError

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


_METER_EN = const(0x00)
_CFG_REG_ACC_EN = const(0x7F)
_APENERGY_T = const(0x80)
_ANENERGY_T = const(0x84)
_PMEAN_T = const(0xB0)
_PMEAN_T_LSB = const(0xC0)
_UNLOCK = const(0x55AA)


class Atm90e32:
    def __init__(self, spi, cs, flash, board, constant: int = 3200) -> None:
        self._spi = spi
        self._cs = cs
        self._board = board
        self._constant = constant
        self._tx = bytearray(2)
        self._rx = bytearray(2)
        self._store = SlotStore(flash, "atm")
        stored = self._store.values
        self._imp = stored[0] if stored else 0  # lifetime counts of 0.01 CF
        self._exp = stored[1] if stored else 0
        self._saved = (self._imp, self._exp)
        self._ready = False
        cs(1)

    def _access(self, address: int, value: int, read: bool) -> int:
        tx = self._tx
        tx[0] = (0x80 if read else 0) | ((address >> 8) & 0x03)
        tx[1] = address & 0xFF
        self._cs(0)
        try:
            self._spi.write(tx)
            if read:
                self._spi.readinto(self._rx, 0xFF)
                return (self._rx[0] << 8) | self._rx[1]
            tx[0] = value >> 8
            tx[1] = value & 0xFF
            self._spi.write(tx)
            return value
        finally:
            self._cs(1)

    def _read(self, address: int) -> int:
        return self._access(address, 0, True)

    def _write(self, address: int, value: int) -> None:
        self._access(address, value, False)

    def _init(self) -> None:
        self._write(_CFG_REG_ACC_EN, _UNLOCK)
        self._write(_METER_EN, 1)
        # A missing chip reads as all ones (MISO pulled up) or all zeros.
        if self._read(_METER_EN) != 1:
            raise MeterError("ATM90E32 not responding on SPI")
        self._ready = True

    def poll(self) -> None:
        """Fold the read-clear energy counters into the totals (call often enough that a
        16-bit counter cannot wrap: 65535 counts are 204 Wh at the default constant)."""
        if not self._ready:
            self._init()
        self._imp += self._read(_APENERGY_T)
        self._exp += self._read(_ANENERGY_T)

    def sample(self):
        """(import Wh, export Wh, power W, 0); MeterError when the chip does not answer."""
        self.poll()
        raw = (self._read(_PMEAN_T) << 16) | self._read(_PMEAN_T_LSB)
        if raw & 0x80000000:
            raw -= 0x100000000
        # 0.00032 W per count = 32 / 100000, rounded half away from zero.
        power = (raw * 32 + 50000) // 100000 if raw >= 0 else -((-raw * 32 + 50000) // 100000)
        k = self._constant
        return self._imp * 10 // k, self._exp * 10 // k, power, 0

    def persist(self) -> None:
        totals = (self._imp, self._exp)
        if totals != self._saved:
            self._store.save(totals)
            self._saved = totals
