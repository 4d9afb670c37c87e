"""Readings signed by the board's own code (firmware/lib/mc, under real MicroPython) verify here.

The board side is `mc.reading.encode` + `mc.cose.sign1` with its RFC 6979 P-256
signer; this side is `meterchain.reading.verify` with a registry key derived
by OpenSSL from the same secret, so neither side's key or CBOR code checks
itself. The same firmware files also run on CPython (imported by path) and
must give byte-identical messages.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meterchain import errors, reading
from meterchain.keys import PrivateKey
from meterchain.registry import Registry

FIRMWARE_LIB = Path(__file__).resolve().parents[2] / "firmware" / "lib"

SECRETS = {"mg1-pv-01": (0x5EED_0001, "pv"), "mg2-bidir:03": (0xB0A4D_0003, "bidir")}
TOP = 2**64 - 1
T0 = 1_760_000_000

# (meter, seq, time, import_wh, export_wh, power_w, flags) -- boundaries of every head size.
CASES: list[tuple[str, int, int, int, int, int, int]] = [
    ("mg1-pv-01", 0, T0, 0, 0, 0, 0),
    ("mg1-pv-01", 23, T0, 24, 255, -24, 0),
    ("mg1-pv-01", 256, T0 + 1, 65535, 65536, -25, reading.FLAG_METER_READ_ERROR),
    ("mg1-pv-01", 2**32, T0 + 2, 2**32 - 1, 2**32, reading.MAX_POWER_W, reading.FLAG_TAMPER),
    ("mg1-pv-01", TOP, T0 + 3, TOP, TOP, -reading.MAX_POWER_W, reading.KNOWN_FLAGS),
    ("mg1-pv-01", 7, 12, 5, 0, 3, reading.FLAG_CLOCK_NOT_SYNCED),  # clock never synced
    ("mg2-bidir:03", 1, T0, 1_234_567, 89_012, -2_500, reading.FLAG_COUNTER_RESET),
    ("mg2-bidir:03", 2, T0 + 60, 1_234_600, 89_100, 1_980, reading.FLAG_SPOOL_OVERFLOW),
]

BOARD_SCRIPT = """
from mc import cose, reading
out = []
for meter_id, secret_hex, source, seq, time, imp, exp, power, flags in INPUT:
    payload = reading.encode(meter_id, seq, time, imp, exp, power, flags, source)
    out.append(cose.sign1(payload, int(secret_hex, 16), meter_id.encode()).hex())
print(json.dumps(out))
"""


def _inputs(cases: list[tuple[str, int, int, int, int, int, int]]) -> list[list[Any]]:
    rows = []
    for meter_id, seq, time, imp, exp, power, flags in cases:
        secret, source = SECRETS[meter_id]
        rows.append([meter_id, f"{secret:x}", source, seq, time, imp, exp, power, flags])
    return rows


def _registry() -> Registry:
    registry = Registry()
    for meter_id, (secret, source) in SECRETS.items():
        registry.add(meter_id, PrivateKey.from_secret(secret).public_key(), "mg", source)
    return registry


def _sign_on_board(mpy: Callable[..., Any], rows: list[list[Any]]) -> list[bytes]:
    prelude = f"import json\nINPUT = json.loads({json.dumps(json.dumps(rows))})\n"
    result = mpy(prelude + BOARD_SCRIPT).check()
    return [bytes.fromhex(h) for h in json.loads(result.stdout.strip().splitlines()[-1])]


@pytest.fixture(scope="module")
def board_messages(mpy: Callable[..., Any]) -> list[bytes]:
    return _sign_on_board(mpy, _inputs(CASES))


def _firmware_on_cpython() -> tuple[Any, Any]:
    if str(FIRMWARE_LIB) not in sys.path:
        sys.path.insert(0, str(FIRMWARE_LIB))
    # firmware/lib is on sys.path only at run time.
    from mc import cose as fw_cose  # pyright: ignore[reportMissingImports]
    from mc import reading as fw_reading  # pyright: ignore[reportMissingImports]

    return fw_cose, fw_reading


def test_board_signed_readings_verify(board_messages: list[bytes]) -> None:
    registry = _registry()
    for data, (meter_id, seq, time, imp, exp, power, flags) in zip(
        board_messages, CASES, strict=True
    ):
        got = reading.verify(data, registry)
        assert (got.meter_id, got.seq, got.time) == (meter_id, seq, time)
        assert (got.import_wh, got.export_wh, got.power_w, got.flags) == (imp, exp, power, flags)
        assert got.source == SECRETS[meter_id][1]
        assert got.signed == data


def test_board_bytes_are_exactly_what_the_core_builds(board_messages: list[bytes]) -> None:
    for data, (meter_id, seq, time, imp, exp, power, flags) in zip(
        board_messages, CASES, strict=True
    ):
        payload = reading.encode_payload(
            meter_id, seq, time, imp, exp, power, flags, SECRETS[meter_id][1]
        )
        signature = data[-64:]
        assert data == reading.encode_sign1(meter_id.encode(), payload, signature)


def test_firmware_code_on_cpython_makes_the_same_bytes(board_messages: list[bytes]) -> None:
    fw_cose, fw_reading = _firmware_on_cpython()
    for row, board in zip(_inputs(CASES), board_messages, strict=True):
        meter_id, secret_hex, source, seq, time, imp, exp, power, flags = row
        payload = fw_reading.encode(meter_id, seq, time, imp, exp, power, flags, source)
        # RFC 6979: deterministic nonces, so both VMs produce the very same signature.
        assert fw_cose.sign1(payload, int(secret_hex, 16), meter_id.encode()) == board


def test_tampered_board_reading_is_refused(board_messages: list[bytes]) -> None:
    registry = _registry()
    data = bytearray(board_messages[1])
    data[-10] ^= 0x01
    with pytest.raises(errors.BadSignature):
        reading.verify(bytes(data), registry)


def test_one_power_bound_on_both_sides(mpy: Callable[..., Any]) -> None:
    """The board refuses to sign what the core refuses: power beyond MAX_POWER_W (10 MW)."""
    rows = _inputs([("mg1-pv-01", 9, T0, 1, 1, reading.MAX_POWER_W + 1, 0)])
    prelude = f"import json\nINPUT = json.loads({json.dumps(json.dumps(rows))})\n"
    result = mpy(prelude + BOARD_SCRIPT)
    assert result.returncode != 0
    assert f"power_w must be within +/-{reading.MAX_POWER_W} W" in result.stderr
    # ... and the core refuses the same value signed by anything else (test_reading.py)
    assert reading.MAX_POWER_W == 10_000_000
