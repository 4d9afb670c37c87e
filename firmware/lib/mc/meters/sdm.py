"""Eastron SDM120 / SDM630 over Modbus RTU: function 04, float32 big-endian register pairs.

Layers: `crc16` (framing check) → `ModbusRtu` (one read-input-registers transaction
on a UART, with timeout, retries and a reason for every failure) → `Sdm` (the register
map, converted to integer Wh and W without floating point).

Framing on the bus (Modbus over serial line, V1.02, 2.5.1.1): a request starts only
after at least 3.5 character times of silence since the last frame (1.75 ms fixed above
19200 baud), or the meter takes it for the tail of the previous one.  An RS-485
transceiver whose receiver is always enabled hears our own request: an exact echo of it
before the reply is recognised and skipped.

Registers (0-based PDU addresses, Eastron's published tables; both models):
0x0048 import active energy kWh, 0x004A export active energy kWh; power is 0x000C
(SDM120 active power) or 0x0034 (SDM630 total system power), in W.
"""

import struct

from . import MeterError, f32_scaled

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


_FC_READ_INPUT = const(0x04)
_REG_ENERGY = const(0x0048)  # import kWh, export kWh: 4 registers
_REG_POWER_SDM120 = const(0x000C)
_REG_POWER_SDM630 = const(0x0034)
_MAX_REGS = const(8)
_SETTLE_MS = const(50)  # quiet time before a retry, so a late reply cannot pose as the next
_MAX_KWH_X1000 = const(10**12)  # 1 TWh: beyond that a register is garbage, not energy


def crc16(data, n: int) -> int:
    """Modbus CRC-16 (poly 0xA001 reflected, init 0xFFFF) of data[:n]."""
    crc = 0xFFFF
    for i in range(n):
        crc ^= data[i]
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xA001
            else:
                crc >>= 1
    return crc


class ModbusRtu:
    """Modbus RTU client transactions on one UART (`write`, `readinto`, `any`, `read`).

    `readinto(buf)` may return fewer bytes than asked, 0 or None (UART timeout); the
    transaction keeps its own deadline with the board's ticks.
    """

    def __init__(self, uart, board, unit: int, timeout_ms: int = 500, retries: int = 2,
                 baud: int = 9600) -> None:
        self._uart = uart
        self._board = board
        self.unit = unit
        self.timeout_ms = timeout_ms
        self.retries = retries
        # 3.5 characters of 11 bits, rounded up to whole ms, plus one: ticks_ms() only
        # says that at least (difference - 1) ms have passed.
        self.gap_ms = (38500 + baud - 1) // baud + 1 if baud <= 19200 else 3
        self._quiet_since = board.ticks_add(board.ticks_ms(), -self.gap_ms)
        self.echoes = 0  # requests heard back from our own transceiver
        self._req = bytearray(8)
        self._resp = bytearray(5 + 2 * _MAX_REGS)
        self._rv = memoryview(self._resp)
        self.errors = 0  # failed attempts over the driver's life (for diagnostics)
        self.last_error = ""

    def _drain(self) -> None:
        uart = self._uart
        while uart.any():
            uart.read()

    def _read_exact(self, start: int, end: int, deadline: int) -> None:
        board = self._board
        got = start
        while got < end:
            n = self._uart.readinto(self._rv[got:end])
            if n:
                got += n
                self._quiet_since = board.ticks_ms()
            elif board.ticks_diff(deadline, board.ticks_ms()) <= 0:
                raise MeterError("timeout (%d of %d bytes)" % (got, end))

    def _wait_gap(self) -> None:
        """Keep 3.5 characters of silence after the last frame on the bus."""
        board = self._board
        left = self.gap_ms - board.ticks_diff(board.ticks_ms(), self._quiet_since)
        if left > 0:
            board.sleep_ms(left)

    def _attempt(self, address: int, count: int):
        req = self._req
        struct.pack_into(">BBHH", req, 0, self.unit, _FC_READ_INPUT, address, count)
        struct.pack_into("<H", req, 6, crc16(req, 6))
        self._drain()
        self._wait_gap()
        self._uart.write(req)
        board = self._board
        self._quiet_since = board.ticks_ms()
        deadline = board.ticks_add(board.ticks_ms(), self.timeout_ms)
        resp = self._resp
        self._read_exact(0, 3, deadline)
        have = 3
        if resp[0] == req[0] and resp[1] == req[1] and resp[2] == req[2]:
            # Our own request (a receiver that is always on), or a reply whose byte count
            # equals our address's high byte: the next five bytes tell them apart.
            self._read_exact(3, 8, deadline)
            have = 8
            if resp[:8] == req:
                self.echoes += 1
                self._read_exact(0, 3, deadline)
                have = 3
            elif req[2] != 2 * count:
                raise MeterError("garbled echo of the request")
        if resp[0] != self.unit:
            raise MeterError("reply from unit %d, expected %d" % (resp[0], self.unit))
        if resp[1] == _FC_READ_INPUT | 0x80:
            self._read_exact(3, 5, deadline)
            if crc16(resp, 3) != resp[3] | (resp[4] << 8):
                raise MeterError("CRC error in exception reply")
            raise MeterError("exception code %d" % resp[2])
        if resp[1] != _FC_READ_INPUT:
            raise MeterError("reply with function 0x%02x" % resp[1])
        if resp[2] != 2 * count:
            raise MeterError("reply with %d data bytes, expected %d" % (resp[2], 2 * count))
        end = 3 + 2 * count
        self._read_exact(have, end + 2, deadline)
        if crc16(resp, end) != resp[end] | (resp[end + 1] << 8):
            raise MeterError("CRC error")
        return self._rv[3:end]

    def read_input(self, address: int, count: int):
        """Registers [address, address+count) as big-endian bytes (valid until the next call)."""
        if not 0 < count <= _MAX_REGS:
            raise ValueError("count must be 1..%d" % _MAX_REGS)
        tries = self.retries + 1
        while True:
            try:
                return self._attempt(address, count)
            except MeterError as exc:
                self.errors += 1
                self.last_error = str(exc)
                tries -= 1
                if not tries:
                    raise
                self._board.sleep_ms(_SETTLE_MS)


class Sdm:
    """An SDM120 or SDM630 on a `ModbusRtu` bus."""

    def __init__(self, bus: ModbusRtu, model: str = "sdm630") -> None:
        if model not in ("sdm120", "sdm630"):
            raise ValueError("model must be sdm120 or sdm630")
        self.bus = bus
        self.model = model
        self._power_reg = _REG_POWER_SDM120 if model == "sdm120" else _REG_POWER_SDM630
        self._power_sum = 0
        self._power_n = 0

    def _power(self) -> int:
        data = self.bus.read_input(self._power_reg, 2)
        hi, lo = struct.unpack(">HH", data)
        return f32_scaled(hi, lo, 1)

    def poll(self) -> None:
        """Take an intermediate power sample so sample() can report the interval's average."""
        try:
            self._power_sum += self._power()
            self._power_n += 1
        except MeterError:
            pass  # a missed intermediate sample only coarsens the average

    def sample(self):
        """(import Wh, export Wh, average W, 0); MeterError if any register read fails."""
        data = self.bus.read_input(_REG_ENERGY, 4)
        ih, il, eh, el = struct.unpack(">HHHH", data)
        import_wh = f32_scaled(ih, il, 1000)
        export_wh = f32_scaled(eh, el, 1000)
        if not (0 <= import_wh < _MAX_KWH_X1000 and 0 <= export_wh < _MAX_KWH_X1000):
            raise MeterError("energy register out of range")
        total = self._power_sum + self._power()
        n = self._power_n + 1
        self._power_sum = 0
        self._power_n = 0
        # Integer average, rounded half away from zero.
        power = (total + n // 2) // n if total >= 0 else -((-total + n // 2) // n)
        return import_wh, export_wh, power, 0

    def persist(self) -> None:
        """Nothing to save: the meter keeps its own registers."""
