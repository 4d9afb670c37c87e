"""Clearing at scale with the helper process: the cooperative QP solved there and batches of
small QPs shared with it give exactly what one process gives (the signed result)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from clearing_cases import microgrid

from meterchain.market import qp as qp_mod
from meterchain.market.clearing import ClearingRequest, clear
from meterchain.market.model import TradeRequest
from meterchain.market.reference import synthetic_request


@pytest.fixture
def no_helper() -> Iterator[None]:
    qp_mod.stop_helper()
    yield
    qp_mod.stop_helper()


def _with_island(seed: int) -> ClearingRequest:
    """A synthetic window plus a microgrid that cannot run alone (load over its import limit)."""
    req = synthetic_request(40, seed)
    island = microgrid("zz-island", (0,) * 24, 50_000, 0, import_limit=10_000)
    return ClearingRequest(
        req.market, req.first_period, (*req.requests, TradeRequest(island, req.market.min_deposit))
    )


@pytest.mark.parametrize("seed", [2, 5])
def test_the_helper_gives_the_signed_result_of_one_process(
    seed: int, no_helper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    req = _with_island(seed)
    monkeypatch.setattr(qp_mod, "PARALLEL_FROM", 10**12)
    alone_here = clear(req)
    assert qp_mod.helper_cpu_seconds() == 0  # no helper started
    assert [mg_id for mg_id, _ in alone_here.excluded] == ["zz-island"]
    # every cooperative QP to the helper, every batch of two or more shared with it
    monkeypatch.setattr(qp_mod, "PARALLEL_FROM", 1)
    monkeypatch.setattr(qp_mod, "SHARE_FROM", 2)
    with_helper = clear(req)
    assert qp_mod.helper_cpu_seconds() > 0
    assert with_helper.digest == alone_here.digest


def test_an_idle_helper_takes_part_of_a_batch_and_the_outcome_is_unchanged(
    no_helper: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    req = _with_island(3)
    alone = qp_mod.build(req.market, req.microgrids, cooperative=False)
    start = time.process_time()
    x_here, infeasible_here = qp_mod.solve_standalone(alone, req.ids, "piqp")
    batch_cpu_s = time.process_time() - start
    assert list(infeasible_here) == ["zz-island"]
    monkeypatch.setattr(qp_mod, "PARALLEL_FROM", 1)
    monkeypatch.setattr(qp_mod, "SHARE_FROM", 2)
    monkeypatch.setattr(qp_mod, "SHARE_CHUNKS", 2)  # the second half is always the helper's
    first = qp_mod.build(req.market, req.microgrids[:1], cooperative=False)
    qp_mod.solve_later(first, "piqp")()  # starts the helper; it is idle afterwards
    assert qp_mod.helper_cpu_seconds() > 0
    before = qp_mod.helper_cpu_seconds()
    x_shared, infeasible_shared = qp_mod.solve_standalone(alone, req.ids, "piqp")
    assert qp_mod.helper_cpu_seconds() - before > batch_cpu_s / 5  # the helper solved a good part
    assert np.array_equal(x_shared, x_here)
    assert infeasible_shared == infeasible_here
