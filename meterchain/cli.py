"""The `meterchain` command: a thin dispatcher to each part's own command module.

Each subcommand lives next to the code it drives and exposes
`main(argv: list[str]) -> int`; it is imported only when used, so
`meterchain board ...` on a field laptop never loads the solver stack.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module providing main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("meterchain.demo", "run the reference four-microgrid day end to end"),
    "site": ("meterchain.site.cli", "create, start and stop a market site; regulator commands"),
    "agent": ("edge_agent.cli", "run the edge agent on a microgrid controller"),
    "aggregator": ("aggregator.cli", "run the market aggregator (blocks, settlement)"),
    "board": ("meterchain.board.cli", "provision, deploy and monitor meter boards"),
    "ledger": ("meterchain.ledger.cli", "verify, show and prove entries of a ledger"),
    "report": ("aggregator.report", "settlement statements and market reports"),
    "monitor": ("meterchain.ledger.monitor", "violation monitoring report of a ledger (M19)"),
    "status": ("meterchain.status", "live status of a running agent or aggregator"),
    "hil": ("hil.cli", "hardware-in-the-loop rigs and emulated meters"),
    "bench": ("bench.cli", "run a benchmark against its anchor"),
}


def _usage() -> str:
    lines = ["usage: meterchain COMMAND [ARGS...]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines.append("")
    lines.append("`meterchain COMMAND --help` describes each command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from meterchain import __version__

        print(f"meterchain {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"meterchain: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        print(f"meterchain {name}: not available in this build yet", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
