"""Fixtures for the core tests: meter keys, a registry of them, a signed-reading factory,
and openers racing for one file."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meterchain import reading
from meterchain.keys import PrivateKey
from meterchain.registry import Registry

# Fixed secrets: readings and error messages are reproducible run to run.
PV_KEY = PrivateKey.from_secret(0x5EED_0001)
LOAD_KEY = PrivateKey.from_secret(0x5EED_0002)
OTHER_KEY = PrivateKey.from_secret(0x5EED_0003)
PV_METER = "mg1-pv-01"
LOAD_METER = "mg2-load-07"

T0 = 1_760_000_000  # 2025-10-09, a plausible synced board clock

DEFAULTS: dict[str, Any] = {
    "meter_id": PV_METER,
    "seq": 42,
    "time": T0,
    "import_wh": 1_234_567,
    "export_wh": 89_012,
    "power_w": -2_500,
    "flags": 0,
    "source": "pv",
}


def payload_map(**overrides: Any) -> dict[int, Any]:
    """The integer-keyed payload map of a reading, DEFAULTS overridden by field name."""
    values = {**DEFAULTS, **overrides}
    return {i + 1: values[name] for i, name in enumerate(reading.FIELDS)}


def make_registry() -> Registry:
    registry = Registry()
    registry.add(PV_METER, PV_KEY.public_key(), "mg1", "pv")
    registry.add(LOAD_METER, LOAD_KEY.public_key(), "mg2", "load")
    return registry


@pytest.fixture
def registry() -> Registry:
    return make_registry()


@pytest.fixture
def signed() -> Callable[..., bytes]:
    """`signed(**fields)`: a reading signed like a board does, by the PV key unless `key=`."""

    def make(key: PrivateKey = PV_KEY, **overrides: Any) -> bytes:
        return reading.sign_reading(key, **{**DEFAULTS, **overrides})

    return make


def open_together(
    open_file: Callable[[Path], object], path: Path, openers: int = 3
) -> list[Exception]:
    """Run `open_file(path)` in `openers` threads released at the same moment; their errors."""
    start = threading.Barrier(openers)
    failures: list[Exception] = []

    def open_it() -> None:
        start.wait()
        try:
            open_file(path)
        except Exception as exc:  # noqa: BLE001 - collected for the caller's assertion
            failures.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(openers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(35)
    return failures
