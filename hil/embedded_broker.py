"""An in-process MQTT broker (amqtt) for HIL rigs with `broker.kind = "embedded"`.

Production and the test suite use Mosquitto with TLS and ACLs (hil/broker.py);
this one lets a rig run on a machine with nothing but Python. It
listens on 127.0.0.1 only and accepts anonymous clients.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from hil.broker import free_port


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread."""

    host = "127.0.0.1"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        self._thread = threading.Thread(target=self._run, name="embedded-mqtt", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"embedded MQTT broker did not start: {self._error}")
        if self._error is not None:
            raise RuntimeError(f"embedded MQTT broker failed: {self._error}")
        return self

    def _run(self) -> None:
        # amqtt logs every connection at INFO; a demo's console should stay calm.
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() through _error
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config)
        await broker.start()
        self._ready.set()
        stop = asyncio.Event()
        self._stop_event = stop
        await stop.wait()
        await broker.shutdown()
        self._stopped.set()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._thread is None:
            return
        stop = getattr(self, "_stop_event", None)
        if stop is not None:
            self._loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
