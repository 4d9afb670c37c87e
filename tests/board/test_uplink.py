"""MQTT 3.1.1 packets byte for byte, PUBACK matching, and the connection keeper's backoff."""

from __future__ import annotations

import mcfakes
import pytest
from mc import cbor, porterrors
from mc.mqtt import MESSAGE, PINGRESP, SUBACK, MQTTError, Protocol
from mc.spool import Spool
from mc.uplink import Uplink


class ScriptedLink:
    """A link that records what the client wrote and feeds it scripted broker bytes."""

    def __init__(self, incoming: bytes = b"", chunk: int = 1 << 16) -> None:
        self.written = bytearray()
        self.incoming = bytearray(incoming)
        self.chunk = chunk
        self.closed = False

    def write(self, data) -> None:
        self.written += bytes(data)

    def recv_into(self, buf, timeout_ms: int) -> int:
        if not self.incoming:
            return 0
        n = min(len(buf), len(self.incoming), self.chunk)
        buf[:n] = self.incoming[:n]
        del self.incoming[:n]
        return n

    def close(self) -> None:
        self.closed = True


class Ticks:
    now = 0

    def ticks_ms(self) -> int:
        return self.now

    def ticks_diff(self, a: int, b: int) -> int:
        return a - b

    def ticks_add(self, a: int, d: int) -> int:
        return a + d


def test_connect_packet_bytes_and_connack() -> None:
    link = ScriptedLink(b"\x20\x02\x00\x00")
    Protocol(link, "m1", "m1", "pw", 60).connect(1000, Ticks())
    assert bytes(link.written) == (
        b"\x10\x16"  # CONNECT, remaining length 22
        b"\x00\x04MQTT\x04"  # protocol name, level 4 (3.1.1)
        b"\xc2\x00\x3c"  # user + password + clean session, keepalive 60 s
        b"\x00\x02m1\x00\x02m1\x00\x02pw"
    )


@pytest.mark.parametrize(("code", "reason"), [(5, "not authorized"), (4, "bad user name")])
def test_refused_connect_raises_with_the_reason(code: int, reason: str) -> None:
    link = ScriptedLink(bytes([0x20, 2, 0, code]))
    with pytest.raises(MQTTError, match=reason) as info:
        Protocol(link, "m1", "m1", "pw", 60).connect(1000, Ticks())
    assert info.value.code == code


def test_silent_broker_times_out_the_connect() -> None:
    ticks = Ticks()

    class Slow(ScriptedLink):
        def recv_into(self, buf, timeout_ms: int) -> int:
            ticks.now += max(timeout_ms, 1)
            return 0

    with pytest.raises(MQTTError, match="no CONNACK"):
        Protocol(Slow(), "m1", "", "", 60).connect(500, ticks)


def test_connect_with_will_subscribe_and_incoming_qos1_publish() -> None:
    ack = b"\xa2\x01\x61a\x02\x05"  # {1: "a", 2: 5}
    # CONNACK, SUBACK (pid 1, QoS 1 granted), a retained QoS 1 PUBLISH with packet id 0x1234.
    topic = b"mc/m/ack/a"
    head = bytes([0x33, 2 + len(topic) + 2 + len(ack), 0, len(topic)])
    publish = head + topic + b"\x12\x34" + ack
    incoming = b"\x20\x02\x00\x00" + b"\x90\x03\x00\x01\x01" + publish
    link = ScriptedLink(incoming, chunk=3)
    proto = Protocol(link, "a", "a", "pw", 60, will_topic=b"mc/m/status/a", will_payload=b"\x00")
    proto.connect(1000, Ticks())
    assert bytes(link.written) == (
        b"\x10\x26\x00\x04MQTT\x04"
        b"\xee\x00\x3c"  # user, password, will retain, will QoS 1, will flag, clean session
        b"\x00\x01a\x00\x0dmc/m/status/a\x00\x01\x00\x00\x01a\x00\x02pw"
    )
    link.written.clear()
    proto.subscribe(topic, 1)
    assert bytes(link.written) == b"\x82\x0f\x00\x01\x00\x0amc/m/ack/a\x01"
    link.written.clear()
    events = [e for e in (proto.poll(0) for _ in range(30)) if e]
    assert events == [SUBACK, MESSAGE] and proto.granted == 1
    assert proto.topic == topic and proto.payload == ack
    assert bytes(link.written) == b"\x40\x02\x12\x34", "a QoS 1 message is PUBACKed"


def test_publish_bytes_and_pubacks_split_across_reads() -> None:
    link = ScriptedLink(b"\x40\x02\x00\x07\xd0\x00\x40\x02\x01\x00", chunk=1)
    proto = Protocol(link, "m1", "", "", 60)
    proto.publish(b"mc/m1/r/a", b"\x01\x02\x03", 7)
    assert bytes(link.written) == b"\x32\x10\x00\x09mc/m1/r/a\x00\x07\x01\x02\x03"
    events = []
    for _ in range(20):
        event = proto.poll(0)
        if event:
            events.append(event)
    assert events == [7, PINGRESP, 256]


def test_long_payload_uses_a_multi_byte_remaining_length() -> None:
    link = ScriptedLink()
    Protocol(link, "m1", "", "", 60).publish(b"t", b"x" * 200, 1)
    assert bytes(link.written[:3]) == bytes([0x32, (205 & 0x7F) | 0x80, 205 >> 7])


@pytest.mark.parametrize("garbage", [b"\x40\x03\x00\x01\x02", b"\x20\x02\x00\x00"])
def test_malformed_or_unexpected_packets_raise_mqtt_error(garbage: bytes) -> None:
    proto = Protocol(ScriptedLink(garbage), "m1", "", "", 60)
    with pytest.raises(MQTTError):
        for _ in range(3):
            proto.poll(0)


def test_unsolicited_big_publish_is_skipped() -> None:
    publish = b"\x30\xac\x02" + b"\x00\x01t" + b"z" * 297  # 300-byte body, over the rx buffer
    proto = Protocol(ScriptedLink(publish + b"\x40\x02\x00\x05", chunk=16), "m1", "", "", 60)
    events = [proto.poll(0) for _ in range(20)]
    assert [e for e in events if e] == [5]


# -- the connection keeper -----------------------------------------------------------


def _uplink(tmp_path, broker: mcfakes.FakeBroker, floor: int = 0, **cfg_overrides):
    from mc.flash import Flash
    from mc.log import Log

    board = mcfakes.FakeBoard(flash=Flash(str(tmp_path)), broker=broker, echo=False)
    cfg = {
        "market": "m1",
        "meter_id": "a",
        "broker.host": "b",
        "broker.port": 8883,
        "broker.tls": False,
        "broker.ca": "",
        "broker.username": "a",
        "broker.password": "pw",
        "broker.keepalive_s": 60,
        "broker.inflight": 4,
        "broker.backoff_min_ms": 1000,
        "broker.backoff_max_ms": 60000,
        "broker.ack_timeout_s": 120,
        "broker.reboot_after_s": 0,
        "wifi.ssid": "",
        "wifi.password": "",
    }
    cfg.update(cfg_overrides)
    spool = Spool(board.flash)
    return board, spool, Uplink(board, cfg, spool, Log(board), published_floor=floor)


def _ack(mark: int, meter: str = "a") -> bytes:
    return cbor.encode({1: meter, 2: mark})


def _spin(uplink: Uplink, done, rounds: int = 200, wait_ms: int = 1000) -> None:
    for _ in range(rounds):
        uplink.service(wait_ms)
        if done():
            return
    raise AssertionError("condition not reached")


def test_puback_frees_only_the_window_the_agents_ack_frees_the_spool(tmp_path) -> None:
    broker = mcfakes.FakeBroker(agent=False)
    board, spool, uplink = _uplink(tmp_path, broker)
    for seq in range(1, 11):
        spool.add(seq, b"r%d" % seq)
    broker.swallow_acks = 10**6  # hold every PUBACK
    uplink.service(0)
    assert uplink.inflight() == 4 and len(broker.messages) == 4, "window of 4"
    broker.swallow_acks = 0
    _spin(uplink, uplink.caught_up)
    # PUBACKs for the first four never came: after the PUBACK timeout the session is rebuilt.
    assert uplink.connects == 2 and "no PUBACK" in uplink.last_error
    assert len(spool) == 10, "a PUBACK is no reason to delete a reading"
    assert sorted(set(p for _, p in broker.messages)) == sorted(b"r%d" % s for s in range(1, 11))
    broker.publish("mc/m1/ack/a", _ack(6))  # the agent committed 1..6
    uplink.service(10)
    assert uplink.watermark == 6 and len(spool) == 4 and spool.next_unsent(0) == 7
    broker.publish("mc/m1/ack/a", _ack(10))
    uplink.service(10)
    assert len(spool) == 0 and uplink.freed == 10


def test_reconnect_rewinds_to_the_watermark(tmp_path) -> None:
    broker = mcfakes.FakeBroker(agent=False)
    board, spool, uplink = _uplink(tmp_path, broker)
    for seq in (1, 2, 3, 4, 5):
        spool.add(seq, b"r%d" % seq)
    _spin(uplink, uplink.caught_up, wait_ms=10)
    broker.publish("mc/m1/ack/a", _ack(2))  # retained, as the agent publishes it
    uplink.service(10)
    assert uplink.watermark == 2
    broker.stop()  # the broker crashed and lost 3..5 although it had PUBACKed them
    uplink.service(10)
    assert uplink.state == "down" and len(spool) == 3
    broker.messages.clear()
    broker.start()
    _spin(uplink, lambda: uplink.caught_up() and len(broker.messages) >= 3)
    assert [p for _, p in broker.messages] == [b"r3", b"r4", b"r5"], "resent from watermark + 1"
    assert uplink.connects == 2


def test_no_ack_within_the_timeout_rewinds_and_republishes(tmp_path) -> None:
    broker = mcfakes.FakeBroker(agent=False)
    board, spool, uplink = _uplink(tmp_path, broker, **{"broker.ack_timeout_s": 30})
    for seq in (1, 2, 3):
        spool.add(seq, b"r%d" % seq)
    _spin(uplink, uplink.caught_up, wait_ms=10)
    assert len(broker.messages) == 3
    for _ in range(29):
        uplink.service(1000)
    assert len(broker.messages) == 3 and uplink.rewinds == 0
    for _ in range(3):
        uplink.service(1000)
    assert uplink.rewinds == 1 and [p for _, p in broker.messages[3:]] == [b"r1", b"r2", b"r3"]
    assert uplink.connects == 1, "a rewind, not a reconnect"
    broker.publish("mc/m1/ack/a", _ack(3))
    uplink.service(10)
    for _ in range(60):
        uplink.service(1000)
    assert uplink.rewinds == 1 and len(spool) == 0 and len(broker.messages) == 6


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (_ack(9), "beyond what was ever published"),
        (_ack(2, meter="b"), "another meter"),
        (b"\xa2\x01\x61a\x02", "truncated CBOR"),
        (cbor.encode({1: "a", 2: -1}), "negative"),
        (cbor.encode({1: "a", 2: True}), "a bool is no watermark"),
        (cbor.encode({1: "a", 2: 2, 3: 0}), "extra key"),
        (cbor.encode([1, "a", 2]), "not a map"),
        (b"", "empty"),
    ],
)
def test_bad_acknowledgements_free_nothing(tmp_path, payload: bytes, why: str) -> None:
    broker = mcfakes.FakeBroker(agent=False)
    board, spool, uplink = _uplink(tmp_path, broker)
    for seq in (1, 2, 3):
        spool.add(seq, b"r%d" % seq)
    _spin(uplink, uplink.caught_up, wait_ms=10)
    spool.add(4, b"r4")  # spooled, not yet published: an ack for it would be forged
    broker.publish("mc/m1/ack/a", payload)
    uplink.service(10)
    assert len(spool) == 4 and uplink.watermark == 0 and uplink.ignored_acks == 1, why


def test_watermark_is_bounded_by_what_was_published_before_the_reboot(tmp_path) -> None:
    broker = mcfakes.FakeBroker(agent=False)
    # Numbers up to 40 were handed out before this boot; 38..40 are still spooled.
    board, spool, uplink = _uplink(tmp_path, broker, floor=40)
    for seq in (38, 39, 40):
        spool.add(seq, b"r%d" % seq)
    broker.publish("mc/m1/ack/a", _ack(39))  # retained from before the reboot
    uplink.service(10)
    assert uplink.watermark == 39 and [spool.next_unsent(0)] == [40]
    broker.publish("mc/m1/ack/a", _ack(41))
    uplink.service(10)
    assert uplink.watermark == 39 and len(spool) == 1


def test_online_state_retained_and_the_will_says_offline(tmp_path) -> None:
    broker = mcfakes.FakeBroker()
    board, spool, uplink = _uplink(tmp_path, broker)
    uplink.service(10)
    assert broker.retained["mc/m1/status/a"] == cbor.encode({1: "a", 2: "online"})
    broker.stop()  # the link dies without DISCONNECT: the broker publishes the will
    assert broker.retained["mc/m1/status/a"] == cbor.encode({1: "a", 2: "offline"})
    broker.start()
    _spin(uplink, lambda: uplink.state == "up")
    assert cbor.decode(broker.retained["mc/m1/status/a"])[2] == "online"
    uplink.close()  # a clean stop discards the will, so the board says it itself
    assert cbor.decode(broker.retained["mc/m1/status/a"])[2] == "offline"


def test_refused_ack_subscription_is_reported(tmp_path) -> None:
    broker = mcfakes.FakeBroker(read_acl={"a": "mc/m1/ack/other"})
    board, spool, uplink = _uplink(tmp_path, broker)
    uplink.service(10)
    assert any("refused the subscription" in line for line in board.console_lines)


def test_backoff_is_exponential_capped_and_jittered(tmp_path) -> None:
    broker = mcfakes.FakeBroker()
    broker.up = False
    board, spool, uplink = _uplink(tmp_path, broker, **{"broker.backoff_max_ms": 16000})
    delays = []
    for _ in range(9):
        uplink.service(0)  # attempts a connect, fails, schedules the retry
        delays.append(uplink.retry_in_ms())
        board.sleep_ms(uplink.retry_in_ms())
    caps = [min(16000, 1000 << i) for i in range(9)]
    for delay, cap in zip(delays, caps, strict=True):
        assert cap // 2 <= delay <= cap
    assert len(set(delays[-4:])) > 1, "jitter: a fleet does not retry in lock step"
    assert broker.connects == 0


def test_refused_credentials_back_off_too(tmp_path) -> None:
    broker = mcfakes.FakeBroker(users={"a": "other"})
    board, spool, uplink = _uplink(tmp_path, broker)
    uplink.service(0)
    assert uplink.state == "down" and broker.refused == 1
    assert "not authorized" in uplink.last_error
    assert uplink.retry_in_ms() >= 500


CONNECT_CALLS = ("getaddrinfo", "connect", "tls_handshake")


@pytest.mark.parametrize(
    "exc", [e for call, e in mcfakes.PORT_ERROR_EXAMPLES if call in CONNECT_CALLS], ids=repr
)
def test_every_connect_error_the_port_raises_is_a_link_failure(tmp_path, exc) -> None:
    broker = mcfakes.FakeBroker()
    board, spool, uplink = _uplink(tmp_path, broker)
    board.connect_error = exc
    uplink.service(0)  # must not raise
    assert uplink.state == "down" and type(exc).__name__ in uplink.last_error
    board.connect_error = None
    _spin(uplink, lambda: uplink.state == "up")


def test_port_error_table_covers_every_example() -> None:
    for call, exc in mcfakes.PORT_ERROR_EXAMPLES:
        assert isinstance(exc, porterrors.RAISES[call]), (call, exc)
    for call in ("getaddrinfo", "connect", "tls_handshake"):
        assert set(porterrors.RAISES[call]) <= set(porterrors.CONNECT_ERRORS)
    assert set(porterrors.RAISES["link_io"]) <= set(porterrors.LINK_ERRORS)
    assert set(porterrors.RAISES["ntp"]) == set(porterrors.NTP_ERRORS)
    assert {c for c, _ in mcfakes.PORT_ERROR_EXAMPLES} == set(porterrors.RAISES)


def test_wifi_is_reset_then_the_board_reboots_when_nothing_passes(tmp_path) -> None:
    broker = mcfakes.FakeBroker()
    board, spool, uplink = _uplink(
        tmp_path, broker, **{"wifi.ssid": "site", "broker.reboot_after_s": 1800,
                             "broker.backoff_max_ms": 60000},
    )
    _spin(uplink, lambda: uplink.state == "up")
    # WiFi says connected, but no TCP connection gets through.
    board.connect_error = OSError(116)
    broker.stop()
    elapsed = 0
    while not uplink.reboot_due and elapsed < 3_600_000:
        uplink.service(1000)
        elapsed += 1000
    assert board.wifi_resets >= 4, "WiFi reset every 4 failed attempts"
    assert uplink.reboot_due and 1_800_000 <= board.ticks_ms() <= 1_900_000


def test_keepalive_ping_and_dead_link_detection(tmp_path) -> None:
    broker = mcfakes.FakeBroker()
    board, spool, uplink = _uplink(tmp_path, broker, **{"broker.keepalive_s": 20})
    uplink.service(0)
    assert uplink.state == "up"
    for _ in range(15):
        uplink.service(1000)  # idle: a PINGREQ after 10 s, answered
    assert uplink.state == "up"
    broker.silent = True  # the broker vanished without closing the TCP connection
    for _ in range(25):
        uplink.service(1000)
    assert uplink.state == "down"
    assert any("no PINGRESP" in line for line in board.console_lines)
