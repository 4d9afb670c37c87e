"""Board test fixtures: firmware importable on CPython, board folders with config and key."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hil import micropython

REPO = Path(__file__).resolve().parents[2]
FIRMWARE_LIB = REPO / "firmware" / "lib"

# The board's own source files, imported as the `mc` package (and the fakes) on CPython.
if str(FIRMWARE_LIB) not in sys.path:
    sys.path.insert(0, str(FIRMWARE_LIB))

@pytest.fixture(scope="session", params=micropython.PORTS)
def mpy(request: pytest.FixtureRequest) -> Callable[..., micropython.Result]:
    """The shared `mpy` runner, once per MicroPython port: the WebAssembly port and the unix
    port, whose real garbage collector and fixed heap are a board's."""
    try:
        return micropython.runner(request.param)
    except micropython.MicroPythonUnavailable as exc:  # pragma: no cover - setup problem
        pytest.fail(f"MicroPython {request.param} port missing: {exc}")


BASE_CONFIG: dict[str, Any] = {
    "meter_id": "mg1-load-01",
    "market": "m1",
    "source": "load",
    "interval_s": 15,
    "meter": {"type": "sdm630"},
    "broker": {"host": "broker.test", "tls": False},
}


def board_config(**overrides: Any) -> dict[str, Any]:
    """BASE_CONFIG with dotted-key overrides ("meter.type" -> config["meter"]["type"])."""
    cfg = json.loads(json.dumps(BASE_CONFIG))
    for key, value in overrides.items():
        section, _, sub = key.replace("__", ".").partition(".")
        if sub:
            cfg.setdefault(section, {})[sub] = value
        else:
            cfg[section] = value
    return cfg


@pytest.fixture
def make_board_dir(tmp_path: Path) -> Callable[..., Path]:
    """A board flash folder with config.json and a key (made by the firmware's keystore)."""

    def make(name: str = "board", cfg: dict[str, Any] | None = None, key: bool = True) -> Path:
        from mc import keystore
        from mc.flash import Flash
        from mcfakes import host_random, write_config

        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        flash = Flash(str(folder))
        write_config(flash, cfg if cfg is not None else board_config())
        if key:
            keystore.ensure(flash, host_random)
        return folder

    return make


def public_key_of(folder: Path) -> bytes:
    from mc import keystore, p256
    from mc.flash import Flash

    return p256.public_key(keystore.load(Flash(str(folder))))
