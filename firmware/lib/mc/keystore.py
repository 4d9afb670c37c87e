"""The board's signing key: generated on the board, kept in its flash, never shown.

`key.bin` holds a magic, the 32-byte private scalar and a CRC.  `ensure()` makes one
from the board's hardware random source the first time and never replaces an
existing key (a new key would orphan the meter's registry entry); a damaged key file
is an error for the operator, not a reason to make a new key.  Only the public key
ever leaves this module: `provision()` prints it for the provisioning tool.
"""

import struct
from binascii import crc32, hexlify

from . import p256
from .errors import ConfigError

KEY_FILE = "key.bin"
_MAGIC = b"MCK1"
_LEN = 40  # magic (4) + secret (32) + crc (4)
# The P-256 group order: a valid private scalar lies in [1, N-1].
_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _encode(secret: int) -> bytes:
    body = _MAGIC + secret.to_bytes(32, "big")
    return body + struct.pack(">I", crc32(body) & 0xFFFFFFFF)


def load(flash) -> int:
    """The private scalar; ConfigError naming key.bin when it is missing or damaged."""
    data = flash.read(KEY_FILE)
    if data is None:
        raise ConfigError(KEY_FILE, None, "missing: the board has no key (run `meterchain board provision`)")
    if len(data) != _LEN or data[:4] != _MAGIC:
        raise ConfigError(KEY_FILE, None, "damaged (wrong size or format); re-provision the board")
    if struct.unpack(">I", data[36:])[0] != crc32(data[:36]) & 0xFFFFFFFF:
        raise ConfigError(KEY_FILE, None, "damaged (CRC mismatch); re-provision the board")
    secret = int.from_bytes(data[4:36], "big")
    if not 0 < secret < _N:
        raise ConfigError(KEY_FILE, None, "damaged (scalar out of range); re-provision the board")
    return secret


def ensure(flash, urandom) -> int:
    """The board's key, generating and storing it first if there is none yet."""
    if flash.read(KEY_FILE) is None:
        secret = p256.secret_from_random(urandom(p256.RANDOM_BYTES))
        flash.write_atomic(KEY_FILE, _encode(secret))
    return load(flash)


def public_hex(secret: int) -> str:
    return hexlify(p256.public_key(secret)).decode()


def provision(board) -> None:
    """Make sure the board has a key and print its public key (and nothing secret).

    The key's randomness comes from `board.key_entropy`: on an ESP32 the RF is switched on
    for it, so the hardware RNG is a true RNG (see mc.hal)."""
    print("MC-PUBKEY " + public_hex(ensure(board.flash, board.key_entropy)))


def show(board) -> None:
    """Print the public key if the board has a key ("MC-PUBKEY none" otherwise); never makes one."""
    if board.flash.read(KEY_FILE) is None:
        print("MC-PUBKEY none")
    else:
        print("MC-PUBKEY " + public_hex(load(board.flash)))
