"""Executing the cleared hour: setpoints for storage and gas turbine written over Modbus.

Each configured `[[setpoint]]` maps one quantity of the executed dispatch to
holding registers of a device (function 06 for one register, 16 for two):

- `storage_charge_w`, `storage_discharge_w`: the two flows, each >= 0;
- `storage_power_w`: one signed value for inverters with a single register,
  positive when discharging (the battery feeds the microgrid), negative when
  charging;
- `gas_turbine_w`: the turbine's output.

The register value is round(W * scale), as int16/uint16 or int32/uint32
(high word first). A setpoint that cannot be written (link down, device
exception, value out of range) is logged and counted, and the others are
still written: a battery that follows its schedule is better than none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.config import SetpointSection
from edge_agent.errors import ModbusLinkError
from edge_agent.modbus import ModbusBus, setpoint_registers, write_registers
from meterchain.calm import CalmLog
from meterchain.market.model import Dispatch

log = logging.getLogger("meterchain.agent.setpoints")


def setpoint_values(dispatch: Dispatch) -> dict[str, int]:
    """Every setpoint kind's value in W for one hour's dispatch."""
    return {
        "storage_charge_w": dispatch.charge_w,
        "storage_discharge_w": dispatch.discharge_w,
        "storage_power_w": dispatch.discharge_w - dispatch.charge_w,
        "gas_turbine_w": dispatch.gas_w,
    }


@dataclass(frozen=True)
class NotApplied:
    """A setpoint that was not written, and why."""

    kind: str
    value_w: int
    reason: str


class SetpointWriter:
    def __init__(
        self,
        setpoints: tuple[SetpointSection, ...],
        buses: dict[str, ModbusBus],
        *,
        on_written: Callable[[str], None] | None = None,
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        self.setpoints = setpoints
        self.buses = buses
        self.on_written = on_written or (lambda kind: None)
        self.on_failed = on_failed or (lambda kind: None)
        self.calm = CalmLog(log, per_kind=False)

    async def apply(self, dispatch: Dispatch) -> list[NotApplied]:
        """Write every configured setpoint for `dispatch`; what could not be applied."""
        values = setpoint_values(dispatch)
        missed: list[NotApplied] = []
        for sp in self.setpoints:
            value = values[sp.kind]
            subject = f"setpoint {sp.kind} (bus {sp.bus}, unit {sp.unit}, register {sp.address})"
            try:
                words = setpoint_registers(value, sp.scale, sp.words, sp.signed)
            except ValueError as exc:
                missed.append(NotApplied(sp.kind, value, f"out of range: {exc}"))
                log.error("%s: cannot apply %d W: %s", subject, value, exc)
                self.on_failed(sp.kind)
                continue
            try:
                await self.buses[sp.bus].request(
                    lambda client, sp=sp, words=words: write_registers(
                        client, sp.unit, sp.address, words
                    )
                )
            except ModbusLinkError as exc:
                missed.append(NotApplied(sp.kind, value, f"{exc.kind}: {exc}"))
                self.calm.failure(subject, exc.kind, f"could not apply {value} W: {exc}")
                self.on_failed(sp.kind)
                continue
            self.calm.success(subject)
            self.on_written(sp.kind)
            log.info("%s: applied %d W (registers %s)", subject, value, words)
        return missed
