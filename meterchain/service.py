"""What a long-running MeterChain service needs from its host: sd_notify, watchdog, logs, metrics.

Shared by the edge agent and the aggregator. `notify` speaks the small
systemd notification protocol itself (one datagram to the unix socket named
by NOTIFY_SOCKET, e.g. "READY=1", "WATCHDOG=1", "STOPPING=1"), so no libsystemd
binding is needed and it is a silent no-op outside systemd. `setup_logging`
writes one structured `key=value` line per event; `start_metrics_server`
serves Prometheus metrics over HTTP.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

# Attributes every LogRecord has; anything else came in through `extra=` and is logged as a field.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not run under a notify socket."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        # A lost notification must not take the service down; systemd's own timeouts act.
        logging.getLogger("meterchain.service").warning(
            "sd_notify %s failed: %s", state.split("=", 1)[0], exc
        )
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout systemd set (seconds), or None when no watchdog applies to us.

    Ping with `notify("WATCHDOG=1")` well within it (half is customary).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=... logger=... msg="..." key=value ...` on one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={_quote(record.name)}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup_logging(name: str, level: str | int = "info") -> logging.Logger:
    """Structured key=value lines on stderr for the whole process; returns the service's logger.

    Extra fields: `log.info("block committed", extra={"height": 7})`.
    """
    if isinstance(level, str):
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r} (debug, info, warning, error)")
        level = numeric
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(name)


def start_metrics_server(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> Any:
    """Serve `registry` (default: the global one) at http://host:port/metrics in a thread.

    Returns the server; call `.shutdown()` on it to stop. Port 0 picks a free
    port (read it from `server.server_address`).
    """
    server, _thread = start_http_server(
        port, addr=host, registry=registry if registry is not None else REGISTRY
    )
    return server
