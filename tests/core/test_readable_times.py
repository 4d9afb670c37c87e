"""Every time a person reads is ISO-8601 UTC: ledger show, board monitor lines, agent energy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ledger"))

from ledger_world import T0, build_world  # noqa: E402

from meterchain.board.monitor import describe  # noqa: E402
from meterchain.ledger.store import open_store  # noqa: E402
from meterchain.times import iso_local, iso_utc  # noqa: E402


def test_iso_forms() -> None:
    assert iso_utc(T0) == "2026-01-01T00:00:00Z" and iso_utc(None) is None
    assert iso_local(T0)[:4] in ("2025", "2026") and iso_local(T0)[-6] in "+-"


def test_ledger_show_names_block_times_in_utc(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    build_world(open_store(str(db))).store.close()

    def show(*extra: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "meterchain.cli", "ledger", "show", str(db), *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    text = show()
    assert "2026-01-01T00:00:10Z" in text and f"t={T0}" not in text and str(T0 + 10) not in text
    blocks = json.loads(show("--json"))["last_blocks"]
    assert all(b["time_utc"] == iso_utc(b["time"]) for b in blocks)


def test_board_monitor_line_shows_the_reading_time_in_utc() -> None:
    reading = SimpleNamespace(meter_id="mg1-pv", seq=7, time=T0 + 600, import_wh=1, export_wh=2,
                              power_w=3, flags=0, source="pv")  # fmt: skip
    line = describe(reading)  # type: ignore[arg-type]
    assert "seq=7 time=2026-01-01T00:10:00Z " in line
