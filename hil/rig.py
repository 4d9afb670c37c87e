"""`meterchain hil run RIG.toml`: load a rig file, run the conformance suite and fault scenarios.

A rig file names the boards (emulated, or real on a serial port), the meters
(emulated SDM630s, or a real Modbus address the board reads itself) and the
broker (Mosquitto started by the rig with TLS, passwords and per-client ACLs;
the embedded in-process broker; or the URL of an existing one). Every check
in `hil.scenarios` runs against it; the result is a JUnit XML file and a
one-screen summary. A check that cannot run on this rig (for instance
injecting Modbus faults into a real RS-485 bus) is reported as skipped with
the reason, never silently left out.

    [rig]
    name = "emulated"
    market = "rig"
    readings = 6            # readings per board per conformance check
    junit = "hil-emulated.xml"

    [broker]
    kind = "mosquitto"      # "mosquitto" | "embedded" | "url"
    # url = "mqtts://broker.lab:8883"; ca_file = "ca.pem"; username/password_file

    [[meters]]
    id = "pv"               # name used by boards below
    kind = "emulated"       # "emulated" | "modbus"
    source = "pv"
    power_w = -3000

    [[boards]]
    id = "rig-pv-01"        # the meter id it signs as
    kind = "emulated"       # "emulated" | "serial"
    meter = "pv"
    # port = "/dev/ttyUSB0" and key = "04ab..." (its public key) for kind = "serial"
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from meterchain.errors import ConfigError
from meterchain.mqtt_auth import check_name
from meterchain.reading import SOURCES

BROKER_KINDS = ("mosquitto", "embedded", "url")
METER_KINDS = ("emulated", "modbus")
BOARD_KINDS = ("emulated", "serial")


@dataclass(frozen=True)
class MeterDef:
    id: str
    kind: str
    source: str
    power_w: int = 1500
    port: str = ""  # modbus: the RS-485 adapter the board is wired to (documentation)
    unit: int = 1


@dataclass(frozen=True)
class BoardDef:
    id: str
    kind: str
    meter: str
    port: str = ""
    owner: str = "rig"
    key: bytes | None = None  # real boards: the public key `board provision` printed


@dataclass(frozen=True)
class BrokerDef:
    kind: str = "mosquitto"
    url: str = ""
    ca_file: Path | None = None
    username: str = ""
    password_file: Path | None = None


@dataclass(frozen=True)
class Rig:
    name: str
    market: str
    path: Path
    broker: BrokerDef
    meters: dict[str, MeterDef]
    boards: tuple[BoardDef, ...]
    readings: int = 6
    listen_s: int = 120
    junit: Path | None = None
    only: tuple[str, ...] = ()

    @property
    def emulated(self) -> bool:
        return all(b.kind == "emulated" for b in self.boards)


def _take(table: dict[str, Any], file: str, prefix: str, key: str, kind: type, default: Any) -> Any:
    value = table.pop(key, default)
    if value is None:
        raise ConfigError(file, f"{prefix}{key}", "is required")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(file, f"{prefix}{key}", f"must be an integer, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(file, f"{prefix}{key}", f"must be a string, got {value!r}")
    return value


def _no_extra(table: dict[str, Any], file: str, prefix: str) -> None:
    if table:
        raise ConfigError(file, f"{prefix}{sorted(table)[0]}", "unknown key")


def _choice(value: str, options: tuple[str, ...], file: str, key: str) -> str:
    if value not in options:
        raise ConfigError(file, key, f"must be one of {', '.join(options)}, got {value!r}")
    return value


def _name(value: str, file: str, key: str) -> str:
    try:
        return check_name(key, value)
    except Exception as exc:  # noqa: BLE001 - any refusal becomes the config error below
        raise ConfigError(file, key, str(exc)) from exc


def load_rig(path: str | Path, *, check_files: bool = True) -> Rig:
    """Read and validate a rig file; ConfigError(file, key, problem) on the first problem.

    `check_files=False` validates a rig for another machine (its CA and password
    files need not exist here).
    """
    path = Path(path)
    file = str(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(file, None, f"cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, None, f"not TOML: {exc}") from exc
    base = path.parent
    rig_t = dict(doc.pop("rig", {}))
    name = _take(rig_t, file, "rig.", "name", str, path.stem)
    market = _name(_take(rig_t, file, "rig.", "market", str, "rig"), file, "rig.market")
    readings = _take(rig_t, file, "rig.", "readings", int, 6)
    if not 2 <= readings <= 1000:
        raise ConfigError(file, "rig.readings", f"must be 2..1000, got {readings}")
    listen_s = _take(rig_t, file, "rig.", "listen_s", int, 120)
    junit = _take(rig_t, file, "rig.", "junit", str, "")
    only = rig_t.pop("only", [])
    if not isinstance(only, list) or not all(isinstance(x, str) for x in only):
        raise ConfigError(file, "rig.only", "must be a list of check names")
    _no_extra(rig_t, file, "rig.")

    b_t = dict(doc.pop("broker", {}))
    kind = _choice(_take(b_t, file, "broker.", "kind", str, "mosquitto"), BROKER_KINDS, file,
                   "broker.kind")  # fmt: skip
    url = _take(b_t, file, "broker.", "url", str, "")
    if kind == "url" and not url.startswith(("mqtt://", "mqtts://")):
        raise ConfigError(file, "broker.url", "must be mqtt://host:port or mqtts://host:port")
    ca = _take(b_t, file, "broker.", "ca_file", str, "")
    user = _take(b_t, file, "broker.", "username", str, "")
    pw = _take(b_t, file, "broker.", "password_file", str, "")
    _no_extra(b_t, file, "broker.")
    for key, rel in (("broker.ca_file", ca), ("broker.password_file", pw)):
        if rel and check_files and not (base / rel).is_file():
            raise ConfigError(file, key, f"{base / rel}: no such file")
    broker = BrokerDef(kind, url, base / ca if ca else None, user, base / pw if pw else None)

    meters: dict[str, MeterDef] = {}
    raw_meters = doc.pop("meters", [])
    if not isinstance(raw_meters, list):
        raise ConfigError(file, "meters", "must be an array of tables ([[meters]])")
    for i, m in enumerate(raw_meters):
        m = dict(m)
        p = f"meters[{i}]."
        mid = _name(_take(m, file, p, "id", str, None), file, f"{p}id")
        mkind = _choice(_take(m, file, p, "kind", str, "emulated"), METER_KINDS, file, f"{p}kind")
        source = _take(m, file, p, "source", str, "load")
        if source not in SOURCES:
            raise ConfigError(file, f"{p}source", f"must be one of {sorted(SOURCES)}")
        power = _take(m, file, p, "power_w", int, 1500)
        port = _take(m, file, p, "port", str, "")
        unit = _take(m, file, p, "unit", int, 1)
        if not 1 <= unit <= 247:
            raise ConfigError(file, f"{p}unit", f"must be 1..247, got {unit}")
        _no_extra(m, file, p)
        if mid in meters:
            raise ConfigError(file, f"{p}id", f"meter {mid!r} is defined twice")
        meters[mid] = MeterDef(mid, mkind, source, power, port, unit)

    boards: list[BoardDef] = []
    raw_boards = doc.pop("boards", [])
    if not isinstance(raw_boards, list) or not raw_boards:
        raise ConfigError(file, "boards", "a rig needs at least one [[boards]] table")
    for i, b in enumerate(raw_boards):
        b = dict(b)
        p = f"boards[{i}]."
        bid = _name(_take(b, file, p, "id", str, None), file, f"{p}id")
        bkind = _choice(_take(b, file, p, "kind", str, "emulated"), BOARD_KINDS, file, f"{p}kind")
        meter = _take(b, file, p, "meter", str, None)
        port = _take(b, file, p, "port", str, "")
        owner = _name(_take(b, file, p, "owner", str, "rig"), file, f"{p}owner")
        key_hex = _take(b, file, p, "key", str, "")
        try:
            key = bytes.fromhex(key_hex) if key_hex else None
        except ValueError as exc:
            raise ConfigError(file, f"{p}key", "must be the public key in hex") from exc
        if key is not None and (len(key) != 65 or key[0] != 4):
            raise ConfigError(file, f"{p}key", "must be a 65-byte uncompressed P-256 point")
        _no_extra(b, file, p)
        if meter not in meters:
            raise ConfigError(file, f"{p}meter", f"names no [[meters]] entry: {meter!r}")
        if bkind == "serial" and not port:
            raise ConfigError(file, f"{p}port", "a serial board needs its port")
        if bkind == "emulated" and meters[meter].kind != "emulated":
            raise ConfigError(file, f"{p}meter", "an emulated board reads an emulated meter")
        if any(x.id == bid for x in boards):
            raise ConfigError(file, f"{p}id", f"board {bid!r} is defined twice")
        boards.append(BoardDef(bid, bkind, meter, port, owner, key))
    if doc:
        raise ConfigError(file, sorted(doc)[0], "unknown section")
    return Rig(
        name, market, path, broker, meters, tuple(boards), readings, listen_s,
        base / junit if junit else None, tuple(only),
    )  # fmt: skip


# --- results ----------------------------------------------------------------------------


@dataclass
class CheckResult:
    name: str
    group: str  # "conformance" or "fault"
    status: str = "passed"  # passed | failed | skipped | error
    seconds: float = 0.0
    message: str = ""
    details: list[str] = field(default_factory=list)


def junit_xml(rig: Rig, results: list[CheckResult]) -> str:
    """JUnit XML (one testsuite per group), as CI systems read it."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', f"<testsuites name={quoteattr(rig.name)}>"]
    for group in ("conformance", "fault"):
        rs = [r for r in results if r.group == group]
        failures = sum(r.status == "failed" for r in rs)
        errors = sum(r.status == "error" for r in rs)
        skipped = sum(r.status == "skipped" for r in rs)
        total = sum(r.seconds for r in rs)
        out.append(
            f'  <testsuite name="{escape(rig.name)}.{group}" tests="{len(rs)}" '
            f'failures="{failures}" errors="{errors}" skipped="{skipped}" time="{total:.3f}">'
        )
        for r in rs:
            out.append(
                f'    <testcase classname="hil.{group}" name={quoteattr(r.name)} '
                f'time="{r.seconds:.3f}">'
            )
            body = escape("\n".join(r.details))
            if r.status == "failed":
                out.append(f"      <failure message={quoteattr(r.message)}>{body}</failure>")
            elif r.status == "error":
                out.append(f"      <error message={quoteattr(r.message)}>{body}</error>")
            elif r.status == "skipped":
                out.append(f"      <skipped message={quoteattr(r.message)}/>")
            elif body:
                out.append(f"      <system-out>{body}</system-out>")
            out.append("    </testcase>")
        out.append("  </testsuite>")
    out.append("</testsuites>")
    return "\n".join(out) + "\n"


_MARKS = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP", "error": "ERR "}


def summary(rig: Rig, results: list[CheckResult], seconds: float) -> str:
    """The one-screen summary."""
    lines = [f"HIL rig {rig.name} ({len(rig.boards)} boards, broker {rig.broker.kind})"]
    for group in ("conformance", "fault"):
        lines.append(f"  {group}:")
        for r in (r for r in results if r.group == group):
            mark = _MARKS[r.status]
            msg = f"  {r.message}" if r.message else ""
            lines.append(f"    {mark} {r.name:<28} {r.seconds:6.1f} s{msg}")
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "error",
                                                                 "skipped")}  # fmt: skip
    lines.append(
        f"  {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped in {seconds:.1f} s"
    )
    return "\n".join(lines)


def run_rig(rig: Rig, workdir: Path, out: Any = None) -> list[CheckResult]:
    """Run every check of `hil.scenarios` (or `rig.only`) on `rig`; results in order."""
    from hil import scenarios

    results: list[CheckResult] = []
    session = scenarios.Session(rig, workdir)
    try:
        session.start()
        _run_checks(session, results, out)
    finally:
        session.close()
    return results


def _run_checks(session: Any, results: list[CheckResult], out: Any) -> None:
    from hil import scenarios

    rig = session.rig
    for check in scenarios.CHECKS:
        if rig.only and check.name not in rig.only:
            continue
        result = CheckResult(check.name, check.group)
        started = time.monotonic()
        try:
            check.run(session, result)
        except scenarios.Skip as exc:
            result.status, result.message = "skipped", str(exc)
        except AssertionError as exc:
            result.status, result.message = "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - a crashed check is reported, the rest still run
            result.status, result.message = "error", f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        results.append(result)
        if out is not None:
            out(f"{result.status.upper():<7} {check.group}/{check.name} "
                f"({result.seconds:.1f} s) {result.message}")  # fmt: skip
