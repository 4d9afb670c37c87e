"""One SDBFT consensus node as an OS process: `python -m edge_agent.consensus.process ...`.

It rebuilds its state from its log, connects to the broker (TLS, its own
credentials), opens round r at `epoch_ms + r * period_ms` on the shared wall
clock (a clearing for even r, a settlement for odd r), submits a
deterministic bid, and prints one JSON object per line on stdout:
`ready`, `proposed` (it published a proposal), `commit`, `final`. Rounds whose
open time passed while it was down are opened in catch-up mode: it asks for
their decisions instead of voting. Used by the integration tests (kill -9 and
restart) and as a reference for wiring the state machine into a service.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any

from edge_agent.consensus.contracts import DoubleAuction, Tally
from edge_agent.consensus.messages import Decoder, RoundId
from edge_agent.consensus.node import Commit, Final, Node
from edge_agent.consensus.signing import Keyring, P256Signer
from edge_agent.consensus.transport import MqttSettings, NodeRunner, open_store
from meterchain.keys import PrivateKey, PublicKey
from meterchain.quorum import Membership


def round_of(seq: int) -> RoundId:
    return RoundId(seq, "clear" if seq % 2 == 0 else "settle")


def bid_for(node_id: str, index: int, seq: int) -> Any:
    """A deterministic bid: even members sell, odd members buy, prices vary by round."""
    if seq % 2:
        return seq * 10 + index
    side = "sell" if index % 2 == 0 else "buy"
    base = 100 + (seq * 7) % 50
    price = base + 5 * index if side == "sell" else base + 80 - 3 * index
    return {"side": side, "wh": 500 + 100 * index, "price": price}


class _Printer:
    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "wall_ms": int(time.time() * 1000), **fields})
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.consensus.process", description=__doc__
    )
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--key", required=True, help="PEM file with the node's P-256 key")
    parser.add_argument("--membership", required=True, help="membership TOML (meterchain.quorum)")
    parser.add_argument(
        "--regulator-key", help="hex public key; when given, the membership must verify"
    )
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca-file")
    parser.add_argument("--password", required=True)
    parser.add_argument("--delta-ms", type=int, default=50)
    parser.add_argument("--epoch-ms", type=int, required=True, help="wall-clock ms of round 0")
    parser.add_argument("--period-ms", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--linger-ms", type=int, default=3000, help="stay up after the last round")
    ns = parser.parse_args(argv)

    membership = Membership.load(ns.membership)
    if ns.regulator_key:
        membership.verify(PublicKey.from_hex(ns.regulator_key))
    keyring = Keyring(membership)
    signer = P256Signer(ns.node_id, PrivateKey.load(ns.key))
    store, records = open_store(ns.state_dir)
    node = Node(
        signer,
        keyring,
        {"clear": DoubleAuction(), "settle": Tally()},
        delta_ms=ns.delta_ms,
        decoder=Decoder(),
        records=records,
    )
    emit = _Printer()

    def on_commit(c: Commit) -> None:
        emit("commit", round=c.round.seq, kind=c.round.kind, view=c.view, digest=c.digest.hex())

    def on_final(f: Final) -> None:
        emit(
            "final",
            round=f.round.seq,
            kind=f.round.kind,
            digest=f.digest.hex(),
            signers=list(f.certificate.signers),
        )

    def on_publish(kind: str, data: bytes) -> None:
        if kind == "prop":
            env = node.decoder.envelope(data)
            emit("proposed", round=env.round.seq, view=env.view)

    settings = MqttSettings(
        ns.host, ns.port, ns.node_id, ns.password, ns.ca_file, client_id=f"sdbft-{ns.node_id}"
    )
    runner = NodeRunner(
        node, store, settings, on_commit=on_commit, on_final=on_final, on_publish=on_publish
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    runner.start()
    index = membership.node_ids.index(ns.node_id)
    known = {rid.seq for rid in node.rounds} | {rid.seq for rid in node.decided}
    emit("ready", restored=len(records), known=sorted(known))
    now = time.time() * 1000
    for seq in range(ns.rounds):
        if seq in known:
            continue
        opens_at = ns.epoch_ms + seq * ns.period_ms
        if opens_at + ns.delta_ms < now:
            runner.open_round(round_of(seq), submit=False, catch_up=True)
    for seq in range(ns.rounds):
        opens_at = ns.epoch_ms + seq * ns.period_ms
        if seq in known or opens_at + ns.delta_ms < now:
            continue
        while not stopping.is_set() and time.time() * 1000 < opens_at:
            time.sleep(min(0.01, max(0.0, (opens_at - time.time() * 1000) / 1000)))
        if stopping.is_set():
            break
        deposit = f"deposit:{ns.node_id}:{seq}".encode()
        runner.open_round(round_of(seq), deposit=deposit, body=bid_for(ns.node_id, index, seq))
    stopping.wait(ns.linger_ms / 1000)
    runner.stop()
    emit("stopped", errors=runner.errors, stats=dict(node.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
