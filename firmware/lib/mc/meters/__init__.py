"""Meter drivers: each turns one kind of meter into cumulative Wh registers and average W.

Every driver has
    sample() -> (import_wh, export_wh, power_w, flags)   raises MeterError when it
                                                           cannot read the meter
    poll()      called between samples (keeps read-clear registers from overflowing)
    persist()   saves totals the board itself accumulates (S0, ATM90E32) to flash
A failed read is never papered over with a made-up value: the app turns MeterError
into a reading flagged FLAG_METER_READ_ERROR that repeats the last good registers.
Only the driver a board is configured for is imported.
"""


class MeterError(Exception):
    """The meter could not be read (timeout, CRC error, exception reply, implausible value)."""


def f32_scaled(hi: int, lo: int, scale: int) -> int:
    """round(value * scale) for the IEEE-754 float32 in two 16-bit words, in integers only.

    ESP32 MicroPython computes in single precision; decoding the bits exactly keeps the
    Wh the board signs identical to what a double-precision host would compute.
    Raises MeterError for NaN and infinity.
    """
    bits = (hi << 16) | lo
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    if exp == 0xFF:
        raise MeterError("register holds NaN or infinity")
    if exp:
        mant |= 0x800000
    else:
        exp = 1  # subnormal
    shift = exp - 150  # value = mant * 2**shift
    num = mant * scale
    if shift >= 0:
        mag = num << shift
    else:
        mag = (num + (1 << (-shift - 1))) >> -shift  # round half up
    return -mag if bits & 0x80000000 else mag


def make(board, cfg: dict, flash):
    """The driver for cfg["meter.type"], wired to the board's hardware."""
    kind = cfg["meter.type"]
    if kind in ("sdm120", "sdm630", "sim"):
        from .sdm import ModbusRtu, Sdm

        if kind == "sim":
            uart = board.sim_meter_uart(cfg)
        else:
            uart = board.uart(cfg["meter.uart"], cfg["meter.baud"], cfg["meter.tx"], cfg["meter.rx"],
                              cfg["meter.de"])
        bus = ModbusRtu(uart, board, cfg["meter.unit"], cfg["meter.timeout_ms"], cfg["meter.retries"],
                        cfg["meter.baud"])
        return Sdm(bus, "sdm120" if kind == "sdm120" else "sdm630")
    if kind == "s0":
        from .s0 import S0Meter

        counter = board.pulse_counter(cfg["meter.pin"], cfg["meter.filter_us"])
        return S0Meter(counter, flash, board, cfg["meter.pulses_per_kwh"], cfg["meter.direction"])
    if kind == "atm90e32":
        from .atm90e32 import CALIBRATION, Atm90e32

        spi, cs = board.spi(cfg["meter.spi"], cfg["meter.sck"], cfg["meter.mosi"], cfg["meter.miso"],
                            cfg["meter.cs"])
        cal = {}
        for name, _reg in CALIBRATION:
            value = cfg["meter." + name]
            if value >= 0:
                cal[name] = value
        return Atm90e32(spi, cs, flash, board, cfg["meter.constant"], cal)
    raise MeterError("unknown meter type %s" % kind)
