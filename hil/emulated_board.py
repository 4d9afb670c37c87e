"""Emulated meter boards for HIL rigs: one OS process per board, killable like a power cut.

`EmulatedBoardProcess(folder)` boots the firmware stored in `folder` (provisioned with
`meterchain board provision --port emulated:FOLDER`) under CPython with the emulated
HAL (meterchain/board/emulated.py).  `stop()` is a clean power-off between two firmware
steps, `kill()` a power cut at an arbitrary instruction (SIGKILL); `start()` again is a
reboot on the same flash.  `readings()` returns the signed readings the board printed
on its console, in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meterchain.board.emulated import CONSOLE_FILE, EMULATOR_FILE

READING_PREFIX = "MC-R "


def write_emulator_settings(folder: Path, **settings: Any) -> None:
    """Create or update the board folder's emulator.json (meter, interval_ms, ntp, wifi, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / EMULATOR_FILE
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(settings)
    path.write_text(json.dumps(current, indent=1) + "\n")


class EmulatedBoardProcess:
    """One emulated board running in its own Python process."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        self.process: subprocess.Popen[bytes] | None = None
        self.boots = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> EmulatedBoardProcess:
        if self.running:
            return self
        log = open(self.folder / "process.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meterchain.board.emulated", "run", str(self.folder)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self.boots += 1
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """Power off at the firmware's next step (SIGTERM); returns the exit status."""
        from meterchain.site.supervisor import terminate

        return None if self.process is None else terminate(self.process, timeout)

    def kill(self) -> None:
        """Power cut: SIGKILL, wherever the firmware happens to be."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def console(self) -> str:
        path = self.folder / CONSOLE_FILE
        return path.read_text() if path.exists() else ""

    def readings(self) -> list[bytes]:
        """Every signed reading the board produced (console `MC-R` lines), oldest first."""
        return [
            bytes.fromhex(line[len(READING_PREFIX) :])
            for line in self.console().splitlines()
            if line.startswith(READING_PREFIX)
        ]

    def wait_for_readings(self, n: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.readings()
            if len(found) >= n:
                return found
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise TimeoutError(
            f"{self.folder}: {len(self.readings())} of {n} readings after {timeout}s\n"
            f"{self.console()[-2000:]}"
        )

    def __enter__(self) -> EmulatedBoardProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
