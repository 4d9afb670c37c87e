"""A meter reading as the deterministic CBOR map the board signs (DESIGN.md wire format).

    {1: meter id (text), 2: sequence (uint), 3: time (uint, Unix s),
     4: imported energy (uint Wh, cumulative), 5: exported energy (uint Wh, cumulative),
     6: average active power (int W), 7: status flags (uint), 8: source type (text)}

The flag bits and source types are shared with the CPython core (meterchain/reading.py
defines the same values); change them only together.
"""

from . import cbor

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


# Status flag bits (key 7).
FLAG_CLOCK_NOT_SYNCED = const(1 << 0)
FLAG_METER_READ_ERROR = const(1 << 1)
FLAG_COUNTER_RESET = const(1 << 2)
FLAG_TAMPER = const(1 << 3)
FLAG_SPOOL_OVERFLOW = const(1 << 4)
FLAG_GATEWAY_ATTESTED = const(1 << 5)
FLAGS_KNOWN = const(0x3F)  # every bit above; others are refused so typos cannot ship

# Source types (key 8).
SOURCES = ("pv", "wind", "hydro", "biomass", "load", "bidir", "storage", "chp")

# Map keys.
KEY_METER_ID = const(1)
KEY_SEQ = const(2)
KEY_TIME = const(3)
KEY_IMPORT_WH = const(4)
KEY_EXPORT_WH = const(5)
KEY_POWER_W = const(6)
KEY_FLAGS = const(7)
KEY_SOURCE = const(8)

METER_ID_MAX_CHARS = const(64)
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"
_ID_RULE = "A-Z a-z 0-9 _ . : -"
_UINT64_LIMIT = const(0x10000000000000000)  # 2**64
# The verifiers' sanity bound on average power, 10 MW either way (the same constant as
# meterchain.reading.MAX_POWER_W; a test keeps them equal).  The app clamps a meter's
# larger value to it and flags the reading FLAG_METER_READ_ERROR.
MAX_POWER_W = const(10000000)


def _uint(name: str, value: object) -> int:
    # bool is an int subclass; True as a sequence number is a bug, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < _UINT64_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def _meter_id(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"meter_id must be a str, got {type(value).__name__}")
    # The id is an MQTT topic level (mc/<market>/r/<meter_id>), an ACL user name and the
    # COSE kid: the same rule as the core's registry and the board's config.
    if not 0 < len(value) <= METER_ID_MAX_CHARS or any(c not in _ID_CHARS for c in value):
        raise ValueError(f"meter_id must be 1-{METER_ID_MAX_CHARS} characters of {_ID_RULE}")
    return value


def encode(
    meter_id: str,
    seq: int,
    time: int,
    import_wh: int,
    export_wh: int,
    power_w: int,
    flags: int,
    source: str,
) -> bytes:
    """Deterministic CBOR bytes of one reading; ValueError naming the first bad field.

    Energy in Wh (cumulative registers), power in W (signed: negative means export, at
    most MAX_POWER_W either way),
    time in Unix seconds, flags a bit set of the FLAG_* constants, source one of SOURCES.
    """
    _meter_id(meter_id)
    _uint("seq", seq)
    _uint("time", time)
    _uint("import_wh", import_wh)
    _uint("export_wh", export_wh)
    if not isinstance(power_w, int) or isinstance(power_w, bool):
        raise ValueError(f"power_w must be an int, got {type(power_w).__name__}")
    if not -MAX_POWER_W <= power_w <= MAX_POWER_W:
        raise ValueError(f"power_w must be within +/-{MAX_POWER_W} W (10 MW), got {power_w}")
    if _uint("flags", flags) & ~FLAGS_KNOWN:
        raise ValueError(f"flags has unknown bits {flags & ~FLAGS_KNOWN:#x}")
    if source not in SOURCES:
        raise ValueError("source must be one of {}, got {!r}".format(", ".join(SOURCES), source))
    return cbor.encode(
        {
            KEY_METER_ID: meter_id,
            KEY_SEQ: seq,
            KEY_TIME: time,
            KEY_IMPORT_WH: import_wh,
            KEY_EXPORT_WH: export_wh,
            KEY_POWER_W: power_w,
            KEY_FLAGS: flags,
            KEY_SOURCE: source,
        }
    )
