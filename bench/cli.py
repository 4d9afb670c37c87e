"""`meterchain bench NAME [--json] [--quick]`: run one benchmark module from `bench/`."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

BENCHMARKS = (
    "sign", "verify", "clear", "rolling", "consensus", "ingest", "ingest-e2e", "ledger", "board",
    "congestion",
)  # fmt: skip


def _print_human(name: str, result: dict, indent: str = "") -> None:
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_human(name, value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{indent}{key}:")
            for item in value:
                print(f"{indent}  - " + ", ".join(f"{k}={v}" for k, v in item.items()))
        else:
            print(f"{indent}{key}: {value}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meterchain bench", description=__doc__)
    parser.add_argument("name", choices=BENCHMARKS)
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions (smoke run, noisier figures)"
    )
    ns = parser.parse_args(argv)
    try:
        module_name = f"bench.{ns.name.replace('-', '_')}"
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"meterchain bench: {ns.name!r} is not available in this build yet", file=sys.stderr)
        return 2
    result = module.run(quick=ns.quick)
    result = {"benchmark": ns.name, **result}
    if ns.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        _print_human(ns.name, result)
    return 0
