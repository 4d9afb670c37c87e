"""Provision and deploy meter boards: firmware, config, on-board key, registry and broker entries.

`provision()` takes a board (real or emulated, see driver.py) from blank to publishing:
build the firmware image, install it, write config.json / secrets.json (and the
broker's CA), make the board generate its key and read back only the public key,
append the registry entry, and add the meter's broker password and ACL lines.
Every step checks what is already there first, so running it again changes nothing
(the key is never regenerated, entries are never duplicated, the broker password
is kept), and `dry_run` only prints what it would do.

`deploy()` replaces the firmware and keeps everything else (key, config, spool).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meterchain.board import firmware
from meterchain.board.driver import BoardDriver, BoardError, EmulatedDriver
from meterchain.errors import ConfigError, MeterChainError, RegistryError, SignatureError
from meterchain.keys import PublicKey, write_private_file
from meterchain.mqtt_auth import meter_acl, password_line

CA_FILE = "ca.pem"
_PUBKEY = "MC-PUBKEY "


@dataclass
class ProvisionRequest:
    """What `meterchain board provision` was asked to do."""

    meter_id: str
    market: str
    broker_url: str | None = None
    registry: Path | None = None
    owner: str | None = None
    source: str = "load"
    meter_type: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    broker_ca: Path | None = None
    broker_passwd: Path | None = None
    broker_acl: Path | None = None
    wifi_ssid: str | None = None
    wifi_password: str | None = None
    dry_run: bool = False


@dataclass
class ProvisionResult:
    public_key: str | None
    changed: list[str]


def parse_broker_url(url: str) -> dict[str, Any]:
    """{"host", "port", "tls"} from mqtts://host[:port] (TLS, 8883) or mqtt://host[:port]."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtts", "mqtt", "ssl", "tcp") or not parts.hostname:
        raise ConfigError(
            "--broker", None, f"{url!r} is not mqtts://HOST[:PORT] or mqtt://HOST[:PORT]"
        )
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError("--broker", None, f"bad port in {url!r}") from exc
    return {"host": parts.hostname, "port": port, "tls": tls}


def parse_setting(text: str) -> tuple[str, Any]:
    """KEY=VALUE from --set; VALUE is JSON when it parses as JSON, else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError("--set", text, "must be KEY=VALUE, e.g. meter.tx=17")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in flat.items():
        section, dot, sub = key.partition(".")
        if dot:
            doc.setdefault(section, {})[sub] = value
        else:
            doc[key] = value
    return doc


def _flat(doc: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            for sub, item in value.items():
                flat[f"{key}.{sub}"] = item
        else:
            flat[key] = value
    return flat


def validate_config(flat: dict[str, Any]) -> None:
    """Run the firmware's own validation, so the board would accept what we write."""
    from meterchain.board.emulated import ensure_firmware_importable

    ensure_firmware_importable()
    from mc import config as fw_config

    try:
        fw_config.validate(dict(flat))
    except fw_config.ConfigError as exc:
        raise ConfigError(exc.file, exc.key, exc.problem) from exc


def _load_json(driver: BoardDriver, path: str) -> dict[str, Any] | None:
    raw = driver.read_file(path)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(path, None, f"on the board is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(path, None, "on the board is not a JSON object")
    return doc


def _dump(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def mosquitto_hash_matches(stored: str, password: str) -> bool:
    """True if a Mosquitto `$7$` (PBKDF2-SHA512) password-file hash is of `password`."""
    parts = stored.strip().split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3])
        expected = base64.b64decode(parts[4])
    except ValueError:
        return False
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(derived, expected)


def _write_private(path: Path, text: str) -> None:
    """Replace the broker file `path` atomically, keeping the owner, group and mode it has.

    The broker reads it after a reload as its own user, so a provisioning run as root
    must not leave it root-owned 0600; a new file is 0600, owned by whoever runs this.
    """
    write_private_file(path, text.encode(), keep_access=True)


def ensure_password(path: Path, user: str, password: str, dry_run: bool) -> str:
    """Make the Mosquitto password file hold `password` for `user`: added/updated/unchanged."""
    lines = path.read_text().splitlines() if path.exists() else []
    for i, line in enumerate(lines):
        name, sep, stored = line.partition(":")
        if sep and name == user:
            if mosquitto_hash_matches(stored, password):
                return "unchanged"
            if not dry_run:
                lines[i] = password_line(user, password)
                _write_private(path, "\n".join(lines) + "\n")
            return "updated"
    if not dry_run:
        _write_private(
            path, "".join(f"{line}\n" for line in lines) + password_line(user, password) + "\n"
        )
    return "added"


def ensure_acl(path: Path, market: str, meter_id: str, dry_run: bool) -> str:
    """Append the meter's ACL block (publish to its own topic only): added/unchanged."""
    block = meter_acl(market, meter_id)
    text = path.read_text() if path.exists() else ""
    if block in text:
        return "unchanged"
    if not dry_run:
        separator = (
            "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        )
        _write_private(path, text + separator + block)
    return "added"


def is_current(driver: BoardDriver, image: firmware.Image) -> bool:
    """True when the board already runs exactly this firmware image."""
    return driver.read_file(firmware.IMAGE_FILE) == image.files[firmware.IMAGE_FILE]


def _read_public_key(output: str) -> str | None:
    keys = [
        line[len(_PUBKEY) :].strip() for line in output.splitlines() if line.startswith(_PUBKEY)
    ]
    if len(keys) != 1:
        raise BoardError(f"expected one public key line from the board, got {len(keys)}")
    if keys[0] == "none":
        return None
    try:
        PublicKey.from_hex(keys[0])
    except SignatureError as exc:
        raise BoardError(f"the board printed an invalid public key: {exc}") from exc
    return keys[0]


def board_public_key(driver: BoardDriver, generate: bool) -> str | None:
    """The board's public key, generating the key on the board first if `generate`."""
    call = "keystore.provision(board)" if generate else "keystore.show(board)"
    return _read_public_key(driver.run_firmware(f"from mc import keystore\n{call}\n"))


def _config_for(
    req: ProvisionRequest, existing: dict[str, Any] | None, driver: BoardDriver
) -> dict[str, Any]:
    if existing is not None and existing.get("meter_id") not in (None, req.meter_id):
        raise BoardError(
            f"{driver.describe()} is already provisioned as meter {existing.get('meter_id')!r}; "
            "its key belongs to that meter. Erase the board's flash to provision it afresh."
        )
    flat = _flat(existing or {})
    flat["meter_id"] = req.meter_id
    flat["market"] = req.market
    flat["source"] = req.source
    meter_type = req.meter_type or flat.get("meter.type") or "sdm630"
    if meter_type == "sim" and not isinstance(driver, EmulatedDriver):
        raise ConfigError(
            "--meter-type", None, "sim (a simulated meter) exists only on emulated boards"
        )
    if flat.get("meter.type") != meter_type:
        flat = {k: v for k, v in flat.items() if not k.startswith("meter.")}
        flat["meter.type"] = meter_type
    if req.broker_url is not None:
        for key, value in parse_broker_url(req.broker_url).items():
            flat[f"broker.{key}"] = value
    if "broker.host" not in flat:
        raise ConfigError("--broker", None, "missing: the board has no broker configured yet")
    if req.broker_ca is not None:
        flat["broker.ca"] = CA_FILE
    if req.wifi_ssid is not None:
        flat["wifi.ssid"] = req.wifi_ssid
    flat.update(req.settings)
    validate_config(flat)
    return _nested(flat)


def provision(
    driver: BoardDriver, req: ProvisionRequest, out: Callable[[str], None] = print
) -> ProvisionResult:
    """Bring a board to a registered, publishing meter; see the module docstring."""
    dry = req.dry_run
    would = "would " if dry else ""
    changed: list[str] = []

    def step(name: str, message: str, changes: bool = True) -> None:
        out(f"{would if changes else ''}{message}")
        if changes:
            changed.append(name)

    if req.broker_ca is not None and not req.broker_ca.is_file():
        raise ConfigError(str(req.broker_ca), None, "broker CA certificate file not found")
    existing = _load_json(driver, "config.json")
    cfg = _config_for(req, existing, driver)
    broker = cfg["broker"]
    if broker.get("tls", True) and req.broker_ca is None:
        if driver.read_file(broker.get("ca", CA_FILE)) is None:
            raise ConfigError(
                "--broker-ca",
                None,
                "required for a TLS broker: the board verifies the broker's certificate with it",
            )
    image = firmware.build(driver.kind)
    if is_current(driver, image):
        step("firmware", f"firmware up to date (image {image.digest[:12]})", changes=False)
    else:
        step(
            "firmware",
            f"install firmware image {image.digest[:12]} ({len(image.files)} files, "
            f"{image.size} bytes, {'mpy-cross bytecode' if image.kind == 'mpy' else 'sources'}) "
            f"on {driver.describe()}",
        )
        if not dry:
            removed = driver.install(image)
            if removed:
                out(f"removed stale firmware files: {', '.join(removed)}")

    if existing != json.loads(_dump(cfg)):
        step(
            "config",
            f"write config.json (meter {req.meter_id}, market {req.market}, "
            f"broker {cfg['broker']['host']}:{cfg['broker'].get('port', 8883)})",
        )
        if not dry:
            driver.write_file("config.json", _dump(cfg))
    else:
        step("config", "config.json unchanged", changes=False)

    old_secrets = _load_json(driver, "secrets.json") or {}
    new_secrets = json.loads(json.dumps(old_secrets))
    broker_secrets = new_secrets.setdefault("broker", {})
    if not broker_secrets.get("password"):
        broker_secrets["password"] = secrets.token_urlsafe(24)
    if req.wifi_password is not None:
        new_secrets.setdefault("wifi", {})["password"] = req.wifi_password
    if new_secrets != old_secrets:
        what = (
            "new broker password" if not old_secrets.get("broker", {}).get("password") else "WiFi"
        )
        step("secrets", f"write secrets.json ({what})")
        if not dry:
            driver.write_file("secrets.json", _dump(new_secrets))
    else:
        step("secrets", "secrets.json unchanged", changes=False)

    if req.broker_ca is not None:
        ca = req.broker_ca.read_bytes()
        if driver.read_file(CA_FILE) != ca:
            step("ca", f"write {CA_FILE} from {req.broker_ca}")
            if not dry:
                driver.write_file(CA_FILE, ca)
        else:
            step("ca", f"{CA_FILE} unchanged", changes=False)

    # On a blank board (or in a dry run) the firmware may not be installed yet.
    has_firmware = driver.read_file("lib/mc/keystore.mpy") or driver.read_file("lib/mc/keystore.py")
    current = board_public_key(driver, generate=False) if has_firmware else None
    if current is None:
        step(
            "key", "generate the signing key on the board (hardware RNG with the RF on; only the "
            "public key is read)",
        )
        public = None if dry else board_public_key(driver, generate=True)
    else:
        step("key", "signing key present on the board (kept)", changes=False)
        public = current
    if public is not None:
        out(f"public key {public}")

    if req.registry is not None:
        _register(req, public, step)
    password = broker_secrets["password"]
    if req.broker_passwd is not None:
        result = ensure_password(req.broker_passwd, req.meter_id, password, dry)
        verbs = {"added": "add", "updated": "update"} if dry else {}
        if result == "unchanged":
            step("passwd", f"broker password entry for {req.meter_id} unchanged", changes=False)
        else:
            step(
                "passwd",
                f"{verbs.get(result, result)} broker password entry for {req.meter_id} "
                f"in {req.broker_passwd}",
            )
    if req.broker_acl is not None:
        result = ensure_acl(req.broker_acl, req.market, req.meter_id, dry)
        step(
            "acl",
            f"{'add' if dry else 'added'} ACL: {req.meter_id} may publish only to "
            f"mc/{req.market}/r/{req.meter_id} in {req.broker_acl}"
            if result == "added"
            else f"broker ACL for {req.meter_id} unchanged",
            changes=result == "added",
        )
    if ("passwd" in changed or "acl" in changed) and not dry:
        out("reload the broker to apply (SIGHUP, or `systemctl reload mosquitto`)")
    if changed and not dry:
        driver.reset()
        out(f"reset {driver.describe()}")
    if not changed:
        out("nothing to do: the board is provisioned")
    return ProvisionResult(public, changed)


def _register(req: ProvisionRequest, public: str | None, step: Callable[..., None]) -> None:
    from meterchain.registry import Registry, append_entry, make_meter

    assert req.registry is not None
    owner = req.owner or req.market
    if public is None:  # dry run on a board without a key yet
        step(
            "registry",
            f"add meter {req.meter_id} (owner {owner}, source {req.source}) to {req.registry}",
        )
        return
    meter = make_meter(req.meter_id, public, owner, req.source)
    if req.dry_run:
        known = Registry.load(req.registry).get(req.meter_id) if req.registry.exists() else None
        if known is not None and known.same_entry(meter):
            step("registry", f"meter {req.meter_id} already in {req.registry}", changes=False)
        elif known is not None:
            raise RegistryError(
                f"meter {req.meter_id!r} is registered in {req.registry} "
                "with a different key, owner or source"
            )
        else:
            step(
                "registry",
                f"add meter {req.meter_id} (owner {owner}, source {req.source}) to {req.registry}",
            )
        return
    if append_entry(req.registry, meter):
        step(
            "registry",
            f"added meter {req.meter_id} (owner {owner}, source {req.source}) to {req.registry}",
        )
    else:
        step("registry", f"meter {req.meter_id} already in {req.registry}", changes=False)


def deploy(driver: BoardDriver, dry_run: bool = False, out: Callable[[str], None] = print) -> bool:
    """Install the current firmware, keeping the key, config and spool; False if up to date."""
    image = firmware.build(driver.kind)
    if is_current(driver, image):
        out(f"{driver.describe()} already runs firmware image {image.digest[:12]}")
        return False
    prefix = "would " if dry_run else ""
    out(
        f"{prefix}install firmware image {image.digest[:12]} ({len(image.files)} files, "
        f"{image.size} bytes) on {driver.describe()}; key, config and spool are kept"
    )
    if dry_run:
        return True
    removed = driver.install(image)
    if removed:
        out(f"removed stale firmware files: {', '.join(removed)}")
    driver.reset()
    out(f"reset {driver.describe()}")
    return True


__all__ = [
    "BoardError",
    "MeterChainError",
    "ProvisionRequest",
    "ProvisionResult",
    "deploy",
    "provision",
]
