"""Meter registry: loading TOML files, one precise ConfigError per bad entry, idempotent appends."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from meterchain import reading
from meterchain.errors import ConfigError, RegistryError
from meterchain.keys import PrivateKey
from meterchain.registry import Meter, Registry, append_entry, entry_text, make_meter

from .conftest import LOAD_KEY, PV_KEY

PV_HEX = PV_KEY.public_key().point.hex()
LOAD_HEX = LOAD_KEY.public_key().point.hex()

GOOD = f"""\
# two meters of microgrid mg1 and one of mg2
[[meter]]
id = "mg1-pv-01"
public_key = "{PV_HEX}"
owner = "mg1"
source = "pv"

[[meter]]
id = "mg2-load-07"
public_key = "{LOAD_HEX}"
owner = "mg2"
source = "load"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text(text)
    return path


def _entry(**values: object) -> str:
    lines = ["[[meter]]"]
    for key, value in values.items():
        rendered = f'"{value}"' if isinstance(value, str) else str(value).lower()
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


def _second(**overrides: object) -> str:
    """GOOD's first entry plus a second entry with `overrides` (None deletes a key)."""
    values: dict[str, object] = {
        "id": "mg2-load-07",
        "public_key": LOAD_HEX,
        "owner": "mg2",
        "source": "load",
    }
    values.update(overrides)
    first = GOOD.split("\n\n")[0] + "\n\n"
    return first + _entry(**{k: v for k, v in values.items() if v is not None})


def test_loads_a_good_file(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD)
    registry = Registry.load(path)
    assert len(registry) == 2 and registry.path == path
    pv = registry.get("mg1-pv-01")
    assert pv is not None
    assert pv.public_key.point == PV_KEY.public_key().point
    assert (pv.owner, pv.source, pv.renewable) == ("mg1", "pv", True)
    load = registry.get("mg2-load-07")
    assert load is not None and not load.renewable
    assert registry.get("nope") is None and "nope" not in registry and "mg1-pv-01" in registry
    assert [m.id for m in registry] == ["mg1-pv-01", "mg2-load-07"]
    assert [m.id for m in registry.owned_by("mg2")] == ["mg2-load-07"]


def test_keys_are_parsed_once_and_shared(tmp_path: Path) -> None:
    registry = Registry.load(_write(tmp_path, GOOD))
    first = registry.get("mg1-pv-01")
    assert first is not None and registry.get("mg1-pv-01") is first
    assert first.public_key is registry.get("mg1-pv-01").public_key  # type: ignore[union-attr]


def test_empty_file_is_an_empty_registry(tmp_path: Path) -> None:
    assert len(Registry.load(_write(tmp_path, "# no meters yet\n"))) == 0


NOT_ON_CURVE = "04" + "11" * 64
COMPRESSED = "02" + PV_HEX[2:66]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (_second(id=None), "meter[1].id", "meter: missing"),
        (_second(public_key=None), "meter[1].public_key", "meter 'mg2-load-07': missing"),
        (_second(owner=None), "meter[1].owner", "meter 'mg2-load-07': missing"),
        (_second(source=None), "meter[1].source", "meter 'mg2-load-07': missing"),
        (_second(owner=7), "meter[1].owner", "must be a string, not int"),
        (_second(public_key="zz" * 65), "meter[1].public_key", "meter 'mg2-load-07': not hex"),
        (_second(public_key=PV_HEX[:-2]), "meter[1].public_key", "65-byte uncompressed"),
        (_second(public_key=COMPRESSED), "meter[1].public_key", "65-byte uncompressed"),
        (_second(public_key=NOT_ON_CURVE), "meter[1].public_key", "not a point on P-256"),
        (_second(id="mg1-pv-01"), "meter[1].id", "duplicate meter id 'mg1-pv-01' (first at"),
        (_second(public_key=PV_HEX), "meter[1].public_key", "already used by meter 'mg1-pv-01'"),
        (_second(source="coal"), "meter[1].source", "unknown source 'coal'"),
        (_second(renewable=True), "meter[1].renewable", "unknown key (allowed: id,"),
        (_second(id="mg2/load"), "meter[1].id", "'mg2/load' must be 1-64 characters"),
        (_second(id="mg2-load\\n"), "meter[1].id", "must be 1-64 characters"),
        (_second(owner="mg 2"), "meter[1].owner", "'mg 2' must be 1-64 characters"),
        ("market = 'm1'\n" + GOOD, "market", "unknown key (expected only [[meter]] tables)"),
        ('meter = "x"\n', "meter", "must be an array of [[meter]] tables"),
        ("meter = [1]\n", "meter[0]", "must be a [[meter]] table"),
    ],
)
def test_every_bad_entry_names_file_entry_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Registry.load(path)
    error = info.value
    assert (error.path, error.key) == (str(path), key)
    assert problem in error.problem
    assert str(error).startswith(f"{path}: {key}: ")


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[[meter]\nid = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        Registry.load(path)
    assert info.value.path == str(path) and info.value.key is None
    with pytest.raises(ConfigError, match="registry file does not exist"):
        Registry.load(tmp_path / "absent.toml")


# --- in-memory additions -----------------------------------------------------------------


def test_add_is_idempotent_and_refuses_clashes() -> None:
    registry = Registry()
    meter = registry.add("mg1-pv-01", PV_KEY.public_key(), "mg1", "pv")
    assert registry.add("mg1-pv-01", PV_HEX, "mg1", "pv") is meter
    assert registry.add("mg2-load-07", LOAD_KEY.public_key().point, "mg2", "load").owner == "mg2"
    with pytest.raises(RegistryError, match="different public key"):
        registry.add("mg1-pv-01", PrivateKey.from_secret(99).public_key(), "mg1", "pv")
    with pytest.raises(RegistryError, match="owner='mg1' source='pv', not owner='mg3'"):
        registry.add("mg1-pv-01", PV_HEX, "mg3", "pv")
    with pytest.raises(RegistryError, match="already registered to meter 'mg1-pv-01'"):
        registry.add("mg1-pv-02", PV_HEX, "mg1", "pv")
    with pytest.raises(RegistryError, match="unknown source 'coal'"):
        registry.add("mg1-x", PrivateKey.from_secret(98).public_key(), "mg1", "coal")
    with pytest.raises(RegistryError, match="not a point on P-256"):
        registry.add("mg1-x", NOT_ON_CURVE, "mg1", "pv")
    with pytest.raises(RegistryError, match="meter id 'a b'"):
        registry.add("a b", PrivateKey.from_secret(97).public_key(), "mg1", "pv")
    assert len(registry) == 2


# --- append_entry ------------------------------------------------------------------------


def test_append_creates_then_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    meter = make_meter("mg1-pv-01", PV_KEY.public_key(), "mg1", "pv")
    assert append_entry(path, meter) is True
    after_first = path.read_bytes()
    assert append_entry(path, meter) is False
    assert Registry.append_entry(path, meter) is False
    assert path.read_bytes() == after_first
    loaded = Registry.load(path)
    assert len(loaded) == 1 and loaded.get("mg1-pv-01") == meter


def test_append_keeps_existing_text_and_adds_one_table(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.rstrip("\n"))  # no final newline
    new = make_meter("mg3-wind-02", PrivateKey.from_secret(1234).public_key(), "mg3", "wind")
    assert append_entry(path, new)
    text = path.read_text()
    assert text.startswith(GOOD.rstrip("\n")) and text.endswith(entry_text(new))
    assert [m.id for m in Registry.load(path)] == ["mg1-pv-01", "mg2-load-07", "mg3-wind-02"]
    assert not list(tmp_path.glob(".registry.toml.*"))  # no temp file left behind


@pytest.mark.parametrize(
    ("meter", "key", "problem"),
    [
        (
            Meter("mg1-pv-01", PrivateKey.from_secret(4321).public_key(), "mg1", "pv"),
            "meter[0].public_key",
            "already registered with a different public key",
        ),
        (
            Meter("mg1-pv-01", PV_KEY.public_key(), "mg9", "pv"),
            "meter[0].id",
            "already registered as owner='mg1'",
        ),
        (
            Meter("mg4-pv-09", LOAD_KEY.public_key(), "mg4", "pv"),
            "meter[1].public_key",
            "already registered to meter 'mg2-load-07'",
        ),
    ],
)
def test_append_refuses_clashes_and_leaves_the_file(
    tmp_path: Path, meter: Meter, key: str, problem: str
) -> None:
    path = _write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as info:
        append_entry(path, meter)
    assert (info.value.path, info.value.key) == (str(path), key)
    assert problem in info.value.problem
    assert path.read_text() == GOOD


def test_append_refuses_to_extend_a_broken_file(tmp_path: Path) -> None:
    path = _write(tmp_path, _second(source="coal"))
    before = path.read_text()
    with pytest.raises(ConfigError, match="unknown source 'coal'"):
        append_entry(
            path, make_meter("mg5-pv", PrivateKey.from_secret(5).public_key(), "mg5", "pv")
        )
    assert path.read_text() == before


def test_concurrent_appends_all_land(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    meters = [
        make_meter(f"mg1-m{i}", PrivateKey.from_secret(7000 + i).public_key(), "mg1", "load")
        for i in range(12)
    ]
    # Every meter twice: the second append of each must find the first.
    threads = [threading.Thread(target=append_entry, args=(path, m)) for m in meters * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loaded = Registry.load(path)
    assert sorted(m.id for m in loaded) == sorted(m.id for m in meters)


def test_registered_meters_verify_readings(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    append_entry(path, make_meter("mg1-pv-01", PV_KEY.public_key(), "mg1", "pv"))
    data = reading.sign_reading(PV_KEY, "mg1-pv-01", 1, 1_760_000_000, 10, 0, 5, 0, "pv")
    assert reading.verify(data, Registry.load(path)).import_wh == 10


def test_meters_validate_themselves() -> None:
    key = PrivateKey.from_secret(96).public_key()
    with pytest.raises(RegistryError, match="unknown source 'coal'"):
        Meter("mg1-x", key, "mg1", "coal")
    with pytest.raises(RegistryError, match="owner 'mg1\\\\n' must be"):
        Meter("mg1-x", key, "mg1\n", "pv")
    with pytest.raises(RegistryError, match="must be a keys.PublicKey"):
        Meter("mg1-x", key.point, "mg1", "pv")  # type: ignore[arg-type]
