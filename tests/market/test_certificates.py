"""Green certificates (M22): issuance from readings, traceability, retirement, quota, market."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterchain.keys import PrivateKey
from meterchain.market import certificates as gc
from meterchain.market import listing as lm
from meterchain.market.certificates import (
    CertificateRegistry,
    Issued,
    MeteredGeneration,
    QuotaPolicy,
    ReadingShare,
)
from meterchain.market.errors import MarketError
from meterchain.reading import FLAG_COUNTER_RESET, sign_reading
from meterchain.reading import verify as verify_reading
from meterchain.registry import Registry as MeterRegistry

MWH = 1_000_000


def digest(meter: str, seq: int) -> bytes:
    return hashlib.sha256(f"{meter}/{seq}".encode()).digest()


def reading(meter: str, seq: int, wh: int, source: str = "pv") -> MeteredGeneration:
    return MeteredGeneration(meter, seq, digest(meter, seq), wh, source)


def registry(**meters: tuple[str, str]) -> CertificateRegistry:
    reg = CertificateRegistry()
    for meter_id, (owner, source) in sorted(meters.items()):
        reg, _ = gc.register_meter(reg, meter_id, owner, source)
    return reg


def test_issue_one_certificate_per_mwh_with_carry_over() -> None:
    reg = registry(pv1=("gen", "pv"))
    reg, events = gc.issue(
        reg, [reading("pv1", 1, 400_000), reading("pv1", 2, 400_000), reading("pv1", 3, 300_000)]
    )
    (issued,) = events
    cert = issued.certificate
    assert (cert.cert_id, cert.owner, cert.source, cert.energy_wh) == ("pv1-1", "gen", "pv", MWH)
    assert cert.readings == (
        ReadingShare(digest("pv1", 1), 1, 400_000),
        ReadingShare(digest("pv1", 2), 2, 400_000),
        ReadingShare(digest("pv1", 3), 3, 200_000),
    )
    account = reg.accounts["pv1"]
    assert account.carry_wh == 100_000 and account.last_seq == 3
    # The remainder of reading 3 plus the next reading make the second certificate.
    reg, events = gc.issue(reg, [reading("pv1", 4, 2_950_000)])
    assert [e.certificate.cert_id for e in events] == ["pv1-2", "pv1-3", "pv1-4"]
    assert events[0].certificate.readings == (
        ReadingShare(digest("pv1", 3), 3, 100_000),
        ReadingShare(digest("pv1", 4), 4, 900_000),
    )
    assert reg.accounts["pv1"].carry_wh == 50_000
    assert gc.trace(reg, "pv1-2") == events[0].certificate.readings


def test_certificates_by_source_type_and_configurable_unit() -> None:
    reg = CertificateRegistry(unit_wh=1000)
    reg, _ = gc.register_meter(reg, "w1", "windco", "wind")
    reg, _ = gc.register_meter(reg, "h1", "hydroco", "hydro")
    reg, events = gc.issue(reg, [reading("w1", 1, 2500, "wind"), reading("h1", 1, 1000, "hydro")])
    by_source = defaultdict(list)
    for e in events:
        by_source[e.certificate.source].append(e.certificate.cert_id)
    assert dict(by_source) == {"wind": ["w1-1", "w1-2"], "hydro": ["h1-1"]}


def test_bad_readings_refuse_the_whole_batch() -> None:
    reg = registry(pv1=("gen", "pv"))
    reg, _ = gc.issue(reg, [reading("pv1", 5, 10)])
    cases = [
        (reading("pv1", 5, 10), gc.ReadingAlreadyCounted),
        (reading("pv1", 4, 10), gc.ReadingAlreadyCounted),
        (reading("pv9", 1, 10), gc.UnregisteredMeter),
        (reading("pv1", 6, 10, source="wind"), gc.WrongSource),
        (MeteredGeneration("pv1", 6, b"", 10, "pv"), gc.BadRecord),
        (MeteredGeneration("pv1", 6, b"d", -1, "pv"), gc.BadRecord),
    ]
    for bad, error in cases:
        with pytest.raises(error) as info:
            gc.issue(reg, [reading("pv1", 6, MWH), bad])
        assert isinstance(info.value, MarketError)
    assert reg.accounts["pv1"].last_seq == 5 and not reg.certificates


def test_only_renewable_meters_register() -> None:
    with pytest.raises(gc.NotRenewable):
        gc.register_meter(CertificateRegistry(), "gt1", "gasco", "gas")
    reg = registry(pv1=("gen", "pv"))
    with pytest.raises(gc.CertificateError):
        gc.register_meter(reg, "pv1", "other", "pv")


@given(st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_every_wh_is_traceable_and_nothing_is_lost(seed) -> None:
    rng = random.Random(seed)
    reg = CertificateRegistry(unit_wh=rng.choice([1000, 7919, 50_000]))
    meters = ["m1", "m2", "m3"]
    for m in meters:
        reg, _ = gc.register_meter(reg, m, f"own-{m}", "wind")
    records = []
    seqs = dict.fromkeys(meters, 0)
    for _ in range(rng.randint(1, 40)):
        m = rng.choice(meters)
        seqs[m] += rng.randint(1, 3)
        records.append(reading(m, seqs[m], rng.choice([0, rng.randint(1, 120_000)]), "wind"))
    # Feed the records in a few batches.
    cut = sorted(rng.sample(range(len(records) + 1), 2))
    for batch in (records[: cut[0]], records[cut[0] : cut[1]], records[cut[1] :]):
        reg, _ = gc.issue(reg, batch)
    traced: dict[bytes, int] = defaultdict(int)
    for cert in reg.certificates.values():
        assert sum(s.energy_wh for s in cert.readings) == reg.unit_wh == cert.energy_wh
        for share in cert.readings:
            traced[share.digest] += share.energy_wh
    for m in meters:
        account = reg.accounts[m]
        assert account.carry_wh < reg.unit_wh
        for share in account.carry:
            traced[share.digest] += share.energy_wh
        produced = sum(r.energy_wh for r in records if r.meter_id == m)
        issued = sum(c.energy_wh for c in reg.certificates.values() if c.meter_id == m)
        assert produced == issued + account.carry_wh
    assert dict(traced) == {r.digest: r.energy_wh for r in records if r.energy_wh}


def issued_registry() -> CertificateRegistry:
    reg = registry(pv1=("gen", "pv"))
    reg, _ = gc.issue(reg, [reading("pv1", 1, 5 * MWH)])
    return reg


def test_transfer_and_single_retirement() -> None:
    reg = issued_registry()
    reg, events = gc.transfer(reg, "pv1-1", "gen", "acme")
    assert events == (gc.Transferred("pv1-1", "gen", "acme"),)
    with pytest.raises(gc.NotCertificateOwner):
        gc.transfer(reg, "pv1-1", "gen", "acme")
    reg, events = gc.retire(reg, "pv1-1", "acme", 7)
    assert events == (gc.Retired("pv1-1", "acme", 7),)
    assert reg.certificates["pv1-1"].retired
    with pytest.raises(gc.AlreadyRetired):
        gc.retire(reg, "pv1-1", "acme", 7)
    with pytest.raises(gc.CertificateRetired):
        gc.transfer(reg, "pv1-1", "acme", "gen")
    with pytest.raises(gc.UnknownCertificate):
        gc.retire(reg, "pv1-99", "gen", 7)
    with pytest.raises(gc.CertificateError):
        gc.transfer(reg, "pv1-2", "gen", "gen")
    assert [c.cert_id for c in reg.holdings("gen")] == ["pv1-2", "pv1-3", "pv1-4", "pv1-5"]
    assert reg.holdings("acme") == ()


def test_quota_shortfall_is_fined() -> None:
    reg = issued_registry()
    policy = QuotaPolicy(share_num=3, share_den=10, fine_per_certificate=800_000)
    for cert_id in ("pv1-1", "pv1-2"):
        reg, _ = gc.transfer(reg, cert_id, "gen", "acme")
        reg, _ = gc.retire(reg, cert_id, "acme", 7)
    # 10 MWh consumed at 30 %: 3 MWh needed, 2 retired -> 1 certificate short.
    result = gc.compliance(reg, "acme", 7, 10 * MWH, policy)
    assert (result.required_wh, result.covered_wh, result.shortfall_wh) == (3 * MWH, 2 * MWH, MWH)
    assert (result.shortfall_certificates, result.fine) == (1, 800_000)
    # A part certificate short still costs a whole one; retirements for other periods do not count.
    part = gc.compliance(reg, "acme", 7, 10 * MWH + 1, policy)
    assert part.required_wh == 3 * MWH + 1 and part.shortfall_certificates == 2
    assert gc.compliance(reg, "acme", 8, 10 * MWH, policy).covered_wh == 0
    reg, (assessed,) = gc.assess(reg, "acme", 7, 10 * MWH, policy)
    assert assessed.compliance == result
    with pytest.raises(gc.AlreadyAssessed):
        gc.assess(reg, "acme", 7, 10 * MWH, policy)
    with pytest.raises(gc.CertificateError):
        QuotaPolicy(share_num=11, share_den=10, fine_per_certificate=1)


# --- one-way certificate market -----------------------------------------------------------


def market_with_offer():
    market = gc.certificate_market(issued_registry())
    market, _ = gc.deposit(market, time=1, seq=1, party="acme", amount=10_000_000)
    market, events = gc.offer_certificates(
        market,
        time=10,
        seq=1,
        seller="gen",
        cert_ids=["pv1-1", "pv1-2", "pv1-3"],
        price=900_000,
        period=5,
    )
    return market, events


def test_shortfall_covered_by_buying_on_the_one_way_market() -> None:
    market, events = market_with_offer()
    assert isinstance(events[0], lm.Listed) and events[0].listing.quantity == 3
    assert market.registry.certificates["pv1-1"].on_offer == "L1"
    market, events = gc.buy_certificates(
        market, time=20, seq=1, buyer="acme", listing_id="L1", count=2
    )
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["Taken", "Settled", "Transferred", "Transferred"]
    assert dict(events[0].flows) == {lm.ESCROW: 1_800_000, "acme": -1_800_000}
    assert dict(events[1].flows) == {lm.ESCROW: -1_800_000, "gen": 1_800_000}
    reg = market.registry
    assert [c.cert_id for c in reg.holdings("acme")] == ["pv1-1", "pv1-2"]
    assert all(c.on_offer is None for c in reg.holdings("acme"))
    assert market.book.balance("gen") == 1_800_000
    assert market.book.balance("acme") == 10_000_000 - 1_800_000
    assert market.book.escrowed() == 0  # certificates settle on take
    policy = QuotaPolicy(share_num=1, share_den=5, fine_per_certificate=2_000_000)
    for cert_id in ("pv1-1", "pv1-2"):
        reg, _ = gc.retire(reg, cert_id, "acme", 3)
    reg, (assessed,) = gc.assess(reg, "acme", 3, 10 * MWH, policy)
    assert assessed.compliance.fine == 0


def test_certificates_on_offer_are_locked_until_sold_cancelled_or_expired() -> None:
    market, _ = market_with_offer()
    with pytest.raises(gc.CertificateOnOffer):
        gc.transfer(market.registry, "pv1-3", "gen", "x")
    with pytest.raises(gc.CertificateOnOffer):
        gc.retire(market.registry, "pv1-3", "gen", 1)
    with pytest.raises(gc.CertificateOnOffer):
        gc.offer_certificates(
            market, time=11, seq=1, seller="gen", cert_ids=["pv1-3"], price=1, period=5
        )
    cancelled, events = gc.cancel_offer(market, time=12, seq=1, seller="gen", listing_id="L1")
    assert events[0].status == lm.ListingStatus.CANCELLED
    assert all(c.on_offer is None for c in cancelled.registry.certificates.values())
    gc.transfer(cancelled.registry, "pv1-3", "gen", "x")
    expired, events = gc.tick(market, time=5 * 3600, seq=1)
    assert events[0].status == lm.ListingStatus.EXPIRED and not expired.offers
    assert all(c.on_offer is None for c in expired.registry.certificates.values())
    with pytest.raises(lm.ListingExpired):
        gc.buy_certificates(expired, time=5 * 3600, seq=2, buyer="acme", listing_id="L1", count=1)


def test_only_renewable_generators_list_and_only_sell_listings_exist() -> None:
    market, _ = market_with_offer()
    reg, _ = gc.transfer(market.registry, "pv1-4", "gen", "trader")
    market = gc.CertificateMarket(reg, market.book, market.offers)
    with pytest.raises(gc.NotAGenerator):
        gc.offer_certificates(
            market, time=11, seq=1, seller="trader", cert_ids=["pv1-4"], price=1, period=5
        )
    with pytest.raises(gc.NotCertificateOwner):
        gc.offer_certificates(
            market, time=11, seq=1, seller="gen", cert_ids=["pv1-4"], price=1, period=5
        )
    with pytest.raises(lm.InvalidRequest):
        lm.apply(market.book, lm.PostListing(11, 1, "acme", lm.Side.BUY, 5, 1, 1))
    with pytest.raises(lm.OverTake):
        gc.buy_certificates(market, time=11, seq=1, buyer="acme", listing_id="L1", count=4)
    with pytest.raises(lm.InsufficientFunds):
        gc.buy_certificates(market, time=11, seq=1, buyer="poor", listing_id="L1", count=1)
    with pytest.raises(lm.SelfTake):
        gc.buy_certificates(market, time=11, seq=1, buyer="gen", listing_id="L1", count=1)


def test_issued_events_name_their_readings() -> None:
    reg = registry(pv1=("gen", "pv"))
    _, events = gc.issue(reg, [reading("pv1", 1, MWH)])
    assert isinstance(events[0], Issued)
    assert events[0].certificate.readings == (ReadingShare(digest("pv1", 1), 1, MWH),)


# --- from real signed readings ------------------------------------------------------------


def test_issue_from_verified_signed_readings() -> None:
    key = PrivateKey.generate()
    meters = MeterRegistry()
    meters.add("pv7", key.public_key().point, "gen", "pv")
    registers = [5_000_000, 5_600_000, 6_300_000, 6_300_000, 250_000, 1_400_000]
    flags = [0, 0, 0, 0, FLAG_COUNTER_RESET, 0]
    verified = [
        verify_reading(
            sign_reading(key, "pv7", seq, 1_700_000_000 + 900 * seq, 0, wh, 1000, flag, "pv"),
            meters,
        )
        for seq, (wh, flag) in enumerate(zip(registers, flags, strict=True), start=1)
    ]
    reg = registry(pv7=("gen", "pv"))
    reg, events = gc.issue_from_readings(reg, verified[:3])
    # The first reading is the baseline; 600 kWh + 700 kWh give one MWh and 300 kWh over.
    assert events[0] == gc.Rebaselined("pv7", 1, 5_000_000, "first reading")
    (cert,) = [e.certificate for e in events if isinstance(e, Issued)]
    assert cert.readings == (
        ReadingShare(verified[1].digest, 2, 600_000),
        ReadingShare(verified[2].digest, 3, 400_000),
    )
    # Every digest is the SHA-256 of the exact signed bytes the ledger stores.
    assert verified[1].digest == hashlib.sha256(verified[1].signed).digest()
    assert reg.accounts["pv7"].carry_wh == 300_000
    # An unchanged register adds nothing; a counter reset restarts the baseline without
    # crediting the unknown energy; afterwards the rise counts again.
    reg, events = gc.issue_from_readings(reg, verified[3:])
    assert events[0] == gc.Rebaselined("pv7", 5, 250_000, "counter reset")
    (cert2,) = [e.certificate for e in events if isinstance(e, Issued)]
    assert cert2.readings == (
        ReadingShare(verified[2].digest, 3, 300_000),
        ReadingShare(verified[5].digest, 6, 700_000),
    )
    assert reg.accounts["pv7"].carry_wh == 450_000
    with pytest.raises(gc.ReadingAlreadyCounted):
        gc.issue_from_readings(reg, [verified[5]])


def test_register_running_backwards_without_reset_is_refused() -> None:
    key = PrivateKey.generate()
    meters = MeterRegistry()
    meters.add("pv8", key.public_key().point, "gen", "pv")
    first, second = (
        verify_reading(sign_reading(key, "pv8", seq, 1_700_000_000, 0, wh, 0, 0, "pv"), meters)
        for seq, wh in ((1, 9000), (2, 8000))
    )
    reg, _ = gc.issue_from_readings(registry(pv8=("gen", "pv")), [first])
    with pytest.raises(gc.BadRecord):
        gc.issue_from_readings(reg, [second])
