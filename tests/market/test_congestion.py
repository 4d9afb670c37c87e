"""M25 congestion management: DC flows, the minimal trade cut, prices, the backup's check."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterchain.errors import ConfigError
from meterchain.market import congestion as cg
from meterchain.market.clearing import clear
from meterchain.market.model import Dispatch
from meterchain.market.network import (
    Line,
    Network,
    NetworkError,
    load_network,
    reference_network,
)
from meterchain.market.reference import reference_case, reference_request
from meterchain.market.settlement import metered_from_dispatch, parties_sum, settle
from tests.market.congestion_cases import hour_result, radial_five, triangle

# --- hand-checked flows -----------------------------------------------------------------


def test_triangle_flows_and_minimal_cut() -> None:
    # 300 kW from b to c over equal reactances: 2/3 take b-c directly, 1/3 go b-a-c.
    net = triangle(limit_bc=150_000)
    res = hour_result(
        {"seller": Dispatch(sell_w=300_000), "buyer": Dispatch(buy_w=300_000)},
        [("seller", "buyer", 300_000, 6_000)],
    )
    flows = {ld.line: ld.flow_w for ld in cg.check(net, res).loadings}
    assert flows == {"ab": -100_000, "ac": 100_000, "bc": 200_000}
    adj = cg.adjust(net, res)
    # Cutting c Wh at b (buyer imports it from a) moves b-c by c/3: 200 000 - c/3 <= 150 000.
    assert adj.total_cut_wh == 150_000
    assert adj.cuts == (cg.Cut("seller", "buyer", 300_000, 150_000),)
    after = {ld.line: ld.flow_w for ld in adj.after}
    assert after == {"ab": 0, "ac": 150_000, "bc": 150_000}
    assert "bc 200000 W > 150000 W" in adj.reason
    cg.verify(net, res, adj)


def test_radial_five_cuts_only_the_seller_behind_the_line() -> None:
    net = radial_five(limit_23=100_000)
    res = hour_result(
        {
            "pv": Dispatch(sell_w=150_000, grid_w=-10_000),  # exports 160 kW at n3
            "farm": Dispatch(sell_w=80_000),
            "shop": Dispatch(buy_w=130_000),
            "town": Dispatch(buy_w=100_000, grid_w=20_000),
        },
        [
            ("pv", "shop", 100_000, 7_000),
            ("pv", "town", 50_000, 6_000),
            ("farm", "town", 50_000, 5_000),
            ("farm", "shop", 30_000, 5_500),
        ],
    )
    flows = {ld.line: ld.flow_w for ld in cg.check(net, res).loadings}
    # Radial: a line carries everything injected beyond it, towards the substation.
    assert flows == {"s1": 10_000, "12": -30_000, "23": -160_000, "14": -80_000}
    adj = cg.adjust(net, res)
    assert adj.total_cut_wh == 60_000  # 160 000 - 100 000; only pv can relieve n2-n3
    by_trade = {(c.seller, c.buyer): c.cut_wh for c in adj.cuts}
    assert by_trade == {
        ("pv", "shop"): 40_000,
        ("pv", "town"): 20_000,
        ("farm", "town"): 0,
        ("farm", "shop"): 0,
    }
    assert {ld.line: ld.flow_w for ld in adj.after}["23"] == -100_000
    cg.verify(net, res, adj)


def test_grid_export_the_trades_cannot_relieve_is_residual() -> None:
    net = radial_five(limit_23=100_000)
    res = hour_result(
        {"pv": Dispatch(sell_w=20_000, grid_w=-150_000), "shop": Dispatch(buy_w=20_000)},
        [("pv", "shop", 20_000, 7_000)],
    )
    adj = cg.adjust(net, res)
    assert adj.total_cut_wh == 20_000  # everything that helps is cut
    assert dict(adj.residual_w) == {"23": 50_000}
    assert "cannot relieve 23 by 50000 W" in adj.reason
    cg.verify(net, res, adj)


def test_no_violation_means_no_record() -> None:
    net = triangle(limit_bc=500_000)
    res = hour_result(
        {"seller": Dispatch(sell_w=300_000), "buyer": Dispatch(buy_w=300_000)},
        [("seller", "buyer", 300_000, 6_000)],
    )
    assert cg.decide(net, res, cg.ADJUST) is None
    with pytest.raises(cg.CongestionError, match="nothing to adjust"):
        cg.adjust(net, res)
    with pytest.raises(cg.CongestionError, match="not one of"):
        cg.decide(net, res, "shed")


def test_price_method_prices_the_line_and_the_sellers_behind_it() -> None:
    net = triangle(limit_bc=150_000)
    res = hour_result(
        {"seller": Dispatch(sell_w=300_000), "buyer": Dispatch(buy_w=300_000)},
        [("seller", "buyer", 300_000, 6_000)],
    )
    notice = cg.decide(net, res, cg.PRICE)
    assert notice is not None and notice.cuts == ()
    # Shadow price 3 Wh of cut per W of b-c, at the hour's top price 6 000 per kWh;
    # the seller loads b-c with 1/3 of what it sells: 6 000 per kWh, its whole price.
    assert notice.line_prices == (("bc", 18_000),)
    assert notice.charges == (("seller", 6_000),)
    cg.verify(net, res, notice)
    assert cg.adjusted_result(res, notice) is res


# --- the backup's check ------------------------------------------------------------------


@pytest.fixture
def congested() -> tuple[Network, object, cg.Adjustment]:
    net = radial_five(limit_23=100_000)
    res = hour_result(
        {"pv": Dispatch(sell_w=160_000), "shop": Dispatch(buy_w=160_000)},
        [("pv", "shop", 160_000, 7_000)],
    )
    return net, res, cg.adjust(net, res)


def _cut(adj: cg.Adjustment, kept: int) -> cg.Adjustment:
    return replace(adj, cuts=(replace(adj.cuts[0], kept_wh=kept),))


def test_backup_refuses_a_cut_that_is_too_small(congested) -> None:
    net, res, adj = congested
    small = _cut(adj, adj.cuts[0].kept_wh + 5_000)
    small = replace(small, after=cg.check(net, cg.adjusted_result(res, small)).loadings)
    with pytest.raises(cg.CongestionError, match="still carries"):
        cg.verify(net, res, small)


def test_backup_refuses_a_cut_that_is_not_minimal(congested) -> None:
    net, res, adj = congested
    big = _cut(adj, adj.cuts[0].kept_wh - 5_000)
    big = replace(big, after=cg.check(net, cg.adjusted_result(res, big)).loadings)
    with pytest.raises(cg.CongestionError, match="not minimal"):
        cg.verify(net, res, big)


def test_backup_re_runs_the_flows(congested) -> None:
    net, res, adj = congested
    lying = replace(adj, before=tuple(ld._replace(flow_w=ld.flow_w // 2) for ld in adj.before))
    with pytest.raises(cg.CongestionError, match="differ from the DC flow"):
        cg.verify(net, res, lying)
    other = radial_five(limit_23=90_000)
    with pytest.raises(cg.CongestionError, match="another network"):
        cg.verify(other, res, adj)
    with pytest.raises(cg.CongestionError, match="kept"):
        cg.adjusted_result(res, _cut(adj, 170_000))


def test_record_round_trips_canonically(congested) -> None:
    _, _, adj = congested
    assert cg.Adjustment.from_cbor(adj.to_cbor()) == adj
    with pytest.raises(cg.CongestionError):
        cg.Adjustment.from_cbor(b"\xa1\x01\x02")
    with pytest.raises(cg.CongestionError):
        cg.Adjustment.from_cbor(b"\xff")
    doc = adj.to_dict()
    for bad in (
        {"after": [[ld[0], True, ld[2]] for ld in doc["after"]]},  # a boolean for a flow
        {"cuts": [["pv", "shop", 160_000, "all"]]},
        {"network": b"short"},
        {"method": "shed"},
    ):
        with pytest.raises(cg.CongestionError, match="wrong type"):
            cg.Adjustment.from_dict({**doc, **bad})


# --- a real clearing cut back and settled ------------------------------------------------


def test_reference_noon_cut_back_and_money_conserved() -> None:
    request = reference_request(12)
    result = clear(request)
    ids = result.microgrids
    net = Network(
        "demo",
        "sub",
        ("sub", "b1", "b2", "b3", "b4"),
        (
            Line("sub-b1", "sub", "b1", 60, 2_000_000),
            Line("b1-b2", "b1", "b2", 80, 2_000_000),
            Line("b1-b3", "b1", "b3", 150, 200_000),
            Line("sub-b4", "sub", "b4", 90, 2_000_000),
        ),
        tuple(zip(ids, ("b1", "b2", "b3", "b4"), strict=True)),
    )
    before = cg.check(net, result)
    assert [ld.line for ld in before.violated] == ["b1-b3"]
    adj = cg.adjust(net, result)
    cg.verify(net, result, adj)
    over = before.violated[0].overload_w
    assert adj.total_cut_wh == over  # radial: the solar park alone, down to the limit
    assert all(c.seller == "mg3-solar-park" for c in adj.cuts if c.cut_wh)
    adjusted = cg.adjusted_result(result, adj)
    assert cg.check(net, adjusted).feasible
    # Settle with the seller holding the cut back (curtailed) and everyone else as planned.
    case = reference_case()
    t = 12 - request.first_period
    hour = adjusted.executed[0]
    curtailed = {mg: 0 for mg in ids}
    for c in adj.cuts:
        curtailed[c.seller] += c.cut_wh
    metered = []
    for k, day in enumerate(case.microgrids):
        mg = request.microgrids[k]
        d = hour.dispatch[k]
        metered.append(
            metered_from_dispatch(
                mg.id,
                d.gas_w,
                d.charge_w,
                d.discharge_w,
                mg.renewable_w[t] - curtailed[mg.id],
                mg.green_demand_w[t],
                mg.load_w[t],
            )
        )
        assert day.id == mg.id
    settlement = settle(request, adjusted, metered)
    assert parties_sum(settlement) == 0
    delivered = {(d.seller, d.buyer): d.delivered_wh for d in settlement.deliveries}
    for c in adj.cuts:
        assert delivered[(c.seller, c.buyer)] <= c.kept_wh


# --- property: an adjusted schedule never violates a limit -------------------------------


@st.composite
def feeders(draw: st.DrawFn) -> tuple[Network, object]:
    n_bus = draw(st.integers(3, 7))
    buses = tuple(f"b{k}" for k in range(n_bus))
    lines = []
    for k in range(1, n_bus):  # a random tree, then a few meshing lines
        parent = draw(st.integers(0, k - 1))
        lines.append((buses[parent], buses[k]))
    for _ in range(draw(st.integers(0, 2))):
        a, b = draw(st.integers(0, n_bus - 1)), draw(st.integers(0, n_bus - 1))
        if a != b:
            lines.append((buses[a], buses[b]))
    network_lines = tuple(
        Line(f"l{k}", a, b, draw(st.integers(10, 500)), draw(st.integers(5_000, 300_000)))
        for k, (a, b) in enumerate(lines)
    )
    n_mg = draw(st.integers(2, 6))
    mgs = [f"mg{k}" for k in range(n_mg)]
    sites = tuple((mg, buses[draw(st.integers(0, n_bus - 1))]) for mg in mgs)
    sellers = mgs[: draw(st.integers(1, n_mg - 1))]
    buyers = [mg for mg in mgs if mg not in sellers]
    trades = []
    for s in sellers:
        for b in buyers:
            if draw(st.booleans()):
                trades.append((s, b, draw(st.integers(1, 200_000)), draw(st.integers(0, 12_000))))
    sell = {mg: sum(wh for s, _, wh, _ in trades if s == mg) for mg in mgs}
    buy = {mg: sum(wh for _, b, wh, _ in trades if b == mg) for mg in mgs}
    dispatch = {
        mg: Dispatch(sell_w=sell[mg], buy_w=buy[mg], grid_w=draw(st.integers(-80_000, 80_000)))
        for mg in mgs
    }
    net = Network("random", buses[0], buses, network_lines, sites)
    return net, hour_result(dispatch, trades)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(feeders())
def test_adjusted_schedules_never_violate_a_limit(case: tuple[Network, object]) -> None:
    net, res = case
    adj = cg.decide(net, res, cg.ADJUST)
    if adj is None:
        assert cg.check(net, res).feasible
        return
    after = cg.check(net, cg.adjusted_result(res, adj))
    assert after.loadings == adj.after
    residual = dict(adj.residual_w)
    for ld in after.loadings:
        assert ld.overload_w <= residual.get(ld.line, 0)
    if residual:  # then cutting every trade does not clear every line either
        everything = cg.adjusted_result(
            res, replace(adj, cuts=tuple(replace(c, kept_wh=0) for c in adj.cuts))
        )
        assert not cg.check(net, everything).feasible
    for c in adj.cuts:
        assert 0 <= c.kept_wh <= c.cleared_wh
    cg.verify(net, res, adj)


# --- the network site file ---------------------------------------------------------------

GOOD = """
name = "demo-feeder"
grid_bus = "sub"
[[bus]]
id = "sub"
[[bus]]
id = "n1"
[[line]]
id = "sub-n1"
from = "sub"
to = "n1"
reactance_mohm = 120
limit_w = 400000
[microgrids]
mg1 = "n1"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "network.toml"
    path.write_text(text)
    return path


def test_network_file_loads(tmp_path: Path) -> None:
    net = load_network(_write(tmp_path, GOOD))
    assert net.lines[0].limit_w == 400_000 and net.bus_of("mg1") == 1
    assert Network.from_cbor(net.to_cbor()) == net


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (('to = "n1"', 'to = "n9"'), "line[0].to", "not a listed bus"),
        (("limit_w = 400000", "limit_w = 0"), "line[0].limit_w", "> 0"),
        (("limit_w = 400000", "limit_w = 4e5"), "line[0].limit_w", "must be an integer"),
        (("reactance_mohm = 120", "reactance = 1"), "line[0].reactance", "unknown key"),
        (('mg1 = "n1"', 'mg1 = "x"'), "microgrids.mg1", "not a listed bus"),
        (('grid_bus = "sub"', 'grid_bus = "nowhere"'), "grid_bus", "not a listed bus"),
        (('to = "n1"', 'to = "sub"'), "line[0].to", "two different buses"),
        (('id = "n1"', 'id = "sub"'), "bus[1].id", "listed twice"),
        (('id = "sub-n1"', 'id = "a b"'), "line[0].id", "must be 1-64"),
        (('name = "demo-feeder"', 'name = "x"\nextra = 1'), "extra", "unknown key"),
    ],
)
def test_network_file_errors_name_the_key(
    tmp_path: Path, change: tuple[str, str], key: str, problem: str
) -> None:
    text = GOOD.replace(*change)
    with pytest.raises(ConfigError, match=problem) as info:
        load_network(_write(tmp_path, text))
    assert info.value.key == key


def test_the_example_file_is_the_demo_feeder() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "network.example.toml"
    assert load_network(example) == reference_network()


def test_disconnected_bus_and_missing_site(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not connected") as info:
        load_network(_write(tmp_path, GOOD + '[[bus]]\nid = "island"\n'))
    assert info.value.key == "line"
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_network(_write(tmp_path, "name = "))
    net = load_network(_write(tmp_path, GOOD))
    with pytest.raises(NetworkError, match="no site"):
        net.bus_of("mg9")
