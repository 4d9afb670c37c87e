"""The emulated SDM630: Eastron's register map, energy that integrates power, test controls."""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys

import pytest
from pymodbus.client import AsyncModbusSerialClient, ModbusTcpClient

from edge_agent.sdm630 import INPUT_REGISTERS, decode_block, decode_float32
from hil.broker import free_port
from hil.emulated_meter import EmulatedSdm630, MeterState, MeterThread, NullModem
from hil.profiles import LoadProfile, PvProfile

NOON = 1_700_000_000 - 1_700_000_000 % 86_400 + 12 * 3600


class FakeWall:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _read_float(client: ModbusTcpClient, name: str, unit: int = 1) -> float:
    response = client.read_input_registers(INPUT_REGISTERS[name], count=2, device_id=unit)
    assert not response.isError(), response
    return decode_float32(response.registers, 0)


def test_same_seed_same_registers_and_energy_is_the_integral_of_power() -> None:
    a = MeterState(PvProfile(seed=7), NOON, import_wh=0.0, export_wh=0.0)
    b = MeterState(PvProfile(seed=7), NOON, import_wh=0.0, export_wh=0.0)
    # Different polling patterns, same simulated instants at the end.
    for t in range(0, 3600, 7):
        a.values_at(NOON + t)
    assert a.values_at(NOON + 3600) == b.values_at(NOON + 3600)
    exported = sum(-PvProfile(seed=7).power_w(NOON + 10 * k) * 10 for k in range(360)) / 3600
    assert b.export_wh == pytest.approx(exported, rel=1e-12)
    assert b.import_wh == 0.0
    assert 3000 < exported < 8000  # a PV array of 8 kW peak around noon, with clouds
    # Starting between two steps: the registers start exactly at their initial values.
    odd = MeterState(LoadProfile(seed=2), NOON + 3.7, import_wh=5000.0)
    assert odd.values_at(NOON + 3.7)["import_kwh"] == 5.0
    assert odd.values_at(NOON + 13.7)["import_kwh"] > 5.0
    other = MeterState(PvProfile(seed=8), NOON)
    assert other.values_at(NOON + 3600)["export_kwh"] != b.values_at(NOON + 3600)["export_kwh"]


def test_electrical_values_are_consistent() -> None:
    state = MeterState(LoadProfile(seed=3), NOON + 7 * 3600, power_factor=0.97)
    v = state.values_at(NOON + 7 * 3600 + 30)
    phases = v["l1_power_w"] + v["l2_power_w"] + v["l3_power_w"]
    assert phases == pytest.approx(v["total_power_w"])
    assert v["total_power_w"] > 0  # a load imports
    for i in (1, 2, 3):
        assert 225 < v[f"l{i}_voltage_v"] < 235
        assert v[f"l{i}_current_a"] == pytest.approx(
            v[f"l{i}_apparent_power_va"] / v[f"l{i}_voltage_v"]
        )
    assert v["total_power_factor"] == pytest.approx(0.97)
    assert v["sum_current_a"] == pytest.approx(sum(v[f"l{i}_current_a"] for i in (1, 2, 3)))
    assert 49.9 < v["frequency_hz"] < 50.1
    assert v["total_kwh"] == pytest.approx(v["import_kwh"] + v["export_kwh"])
    assert math.isclose(v["l1_l2_voltage_v"] / v["l1_voltage_v"], math.sqrt(3), rel_tol=0.02)


def test_stock_client_reads_the_eastron_map_and_controls_work() -> None:
    wall = FakeWall()
    port = free_port()
    with MeterThread(
        port=port, profile="load", seed=5, start_time=NOON, speed=60.0, import_kwh=100.0, wall=wall
    ) as rig:
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
        assert client.connect()
        # One block read of 0x0000..0x004B, as polling software does, plus 0x0156.
        block = client.read_input_registers(0, count=0x4C, device_id=1)
        values = decode_block(block.registers)
        assert values["import_kwh"] == pytest.approx(100.0, abs=1e-3)
        assert _read_float(client, "total_kwh") == pytest.approx(100.0 + 56.7, abs=1e-3)
        power = values["total_power_w"]

        wall.t += 60.0  # one wall minute at 60x is one simulated hour
        later = _read_float(client, "import_kwh")
        assert 100.5 < later < 110.0
        # Energy never decreases and only advances with time.
        assert _read_float(client, "import_kwh") == later

        rig.freeze()
        wall.t += 600.0
        assert _read_float(client, "import_kwh") == later
        rig.unfreeze()
        wall.t += 1.0
        assert _read_float(client, "import_kwh") > later

        rig.inject(total_power_w=-1234.0)
        assert _read_float(client, "total_power_w") == -1234.0
        rig.clear_injections()
        assert _read_float(client, "total_power_w") != -1234.0
        with pytest.raises(KeyError):
            rig.meter.inject(bogus=1.0)
        assert power > 0

        rig.unplug()
        client.close()
        assert not client.connect()
        wall.t += 60.0  # the meter keeps measuring while its link is cut
        rig.plug()
        assert client.connect()
        assert _read_float(client, "import_kwh") > later + 0.5
        client.close()


def test_cli_serves_until_interrupted() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meterchain.cli",
            "hil",
            "emulate-meter",
            "--tcp",
            f"127.0.0.1:{port}",
            "--unit",
            "3",
            "--profile",
            "pv",
            "--seed",
            "2",
            "--setpoint-unit",
            "5",
            "--setpoint-base",
            "40100",  # the example agent config's setpoint address
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"emulated SDM630 unit 3 (pv, seed 2) on 127.0.0.1:{port}" in line
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
        assert client.connect()
        assert 220 < _read_float(client, "l2_voltage_v", unit=3) < 240
        assert _read_float(client, "import_kwh", unit=3) == pytest.approx(1234.5, abs=0.01)
        assert not client.write_registers(40100, [7, 8], device_id=5).isError()
        assert client.read_holding_registers(40100, count=2, device_id=5).registers == [7, 8]
        assert client.write_register(40100 + 64, 1, device_id=5).isError()  # beyond the block
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


def test_bad_cli_address_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "hil", "emulate-meter", "--tcp", "nohost"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "expected HOST:PORT, got 'nohost'" in proc.stderr
    with pytest.raises(ValueError, match=r"65500\.\.65563 do not fit"):
        EmulatedSdm630(setpoint_unit=5, setpoint_base=65500)


def test_rtu_over_a_null_modem_with_corrupted_frames() -> None:
    async def scenario() -> None:
        modem = NullModem()
        meter = EmulatedSdm630(serial_port=modem.port_a, unit=4, profile="load", start_time=NOON)
        await meter.plug()
        client = AsyncModbusSerialClient(modem.port_b, timeout=0.5, retries=0, reconnect_delay=0)
        try:
            assert await client.connect()
            good = await client.read_input_registers(0x48, count=2, device_id=4)
            assert decode_float32(good.registers, 0) == pytest.approx(1234.5, abs=0.01)
            modem.corrupt(3)  # the next response's first bytes flip: its CRC fails
            with pytest.raises(Exception, match="No response"):
                await client.read_input_registers(0x48, count=2, device_id=4)
            again = await client.read_input_registers(0x48, count=2, device_id=4)
            assert not again.isError()
        finally:
            client.close()
            await meter.unplug()
            modem.close()

    asyncio.run(scenario())
