"""`bench verify` runs end to end and reports the figures it promises (no timing asserted)."""

from __future__ import annotations

from bench import verify as bench_verify


def test_quick_run_reports_every_figure() -> None:
    result = bench_verify.run(quick=True)
    assert result["readings"] == 320 and result["meters"] == 8
    for key in ("readings_per_second", "raw_verify_per_second", "ecdsa_verify_per_second"):
        assert result[key] > 0
    ratio = result["readings_per_second"] / result["raw_verify_per_second"]
    assert abs(result["ratio"] - ratio) < 0.01
    assert result["target_ratio"] == 0.8
    assert result["meets_target"] == (result["ratio"] >= 0.8)
    assert result["openssl_speedup_over_ecdsa"] > 0
