"""Three agents clear an hour through SDBFT over a real Mosquitto and each executes its own line."""

from __future__ import annotations

import asyncio
from pathlib import Path

from consensus_site import round_driver, write_site

from edge_agent import config as agent_config
from edge_agent.bid import build_market
from edge_agent.consensus_clearing import clearing_round, start_consensus
from edge_agent.energy import HOUR_S
from edge_agent.forecast import HourlyProfile
from meterchain.keys import PrivateKey
from meterchain.mqtt_auth import node_acl
from meterchain.quorum import Member, Membership

NODES = ("mg1", "mg2", "mg3")
NOON = 1_700_049_600  # 2023-11-15T12:00Z

# mg1 has far more sun than it needs; mg2 and mg3 need green power it can sell.
PROFILES = {
    "mg1": HourlyProfile((9000,) * 24, (2000,) * 24),
    "mg2": HourlyProfile((500,) * 24, (4000,) * 24),
    "mg3": HourlyProfile((0,) * 24, (3000,) * 24),
}


def test_agents_clear_together_and_execute_their_own_lines(
    tmp_path: Path, mosquitto_factory
) -> None:
    keys = {node: PrivateKey.generate() for node in NODES}
    broker = mosquitto_factory(
        users={n: f"pw-{n}" for n in NODES}, acl="".join(node_acl("m1", n) for n in NODES)
    )
    membership = Membership("m1", 1, tuple(Member(n, keys[n].public_key()) for n in NODES))
    membership_file = tmp_path / "membership.toml"
    membership_file.write_text(membership.signed_by(PrivateKey.generate()).to_toml())
    configs = [
        agent_config.load(
            write_site(
                tmp_path / n, n, keys[n], broker.url, str(broker.ca_file),
                f'role = "node"\nmembership = "{membership_file}"', delta_s=0.05,
            )
        )
        for n in NODES
    ]  # fmt: skip
    primary_changes: list[str] = []

    async def scenario() -> list:
        drivers, clearings = [], []
        for cfg in configs:
            node_id = cfg.agent.node_id
            clearing = start_consensus(
                cfg,
                build_market(cfg.market),
                on_primary_change=lambda n=node_id: primary_changes.append(n),
            )
            clearings.append(clearing)
            drivers.append(round_driver(cfg, clearing, PROFILES[node_id], NOON))
        try:
            return list(await asyncio.gather(*(d.prepare(NOON) for d in drivers)))
        finally:
            for clearing in clearings:
                clearing.runner.stop()

    outcomes = asyncio.run(scenario())
    assert all(not o.error for o in outcomes), [o.error for o in outcomes]
    results = [o.result for o in outcomes]
    assert len({r.digest for r in results}) == 1  # one committed result for everyone
    result = results[0]
    assert result.microgrids == NODES and result.periods == 12
    executed = result.executed[0]
    assert executed.trades, "mg1's surplus sun should be sold to its neighbours"
    assert {t.seller for t in executed.trades} == {"mg1"}
    assert sum(executed.payments) == 0 and executed.individually_rational
    for node_id, outcome in zip(NODES, outcomes, strict=True):
        assert outcome.dispatch == executed.dispatch[result.index_of(node_id)]
    assert primary_changes == []  # fault-free: view 0 all the way
    assert clearing_round(NOON).kind == "clear-12"
    assert clearing_round(NOON + HOUR_S).seq == clearing_round(NOON).seq + 1
