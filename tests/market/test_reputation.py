"""Reputation scores, credit grades, bonds and sanctions (M18)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterchain.market import reputation as rp
from meterchain.market.errors import MarketError
from meterchain.market.reputation import (
    BondCall,
    Expelled,
    Fined,
    Participant,
    Rated,
    Reinstated,
    ReputationBook,
    ReputationPolicy,
    Standing,
    Warned,
)

POLICY = ReputationPolicy()


def book_with(*names: str, bond: int = 0) -> ReputationBook:
    book = ReputationBook()
    for name in names:
        book, _ = rp.register(book, name)
        if bond:
            book, _ = rp.post_bond(book, name, bond)
    return book


def trade_and_rate(book: ReputationBook, trade_id: str, stars_for_seller: int, stars_for_buyer=5):
    """bob buys from sue; bob rates sue, sue rates bob. Returns (book, events about sue)."""
    book, _ = rp.record_trade(book, trade_id, "bob", "sue")
    book, events = rp.rate(book, trade_id, "bob", stars_for_seller)
    book, _ = rp.rate(book, trade_id, "sue", stars_for_buyer)
    return book, events


def test_newcomer_score_grade_and_bond() -> None:
    book = book_with("bob")
    # Prior 3 stars -> 800 * (3000 - 1000) / 4000 = 400 rating points, no activity.
    assert rp.standing_of(book, "bob") == (400, "C", 1_000_000)
    assert not rp.may_trade(book, "bob")
    book, (posted,) = rp.post_bond(book, "bob", 1_000_000)
    assert posted.bond == 1_000_000 and rp.may_trade(book, "bob")


def test_score_by_hand_after_ratings_and_trades() -> None:
    p = Participant("x", ratings=5, stars=25, trades=10)
    # quality = (5*3000 + 25000) / 10 = 4000 milli-stars -> 800*3000/4000 = 600;
    # activity = 200 * 10 / 20 = 100.
    assert rp.score(POLICY, p) == 700
    assert rp.grade(POLICY, 700) == "B"


def test_good_ratings_and_activity_raise_the_score() -> None:
    book = book_with("bob", "sue")
    before = rp.standing_of(book, "sue")[0]
    book, events = trade_and_rate(book, "t1", 5)
    rated = events[0]
    assert isinstance(rated, Rated) and rated.ratee == "sue" and rated.stars == 5
    assert rated.score > before
    book2, _ = rp.record_trade(book, "t2", "bob", "sue")  # activity alone
    assert rp.standing_of(book2, "sue")[0] > rp.standing_of(book, "sue")[0]
    for i in range(40):
        book, _ = trade_and_rate(book, f"u{i}", 5)
    score, letter, bond = rp.standing_of(book, "sue")
    assert letter == "A" and score <= rp.SCORE_MAX
    assert bond == 500_000  # grade A posts half the base bond


def test_better_grades_post_smaller_bonds() -> None:
    bonds = [rp.required_bond(POLICY, g) for g in rp.GRADES]
    assert bonds == sorted(bonds) and len(set(bonds)) == len(bonds)
    assert [rp.grade(POLICY, s) for s in (1000, 800, 799, 650, 400, 250, 249, 0)] == [
        "A",
        "A",
        "B",
        "B",
        "C",
        "D",
        "E",
        "E",
    ]


def test_low_reputation_is_warned_then_fined_then_expelled() -> None:
    book = book_with("bob", "sue", bond=1_000_000)
    seen: list[object] = []
    for i in range(12):
        book, events = trade_and_rate(book, f"t{i}", 1)
        seen.extend(e for e in events if not isinstance(e, Rated | BondCall))
        if book.participants["sue"].standing == Standing.EXPELLED:
            break
    kinds = [type(e).__name__ for e in seen]
    assert kinds[0] == "Warned"
    assert "Fined" in kinds
    assert kinds[-1] == "Expelled"
    fines = [e for e in seen if isinstance(e, Fined)]
    sue = book.participants["sue"]
    assert sue.standing == Standing.EXPELLED and sue.fines == len(fines)
    assert book.fines_collected == sum(f.amount for f in fines)
    assert sue.bond == 1_000_000 - book.fines_collected
    assert not rp.may_trade(book, "sue")
    with pytest.raises(rp.ParticipantExpelled):
        rp.record_trade(book, "later", "bob", "sue")


def test_exact_sanction_sequence_by_hand() -> None:
    book = book_with("bob", "sue", bond=1_000_000)
    # One 1-star rating: quality (15000+1000)/6 = 2666 -> 333; activity 200*1/11 = 18 -> 351.
    book, events = trade_and_rate(book, "t0", 1)
    assert events[0].score == 351 and len(events) == 2 and isinstance(events[1], BondCall)
    assert events[1].grade == "D" and events[1].required == 1_500_000
    # Second: quality (15000+2000)/7 = 2428 -> 285; activity 200*2/12 = 33 -> 318: warned.
    book, events = trade_and_rate(book, "t1", 1)
    assert events[0].score == 318 and isinstance(events[1], Warned)
    # Third: (15000+3000)/8 = 2250 -> 250; activity 46 -> 296, still above the fine line.
    book, events = trade_and_rate(book, "t2", 1)
    assert events[0].score == 296 and not any(isinstance(e, Fined) for e in events)
    # Fourth: (15000+4000)/9 = 2111 -> 222; activity 57 -> 279. Fifth: 2000 -> 200 + 66 = 266.
    book, _ = trade_and_rate(book, "t3", 1)
    book, _ = trade_and_rate(book, "t4", 1)
    # Sixth: (15000+6000)/11 = 1909 -> 181; activity 75 -> 256. Seventh: 1833 -> 166 + 82 = 248.
    book, _ = trade_and_rate(book, "t5", 1)
    book, events = trade_and_rate(book, "t6", 1)
    assert events[0].score == 248
    assert events[1] == Fined("sue", 100_000, 900_000)


def test_reinstated_after_recovering() -> None:
    book = book_with("bob", "sue", bond=2_000_000)
    book, _ = trade_and_rate(book, "t0", 1)
    book, events = trade_and_rate(book, "t1", 1)
    assert any(isinstance(e, Warned) for e in events)
    for i in range(10):
        book, events = trade_and_rate(book, f"g{i}", 5)
        if any(isinstance(e, Reinstated) for e in events):
            break
    assert book.participants["sue"].standing == Standing.ACTIVE
    assert book.participants["sue"].warnings == 1


def test_expelled_when_the_bond_cannot_cover_a_fine() -> None:
    policy = ReputationPolicy(fine_below=400, warn_below=400, expel_below=0, fine=300)
    book = ReputationBook(policy=policy)
    for name in ("bob", "sue"):
        book, _ = rp.register(book, name)
    book, _ = rp.post_bond(book, "sue", 500)
    book, events = trade_and_rate(book, "t0", 1)
    assert Fined("sue", 300, 200) in events
    book, events = trade_and_rate(book, "t1", 1)
    assert Fined("sue", 200, 0) in events
    assert isinstance(events[-1], Expelled) and events[-1].why == "bond exhausted by fines"
    assert book.fines_collected == 500


def test_rating_errors() -> None:
    book = book_with("bob", "sue", "eve")
    book, _ = rp.record_trade(book, "t1", "bob", "sue")
    cases = [
        (lambda: rp.rate(book, "t9", "bob", 5), rp.UnknownTrade),
        (lambda: rp.rate(book, "t1", "eve", 5), rp.NotAParty),
        (lambda: rp.rate(book, "t1", "bob", 0), rp.InvalidRating),
        (lambda: rp.rate(book, "t1", "bob", 6), rp.InvalidRating),
        (lambda: rp.record_trade(book, "t1", "bob", "sue"), rp.DuplicateTrade),
        (lambda: rp.record_trade(book, "t2", "bob", "bob"), rp.ReputationError),
        (lambda: rp.record_trade(book, "t2", "bob", "zed"), rp.UnknownParticipant),
        (lambda: rp.register(book, "bob"), rp.AlreadyRegistered),
        (lambda: rp.post_bond(book, "bob", 0), rp.ReputationError),
    ]
    for call, error in cases:
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, MarketError)
    book, _ = rp.rate(book, "t1", "bob", 4)
    with pytest.raises(rp.AlreadyRated):
        rp.rate(book, "t1", "bob", 4)
    book, _ = rp.rate(book, "t1", "sue", 4)
    assert "t1" not in book.trades  # both sides rated: the slot is closed


def test_transitions_do_not_touch_their_input() -> None:
    book = book_with("bob", "sue", bond=10)
    book, _ = rp.record_trade(book, "t1", "bob", "sue")
    before = (dict(book.participants), dict(book.trades), book.fines_collected)
    rp.rate(book, "t1", "bob", 1)
    assert (dict(book.participants), dict(book.trades), book.fines_collected) == before


def test_bad_policies_are_refused() -> None:
    with pytest.raises(rp.ReputationError):
        ReputationPolicy(rating_points=900)
    with pytest.raises(rp.ReputationError):
        ReputationPolicy(bond_percent=(200, 150, 100, 75, 50))
    with pytest.raises(rp.ReputationError):
        ReputationPolicy(expel_below=500)


@given(st.lists(st.integers(1, 5), max_size=60), st.integers(0, 500))
@settings(max_examples=60, deadline=None)
def test_score_is_bounded_and_monotone_in_each_new_rating(ratings, trades) -> None:
    p = Participant("x", ratings=len(ratings), stars=sum(ratings), trades=trades)
    s = rp.score(POLICY, p)
    assert 0 <= s < rp.SCORE_MAX
    best = Participant("x", ratings=p.ratings + 1, stars=p.stars + 5, trades=trades)
    worst = Participant("x", ratings=p.ratings + 1, stars=p.stars + 1, trades=trades)
    assert rp.score(POLICY, worst) <= s <= rp.score(POLICY, best)
    busier = Participant("x", ratings=p.ratings, stars=p.stars, trades=trades + 1)
    assert rp.score(POLICY, busier) >= s


def test_admitted_set_follows_bonds_and_expulsion() -> None:
    book = book_with("bob", "sue", "eve")
    book, _ = rp.post_bond(book, "bob", 1_000_000)
    book, _ = rp.post_bond(book, "sue", 999_999)
    assert rp.admitted(book) == frozenset({"bob"})
