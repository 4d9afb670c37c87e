"""Run a script under real MicroPython: the WebAssembly port on Node.js.

`python -m hil.micropython SCRIPT.py [ARGS...]` runs SCRIPT with `firmware/lib`
importable, passes its output through and exits non-zero if the script raised.
Tests use `run()` to execute the same firmware code under MicroPython that they
run under CPython, and compare bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIRMWARE_LIB = REPO_ROOT / "firmware" / "lib"
RUNTIME = (
    REPO_ROOT
    / "firmware"
    / "node_modules"
    / "@micropython"
    / "micropython-webassembly-pyscript"
    / "micropython.mjs"
)
RUNNER = Path(__file__).resolve().with_name("mp_runner.mjs")

# An ESP32 without PSRAM leaves roughly this much heap to MicroPython.
DEFAULT_HEAP = 4 * 1024 * 1024


class MicroPythonUnavailable(RuntimeError):
    """Node.js or the pinned WebAssembly runtime is missing (run `make setup`)."""


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        if self.returncode != 0:
            raise AssertionError(
                f"MicroPython exited {self.returncode}\n--- stdout\n{self.stdout}\n"
                f"--- stderr\n{self.stderr}"
            )
        return self


def command(
    script: Path,
    args: list[str] | None = None,
    *,
    libs: list[Path] | None = None,
    fs_dir: Path | None = None,
    heap: int = DEFAULT_HEAP,
) -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise MicroPythonUnavailable("node is not on PATH; install Node.js >= 18")
    runtime = Path(os.environ.get("METERCHAIN_MICROPYTHON_MJS", RUNTIME))
    if not runtime.exists():
        raise MicroPythonUnavailable(f"{runtime} is missing; run `make setup`")
    cmd = [node, str(RUNNER), "--runtime", str(runtime), "--heap", str(heap)]
    for lib in libs if libs is not None else [FIRMWARE_LIB]:
        cmd += ["--lib", str(lib)]
    if fs_dir is not None:
        cmd += ["--fs", str(fs_dir)]
    return [*cmd, str(script), *(args or [])]


def run(
    script: Path,
    args: list[str] | None = None,
    *,
    libs: list[Path] | None = None,
    fs_dir: Path | None = None,
    heap: int = DEFAULT_HEAP,
    timeout: float = 300,
) -> Result:
    """Run SCRIPT under MicroPython and capture its output."""
    proc = subprocess.run(
        command(script, args, libs=libs, fs_dir=fs_dir, heap=heap),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_code(code: str, **kwargs: object) -> Result:
    """Run a snippet of source under MicroPython (see `run` for options)."""
    with tempfile.TemporaryDirectory(prefix="mc-mp-") as tmp:
        script = Path(tmp) / "snippet.py"
        script.write_text(code)
        return run(script, **kwargs)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.micropython", description=__doc__)
    parser.add_argument("script", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parser.add_argument("--fs", type=Path, help="host folder mirrored as the board's /flash")
    parser.add_argument("--heap", type=int, default=DEFAULT_HEAP, help="MicroPython heap bytes")
    ns = parser.parse_args(argv)
    try:
        cmd = command(ns.script, ns.args, fs_dir=ns.fs, heap=ns.heap)
    except MicroPythonUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
