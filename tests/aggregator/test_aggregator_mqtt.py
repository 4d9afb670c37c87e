"""The aggregator service on a real Mosquitto (TLS, ACLs) with three reviewing consensus nodes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ledger"))

from ledger_world import H0, T0, hour_readings, order_terms, two_microgrid_clearing  # noqa: E402

from aggregator.config import load  # noqa: E402
from aggregator.service import Aggregator  # noqa: E402
from edge_agent.reviewer import ReviewerLink  # noqa: E402
from meterchain.ledger import checkpoint as cp  # noqa: E402
from meterchain.ledger.chain import latest_checkpoint, verify_store  # noqa: E402
from meterchain.ledger.cli import main as ledger_main  # noqa: E402
from meterchain.ledger.readings import HOUR  # noqa: E402
from meterchain.ledger.review import BlockReviewer  # noqa: E402
from meterchain.ledger.sandbox import Sandbox  # noqa: E402
from meterchain.ledger.store import LedgerStore, open_store, qc_bytes  # noqa: E402
from meterchain.mqtt_auth import consensus_topic, meter_acl, node_acl, reading_topic  # noqa: E402
from meterchain.quorum import QuorumCertificate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
METERS = {"pv1": ("mg1", "pv"), "ld1": ("mg1", "load"), "ld2": ("mg2", "load"),
          "bd2": ("mg2", "bidir")}  # fmt: skip
NODES = ("node0", "node1", "node2")
CHECKPOINT_EVERY = 2  # blocks; the aggregator proposes and the members sign at heights 2, 4, ...


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def set(self, now: float) -> None:
        with self.lock:
            self.now = now


def _client(broker, user: str, role: str = "link") -> mqtt.Client:
    # One client id per connection: a second connection with the same id takes over.
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{role}-{user}",
                         protocol=mqtt.MQTTv311)  # fmt: skip
    client.username_pw_set(user, f"pw-{user}")
    client.tls_set(ca_certs=str(broker.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def _write_config(tmp_path: Path, sb: Sandbox, broker, **extra: object) -> Path:
    (tmp_path / "membership.toml").write_text(sb.membership.to_toml())
    (tmp_path / "broker.pass").write_text("pw-aggregator\n")
    (tmp_path / "broker.pass").chmod(0o600)  # the loader refuses a secret others can read
    lines = [
        "[aggregator]", 'market = "m1"', 'ledger = "ledger.db"', 'membership = "membership.toml"',
        f'regulator_key = "{sb.regulator.public_key().point.hex()}"',
        "block_interval_s = 1.0", "vote_timeout_s = 0.9", "settle_grace_s = 60",
        *(f"{k} = {v!r}".replace("'", '"') for k, v in extra.items()),
        "", "[broker]", f'url = "mqtts://127.0.0.1:{broker.port}"',
        f'ca_file = "{broker.ca_file}"', 'password_file = "broker.pass"',
    ]  # fmt: skip
    path = tmp_path / "aggregator.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Site:
    sb: Sandbox
    clock: FakeClock
    aggregator: Aggregator
    links: list[ReviewerLink]
    publisher: Callable[[str, str, bytes], None]
    ledger: Path

    def height(self) -> int:
        with open_store(str(self.ledger)) as store:
            head = store.head()
        return head[0] if head else -1

    def waiting(self, txs: int, readings: int = 0, timeout: float = 20.0) -> None:
        """Wait until the aggregator holds `txs` pending transactions and `readings` readings."""
        deadline = time.monotonic() + timeout
        while True:
            with open_store(str(self.ledger)) as store:
                got = (len(store.pending_txs()), store.inbox_count())
            if got == (txs, readings):
                return
            assert time.monotonic() < deadline, f"waiting: {got}, want {(txs, readings)}"
            time.sleep(0.05)

    def until(self, done: Callable[[LedgerStore], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with open_store(str(self.ledger)) as store:
                if done(store):
                    return
            assert time.monotonic() < deadline, "condition not reached"
            time.sleep(0.05)

    def tick(self, now: float, height: int, timeout: float = 20.0) -> None:
        """Move the clock to `now`; wait for the ledger to reach `height` and the round to end.

        Reaching `height` alone is not enough: it may already be reached (or be reached by
        a block proposed earlier), and the round due at `now` may still be to come. A
        transaction published then would go into that round's block, not stay pending.
        """
        self.clock.set(now)
        deadline = time.monotonic() + timeout
        while self.height() < height or not self.aggregator.quiet_at(now):
            assert time.monotonic() < deadline, (
                f"ledger at {self.height()} (want {height}), quiet: {self.aggregator.quiet_at(now)}"
            )
            time.sleep(0.05)


@pytest.fixture
def broker(mosquitto_factory):
    users = {u: f"pw-{u}" for u in ("aggregator", "regulator", *NODES, *METERS)}
    acl = "".join(node_acl("m1", u) for u in ("aggregator", "regulator", *NODES))
    acl += "".join(meter_acl("m1", m) for m in METERS)
    return mosquitto_factory(users=users, acl=acl)


@pytest.fixture
def site(tmp_path: Path, broker) -> Iterator[Site]:
    sb = Sandbox(market="m1", members=3)
    clock = FakeClock(T0)
    cfg = load(_write_config(tmp_path, sb, broker, checkpoint_interval_blocks=CHECKPOINT_EVERY))
    aggregator = Aggregator(cfg, clock=clock)
    stop = threading.Event()
    runner = threading.Thread(target=aggregator.run, args=(stop,), daemon=True)
    links, clients = [], []
    for node in NODES:
        reviewer = BlockReviewer(open_store(str(tmp_path / f"{node}.db")), node, sb.key(node),
                                 regulator=sb.regulator.public_key(),
                                 checkpoint_interval=CHECKPOINT_EVERY)  # fmt: skip
        client = _client(broker, node)
        link = ReviewerLink(reviewer, client, "m1", "aggregator", clock=clock)
        client.connect(broker.host, broker.port)
        client.loop_start()
        link.start()
        links.append(link)
        clients.append(client)
    publishers: dict[str, mqtt.Client] = {}

    def publish(user: str, topic: str, payload: bytes) -> None:
        if user not in publishers:
            c = _client(broker, user, "publisher")
            c.connect(broker.host, broker.port)
            c.loop_start()
            publishers[user] = c
        publishers[user].publish(topic, payload, qos=1).wait_for_publish(10)

    runner.start()
    yield Site(sb, clock, aggregator, links, publish, tmp_path / "ledger.db")
    stop.set()
    runner.join(timeout=15)
    for link, client in zip(links, clients, strict=True):
        link.stop()
        client.loop_stop()
        client.disconnect()
        link.reviewer.store.close()
    for c in publishers.values():
        c.loop_stop()
        c.disconnect()


def test_a_market_runs_over_mqtt_and_every_node_keeps_the_same_ledger(site: Site) -> None:
    sb, tx_topic = site.sb, consensus_topic("m1", "regulator", "tx")
    site.tick(T0, 0)  # genesis, proposed by the aggregator and certified by the nodes
    for pid, role in (("mg1", "microgrid"), ("mg2", "microgrid"), ("grid", "grid"),
                      ("dispatch", "dispatch")):  # fmt: skip
        site.publisher("regulator", tx_topic, sb.participant(pid, role, T0).raw)
    # Meters may follow their owners' admission before any block holds it.
    for meter, (owner, source) in METERS.items():
        site.publisher("regulator", tx_topic, sb.meter(meter, owner, source, T0).raw)
    site.waiting(8)
    site.tick(T0 + 2, 1)
    site.tick(T0 + 4, 1)
    # The consensus agents' committed clearing and a multi-signed order.
    request, result = two_microgrid_clearing((H0 + 1) % 24)
    site.publisher("node1", consensus_topic("m1", "node1", "tx"),
                   sb.clearing(H0 + 1, request, result, round=7).raw)  # fmt: skip
    order = sb.order(order_terms("o1", H0 + 1, 700_000, T0 + 3))
    site.publisher("regulator", tx_topic, order.raw)
    site.waiting(2)
    site.tick(T0 + 6, 2)
    # Two hours of readings arrive once hour H0+1 is over; they may spread over blocks.
    site.clock.set((H0 + 2) * HOUR + 1)
    for r in hour_readings(sb, H0, 1) + hour_readings(sb, H0 + 1, 7):
        site.publisher(r.meter_id, reading_topic("m1", r.meter_id), r.cose)
    site.until(lambda store: store.reading_count() + store.inbox_count() == 48)
    # Blocks at +1 may already hold all of them, so the round at +3 need not add one;
    # once it is over, the inbox is empty either way.
    site.tick((H0 + 2) * HOUR + 3, site.height())
    with open_store(str(site.ledger)) as store:
        assert (store.reading_count(), store.inbox_count()) == (48, 0)
    # After the grace period: the settlement of H0+1 (and pv1's first certificate).
    site.tick((H0 + 2) * HOUR + 62, site.height() + 1)
    site.publisher("regulator", tx_topic, sb.veto(order.hash, "dispatch found a line limit",
                                                  (H0 + 2) * HOUR + 70).raw)  # fmt: skip
    site.waiting(1)
    site.tick((H0 + 2) * HOUR + 80, site.height() + 1)
    with open_store(str(site.ledger)) as store:
        state, report = verify_store(store)
        kinds = report.kinds
        head = store.head()
    assert report.readings == 48
    assert kinds["settlement"] == 1 and kinds["veto"] == 1 and kinds["cert_issue"] == 1
    assert state is not None and state.orders["o1"].status == "vetoed"
    deadline = time.monotonic() + 10
    while any(link.reviewer.store.head() != head for link in site.links):
        assert time.monotonic() < deadline, "a node did not apply the last committed block"
        time.sleep(0.05)
    m = site.aggregator.metrics
    assert m.readings._value.get() == 48 and m.blocks._value.get() == head[0] + 1


def test_bad_messages_are_refused_and_counted(site: Site) -> None:
    sb = site.sb
    site.tick(T0, 0)
    site.publisher("regulator", consensus_topic("m1", "regulator", "tx"), b"\xa0not a tx")
    forged = sb.participant("mg9", "consumer", T0)
    site.publisher("node2", consensus_topic("m1", "node2", "tx"),
                   forged.raw.replace(forged.body["regulator_sig"], bytes(64)))  # fmt: skip
    site.publisher("pv1", reading_topic("m1", "pv1"), sb.reading("pv1", 1, T0, 0, 1, "pv").cose)
    m = site.aggregator.metrics
    deadline = time.monotonic() + 10
    while m.rejected.labels("unknown_meter")._value.get() < 1 or (
        m.txs_rejected.labels("participant")._value.get() < 1
        or m.txs_rejected.labels("malformed")._value.get() < 1
    ):
        assert time.monotonic() < deadline, "refusals were not counted"
        time.sleep(0.05)
    site.tick(T0 + 5, 0)
    assert site.height() == 0  # nothing valid arrived, so no block


def _wait(done: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_members_sign_checkpoints_and_a_lie_or_a_disagreement_never_makes_one(
    site: Site, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    sb, tx_topic = site.sb, consensus_topic("m1", "regulator", "tx")
    m = site.aggregator.metrics
    honest, disagreeing, liar = (link.reviewer for link in site.links)
    # node1 hashes its state differently (a diverged replica): it must not sign, and say why.
    applied = disagreeing._applied

    def diverged(block_hash: bytes) -> None:
        applied(block_hash)
        if disagreeing.attestation is not None:
            disagreeing.attestation = replace(disagreeing.attestation, digest=bytes(32))

    disagreeing._applied = diverged  # type: ignore[method-assign]

    # node2 lies: it signs a wrong state digest, its own key and all.
    def lie(data: bytes) -> cp.CheckpointVote:
        wrong = replace(cp.parse_proposal(data), digest=b"\x01" * 32)
        return cp.CheckpointVote("node2", wrong, sb.key("node2").sign(wrong.statement()))

    liar.attest = lie  # type: ignore[method-assign]

    def block(height: int, participant: str) -> None:
        site.publisher("regulator", tx_topic, sb.participant(participant, "consumer", T0).raw)
        site.waiting(1)
        site.tick(T0 + 2 * height, height)

    caplog.set_level(logging.INFO)
    site.tick(T0, 0)
    block(1, "c1")
    block(2, "c2")  # checkpoint 2: node0 signs, node1 disagrees, node2 lies
    _wait(lambda: m.checkpoint_votes._value.get() == 1, "node0's vote")
    _wait(lambda: m.checkpoint_votes_refused._value.get() == 1, "node2's lie to be refused")
    _wait(lambda: "is not mine" in caplog.text, "node1 to log its disagreement")
    # A forged vote claiming the right digest with a signature over another one: refused too.
    proposal = cp.Attestation.of(site.aggregator.former.state, site.aggregator.store.head()[1])
    wrong = replace(proposal, digest=bytes(32))
    forged = cp.CheckpointVote("node2", proposal, sb.key("node2").sign(wrong.statement()))
    site.publisher("node2", consensus_topic("m1", "node2", "checkpoint-vote"), forged.encode())
    _wait(lambda: m.checkpoint_votes_refused._value.get() == 2, "the forged vote to be refused")
    with open_store(str(site.ledger)) as store:
        assert store.checkpoint_rows() == []  # one honest signature of three is no checkpoint
    assert "proposed state digest" in caplog.text and "is not mine 0000" in caplog.text
    assert "node2 signed checkpoint 2 with block" in caplog.text
    assert "node2's signature over checkpoint 2 is invalid" in caplog.text

    disagreeing._applied = applied  # type: ignore[method-assign]  # node1 is repaired
    block(3, "c3")
    block(4, "c4")  # checkpoint 4: node0 and node1 sign; node2's lie is refused again
    site.until(lambda store: bool(store.checkpoint_rows()))
    with open_store(str(site.ledger)) as store:
        checkpoint = latest_checkpoint(store)
        assert checkpoint is not None and checkpoint.height == 4
        assert checkpoint.qc.signers == ("node0", "node1")
    url = str(site.ledger)
    assert ledger_main(["verify", url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"] and doc["checkpoint"] == 4 and doc["height"] == 4

    # A checkpoint at the head that only node0 signed (n/2 or fewer): verify refuses it.
    block(5, "c5")
    with open_store(url) as store:
        state, report = verify_store(store)
        assert state is not None and report.height == 5
        alone = cp.Attestation.of(state, report.head)
        qc = QuorumCertificate.collect(alone.statement(), [("node0", sb.key("node0").sign(
            alone.statement()))])  # fmt: skip
        store.put_checkpoint(5, report.head, alone.digest, cp.state_bytes(state), qc_bytes(qc))
    assert ledger_main(["verify", url]) == 1
    assert "block 5: checkpoint at height 5: certificate: 1 signature(s) on 'checkpoint'; more " \
        "than n/2" in capsys.readouterr().err  # fmt: skip
    assert ledger_main(["verify", url, "--full"]) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_service_under_a_notify_socket_starts_serves_metrics_and_stops_cleanly(
    tmp_path: Path, broker
) -> None:
    sb = Sandbox(market="m1", members=3)
    port = _free_port()
    path = _write_config(tmp_path, sb, broker, metrics_port=port)
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "meterchain.cli", "aggregator", "run", "--config", str(path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert listener.recv(64) == b"READY=1"
        assert listener.recv(64) == b"WATCHDOG=1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert "meterchain_aggregator_ledger_height" in reply.read().decode()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        states = set()
        listener.settimeout(1)
        try:
            while True:
                states.add(listener.recv(64))
        except TimeoutError:
            pass
        assert b"STOPPING=1" in states
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    assert proc.returncode == 0, err
    lines = err.strip().splitlines()
    assert any('msg="aggregator started" market=m1 node=aggregator' in ln for ln in lines), err
    assert any(ln.startswith("ts=") and "msg=stopping" in ln for ln in lines), err
    assert not [ln for ln in lines if "level=warning" in ln or "level=error" in ln], err
