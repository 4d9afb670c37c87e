"""Microgrid and market model (M1, M1a): validated, frozen records in integer units.

A `Microgrid` describes one microgrid over a clearing window of hourly periods:
renewable (green) output R, load L of which G needs green power, a gas turbine
with cost a*P^2 + b*P, storage with power limits, one-way efficiency eta, energy
bounds and the state of charge carried in from the previous period, the retail
price lambda_t, the feed-in tariff gamma and an optional grid import limit. The
`Market` holds the rules every microgrid shares: the wheeling fee phi, the flow
wear term that makes the optimum unique, and the deposit rules of SC1.

Units (see `units`): power W, energy Wh, money minor units (MONEY_SCALE per
currency unit), prices minor units per kWh, quadratic cost coefficients minor
units per MW^2 h. Periods are one hour.

Every constructor validates its fields; a bad value raises `InvalidModel`
naming the field ("microgrid mg2: storage.e_max_wh (100) < e_min_wh (200)").
`to_dict`/`from_dict` give the canonical plain form hashed into requests.

Green deficit loss (M1a): `GreenLoss` is a convex piecewise-linear function of
the deficit, given as consecutive segments (width in Wh, slope in minor units
per kWh) with non-decreasing slopes; `GreenLoss.linear(c)` is the default
c * max(0, G - green supply). Any convex shape plugs in as segments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meterchain.market.errors import InvalidModel
from meterchain.market.units import COST_SCALE

GRID_COMPANY = "@grid"
"""Ledger party of the grid company (wheeling fees, retail purchases, feed-in)."""
RESERVE = "@reserve"
"""Ledger party holding deposits (SC1) until settlement (SC2)."""

MAX_PERIODS = 96
MAX_POWER_W = 10**10  # 10 GW: anything larger is a unit mistake, not a microgrid
MAX_PRICE = 10**9  # minor units per kWh (100 000 currency units per kWh)
MAX_QUAD = 10**13  # minor units per MW^2 h
PPM = 1_000_000

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def _int(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Check one integer field (bool and float are refused: units are integers)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidModel(None, name, f"must be an integer, got {type(value).__name__}")
    if low is not None and value < low:
        raise InvalidModel(None, name, f"({value}) < {low}")
    if high is not None and value > high:
        raise InvalidModel(None, name, f"({value}) > {high}")
    return value


def _int_series(values: object, name: str, *, low: int, high: int) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise InvalidModel(None, name, "must be a sequence of integers")
    out = []
    for t, value in enumerate(values):
        out.append(_int(value, f"{name}[{t}]", low=low, high=high))
    return tuple(out)


@dataclass(frozen=True)
class GreenLoss:
    """Convex piecewise-linear green deficit loss (M1a).

    ``segments`` are consecutive pieces of the deficit axis: (width in Wh, slope
    in minor units per kWh); the last width is None (unbounded). Slopes must not
    decrease, which is exactly convexity. The loss of a deficit of d Wh is
    sum over pieces of slope * (the part of d inside the piece) / 1000.
    """

    segments: tuple[tuple[int | None, int], ...]

    def __post_init__(self) -> None:
        segs = self.segments
        if isinstance(segs, str | bytes) or not isinstance(segs, Sequence) or not segs:
            raise InvalidModel(None, "green_loss.segments", "must be a non-empty list")
        clean: list[tuple[int | None, int]] = []
        previous_slope = 0
        for k, seg in enumerate(segs):
            if isinstance(seg, str | bytes) or not isinstance(seg, Sequence) or len(seg) != 2:
                raise InvalidModel(None, f"green_loss.segments[{k}]", "must be [width_wh, slope]")
            width, slope = seg
            last = k == len(segs) - 1
            if last:
                if width is not None:
                    raise InvalidModel(
                        None, f"green_loss.segments[{k}].width_wh", "of the last piece must be null"
                    )
            else:
                width = _int(width, f"green_loss.segments[{k}].width_wh", low=1, high=MAX_POWER_W)
            slope = _int(slope, f"green_loss.segments[{k}].slope_per_kwh", low=0, high=MAX_PRICE)
            if slope < previous_slope:
                raise InvalidModel(
                    None,
                    f"green_loss.segments[{k}].slope_per_kwh",
                    f"({slope}) < previous slope ({previous_slope}): the loss must be convex",
                )
            previous_slope = slope
            clean.append((width, slope))
        object.__setattr__(self, "segments", tuple(clean))

    @classmethod
    def linear(cls, coefficient_per_kwh: int) -> GreenLoss:
        """The default loss c * deficit, c in minor units per kWh."""
        return cls(((None, coefficient_per_kwh),))

    @property
    def coefficient_per_kwh(self) -> int:
        """c: the loss of the first kWh short (minor units per kWh); M5 compensates at this rate."""
        return self.segments[0][1]

    def cost_e3(self, deficit_wh: int) -> int:
        """Loss of ``deficit_wh`` in thousandths of a money minor unit (exact integer)."""
        remaining = max(0, deficit_wh)
        total = 0
        for width, slope in self.segments:
            part = remaining if width is None else min(remaining, width)
            total += slope * part
            remaining -= part
            if remaining <= 0:
                break
        return total

    def to_list(self) -> list[list[int | None]]:
        return [[width, slope] for width, slope in self.segments]

    @classmethod
    def from_list(cls, value: object) -> GreenLoss:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise InvalidModel(None, "green_loss", "must be a list of [width_wh, slope] pieces")
        return cls(tuple(tuple(seg) if isinstance(seg, list) else seg for seg in value))  # type: ignore[arg-type]


@dataclass(frozen=True)
class GasTurbine:
    """Gas turbine with cost a*P^2 + b*P (a per MW^2 h, b per kWh) and output limits in W.

    The output is continuous in [p_min_w, p_max_w] (no on/off decision).
    """

    a_per_mw2h: int
    b_per_kwh: int
    p_max_w: int
    p_min_w: int = 0

    def __post_init__(self) -> None:
        _int(self.a_per_mw2h, "gas.a_per_mw2h", low=0, high=MAX_QUAD)
        _int(self.b_per_kwh, "gas.b_per_kwh", low=0, high=MAX_PRICE)
        _int(self.p_min_w, "gas.p_min_w", low=0, high=MAX_POWER_W)
        _int(self.p_max_w, "gas.p_max_w", low=0, high=MAX_POWER_W)
        if self.p_max_w < self.p_min_w:
            raise InvalidModel(None, "gas.p_max_w", f"({self.p_max_w}) < p_min_w ({self.p_min_w})")

    def to_dict(self) -> dict[str, int]:
        return {
            "a_per_mw2h": self.a_per_mw2h,
            "b_per_kwh": self.b_per_kwh,
            "p_min_w": self.p_min_w,
            "p_max_w": self.p_max_w,
        }

    @classmethod
    def from_dict(cls, value: object) -> GasTurbine:
        data = _mapping(value, "gas", ("a_per_mw2h", "b_per_kwh", "p_min_w", "p_max_w"))
        return cls(**data)


@dataclass(frozen=True)
class Storage:
    """Battery: power limits (W), one-way efficiency (ppm), energy bounds and state (Wh).

    Energy moves as soc' = soc + eta*charge - discharge/eta per hour. ``soc_wh``
    is the state at the start of the window (carried from the previous period);
    ``e_final_min_wh``, if set, is the least energy left at the end of the window.
    """

    charge_max_w: int
    discharge_max_w: int
    efficiency_ppm: int
    e_min_wh: int
    e_max_wh: int
    soc_wh: int
    e_final_min_wh: int | None = None

    def __post_init__(self) -> None:
        _int(self.charge_max_w, "storage.charge_max_w", low=0, high=MAX_POWER_W)
        _int(self.discharge_max_w, "storage.discharge_max_w", low=0, high=MAX_POWER_W)
        _int(self.efficiency_ppm, "storage.efficiency_ppm", low=1, high=PPM)
        _int(self.e_min_wh, "storage.e_min_wh", low=0, high=MAX_POWER_W * 100)
        _int(self.e_max_wh, "storage.e_max_wh", low=0, high=MAX_POWER_W * 100)
        _int(self.soc_wh, "storage.soc_wh", low=0, high=MAX_POWER_W * 100)
        if self.e_max_wh < self.e_min_wh:
            raise InvalidModel(
                None, "storage.e_max_wh", f"({self.e_max_wh}) < e_min_wh ({self.e_min_wh})"
            )
        if not self.e_min_wh <= self.soc_wh <= self.e_max_wh:
            raise InvalidModel(
                None,
                "storage.soc_wh",
                f"({self.soc_wh}) outside [e_min_wh, e_max_wh] = "
                f"[{self.e_min_wh}, {self.e_max_wh}]",
            )
        if self.e_final_min_wh is not None:
            _int(self.e_final_min_wh, "storage.e_final_min_wh", low=0)
            if self.e_final_min_wh > self.e_max_wh:
                raise InvalidModel(
                    None,
                    "storage.e_final_min_wh",
                    f"({self.e_final_min_wh}) > e_max_wh ({self.e_max_wh})",
                )

    def energy_step_exact(self, soc_wh: int, charge_w: int, discharge_w: int) -> tuple[int, int]:
        """(numerator, denominator) of soc + eta*charge - discharge/eta for one hour, exact."""
        ppm = self.efficiency_ppm
        denominator = PPM * ppm
        numerator = soc_wh * denominator + ppm * ppm * charge_w - PPM * PPM * discharge_w
        return numerator, denominator

    def to_dict(self) -> dict[str, int | None]:
        return {
            "charge_max_w": self.charge_max_w,
            "discharge_max_w": self.discharge_max_w,
            "efficiency_ppm": self.efficiency_ppm,
            "e_min_wh": self.e_min_wh,
            "e_max_wh": self.e_max_wh,
            "soc_wh": self.soc_wh,
            "e_final_min_wh": self.e_final_min_wh,
        }

    @classmethod
    def from_dict(cls, value: object) -> Storage:
        data = _mapping(
            value,
            "storage",
            (
                "charge_max_w",
                "discharge_max_w",
                "efficiency_ppm",
                "e_min_wh",
                "e_max_wh",
                "soc_wh",
                "e_final_min_wh",
            ),
        )
        return cls(**data)


def _mapping(value: object, name: str, keys: Sequence[str]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidModel(None, name, "must be a map")
    unknown = sorted(set(value) - set(keys), key=str)
    if unknown:
        raise InvalidModel(None, f"{name}.{unknown[0]}", "is not a known field")
    missing = [k for k in keys if k not in value]
    if missing:
        raise InvalidModel(None, f"{name}.{missing[0]}", "is missing")
    return {k: value[k] for k in keys}


@dataclass(frozen=True)
class Microgrid:
    """One microgrid's model over a clearing window of ``periods`` hours (M1).

    Series are per period of the window: renewable output R, load L, green
    demand G (G <= L), retail price lambda_t (> the feed-in tariff gamma, or
    buying to sell back would be free money).
    """

    id: str
    renewable_w: tuple[int, ...]
    load_w: tuple[int, ...]
    green_demand_w: tuple[int, ...]
    retail_price_per_kwh: tuple[int, ...]
    feed_in_tariff_per_kwh: int
    green_loss: GreenLoss
    gas: GasTurbine | None = None
    storage: Storage | None = None
    grid_import_limit_w: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise InvalidModel(
                "microgrid",
                "id",
                f"({self.id!r}) must be 1-64 of [A-Za-z0-9_.:-], starting alphanumeric",
            )
        try:
            self._validate()
        except InvalidModel as exc:
            raise exc.within(f"microgrid {self.id}") from None

    def _validate(self) -> None:
        renewable = _int_series(self.renewable_w, "renewable_w", low=0, high=MAX_POWER_W)
        load = _int_series(self.load_w, "load_w", low=0, high=MAX_POWER_W)
        green = _int_series(self.green_demand_w, "green_demand_w", low=0, high=MAX_POWER_W)
        prices = _int_series(
            self.retail_price_per_kwh, "retail_price_per_kwh", low=0, high=MAX_PRICE
        )
        periods = len(renewable)
        if not 1 <= periods <= MAX_PERIODS:
            raise InvalidModel(None, "renewable_w", f"has {periods} periods, need 1..{MAX_PERIODS}")
        for name, series in (
            ("load_w", load),
            ("green_demand_w", green),
            ("retail_price_per_kwh", prices),
        ):
            if len(series) != periods:
                raise InvalidModel(
                    None, name, f"has {len(series)} periods but renewable_w has {periods}"
                )
        for t in range(periods):
            if green[t] > load[t]:
                raise InvalidModel(
                    None, f"green_demand_w[{t}]", f"({green[t]}) > load_w[{t}] ({load[t]})"
                )
        gamma = _int(self.feed_in_tariff_per_kwh, "feed_in_tariff_per_kwh", low=0, high=MAX_PRICE)
        for t in range(periods):
            if prices[t] <= gamma:
                raise InvalidModel(
                    None,
                    f"retail_price_per_kwh[{t}]",
                    f"({prices[t]}) <= feed_in_tariff_per_kwh ({gamma})",
                )
        if not isinstance(self.green_loss, GreenLoss):
            raise InvalidModel(None, "green_loss", "must be a GreenLoss")
        if self.gas is not None and not isinstance(self.gas, GasTurbine):
            raise InvalidModel(None, "gas", "must be a GasTurbine or None")
        if self.storage is not None and not isinstance(self.storage, Storage):
            raise InvalidModel(None, "storage", "must be a Storage or None")
        if self.grid_import_limit_w is not None:
            _int(self.grid_import_limit_w, "grid_import_limit_w", low=0, high=MAX_POWER_W)
        object.__setattr__(self, "renewable_w", renewable)
        object.__setattr__(self, "load_w", load)
        object.__setattr__(self, "green_demand_w", green)
        object.__setattr__(self, "retail_price_per_kwh", prices)

    @property
    def periods(self) -> int:
        return len(self.renewable_w)

    def green_surplus_w(self, t: int) -> int:
        """Green power the microgrid may sell in period t: renewables above its own green demand."""
        return max(0, self.renewable_w[t] - self.green_demand_w[t])

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "renewable_w": list(self.renewable_w),
            "load_w": list(self.load_w),
            "green_demand_w": list(self.green_demand_w),
            "retail_price_per_kwh": list(self.retail_price_per_kwh),
            "feed_in_tariff_per_kwh": self.feed_in_tariff_per_kwh,
            "green_loss": self.green_loss.to_list(),
            "gas": None if self.gas is None else self.gas.to_dict(),
            "storage": None if self.storage is None else self.storage.to_dict(),
            "grid_import_limit_w": self.grid_import_limit_w,
        }

    @classmethod
    def from_dict(cls, value: object) -> Microgrid:
        keys = (
            "id",
            "renewable_w",
            "load_w",
            "green_demand_w",
            "retail_price_per_kwh",
            "feed_in_tariff_per_kwh",
            "green_loss",
            "gas",
            "storage",
            "grid_import_limit_w",
        )
        data = _mapping(value, "microgrid", keys)
        subject = f"microgrid {data['id']}" if isinstance(data["id"], str) else "microgrid"
        try:
            data["green_loss"] = GreenLoss.from_list(data["green_loss"])
            if data["gas"] is not None:
                data["gas"] = GasTurbine.from_dict(data["gas"])
            if data["storage"] is not None:
                data["storage"] = Storage.from_dict(data["storage"])
        except InvalidModel as exc:
            raise exc.within(subject) from None
        return cls(**data)


@dataclass(frozen=True)
class Market:
    """Rules shared by every microgrid of one market.

    * ``wheeling_fee_per_kwh`` (phi, M4): paid per kWh traded between
      microgrids, half by the seller and half by the buyer, to the grid company.
    * ``flow_wear_per_mw2h`` (epsilon > 0): a small quadratic cost on every
      controllable flow (gas, storage charge/discharge, pool sales/purchases),
      standing for battery wear and line losses. Beyond being physical, it makes
      the optimum unique, so every node computes the same schedule and the
      same payments, and degenerate ties (two sellers with equal costs) split
      evenly instead of arbitrarily.
    * ``min_deposit`` (SC1): least deposit a trade request must carry.
    * ``deposit_forfeit_below_pct``: a seller that delivers less than this
      percentage of its cleared sales forfeits its deposit to the reserve
      (deterring fake offers); everyone else is refunded in full at settlement.
    """

    wheeling_fee_per_kwh: int
    flow_wear_per_mw2h: int = 50_000
    min_deposit: int = 0
    deposit_forfeit_below_pct: int = 50

    def __post_init__(self) -> None:
        try:
            _int(self.wheeling_fee_per_kwh, "wheeling_fee_per_kwh", low=0, high=MAX_PRICE)
            _int(self.flow_wear_per_mw2h, "flow_wear_per_mw2h", low=1, high=MAX_QUAD)
            _int(self.min_deposit, "min_deposit", low=0)
            _int(self.deposit_forfeit_below_pct, "deposit_forfeit_below_pct", low=0, high=100)
        except InvalidModel as exc:
            raise exc.within("market") from None

    def to_dict(self) -> dict[str, int]:
        return {
            "wheeling_fee_per_kwh": self.wheeling_fee_per_kwh,
            "flow_wear_per_mw2h": self.flow_wear_per_mw2h,
            "min_deposit": self.min_deposit,
            "deposit_forfeit_below_pct": self.deposit_forfeit_below_pct,
        }

    @classmethod
    def from_dict(cls, value: object) -> Market:
        try:
            data = _mapping(
                value,
                "market",
                (
                    "wheeling_fee_per_kwh",
                    "flow_wear_per_mw2h",
                    "min_deposit",
                    "deposit_forfeit_below_pct",
                ),
            )
        except InvalidModel as exc:
            raise exc.within("market") from None
        return cls(**data)


@dataclass(frozen=True)
class Dispatch:
    """One microgrid's operating point in one period (integers).

    ``grid_w`` is the exchange with the grid, positive when importing;
    ``sell_w``/``buy_w`` are green power sold to / bought from the other
    microgrids (never both); ``soc_wh`` is the storage energy at the end of the
    period (0 without storage).
    """

    gas_w: int = 0
    charge_w: int = 0
    discharge_w: int = 0
    grid_w: int = 0
    sell_w: int = 0
    buy_w: int = 0
    soc_wh: int = 0

    FIELDS = ("gas_w", "charge_w", "discharge_w", "grid_w", "sell_w", "buy_w", "soc_wh")

    def to_list(self) -> list[int]:
        return [getattr(self, name) for name in self.FIELDS]

    @classmethod
    def from_list(cls, value: object, name: str = "dispatch") -> Dispatch:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 7:
            raise InvalidModel(None, name, "must be a list of 7 integers")
        low = -MAX_POWER_W * 100
        ints = [_int(v, f"{name}.{f}", low=low) for v, f in zip(value, cls.FIELDS, strict=True)]
        return cls(*ints)


def period_cost_e12(mg: Microgrid, market: Market, t: int, d: Dispatch) -> int:
    """Exact cost of microgrid ``mg`` in period ``t`` under dispatch ``d``, in 1e-12 minor units.

    Gas a*P^2 + b*P, flow wear epsilon*P^2 on gas, storage and pool flows,
    retail purchases at lambda_t, feed-in sales at gamma (negative), half the
    wheeling fee on pool volume, and the green deficit loss. Payments between
    microgrids are not part of it (they are stage 2).
    """
    return cost_e12(mg, market, t, d.gas_w, d.charge_w, d.discharge_w, d.grid_w, d.sell_w, d.buy_w)


def cost_e12(
    mg: Microgrid,
    market: Market,
    t: int,
    gas_w: int,
    charge_w: int,
    discharge_w: int,
    grid_w: int,
    sell_w: int,
    buy_w: int,
) -> int:
    """`period_cost_e12` on loose integers (the plan columns), in 1e-12 minor units."""
    eps = market.flow_wear_per_mw2h
    quad = eps * (charge_w * charge_w + discharge_w * discharge_w + sell_w * sell_w + buy_w * buy_w)
    lin_e3 = 0  # thousandths of a minor unit
    if mg.gas is not None:
        quad += (mg.gas.a_per_mw2h + eps) * gas_w * gas_w
        lin_e3 += mg.gas.b_per_kwh * gas_w
    if grid_w >= 0:
        lin_e3 += mg.retail_price_per_kwh[t] * grid_w
    else:
        lin_e3 += mg.feed_in_tariff_per_kwh * grid_w
    deficit = mg.green_demand_w[t] - mg.renewable_w[t] + sell_w - buy_w
    if deficit > 0:
        lin_e3 += mg.green_loss.cost_e3(deficit)
    # phi/2 per kWh on each side: phi * volume / 2000 minor units = 5e8 * phi * volume / 1e12
    fee = 5 * 10**8 * market.wheeling_fee_per_kwh * (sell_w + buy_w)
    return quad + lin_e3 * (COST_SCALE // 1000) + fee


def target_shortfall_price(mg: Microgrid) -> int:
    """kappa, minor units per kWh: the planning cost of stored energy short of the storage's
    end-of-window target (`Storage.e_final_min_wh`).

    Twice the window's dearest retail price, grossed up by the one-way storage
    efficiency: more than a stored kWh can earn or save, so a plan meets the
    target whenever it can, yet a window that cannot meet it still clears.
    """
    if mg.storage is None:
        return 0
    return 2 * max(mg.retail_price_per_kwh) * PPM // mg.storage.efficiency_ppm


def target_shortfall_e12(mg: Microgrid, final_soc_wh: int) -> int:
    """Planning cost of ending the window at ``final_soc_wh``, in 1e-12 minor units."""
    sto = mg.storage
    if sto is None or sto.e_final_min_wh is None or final_soc_wh >= sto.e_final_min_wh:
        return 0
    return target_shortfall_price(mg) * (sto.e_final_min_wh - final_soc_wh) * (COST_SCALE // 1000)


def green_deficit_wh(mg: Microgrid, t: int, d: Dispatch) -> int:
    """Green demand not met by own renewables kept (R - sold) and green bought, Wh (M1a)."""
    return max(0, mg.green_demand_w[t] - mg.renewable_w[t] + d.sell_w - d.buy_w)


@dataclass(frozen=True)
class TradeRequest:
    """SC1 trade request: a microgrid's model for the window plus its deposit (minor units).

    The deposit is held by the reserve from clearing until settlement, where it
    is refunded unless forfeited (see `Market`); requests below the market's
    ``min_deposit`` are refused, so flooding the market with fake requests costs
    locked money.
    """

    microgrid: Microgrid
    deposit: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.microgrid, Microgrid):
            raise InvalidModel(None, "microgrid", "must be a Microgrid")
        try:
            _int(self.deposit, "deposit", low=0)
        except InvalidModel as exc:
            raise exc.within(f"request {self.microgrid.id}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"microgrid": self.microgrid.to_dict(), "deposit": self.deposit}

    @classmethod
    def from_dict(cls, value: object) -> TradeRequest:
        data = _mapping(value, "request", ("microgrid", "deposit"))
        return cls(Microgrid.from_dict(data["microgrid"]), data["deposit"])


__all__ = [
    "GRID_COMPANY",
    "RESERVE",
    "Dispatch",
    "GasTurbine",
    "GreenLoss",
    "Market",
    "Microgrid",
    "Storage",
    "TradeRequest",
    "green_deficit_wh",
    "cost_e12",
    "period_cost_e12",
    "target_shortfall_e12",
    "target_shortfall_price",
]
