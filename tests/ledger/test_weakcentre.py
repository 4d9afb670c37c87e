"""The weak centre on the ledger: congestion records re-checked and settled (M25), suspect
reports and the regulator's decisions (M19)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from ledger_world import H0, World, build_world, hour_readings, two_microgrid_clearing

from meterchain import codec
from meterchain.ledger import weakcentre
from meterchain.ledger.chain import verify_store
from meterchain.ledger.monitor import activity_from_txs
from meterchain.ledger.monitor import main as monitor_cli
from meterchain.ledger.readings import HOUR
from meterchain.ledger.settle import settlement_tx
from meterchain.ledger.store import open_store
from meterchain.ledger.transactions import Tx, TxError, signed
from meterchain.market import congestion
from meterchain.market.monitoring import monitor
from meterchain.market.network import Line, Network

HOUR5 = H0 + 5


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = build_world(open_store(str(tmp_path / "ledger.db")))
    yield w
    w.store.close()


def _feeder(limit_w: int) -> Network:
    """mg1 (the seller) at the end of a section with ``limit_w``; mg2 at the substation."""
    return Network(
        "test-feeder",
        "sub",
        ("sub", "far"),
        (Line("sub-far", "sub", "far", 100, limit_w),),
        (("mg1", "far"), ("mg2", "sub")),
    )


def _network_tx(world: World, network: Network, time: int) -> Tx:
    terms = {"network": network.to_cbor(), "time": time}
    return signed("m1", "grid_network", terms, world.sandbox.regulator)


def test_congestion_record_is_rechecked_and_its_cut_settled(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    request, result = two_microgrid_clearing(HOUR5 % 24)
    flow = congestion.check(_feeder(10**9), result).loadings[0].flow_w
    network = _feeder(abs(flow) - 20_000)
    t = (H0 + 4) * HOUR
    chain.commit([_network_tx(world, network, t), sb.clearing(HOUR5, request, result, round=9)], t)
    assert chain.state is not None
    tx = weakcentre.congestion_tx(chain.state, HOUR5, congestion.ADJUST)
    assert tx is not None
    record = congestion.Adjustment.from_cbor(tx.body["record"])
    assert record.total_cut_wh == 20_000  # radial: exactly the overload
    # A record that cuts too little is refused by every node (it re-runs the flow).
    short = replace(record, cuts=(replace(record.cuts[0], kept_wh=record.cuts[0].kept_wh + 5),))
    lying = Tx.make("congestion", {**tx.body, "record": short.to_cbor()})
    with pytest.raises(TxError, match="after the cut differ|still carries"):
        chain.commit([lying], t + 1)
    chain.commit([tx], t + 1)
    with pytest.raises(TxError, match="already has a congestion record"):
        chain.commit([lying], t + 2)
    # The hour is metered and settled: the settlement settles the cut trades, not the cleared.
    chain.commit_readings(hour_readings(sb, HOUR5, 1000), (HOUR5 + 1) * HOUR + 1)
    settlement = settlement_tx(chain.state, HOUR5)
    settled = codec.decode(settlement.body["result"])
    kept = [c.kept_wh for c in record.cuts]
    assert [d[2] for d in settled["deliveries"]] == kept
    balances: dict[str, int] = {}
    for payer, payee, amount, _ in settled["entries"]:
        balances[payer] = balances.get(payer, 0) - amount
        balances[payee] = balances.get(payee, 0) + amount
    assert sum(balances.values()) == 0
    chain.commit([settlement], (HOUR5 + 1) * HOUR + 2)
    verify_store(world.store)


def test_congestion_needs_a_network_and_an_unsettled_hour(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    request, result = two_microgrid_clearing(HOUR5 % 24)
    t = (H0 + 4) * HOUR
    chain.commit([sb.clearing(HOUR5, request, result, round=9)], t)
    assert chain.state is not None
    assert weakcentre.congestion_tx(chain.state, HOUR5, congestion.ADJUST) is None
    record = congestion.adjust(_feeder(1_000), result)
    body = {"hour": HOUR5, "clearing": chain.state.clearings[HOUR5].tx, "record": record.to_cbor()}
    with pytest.raises(TxError, match="no grid network is recorded"):
        chain.commit([Tx.make("congestion", body)], t + 1)
    unsigned = Tx.make(
        "grid_network",
        {"network": _feeder(1_000).to_cbor(), "time": t, "regulator_sig": b"\x00" * 64},
    )
    with pytest.raises(TxError, match="regulator signature"):
        chain.commit([unsigned], t + 1)
    bad = signed("m1", "grid_network", {"network": b"\xa0", "time": t}, sb.regulator)
    with pytest.raises(TxError, match="grid network"):
        chain.commit([bad], t + 1)


def _trade_hours(world: World, hours: range) -> None:
    """Clear, meter and settle each of ``hours`` (mg1 sells to mg2 every hour)."""
    chain, sb = world.chain, world.sandbox
    for k, h in enumerate(hours):
        request, result = two_microgrid_clearing(h % 24)
        chain.commit([sb.clearing(h, request, result, round=20 + k)], h * HOUR + 10)
        chain.commit_readings(hour_readings(sb, h, 1000 + 10 * (h - H0)), (h + 1) * HOUR + 1)
        assert chain.state is not None
        chain.commit([settlement_tx(chain.state, h)], (h + 1) * HOUR + 2)


def _report_tx(report: dict, reporter: str = "node0", time: int = 0) -> Tx:
    return Tx.make(
        "suspect_report", {"reporter": reporter, "report": codec.encode(report), "time": time}
    )


def _decision(world: World, report: bytes, who: str, action: str, fine: int, t: int) -> Tx:
    terms = {
        "report": report,
        "participant": who,
        "action": action,
        "fine": fine,
        "reason": "wash trades between related accounts",
        "time": t,
    }
    return signed("m1", "regulator_decision", terms, world.sandbox.regulator)


def test_suspect_report_is_re_run_and_the_regulator_decides(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chain = world.chain
    _trade_hours(world, range(H0 + 5, H0 + 11))
    state = chain.state
    assert state is not None
    related = [("mg1", "mg2")]  # the regulator knows the two accounts have one owner
    activity = state.monitoring_activity(H0, H0 + 11, related)
    genuine = monitor(activity).suspect_dict()
    assert [row[0] for row in genuine["suspects"]] == ["mg1", "mg2"]
    # What `meterchain monitor` computes from the stored blocks is the same report.
    txs = [Tx.decode(body) for b in world.store.stored_blocks() for _, _, body in b.txs]
    from_store = activity_from_txs(txs, from_hour=H0, to_hour=H0 + 11, related=related)
    assert monitor(from_store).suspect_dict() == genuine
    t = (H0 + 11) * HOUR + 10
    forged = dict(genuine, suspects=genuine["suspects"][:1])  # quietly drops mg2
    with pytest.raises(TxError, match="differs from the monitoring contract"):
        chain.commit([_report_tx(forged, time=t)], t)
    with pytest.raises(TxError, match="not ended"):
        chain.commit([_report_tx(dict(genuine, to_hour=H0 + 20), time=t)], t)
    retrained = dict(genuine, model_digest=b"\x01" * 32)
    with pytest.raises(TxError, match="needs a new version"):
        chain.commit([_report_tx(retrained, time=t)], t)
    unrelated = dict(genuine, related=[])  # without the relation nobody is a suspect
    with pytest.raises(TxError, match="lists at least one suspect|differs"):
        chain.commit([_report_tx(unrelated, time=t)], t)
    report = _report_tx(genuine, reporter="aggregator", time=t)
    chain.commit([report], t)
    with pytest.raises(TxError, match="not a suspect of that report"):
        chain.commit([_decision(world, report.hash, "grid", "warn", 0, t)], t + 1)
    with pytest.raises(TxError, match="a fine needs a positive amount"):
        chain.commit([_decision(world, report.hash, "mg2", "fine", 0, t)], t + 1)
    chain.commit([_decision(world, report.hash, "mg1", "fine", 5_000, t)], t + 1)
    chain.commit([_decision(world, report.hash, "mg2", "expel", 0, t)], t + 1)
    assert chain.state is not None
    assert chain.state.participants["mg2"].active is False
    assert chain.state.participants["mg2"].exit_mode == "expelled"
    with pytest.raises(TxError, match="already decided"):
        chain.commit([_decision(world, report.hash, "mg2", "fine", 5, t + 2)], t + 2)
    verify_store(world.store)
    # `meterchain monitor DB` prints the same suspects and confirms the recorded report.
    db = str(tmp_path / "ledger.db")
    args = [db, "--from-hour", str(H0), "--to-hour", str(H0 + 11), "--related", "mg1:mg2"]
    assert monitor_cli(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["suspects"] == ["mg1", "mg2"]
    assert out["recorded_reports"] == [{"tx": report.hash.hex()[:16], "confirmed": True}]
    assert monitor_cli(args) == 0
    text = capsys.readouterr().out
    assert "2 suspect(s): mg1, mg2" in text and "SUSPECT: wash" in text
    assert monitor_cli([str(tmp_path / "none.db")]) == 2


def _short_readings(world: World, hour: int, pv_wh: int) -> list:
    """The world's readings of ``hour``, except that pv1 exports only ``pv_wh`` since hour H0+1."""
    sb = world.sandbox
    out = []
    for r in hour_readings(sb, hour, 1000 + 10 * (hour - H0)):
        if r.meter_id == "pv1":
            k = (r.time - hour * HOUR) // 600
            r = sb.reading("pv1", r.seq, r.time, 0, 1_100_000 + pv_wh * k // 5, "pv", 100)
        out.append(r)
    return out


def test_storage_reserve_and_transmission_rights_remedy_a_short_hour(world: World) -> None:
    chain, sb = world.chain, world.sandbox
    h = H0 + 5
    t = (H0 + 4) * HOUR
    request, result = two_microgrid_clearing(h % 24)
    cleared = result.executed[0].trades[0].energy_wh
    chain.commit([sb.participant("mg3", "microgrid", t)], t)
    reserve = sb.owner_signed(
        "reserve_offer",
        {"owner": "mg3", "hour": h, "energy_wh": 20_000, "price": 9_000, "time": t},
        "mg3",
    )
    right = sb.owner_signed(
        "transmission_right",
        {
            "holder": "mg2",
            "seller": "mg1",
            "buyer": "mg2",
            "hour": h,
            "energy_wh": 10**6,
            "rate": 1_500,
            "time": t,
        },
        "mg2",
    )
    forged = Tx.make("reserve_offer", {**reserve.body, "energy_wh": 90_000})
    with pytest.raises(TxError, match="signature of owner mg3 does not verify"):
        chain.commit([forged], t + 1)
    chain.commit([reserve, right, sb.clearing(h, request, result, round=9)], t + 1)
    late = sb.owner_signed("reserve_offer", {**reserve.body, "time": h * HOUR + 5}, "mg3")
    with pytest.raises(TxError, match="has already begun"):
        chain.commit([late], h * HOUR + 5)
    chain.commit_readings(_short_readings(world, h, 10_000), (h + 1) * HOUR + 1)
    assert chain.state is not None
    chain.commit([settlement_tx(chain.state, h)], (h + 1) * HOUR + 2)
    tx = weakcentre.remedy_tx(chain.state, h, ("reassign", "storage", "ftr"))
    assert tx is not None
    plan = codec.decode(tx.body["result"])
    short = cleared - plan["remedies"][0][4] - plan["remedies"][1][4]
    assert [(r[0], r[3]) for r in plan["remedies"]] == [("storage", "mg3"), ("ftr", "mg2")]
    assert plan["remedies"][0][4] == 20_000  # the whole reserve, then the right pays the rest
    assert plan["uncovered"] == [["mg1", "mg2", plan["remedies"][1][4]]] and short >= 0
    money: dict[str, int] = {}
    for *_, entries in plan["remedies"]:
        for payer, payee, amount, _ in entries:
            money[payer] = money.get(payer, 0) - amount
            money[payee] = money.get(payee, 0) + amount
    assert sum(money.values()) == 0 and money["mg3"] > 0 and money["mg2"] > 0
    doctored = dict(plan, remedies=plan["remedies"][:1])
    with pytest.raises(TxError, match="re-executed remedies .* differ"):
        chain.commit([Tx.make("remedy", {**tx.body, "result": codec.encode(doctored)})], t + 9000)
    chain.commit([tx], (h + 1) * HOUR + 3)
    with pytest.raises(TxError, match="already has its remedies"):
        chain.commit(
            [Tx.make("remedy", {**tx.body, "result": codec.encode(doctored)})], (h + 1) * HOUR + 4
        )
    verify_store(world.store)


def test_regulator_commands_sign_what_the_ledger_accepts(world: World, tmp_path: Path) -> None:
    from meterchain.errors import ConfigError
    from meterchain.market.network import reference_network
    from meterchain.site import regulator
    from meterchain.site.layout import Site, SiteError, SiteSection, Timing

    site = Site(tmp_path, SiteSection(market="m1"), Timing())
    key = world.sandbox.regulator
    example = Path(__file__).resolve().parents[2] / "deploy" / "network.example.toml"
    tx = regulator.grid_network(site, key, example)
    world.chain.commit([tx], (H0 + 4) * HOUR)
    assert world.chain.state is not None
    assert world.chain.state.network == reference_network().to_cbor()
    bad = tmp_path / "bad.toml"
    bad.write_text(example.read_text().replace("limit_w = 250000", "limit_w = -1"))
    with pytest.raises(ConfigError, match="line\\[2\\].limit_w: must be an integer > 0"):
        regulator.grid_network(site, key, bad)
    with pytest.raises(SiteError, match="not a hex transaction hash"):
        regulator.decide(site, key, "zz", "mg1", "warn", 0, "why")
    decision = regulator.decide(site, key, "00" * 32, "mg1", "warn", 0, "late payments")
    with pytest.raises(TxError, match="is not a recorded suspect report"):
        world.chain.commit([decision], (H0 + 4) * HOUR + 1)
