"""The window dispatch QP (M1-M4) as sparse matrices, and the solvers that run it.

One convex QP covers all microgrids and all periods of a clearing window.
Variables are laid out microgrid-major (all of microgrid 0's, then 1's, ...),
rows likewise, with the T pool rows last; so each microgrid's own problem is a
contiguous diagonal block and the stand-alone (disagreement) problems are
solved block by block from the same matrices.

Per microgrid i and period t (power in kW inside the solver, cost in currency
units, energy in kWh):

    gas        p_min <= g <= p_max          cost (a+eps) g^2 + b g
    charge     0 <= ch <= ch_max            cost eps ch^2
    discharge  0 <= dis <= dis_max          cost eps dis^2
    soc        e_min <= E <= e_max          E_t = E_{t-1} + eta ch - dis/eta
    import     0 <= imp <= limit            cost lambda_t imp
    export     0 <= exp                     cost -gamma exp
    sell       0 <= s <= max(0, R - G)      cost phi/2 s + eps s^2   (pool only)
    buy        0 <= b                       cost phi/2 b + eps b^2   (pool only)
    deficit_k  0 <= d_k <= width_k          cost slope_k d_k         (where G > R)
    short      0 <= u  (last period only)   cost kappa u             (storage target)

    balance    g + dis - ch + imp - exp + b - s = L - R
    green      sum_k d_k + b >= G - R      (where G > R; green bought counts)
    target     E_T + u >= E_final          (storage with an end-of-window target)
    pool       sum_i s_i,t = sum_i b_i,t   (one row per period)

The end-of-window storage target is soft: energy short of it costs kappa per
kWh (`model.target_shortfall_price`), far above what stored energy can earn,
so the plan meets the target whenever it can and a window whose target cannot
be met (a carried state a few Wh short, a last one-hour window) still clears.

Pool rows at scale: one pool row per period couples all N microgrids; from
``POOL_GROUP_FROM`` microgrids on, each period's pool is split into about
sqrt(N) group rows, each with a free group-balance variable y_g,t
(sum over the group of s - b = y_g,t), and one top row sum_g y_g,t = 0. The
optimum is the same; the factorisation stays sparse (no dense rows).

Sales are capped at the green surplus R - G, so green generation serves the
seller's own green demand first, as settlement (M5) assumes. Stored energy is
not tracked by colour: battery discharge does not count as green supply.

Solvers: PIQP (proximal interior point, native variable bounds; default) and
Clarabel (interior point, bounds as cone rows). `solve` never believes one
solver's "infeasible" or failure: the other solver must confirm it (PIQP
declares some feasible windows infeasible, e.g. with a feed-in tariff of 0).
HiGHS was measured first: its QP path is an active-set method that took 7 s on
100 microgrids x 24 h and stopped without a status, against 0.07 s for PIQP,
so it is not used here.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from meterchain.market.errors import MarketError, SolverFailure
from meterchain.market.model import Market, Microgrid, target_shortfall_price

POOL_GROUP_FROM = 64

SOLVERS = ("piqp", "clarabel")

KW = 1e-3  # W -> kW
CUR = 1e-4  # money minor units -> currency units (objective scale)
QUAD = 1e-10  # minor units per MW^2 h -> currency per kW^2 h

BASE_TYPES = ("gas", "charge", "discharge", "soc", "import", "export", "sell", "buy", "short")


@dataclass
class WindowQP:
    """min 1/2 x'Px + c'x  s.t.  A_eq x = b_eq,  l_in <= A_in x <= u_in,  lb <= x <= ub."""

    p_diag: np.ndarray
    c: np.ndarray
    a_eq: sp.csc_matrix
    b_eq: np.ndarray
    a_in: sp.csc_matrix
    l_in: np.ndarray
    u_in: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    index: dict[str, np.ndarray]  # variable type -> (N, T) column index, -1 where absent
    col_off: np.ndarray  # (N+1,) microgrid column ranges (group-balance columns follow)
    eq_off: np.ndarray  # (N+1,) microgrid equality-row ranges (pool rows follow)
    in_off: np.ndarray  # (N+1,) microgrid inequality-row ranges
    deficit_types: tuple[str, ...]

    @property
    def size(self) -> int:
        return int(self.c.shape[0])


def _layout(presence: np.ndarray) -> np.ndarray:
    """Microgrid-major indices for a (K, N, T) presence mask; -1 where absent."""
    k, n, t = presence.shape
    order = presence.transpose(1, 0, 2).reshape(-1)
    idx = np.cumsum(order) - 1
    idx = np.where(order, idx, -1)
    return idx.reshape(n, k, t).transpose(1, 0, 2)


def build(market: Market, microgrids: Sequence[Microgrid], cooperative: bool) -> WindowQP:
    """The window QP for all microgrids; without ``cooperative`` there is no pool (disagreement)."""
    n = len(microgrids)
    t_len = microgrids[0].periods
    ren = np.array([m.renewable_w for m in microgrids], dtype=float)
    load = np.array([m.load_w for m in microgrids], dtype=float)
    green = np.array([m.green_demand_w for m in microgrids], dtype=float)
    lam = np.array([m.retail_price_per_kwh for m in microgrids], dtype=float)
    gamma = np.array([m.feed_in_tariff_per_kwh for m in microgrids], dtype=float)
    has_gas = np.array([m.gas is not None for m in microgrids])
    has_sto = np.array([m.storage is not None for m in microgrids])
    n_seg = np.array([len(m.green_loss.segments) for m in microgrids])
    k_max = int(n_seg.max())
    deficit_types = tuple(f"deficit{k}" for k in range(k_max))
    types = BASE_TYPES + deficit_types

    has_target = np.array(
        [
            m.storage is not None
            and m.storage.e_final_min_wh is not None
            and m.storage.e_final_min_wh > m.storage.e_min_wh
            for m in microgrids
        ]
    )
    short = green > ren  # green deficit possible without purchases
    surplus = ren > green
    ones = np.ones((n, t_len), dtype=bool)
    presence = {
        "gas": has_gas[:, None] & ones,
        "charge": has_sto[:, None] & ones,
        "discharge": has_sto[:, None] & ones,
        "soc": has_sto[:, None] & ones,
        "import": ones,
        "export": ones,
        "sell": surplus & cooperative,
        "buy": ones & cooperative,
        "short": has_target[:, None] & (np.arange(t_len) == t_len - 1)[None, :],
    }
    for k, name in enumerate(deficit_types):
        presence[name] = short & (n_seg > k)[:, None]
    pres = np.stack([presence[name] for name in types])
    idx_all = _layout(pres)
    index = {name: idx_all[k] for k, name in enumerate(types)}
    nv_mg = int(pres.sum())
    counts = pres.sum(axis=(0, 2))
    col_off = np.concatenate([[0], np.cumsum(counts)])
    groups = math.isqrt(n - 1) + 1 if cooperative and n >= POOL_GROUP_FROM else 1
    n_y = groups * t_len if groups > 1 else 0
    nv = nv_mg + n_y

    lb = np.zeros(nv)
    ub = np.full(nv, np.inf)
    c = np.zeros(nv)
    p_diag = np.zeros(nv)
    eps = market.flow_wear_per_mw2h

    def put(name: str, values: np.ndarray | float, target: np.ndarray) -> None:
        cols = index[name]
        mask = cols >= 0
        target[cols[mask]] = np.broadcast_to(values, cols.shape)[mask]

    if has_gas.any():
        pmin = np.array([m.gas.p_min_w if m.gas else 0 for m in microgrids], dtype=float)
        pmax = np.array([m.gas.p_max_w if m.gas else 0 for m in microgrids], dtype=float)
        ga = np.array([m.gas.a_per_mw2h if m.gas else 0 for m in microgrids], dtype=float)
        gb = np.array([m.gas.b_per_kwh if m.gas else 0 for m in microgrids], dtype=float)
        put("gas", (pmin * KW)[:, None], lb)
        put("gas", (pmax * KW)[:, None], ub)
        put("gas", (gb * CUR)[:, None], c)
        put("gas", (2 * (ga + eps) * QUAD)[:, None], p_diag)
    eta = np.ones(n)
    e0 = np.zeros(n)
    if has_sto.any():
        sto = [m.storage for m in microgrids]
        chmax = np.array([s.charge_max_w if s else 0 for s in sto], dtype=float)
        dismax = np.array([s.discharge_max_w if s else 0 for s in sto], dtype=float)
        emin = np.array([s.e_min_wh if s else 0 for s in sto], dtype=float)
        emax = np.array([s.e_max_wh if s else 0 for s in sto], dtype=float)
        eta = np.array([s.efficiency_ppm / 1e6 if s else 1.0 for s in sto])
        e0 = np.array([s.soc_wh if s else 0 for s in sto], dtype=float)
        put("charge", (chmax * KW)[:, None], ub)
        put("discharge", (dismax * KW)[:, None], ub)
        put("soc", (emin * KW)[:, None], lb)
        put("soc", (emax * KW)[:, None], ub)
        put("charge", 2 * eps * QUAD, p_diag)
        put("discharge", 2 * eps * QUAD, p_diag)
    if has_target.any():
        kappa = np.array([target_shortfall_price(m) for m in microgrids], dtype=float)
        put("short", (kappa * CUR)[:, None], c)
    lb[nv_mg:] = -np.inf
    limit = np.array(
        [np.inf if m.grid_import_limit_w is None else m.grid_import_limit_w for m in microgrids],
        dtype=float,
    )
    put("import", (limit * KW)[:, None], ub)
    put("import", lam * CUR, c)
    put("export", (-gamma * CUR)[:, None], c)
    if cooperative:
        half_fee = market.wheeling_fee_per_kwh / 2 * CUR
        put("sell", (ren - green).clip(min=0) * KW, ub)
        put("sell", half_fee, c)
        put("buy", half_fee, c)
        put("sell", 2 * eps * QUAD, p_diag)
        put("buy", 2 * eps * QUAD, p_diag)
    for k, name in enumerate(deficit_types):
        width = np.array(
            [
                (m.green_loss.segments[k][0] or np.inf) if k < len(m.green_loss.segments) else 0
                for m in microgrids
            ],
            dtype=float,
        )
        slope = np.array(
            [
                m.green_loss.segments[k][1] if k < len(m.green_loss.segments) else 0
                for m in microgrids
            ],
            dtype=float,
        )
        put(name, (width * KW)[:, None], ub)
        put(name, (slope * CUR)[:, None], c)

    # Equality rows, microgrid-major: balance (every period), soc (storage only).
    eq_pres = np.stack([ones, has_sto[:, None] & ones])
    eq_idx = _layout(eq_pres)
    row_bal, row_soc = eq_idx[0], eq_idx[1]
    n_eq_mg = int(eq_pres.sum())
    eq_off = np.concatenate([[0], np.cumsum(eq_pres.sum(axis=(0, 2)))])
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []

    def add(row: np.ndarray, name: str, coef: np.ndarray | float, t_shift: int = 0) -> None:
        col = index[name]
        if t_shift:
            col = np.concatenate([np.full((n, t_shift), -1), col[:, :-t_shift]], axis=1)
        coef_full = np.broadcast_to(coef, row.shape)
        mask = (row >= 0) & (col >= 0)
        rows.append(row[mask])
        cols.append(col[mask])
        vals.append(coef_full[mask].astype(float))

    add(row_bal, "gas", 1.0)
    add(row_bal, "discharge", 1.0)
    add(row_bal, "charge", -1.0)
    add(row_bal, "import", 1.0)
    add(row_bal, "export", -1.0)
    if cooperative:
        add(row_bal, "buy", 1.0)
        add(row_bal, "sell", -1.0)
    add(row_soc, "soc", 1.0)
    add(row_soc, "soc", -1.0, t_shift=1)
    add(row_soc, "charge", -eta[:, None])
    add(row_soc, "discharge", (1.0 / eta)[:, None])
    n_pool = (groups * t_len + t_len if groups > 1 else t_len) if cooperative else 0
    b_eq = np.zeros(n_eq_mg + n_pool)
    b_eq[row_bal.ravel()] = ((load - ren) * KW).ravel()
    first_soc = row_soc[:, 0]
    b_eq[first_soc[first_soc >= 0]] = (e0 * KW)[first_soc >= 0]
    if cooperative:
        if groups > 1:
            group = (np.arange(n) * groups // n)[:, None]
            pool_row = n_eq_mg + group * t_len + np.arange(t_len)[None, :]
        else:
            pool_row = n_eq_mg + np.broadcast_to(np.arange(t_len), (n, t_len))
        add(pool_row, "sell", 1.0)
        add(pool_row, "buy", -1.0)
        if groups > 1:
            y_col = nv_mg + np.arange(groups * t_len)
            rows += [n_eq_mg + np.arange(groups * t_len), n_eq_mg + groups * t_len + y_col % t_len]
            cols += [y_col, y_col]
            vals += [np.full(groups * t_len, -1.0), np.ones(groups * t_len)]
    a_eq = sp.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(b_eq.shape[0], nv),
    )

    # Inequality rows: green accounting where G > R, the storage target in the last period.
    target = presence["short"]
    in_pres = np.stack([short, target])
    in_idx = _layout(in_pres)
    row_green, row_target = in_idx[0], in_idx[1]
    n_in = int(in_pres.sum())
    in_off = np.concatenate([[0], np.cumsum(in_pres.sum(axis=(0, 2)))])
    rows, cols, vals = [], [], []
    for name in deficit_types:
        add(row_green, name, 1.0)
    if cooperative:
        add(row_green, "buy", 1.0)
    add(row_target, "soc", 1.0)
    add(row_target, "short", 1.0)
    l_in = np.zeros(n_in)
    l_in[row_green[short]] = ((green - ren) * KW)[short]
    if has_target.any():
        efin_all = np.array(
            [
                m.storage.e_final_min_wh if m.storage and m.storage.e_final_min_wh else 0
                for m in microgrids
            ],
            dtype=float,
        )
        l_in[row_target[target]] = np.broadcast_to((efin_all * KW)[:, None], target.shape)[target]
    a_in = sp.csc_matrix(
        (
            np.concatenate(vals) if vals else np.zeros(0),
            (
                np.concatenate(rows) if rows else np.zeros(0, dtype=int),
                np.concatenate(cols) if cols else np.zeros(0, dtype=int),
            ),
        ),
        shape=(n_in, nv),
    )
    return WindowQP(
        p_diag=p_diag,
        c=c,
        a_eq=a_eq,
        b_eq=b_eq,
        a_in=a_in,
        l_in=l_in,
        u_in=np.full(n_in, np.inf),
        lb=lb,
        ub=ub,
        index=index,
        col_off=col_off,
        eq_off=eq_off,
        in_off=in_off,
        deficit_types=deficit_types,
    )


def _block(matrix: sp.csc_matrix, r0: int, r1: int, c0: int, c1: int) -> sp.csc_matrix:
    """Columns c0:c1 of a block-diagonal CSC matrix whose entries there lie in rows r0:r1."""
    start, stop = matrix.indptr[c0], matrix.indptr[c1]
    return sp.csc_matrix(
        (
            matrix.data[start:stop],
            matrix.indices[start:stop] - r0,
            matrix.indptr[c0 : c1 + 1] - start,
        ),
        shape=(r1 - r0, c1 - c0),
    )


def solve_standalone(
    qp: WindowQP,
    ids: Sequence[str],
    solver: str,
    only: Sequence[int] | None = None,
    blocks: Sequence[WindowQP] | Mapping[int, WindowQP] | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Solve each microgrid's own block (the disagreement problems) and stack the solutions.

    Returns (x, infeasible): ``infeasible`` maps the id of every microgrid whose
    own block has no solution (both solvers agree) to the reason; its part of
    x stays 0. ``only`` restricts the solve to those microgrid indices.
    ``blocks[i]``, where given, is microgrid i's block already cut (`own_block`),
    possibly with other variable bounds. A large batch is shared with the helper
    process whenever it is free (`_start_blocks`).
    """
    return solve_standalone_later(qp, ids, solver, only, blocks)()


def solve_standalone_later(
    qp: WindowQP,
    ids: Sequence[str],
    solver: str,
    only: Sequence[int] | None = None,
    blocks: Sequence[WindowQP] | Mapping[int, WindowQP] | None = None,
) -> Callable[[], tuple[np.ndarray, dict[str, str]]]:
    """Start `solve_standalone` and return the function that finishes it: the helper's
    share is queued now, this process solves its own share when the function is called,
    so work done in between overlaps the helper's (`_start_blocks`)."""
    chosen = list(range(len(ids))) if only is None else list(only)
    parts = [own_block(qp, i) if blocks is None else blocks[i] for i in chosen]
    outcomes = _start_blocks(parts, solver)

    def finish() -> tuple[np.ndarray, dict[str, str]]:
        x = np.zeros(qp.size)
        infeasible: dict[str, str] = {}
        for i, outcome in zip(chosen, outcomes(), strict=True):
            if isinstance(outcome, str):
                infeasible[ids[i]] = outcome
            else:
                x[int(qp.col_off[i]) : int(qp.col_off[i + 1])] = outcome
        return x, infeasible

    return finish


def own_block(qp: WindowQP, i: int) -> WindowQP:
    """Microgrid ``i``'s own problem: its diagonal block of ``qp`` (columns from 0)."""
    c0, c1 = int(qp.col_off[i]), int(qp.col_off[i + 1])
    e0, e1 = int(qp.eq_off[i]), int(qp.eq_off[i + 1])
    i0, i1 = int(qp.in_off[i]), int(qp.in_off[i + 1])
    return WindowQP(
        p_diag=qp.p_diag[c0:c1],
        c=qp.c[c0:c1],
        a_eq=_block(qp.a_eq, e0, e1, c0, c1),
        b_eq=qp.b_eq[e0:e1],
        a_in=_block(qp.a_in, i0, i1, c0, c1),
        l_in=qp.l_in[i0:i1],
        u_in=qp.u_in[i0:i1],
        lb=qp.lb[c0:c1],
        ub=qp.ub[c0:c1],
        index={},
        col_off=np.array([0, c1 - c0]),
        eq_off=np.array([0, e1 - e0]),
        in_off=np.array([0, i1 - i0]),
        deficit_types=qp.deficit_types,
    )


def solve_each(parts: Sequence[WindowQP], solver: str) -> list[np.ndarray | str]:
    """`solve` of every QP in turn: its x, or the reason where it is `Infeasible`."""
    out: list[np.ndarray | str] = []
    for part in parts:
        try:
            out.append(solve(part, solver))
        except Infeasible as exc:
            out.append(str(exc))
    return out


def _diagonal(values: np.ndarray) -> sp.csc_matrix:
    n = values.shape[0]
    ramp = np.arange(n + 1, dtype=np.int32)
    return sp.csc_matrix((values, ramp[:n], ramp), shape=(n, n))


class Infeasible(MarketError):
    """Both solvers found that the constraints of a QP cannot all hold."""


PARALLEL_FROM = 50_000
"""QPs with at least this many variables (about 330 microgrids x 24 h, some 150 variables a
microgrid) are solved in a helper process while the caller goes on (the disagreement
problems on the other core): from there on the saving outweighs shipping the QP
(1000 microgrids: 149,489 variables, 0.6 s of solve beside 0.25 s of disagreement QPs)."""

_helper: ProcessPoolExecutor | None = None
_helper_task: Future[np.ndarray] | None = None  # the last QP handed to the helper


def _helper_idle() -> bool:
    return _helper_task is None or _helper_task.done()


def _peak_rss_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def stop_helper() -> None:
    """Shut the helper process down (the next large solve starts a new one)."""
    global _helper, _helper_task
    if _helper is not None:
        _helper.shutdown(cancel_futures=True)
    _helper, _helper_task = None, None


def helper_peak_rss_kb() -> int:
    """Peak resident memory of the helper process (KB; 0 if none was started)."""
    return 0 if _helper is None else _helper.submit(_peak_rss_kb).result()


def helper_cpu_seconds() -> float:
    """CPU time the helper process has used so far (s; 0 if none was started)."""
    return 0.0 if _helper is None else _helper.submit(time.process_time).result()


def solve_later(qp: WindowQP, solver: str) -> Callable[[], np.ndarray]:
    """Start `solve` of ``qp`` and return a function that waits for its x.

    Large QPs go to one persistent helper process (forkserver, so it never inherits
    a service's threads); the same code runs there, so x is the same as a local
    solve. Small ones, or a helper that cannot start, are solved when asked.
    """
    global _helper, _helper_task
    if qp.size < PARALLEL_FROM:
        return lambda: solve(qp, solver)
    try:
        if _helper is None:
            _helper = ProcessPoolExecutor(1, mp_context=mp.get_context("forkserver"))
        # without the column index, which the solver does not use (a fifth of the bytes)
        future = _helper_task = _helper.submit(solve, replace(qp, index={}), solver)
    except (OSError, RuntimeError, BrokenProcessPool):
        _helper = None
        return lambda: solve(qp, solver)

    def wait() -> np.ndarray:
        global _helper
        try:
            return future.result()
        except BrokenProcessPool:
            _helper = None
            return solve(qp, solver)

    return wait


SHARE_FROM = 128
"""Batches of at least this many small QPs are shared with the helper process, if one runs
and is idle (`_start_blocks`)."""

SHARE_CHUNKS = 16
"""Pieces a shared batch is cut into: the two processes end at most one piece apart."""


def _start_blocks(parts: Sequence[WindowQP], solver: str) -> Callable[[], list[np.ndarray | str]]:
    """Start `solve_each` of ``parts``, with the helper process taking chunks from the end;
    the returned function solves this process's share and collects every outcome.

    The chunks after the first are queued for the helper last-first at once; when the
    returned function is called, this process solves from the front, withdrawing
    (`Future.cancel`) each chunk it reaches that the helper has not started; the first
    chunk the helper holds ends this process's share, so both finish together. The last
    chunk is always the helper's (one chunk's wait at most if it starts late). A busy
    helper (solving the cooperative QP) is left alone: the process pool would hand it
    two chunks at once, which this process would then wait for behind that QP. Each QP
    is solved by the same code wherever it runs, so the outcome does not depend on the
    split.
    """
    global _helper
    if _helper is None or len(parts) < SHARE_FROM or not _helper_idle():
        return lambda: solve_each(parts, solver)
    step = -(-len(parts) // SHARE_CHUNKS)
    chunks = [parts[k : k + step] for k in range(0, len(parts), step)]
    queued: dict[int, Future[list[np.ndarray | str]]] = {}
    try:
        for k in reversed(range(1, len(chunks))):
            queued[k] = _helper.submit(_solve_stacked, _stack(chunks[k]), solver)
    except (OSError, RuntimeError, BrokenProcessPool):
        for future in queued.values():
            future.cancel()
        _helper = None
        return lambda: solve_each(parts, solver)

    def finish() -> list[np.ndarray | str]:
        global _helper
        out: list[np.ndarray | str] = []
        mine = 0
        while mine == 0 or (mine < len(chunks) - 1 and queued[mine].cancel()):
            out += solve_each(chunks[mine], solver)
            mine += 1
        for k in range(mine, len(chunks)):
            try:
                out += queued[k].result()
            except BrokenProcessPool:
                _helper = None
                out += solve_each(chunks[k], solver)
        return out

    return finish


def _stack(parts: Sequence[WindowQP]) -> WindowQP:
    """The block-diagonal QP of ``parts``, to ship a chunk to the helper as a few arrays:
    pickling thousands of small QPs cost 0.27 ms each, more than solving one (0.17 ms)."""
    col_off = np.cumsum([0] + [p.size for p in parts])
    eq_off = np.cumsum([0] + [p.b_eq.shape[0] for p in parts])
    in_off = np.cumsum([0] + [p.l_in.shape[0] for p in parts])

    def diagonal(blocks: list[sp.csc_matrix], row_off: np.ndarray) -> sp.csc_matrix:
        nnz_off = np.cumsum([0] + [b.indptr[-1] for b in blocks])
        return sp.csc_matrix(
            (
                np.concatenate([b.data for b in blocks]),
                np.concatenate([b.indices + r for b, r in zip(blocks, row_off, strict=False)]),
                np.concatenate(
                    [[0]] + [b.indptr[1:] + o for b, o in zip(blocks, nnz_off, strict=False)]
                ),
            ),
            shape=(int(row_off[-1]), int(col_off[-1])),
        )

    def joined(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    return WindowQP(
        p_diag=joined("p_diag"),
        c=joined("c"),
        a_eq=diagonal([p.a_eq for p in parts], eq_off),
        b_eq=joined("b_eq"),
        a_in=diagonal([p.a_in for p in parts], in_off),
        l_in=joined("l_in"),
        u_in=joined("u_in"),
        lb=joined("lb"),
        ub=joined("ub"),
        index={},
        col_off=col_off,
        eq_off=eq_off,
        in_off=in_off,
        deficit_types=parts[0].deficit_types,
    )


def _solve_stacked(stacked: WindowQP, solver: str) -> list[np.ndarray | str]:
    """`solve_each` of the blocks of a `_stack` (in the helper): the same QPs as the parts."""
    return solve_each([own_block(stacked, k) for k in range(len(stacked.col_off) - 1)], solver)


def solve(qp: WindowQP, solver: str) -> np.ndarray:
    """Optimal x of ``qp`` (kW/kWh units): the named solver, the other one if it gives up.

    Raises `Infeasible` only when both solvers say so (or one fails and the other
    says so), `SolverFailure` when neither finds an optimum.
    """
    if solver not in SOLVERS:
        raise MarketError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    try:
        return _SOLVE[solver](qp)
    except (Infeasible, SolverFailure) as first:
        other = SOLVERS[1 - SOLVERS.index(solver)]
        try:
            return _SOLVE[other](qp)
        except Infeasible:
            # Infeasible by both, or by the only solver that could decide.
            verdict = "infeasible" if isinstance(first, Infeasible) else "failed"
            raise Infeasible(
                f"constraints cannot all hold ({solver} {verdict}, {other} infeasible)"
            ) from None
        except SolverFailure:
            raise first from None


def _solve_piqp(qp: WindowQP) -> np.ndarray:
    import piqp

    engine = piqp.SparseSolver()
    settings = engine.settings
    settings.verbose = False
    settings.eps_abs = 1e-9
    settings.eps_rel = 1e-10
    settings.max_iter = 500
    if hasattr(settings, "num_threads"):
        settings.num_threads = 1  # one thread: the same floats on every run
    engine.setup(
        _diagonal(qp.p_diag),
        qp.c,
        qp.a_eq,
        qp.b_eq,
        qp.a_in,
        qp.l_in,
        qp.u_in,
        qp.lb,
        qp.ub,
    )
    status = engine.solve()
    if status == piqp.Status.PIQP_PRIMAL_INFEASIBLE:
        raise Infeasible("constraints cannot all hold")
    if status != piqp.Status.PIQP_SOLVED:
        raise SolverFailure(f"PIQP stopped with status {status.name}")
    # a copy: the result's x is a view that keeps the whole solver (its KKT factor) alive
    return np.array(engine.result.x, dtype=float)


def _solve_clarabel(qp: WindowQP) -> np.ndarray:
    try:
        import clarabel
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise SolverFailure("the clarabel solver is not installed") from exc
    n = qp.size
    ramp = np.arange(n)
    eye = sp.csr_matrix((np.ones(n), (ramp, ramp)), shape=(n, n))
    lo_f = np.isfinite(qp.lb)
    hi_f = np.isfinite(qp.ub)
    l_f = np.isfinite(qp.l_in)
    u_f = np.isfinite(qp.u_in)
    a_in = qp.a_in.tocsr()
    a_cone = sp.vstack([-a_in[l_f], a_in[u_f], -eye[lo_f], eye[hi_f]], format="csr")
    b_cone = np.concatenate([-qp.l_in[l_f], qp.u_in[u_f], -qp.lb[lo_f], qp.ub[hi_f]])
    a = sp.vstack([qp.a_eq, a_cone], format="csc")
    b = np.concatenate([qp.b_eq, b_cone])
    n_eq, n_cone = qp.b_eq.shape[0], b_cone.shape[0]
    cones = [clarabel.ZeroConeT(n_eq), clarabel.NonnegativeConeT(n_cone)]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = 1e-10
    settings.tol_gap_rel = 1e-10
    settings.tol_feas = 1e-10
    settings.max_threads = 1
    engine = clarabel.DefaultSolver(_diagonal(qp.p_diag), qp.c, a, b, cones, settings)
    solution = engine.solve()
    status = str(solution.status)
    if "Infeasible" in status and "Almost" not in status:
        raise Infeasible("constraints cannot all hold")
    if status not in ("Solved", "AlmostSolved"):
        raise SolverFailure(f"Clarabel stopped with status {status}")
    return np.asarray(solution.x, dtype=float)


_SOLVE = {"piqp": _solve_piqp, "clarabel": _solve_clarabel}


def solve_only(qp: WindowQP, solver: str) -> np.ndarray:
    """Optimal x of ``qp`` with the named solver alone, no fallback (to compare solvers)."""
    if solver not in _SOLVE:
        raise MarketError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    return _SOLVE[solver](qp)
