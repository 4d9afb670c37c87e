"""The firmware type-checks against micropython-esp32-stubs with pyright: 0 errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
PYRIGHT = Path(sys.executable).with_name("pyright")


def test_pyright_reports_no_errors_in_firmware() -> None:
    assert PYRIGHT.exists(), f"{PYRIGHT} missing: run `make setup`"
    proc = subprocess.run(
        [str(PYRIGHT), "-p", str(FIRMWARE / "pyrightconfig.json"), "--outputjson"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(proc.stdout)
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    listing = "\n".join(
        f"{d['file']}:{d['range']['start']['line'] + 1}: {d['message']}" for d in errors
    )
    assert report["summary"]["errorCount"] == 0, listing
    assert report["summary"]["filesAnalyzed"] > 0
