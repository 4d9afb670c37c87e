"""Shared pytest fixtures: the MicroPython runner and the repository's paths."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hil import micropython

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def mpy() -> Callable[..., micropython.Result]:
    """Run source code under real MicroPython with firmware/lib importable.

    `mpy(code, fs_dir=..., heap=...)` returns a `Result`; `.check()` raises with
    the script's output when it failed.
    """
    try:
        micropython.command(Path("x.py"))
    except micropython.MicroPythonUnavailable as exc:  # pragma: no cover - setup problem
        pytest.fail(f"MicroPython runtime missing: {exc}")
    return micropython.run_code


@pytest.fixture
def mosquitto_factory(tmp_path_factory: pytest.TempPathFactory):
    """Start real Mosquitto brokers (TLS, passwords, ACL); all are stopped after the test.

    `broker = mosquitto_factory(users={"m1": "pw"}, acl="...")` returns a started
    `hil.broker.MosquittoBroker`.
    """
    from hil.broker import MosquittoBroker

    brokers: list[MosquittoBroker] = []

    def start(**kwargs: object) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), **kwargs)  # type: ignore[arg-type]
        brokers.append(broker)
        return broker.start()

    yield start
    for broker in brokers:
        broker.kill()
