"""The agent's Modbus layer against emulated SDM630s: RTU over a null modem, CRC errors, backoff."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from edge_agent.config import ModbusBusSection
from edge_agent.errors import ModbusLinkError
from edge_agent.modbus import Backoff, LinkState, MeterPoller, ModbusBus, read_sdm630
from hil.broker import free_port
from hil.emulated_meter import EmulatedSdm630, NullModem


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(1))
    delays = [backoff.next_delay() for _ in range(6)]
    for nominal, delay in zip([0.5, 1, 2, 4, 4, 4], delays, strict=True):
        assert 0.8 * nominal <= delay <= min(4.0, 1.2 * nominal)
    backoff.reset()
    assert backoff.next_delay() <= 0.6


def test_rtu_line_serializes_requests_survives_crc_errors_and_silence() -> None:
    async def scenario() -> None:
        modem = NullModem()
        # speed 0: simulated time stands still, so the registers are exactly the initial ones.
        line = EmulatedSdm630(serial_port=modem.port_a, unit=1, profile="load", speed=0.0)
        await line.plug()
        states: list[LinkState] = []
        errors: list[str] = []
        bus = ModbusBus(
            ModbusBusSection(
                "rs485",
                "rtu",
                serial_port=modem.port_b,
                baudrate=19200,
                timeout_s=0.3,
                backoff_initial_s=0.05,
                backoff_max_s=0.2,
            ),
            on_error=lambda name, kind: errors.append(kind),
            on_state=lambda name, state: states.append(state),
        )
        try:
            first = await bus.request(lambda c: read_sdm630(c, 1))
            assert first.import_wh == 1_234_500 and first.export_wh == 56_700
            assert states[-1] is LinkState.CONNECTED

            # Concurrent polls share the line one request at a time (the bus lock).
            results = await asyncio.gather(
                *(bus.request(lambda c: read_sdm630(c, 1)) for _ in range(4))
            )
            assert all(r.import_wh == first.import_wh for r in results)

            modem.corrupt(4)  # the response's first bytes are flipped: its CRC fails
            with pytest.raises(ModbusLinkError) as failure:
                await bus.request(lambda c: read_sdm630(c, 1))
            assert failure.value.kind == "crc"
            assert states[-1] is LinkState.BACKING_OFF

            modem.cut()
            with pytest.raises(ModbusLinkError) as failure:
                await bus.request(lambda c: read_sdm630(c, 1))
            assert failure.value.kind == "timeout"  # silence, not garbage
            modem.mend()
            again = await bus.request(lambda c: read_sdm630(c, 1))
            assert again.import_wh == first.import_wh
            assert errors == ["crc", "timeout"]
        finally:
            await bus.close()
            await line.unplug()
            modem.close()
        assert bus.state is LinkState.CLOSED

    asyncio.run(scenario())


def test_an_exception_reply_is_a_device_error_not_a_broken_link() -> None:
    async def scenario() -> None:
        port = free_port()
        meter = EmulatedSdm630(port=port, unit=1, setpoint_unit=7)
        await meter.plug()
        bus = ModbusBus(
            ModbusBusSection(
                "lan",
                "tcp",
                host="127.0.0.1",
                port=port,
                timeout_s=0.5,
                backoff_initial_s=0.01,
                backoff_max_s=0.02,
            )
        )
        try:
            # Unit 7 is a controller, not a meter: the block read is an illegal address.
            with pytest.raises(ModbusLinkError) as failure:
                await bus.request(lambda c: read_sdm630(c, 7))
            assert failure.value.kind == "exception"
            reading = await bus.request(lambda c: read_sdm630(c, 1))
            assert reading.power_w != 0
        finally:
            await bus.close()
            await meter.unplug()

    asyncio.run(scenario())


def test_poller_backs_off_logs_once_and_hands_on_samples_after_recovery(caplog) -> None:
    async def scenario() -> list[int]:
        port = free_port()
        meter = EmulatedSdm630(port=port, unit=3, profile="load", speed=3600.0)
        bus = ModbusBus(
            ModbusBusSection(
                "lan",
                "tcp",
                host="127.0.0.1",
                port=port,
                timeout_s=0.3,
                backoff_initial_s=0.02,
                backoff_max_s=0.05,
            )
        )
        samples: list[int] = []
        kinds: list[str] = []

        async def on_sample(meter_id: str, sample: object) -> None:
            samples.append(sample.import_wh)  # type: ignore[attr-defined]

        poller = MeterPoller(
            "sdm-3", bus, 3, 0.02, on_sample, on_error=lambda m, k: kinds.append(k)
        )
        task = asyncio.create_task(poller.run())
        # Nothing listens yet: connect errors, backing off (a loaded machine may be slow).
        for _ in range(200):
            if len(kinds) >= 2:
                break
            await asyncio.sleep(0.05)
        assert not samples and set(kinds) == {"connect"}, kinds
        await meter.plug()
        while len(samples) < 5:
            await asyncio.sleep(0.02)
        task.cancel()
        await bus.close()
        await meter.unplug()
        return samples

    caplog.set_level(logging.DEBUG, logger="meterchain.agent.modbus")
    samples = asyncio.run(scenario())
    assert samples == sorted(samples)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "sdm-3" in errors[0].getMessage()
    assert any("recovered" in r.getMessage() for r in caplog.records)


def test_a_register_that_is_not_a_number_is_a_decode_error() -> None:
    async def scenario() -> None:
        port = free_port()
        meter = EmulatedSdm630(port=port, unit=1)
        await meter.plug()
        bus = ModbusBus(
            ModbusBusSection(
                "lan",
                "tcp",
                host="127.0.0.1",
                port=port,
                timeout_s=0.5,
                backoff_initial_s=0.01,
                backoff_max_s=0.02,
            )
        )
        try:
            meter.inject(import_kwh=float("nan"))
            with pytest.raises(ModbusLinkError, match="not a finite number") as failure:
                await bus.request(lambda c: read_sdm630(c, 1))
            assert failure.value.kind == "decode"
            meter.clear_injections()
            assert (await bus.request(lambda c: read_sdm630(c, 1))).import_wh == 1_234_500
        finally:
            await bus.close()
            await meter.unplug()

    asyncio.run(scenario())
