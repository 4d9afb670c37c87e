"""A market site of real processes: `site init|up|down`, regulator commands and the market clock."""

from meterchain.site.cli import main

__all__ = ["main"]
