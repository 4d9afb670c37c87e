"""Microchip ATM90E32 poly-phase energy-metering IC over SPI (mode 3, <= 200 kHz).

A register access is a 16-bit address word (bit 15 set for a read) followed by a
16-bit data word, both MSB first, framed by chip select.  The total energy registers
APenergyT (0x80, forward) and ANenergyT (0x84, reverse) count in 0.01 CF and clear on
read, so this driver accumulates them into lifetime totals kept in a crash-safe slot
store; 1 CF = 1/constant kWh (constant = the IC's meter constant, 3200 imp/kWh by
default), so one count is 10/constant Wh.  PmeanT/PmeanTLSB (0xB0/0xC0) is the total
active power, 0.00032 W per count, signed.

Calibration lives in the chip's registers, not in non-volatile memory: after every power
cycle (or a brownout of the chip alone) they hold their reset defaults.  So at start-up,
and whenever a check register no longer holds what was written, the driver unlocks the
configuration registers (CfgRegAccEn = 0x55AA), writes the PL constant derived from the
meter constant (PLconst = 4.5e11 / imp per kWh) and every calibration value the config
gives (`CALIBRATION`: mode, offsets, gains, phase angles), reads each one back, and locks
them again (CfgRegAccEn = 0).  The ATM90E32 has no checksum registers (unlike the
ATM90E26/E36); the read-back is the check.  A re-initialisation after a chip reset flags
the next reading FLAG_METER_READ_ERROR: energy counted since the last poll was lost.
"""

from ..reading import FLAG_METER_READ_ERROR as _FLAG_METER_READ_ERROR
from ..slots import SlotStore
from . import MeterError

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


_METER_EN = const(0x00)
_PL_CONST_H = const(0x31)
_PL_CONST_L = const(0x32)
_CFG_REG_ACC_EN = const(0x7F)
_LOCK = const(0x0000)
_APENERGY_T = const(0x80)
_ANENERGY_T = const(0x84)
_PMEAN_T = const(0xB0)
_PMEAN_T_LSB = const(0xC0)
_UNLOCK = const(0x55AA)
_PL_NUMERATOR = const(450000000000)

# config.json key (meter.<name>) -> register, in the order the datasheet lists them.
CALIBRATION = (
    ("mmode0", 0x33), ("mmode1", 0x34),
    ("poffset_a", 0x41), ("poffset_b", 0x43), ("poffset_c", 0x45),
    ("pqgain_a", 0x47), ("phi_a", 0x48), ("pqgain_b", 0x49), ("phi_b", 0x4A),
    ("pqgain_c", 0x4B), ("phi_c", 0x4C),
    ("ugain_a", 0x61), ("igain_a", 0x62), ("ugain_b", 0x65), ("igain_b", 0x66),
    ("ugain_c", 0x69), ("igain_c", 0x6A),
)


class Atm90e32:
    """`calibration` maps names of CALIBRATION to register values (absent: chip default)."""

    def __init__(self, spi, cs, flash, board, constant: int = 3200, calibration=None) -> None:
        self._spi = spi
        self._cs = cs
        self._board = board
        self._constant = constant
        pl = _PL_NUMERATOR // constant
        writes = [(_PL_CONST_H, pl >> 16), (_PL_CONST_L, pl & 0xFFFF)]
        cal = calibration or {}
        for name, reg in CALIBRATION:
            if name in cal:
                writes.append((reg, cal[name]))
        self._writes = writes
        self.resets = 0  # chip resets seen (calibration found lost and written again)
        self._flags = 0
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
        for reg, value in self._writes:
            self._write(reg, value)
        # A missing chip reads as all ones (MISO pulled up) or all zeros.
        if self._read(_METER_EN) != 1:
            raise MeterError("ATM90E32 not responding on SPI")
        for reg, value in self._writes:
            if self._read(reg) != value:
                raise MeterError("ATM90E32 register 0x%02x did not take its calibration" % reg)
        self._write(_CFG_REG_ACC_EN, _LOCK)
        self._ready = True

    def _check(self) -> None:
        """Calibrate at the first use, and again if the chip lost its registers."""
        if not self._ready:
            self._init()
            return
        reg, value = self._writes[-1]
        if self._read(reg) != value:
            self.resets += 1
            self._flags = _FLAG_METER_READ_ERROR
            self._ready = False
            self._init()

    def poll(self) -> None:
        """Fold the read-clear energy counters into the totals (call often enough that a
        16-bit counter cannot wrap: 65535 counts are 204 Wh at the default constant)."""
        self._check()
        self._imp += self._read(_APENERGY_T)
        self._exp += self._read(_ANENERGY_T)

    def sample(self):
        """(import Wh, export Wh, power W, flags); MeterError when the chip does not answer."""
        self.poll()
        raw = (self._read(_PMEAN_T) << 16) | self._read(_PMEAN_T_LSB)
        if raw & 0x80000000:
            raw -= 0x100000000
        # 0.00032 W per count = 32 / 100000, rounded half away from zero.
        power = (raw * 32 + 50000) // 100000 if raw >= 0 else -((-raw * 32 + 50000) // 100000)
        k = self._constant
        flags = self._flags
        self._flags = 0
        return self._imp * 10 // k, self._exp * 10 // k, power, flags

    def persist(self) -> None:
        totals = (self._imp, self._exp)
        if totals != self._saved:
            self._store.save(totals)
            self._saved = totals
