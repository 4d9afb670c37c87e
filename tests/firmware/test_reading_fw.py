"""Firmware reading encoder: the DESIGN.md map, round-trip via cbor2, field validation."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mc import reading

UINT64 = st.integers(0, 2**64 - 1)
METER_IDS = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
READINGS = st.fixed_dictionaries(
    {
        "meter_id": METER_IDS,
        "seq": UINT64,
        "time": UINT64,
        "import_wh": UINT64,
        "export_wh": UINT64,
        "power_w": st.integers(-10_000_000, 10_000_000),
        "flags": st.integers(0, 0x3F),
        "source": st.sampled_from(
            ["pv", "wind", "hydro", "biomass", "load", "bidir", "storage", "chp"]
        ),
    }
)
FIELDS = ["meter_id", "seq", "time", "import_wh", "export_wh", "power_w", "flags", "source"]
GOOD: dict[str, Any] = {
    "meter_id": "m1",
    "seq": 1,
    "time": 1700000000,
    "import_wh": 12345,
    "export_wh": 0,
    "power_w": -250,
    "flags": reading.FLAG_CLOCK_NOT_SYNCED,
    "source": "pv",
}


def _as_map(fields: dict[str, Any]) -> dict[int, Any]:
    return {i + 1: fields[name] for i, name in enumerate(FIELDS)}


@settings(max_examples=200, deadline=None)
@given(READINGS)
def test_encoding_round_trips_through_cbor2(fields: dict[str, Any]) -> None:
    data = reading.encode(**fields)
    assert cbor2.loads(data) == _as_map(fields)
    assert data == cbor2.dumps(_as_map(fields), canonical=True)


def test_design_example_bytes() -> None:
    data = reading.encode(**GOOD)
    assert data.hex() == (
        "a8"  # map of 8
        "01626d31"  # 1: "m1"
        "0201"  # 2: 1
        "031a6553f100"  # 3: 1700000000
        "04193039"  # 4: 12345
        "0500"  # 5: 0
        "0638f9"  # 6: -250
        "0701"  # 7: clock not synced
        "08627076"  # 8: "pv"
    )


ENCODE_BATCH = """
from mc import reading
out = []
for fields in INPUT:
    out.append(reading.encode(**fields).hex())
print(json.dumps(out))
"""


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(READINGS, min_size=10, max_size=20))
def test_micropython_encodes_identical_bytes(mpy_json, batch: list[dict[str, Any]]) -> None:
    assert mpy_json(ENCODE_BATCH, batch) == [reading.encode(**f).hex() for f in batch]


BAD_VALUES = [
    ("meter_id", ""),
    ("meter_id", 42),
    ("meter_id", b"m1"),
    ("meter_id", "x" * 65),
    ("meter_id", "m\u00e9ter"),
    ("meter_id", "site/m1"),
    ("meter_id", "m+"),
    ("meter_id", "m#"),
    ("meter_id", "m 1"),
    ("meter_id", "m1\n"),
    ("meter_id", "m\x00"),
    ("seq", -1),
    ("seq", 2**64),
    ("seq", 1.0),
    ("seq", True),
    ("seq", "1"),
    ("seq", None),
    ("time", -1),
    ("time", 1.7e9),
    ("import_wh", 2**64),
    ("import_wh", -5),
    ("import_wh", 12.5),
    ("export_wh", -1),
    ("export_wh", False),
    ("power_w", 2**63),
    ("power_w", -(2**63) - 1),
    ("power_w", 10_000_001),
    ("power_w", -10_000_001),
    ("power_w", 1.5),
    ("power_w", True),
    ("flags", -1),
    ("flags", 0x40),
    ("flags", 1 << 63),
    ("flags", 2**64),
    ("flags", 1.0),
    ("source", "coal"),
    ("source", "PV"),
    ("source", ""),
    ("source", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_field_raises_value_error_naming_it(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        reading.encode(**{**GOOD, field: value})


def test_bad_fields_are_refused_under_micropython(mpy_json) -> None:
    code = """
from mc import reading
out = []
for fields in INPUT:
    try:
        reading.encode(**fields)
        out.append("accepted")
    except ValueError as exc:
        out.append(str(exc))
print(json.dumps(out))
"""
    # JSON carries the cases; float and bytes values are covered by the CPython test.
    cases = [(f, v) for f, v in BAD_VALUES if not isinstance(v, float | bytes)]
    out = mpy_json(code, [{**GOOD, f: v} for f, v in cases] + [GOOD])
    for (field, _), message in zip(cases, out, strict=False):
        assert field in message
    assert out[-1] == "accepted"


def test_extremes_are_accepted() -> None:
    top = 2**64 - 1
    data = reading.encode("m" * 64, top, top, top, top, -10_000_000, 0x3F, "chp")
    assert cbor2.loads(data) == {
        1: "m" * 64,
        2: top,
        3: top,
        4: top,
        5: top,
        6: -10_000_000,
        7: 0x3F,
        8: "chp",
    }


def test_power_bound_is_the_verifiers_bound() -> None:
    from meterchain.reading import MAX_POWER_W

    assert reading.MAX_POWER_W == MAX_POWER_W
    reading.encode(**{**GOOD, "power_w": MAX_POWER_W})
    with pytest.raises(ValueError, match="power_w"):
        reading.encode(**{**GOOD, "power_w": MAX_POWER_W + 1})


def test_flag_bits_and_sources_are_the_shared_values() -> None:
    # The CPython core (meterchain/reading.py) uses the same bits; these are the contract.
    assert reading.FLAG_CLOCK_NOT_SYNCED == 1 << 0
    assert reading.FLAG_METER_READ_ERROR == 1 << 1
    assert reading.FLAG_COUNTER_RESET == 1 << 2
    assert reading.FLAG_TAMPER == 1 << 3
    assert reading.FLAG_SPOOL_OVERFLOW == 1 << 4
    assert reading.FLAG_GATEWAY_ATTESTED == 1 << 5
    assert reading.FLAGS_KNOWN == 0x3F
    assert reading.SOURCES == ("pv", "wind", "hydro", "biomass", "load", "bidir", "storage", "chp")


def test_flag_bits_agree_with_the_core_when_it_defines_them() -> None:
    core = pytest.importorskip("meterchain.reading")
    names = [n for n in dir(reading) if n.startswith("FLAG_")]
    shared = [n for n in names if hasattr(core, n)]
    if not shared:
        pytest.skip("meterchain.reading defines no FLAG_* constants yet")
    for name in shared:
        assert getattr(core, name) == getattr(reading, name), name
