"""Modbus buses, the SDM630 reader and setpoint writes, in layers (STYLE rules 1, 7, 8, 9).

- `ModbusBus` owns one physical link (a TCP socket to a gateway or a serial
  RS-485 line through pymodbus's RTU framer): the connection state, capped
  exponential backoff with jitter, one asyncio lock so requests on a bus never
  interleave, and the translation of every pymodbus failure into one
  `ModbusLinkError` with a stable `kind` ("connect", "timeout", "crc",
  "exception", "disconnected", "decode"). Its `connect()` is safe to call any
  number of times.
- `read_sdm630` speaks the meter's protocol over a connected client: one
  function-04 request for the block 0x0000..0x004B, decoded as float32.
- `write_setpoint` writes one scaled integer (function 06 or 16).
- `MeterPoller` polls one meter on a schedule and hands each sample on; a
  failure becomes logged state and a metric, never a crash.

pymodbus logs its own failures at ERROR on every attempt; the agent sets the
"pymodbus" logger to CRITICAL and logs calmly here instead (ERROR on the
first failure of a bus or meter, DEBUG while it persists, INFO on recovery).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType

from edge_agent import sdm630
from edge_agent.config import ModbusBusSection
from edge_agent.errors import ModbusLinkError
from meterchain.backoff import Backoff
from meterchain.calm import CalmLog

log = logging.getLogger("meterchain.agent.modbus")

ModbusClient: TypeAlias = AsyncModbusTcpClient | AsyncModbusSerialClient


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKING_OFF = "backing_off"
    CLOSED = "closed"


class ModbusBus:
    """One physical Modbus link shared by every device on it."""

    def __init__(
        self,
        settings: ModbusBusSection,
        *,
        on_error: Callable[[str, str], None] | None = None,
        on_state: Callable[[str, LinkState], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_state = on_state or (lambda bus, state: None)
        self._state = LinkState.DISCONNECTED
        self.lock = asyncio.Lock()
        self._client: ModbusClient | None = None
        self._backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self._retry_at = 0.0
        self._rx_bytes = 0
        self._on_error = on_error or (lambda bus, kind: None)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def state(self) -> LinkState:
        return self._state

    @state.setter
    def state(self, state: LinkState) -> None:
        if state is not self._state:
            self._state = state
            self._on_state(self.name, state)

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._rx_bytes += len(data)
        return data

    def _make_client(self) -> ModbusClient:
        s = self.settings
        # reconnect_delay=0: pymodbus must not reconnect behind our back; this
        # class owns reconnection. retries=0: a retry is a new poll, not a resend.
        if s.kind == "tcp":
            return AsyncModbusTcpClient(
                s.host,
                port=s.port,
                timeout=s.timeout_s,
                retries=0,
                reconnect_delay=0,
                trace_packet=self._trace_packet,
            )
        return AsyncModbusSerialClient(
            s.serial_port,
            framer=FramerType.RTU,
            baudrate=s.baudrate,
            parity=s.parity,
            stopbits=s.stopbits,
            timeout=s.timeout_s,
            retries=0,
            reconnect_delay=0,
            trace_packet=self._trace_packet,
        )

    async def connect(self) -> ModbusClient:
        """Return a connected client, connecting if needed; idempotent.

        Waits out a pending backoff first. Raises ModbusLinkError("connect").
        """
        if self.state is LinkState.CLOSED:
            raise ModbusLinkError("disconnected", f"bus {self.name} is closed")
        if self._client is not None and self._client.connected:
            return self._client
        delay = self._retry_at - time.monotonic()
        if delay > 0:
            self.state = LinkState.BACKING_OFF
            await asyncio.sleep(delay)
        self.state = LinkState.CONNECTING
        self._drop_client()
        client = self._make_client()
        try:
            ok = await client.connect()
        except (OSError, ModbusException) as exc:
            ok = False
            log.debug("bus %s: connect raised %r", self.name, exc)
        if not ok:
            client.close()
            self._fail("connect", "cannot connect")
        self._client = client
        self.state = LinkState.CONNECTED
        return client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _fail(self, kind: str, message: str) -> NoReturn:
        self._retry_at = time.monotonic() + self._backoff.next_delay()
        self.state = LinkState.BACKING_OFF
        self._on_error(self.name, kind)
        raise ModbusLinkError(kind, f"bus {self.name}: {message}")

    async def request(self, operation: Callable[[ModbusClient], Awaitable[Any]]) -> Any:
        """Run `operation(client)` alone on the bus; translate every failure.

        A connection-level failure closes the link so the next request
        reconnects (after backoff); a device-level one (exception response,
        one meter not answering on a shared RS-485 line) keeps it open.
        """
        async with self.lock:
            client = await self.connect()
            self._rx_bytes = 0
            try:
                result = await asyncio.wait_for(
                    operation(client), timeout=self.settings.timeout_s * 2 + 1
                )
            except ConnectionException as exc:
                self._drop_client()
                self._fail("disconnected", f"connection lost: {exc}")
            except (ModbusIOException, TimeoutError) as exc:
                # Bytes arrived but no valid frame: on RTU that is a CRC failure.
                garbled = self._rx_bytes > 0 and self.settings.kind == "rtu"
                if self.settings.kind == "tcp" or not client.connected:
                    self._drop_client()
                self._fail("crc" if garbled else "timeout", f"no valid response: {exc}")
            except OSError as exc:
                self._drop_client()
                self._fail("disconnected", f"link error: {exc}")
            except ModbusLinkError as exc:  # the device's answer made no sense
                self._fail(exc.kind, str(exc))
            if getattr(result, "isError", lambda: False)():
                self._fail("exception", f"device answered with an exception: {result}")
            self._backoff.reset()
            self._retry_at = 0.0
            return result

    async def close(self) -> None:
        async with self.lock:
            self._drop_client()
            self.state = LinkState.CLOSED


@dataclass(frozen=True)
class MeterSample:
    """One SDM630 read: energy registers as integer Wh, power as integer W."""

    import_wh: int
    export_wh: int
    power_w: int


async def read_sdm630(client: ModbusClient, unit: int) -> MeterSample:
    """Read the poll block of an SDM630 and decode it (raises ModbusLinkError("decode"))."""
    response = await client.read_input_registers(
        sdm630.POLL_START, count=sdm630.POLL_COUNT, device_id=unit
    )
    if response.isError():
        raise ModbusLinkError("exception", f"unit {unit} answered {response}")
    if len(response.registers) != sdm630.POLL_COUNT:
        raise ModbusLinkError(
            "decode",
            f"unit {unit} returned {len(response.registers)} registers, asked {sdm630.POLL_COUNT}",
        )
    values = sdm630.decode_block(response.registers)
    try:
        import_wh = sdm630.kwh_to_wh(values["import_kwh"])
        export_wh = sdm630.kwh_to_wh(values["export_kwh"])
        power = values["total_power_w"]
        power_w = int(round(power))
    except (ValueError, OverflowError) as exc:
        raise ModbusLinkError("decode", f"unit {unit}: {exc}") from None
    if import_wh < 0 or export_wh < 0:
        raise ModbusLinkError("decode", f"unit {unit}: negative energy register")
    return MeterSample(import_wh, export_wh, power_w)


def setpoint_registers(value_w: int, scale: float, words: int, signed: bool) -> list[int]:
    """Register words for a setpoint: round(value_w * scale) as int16/uint16 or int32/uint32.

    Raises ValueError when the scaled value does not fit.
    """
    raw = int(round(value_w * scale))
    bits = 16 * words
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= raw <= high:
        raise ValueError(
            f"{value_w} W scaled by {scale} = {raw} does not fit {bits}-bit "
            f"{'signed' if signed else 'unsigned'}"
        )
    fmt = {(1, True): ">h", (1, False): ">H", (2, True): ">i", (2, False): ">I"}[(words, signed)]
    packed = struct.pack(fmt, raw)
    return [int.from_bytes(packed[i : i + 2], "big") for i in range(0, len(packed), 2)]


async def write_registers(client: ModbusClient, unit: int, address: int, words: list[int]) -> Any:
    """Function 06 for one register, 16 for two; raises ModbusLinkError on an exception reply."""
    if len(words) == 1:
        response = await client.write_register(address, words[0], device_id=unit)
    else:
        response = await client.write_registers(address, words, device_id=unit)
    if response.isError():
        raise ModbusLinkError("exception", f"unit {unit} refused write at {address}: {response}")
    return response


class MeterPoller:
    """Poll one SDM630 every `interval_s` and pass each sample to `on_sample`.

    While a meter or its bus fails, polls back off (capped, jittered) instead
    of hammering the line; the first good read after an outage is handed on
    like any other, and the cumulative registers make the gap's energy exact.
    """

    def __init__(
        self,
        meter_id: str,
        bus: ModbusBus,
        unit: int,
        interval_s: float,
        on_sample: Callable[[str, MeterSample], Awaitable[None]],
        *,
        on_error: Callable[[str, str], None] | None = None,
        calm: CalmLog | None = None,
    ) -> None:
        self.meter_id = meter_id
        self.bus = bus
        self.unit = unit
        self.interval_s = interval_s
        self.on_sample = on_sample
        self.on_error = on_error or (lambda meter, kind: None)
        self.calm = calm or CalmLog(log, per_kind=False)
        self.backoff = Backoff(
            min(bus.settings.backoff_initial_s, interval_s), bus.settings.backoff_max_s
        )
        self.samples = 0

    async def poll_once(self) -> MeterSample:
        """One read through the bus (raises ModbusLinkError)."""
        return await self.bus.request(lambda client: read_sdm630(client, self.unit))  # type: ignore[no-any-return]

    async def run(self) -> None:
        subject = f"meter {self.meter_id} (bus {self.bus.name}, unit {self.unit})"
        while True:
            started = time.monotonic()
            try:
                sample = await self.poll_once()
            except ModbusLinkError as exc:
                self.on_error(self.meter_id, exc.kind)
                self.calm.failure(subject, exc.kind, str(exc))
                await asyncio.sleep(self.backoff.next_delay())
                continue
            self.calm.success(subject)
            self.backoff.reset()
            self.samples += 1
            await self.on_sample(self.meter_id, sample)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))
