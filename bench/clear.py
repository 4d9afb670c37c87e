"""`meterchain bench clear`: time the market clearing against an all-pairs cvxpy model.

Ours: `meterchain.market.clearing.clear` on a seeded synthetic window of N
microgrids x 24 hours -- disagreement QPs, the stage-1 pool QP (PIQP on sparse
matrices built directly), integer rounding, bilateral decomposition and stage
2 -- median wall time of several runs.

Anchor, in the same run: the straightforward formulation, every ordered pair
of microgrids with its own trade variable P_ij,t >= 0 (N(N-1) x 24 of them)
written in cvxpy (vectorised, with sparse incidence matrices, which is
generous to it) and solved with Clarabel, plus the disagreement problem and
the same stage-2 split. It runs in a subprocess with a 60 s limit; a size
whose estimate (the last measured anchor time scaled by N^2.5, the growth it
showed: the pair count grows as N^2 and the solver's work a little faster)
exceeds 60 s is skipped with the reason. Measured on this 2-core machine the
anchor took 5 s at 25, 29 s at 50 and 125 s at 100 microgrids (N^2.3-2.5); with
N^2 the estimate from 25 came under the limit and the run at 100 was killed
after 70 s every time.
The anchor's optimum is reported next to ours (`objective_rel_diff`) to show
both solve the same problem. Sizes: 4, 25 (an extra measured anchor point),
100, then 1000, 2000, 5000 and 10000 (issue 18: no crash at any size, 10000 in
<= 15 s and <= 2.5 GB); ``--quick`` runs 4 and 100. Sizes from 1000 on run in
their own process, so each reports its own peak memory (`peak_rss_mb`), and
`growth_exponent` is the least-squares slope of log time against log N over
them. At 1000 a second solver (Clarabel) solves the same cooperative QP and
its objective is compared with PIQP's (`second_solver_rel_diff`).
`verify_seconds` (a backup's `verify.check` given its own result) must stay
below `seconds` at every size. `cpu_seconds` gives, from 1000 on, the CPU time
per `clear` of the clearing process and of the helper process (the cooperative
QP, and part of the continuation QPs): it does not grow with other work on the
machine as wall time does, so two runs under load compare by it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ANCHOR_LIMIT_S = 60.0
ANCHOR_GROWTH = 2.5  # the anchor's time as a power of N, as measured (see above)
TARGETS_S = {4: 0.050, 1000: 1.0, 10_000: 15.0}
TARGET_RSS_MB = {10_000: 2_500}
LARGE = (1_000, 2_000, 5_000, 10_000)
SEED = 1
REPO = Path(__file__).resolve().parents[1]


def _ours(n: int, repeats: int) -> tuple[float, int, float, dict[str, float]]:
    """(median seconds of `clear`, total cooperative cost, seconds of `verify.check`, CPU
    seconds per `clear` of this process and of the helper process)."""
    from meterchain.market import qp
    from meterchain.market.clearing import clear
    from meterchain.market.reference import synthetic_request
    from meterchain.market.verify import check

    request = synthetic_request(n, SEED)
    clear(request)  # warm imports and caches outside the timing
    times = []
    result = None
    cpu_start, helper_start = time.process_time(), qp.helper_cpu_seconds()
    for _ in range(repeats):
        start = time.perf_counter()
        result = clear(request)
        times.append(time.perf_counter() - start)
    # CPU time does not grow with other work on the machine, wall time does
    cpu = {
        "clearing": round((time.process_time() - cpu_start) / repeats, 3),
        "helper": round((qp.helper_cpu_seconds() - helper_start) / repeats, 3),
    }
    assert result is not None
    start = time.perf_counter()
    verdict = check(request, result, own=result)
    verify_s = time.perf_counter() - start
    if not verdict.accepted:
        raise RuntimeError(f"own result rejected by verify: {verdict.problems[:3]}")
    return statistics.median(times), sum(result.cooperative_cost), verify_s, cpu


def large_case(n: int, repeats: int) -> dict[str, Any]:
    """`_ours` at size n plus this process's peak memory (run it in a fresh process)."""
    import resource

    from meterchain.market import qp

    seconds, objective, verify_s, cpu = _ours(n, repeats)
    out: dict[str, Any] = {
        "seconds": seconds,
        "objective": objective,
        "verify_seconds": verify_s,
        "cpu_seconds": cpu,
    }
    # this process plus the helper that solves the cooperative QP at scale
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + qp.helper_peak_rss_kb()
    if n == LARGE[0]:
        out["second_solver_rel_diff"] = second_solver_gap(n)
    out["peak_rss_mb"] = peak_kb / 1024
    return out


def second_solver_gap(n: int) -> float:
    """Relative difference of the cooperative QP's optimum under Clarabel and PIQP."""
    import numpy as np

    from meterchain.market import qp
    from meterchain.market.reference import synthetic_request

    request = synthetic_request(n, SEED)
    coop = qp.build(request.market, request.microgrids, cooperative=True)

    def objective(x: np.ndarray) -> float:
        return float(0.5 * x @ (coop.p_diag * x) + coop.c @ x)

    ours = objective(qp.solve_only(coop, "piqp"))
    theirs = objective(qp.solve_only(coop, "clarabel"))
    return float(f"{abs(ours - theirs) / max(abs(ours), 1e-9):.2e}")


def _large_in_subprocess(n: int, repeats: int) -> dict[str, float] | str:
    code = (
        "import json\nfrom bench.clear import large_case\n"
        f"print(json.dumps(large_case({n}, {repeats})))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
        return f"exit {out.returncode}: {last}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def anchor_solve(n: int) -> dict[str, float]:
    """Solve the synthetic window with all-pairs bilateral trade variables in cvxpy."""
    import cvxpy as cp
    import numpy as np
    import scipy.sparse as sp

    from meterchain.market.clearing import equal_shares
    from meterchain.market.reference import synthetic_request

    request = synthetic_request(n, SEED)
    mgs = request.microgrids
    market = request.market
    start = time.perf_counter()
    t_len = mgs[0].periods
    kw, cur, quad = 1e-3, 1e-4, 1e-10
    ren = np.array([m.renewable_w for m in mgs]) * kw
    load = np.array([m.load_w for m in mgs]) * kw
    green = np.array([m.green_demand_w for m in mgs]) * kw
    lam = np.array([m.retail_price_per_kwh for m in mgs]) * cur
    gamma = np.array([[m.feed_in_tariff_per_kwh] for m in mgs]) * cur
    loss = np.array([[m.green_loss.coefficient_per_kwh] for m in mgs]) * cur
    eps = market.flow_wear_per_mw2h * quad
    ga = np.array([[m.gas.a_per_mw2h if m.gas else 0] for m in mgs]) * quad
    gb = np.array([[m.gas.b_per_kwh if m.gas else 0] for m in mgs]) * cur
    pmin = np.array([[m.gas.p_min_w if m.gas else 0] for m in mgs]) * kw
    pmax = np.array([[m.gas.p_max_w if m.gas else 0] for m in mgs]) * kw
    sto = [m.storage for m in mgs]
    chmax = np.array([[s.charge_max_w if s else 0] for s in sto]) * kw
    dismax = np.array([[s.discharge_max_w if s else 0] for s in sto]) * kw
    emin = np.array([[s.e_min_wh if s else 0] for s in sto]) * kw
    emax = np.array([[s.e_max_wh if s else 0] for s in sto]) * kw
    efin = np.array([[max(s.e_min_wh, s.e_final_min_wh or 0) if s else 0] for s in sto]) * kw
    e0 = np.array([[s.soc_wh if s else 0] for s in sto]) * kw
    eta = np.array([[s.efficiency_ppm / 1e6 if s else 1.0] for s in sto])
    half_fee = market.wheeling_fee_per_kwh / 2 * cur

    def problem(cooperative: bool) -> tuple[cp.Problem, cp.Variable, cp.Variable, dict[str, Any]]:
        g = cp.Variable((n, t_len))
        ch = cp.Variable((n, t_len), nonneg=True)
        dis = cp.Variable((n, t_len), nonneg=True)
        e = cp.Variable((n, t_len))
        imp = cp.Variable((n, t_len), nonneg=True)
        exp = cp.Variable((n, t_len), nonneg=True)
        d = cp.Variable((n, t_len), nonneg=True)
        cons = [g >= pmin, g <= pmax, ch <= chmax, dis <= dismax, e >= emin, e <= emax]
        cons += [e[:, -1:] >= efin]
        cons += [e[:, :1] == e0 + cp.multiply(eta, ch[:, :1]) - cp.multiply(1 / eta, dis[:, :1])]
        cons += [
            e[:, 1:] == e[:, :-1] + cp.multiply(eta, ch[:, 1:]) - cp.multiply(1 / eta, dis[:, 1:])
        ]
        cost = (
            cp.sum(cp.multiply(ga + eps, cp.square(g)))
            + cp.sum(cp.multiply(gb, g))
            + eps * (cp.sum_squares(ch) + cp.sum_squares(dis))
            + cp.sum(cp.multiply(lam, imp))
            - cp.sum(cp.multiply(gamma, exp))
            + cp.sum(cp.multiply(loss, d))
        )
        extra: dict[str, Any] = {}
        if cooperative:
            pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
            rows = np.arange(len(pairs))
            out = sp.csr_matrix(
                (np.ones(len(pairs)), ([i for i, _ in pairs], rows)), shape=(n, len(pairs))
            )
            inc = sp.csr_matrix(
                (np.ones(len(pairs)), ([j for _, j in pairs], rows)), shape=(n, len(pairs))
            )
            trade = cp.Variable((len(pairs), t_len), nonneg=True)  # P_ij,t for i -> j
            sell = out @ trade
            buy = inc @ trade
            cons += [sell <= np.clip(ren - green, 0, None)]
            cost += half_fee * (cp.sum(sell) + cp.sum(buy)) + eps * (
                cp.sum_squares(sell) + cp.sum_squares(buy)
            )
            extra["trade"] = trade
        else:
            sell = buy = np.zeros((n, t_len))
        cons += [g + dis - ch + imp - exp + buy - sell == load - ren]
        cons += [d >= green - ren + sell - buy]
        return cp.Problem(cp.Minimize(cost), cons), imp, exp, extra

    alone, _, _, _ = problem(False)
    alone.solve(solver=cp.CLARABEL)
    coop, _, _, _ = problem(True)
    coop.solve(solver=cp.CLARABEL)
    if coop.status != "optimal" or alone.status != "optimal":
        raise RuntimeError(f"anchor solve status {coop.status}/{alone.status}")
    # stage 2 on the solved objective (the split itself is trivial next to the solve)
    saving = round((alone.value - coop.value) / cur)
    equal_shares(saving, n)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "objective_minor": coop.value / cur}


def _anchor_in_subprocess(n: int, limit: float) -> dict[str, float] | str:
    code = (
        f"import json\nfrom bench.clear import anchor_solve\nprint(json.dumps(anchor_solve({n})))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=limit + 10,  # cvxpy import outside the anchor's own clock
        )
    except subprocess.TimeoutExpired:
        return f"killed: no result within the {limit:.0f} s limit"
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
        return f"anchor failed: {last}"
    data = json.loads(out.stdout.strip().splitlines()[-1])
    if data["seconds"] > limit:
        return f"took {data['seconds']:.1f} s, over the {limit:.0f} s limit"
    return data


def run(quick: bool) -> dict:
    # 25 microgrids is an extra anchor point: the largest size whose all-pairs model the
    # anchor finishes well inside its limit, so the ratio is measured at a real size.
    sizes = [4, 100] if quick else [4, 25, 100, *LARGE]
    repeats = {4: 5 if quick else 15, 25: 5, 100: 3 if quick else 5, 1000: 3}
    cases = []
    measured: list[tuple[int, float]] = []
    growth: list[tuple[int, float]] = []
    load_before = round(os.getloadavg()[0], 1)  # other work on the machine inflates wall time
    for n in sizes:
        case: dict[str, Any] = {"microgrids": n, "periods": 24}
        if n in LARGE:
            large = _large_in_subprocess(n, repeats.get(n, 1))
            if isinstance(large, str):
                case["failed"] = large
                cases.append(case)
                continue
            seconds, objective, verify_s = (
                large["seconds"], large["objective"], large["verify_seconds"]
            )  # fmt: skip
            case["peak_rss_mb"] = round(large["peak_rss_mb"])
            case["cpu_seconds"] = large["cpu_seconds"]
            if "second_solver_rel_diff" in large:
                case["second_solver_rel_diff"] = large["second_solver_rel_diff"]
            if n in TARGET_RSS_MB:
                case["target_rss_mb"] = TARGET_RSS_MB[n]
                case["meets_rss_target"] = large["peak_rss_mb"] <= TARGET_RSS_MB[n]
            growth.append((n, seconds))
        else:
            seconds, objective, verify_s, _ = _ours(n, repeats[n])
        case["seconds"] = round(seconds, 4)
        case["verify_seconds"] = round(verify_s, 4)
        case["verify_below_clear"] = verify_s < seconds
        if n in TARGETS_S:
            case["target_seconds"] = TARGETS_S[n]
            case["meets_target"] = seconds <= TARGETS_S[n]
        estimate = None
        if measured:
            n0, s0 = measured[-1]
            estimate = s0 * (n / n0) ** ANCHOR_GROWTH
        if estimate is not None and estimate > ANCHOR_LIMIT_S:
            case["anchor_seconds"] = None
            case["ratio"] = None
            case["anchor_estimated_seconds"] = round(estimate)
            case["anchor_skipped_reason"] = (
                f"estimated {estimate:.0f} s from {measured[-1][0]} microgrids "
                f"({measured[-1][1]:.2f} s; grows as N^{ANCHOR_GROWTH}): over the "
                f"{ANCHOR_LIMIT_S:.0f} s limit"
            )
        else:
            anchor = _anchor_in_subprocess(n, ANCHOR_LIMIT_S)
            if isinstance(anchor, str):
                case["anchor_seconds"] = None
                case["ratio"] = None
                case["anchor_skipped_reason"] = anchor
            else:
                measured.append((n, anchor["seconds"]))
                case["anchor_seconds"] = round(anchor["seconds"], 4)
                case["ratio"] = round(anchor["seconds"] / seconds, 1)
                scale = max(abs(anchor["objective_minor"]), 1.0)
                case["objective_rel_diff"] = float(
                    f"{abs(objective - anchor['objective_minor']) / scale:.2e}"
                )
        cases.append(case)
    out: dict[str, Any] = {
        "solver": "piqp (ours) vs cvxpy + clarabel all-pairs (anchor)",
        "cores": os.cpu_count(),
        "load_average_1min": [load_before, round(os.getloadavg()[0], 1)],
        "cases": cases,
    }
    if len(growth) >= 2:
        out["growth_exponent"] = round(_slope(growth), 2)
    return out


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(seconds) against log(N)."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(s) for _, s in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
