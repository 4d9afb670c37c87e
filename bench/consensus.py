"""`meterchain bench consensus`: SDBFT rounds over a real Mosquitto on loopback, PBFT as anchor.

Ours: n consensus nodes (n in 3, 7, 15, 31; ``--quick``: 3 and 7), each an
OS process of its own (as each agent is a service on its own controller)
with its own paho client (TLS, its own credentials and ACL), key, keyring
and fsynced round log, on a real Mosquitto on 127.0.0.1 that sets
TCP_NODELAY; all of them share this machine's cores. Every round all nodes
open at once, submit a request and agree on a trivial contract (`Tally`);
the round's latency is the time from the open until every node has
committed (treats the result as final: 2 delta after its vote with every
member's vote and no conflicting proposal seen). Reported per n and value
size:
`messages_per_round` (MQTT publishes by the consensus nodes, averaged over
the fault-free rounds -- no blame, no late certificate -- n requests + 1
proposal + n-1 votes + up to n finality attestations, so at most 3n),
`deliveries_per_round` (messages the nodes received from each other, same
rounds), `p50_ms`/`p99_ms` over all rounds, the delta used (10 ms on
loopback up to n = 7; larger n need a larger delta because the machine's two
cores then do the work of n controllers: every node checks every signature
and parses every message itself) and `view_changes`, the rounds where a
delay exceeded delta on this machine and a change of primary was needed
(their latency is in p99); `fault_free_rounds` counts the rounds that took
the fault-free path. The README's performance table has the figures and the
load they were measured under; under a load of 3-4 from other jobs delays
exceed 10 ms and some rounds need a change of primary (p50 up to about
100 ms).

Anchor, same run, like with like: the normal case of PBFT (pre-prepare
carrying the request set it orders, as SDBFT's proposal carries its value;
all-to-all prepare, all-to-all commit; `edge_agent.consensus.sim.PbftNode`,
its decision counted as its commit) run by the same worker processes through
the same `NodeRunner`, broker, TLS, keys and requests, under `pbft_same_broker`:
publishes, deliveries, bytes published and bytes delivered per fault-free
round, measured the same way as SDBFT's (`bytes_*` count whole MQTT payloads,
requests included). Every size runs twice: with a small value (one integer
per request) and with a ~50 KB value (`value_bytes`: the size of a real
clearing, as padding in the n requests that the `Tally` contract ignores).
`*_ratio_to_pbft` compare the two. SDBFT's votes and finals carry digests
and the primary's signed header, so the value travels once, in the proposal,
like PBFT's pre-prepare (SDBFT's members also relay the bids they held when
they opened, in their own request). Both protocols send 2n consensus
publishes per fault-free round besides the n requests (a proposal, n-1 votes
or prepares, n finals or commits), so deliveries are equal: O(n) is the
fault-free figure for publishes on a broker, and point to point both are
O(n^2). `fault_free_rounds` took the fast path (every member's vote within
2 delta of one's own); `slow_path_rounds` had no blame but a late vote, so a
QC was forwarded (`cert`) and the commit came one delta later; neither
counts as a view change. `sdbft_sim_p2p_per_round`/`pbft_sim_p2p_per_round`
repeat the count in the deterministic simulator (consensus messages only, no
requests).

Change of primary: one extra round per n with the view-0 primary killed (-9);
`primary_crash_recovery_ms` is the time from the backups' view-0 deadline
(4 delta + 2 ms after the open, when they detect the crash) until every live
node has committed under the next primary; the target is 2 delta + one
fault-free round (p50).
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

N_FULL = (3, 7, 15, 31)
N_QUICK = (3, 7)
DELTA_MS = {3: 10, 7: 10, 15: 300, 31: 1500}
TARGET_P50_MS = {7: 50.0}
# the round's value: small (one integer per request) and the size of a real clearing
# (~50 KB, spread over the n requests as padding the Tally contract ignores)
VALUE_SIZES = (0, 50_000)
# transport counters summed over the nodes -> per-round figure names
FIGURES = {
    "publishes": "messages_per_round",
    "deliveries": "deliveries_per_round",
    "publish_bytes": "bytes_published_per_round",
    "delivery_bytes": "bytes_delivered_per_round",
}
REPO = Path(__file__).resolve().parents[1]


def _worker(argv: list[str]) -> int:
    """One benchmark node in its own process: commands on stdin, JSON events on stdout.

    Commands: `open SEQ`, `counts`, `stop`. Events carry `time.monotonic()`,
    which on Linux is one clock for every process of the machine.
    """
    import json
    import sys

    from edge_agent.consensus.contracts import Tally
    from edge_agent.consensus.messages import Decoder, RoundId
    from edge_agent.consensus.node import Node
    from edge_agent.consensus.signing import Keyring, p256_identities, public_keys
    from edge_agent.consensus.sim import PbftNode, membership_for
    from edge_agent.consensus.transport import MqttSettings, NodeRunner, open_store

    protocol, market, n_text, index_text, delta_text, pad_text, *link = argv
    host, port, ca_file, state_dir = link
    n, index, delta, pad = int(n_text), int(index_text), int(delta_text), int(pad_text)
    ids = [f"{market}-n{i}" for i in range(n)]
    node_id = ids[index]
    signers = p256_identities(ids, seed=n)
    membership = membership_for(market, public_keys(signers))
    lock = threading.Lock()

    def emit(**event: Any) -> None:
        with lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    store, records = open_store(state_dir)
    node: Any = Node(
        signers[node_id], Keyring(membership), {"settle": Tally()},
        delta_ms=delta, decoder=Decoder(), records=records,
    )  # fmt: skip
    if protocol == "pbft":  # the anchor on the same broker: its decision is its commit
        node = PbftNode(signers[node_id], Keyring(membership), delta)
    settings = MqttSettings(
        host, int(port), node_id, f"pw-{node_id}", ca_file, client_id=f"bench-{node_id}"
    )

    def on_final(f: Any) -> None:
        if protocol == "pbft":
            emit(ev="commit", seq=f.round.seq, view=0, t=time.monotonic())
        emit(ev="final", seq=f.round.seq, t=time.monotonic())

    runner = NodeRunner(
        node, store, settings,
        on_commit=lambda c: emit(ev="commit", seq=c.round.seq, view=c.view, t=time.monotonic()),
        on_final=on_final,
    )  # fmt: skip
    runner.start()
    emit(ev="ready")
    for line in sys.stdin:
        command = line.split()
        if command[0] == "open":
            seq = int(command[1])
            # `pad` bytes per request make the round's value the size of a real clearing
            # (Tally ignores non-integer bodies, so the result stays the same size)
            body = seq + index if not pad else {"n": seq + index, "pad": bytes(pad)}
            runner.open_round(RoundId(seq, "settle"), deposit=b"dep", body=body)
        elif command[0] == "counts":
            emit(ev="counts", **dict(runner.counts))
        elif command[0] == "stop":
            break
    runner.stop()
    emit(ev="stopped", errors=runner.errors)
    return 0


class _Cluster:
    """n node processes of one market on one broker (each agent is its own process, as on
    n machines; the machine's cores are still shared by all of them)."""

    def __init__(
        self,
        broker: Any,
        market: str,
        n: int,
        delta: int,
        workdir: Path,
        protocol: str = "sdbft",
        pad: int = 0,
    ) -> None:
        import json
        import queue
        import subprocess
        import sys

        self.n = n
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.commits: dict[tuple[int, int], float] = {}
        self.finals: dict[tuple[int, int], float] = {}
        self.views: dict[int, set[int]] = {}
        self.counts: dict[int, dict[str, int]] = {}
        self._cond = threading.Condition()
        self.procs = []
        for i in range(n):
            argv = [
                sys.executable, "-m", "bench.consensus", "--worker", protocol, market, str(n),
                str(i), str(delta), str(pad), broker.host, str(broker.port), str(broker.ca_file),
                str(workdir / f"{market}-n{i}"),
            ]  # fmt: skip
            proc = subprocess.Popen(
                argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            self.procs.append(proc)

            def read(proc: Any = proc, index: int = i) -> None:
                for line in proc.stdout:
                    event = json.loads(line)
                    with self._cond:
                        self._note(index, event)
                        self._cond.notify_all()

            threading.Thread(target=read, daemon=True).start()
        self.live = list(range(n))
        self._wait(lambda: all(self.counts.get(i) is not None for i in self.live), 60, "start")
        time.sleep(0.3)  # subscriptions settle

    def _note(self, index: int, event: dict[str, Any]) -> None:
        kind = event.pop("ev")
        if kind == "ready":
            self.counts[index] = {}
        elif kind == "commit":
            self.commits.setdefault((index, event["seq"]), event["t"])
            self.views.setdefault(event["seq"], set()).add(event["view"])
        elif kind == "final":
            self.finals.setdefault((index, event["seq"]), event["t"])
        elif kind == "counts":
            self.counts[index] = event

    def _wait(self, ready: Any, timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise RuntimeError(f"{what} did not finish in {timeout} s at n = {self.n}")

    def _send(self, index: int, command: str) -> None:
        stdin = self.procs[index].stdin
        assert stdin is not None
        stdin.write(command + "\n")
        stdin.flush()

    def run_round(self, seq: int, timeout: float = 20.0) -> tuple[float, float]:
        """(open time, time every live node committed); waits for every live node's final too."""
        start = time.monotonic()
        for i in self.live:
            self._send(i, f"open {seq}")
        self._wait(
            lambda: all((i, seq) in self.finals and (i, seq) in self.commits for i in self.live),
            timeout,
            f"round {seq}",
        )
        return start, max(self.commits[(i, seq)] for i in self.live)

    def totals(self) -> dict[str, int]:
        """Sums of every live node's transport counters (publishes, deliveries, per kind)."""
        for i in self.live:
            self.counts[i] = None  # type: ignore[assignment]
            self._send(i, "counts")
        self._wait(lambda: all(self.counts[i] is not None for i in self.live), 20, "counts")
        out: dict[str, int] = {}
        for i in self.live:
            for key, value in self.counts[i].items():
                out[key] = out.get(key, 0) + value
        return out

    def crash(self, index: int) -> None:
        self.procs[index].kill()
        self.procs[index].wait()
        self.live.remove(index)

    def close(self) -> None:
        for i in self.live:
            try:
                self._send(i, "stop")
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - a stuck worker is killed, never left behind
                proc.kill()


def _simulated_counts(n: int) -> dict[str, float]:
    """Point-to-point message counts of one fault-free round: PBFT and SDBFT, same simulator."""
    from edge_agent.consensus.contracts import Tally
    from edge_agent.consensus.messages import Decoder, RoundId
    from edge_agent.consensus.node import Node
    from edge_agent.consensus.signing import Keyring, hash_identities, public_keys
    from edge_agent.consensus.sim import PbftNode, Simulator, membership_for, node_names

    ids = node_names(n)
    signers = hash_identities(ids)
    membership = membership_for("m1", public_keys(signers))
    out = {}
    for name in ("pbft", "sdbft"):
        sim = Simulator(10, 1, decoder=Decoder())
        sim.link = lambda src, dst, data, now: 1
        keyring = Keyring(membership)
        for node_id in ids:
            if name == "pbft":
                machine: Any = PbftNode(signers[node_id], keyring, 10)
            else:
                machine = Node(
                    signers[node_id], keyring, {"settle": Tally()}, delta_ms=10, decoder=sim.decoder
                )
            sim.add(node_id, machine)
        for i, node_id in enumerate(ids):
            sim.open(0, node_id, {"round": RoundId(0, "settle"), "body": i})
        sim.run(1000)
        consensus = sum(v for k, v in sim.deliveries.items() if k != "req")
        out[f"{name}_p2p"] = consensus
        out[f"{name}_publishes"] = sum(v for k, v in sim.publishes.items() if k != "req")
    return out


def _fault_free(cluster: _Cluster, rounds: int, delta: int) -> dict[str, Any]:
    """Run rounds 1..rounds; latencies and per-round transport figures of fault-free rounds."""
    cluster.run_round(0)  # warm-up: connections, caches, first fsyncs
    latencies = []
    clean: list[dict[str, int]] = []  # transport counter deltas of fault-free rounds
    view_changes = slow_path = 0
    before = cluster.totals()
    for seq in range(1, rounds + 1):
        start, done = cluster.run_round(seq)
        latencies.append((done - start) * 1000)
        time.sleep(3 * delta / 1000)  # let late attestations land before the next round
        after = cluster.totals()
        view_changes += any(v > 0 for v in cluster.views.get(seq, ()))
        blames, certs = (
            after.get(k, 0) - before.get(k, 0) for k in ("publish_blame", "publish_cert")
        )
        if blames + certs == 0:  # the fault-free path
            clean.append({k: after.get(k, 0) - before.get(k, 0) for k in FIGURES})
        # no blame, but some vote came late (after a 2-delta window): the QC was forwarded
        slow_path += blames == 0 and certs > 0
        before = after

    def mean(key: str) -> float:
        return round(statistics.mean(c[key] for c in clean), 1) if clean else float("nan")

    return {
        "latencies": latencies,
        "fault_free_rounds": len(clean),
        "slow_path_rounds": slow_path,
        "view_changes": view_changes,
        **{name: mean(key) for key, name in FIGURES.items()},
    }


def _measure(
    broker: Any, n: int, rounds: int, workdir: Path, value_bytes: int = 0
) -> dict[str, Any]:
    """One size: SDBFT's fault-free rounds (and, small value only, a primary crash), then
    PBFT's on the same broker with the same requests."""
    from edge_agent.consensus.node import liveness_bound_ms

    delta = DELTA_MS[n]
    pad = value_bytes // n  # per request: the n requests make up the value
    tag = _market_tag(value_bytes)
    cluster = _Cluster(broker, f"b{tag}{n}", n, delta, workdir / f"b{tag}{n}", pad=pad)
    crash: dict[str, Any] = {}
    try:
        ours = _fault_free(cluster, rounds, delta)
        if not value_bytes:
            # change of primary: kill -9 the view-0 primary of the next round, then run it
            seq = rounds + 1
            cluster.crash(seq % n)
            start, done = cluster.run_round(seq, timeout=60)
            detect = start + (4 * delta + 2) / 1000
            crash = {
                "primary_crash_recovery_ms": round((done - detect) * 1000, 2),
                "primary_crash_views": sorted(cluster.views.get(seq, set())),
            }
    finally:
        cluster.close()
    # the anchor on the same broker, same requests, same signatures, same transport
    anchor_cluster = _Cluster(
        broker, f"p{tag}{n}", n, delta, workdir / f"p{tag}{n}", protocol="pbft", pad=pad
    )
    try:
        anchor = _fault_free(anchor_cluster, rounds, delta)
    finally:
        anchor_cluster.close()
    latencies = ours.pop("latencies")
    p50 = statistics.median(latencies)
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else latencies[0]
    anchor_p50 = statistics.median(anchor.pop("latencies"))
    publishes = ours["messages_per_round"]
    result = {
        "nodes": n,
        "value_bytes": value_bytes or "small",
        "delta_ms": delta,
        "rounds": rounds,
        **ours,
        "messages_limit_3n": 3 * n,
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "liveness_bound_ms": liveness_bound_ms(delta, 0),
        "pbft_same_broker": {**anchor, "p50_ms": round(anchor_p50, 2)},
        **{
            f"{figure}_ratio_to_pbft": round(ours[figure] / anchor[figure], 3)
            for figure in ("deliveries_per_round", "bytes_published_per_round",
                           "bytes_delivered_per_round")
        },
    }  # fmt: skip
    if not value_bytes:
        counts = _simulated_counts(n)
        result["pbft_sim_p2p_per_round"] = counts["pbft_p2p"]
        result["sdbft_sim_p2p_per_round"] = counts["sdbft_p2p"]
        result.update(crash)
        result["primary_crash_target_ms"] = round(2 * delta + p50, 2)
        if n in TARGET_P50_MS:
            result["p50_target_ms"] = TARGET_P50_MS[n]
    meets = publishes <= 3 * n
    if not value_bytes:
        meets = bool(
            meets
            and p50 <= TARGET_P50_MS.get(n, float("inf"))
            and crash["primary_crash_recovery_ms"] <= 2 * delta + p50
        )
    result["meets_targets"] = meets
    return result


def _market_tag(value_bytes: int) -> str:
    return "v" if value_bytes else ""


def run(quick: bool) -> dict[str, Any]:
    from hil.broker import MosquittoBroker
    from meterchain.mqtt_auth import node_acl

    sizes = N_QUICK if quick else N_FULL
    rounds = {3: 30, 7: 30, 15: 8, 31: 4} if not quick else {3: 10, 7: 10, 15: 4, 31: 2}
    with tempfile.TemporaryDirectory(prefix="bench-consensus-") as tmp:
        workdir = Path(tmp)
        users, acl = {}, ""
        for n in sizes:
            for i in range(n):
                for value_bytes in VALUE_SIZES:
                    for prefix in ("b", "p"):  # SDBFT's market and the PBFT anchor's
                        market = f"{prefix}{_market_tag(value_bytes)}{n}"
                        node_id = f"{market}-n{i}"
                        users[node_id] = f"pw-{node_id}"
                        acl += node_acl(market, node_id)
        with MosquittoBroker(workdir / "broker", users=users, acl=acl) as broker:
            results = [
                _measure(broker, n, rounds[n], workdir, value_bytes)
                for value_bytes in VALUE_SIZES
                for n in sizes
            ]
    return {
        "unit": "ms",
        "note": (
            "messages_per_round counts MQTT publishes (O(n) in the fault-free round); "
            "deliveries and the point-to-point counts are O(n^2) for both protocols; "
            "bytes_* are whole MQTT payloads per fault-free round, requests included"
        ),
        "results": results,
        "meets_targets": all(r["meets_targets"] for r in results),
    }


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: meterchain bench consensus [--json] [--quick]")
