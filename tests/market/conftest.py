"""Fixtures shared by the market tests: the reference request and its clearing (solved once)."""

from __future__ import annotations

import pytest

from meterchain.market.clearing import ClearingRequest, ClearingResult, clear
from meterchain.market.reference import reference_request as make_reference_request


@pytest.fixture(scope="session")
def reference_request() -> ClearingRequest:
    """The reference day's first clearing request (window 0..23, start-of-day storage)."""
    return make_reference_request()


@pytest.fixture(scope="session")
def reference_result(reference_request: ClearingRequest) -> ClearingResult:
    return clear(reference_request)
