"""Zone graph with postage-stamp transmission fees, capacity-aware cheapest paths (M16), and
the delivered-cost score that ranks listings for a taker (M15).

Each zone publishes a fee alpha in minor units per kWh. Energy Q moved from zone A
through B to C pays S = (alpha_A + alpha_B + alpha_C) * Q: every zone on the path is
paid once, endpoints included, so a trade inside one zone pays alpha_A * Q. Lines
join two zones and carry a per-delivery-period energy limit (Wh); a path may use a
line only if its remaining capacity covers Q. The cheapest path is found by
Dijkstra on node weights over the lines that pass that filter, with a total,
deterministic tie-break: lower fee per kWh, then fewer zones, then the
lexicographically smaller sequence of zone names.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from meterchain.market.errors import MarketError
from meterchain.market.units import energy_money

# Reputation scores run 0..REPUTATION_MAX (see meterchain.market.reputation); the ranking
# penalises the distance from the top so that a better-reputed counterparty ranks first.
REPUTATION_MAX = 1000


class ZoneError(MarketError):
    """A zone graph is malformed or a zone/line request cannot be met."""

    reason = "zone"


class UnknownZone(ZoneError):
    reason = "unknown_zone"


class NoFeasiblePath(ZoneError):
    """No path between two zones has enough remaining line capacity for the energy."""

    reason = "no_feasible_path"


class LineOverloaded(ZoneError):
    """Reserving (or releasing) energy on a path would push a line outside 0..limit."""

    reason = "line_overloaded"


def line_key(a: str, b: str) -> tuple[str, str]:
    """The canonical (sorted) name of the undirected line between zones a and b."""
    return (a, b) if a < b else (b, a)


@dataclass(frozen=True)
class Route:
    """A chosen path: zones from source to target, the fee rate and the fee for the energy."""

    zones: tuple[str, ...]
    fee_per_kwh: int
    energy_wh: int
    fee: int


@dataclass(frozen=True)
class ZoneGraph:
    """Zones with published fees and lines with energy limits and energy already scheduled.

    `fees`: zone -> alpha, minor units per kWh (>= 0).
    `limits`: line_key -> energy limit per delivery period, Wh (>= 0).
    `flows`: line_key -> energy already scheduled on the line this period, Wh.
    Instances never change; `with_flow` returns a new graph.
    """

    fees: Mapping[str, int]
    limits: Mapping[tuple[str, str], int]
    flows: Mapping[tuple[str, str], int] = field(default_factory=dict)
    _adjacent: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        fees = dict(self.fees)
        for zone, fee in fees.items():
            if not isinstance(zone, str) or not zone:
                raise ZoneError(f"zone names must be non-empty text, got {zone!r}")
            if not isinstance(fee, int) or isinstance(fee, bool) or fee < 0:
                raise ZoneError(f"zone {zone}: fee must be an integer >= 0, got {fee!r}")
        limits: dict[tuple[str, str], int] = {}
        for key, limit in self.limits.items():
            a, b = key
            if a not in fees or b not in fees:
                raise UnknownZone(f"line {a}-{b} names a zone without a published fee")
            if a == b:
                raise ZoneError(f"line {a}-{b} joins a zone to itself")
            canon = line_key(a, b)
            if canon in limits:
                raise ZoneError(f"line {canon[0]}-{canon[1]} is listed twice")
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                raise ZoneError(f"line {a}-{b}: limit must be an integer Wh >= 0, got {limit!r}")
            limits[canon] = limit
        flows: dict[tuple[str, str], int] = {}
        for key, used in self.flows.items():
            canon = line_key(*key)
            if canon not in limits:
                raise ZoneError(f"flow on unknown line {canon[0]}-{canon[1]}")
            if not isinstance(used, int) or not 0 <= used <= limits[canon]:
                raise LineOverloaded(f"line {canon[0]}-{canon[1]}: flow {used} outside 0..limit")
            if used:
                flows[canon] = used
        adjacent: dict[str, list[str]] = {zone: [] for zone in fees}
        for a, b in limits:
            adjacent[a].append(b)
            adjacent[b].append(a)
        object.__setattr__(self, "fees", MappingProxyType(fees))
        object.__setattr__(self, "limits", MappingProxyType(limits))
        object.__setattr__(self, "flows", MappingProxyType(flows))
        object.__setattr__(
            self,
            "_adjacent",
            MappingProxyType({z: tuple(sorted(n)) for z, n in adjacent.items()}),
        )

    @classmethod
    def build(cls, fees: Mapping[str, int], lines: Iterable[tuple[str, str, int]]) -> ZoneGraph:
        """A graph from zone fees and (zone, zone, limit_wh) lines, nothing scheduled yet."""
        limits: dict[tuple[str, str], int] = {}
        for a, b, limit in lines:
            if line_key(a, b) in limits:
                raise ZoneError(f"line {a}-{b} is listed twice")
            limits[line_key(a, b)] = limit
        return cls(fees=fees, limits=limits)

    def remaining(self, a: str, b: str) -> int:
        """Energy (Wh) the line a-b can still carry this period."""
        key = line_key(a, b)
        if key not in self.limits:
            raise ZoneError(f"no line {a}-{b}")
        return self.limits[key] - self.flows.get(key, 0)

    def neighbours(self, zone: str) -> tuple[str, ...]:
        """Zones joined to `zone` by a line, sorted by name."""
        if zone not in self.fees:
            raise UnknownZone(f"unknown zone {zone!r}")
        return self._adjacent[zone]

    def with_flow(self, path: Sequence[str], energy_wh: int) -> ZoneGraph:
        """A new graph with `energy_wh` scheduled on every line of `path` (negative releases)."""
        flows = dict(self.flows)
        for a, b in zip(path, path[1:], strict=False):
            key = line_key(a, b)
            if key not in self.limits:
                raise ZoneError(f"path uses a missing line {a}-{b}")
            used = flows.get(key, 0) + energy_wh
            if used < 0 or used > self.limits[key]:
                raise LineOverloaded(
                    f"line {key[0]}-{key[1]}: {used} Wh would be outside 0..{self.limits[key]}"
                )
            flows[key] = used
        return ZoneGraph(fees=self.fees, limits=self.limits, flows=flows)


def postage_fee(graph: ZoneGraph, path: Sequence[str], energy_wh: int) -> int:
    """Postage-stamp fee in minor units: (sum of alpha over the path's zones) * energy_wh / 1000."""
    return energy_money(energy_wh, path_fee_rate(graph, path))


def path_fee_rate(graph: ZoneGraph, path: Sequence[str]) -> int:
    """Sum of the zone fees along `path`, minor units per kWh (each zone counted once)."""
    if not path:
        raise ZoneError("empty path")
    if len(set(path)) != len(path):
        raise ZoneError(f"path visits a zone twice: {list(path)}")
    for zone in path:
        if zone not in graph.fees:
            raise UnknownZone(f"unknown zone {zone!r}")
    return sum(graph.fees[zone] for zone in path)


def cheapest_path(graph: ZoneGraph, source: str, target: str, energy_wh: int) -> Route:
    """The cheapest path from `source` to `target` whose every line can carry `energy_wh`.

    Raises UnknownZone for zones not in the graph and NoFeasiblePath when every path
    crosses a line with less remaining capacity than `energy_wh`.
    """
    if not isinstance(energy_wh, int) or energy_wh <= 0:
        raise ZoneError(f"energy must be a positive integer Wh, got {energy_wh!r}")
    for zone in (source, target):
        if zone not in graph.fees:
            raise UnknownZone(f"unknown zone {zone!r}")
    # Labels (fee, hops, path) are totally ordered and extending two labels by the same
    # zone keeps their order (equal hops means equal-length paths), so the first label
    # popped for a zone is its best one under the full tie-break, not just the cheapest.
    start = (graph.fees[source], 1, (source,))
    heap: list[tuple[int, int, tuple[str, ...]]] = [start]
    done: set[str] = set()
    while heap:
        fee, hops, path = heapq.heappop(heap)
        zone = path[-1]
        if zone in done:
            continue
        done.add(zone)
        if zone == target:
            return Route(path, fee, energy_wh, energy_money(energy_wh, fee))
        for nxt in graph.neighbours(zone):
            if nxt in done or graph.remaining(zone, nxt) < energy_wh:
                continue
            heapq.heappush(heap, (fee + graph.fees[nxt], hops + 1, path + (nxt,)))
    raise NoFeasiblePath(f"no path {source} -> {target} can carry {energy_wh} Wh")


@dataclass(frozen=True)
class RankingWeights:
    """How much a taker cares about each part of delivered cost (non-negative integers).

    price: per minor unit/kWh of energy price; transmission: per minor unit/kWh of
    postage-stamp fee; reputation: per point below REPUTATION_MAX of the counterparty;
    carbon: per g CO2/kWh of the seller's declared carbon intensity.
    """

    price: int = 1
    transmission: int = 1
    reputation: int = 0
    carbon: int = 0

    def __post_init__(self) -> None:
        for name in ("price", "transmission", "reputation", "carbon"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ZoneError(f"ranking weight {name} must be an integer >= 0, got {value!r}")


def delivered_cost(
    weights: RankingWeights,
    *,
    price: int,
    fee_per_kwh: int,
    reputation: int,
    carbon_g_per_kwh: int,
    taker_buys: bool = True,
) -> int:
    """Integer delivered-cost score of one listing for a taker; lower ranks first.

    For a buying taker every term is a cost. For a selling taker (taking a buy
    listing) a higher price is better, so the price term enters negatively, and the
    buyer's carbon intensity is irrelevant.
    """
    if not 0 <= reputation <= REPUTATION_MAX:
        raise ZoneError(f"reputation {reputation} outside 0..{REPUTATION_MAX}")
    rep_term = weights.reputation * (REPUTATION_MAX - reputation)
    fee_term = weights.transmission * fee_per_kwh
    if taker_buys:
        return weights.price * price + fee_term + rep_term + weights.carbon * carbon_g_per_kwh
    return -weights.price * price + fee_term + rep_term
