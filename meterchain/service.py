"""What a long-running MeterChain service needs from its host: sd_notify, watchdog, logs, HTTP.

Shared by the edge agent and the aggregator. `notify` speaks the small
systemd notification protocol itself (one datagram to the unix socket named
by NOTIFY_SOCKET, e.g. "READY=1", "WATCHDOG=1", "STOPPING=1"), so no libsystemd
binding is needed and it is a silent no-op outside systemd. `setup_logging`
writes one structured `key=value` line per event. `start_metrics_server`
serves a small local HTTP API: `/metrics` (Prometheus, with
`meterchain_build_info`), `/healthz` with `/healthz/live` and
`/healthz/ready` (200 or 503, a JSON body saying why), and `/status` (the
JSON document a status callable the service hands in returns; `meterchain
status` reads it); any other path is 404.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from prometheus_client.exposition import choose_encoder

from meterchain import __version__

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


@dataclass(frozen=True)
class Health:
    """Live: the service's own loop is turning. Ready: it is doing its job (e.g. broker connected).

    `reasons` says in words why it is not (empty when both hold).
    """

    live: bool = True
    ready: bool = True
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"live": self.live, "ready": self.ready, "reasons": list(self.reasons)}


StatusSource = Callable[[], Mapping[str, Any]]
HealthSource = Callable[[], Health]


def register_build_info(registry: CollectorRegistry, service_name: str) -> None:
    """`meterchain_build_info{version, service, python} 1` on `registry` (once per registry)."""
    names = getattr(registry, "_names_to_collectors", {})
    if "meterchain_build_info" in names:
        return
    Gauge(
        "meterchain_build_info",
        "The running MeterChain build (always 1; the labels carry the facts)",
        ["version", "service", "python"],
        registry=registry,
    ).labels(__version__, service_name, platform.python_version()).set(1)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    return str(value)


class _Handler(BaseHTTPRequestHandler):
    server: _ServiceHTTPServer

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, content_type, encoder(self.server.registry))
        elif path in ("/healthz", "/healthz/live", "/healthz/ready"):
            health = self.server.health_now()
            ok = {"/healthz": health.live and health.ready, "/healthz/live": health.live,
                  "/healthz/ready": health.ready}[path]  # fmt: skip
            self._json(200 if ok else 503, health.to_json())
        elif path == "/status":
            try:
                doc = dict(self.server.status()) if self.server.status else {}
            except Exception as exc:  # a status bug must not take the endpoint down
                logging.getLogger("meterchain.service").exception("status failed")
                self._json(500, {"error": f"status failed: {exc!r}"})
                return
            doc.setdefault("service", self.server.service_name)
            doc.setdefault("version", __version__)
            doc["health"] = self.server.health_now().to_json()
            self._json(200, doc)
        else:
            self._json(404, {"error": f"no such path {path!r}",
                             "paths": ["/metrics", "/healthz", "/healthz/live",
                                       "/healthz/ready", "/status"]})  # fmt: skip

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _json(self, code: int, doc: Mapping[str, Any]) -> None:
        body = json.dumps(doc, indent=2, sort_keys=False, default=_json_default) + "\n"
        self._reply(code, "application/json", body.encode())

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server API
        logging.getLogger("meterchain.service").debug("http: " + format, *args)


class _ServiceHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        service_name: str,
        status: StatusSource | None,
        health: HealthSource | None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.registry = registry
        self.service_name = service_name
        self.status = status
        self.health = health

    def shutdown(self) -> None:
        """Stop serving and free the port."""
        super().shutdown()
        self.server_close()

    def health_now(self) -> Health:
        if self.health is None:
            return Health()
        try:
            return self.health()
        except Exception as exc:
            return Health(live=False, ready=False, reasons=(f"health check failed: {exc!r}",))


def start_metrics_server(
    port: int,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    service_name: str = "meterchain",
    status: StatusSource | None = None,
    health: HealthSource | None = None,
) -> Any:
    """Serve /metrics, /healthz and /status at http://host:port in a daemon thread.

    `registry` (default: the global one) gains `meterchain_build_info`;
    `status` returns the /status document (JSON-able; bytes become hex);
    `health` says whether the service is live and ready (default: both).
    Returns the server; call `.shutdown()` on it to stop. Port 0 picks a free
    port (read it from `server.server_address`).
    """
    registry = registry if registry is not None else REGISTRY
    register_build_info(registry, service_name)
    server = _ServiceHTTPServer((host, port), registry, service_name, status, health)
    thread = threading.Thread(target=server.serve_forever, name="meterchain-http", daemon=True)
    thread.start()
    return server
