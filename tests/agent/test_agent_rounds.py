"""Forecast -> M1 model -> bid -> clearing -> setpoints over Modbus, with time under control."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from edge_agent.bid import build_market, trade_request, window_periods
from edge_agent.config import (
    GasSection,
    MarketSection,
    MicrogridSection,
    ModbusBusSection,
    SetpointSection,
    StorageSection,
)
from edge_agent.energy import HOUR_S
from edge_agent.forecast import (
    Forecast,
    HourlyProfile,
    PersistenceForecaster,
    ProfileForecaster,
    history_from_energy,
)
from edge_agent.modbus import ModbusBus, setpoint_registers
from edge_agent.rounds import RoundDriver, StandaloneClearing
from edge_agent.setpoints import SetpointWriter
from edge_agent.store import AgentStore, HourlyEnergy, StoreView
from hil.broker import free_port
from hil.emulated_meter import MeterThread
from meterchain.market.model import Dispatch
from meterchain.market.units import MONEY_SCALE

DAY0 = 1_700_006_400  # 2023-11-15T00:00Z, a UTC midnight
assert DAY0 % 86_400 == 0

# Cheap nights, expensive evenings (minor units per kWh, MONEY_SCALE per currency unit).
PRICES = tuple(
    int(MONEY_SCALE * (0.12 if h < 7 else 0.45 if 17 <= h < 22 else 0.25)) for h in range(24)
)


def _section(**kw: object) -> MicrogridSection:
    defaults: dict[str, object] = dict(
        retail_price_per_kwh=PRICES,
        feed_in_tariff_per_kwh=int(MONEY_SCALE * 0.05),
        green_loss_per_kwh=int(MONEY_SCALE * 0.10),
        green_share_pct=50,
        storage=StorageSection(5000, 5000, 950_000, 1000, 20_000, 10_000),
        gas=GasSection(
            a_per_mw2h=int(MONEY_SCALE * 20), b_per_kwh=int(MONEY_SCALE * 0.30), p_max_w=6000
        ),
    )
    defaults.update(kw)
    return MicrogridSection(**defaults)  # type: ignore[arg-type]


def test_persistence_uses_the_same_hour_of_the_latest_day_then_fallbacks() -> None:
    history = {DAY0 + 13 * HOUR_S: (4000, 900), DAY0 - 86_400 + 14 * HOUR_S: (3000, 800)}
    target = DAY0 + 86_400 + 13 * HOUR_S
    f = PersistenceForecaster().forecast(history, target, 3)
    assert f.renewable_w == (4000, 3000, 4000) and f.load_w == (900, 800, 900)
    # 13:00 yesterday; 14:00 two days ago; 15:00 unknown -> the latest measured hour.
    profile = HourlyProfile(tuple(range(24)), tuple(100 + h for h in range(24)))
    f = PersistenceForecaster(profile).forecast(history, target, 3)
    assert f.renewable_w == (4000, 3000, 15) and f.load_w == (900, 800, 115)
    assert ProfileForecaster(profile).forecast(history, target, 2).load_w == (113, 114)
    assert PersistenceForecaster().forecast({}, target, 2) == Forecast(target, (0, 0), (0, 0))


def test_history_counts_complete_hours_renewable_export_and_load_import() -> None:
    rows = [
        HourlyEnergy(DAY0, "pv1", "mg1", "pv", 3, 2500),
        HourlyEnergy(DAY0, "wt1", "mg1", "wind", 0, 1000),
        HourlyEnergy(DAY0, "ld1", "mg1", "load", 1800, 0),
        HourlyEnergy(DAY0, "bat", "mg1", "storage", 700, 600),  # controllable: not forecast
        HourlyEnergy(DAY0 + HOUR_S, "ld1", "mg1", "load", 900, 0),  # the hour in progress
    ]
    assert history_from_energy(rows, before=DAY0 + HOUR_S + 10) == {DAY0: (3500, 1800)}


def test_window_shrinks_to_the_end_of_the_day_and_the_bid_is_a_valid_model() -> None:
    assert window_periods(DAY0) == 24
    assert window_periods(DAY0 + 23 * HOUR_S) == 1
    forecast = Forecast(DAY0 + 20 * HOUR_S, (0, 0, 0, 0), (3000, 3200, 2500, 1000))
    request = trade_request("mg1", _section(deposit=500), forecast, soc_wh=30_000)
    mg = request.microgrid
    assert mg.retail_price_per_kwh == PRICES[20:24]
    assert mg.green_demand_w == (1500, 1600, 1250, 500)
    assert mg.storage is not None and mg.storage.soc_wh == 20_000  # clamped into the bounds
    assert request.deposit == 500


def test_setpoint_registers_scale_and_sign() -> None:
    assert setpoint_registers(-2500, 0.1, 1, True) == [0xFF06]  # -250 as int16
    assert setpoint_registers(70_000, 1.0, 2, False) == [0x0001, 0x1170]
    with pytest.raises(ValueError, match="does not fit 16-bit"):
        setpoint_registers(40_000, 1.0, 1, True)


def _history_store(tmp_path: Path) -> tuple[AgentStore, StoreView]:
    """Two measured days: PV at midday, load with an evening peak."""
    store = AgentStore(tmp_path / "agent.sqlite")
    with store.transaction():
        for h in range(48):
            t = DAY0 - 2 * 86_400 + h * HOUR_S
            hod = h % 24
            pv = max(0, 6000 - 900 * abs(hod - 12)) if 6 <= hod <= 18 else 0
            load = 1500 + (2500 if 17 <= hod < 22 else 0)
            store.fold("pv1", "mg1", "pv", t, t + HOUR_S, 0, pv)
            store.fold("ld1", "mg1", "load", t, t + HOUR_S, load, 0)
    return store, StoreView(tmp_path / "agent.sqlite")


def test_round_bids_clears_and_writes_setpoints(tmp_path: Path, caplog) -> None:
    store, view = _history_store(tmp_path)
    port = free_port()
    setpoints = (
        SetpointSection("storage_power_w", "lan", unit=5, address=10, scale=0.1, words=1),
        SetpointSection("gas_turbine_w", "lan", unit=5, address=20, words=2, signed=False),
    )
    now = DAY0 + 17 * HOUR_S + 3000  # bidding for 18:00, an expensive evening hour
    outcomes = []

    async def scenario(rig: MeterThread) -> None:
        bus = ModbusBus(
            ModbusBusSection(
                "lan",
                "tcp",
                host="127.0.0.1",
                port=port,
                timeout_s=0.5,
                backoff_initial_s=0.05,
                backoff_max_s=0.1,
            )
        )
        written, failed = [], []
        driver = RoundDriver(
            microgrid_id="mg1",
            section=_section(),
            forecaster=PersistenceForecaster(),
            history=lambda t: history_from_energy(view.hourly(owner="mg1"), before=t),
            clearing=StandaloneClearing(build_market(MarketSection(wheeling_fee_per_kwh=100))),
            writer=SetpointWriter(
                setpoints, {"lan": bus}, on_written=written.append, on_failed=failed.append
            ),
            store=view,
            clock=lambda: now,
            on_round=outcomes.append,
        )
        hour = DAY0 + 18 * HOUR_S
        outcome = await driver.prepare(hour)
        assert outcome.result is not None and not outcome.error
        assert outcome.request is not None
        mg = outcome.request.microgrid
        assert mg.periods == 6 and mg.load_w[0] == 4000  # yesterday's 18:00
        assert mg.storage is not None and mg.storage.soc_wh == 10_000  # nothing executed yet
        d = outcome.dispatch
        # At 0.45/kWh against a turbine at ~0.30/kWh and a charged battery, buying
        # everything from the grid is not optimal.
        assert d.gas_w > 0 or d.discharge_w > 0
        assert await driver.execute(outcome) == []
        registers = rig.meter.setpoints.registers
        assert registers[10] == setpoint_registers(d.discharge_w - d.charge_w, 0.1, 1, True)[0]
        hi, lo = setpoint_registers(d.gas_w, 1.0, 2, False)
        assert (registers[20], registers[21]) == (hi, lo)
        assert written == ["storage_power_w", "gas_turbine_w"] and failed == []
        assert view.schedule(hour) == d

        # The next window starts from the energy this hour left in the battery.
        follow = await driver.prepare(hour + HOUR_S)
        assert follow.request is not None and follow.request.microgrid.storage is not None
        assert follow.request.microgrid.storage.soc_wh == d.soc_wh

        # The controller is unreachable: nothing applied, each setpoint says why.
        rig.unplug()
        missed = await driver.execute(follow)
        assert [m.kind for m in missed] == ["storage_power_w", "gas_turbine_w"]
        assert all(
            m.reason.split(":")[0] in ("timeout", "disconnected", "connect") for m in missed
        ), missed
        row = (
            view._conn()
            .execute("SELECT not_applied FROM schedule WHERE hour = ?", (hour + HOUR_S,))
            .fetchone()
        )
        assert [m["kind"] for m in json.loads(row[0])] == ["storage_power_w", "gas_turbine_w"]
        rig.plug()
        await bus.close()

    caplog.set_level(logging.INFO)
    with MeterThread(port=port, setpoint_unit=5) as rig:
        asyncio.run(scenario(rig))
    assert len(outcomes) == 2
    assert "not applied" in caplog.text


def test_a_round_without_result_idles_storage_and_turbine(tmp_path: Path) -> None:
    _, view = _history_store(tmp_path)

    class Unreachable:
        async def clear(self, request: object, first_hour: int) -> object:
            from meterchain.market.errors import SolverFailure

            raise SolverFailure("no quorum within the round deadline")

    driver = RoundDriver(
        microgrid_id="mg1",
        section=_section(),
        forecaster=PersistenceForecaster(),
        history=lambda t: {},
        clearing=Unreachable(),  # type: ignore[arg-type]
        writer=SetpointWriter((), {}),
        store=view,
        clock=lambda: DAY0,
    )
    outcome = asyncio.run(driver.prepare(DAY0 + HOUR_S))
    assert outcome.result is None and outcome.dispatch == Dispatch()
    assert "no quorum" in outcome.error
