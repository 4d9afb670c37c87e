"""`meterchain demo`: the reference four-microgrid day end to end on embedded defaults."""

from meterchain.demo.cli import main

__all__ = ["main"]
