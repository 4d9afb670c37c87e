"""`meterchain hil ...`: hardware-in-the-loop rigs and emulated devices.

Each subcommand is one `_add_NAME(subparsers)` function that registers its
parser and sets `func`; adding a rig runner is adding one such function.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
import time
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _emulate_meter(ns: argparse.Namespace) -> int:
    from hil.emulated_meter import EmulatedSdm630

    host, port = ns.tcp if ns.tcp else ("127.0.0.1", 0)
    meter = EmulatedSdm630(
        host=host,
        port=port,
        unit=ns.unit,
        profile=ns.profile,
        seed=ns.seed,
        speed=ns.speed,
        serial_port=ns.serial,
        baudrate=ns.baudrate,
        setpoint_unit=ns.setpoint_unit,
        setpoint_base=ns.setpoint_base,
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await meter.plug()
        where = ns.serial if ns.serial else f"{host}:{port}"
        print(
            f"emulated SDM630 unit {ns.unit} ({ns.profile}, seed {ns.seed}) on {where}", flush=True
        )
        await stop.wait()
        await meter.unplug()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


def _add_emulate_meter(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "emulate-meter",
        help="an emulated Eastron SDM630 on Modbus TCP or RTU until interrupted",
        description="Serve the SDM630 input-register map (float32, big-endian, high word "
        "first) following a deterministic load or PV profile.",
    )
    link = p.add_mutually_exclusive_group(required=True)
    link.add_argument("--tcp", type=_host_port, metavar="HOST:PORT", help="Modbus TCP address")
    link.add_argument("--serial", metavar="PORT", help="serial port for Modbus RTU")
    p.add_argument("--unit", type=int, default=1, help="Modbus unit (slave) id, default 1")
    p.add_argument("--profile", choices=("pv", "load"), default="load")
    p.add_argument("--seed", type=int, default=1, help="profile seed (same seed, same curve)")
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulated seconds per wall second (time acceleration)",
    )
    p.add_argument("--baudrate", type=int, default=19200, help="RTU only")
    p.add_argument(
        "--setpoint-unit",
        type=int,
        default=None,
        help="also serve writable holding registers as this unit (setpoint target)",
    )
    p.add_argument(
        "--setpoint-base",
        type=int,
        default=0,
        metavar="ADDRESS",
        help="PDU address of the first of the 64 setpoint registers (default 0; the example "
        "agent config writes 40100)",
    )
    p.set_defaults(func=_emulate_meter)


def _run_rig(ns: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from hil.rig import junit_xml, load_rig, run_rig, summary
    from meterchain.errors import ConfigError

    try:
        rig = load_rig(ns.rig)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if ns.only:
        rig = dataclasses.replace(rig, only=tuple(ns.only))
    junit = ns.junit or rig.junit or Path(f"hil-{rig.name}.xml")
    with tempfile.TemporaryDirectory(prefix="meterchain-hil-") as tmp:
        started = time.monotonic()
        results = run_rig(rig, Path(tmp), out=None if ns.quiet else print)
        seconds = time.monotonic() - started
    Path(junit).write_text(junit_xml(rig, results))
    print(summary(rig, results, seconds))
    print(f"JUnit XML: {junit}")
    return 1 if any(r.status in ("failed", "error") for r in results) else 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the conformance suite and fault scenarios on a rig (JUnit XML + summary)",
        description="Load RIG.toml (boards, meters, broker), run every conformance check and "
        "fault scenario, write JUnit XML and print a one-screen summary. Exit 1 if any failed.",
    )
    p.add_argument("rig", help="rig file, e.g. hil/rigs/emulated.toml")
    p.add_argument("--junit", help="JUnit XML output (default: the rig's junit or hil-NAME.xml)")
    p.add_argument("--only", action="append", metavar="CHECK", help="run only this check")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.set_defaults(func=_run_rig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meterchain hil", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_emulate_meter(sub)
    _add_run(sub)
    return parser


def main(argv: list[str]) -> int:
    ns = build_parser().parse_args(argv)
    handler: Handler = ns.func
    return handler(ns)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
