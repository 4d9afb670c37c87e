"""File checks shared by the agent's and the aggregator's configuration loaders.

Every function raises `ConfigError(config, key, problem)` naming the
configuration file being loaded (`config`) and the key that points at the
bad file, so both services print `config error: FILE: KEY: PROBLEM` and exit
2 for the same problems with the same words.
"""

from __future__ import annotations

import os
import re
import ssl
import stat
import tomllib
from pathlib import Path
from typing import Any

from meterchain.errors import ConfigError

# $NAME or ${NAME}, as os.path.expandvars understands them.
_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")


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
    path = Path(os.path.expanduser(os.path.expandvars(raw)))
    return path if path.is_absolute() else config.parent / path


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
