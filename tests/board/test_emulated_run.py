"""`meterchain board run` shows the board's console, and a simulated pv meter exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meterchain.board.emulated import DEFAULT_SETTINGS, SIM_POWER_W, EmulatedBoard


@pytest.mark.parametrize(
    ("source", "setting", "power"),
    [("pv", None, -SIM_POWER_W), ("wind", None, -SIM_POWER_W), ("load", None, SIM_POWER_W),
     ("bidir", None, SIM_POWER_W), ("pv", 700, 700)],
)  # fmt: skip
def test_the_simulated_meter_of_a_generating_board_exports(
    tmp_path: Path, source: str, setting: int | None, power: int
) -> None:
    board = EmulatedBoard(tmp_path / "b", settings={**DEFAULT_SETTINGS, "sim_power_w": setting})
    try:
        board.sim_meter_uart({"meter.unit": 1, "source": source})
        assert board.meter.power_w == power  # an explicit emulator.json setting wins
    finally:
        board.close()


def _run(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "board", "run", "--port", f"emulated:{folder}",
         "--duration", "5", *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_board_run_prints_the_console_unless_quiet(tmp_path: Path) -> None:
    folder = tmp_path / "unprovisioned"
    folder.mkdir()
    loud = _run(folder)
    assert loud.returncode == 2  # safe mode: nothing to sample with
    assert loud.stdout.startswith("MC SAFE MODE: config.json: missing"), loud.stdout
    quiet = _run(folder, "--quiet")
    assert quiet.returncode == 2 and quiet.stdout == ""
    # Both runs are in the console log, as on the board's serial console.
    assert (folder / "console.log").read_text().count("MC SAFE MODE: config.json") == 2
