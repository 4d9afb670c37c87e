"""The Eastron SDM630 input-register map and its float32 word format, shared by poller and emulator.

Addresses follow Eastron's published "SDM630 Modbus protocol" table (function
code 04, input registers, 0-based PDU addresses; the manual's 3xxxx numbers
are these plus 30001). Every value is an IEEE-754 float32 in two registers,
big-endian with the high word first.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

# name -> PDU address of the first of two registers
INPUT_REGISTERS: dict[str, int] = {
    "l1_voltage_v": 0x0000,
    "l2_voltage_v": 0x0002,
    "l3_voltage_v": 0x0004,
    "l1_current_a": 0x0006,
    "l2_current_a": 0x0008,
    "l3_current_a": 0x000A,
    "l1_power_w": 0x000C,
    "l2_power_w": 0x000E,
    "l3_power_w": 0x0010,
    "l1_apparent_power_va": 0x0012,
    "l2_apparent_power_va": 0x0014,
    "l3_apparent_power_va": 0x0016,
    "l1_reactive_power_var": 0x0018,
    "l2_reactive_power_var": 0x001A,
    "l3_reactive_power_var": 0x001C,
    "l1_power_factor": 0x001E,
    "l2_power_factor": 0x0020,
    "l3_power_factor": 0x0022,
    "l1_phase_angle_deg": 0x0024,
    "l2_phase_angle_deg": 0x0026,
    "l3_phase_angle_deg": 0x0028,
    "average_voltage_v": 0x002A,
    "average_current_a": 0x002E,
    "sum_current_a": 0x0030,
    "total_power_w": 0x0034,
    "total_apparent_power_va": 0x0038,
    "total_reactive_power_var": 0x003C,
    "total_power_factor": 0x003E,
    "total_phase_angle_deg": 0x0042,
    "frequency_hz": 0x0046,
    "import_kwh": 0x0048,
    "export_kwh": 0x004A,
    "import_kvarh": 0x004C,
    "export_kvarh": 0x004E,
    "total_system_power_demand_w": 0x0054,
    "l1_l2_voltage_v": 0x00C8,
    "l2_l3_voltage_v": 0x00CA,
    "l3_l1_voltage_v": 0x00CC,
    "average_line_voltage_v": 0x00CE,
    "neutral_current_a": 0x00E0,
    "total_kwh": 0x0156,
    "total_kvarh": 0x0158,
}

# One request covers every value the agent needs for a reading (voltages up to
# export energy): 0x0000..0x004B is 76 registers, under Modbus's 125 limit.
POLL_START = 0x0000
POLL_COUNT = 0x004C


def encode_float32(value: float) -> tuple[int, int]:
    """Two registers (high word first) holding `value` as a big-endian float32."""
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return hi, lo


def decode_float32(registers: Sequence[int], offset: int) -> float:
    """The float32 stored big-endian, high word first, at `registers[offset:offset + 2]`."""
    raw = struct.pack(">HH", registers[offset], registers[offset + 1])
    return float(struct.unpack(">f", raw)[0])


def kwh_to_wh(kwh: float) -> int:
    """Integer Wh from a kWh register, rounded half away from zero.

    Raises ValueError for NaN or infinity (a meter fault, not a measurement).
    """
    if not math.isfinite(kwh):
        raise ValueError(f"energy register is not a finite number: {kwh!r}")
    wh = kwh * 1000.0
    return int(math.floor(wh + 0.5)) if wh >= 0 else -int(math.floor(-wh + 0.5))


def decode_block(registers: Sequence[int], start: int = POLL_START) -> dict[str, float]:
    """Every mapped value that lies fully inside a block read from address `start`."""
    values: dict[str, float] = {}
    end = start + len(registers)
    for name, address in INPUT_REGISTERS.items():
        if start <= address and address + 2 <= end:
            values[name] = decode_float32(registers, address - start)
    return values
