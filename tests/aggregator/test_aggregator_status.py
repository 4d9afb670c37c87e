"""The aggregator's /status and /healthz on a real market over Mosquitto (the MQTT test's site)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_aggregator_mqtt import NODES, T0, Site, broker, site  # noqa: E402, F401

from meterchain.ledger.store import open_store  # noqa: E402
from meterchain.mqtt_auth import consensus_topic  # noqa: E402


def test_status_names_the_ledger_head_waiting_work_and_each_members_last_answer(
    site: Site,  # noqa: F811 - the fixture imported above
) -> None:
    status = site.aggregator.status
    site.tick(T0, 0)  # genesis: proposed, voted by every member, committed
    doc = status.document()
    with open_store(str(site.ledger)) as store:
        height, head = store.head()  # type: ignore[misc]
    assert doc["ledger"] == {"height": height, "head_hash": head.hex(), "inbox_readings": 0,
                             "pending_txs": 0}  # fmt: skip
    assert (doc["service"], doc["role"], doc["market"]) == ("aggregator", "aggregator", "m1")
    assert doc["proposal"] is None and doc["proposals_failed_in_a_row"] == 0
    answered = [m for m in doc["members"] if m["last_answer"] is not None]
    assert [m["id"] for m in doc["members"]] == list(NODES) and len(answered) >= 2
    assert all(m["last_answer"].endswith("Z") for m in answered)
    assert doc["broker"]["connected"] is True
    assert status.health().ready and status.health().reasons == ()
    # A transaction waiting for the next block shows as pending.
    site.publisher("regulator", consensus_topic("m1", "regulator", "tx"),
                   site.sb.participant("mg1", "microgrid", T0).raw)  # fmt: skip
    site.waiting(1)
    assert status.document()["ledger"]["pending_txs"] == 1
    # A service loop that stops turning is no longer live.
    status.loop_turned = time.monotonic() - 60
    health = status.health()
    assert not health.live and "has not turned for 60 s" in health.reasons[0]


def test_forty_failed_proposals_make_one_error_per_reason_and_a_count(
    site: Site,  # noqa: F811 - the fixture imported above
    caplog,
) -> None:
    from types import SimpleNamespace

    site.tick(T0, 0)
    agg = site.aggregator

    def failed(height: int, refusals: dict[str, str]) -> SimpleNamespace:
        block = SimpleNamespace(height=height)
        return SimpleNamespace(proposal=SimpleNamespace(block=block), votes={},
                               refusals=refusals)  # fmt: skip

    with caplog.at_level(logging.DEBUG, logger="meterchain.aggregator"):
        for _ in range(40):
            agg._give_up(failed(1, {}))  # noqa: SLF001 - the loop's own step, driven here
        agg._give_up(failed(1, {"node1": "settlement differs"}))  # noqa: SLF001
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["proposals: proposal failed: block 1 got 0 vote(s): no answer (no answer)",
                      "proposals: proposal failed: block 1 got 0 vote(s): node1: settlement "
                      "differs (node1: settlement differs)"]  # fmt: skip
    assert agg.status.document()["proposals_failed_in_a_row"] == 41
    assert agg.metrics.refused._value.get() == 41  # noqa: SLF001 - every failure is counted
