"""Benchmarks: each measures its target and an anchor in the same run and reports a ratio.

A benchmark module `bench/NAME.py` exposes `run(quick: bool) -> dict`, a
JSON-serialisable result. `meterchain bench NAME --json` prints it as one
JSON document; without `--json` it prints the same figures for a person.
"""
