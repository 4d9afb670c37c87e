"""How the field tools reach a board: mpremote for a real one, the filesystem for an emulated one.

A port string picks the driver:
    /dev/ttyUSB0, COM5, ...   a real ESP32 over USB serial, through `mpremote`
    emulated:PATH             an emulated board whose flash is the folder PATH

Both offer the same few operations: read and write a file in the board's flash,
install a firmware image (removing firmware files the image no longer has, keeping
all data), run firmware code on the board with `board` bound to its HAL and return
what it printed, and reset.  Every mpremote call uses `resume`, so it never soft-resets
the board (that would stop the maintenance timer that keeps the watchdog fed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

from meterchain.board.firmware import FIRMWARE_ROOTS, Image, is_firmware_path
from meterchain.errors import MeterChainError
from meterchain.keys import write_private_file

EMULATED_PREFIX = "emulated:"


class BoardError(MeterChainError):
    """The board could not be reached, or refused an operation; the message says which."""


class BoardDriver(ABC):
    """One board, real or emulated."""

    kind = "mpy"  # firmware image kind the board runs

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def read_file(self, path: str) -> bytes | None:
        """Contents of a file in the board's flash, or None if it does not exist."""

    @abstractmethod
    def write_file(self, path: str, data: bytes) -> None:
        """Create or replace a file in the board's flash."""

    @abstractmethod
    def install(self, image: Image) -> list[str]:
        """Write the firmware image and remove stale firmware files; returns removed paths."""

    @abstractmethod
    def run_firmware(self, code: str) -> str:
        """Run firmware code on the board with `board` bound to its HAL; its output."""

    @abstractmethod
    def reset(self) -> None:
        """Restart the board so it boots the (new) firmware and configuration."""


class EmulatedDriver(BoardDriver):
    """An emulated board: the folder is its flash; code runs in a fresh CPython process."""

    kind = "py"

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()

    def describe(self) -> str:
        return f"emulated board in {self.folder}"

    def _path(self, path: str) -> Path:
        target = (self.folder / path).resolve()
        if self.folder not in target.parents and target != self.folder:
            raise BoardError(f"{path!r} is outside the board's flash")
        return target

    def read_file(self, path: str) -> bytes | None:
        target = self._path(path)
        return target.read_bytes() if target.is_file() else None

    def write_file(self, path: str, data: bytes) -> None:
        # The folder is the board's flash, which holds its key and secrets: owner only.
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        write_private_file(self._path(path), data)

    def install(self, image: Image) -> list[str]:
        for path, data in image.files.items():
            self.write_file(path, data)
        removed = []
        for root in FIRMWARE_ROOTS:
            base = self.folder / root
            candidates = [base] if base.is_file() else sorted(base.rglob("*"))
            for item in candidates:
                rel = item.relative_to(self.folder).as_posix()
                if item.is_file() and is_firmware_path(rel) and rel not in image.files:
                    item.unlink()
                    removed.append(rel)
        return removed

    def run_firmware(self, code: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "meterchain.board.emulated", "exec", str(self.folder), code],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise BoardError(f"firmware code failed on {self.describe()}:\n{proc.stderr.strip()}")
        return proc.stdout

    def reset(self) -> None:
        """Nothing to do: an emulated board boots from its folder whenever it is started."""


def _mpremote() -> str:
    candidate = Path(sys.executable).with_name("mpremote")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mpremote")
    if found is None:
        raise BoardError("mpremote not found; install the project (pip install -e .)")
    return found


class MpremoteDriver(BoardDriver):
    """A real board on a serial port, driven by mpremote."""

    kind = "mpy"

    def __init__(self, port: str, timeout: float = 120.0) -> None:
        self.port = port
        self.timeout = timeout

    def describe(self) -> str:
        return f"board on {self.port}"

    def _run(self, *args: str) -> str:
        cmd = [_mpremote(), "connect", self.port, "resume", *args]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BoardError(f"mpremote timed out on {self.port}: {' '.join(args[:2])}") from exc
        if proc.returncode != 0:
            raise BoardError(
                f"mpremote failed on {self.port} ({' '.join(args[:2])}): "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc.stdout

    def read_file(self, path: str) -> bytes | None:
        with tempfile.TemporaryDirectory(prefix="mc-board-") as tmp:
            local = Path(tmp) / "file"
            probe = self._run(
                "exec",
                f"import os\ntry:\n os.stat({path!r}); print('MC-EXISTS')\nexcept OSError: pass",
            )
            if "MC-EXISTS" not in probe:
                return None
            self._run("fs", "cp", f":{path}", str(local))
            return local.read_bytes()

    def write_file(self, path: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="mc-board-") as tmp:
            local = Path(tmp) / Path(path).name
            local.write_bytes(data)
            self._run("fs", "cp", str(local), f":{path}")

    def install(self, image: Image) -> list[str]:
        dirs = sorted({str(Path(p).parent) for p in image.files if "/" in p})
        keep = sorted(image.files)
        # Make the folders, then delete firmware files the new image does not have
        # (a stale .py would shadow its new .mpy: MicroPython imports .py first).
        prune = (
            "import os\n"
            f"for d in {dirs!r}:\n"
            "    p = ''\n"
            "    for part in d.split('/'):\n"
            "        p = p + '/' + part if p else part\n"
            "        try:\n            os.mkdir(p)\n        except OSError:\n            pass\n"
            f"keep = set({keep!r})\n"
            "def walk(d):\n"
            "    for e in os.ilistdir(d):\n"
            "        p = d + '/' + e[0]\n"
            "        if e[1] == 0x4000:\n            walk(p)\n"
            "        elif p not in keep:\n            os.remove(p); print('MC-REMOVED', p)\n"
            "walk('lib/mc')\n"
        )
        out = self._run("exec", prune)
        removed = [
            line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("MC-REMOVED")
        ]
        with tempfile.TemporaryDirectory(prefix="mc-fw-") as tmp:
            args: list[str] = []
            for path, data in sorted(image.files.items()):
                local = Path(tmp) / path
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)
                if args:
                    args.append("+")
                args += ["fs", "cp", str(local), f":{path}"]
            self._run(*args)
        return removed

    def run_firmware(self, code: str) -> str:
        return self._run("exec", "from mc import hal\nboard = hal.Board()\n" + code)

    def reset(self) -> None:
        self._run("reset")


def open_board(port: str) -> BoardDriver:
    """The driver for a port string (see the module docstring)."""
    if port.startswith(EMULATED_PREFIX):
        folder = port[len(EMULATED_PREFIX) :]
        if not folder:
            raise BoardError("emulated: needs a folder, e.g. emulated:./board1")
        return EmulatedDriver(Path(folder))
    return MpremoteDriver(port)
