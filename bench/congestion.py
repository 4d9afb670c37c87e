"""`meterchain bench congestion`: the weak centre's check and minimal cut on a large feeder (M25).

Case: the seeded synthetic market of N microgrids (`reference.synthetic_request`)
cleared once, the executed hour's schedule placed one microgrid per bus on a
seeded N-bus feeder (a random tree from the substation plus N/50 meshing
ties). Limits are 1.3 x each line's flow (at least 50 kW), except the five
lines most loaded by export, which get 85 % of their flow: they must be
relieved by cutting trades.

Ours, median of several runs: building the network's PTDF with PYPOWER
(once per recorded network), ``congestion.check`` (one PTDF product: the
flows of the hour), ``congestion.adjust`` (check, the HiGHS LP for the least
total cut, the re-check) and ``congestion.verify`` (a backup's full re-run).
Anchor, in the same run: the same flows by a sparse DC power flow solve per
check (B theta = P with scipy's SuperLU, no PTDF), the textbook way.
Sizes: 1000 (the target case) and 100; ``--quick`` runs 100 only.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import numpy as np

SEED = 7
TARGETS_S = {"check": 0.05, "adjust": 5.0}


def _feeder(n: int, result: Any) -> Any:
    from meterchain.market import congestion
    from meterchain.market.network import Line, Network

    rng = random.Random(SEED)
    buses = tuple(f"n{k}" for k in range(n + 1))
    ends = [(buses[rng.randrange(k)], buses[k]) for k in range(1, n + 1)]
    for _ in range(n // 50):
        a, b = rng.sample(range(n + 1), 2)
        ends.append((buses[a], buses[b]))
    reactance = [rng.randint(20, 400) for _ in ends]
    sites = tuple(zip(result.microgrids, buses[1:], strict=True))

    def network(limits: list[int]) -> Network:
        lines = tuple(
            Line(f"l{k}", a, b, x, lim)
            for k, ((a, b), x, lim) in enumerate(zip(ends, reactance, limits, strict=True))
        )
        return Network(f"bench-{n}", "n0", buses, lines, sites)

    loose = network([10**12] * len(ends))
    flows = [ld.flow_w for ld in congestion.check(loose, result).loadings]
    limits = [max(abs(f) * 13 // 10, 50_000) for f in flows]
    # Export lines: flow towards the substation (to -> from on a tree edge built root-first).
    export = sorted(range(n), key=lambda k: flows[k])[:5]
    for k in export:
        limits[k] = max(1, -flows[k] * 85 // 100)
    return network(limits)


def _anchor_flows(network: Any, injections: np.ndarray) -> np.ndarray:
    """DC power flow the textbook way: solve the reduced B theta = P, then (theta_f - theta_t)/x."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import spsolve

    index = {b: k for k, b in enumerate(network.buses)}
    f = np.array([index[ln.from_bus] for ln in network.lines])
    t = np.array([index[ln.to_bus] for ln in network.lines])
    b = 1.0 / np.array([ln.reactance_mohm / 1000.0 for ln in network.lines])
    m, n = len(network.lines), len(network.buses)
    incidence = sp.csr_matrix(
        (
            np.concatenate([np.ones(m), -np.ones(m)]),
            (np.tile(np.arange(m), 2), np.concatenate([f, t])),
        ),
        shape=(m, n),
    )
    bbus = (incidence.T @ sp.diags(b) @ incidence).tocsc()
    slack = index[network.grid_bus]
    keep = np.array([k for k in range(n) if k != slack])
    theta = np.zeros(n)
    theta[keep] = spsolve(bbus[keep][:, keep], injections[keep])
    return b * (theta[f] - theta[t])


def _median(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _size(n: int, repeats: int) -> dict[str, Any]:
    from meterchain.market import congestion
    from meterchain.market.clearing import clear
    from meterchain.market.reference import synthetic_request

    result = clear(synthetic_request(n, 1))
    network = _feeder(n, result)
    start = time.perf_counter()
    _ = network.ptdf
    ptdf_s = time.perf_counter() - start
    hour = result.executed[0]
    check_s, checked = _median(lambda: congestion.check(network, result), repeats)
    adjust_s, record = _median(lambda: congestion.adjust(network, result), repeats)
    verify_s, _ = _median(lambda: congestion.verify(network, result, record), repeats)
    inj = congestion.injections_w(network, result.microgrids, hour.dispatch)
    anchor_s, anchor = _median(lambda: _anchor_flows(network, inj), repeats)
    agree = max(abs(a - ld.flow_w) for a, ld in zip(anchor, checked.loadings, strict=True))
    after = congestion.check(network, congestion.adjusted_result(result, record))
    return {
        "microgrids": n,
        "buses": len(network.buses),
        "lines": len(network.lines),
        "trades": len(hour.trades),
        "overloaded_lines": len(checked.violated),
        "cut_wh": record.total_cut_wh,
        "overloaded_after": len(
            [ld for ld in after.violated if ld.overload_w > dict(record.residual_w).get(ld.line, 0)]
        ),
        "ptdf_build_s": round(ptdf_s, 4),
        "check_s": round(check_s, 5),
        "adjust_s": round(adjust_s, 4),
        "verify_s": round(verify_s, 4),
        "anchor_dc_solve_s": round(anchor_s, 5),
        "check_vs_anchor": round(check_s / anchor_s, 2),
        "anchor_max_flow_diff_w": round(float(agree), 3),
    }


def run(*, quick: bool = False) -> dict[str, Any]:
    sizes = (100,) if quick else (100, 1000)
    repeats = 3 if quick else 5
    rows = [_size(n, repeats) for n in sizes]
    return {
        "what": "M25 DC flow check and least-total-cut LP (HiGHS) per cleared hour",
        "targets_s": TARGETS_S,
        "sizes": rows,
    }
