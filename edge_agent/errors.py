"""The edge agent's errors: device and service failures the agent turns into logged state."""

from __future__ import annotations

from meterchain.errors import MeterChainError


class AgentError(MeterChainError):
    """Base of the errors the edge agent raises on purpose."""


class ModbusLinkError(AgentError):
    """A Modbus request failed; `kind` is a stable metrics label.

    Kinds: connect, disconnected, timeout, crc (bytes arrived but no valid RTU
    frame), exception (the device answered with a Modbus exception), decode
    (a response that is not a plausible reading).
    """

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class SetpointError(AgentError):
    """A setpoint could not be turned into register values or written."""
