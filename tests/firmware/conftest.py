"""Firmware test fixtures: `firmware/lib` importable on CPython, JSON results from MicroPython."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hil import micropython

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
FIRMWARE_LIB = FIRMWARE / "lib"

# The same source files the board runs, imported as the `mc` package on CPython.
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


@pytest.fixture(scope="session")
def mpy_json(mpy: Callable[..., Any]) -> Callable[[str, object], Any]:
    """Run `code` under MicroPython with the global `INPUT` set from JSON; return its JSON output.

    The script must print exactly one JSON document (its last line of output).  Byte
    strings travel as hex both ways, so one Node start-up covers a whole batch of cases.
    """

    def run(code: str, data: object = None) -> Any:
        # Non-ASCII goes in as UTF-8, not as \u escapes: MicroPython's json does not join
        # surrogate-pair escapes into one character.
        literal = json.dumps(json.dumps(data, ensure_ascii=False), ensure_ascii=False)
        prelude = f"import json\nINPUT = json.loads({literal})\n"
        result = mpy(prelude + code).check()
        lines = result.stdout.strip().splitlines()
        assert lines, f"MicroPython printed nothing\n{result.stderr}"
        return json.loads(lines[-1])

    return run
