"""Exhaustive mode in CI: every point of `exhaustive.choices()` (n = 3, one view change)."""

from __future__ import annotations

import pytest

from tests.consensus.exhaustive import Choice, build_choice, choices
from tests.consensus.scenarios import PropertyViolation, check
from tests.consensus.test_random_schedules import report, run_all

CHUNKS = 4
ALL = list(choices())


def _choice(choice: Choice) -> str | None:
    try:
        check(build_choice(choice))
    except PropertyViolation as exc:
        return f"{choice.describe()}\n{exc}"
    return None


def test_the_space_is_what_the_module_says() -> None:
    assert len(ALL) == len(set(ALL)) == 5_184


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_every_choice_of_the_bounded_adversary(chunk: int) -> None:
    part = ALL[chunk::CHUNKS]
    failures = run_all(part, _choice)
    assert not failures, report(failures, len(part))


def test_the_review_s_finding_1_is_a_point_of_the_space() -> None:
    """n1 blames view 0 without evidence, then gets X and Y; n2 gets A just before its
    deadline and treats it as final; the old node then committed a fresh value in view 1."""
    attack = Choice("XY", "deadline+1", False, "A", "deadline-1", False, False, 1)
    assert attack in ALL
    built = build_choice(attack)
    check(built)
    n1 = built.sim.instances["n1"].node
    assert n1.stats["equivocation"] >= 1  # type: ignore[attr-defined]
