"""File and table checks shared by the agent's and the aggregator's configuration loaders.

Every function raises `ConfigError(config, key, problem)` naming the
configuration file being loaded (`config`) and the key that points at the
bad file, so both services print `config error: FILE: KEY: PROBLEM` and exit
2 for the same problems with the same words.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import ssl
import stat
import tomllib
import types
import typing
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from meterchain.errors import ConfigError
from meterchain.mqtt_auth import check_name

# $NAME or ${NAME}, as os.path.expandvars understands them.
_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Linux limits: a path the kernel accepts has at most PATH_MAX - 1 bytes and no
# component longer than NAME_MAX; beyond them every file call fails (ENAMETOOLONG).
PATH_MAX = 4096
NAME_MAX = 255


def load_toml(config: Path) -> dict[str, Any]:
    """Parse the configuration file `config` as UTF-8 TOML."""
    try:
        text = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(config), None, "file does not exist") from None
    except OSError as exc:
        raise ConfigError(str(config), None, f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(config), None, "is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(config), None, f"not valid TOML: {exc}") from None


def control_character(text: str) -> str:
    """The first control character (NUL, newline, DEL, ...) in `text`, or "" if none.

    No configuration value needs one; a NUL breaks every file call and a newline
    would split the one-line `config error:` message.
    """
    match = _CONTROL.search(text)
    return match.group() if match else ""


def expand_path(raw: str, config: Path, key: str) -> Path:
    """`$VARIABLES` and `~` expanded, relative to the config's folder; an unset variable is refused.

    Under systemd `$STATE_DIRECTORY` and `$CREDENTIALS_DIRECTORY` are set for
    the service only; run by hand without them, os.path.expandvars would leave
    the `$NAME` in place and the service would quietly use a folder literally
    named `$STATE_DIRECTORY`.
    """
    for match in _VARIABLE.finditer(raw):
        name = match.group(1).strip("{}")
        if name not in os.environ:
            raise ConfigError(
                str(config), key, f"{raw!r} uses environment variable ${name}, which is not set"
            )
    bad = control_character(raw)
    if bad:
        raise ConfigError(str(config), key, f"must not contain control character {bad!r}")
    path = Path(os.path.expanduser(os.path.expandvars(raw)))
    path = path if path.is_absolute() else config.parent / path
    encoded = os.fsencode(path)
    if len(encoded) >= PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        raise ConfigError(
            str(config),
            key,
            f"path is too long ({len(encoded)} bytes; at most {PATH_MAX - 1}, "
            f"{NAME_MAX} per component)",
        )
    return path


def readable_file(path: Path, config: Path, key: str) -> None:
    """Refuse a path that is missing, not a regular file or not readable by us."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(str(config), key, f"cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(str(config), key, f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(str(config), key, f"cannot read {path}: permission denied")


def secret_bytes(path: Path, config: Path, key: str) -> bytes:
    """A secret's bytes, refusing a file other users could read or write (as ssh does)."""
    readable_file(path, config, key)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            str(config),
            key,
            f"{path} is accessible by group/others (mode {mode & 0o777:o}); chmod 600 it",
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(config), key, f"cannot read {path}: {exc.strerror}") from None


def read_secret_file(path: Path, config: Path, key: str) -> str:
    """A one-line secret (a broker password): owner-only, UTF-8, not empty; whitespace stripped."""
    raw = secret_bytes(path, config, key)
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(str(config), key, f"{path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(str(config), key, f"{path} is empty")
    return text


def require_ca_file(path: Path | None, config: Path, key: str) -> None:
    """The CA that signed the broker's certificate: required for TLS, must load as PEM."""
    if path is None:
        raise ConfigError(str(config), key, "missing (required for mqtts://)")
    readable_file(path, config, key)
    try:
        # The same call the MQTT client makes later, so what passes here works there.
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            str(config), key, f"{path} is not a PEM CA certificate: {exc}"
        ) from None


class TableChecker:
    """Builds the dataclasses of a configuration from its TOML tables, refusing unknown keys
    and wrongly typed values with `ConfigError(config, key, problem)`.

    `sorted_known` lists the known keys alphabetically in "unknown key" messages
    (the aggregator's wording); otherwise they follow the dataclass's field order.
    """

    def __init__(self, path: Path, *, sorted_known: bool = False) -> None:
        self.path = path
        self.sorted_known = sorted_known

    def fail(self, key: str | None, problem: str) -> typing.NoReturn:
        raise ConfigError(str(self.path), key, problem)

    def table(self, raw: Any, cls: type, where: str) -> Any:
        """Build dataclass `cls` from TOML table `raw`, refusing unknown keys and bad types."""
        if not isinstance(raw, dict):
            self.fail(where, f"must be a table, not {toml_kind(raw)}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        if self.sorted_known:
            names.sort()
        for key in raw:
            if key not in hints:
                self.fail(f"{where}.{key}", f"unknown key (known: {', '.join(names)})")
        values = {key: self.value(raw[key], hints[key], f"{where}.{key}") for key in raw}
        return cls(**values)

    def value(self, raw: Any, hint: Any, key: str) -> Any:
        origin = typing.get_origin(hint)
        if origin in (types.UnionType, typing.Union):
            (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
            return self.value(raw, inner, key)
        if origin is tuple:
            if not isinstance(raw, list):
                self.fail(key, f"must be an array, not {toml_kind(raw)}")
            (item, _) = typing.get_args(hint)
            return tuple(self.value(x, item, f"{key}[{i}]") for i, x in enumerate(raw))
        if hint is bool:
            if not isinstance(raw, bool):
                self.fail(key, f"must be true or false, not {toml_kind(raw)}")
            return raw
        if hint is int:
            if not isinstance(raw, int) or isinstance(raw, bool):
                self.fail(key, f"must be an integer, not {toml_kind(raw)}")
            return raw
        if hint is float:
            if not isinstance(raw, int | float) or isinstance(raw, bool):
                self.fail(key, f"must be a number, not {toml_kind(raw)}")
            if not math.isfinite(raw):
                self.fail(key, f"must be a finite number, not {raw}")
            return float(raw)
        if hint is str:
            if not isinstance(raw, str):
                self.fail(key, f"must be a string, not {toml_kind(raw)}")
            bad = control_character(raw)
            if bad:
                self.fail(key, f"must not contain control character {bad!r}")
            return raw
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return self.table(raw, hint, key)
        if hint is Path:
            if not isinstance(raw, str) or not raw:
                self.fail(key, f"must be a non-empty path string, not {toml_kind(raw)}")
            # $STATE_DIRECTORY, $CREDENTIALS_DIRECTORY: what systemd hands the service.
            return expand_path(raw, self.path, key)
        raise TypeError(f"no checker for {hint!r}")  # a programming error, not a config one

    def broker_url(self, url: str, key: str) -> SplitResult:
        """An MQTT broker URL, mqtt:// or mqtts://, with a host and (optionally) a valid port."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - urlsplit validates the port lazily
        except ValueError as exc:
            self.fail(key, f"{url!r} is not a broker URL: {exc}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            self.fail(key, f"must look like mqtts://HOST:PORT or mqtt://HOST:PORT, not {url!r}")
        return parts

    def require(self, section: Any, where: str, *keys: str) -> None:
        for key in keys:
            value = getattr(section, key)
            if value in ("", Path(), None):
                self.fail(f"{where}.{key}", "missing (required)")

    def positive(self, value: float, key: str, *, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            self.fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    def name(self, value: str, key: str, kind: str) -> None:
        try:
            check_name(kind, value)
        except ValueError as exc:
            self.fail(key, str(exc))

    def readable_file(self, path: Path, key: str) -> None:
        readable_file(path, self.path, key)


def toml_kind(value: Any) -> str:
    """How a TOML value reads in an error message: "a string", "an array", ..."""
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def systemd_directories(
    credentials: Path | None, state: Path | None, *, service: str
) -> None:
    """Outside systemd, stand in for what the unit's LoadCredential= and StateDirectory=
    give the service, so `check-config` checks the files the service will use.

    Only a variable that is not set is filled in: from the folder given, or else from
    the unit's own folder (/etc/meterchain/secrets, /var/lib/meterchain-<service>) when
    that exists. Otherwise the variable stays unset and a path using it is refused.
    """
    defaults = (
        ("CREDENTIALS_DIRECTORY", credentials, Path("/etc/meterchain/secrets")),
        ("STATE_DIRECTORY", state, Path(f"/var/lib/meterchain-{service}")),
    )
    for name, given, default in defaults:
        if name in os.environ:
            continue
        if given is not None:
            os.environ[name] = str(given)
        elif default.is_dir():
            os.environ[name] = str(default)
