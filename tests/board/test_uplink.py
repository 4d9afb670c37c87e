"""MQTT 3.1.1 packets byte for byte, PUBACK matching, and the connection keeper's backoff."""

from __future__ import annotations

import mcfakes
import pytest
from mc.mqtt import PINGRESP, MQTTError, Protocol
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
    publish = b"\x30\x82\x01" + b"\x00\x01t" + b"z" * 127  # 130-byte body, over the rx buffer
    proto = Protocol(ScriptedLink(publish + b"\x40\x02\x00\x05", chunk=16), "m1", "", "", 60)
    events = [proto.poll(0) for _ in range(20)]
    assert [e for e in events if e] == [5]


# -- the connection keeper -----------------------------------------------------------


def _uplink(tmp_path, broker: mcfakes.FakeBroker, **cfg_overrides):
    from mc.flash import Flash

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
        "wifi.ssid": "",
        "wifi.password": "",
    }
    cfg.update(cfg_overrides)
    spool = Spool(board.flash)
    log = __import__("mc.log", fromlist=["Log"]).Log(board)
    return board, spool, Uplink(board, cfg, spool, log)


def test_window_limits_inflight_and_pubacks_release_readings(tmp_path) -> None:
    broker = mcfakes.FakeBroker()
    board, spool, uplink = _uplink(tmp_path, broker)
    for seq in range(1, 11):
        spool.add(seq, b"r%d" % seq)
    broker.swallow_acks = 10**6  # hold every PUBACK
    uplink.service(0)
    assert uplink.inflight() == 4 and len(broker.messages) == 4
    broker.swallow_acks = 0
    for _ in range(10):
        uplink.service(10)
    assert [p for _, p in broker.messages] == [b"r1", b"r2", b"r3", b"r4"], "window full"
    # PUBACKs that never come: after the PUBACK timeout the session is rebuilt and resent.
    for _ in range(100):
        uplink.service(1000)
        if not len(spool):
            break
    assert len(spool) == 0
    assert uplink.connects == 2 and "no PUBACK" in uplink.last_error
    assert sorted(set(p for _, p in broker.messages)) == sorted(b"r%d" % s for s in range(1, 11))


def test_lost_pubacks_mean_resend_after_reconnect_never_loss(tmp_path) -> None:
    broker = mcfakes.FakeBroker()
    board, spool, uplink = _uplink(tmp_path, broker)
    for seq in (1, 2, 3):
        spool.add(seq, b"r%d" % seq)
    broker.swallow_acks = 2
    uplink.service(0)
    broker.stop()  # the connection dies with two readings unacknowledged
    uplink.service(10)
    assert uplink.state == "down" and len(spool) == 2
    broker.start()
    for _ in range(200):
        uplink.service(1000)
        if not len(spool):
            break
    assert len(spool) == 0
    payloads = [p for _, p in broker.messages]
    assert payloads.count(b"r1") == 2 and payloads.count(b"r2") == 2 and payloads.count(b"r3") == 1


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
