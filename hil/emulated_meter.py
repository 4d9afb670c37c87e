"""An emulated Eastron SDM630 on Modbus TCP or RTU, driven by a deterministic power profile.

The meter integrates a profile (hil/profiles.py) in fixed simulated steps, so
its import/export registers are exactly the integral of the power it reports
and the same seed gives the same registers whatever the polling pattern.
Simulated time can run faster than the wall clock. Tests can control it:
`unplug()`/`plug()` stop and restart the server on the same port (the meter
keeps measuring meanwhile, as a real one does when its RS-485 link is cut),
`freeze()` stops time, `inject()` overrides register values. `NullModem` is a
pair of pseudo-terminals joined by a relay that can corrupt or drop bytes, for
RTU over a "serial cable" with real CRC errors.

Holding registers of a second unit (`setpoint_unit`) stand for a storage
inverter / gas-turbine controller the agent writes setpoints to: PDU
addresses `setpoint_base` .. `setpoint_base + setpoint_registers - 1`
(`--setpoint-base 40100` matches the example agent config); every write is
recorded for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import select
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field

from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent.sdm630 import INPUT_REGISTERS, encode_float32
from hil.profiles import PowerProfile, make_profile, smooth_noise

# Phase shares of the total power: an unbalanced but plausible three-phase site.
_PHASE_SHARE = (0.40, 0.35, 0.25)
_FC_READ_INPUT = 4
_FC_READ_HOLDING = 3
_FC_WRITE_SINGLE = 6
_FC_WRITE_MULTIPLE = 16


class SimClock:
    """Simulated Unix time: `start + speed * (wall - wall0)`, minus time spent frozen."""

    def __init__(
        self,
        start: float,
        speed: float = 1.0,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._start = start
        self._speed = speed
        self._wall0 = wall()
        self._frozen_at: float | None = None

    def now(self) -> float:
        if self._frozen_at is not None:
            return self._frozen_at
        return self._start + self._speed * (self._wall() - self._wall0)

    def freeze(self) -> None:
        if self._frozen_at is None:
            self._frozen_at = self.now()

    def unfreeze(self) -> None:
        """Resume from the frozen instant, so no simulated time is skipped."""
        if self._frozen_at is not None:
            self._start, self._wall0 = self._frozen_at, self._wall()
            self._frozen_at = None


@dataclass
class MeterState:
    """Energy registers integrated from a profile in fixed simulated steps (Wh, floats)."""

    profile: PowerProfile
    start_time: float
    step_s: float = 10.0
    import_wh: float = 0.0
    export_wh: float = 0.0
    power_factor: float = 0.97
    seed: int = 1
    _t: float = field(init=False, default=0.0)  # time integrated up to (s)

    def __post_init__(self) -> None:
        self._t = self.start_time

    def _step_power(self, step: int) -> float:
        return self.profile.power_w(step * self.step_s)

    def _add(self, power_w: float, seconds: float) -> None:
        if power_w >= 0:
            self.import_wh += power_w * seconds / 3600.0
        else:
            self.export_wh += -power_w * seconds / 3600.0

    def values_at(self, t: float) -> dict[str, float]:
        """Every SDM630 value at simulated time `t` (never earlier than already seen).

        Energy is committed up to the last step boundary before `t` (so the
        result does not depend on how often the meter was read) and the part
        of the current step is added on top.
        """
        while True:
            step = math.floor(self._t / self.step_s)
            boundary = (step + 1) * self.step_s
            if boundary > t:
                break
            self._add(self._step_power(step), boundary - self._t)
            self._t = boundary
        power = self._step_power(math.floor(self._t / self.step_s))
        partial = max(0.0, t - self._t)
        imp, exp = self.import_wh, self.export_wh
        if power >= 0:
            imp += power * partial / 3600.0
        else:
            exp += -power * partial / 3600.0
        return self._electrical(power, t) | {
            "import_kwh": imp / 1000.0,
            "export_kwh": exp / 1000.0,
            "total_kwh": (imp + exp) / 1000.0,
            "import_kvarh": imp * self._tan_phi() / 1000.0,
            "export_kvarh": exp * self._tan_phi() / 1000.0,
            "total_kvarh": (imp + exp) * self._tan_phi() / 1000.0,
        }

    def _tan_phi(self) -> float:
        return math.tan(math.acos(self.power_factor))

    def _electrical(self, power: float, t: float) -> dict[str, float]:
        pf = self.power_factor
        angle = math.degrees(math.acos(pf))
        values: dict[str, float] = {}
        currents = []
        for i, share in enumerate(_PHASE_SHARE, start=1):
            volts = 230.0 + 4.0 * (smooth_noise(self.seed * 7 + i, t, 30.0) - 0.5)
            p = power * share
            va = abs(p) / pf
            amps = va / volts
            currents.append(amps)
            values |= {
                f"l{i}_voltage_v": volts,
                f"l{i}_current_a": amps,
                f"l{i}_power_w": p,
                f"l{i}_apparent_power_va": va,
                f"l{i}_reactive_power_var": va * math.sin(math.acos(pf)),
                f"l{i}_power_factor": pf,
                f"l{i}_phase_angle_deg": angle,
            }
        volts = [values[f"l{i}_voltage_v"] for i in (1, 2, 3)]
        total_va = abs(power) / pf
        # Line-to-line voltage of a balanced system is sqrt(3) times phase voltage.
        line = [math.sqrt(3) * (volts[i] + volts[(i + 1) % 3]) / 2 for i in range(3)]
        return values | {
            "average_voltage_v": sum(volts) / 3,
            "average_current_a": sum(currents) / 3,
            "sum_current_a": sum(currents),
            "total_power_w": power,
            "total_apparent_power_va": total_va,
            "total_reactive_power_var": total_va * math.sin(math.acos(pf)),
            "total_power_factor": pf,
            "total_phase_angle_deg": angle,
            "frequency_hz": 50.0 + 0.1 * (smooth_noise(self.seed * 13, t, 20.0) - 0.5),
            "total_system_power_demand_w": power,
            "l1_l2_voltage_v": line[0],
            "l2_l3_voltage_v": line[1],
            "l3_l1_voltage_v": line[2],
            "average_line_voltage_v": sum(line) / 3,
            # Vector sum of three currents 120 degrees apart.
            "neutral_current_a": abs(
                sum(
                    c * complex(math.cos(k * 2.094395), math.sin(k * 2.094395))
                    for k, c in enumerate(currents)
                )
            ),
        }


def _input_register_block() -> SimData:
    """Input registers 0x0000 up to the last mapped value.

    Like the real meter, a block read may span addresses that hold no value
    (they read as zero), so the agent can fetch everything in one request.
    """
    end = max(INPUT_REGISTERS.values()) + 2
    return SimData(0, count=end, values=0, datatype=DataType.REGISTERS)


@dataclass
class SetpointLog:
    """Holding-register writes seen by the emulated controller: (address, value) in order."""

    writes: list[tuple[int, int]] = field(default_factory=list)
    registers: dict[int, int] = field(default_factory=dict)


class EmulatedSdm630:
    """The Modbus server side: one SDM630 (unit `unit`) and an optional setpoint controller.

    Runs on the caller's asyncio loop; `MeterThread` runs one on its own thread.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 5020,
        unit: int = 1,
        profile: str | PowerProfile = "load",
        seed: int = 1,
        start_time: float | None = None,
        speed: float = 1.0,
        import_kwh: float = 1234.5,
        export_kwh: float = 56.7,
        serial_port: str | None = None,
        baudrate: int = 19200,
        setpoint_unit: int | None = None,
        setpoint_registers: int = 64,
        setpoint_base: int = 0,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.port, self.unit = host, port, unit
        self.serial_port, self.baudrate = serial_port, baudrate
        power_profile = make_profile(profile, seed) if isinstance(profile, str) else profile
        t0 = time.time() if start_time is None else start_time
        self.clock = SimClock(t0, speed, wall)
        self.state = MeterState(
            power_profile,
            t0,
            import_wh=import_kwh * 1000.0,
            export_wh=export_kwh * 1000.0,
            power_factor=0.99 if profile == "pv" else 0.97,
            seed=seed,
        )
        self.overrides: dict[str, float] = {}
        self.reads = 0
        self.setpoint_unit = setpoint_unit
        self.setpoints = SetpointLog()
        self._setpoint_registers = setpoint_registers
        if not 0 <= setpoint_base <= 65536 - setpoint_registers:
            raise ValueError(
                f"setpoint registers {setpoint_base}..{setpoint_base + setpoint_registers - 1} "
                "do not fit the Modbus address space 0..65535"
            )
        self._setpoint_base = setpoint_base
        self._server: ModbusTcpServer | ModbusSerialServer | None = None

    # -- values ---------------------------------------------------------------

    def values(self) -> dict[str, float]:
        """What the meter shows now, injections included."""
        return self.state.values_at(self.clock.now()) | self.overrides

    def inject(self, **values: float) -> None:
        """Override named registers (see edge_agent.sdm630.INPUT_REGISTERS) until cleared."""
        unknown = set(values) - set(INPUT_REGISTERS)
        if unknown:
            raise KeyError(f"not SDM630 registers: {sorted(unknown)}")
        self.overrides.update(values)

    def clear_injections(self) -> None:
        self.overrides.clear()

    def freeze(self) -> None:
        self.clock.freeze()

    def unfreeze(self) -> None:
        self.clock.unfreeze()

    async def _meter_action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        if function_code != _FC_READ_INPUT:
            return None
        self.reads += 1
        values = self.values()
        for name, reg in INPUT_REGISTERS.items():
            if address - 1 <= reg < address + count and reg >= start_address:
                hi, lo = encode_float32(values[name])
                index = reg - start_address
                if index + 1 < len(registers):
                    registers[index], registers[index + 1] = hi, lo
        return None

    async def _setpoint_action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        if function_code in (_FC_WRITE_SINGLE, _FC_WRITE_MULTIPLE) and set_values:
            for offset, value in enumerate(set_values):
                self.setpoints.writes.append((address + offset, int(value)))
                self.setpoints.registers[address + offset] = int(value)
        return None

    def _devices(self) -> list[SimDevice]:
        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        meter = SimDevice(
            id=self.unit,
            simdata=(
                list(bits),
                list(bits),
                # The SDM630's holding registers are settings; the agent never writes them.
                [SimData(0, count=2, values=0.0, datatype=DataType.FLOAT32)],
                [_input_register_block()],
            ),
            action=self._meter_action,
        )
        devices = [meter]
        if self.setpoint_unit is not None:
            devices.append(
                SimDevice(
                    id=self.setpoint_unit,
                    simdata=(
                        list(bits),
                        list(bits),
                        [
                            SimData(
                                self._setpoint_base,
                                count=self._setpoint_registers,
                                values=0,
                                datatype=DataType.REGISTERS,
                            )
                        ],
                        [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)],
                    ),
                    action=self._setpoint_action,
                )
            )
        return devices

    # -- link -----------------------------------------------------------------

    @property
    def plugged(self) -> bool:
        return self._server is not None

    async def plug(self) -> None:
        """Start serving (again) on the same address; the meter's energy kept counting."""
        if self._server is not None:
            return
        server: ModbusTcpServer | ModbusSerialServer
        if self.serial_port is not None:
            server = ModbusSerialServer(
                self._devices(),
                framer=FramerType.RTU,
                port=self.serial_port,
                baudrate=self.baudrate,
                ignore_missing_devices=True,
            )
        else:
            server = ModbusTcpServer(
                self._devices(),
                address=(self.host, self.port),
                ignore_missing_devices=True,
            )
        await server.serve_forever(background=True)
        self._server = server

    async def unplug(self) -> None:
        """Stop answering: close the listener and every open connection."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()
            # Let the transports finish closing before a re-plug binds the port.
            await asyncio.sleep(0.05)

    async def run_until_cancelled(self) -> None:
        await self.plug()
        try:
            await asyncio.Event().wait()
        finally:
            await self.unplug()


class MeterThread:
    """An `EmulatedSdm630` on its own event loop thread, with thread-safe controls for tests."""

    def __init__(self, **kwargs: object) -> None:
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="emulated-sdm630", daemon=True
        )
        self.meter: EmulatedSdm630

    def _call(self, coro_factory: Callable[[], object], timeout: float = 10.0) -> object:
        async def runner() -> object:
            result = coro_factory()
            if asyncio.iscoroutine(result):
                return await result
            return result

        return asyncio.run_coroutine_threadsafe(runner(), self._loop).result(timeout)

    def start(self) -> MeterThread:
        self._thread.start()

        def build() -> EmulatedSdm630:
            return EmulatedSdm630(**self._kwargs)  # type: ignore[arg-type]

        self.meter = self._call(build)  # type: ignore[assignment]
        self.plug()
        return self

    def plug(self) -> None:
        self._call(lambda: self.meter.plug())

    def unplug(self) -> None:
        self._call(lambda: self.meter.unplug())

    def freeze(self) -> None:
        self._call(self.meter.freeze)

    def unfreeze(self) -> None:
        self._call(self.meter.unfreeze)

    def inject(self, **values: float) -> None:
        self._call(lambda: self.meter.inject(**values))

    def clear_injections(self) -> None:
        self._call(self.meter.clear_injections)

    def values(self) -> dict[str, float]:
        return self._call(self.meter.values)  # type: ignore[return-value]

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.unplug()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> MeterThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NullModem:
    """Two pseudo-terminals joined back to back: a serial cable between `port_a` and `port_b`.

    Bytes are relayed by a thread that can corrupt the next `n` bytes going
    a→b (`corrupt(n)`: each flipped, so RTU frames fail their CRC) or drop
    everything (`cut()` / `mend()`), as a loose RS-485 terminal does.
    """

    def __init__(self) -> None:
        self._master_a, slave_a = os.openpty()
        self._master_b, slave_b = os.openpty()
        for fd in (self._master_a, self._master_b, slave_a, slave_b):
            tty.setraw(fd)
        self.port_a = os.ttyname(slave_a)
        self.port_b = os.ttyname(slave_b)
        # Keep the slave ends open so the masters never see EOF while ports reopen.
        self._slaves = (slave_a, slave_b)
        self._corrupt_a_to_b = 0
        self._cut = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.relayed = 0
        self._thread = threading.Thread(target=self._relay, name="null-modem", daemon=True)
        self._thread.start()

    def corrupt(self, n: int = 1) -> None:
        with self._lock:
            self._corrupt_a_to_b += n

    def cut(self) -> None:
        self._cut = True

    def mend(self) -> None:
        self._cut = False

    def _relay(self) -> None:
        peers = {self._master_a: self._master_b, self._master_b: self._master_a}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(peers), [], [], 0.05)
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                if self._cut or not data:
                    continue
                if fd == self._master_a:
                    data = self._maybe_corrupt(data)
                os.write(peers[fd], data)
                self.relayed += len(data)

    def _maybe_corrupt(self, data: bytes) -> bytes:
        with self._lock:
            n = min(self._corrupt_a_to_b, len(data))
            self._corrupt_a_to_b -= n
        if not n:
            return data
        buf = bytearray(data)
        for i in range(n):
            buf[i] ^= 0xFF
        return bytes(buf)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for fd in (self._master_a, self._master_b, *self._slaves):
            with contextlib.suppress(OSError):
                os.close(fd)
