"""Board configuration: defaults in code, site settings in config.json, secrets in secrets.json.

Both files are JSON objects with one level of sections, e.g.

    config.json   {"meter_id": "mg1-pv-01", "market": "m1", "source": "pv",
                   "meter": {"type": "sdm630", "uart": 1, "tx": 17, "rx": 16, "baud": 9600},
                   "broker": {"host": "broker.example", "port": 8883},
                   "wifi": {"ssid": "site-wifi"}}
    secrets.json  {"wifi": {"password": "..."}, "broker": {"password": "..."}}

`load()` validates everything at start-up and returns a flat dict keyed "section.key";
the first problem raises ConfigError naming the file and the key, which the app shows
in safe mode.  Unknown keys are refused too: a typo must not silently become a default.
"""

import json

from .errors import ConfigError  # noqa: F401  (re-exported: config.ConfigError)

CONFIG_FILE = "config.json"
SECRETS_FILE = "secrets.json"

METER_TYPES = ("sdm120", "sdm630", "s0", "atm90e32", "sim")
SOURCES = ("pv", "wind", "hydro", "biomass", "load", "bidir", "storage", "chp")
BAUDS = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
_MODBUS = ("sdm120", "sdm630")
_ALL = METER_TYPES
_REQUIRED = "required"
_CHIP = "chip default"

# Per chip: (highest GPIO, GPIOs that do not exist, GPIOs the module's flash / PSRAM
# use, input-only GPIOs, highest UART id for a meter (UART0 is the REPL console),
# SPI buses, default pins).  ESP32-WROVER modules wire PSRAM to GPIO16/17, the ESP32's
# usual UART2 pins; on the C3, GPIO12-17 are the SPI flash and only SPI(1) exists.
_CHIPS = {
    "esp32": (39, (20, 24, 28, 29, 30, 31), (6, 7, 8, 9, 10, 11), (34, 35, 36, 37, 38, 39), 2, (1, 2),
              {"meter.tx": 17, "meter.rx": 16, "meter.pin": 4, "meter.spi": 2, "meter.sck": 18,
               "meter.mosi": 23, "meter.miso": 19, "meter.cs": 5}),
    "esp32-wrover": (39, (20, 24, 28, 29, 30, 31), (6, 7, 8, 9, 10, 11, 16, 17), (34, 35, 36, 37, 38, 39),
                     2, (1, 2),
                     {"meter.tx": 27, "meter.rx": 26, "meter.pin": 4, "meter.spi": 2, "meter.sck": 18,
                      "meter.mosi": 23, "meter.miso": 19, "meter.cs": 5}),
    "esp32s3": (48, (22, 23, 24, 25), (26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37), (), 2, (1, 2),
                {"meter.tx": 17, "meter.rx": 18, "meter.pin": 4, "meter.spi": 2, "meter.sck": 12,
                 "meter.mosi": 11, "meter.miso": 13, "meter.cs": 10}),
    "esp32c3": (21, (), (12, 13, 14, 15, 16, 17), (), 1, (1,),
                {"meter.tx": 7, "meter.rx": 6, "meter.pin": 4, "meter.spi": 1, "meter.sck": 4,
                 "meter.mosi": 5, "meter.miso": 3, "meter.cs": 10}),
}
_OUTPUT_PINS = ("meter.tx", "meter.de", "meter.sck", "meter.mosi", "meter.cs")
_PIN_KEYS = _OUTPUT_PINS + ("meter.rx", "meter.pin", "meter.miso", "tamper_pin")
_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"


# (key, type, default, rule, meter types the key applies to or None for all)
# rule: (lo, hi) for ints, a tuple of allowed strings, "name", "pin" or None.
_SCHEMA = (
    ("chip", str, "esp32", tuple(_CHIPS), None),
    ("meter_id", str, _REQUIRED, "name", None),
    ("market", str, _REQUIRED, "name", None),
    ("source", str, "load", SOURCES, None),
    ("interval_s", int, 15, (1, 86400), None),
    ("wdt_s", int, 120, (0, 3600), None),
    ("persist_s", int, 60, (1, 86400), None),
    ("seq_block", int, 64, (1, 4096), None),
    ("tamper_pin", int, -1, "pin", None),
    ("console_readings", bool, True, None, None),
    ("meter.type", str, _REQUIRED, METER_TYPES, None),
    ("meter.uart", int, 1, (1, 2), _MODBUS + ("sim",)),
    ("meter.tx", int, _CHIP, "pin", _MODBUS),
    ("meter.rx", int, _CHIP, "pin", _MODBUS),
    ("meter.de", int, -1, "pin", _MODBUS),
    ("meter.baud", int, 9600, BAUDS, _MODBUS + ("sim",)),
    ("meter.unit", int, 1, (1, 247), _MODBUS + ("sim",)),
    ("meter.timeout_ms", int, 500, (50, 5000), _MODBUS + ("sim",)),
    ("meter.retries", int, 2, (0, 5), _MODBUS + ("sim",)),
    ("meter.pin", int, _CHIP, "pin", ("s0",)),
    ("meter.pulses_per_kwh", int, 1000, (1, 100000), ("s0",)),
    ("meter.filter_us", int, 12, (0, 12), ("s0",)),
    ("meter.direction", str, "import", ("import", "export"), ("s0",)),
    ("meter.spi", int, _CHIP, (1, 2), ("atm90e32",)),
    ("meter.sck", int, _CHIP, "pin", ("atm90e32",)),
    ("meter.mosi", int, _CHIP, "pin", ("atm90e32",)),
    ("meter.miso", int, _CHIP, "pin", ("atm90e32",)),
    ("meter.cs", int, _CHIP, "pin", ("atm90e32",)),
    ("meter.constant", int, 3200, (100, 100000), ("atm90e32",)),
    # ATM90E32 calibration registers (mc.meters.atm90e32.CALIBRATION), -1: chip default.
    ("meter.mmode0", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.mmode1", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.poffset_a", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.poffset_b", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.poffset_c", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.pqgain_a", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.phi_a", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.pqgain_b", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.phi_b", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.pqgain_c", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.phi_c", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.ugain_a", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.igain_a", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.ugain_b", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.igain_b", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.ugain_c", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.igain_c", int, -1, (-1, 0xFFFF), ("atm90e32",)),
    ("meter.sim_w", int, 1500, (-1000000, 1000000), ("sim",)),
    ("broker.host", str, _REQUIRED, None, None),
    ("broker.port", int, 8883, (1, 65535), None),
    ("broker.tls", bool, True, None, None),
    ("broker.ca", str, "ca.pem", None, None),
    ("broker.username", str, "", None, None),
    ("broker.keepalive_s", int, 60, (10, 3600), None),
    ("broker.inflight", int, 8, (1, 64), None),
    ("broker.backoff_min_ms", int, 1000, (10, 600000), None),
    ("broker.backoff_max_ms", int, 300000, (100, 3600000), None),
    ("broker.ack_timeout_s", int, 120, (5, 86400), None),
    ("broker.reboot_after_s", int, 3600, (0, 604800), None),
    ("wifi.ssid", str, "", None, None),
    ("ntp.host", str, "pool.ntp.org", None, None),
    ("ntp.resync_s", int, 3600, (60, 604800), None),
    ("spool.max_records", int, 512, (16, 4096), None),
    ("spool.batch", int, 4, (1, 64), None),
    ("spool.flush_s", int, 60, (1, 3600), None),
)
_SECRETS = (("wifi.password", ""), ("broker.password", ""))


def _flatten(doc, file: str, out: dict) -> None:
    if not isinstance(doc, dict):
        raise ConfigError(file, None, "must be a JSON object")
    for key in doc:
        value = doc[key]
        if isinstance(value, dict):
            for sub in value:
                if isinstance(value[sub], dict):
                    raise ConfigError(file, key + "." + sub, "nested too deep")
                out[key + "." + sub] = value[sub]
        else:
            out[key] = value


def _read(flash, file: str, required: bool) -> dict:
    raw = flash.read(file)
    flat = {}
    if raw is None:
        if required:
            raise ConfigError(file, None, "missing (provision the board with `meterchain board provision`)")
        return flat
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ConfigError(file, None, "not valid JSON")
    _flatten(doc, file, flat)
    return flat


def _check(file: str, key: str, kind, rule, value):
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(file, key, "must be true or false (got %r)" % (value,))
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(file, key, "must be an integer (got %r)" % (value,))
        return _check_int(file, key, rule, value)
    if not isinstance(value, str):
        raise ConfigError(file, key, "must be a string (got %r)" % (value,))
    if rule == "name":
        if not 1 <= len(value) <= 64 or any(c not in _NAME_CHARS for c in value):
            raise ConfigError(file, key, "must be 1-64 characters of A-Z a-z 0-9 _ . : - (got %r)" % value)
    elif rule is not None and value not in rule:
        raise ConfigError(file, key, "must be one of %s (got %r)" % (", ".join(rule), value))
    return value


def _check_int(file: str, key: str, rule, value: int) -> int:
    if rule == "pin":
        if not -1 <= value <= 48:
            raise ConfigError(file, key, "must be a GPIO number 0-48, or -1 for none (got %d)" % value)
    elif isinstance(rule, tuple) and len(rule) == 2:
        if not rule[0] <= value <= rule[1]:
            raise ConfigError(file, key, "must be between %d and %d (got %d)" % (rule[0], rule[1], value))
    elif rule is not None and value not in rule:
        raise ConfigError(
            file, key, "must be one of %s (got %d)" % (", ".join(str(r) for r in rule), value)
        )
    return value


def _check_chip(file: str, cfg: dict) -> None:
    """Fill the chip's default pins and refuse pins and buses this chip cannot use."""
    chip = cfg["chip"]
    top, missing, reserved, inputs, uarts, buses, defaults = _CHIPS[chip]
    for key in defaults:
        if cfg.get(key) == _CHIP:
            cfg[key] = defaults[key]
    if cfg.get("meter.uart", 1) > uarts:
        raise ConfigError(file, "meter.uart", "%s has no UART%d for a meter" % (chip, cfg["meter.uart"]))
    if cfg["meter.type"] == "s0" and chip == "esp32c3":
        raise ConfigError(file, "meter.type", "s0 needs a hardware pulse counter (PCNT), which esp32c3 "
                          "lacks: pulses would be lost while the radio reconnects")
    if cfg.get("meter.spi", buses[0]) not in buses:
        raise ConfigError(file, "meter.spi", "SPI(%d) does not exist on %s" % (cfg["meter.spi"], chip))
    used = {}
    for key in _PIN_KEYS:
        pin = cfg.get(key, -1)
        if pin == -1:
            continue
        if pin > top or pin in missing:
            raise ConfigError(file, key, "GPIO%d does not exist on %s" % (pin, chip))
        if pin in reserved:
            raise ConfigError(file, key, "GPIO%d is wired to the module's flash or PSRAM on %s" % (pin, chip))
        if key in _OUTPUT_PINS and pin in inputs:
            raise ConfigError(file, key, "GPIO%d is input-only on %s" % (pin, chip))
        if pin in used:
            raise ConfigError(file, key, "GPIO%d is already %s" % (pin, used[pin]))
        used[pin] = key


def validate(raw: dict, file: str = CONFIG_FILE) -> dict:
    """Flat, validated settings with defaults filled in, from a flat dict of raw settings."""
    mtype = raw.get("meter.type")
    cfg = {}
    known = {}
    for key, kind, default, rule, types in _SCHEMA:
        known[key] = types
        applies = types is None or mtype in types
        if key in raw:
            if not applies and mtype in METER_TYPES:
                raise ConfigError(file, key, "not used by meter type %s" % mtype)
            cfg[key] = _check(file, key, kind, rule, raw[key])
        elif default is _REQUIRED:
            raise ConfigError(file, key, "missing")
        elif applies:
            cfg[key] = default
    for key in raw:
        if key not in known:
            raise ConfigError(file, key, "unknown key")
    _check_chip(file, cfg)
    if not cfg["broker.username"]:
        cfg["broker.username"] = cfg["meter_id"]
    if 0 < cfg["wdt_s"] < 60:
        raise ConfigError(file, "wdt_s", "must be 0 (off) or at least 60: one step of a connect "
                          "(WiFi join, DNS + TCP + TLS handshake, CONNACK) may block 20-40 s")
    if 0 < cfg["broker.reboot_after_s"] < 600:
        raise ConfigError(file, "broker.reboot_after_s", "must be 0 (never) or at least 600")
    if cfg["broker.backoff_max_ms"] < cfg["broker.backoff_min_ms"]:
        raise ConfigError(file, "broker.backoff_max_ms", "must not be below broker.backoff_min_ms")
    return cfg


def load(flash) -> dict:
    """Validated settings merged with secrets; raises ConfigError naming the bad key."""
    cfg = validate(_read(flash, CONFIG_FILE, True))
    secrets = _read(flash, SECRETS_FILE, False)
    for key, default in _SECRETS:
        value = secrets.pop(key, default)
        cfg[key] = _check(SECRETS_FILE, key, str, None, value)
    for key in secrets:
        raise ConfigError(SECRETS_FILE, key, "unknown key")
    if cfg["wifi.ssid"] and not cfg["wifi.password"]:
        raise ConfigError(SECRETS_FILE, "wifi.password", "missing (wifi.ssid is set)")
    return cfg
