"""MeterChain: trusted metering and peer-to-peer green-power trading among microgrids."""

__version__ = "0.1.0"
