"""Fixtures for the edge agent tests (helpers live in agent_site.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_site import AgentProcess, Site

from hil.broker import MosquittoBroker


@pytest.fixture
def make_site(tmp_path: Path, mosquitto_factory) -> Callable[..., Site]:
    """`make_site(configure, **broker_options)`: build a Site, let `configure(site)` add meters,
    start the broker (`broker_options` go to hil.broker.MosquittoBroker)."""

    def build(configure=lambda site: None, **broker_options) -> Site:  # type: ignore[no-untyped-def]
        placeholder = MosquittoBroker.__new__(MosquittoBroker)
        site = Site(tmp_path / "site", placeholder)
        configure(site)
        users, acl = site.broker_users()
        site.broker = mosquitto_factory(users=users, acl=acl, **broker_options)
        site.write()
        return site

    return build


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()
