"""The MicroPython runner runs scripts under the real WebAssembly port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_runs_under_micropython_with_firmware_lib(mpy) -> None:
    result = mpy("import sys, mc\nprint(sys.implementation.name)\n").check()
    assert result.stdout.strip() == "micropython"


def test_exception_gives_nonzero_status_and_traceback(mpy) -> None:
    result = mpy("raise ValueError('meter on fire')\n")
    assert result.returncode == 1
    assert "ValueError: meter on fire" in result.stderr


def test_sys_exit_status_passes_through(mpy) -> None:
    assert mpy("import sys\nsys.exit(3)\n").returncode == 3


def test_flash_folder_persists_between_runs(mpy, tmp_path: Path) -> None:
    code = "f = open('count.txt', 'a')\nf.write('x')\nf.close()\nprint(open('count.txt').read())\n"
    assert mpy(code, fs_dir=tmp_path).check().stdout.strip() == "x"
    assert mpy(code, fs_dir=tmp_path).check().stdout.strip() == "xx"
    assert (tmp_path / "count.txt").read_text() == "xx"


def test_module_entry_point(tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text("print('hello from', __name__)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hil.micropython", str(script)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello from __main__"
