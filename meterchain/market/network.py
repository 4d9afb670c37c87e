"""A market's distribution network (M25): buses, lines, microgrid sites and its site file.

The weak centre checks cleared schedules against this model with a DC power
flow. Everything that is signed or compared across nodes is an integer: line
reactance in milliohm, thermal limit in W. The power transfer distribution
factors (PTDF: the change of every line's flow per W injected at a bus and
taken at the grid connection) come from PYPOWER's ``makePTDF``; only the
reactance ratios matter for a DC flow, so no base voltage is needed.

Site file (TOML, checked at start-up like the service configs)::

    name = "demo-feeder"
    grid_bus = "sub"                 # the grid connection (the DC flow's slack)

    [[bus]]
    id = "sub"
    [[bus]]
    id = "n1"

    [[line]]
    id = "sub-n1"
    from = "sub"
    to = "n1"
    reactance_mohm = 120             # integer milliohm, > 0
    limit_w = 400000                 # thermal limit, integer W, > 0

    [microgrids]                     # which microgrid sits at which bus
    mg1 = "n1"

A flow is positive in the line's from -> to direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from meterchain import codec
from meterchain.config_files import TableChecker, load_toml, toml_kind
from meterchain.errors import CodecError, ConfigError
from meterchain.market.errors import MarketError
from meterchain.mqtt_auth import check_name


class NetworkError(MarketError):
    """A network model is inconsistent; ``key`` names the offending entry ("line[2].to")."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"network {key}: {problem}")


@dataclass(frozen=True)
class Line:
    """A feeder section between two buses: reactance (milliohm) and thermal limit (W)."""

    id: str
    from_bus: str
    to_bus: str
    reactance_mohm: int
    limit_w: int


@dataclass(frozen=True)
class Network:
    """A checked, canonical network model (lines in file order, sites sorted by microgrid)."""

    name: str
    grid_bus: str
    buses: tuple[str, ...]
    lines: tuple[Line, ...]
    sites: tuple[tuple[str, str], ...]  # (microgrid, bus), sorted
    _bus_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _site_index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        if not self.buses:
            raise NetworkError("bus", "a network needs at least one bus")
        index: dict[str, int] = {}
        for k, bus in enumerate(self.buses):
            _check_name(bus, f"bus[{k}].id")
            if bus in index:
                raise NetworkError(f"bus[{k}].id", f"bus {bus!r} is listed twice")
            index[bus] = k
        if self.grid_bus not in index:
            raise NetworkError("grid_bus", f"{self.grid_bus!r} is not a listed bus")
        seen: set[str] = set()
        for k, line in enumerate(self.lines):
            where = f"line[{k}]"
            _check_name(line.id, f"{where}.id")
            if line.id in seen:
                raise NetworkError(f"{where}.id", f"line {line.id!r} is listed twice")
            seen.add(line.id)
            for attr, key in (("from_bus", "from"), ("to_bus", "to")):
                if getattr(line, attr) not in index:
                    raise NetworkError(
                        f"{where}.{key}", f"{getattr(line, attr)!r} is not a listed bus"
                    )
            if line.from_bus == line.to_bus:
                raise NetworkError(f"{where}.to", "a line must join two different buses")
            for attr in ("reactance_mohm", "limit_w"):
                value = getattr(line, attr)
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise NetworkError(f"{where}.{attr}", f"must be an integer > 0, got {value!r}")
        sites = tuple(sorted(self.sites))
        for k, (mg, bus) in enumerate(sites):
            _check_name(mg, f"microgrids.{mg}")
            if bus not in index:
                raise NetworkError(f"microgrids.{mg}", f"{bus!r} is not a listed bus")
            if k and sites[k - 1][0] == mg:
                raise NetworkError(f"microgrids.{mg}", "a microgrid sits at one bus only")
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "_bus_index", index)
        object.__setattr__(self, "_site_index", {mg: index[bus] for mg, bus in sites})
        unreached = _unreached(self.grid_bus, self.buses, self.lines)
        if unreached:
            raise NetworkError(
                "line", f"bus {unreached[0]!r} is not connected to the grid bus {self.grid_bus!r}"
            )

    def bus_of(self, microgrid: str) -> int:
        """Index of the bus ``microgrid`` sits at; NetworkError if it has no site."""
        if microgrid in self._site_index:
            return self._site_index[microgrid]
        raise NetworkError(f"microgrids.{microgrid}", "microgrid has no site in the network")

    @cached_property
    def ptdf(self) -> np.ndarray:
        """Lines x buses PTDF matrix (float; the grid bus column is zero)."""
        from pypower.idx_brch import BR_STATUS, BR_X, F_BUS, T_BUS
        from pypower.idx_bus import BUS_I, BUS_TYPE, REF, VM
        from pypower.makePTDF import makePTDF

        n, m = len(self.buses), len(self.lines)
        if m == 0:
            return np.zeros((0, n))
        bus = np.zeros((n, 13))
        bus[:, BUS_I] = np.arange(n)
        bus[:, BUS_TYPE] = 1
        bus[:, VM] = 1.0
        slack = self._bus_index[self.grid_bus]
        bus[slack, BUS_TYPE] = REF
        branch = np.zeros((m, 13))
        for k, line in enumerate(self.lines):
            branch[k, F_BUS] = self._bus_index[line.from_bus]
            branch[k, T_BUS] = self._bus_index[line.to_bus]
            branch[k, BR_X] = line.reactance_mohm / 1000.0
            branch[k, BR_STATUS] = 1
        ptdf = np.asarray(makePTDF(1.0, bus, branch, slack), dtype=float)
        ptdf[np.abs(ptdf) < 1e-12] = 0.0
        return ptdf

    @cached_property
    def ptdf_sparse(self) -> Any:
        """The PTDF as a scipy CSR matrix: a feeder's PTDF is mostly zeros (radial branches)."""
        import scipy.sparse as sp

        return sp.csr_matrix(self.ptdf)

    @property
    def limits_w(self) -> tuple[int, ...]:
        return tuple(line.limit_w for line in self.lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "grid_bus": self.grid_bus,
            "buses": list(self.buses),
            "lines": [
                [ln.id, ln.from_bus, ln.to_bus, ln.reactance_mohm, ln.limit_w] for ln in self.lines
            ],
            "sites": [list(s) for s in self.sites],
        }

    @classmethod
    def from_dict(cls, value: object) -> Network:
        keys = {"name", "grid_bus", "buses", "lines", "sites"}
        if not isinstance(value, Mapping) or set(value) != keys:
            raise NetworkError("document", f"must be a map with keys {sorted(keys)}")
        try:
            lines = tuple(Line(*row) for row in value["lines"])
            sites = tuple((mg, bus) for mg, bus in value["sites"])
            return cls(value["name"], value["grid_bus"], tuple(value["buses"]), lines, sites)
        except (TypeError, ValueError) as exc:
            raise NetworkError("document", f"malformed: {exc}") from exc

    def to_cbor(self) -> bytes:
        return codec.encode(self.to_dict())

    @classmethod
    def from_cbor(cls, data: bytes) -> Network:
        try:
            return cls.from_dict(codec.decode(data))
        except CodecError as exc:
            raise NetworkError("document", f"not canonical CBOR: {exc}") from exc

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the canonical CBOR form (what a congestion record refers to)."""
        return codec.digest(self.to_dict())


def reference_network() -> Network:
    """The reference day's feeder (``deploy/network.example.toml``): the solar park hangs on a
    250 kW section that its midday export overloads; everything else has headroom."""
    return Network(
        "reference-feeder",
        "sub",
        ("sub", "b1", "b2", "b3", "b4"),
        (
            Line("sub-b1", "sub", "b1", 60, 1_000_000),
            Line("b1-b2", "b1", "b2", 80, 600_000),
            Line("b1-b3", "b1", "b3", 150, 250_000),
            Line("sub-b4", "sub", "b4", 90, 600_000),
        ),
        (
            ("mg1-campus", "b1"),
            ("mg2-hospital", "b2"),
            ("mg3-solar-park", "b3"),
            ("mg4-wind-farm", "b4"),
        ),
    )


def _check_name(value: object, key: str) -> None:
    if not isinstance(value, str):
        raise NetworkError(key, f"must be a name, not {value!r}")
    try:
        check_name("name", value)
    except ValueError as exc:
        raise NetworkError(key, str(exc)) from None


def _unreached(root: str, buses: tuple[str, ...], lines: tuple[Line, ...]) -> list[str]:
    neighbours: dict[str, list[str]] = {b: [] for b in buses}
    for line in lines:
        neighbours[line.from_bus].append(line.to_bus)
        neighbours[line.to_bus].append(line.from_bus)
    seen, stack = {root}, [root]
    while stack:
        for other in neighbours[stack.pop()]:
            if other not in seen:
                seen.add(other)
                stack.append(other)
    return [b for b in buses if b not in seen]


@dataclass
class _BusEntry:
    id: str = ""


@dataclass
class _LineEntry:
    id: str = ""
    reactance_mohm: int = 0
    limit_w: int = 0


def load_network(path: Path) -> Network:
    """Read and check a network site file; ConfigError(path, key, problem) when it is bad."""
    check = TableChecker(path)
    doc = load_toml(path)
    known = {"name", "grid_bus", "bus", "line", "microgrids"}
    for key in doc:
        if key not in known:
            check.fail(key, f"unknown key (known: {', '.join(sorted(known))})")
    for key in ("name", "grid_bus"):
        if not isinstance(doc.get(key), str):
            check.fail(key, f"must be a string, not {toml_kind(doc.get(key))}")
    buses = []
    for k, raw in enumerate(_array(check, doc, "bus")):
        entry = check.table(raw, _BusEntry, f"bus[{k}]")
        buses.append(entry.id)
    lines = []
    for k, raw in enumerate(_array(check, doc, "line")):
        if not isinstance(raw, dict):
            check.fail(f"line[{k}]", f"must be a table, not {toml_kind(raw)}")
        ends = {}
        for end in ("from", "to"):
            if not isinstance(raw.get(end), str):
                check.fail(f"line[{k}].{end}", f"must be a bus id, not {toml_kind(raw.get(end))}")
            ends[end] = raw[end]
        rest = {key: v for key, v in raw.items() if key not in ("from", "to")}
        entry = check.table(rest, _LineEntry, f"line[{k}]")
        lines.append(Line(entry.id, ends["from"], ends["to"], entry.reactance_mohm, entry.limit_w))
    sites_raw = doc.get("microgrids", {})
    if not isinstance(sites_raw, dict):
        check.fail("microgrids", f"must be a table, not {toml_kind(sites_raw)}")
    for mg, bus in sites_raw.items():
        if not isinstance(bus, str):
            check.fail(f"microgrids.{mg}", f"must be a bus id, not {toml_kind(bus)}")
    try:
        return Network(
            doc["name"], doc["grid_bus"], tuple(buses), tuple(lines), tuple(sites_raw.items())
        )
    except NetworkError as exc:
        raise ConfigError(str(path), exc.key, exc.problem) from None


def _array(check: TableChecker, doc: Mapping[str, Any], key: str) -> list[Any]:
    raw = doc.get(key, [])
    if not isinstance(raw, list):
        check.fail(key, f"must be an array of tables ([[{key}]]), not {toml_kind(raw)}")
    return raw
