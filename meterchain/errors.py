"""The MeterChain exception family: every error the core raises derives from MeterChainError.

Foreign errors (cbor2, cryptography, sqlite3, ...) are wrapped at the boundary
into one of these, so callers catch one family and read a specific reason.
"""

from __future__ import annotations


class MeterChainError(Exception):
    """Base of every error MeterChain raises on purpose."""


class ConfigError(MeterChainError):
    """A configuration or registry file is missing, unreadable or has a bad key.

    The message names the file, the key and the problem.
    """

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {problem}")


class CodecError(MeterChainError):
    """Bytes that should be canonical CBOR are not decodable or not canonical."""


class SignatureError(MeterChainError):
    """A signature does not verify, or a key is malformed."""


class RejectedReading(MeterChainError):
    """A signed reading was refused; subclasses say why.

    `reason` is a short stable identifier used as a metrics label.
    """

    reason = "rejected"
