"""The meter registry: which meters exist, their public keys, owners and source types (M9).

A registry file is TOML with one `[[meter]]` table per meter:

    [[meter]]
    id = "mg1-pv-01"            # also the COSE kid and the MQTT topic level
    public_key = "04ab...."     # 65-byte uncompressed P-256 point, hex
    owner = "mg1"               # the microgrid that owns the meter
    source = "pv"               # pv wind hydro biomass load bidir storage chp

Every bad entry is refused at load with a `ConfigError` naming the file, the
entry (index and id), the key and the problem. Public keys are parsed once,
here, and reused for every verification. `append_entry` is how provisioning
adds a meter: idempotent, atomic (write-then-rename) and serialized with a
lock, so a half-written registry can never be loaded.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meterchain.errors import ConfigError, RegistryError, SignatureError
from meterchain.keys import PublicKey
from meterchain.reading import NAME_RULE, RENEWABLE_SOURCES, SOURCES, valid_name

_ENTRY_KEYS = ("id", "public_key", "owner", "source")


@dataclass(frozen=True)
class Meter:
    """One registered meter; `id` is the payload's meter id and the kid's UTF-8 text."""

    id: str
    public_key: PublicKey
    owner: str
    source: str

    def __post_init__(self) -> None:
        for what, value in (("meter id", self.id), ("owner", self.owner)):
            if not isinstance(value, str) or not valid_name(value):
                raise RegistryError(f"{what} {value!r} must be {NAME_RULE}")
        if self.source not in SOURCES:
            raise RegistryError(
                f"meter {self.id!r}: unknown source {self.source!r}; "
                f"known: {', '.join(sorted(SOURCES))}"
            )
        if not isinstance(self.public_key, PublicKey):
            raise RegistryError(f"meter {self.id!r}: public_key must be a keys.PublicKey")

    @property
    def renewable(self) -> bool:
        """True for sources that earn green certificates (M22): pv, wind, hydro, biomass."""
        return self.source in RENEWABLE_SOURCES

    def same_entry(self, other: Meter) -> bool:
        return (self.id, self.public_key.point, self.owner, self.source) == (
            other.id,
            other.public_key.point,
            other.owner,
            other.source,
        )


def make_meter(
    meter_id: str, public_key: PublicKey | bytes | str, owner: str, source: str
) -> Meter:
    """Build a `Meter`; the key may be a PublicKey, a 65-byte point or its hex.

    Raises RegistryError naming the bad value (Meter checks id, owner and source).
    """
    if not isinstance(public_key, PublicKey):
        try:
            if isinstance(public_key, str):
                public_key = PublicKey.from_hex(public_key)
            else:
                public_key = PublicKey.from_point(bytes(public_key))
        except SignatureError as exc:
            raise RegistryError(f"meter {meter_id!r}: {exc}") from exc
    return Meter(meter_id, public_key, owner, source)


class Registry:
    """Meters by id, loaded from a TOML file or built in memory.

    Read-mostly and shared by verifier threads; `add` is a single dict
    assignment, so concurrent readers see a meter either fully or not at all.
    """

    def __init__(self, meters: Iterable[Meter] = (), *, path: Path | None = None) -> None:
        self.path = path
        self._meters: dict[str, Meter] = {}
        self._by_point: dict[bytes, str] = {}
        for meter in meters:
            self._insert(meter)

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        """Read and validate a registry file; raises ConfigError on the first bad entry."""
        path = Path(path)
        return cls(_load_entries(path), path=path)

    def get(self, meter_id: str) -> Meter | None:
        return self._meters.get(meter_id)

    def add(
        self, meter_id: str, public_key: PublicKey | bytes | str, owner: str, source: str
    ) -> Meter:
        """Register a meter in memory; the same entry again is a no-op returning it.

        Raises RegistryError for a bad value, an id registered with another
        key/owner/source, or a key already used by another meter.
        """
        meter = make_meter(meter_id, public_key, owner, source)
        existing = self._meters.get(meter.id)
        if existing is not None and existing.same_entry(meter):
            return existing
        self._insert(meter)
        return meter

    def owned_by(self, owner: str) -> list[Meter]:
        """The meters of one microgrid, in registration order."""
        return [m for m in self._meters.values() if m.owner == owner]

    def _insert(self, meter: Meter) -> None:
        existing = self._meters.get(meter.id)
        if existing is not None:
            raise RegistryError(_conflict(existing, meter))
        other = self._by_point.get(meter.public_key.point)
        if other is not None:
            # One key on two meters would let either board sign as the other.
            raise RegistryError(
                f"meter {meter.id!r}: public key {meter.public_key.fingerprint} is already "
                f"registered to meter {other!r}"
            )
        self._by_point[meter.public_key.point] = meter.id
        self._meters[meter.id] = meter

    def __contains__(self, meter_id: object) -> bool:
        return meter_id in self._meters

    def __len__(self) -> int:
        return len(self._meters)

    def __iter__(self) -> Iterator[Meter]:
        return iter(self._meters.values())

    @staticmethod
    def append_entry(path: str | Path, meter: Meter) -> bool:
        """See `append_entry`."""
        return append_entry(path, meter)


def _conflict(existing: Meter, new: Meter) -> str:
    if existing.public_key.point != new.public_key.point:
        return (
            f"meter {new.id!r} is already registered with a different public key "
            f"(registered {existing.public_key.fingerprint}, new {new.public_key.fingerprint})"
        )
    return (
        f"meter {new.id!r} is already registered as owner={existing.owner!r} "
        f"source={existing.source!r}, not owner={new.owner!r} source={new.source!r}"
    )


def _parse_entries(text: str, source: str) -> list[Meter]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, f"not valid TOML: {exc}") from exc
    unknown_top = sorted(set(document) - {"meter"})
    if unknown_top:
        raise ConfigError(source, unknown_top[0], "unknown key (expected only [[meter]] tables)")
    entries = document.get("meter", [])
    if not isinstance(entries, list):
        raise ConfigError(source, "meter", "must be an array of [[meter]] tables")
    meters: list[Meter] = []
    seen: dict[str, int] = {}
    key_owner: dict[bytes, str] = {}
    for index, entry in enumerate(entries):
        meter = _parse_entry(entry, index, source)
        where = f"meter[{index}]"
        if meter.id in seen:
            raise ConfigError(
                source,
                f"{where}.id",
                f"duplicate meter id {meter.id!r} (first at meter[{seen[meter.id]}])",
            )
        holder = key_owner.get(meter.public_key.point)
        if holder is not None:
            raise ConfigError(
                source,
                f"{where}.public_key",
                f"meter {meter.id!r}: key {meter.public_key.fingerprint} is already used by "
                f"meter {holder!r}",
            )
        seen[meter.id] = index
        key_owner[meter.public_key.point] = meter.id
        meters.append(meter)
    return meters


def _parse_entry(entry: Any, index: int, source: str) -> Meter:
    where = f"meter[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(source, where, "must be a [[meter]] table")
    label = f"meter {entry['id']!r}" if isinstance(entry.get("id"), str) else "meter"
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise ConfigError(
            source,
            f"{where}.{unknown[0]}",
            f"{label}: unknown key (allowed: {', '.join(_ENTRY_KEYS)})",
        )
    for key in _ENTRY_KEYS:
        if key not in entry:
            raise ConfigError(source, f"{where}.{key}", f"{label}: missing")
        if not isinstance(entry[key], str):
            raise ConfigError(
                source,
                f"{where}.{key}",
                f"{label}: must be a string, not {type(entry[key]).__name__}",
            )
    meter_id, owner, kind, key_hex = (
        entry["id"],
        entry["owner"],
        entry["source"],
        entry["public_key"],
    )
    for key, value in (("id", meter_id), ("owner", owner)):
        if not valid_name(value):
            raise ConfigError(source, f"{where}.{key}", f"{value!r} must be {NAME_RULE}")
    if kind not in SOURCES:
        raise ConfigError(
            source,
            f"{where}.source",
            f"{label}: unknown source {kind!r} (known: {', '.join(sorted(SOURCES))})",
        )
    try:
        point = bytes.fromhex(key_hex)
    except ValueError:
        raise ConfigError(source, f"{where}.public_key", f"{label}: not hex") from None
    try:
        public_key = PublicKey.from_point(point)
    except SignatureError as exc:
        raise ConfigError(source, f"{where}.public_key", f"{label}: {exc}") from exc
    return Meter(meter_id, public_key, owner, kind)


def _load_entries(path: Path) -> list[Meter]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, "registry file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc}") from exc
    return _parse_entries(text, str(path))


def entry_text(meter: Meter) -> str:
    """The `[[meter]]` table for `meter` (values are validated names/hex, so no escaping)."""
    return (
        "[[meter]]\n"
        f'id = "{meter.id}"\n'
        f'public_key = "{meter.public_key.point.hex()}"\n'
        f'owner = "{meter.owner}"\n'
        f'source = "{meter.source}"\n'
    )


def append_entry(path: str | Path, meter: Meter) -> bool:
    """Add `meter` to the registry file at `path`; True if added, False if already there.

    The same entry again is a no-op. The same id with a different key, owner
    or source, or the same key under another id, raises ConfigError and leaves
    the file untouched. The file is replaced atomically (temp file, fsync,
    rename) under an exclusive lock on its directory, so concurrent
    provisioning runs serialize and a crash never leaves half an entry.
    """
    path = Path(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        if path.exists():
            old_text = path.read_text(encoding="utf-8")
            entries = _parse_entries(old_text, str(path))
        else:
            old_text = "# MeterChain meter registry: one [[meter]] table per meter.\n"
            entries = []
        for index, existing in enumerate(entries):
            if existing.id == meter.id:
                if existing.same_entry(meter):
                    return False
                key = "public_key" if existing.public_key.point != meter.public_key.point else "id"
                raise ConfigError(str(path), f"meter[{index}].{key}", _conflict(existing, meter))
            if existing.public_key.point == meter.public_key.point:
                raise ConfigError(
                    str(path),
                    f"meter[{index}].public_key",
                    f"key {meter.public_key.fingerprint} of new meter {meter.id!r} is already "
                    f"registered to meter {existing.id!r}",
                )
        separator = "" if old_text.endswith("\n") or not old_text else "\n"
        new_text = f"{old_text}{separator}\n{entry_text(meter)}"
        # Parse what we are about to write: a registry we cannot load must never land.
        _parse_entries(new_text, str(path))
        _replace_atomically(path, new_text, dir_fd)
        return True
    finally:
        os.close(dir_fd)


def _replace_atomically(path: Path, text: str, dir_fd: int) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry is on disk.
    os.fsync(dir_fd)
