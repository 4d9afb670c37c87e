"""Calm logs and backoff: a failure that goes on makes a few counted lines, not a flood.

`CalmLog` is driven with a scripted clock; the consensus link is pointed at a
real Mosquitto that refuses its password, as a misconfigured node would be.
"""

from __future__ import annotations

import logging
import time

import pytest

from edge_agent.consensus.transport import MqttLink, MqttSettings
from meterchain.calm import CalmLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_a_long_outage_is_one_error_a_summary_a_minute_and_one_recovery(caplog) -> None:
    clock = Clock()
    calm = CalmLog(logging.getLogger("test.calm"), per_kind=False, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="test.calm"):
        for _ in range(1200):  # one failure every 0.25 s for 300 s
            calm.failure("broker", "refused", "broker refused the connection")
            clock.now += 0.25
        assert calm.failures("broker") == 1200 and calm.any_failing
        calm.success("broker")
    errors, warnings = _lines(caplog, logging.ERROR), _lines(caplog, logging.WARNING)
    assert errors == ["broker: broker refused the connection (refused)"]
    # One summary per 60 s, each with the failures since the last line and the running total.
    assert len(warnings) == 4, warnings
    assert warnings[0] == ("broker: still failing: broker refused the connection (refused); "
                           "240 more failure(s), 241 in 60 s")  # fmt: skip
    counts = [int(w.split("; ")[1].split(" more")[0]) for w in warnings]
    assert counts == [240] * 4  # + the first + 239 after the last summary = 1200
    assert _lines(caplog, logging.INFO) == ["broker: recovered after 1200 failure(s) in 300 s"]
    assert not calm.any_failing and calm.failures("broker") == 0
    calm.success("broker")  # nothing to recover from: no line
    assert len(_lines(caplog, logging.INFO)) == 1


def test_a_new_kind_of_failure_is_news_only_when_asked(caplog) -> None:
    clock = Clock()
    per_kind = CalmLog(logging.getLogger("test.kind"), clock=clock)
    one_outage = CalmLog(logging.getLogger("test.outage"), per_kind=False, clock=clock)
    with caplog.at_level(logging.DEBUG):
        for calm in (per_kind, one_outage):
            calm.failure("mg1-pv", "bad_signature", "bad signature")
            calm.failure("mg1-pv", "bad_signature", "bad signature")
            calm.failure("mg1-pv", "replayed", "replayed sequence")
    errors = [r.name for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["test.kind", "test.kind", "test.outage"]
    # Either way the outage goes on counting, whatever the reasons.
    assert per_kind.failures("mg1-pv") == one_outage.failures("mg1-pv") == 3


def test_the_consensus_link_backs_off_from_a_refusing_broker(mosquitto_factory, caplog) -> None:
    broker = mosquitto_factory(users={"n1": "right"})
    settings = MqttSettings(broker.host, broker.port, "n1", "wrong", str(broker.ca_file),
                            client_id="calm-n1", backoff_min_s=0.05, backoff_max_s=5.0)  # fmt: skip
    link = MqttLink(settings, ["mc/m1/c/#"], lambda topic, payload: None)
    with caplog.at_level(logging.DEBUG, logger="meterchain.consensus"):
        link.start()
        time.sleep(4.0)
        link.close()
    ours = [r for r in caplog.records if r.name == "meterchain.consensus"]
    errors = [r.getMessage() for r in ours if r.levelno >= logging.ERROR]
    attempts = [r for r in ours if "refused" in r.getMessage()]
    assert len(errors) == 1 and "broker refused the connection" in errors[0], errors
    # Waits double from 50-100 ms: about 6 attempts in 4 s (it was one every 50-100 ms).
    assert 3 <= len(attempts) <= 9, [r.getMessage() for r in attempts]
    assert not link.connected.is_set()


def test_every_paho_client_starts_from_a_jittered_first_wait() -> None:
    import random

    from meterchain.backoff import paho_backoff

    class Client:
        def reconnect_delay_set(self, min_delay: float, max_delay: float) -> None:
            self.delays = (min_delay, max_delay)

    firsts = set()
    rng = random.Random(5)
    for _ in range(50):
        client = Client()
        paho_backoff(client, 1, 30, rng)
        first, cap = client.delays
        assert 1 <= first < 2 and cap == 30
        firsts.add(round(first, 3))
    assert len(firsts) > 40  # clients that lost the broker together come back spread out
    client = Client()
    paho_backoff(client, 20, 30, rng)
    assert client.delays[1] >= client.delays[0]  # the cap never undercuts the first wait
