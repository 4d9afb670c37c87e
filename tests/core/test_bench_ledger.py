"""`bench ledger`'s full pass reports the figures it promises (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

from bench import ledger as bench_ledger
from meterchain.ledger.sandbox import Sandbox


def test_full_pass_reports_rates_against_the_filing_and_a_bare_verify(tmp_path: Path) -> None:
    result = bench_ledger._full_pass(tmp_path / "filing.db", Sandbox(market="t", members=3), 1)
    assert result["readings"] == result["readings_per_block"] == 2400
    rate = result["signatures_per_second"]
    assert rate > 0 and result["inline_signatures_per_second"] > 0
    assert result["bare_verify_per_second"] > 0
    assert abs(result["to_bare_verify"] - rate / result["bare_verify_per_second"]) < 0.01
    by_bare = result["to_bare_verify"] / (11_500 / 15_400)
    assert abs(result["to_filing_by_bare_verify"] - by_bare) < 0.02
    assert result["meets_target"] == (rate >= 23_000 and result["to_filing_by_bare_verify"] >= 2)
