"""`meterchain hil run`: the emulated rig passes every check; rig files are validated."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hil.rig import CheckResult, junit_xml, load_rig, summary
from hil.scenarios import CHECKS
from meterchain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
RIGS = REPO / "hil" / "rigs"


def test_emulated_rig_passes_every_check(tmp_path: Path) -> None:
    junit = tmp_path / "rig.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "hil", "run", str(RIGS / "emulated.toml"),
         "--junit", str(junit)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    root = ET.parse(junit).getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {c.name for c in CHECKS}
    for name, case in cases.items():
        bad = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        assert not bad, f"{name}: {ET.tostring(case, encoding='unicode')}"
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    assert suites["emulated.conformance"].get("tests") == "4"
    assert suites["emulated.fault"].get("tests") == "5"
    assert "9 passed, 0 failed, 0 errors, 0 skipped" in proc.stdout


def test_example_bench_is_a_valid_rig_of_real_boards() -> None:
    with pytest.raises(ConfigError, match="broker.ca_file"):
        load_rig(RIGS / "example-bench.toml")  # its CA lives on the bench machine
    rig = load_rig(RIGS / "example-bench.toml", check_files=False)
    assert [b.kind for b in rig.boards] == ["serial", "serial"]
    assert rig.broker.kind == "url" and not rig.emulated
    assert rig.meters["sdm630-a"].source == "bidir"


GOOD = """
[rig]
name = "t"
[broker]
kind = "embedded"
[[meters]]
id = "m"
source = "pv"
[[boards]]
id = "b1"
meter = "m"
"""


@pytest.mark.parametrize(
    ("old", "new", "key", "problem"),
    [
        ('kind = "embedded"', 'kind = "carrier-pigeon"', "broker.kind", "must be one of"),
        ('meter = "m"', 'meter = "x"', "boards[0].meter", "names no [[meters]] entry"),
        ('source = "pv"', 'source = "solar"', "meters[0].source", "must be one of"),
        ('id = "b1"', 'id = "b1"\nport2 = 1', "boards[0].port2", "unknown key"),
        ('id = "b1"', 'id = "b1"\nkind = "serial"', "boards[0].port", "needs its port"),
        ('name = "t"', 'name = "t"\nreadings = 1', "rig.readings", "must be 2..1000"),
        ('id = "b1"', 'id = "b1"\nkey = "zz"', "boards[0].key", "public key in hex"),
        ('id = "b1"', 'id = "b/1"', "boards[0].id", ""),
    ],
)
def test_bad_rig_files_name_the_key(
    tmp_path: Path, old: str, new: str, key: str, problem: str
) -> None:
    path = tmp_path / "rig.toml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_rig(path)
    assert info.value.key == key and problem in str(info.value)


def test_bad_rig_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "rig.toml"
    path.write_text("[rig\n")
    proc = subprocess.run(
        [sys.executable, "-m", "meterchain.cli", "hil", "run", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "not TOML" in proc.stderr


def test_failures_and_skips_reach_junit_and_summary(tmp_path: Path) -> None:
    path = tmp_path / "rig.toml"
    path.write_text(GOOD)
    rig = load_rig(path)
    results = [
        CheckResult("a", "conformance"),
        CheckResult("b", "conformance", "failed", 1.5, 'seq gap <3> & "4"', ["detail"]),
        CheckResult("c", "fault", "skipped", 0.0, "needs mosquitto"),
        CheckResult("d", "fault", "error", 0.1, "OSError: boom"),
    ]
    root = ET.fromstring(junit_xml(rig, results))
    conf = root.find("testsuite[@name='t.conformance']")
    assert conf is not None and conf.get("failures") == "1"
    failure = root.find(".//testcase[@name='b']/failure")
    assert failure is not None and failure.get("message") == 'seq gap <3> & "4"'
    assert failure.text == "detail"
    assert root.find(".//testcase[@name='c']/skipped") is not None
    assert root.find(".//testcase[@name='d']/error") is not None
    text = summary(rig, results, 2.0)
    assert "1 passed, 1 failed, 1 errors, 1 skipped" in text and "SKIP c" in text
