"""Deterministic CBOR (RFC 8949) encoding for everything the board signs, and the decoder it needs.

Encoding is deterministic: shortest-form integers and lengths, definite lengths only,
no floats, and map keys sorted the way the CPython core's canonical codec
(`cbor2.dumps(..., canonical=True)`) sorts them, so the board and every node produce the
same bytes for the same value.  That order is length-first: shorter encoded key first,
then bytewise (RFC 8949 section 4.2.3, the RFC 7049 canonical order).  For maps whose keys
all encode to the same length -- every MeterChain wire map, whose keys are the integers
1..23 -- it coincides with the plain bytewise order of RFC 8949 section 4.2.1.

Supported: int (-2**64 .. 2**64-1), bytes/bytearray/memoryview, str, list/tuple, dict (keys
int, str or bytes), bool, None, and tags via `Tag`.  The decoder takes the same subset,
accepts simple values false/true/null, and raises ValueError on anything malformed,
truncated, indefinite-length, float, or nested deeper than MAX_DEPTH; declared lengths are
checked against the bytes actually present before anything is allocated, so hostile input
can neither hang the board nor exhaust its heap.
"""

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


MAX_DEPTH = const(16)  # arrays/maps/tags nested deeper than this are refused

_MAJOR_UINT = const(0)
_MAJOR_NEGINT = const(1)
_MAJOR_BYTES = const(2)
_MAJOR_TEXT = const(3)
_MAJOR_ARRAY = const(4)
_MAJOR_MAP = const(5)
_MAJOR_TAG = const(6)
_MAJOR_SIMPLE = const(7)

_UINT64_LIMIT = const(0x10000000000000000)  # 2**64


class Tag:
    """A CBOR tag: number `tag` applied to `value` (e.g. Tag(18, [...]) for COSE_Sign1)."""

    def __init__(self, tag: int, value: object) -> None:
        self.tag = tag
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __repr__(self) -> str:
        return f"Tag({self.tag}, {self.value!r})"


def _head(buf: bytearray, major: int, arg: int) -> None:
    """Append the initial byte(s) of an item: major type plus its argument, shortest form."""
    if arg < 24:
        buf.append((major << 5) | arg)
    elif arg < 0x100:
        buf.append((major << 5) | 24)
        buf.append(arg)
    elif arg < 0x10000:
        buf.append((major << 5) | 25)
        buf.extend(arg.to_bytes(2, "big"))
    elif arg < 0x100000000:
        buf.append((major << 5) | 26)
        buf.extend(arg.to_bytes(4, "big"))
    else:
        buf.append((major << 5) | 27)
        buf.extend(arg.to_bytes(8, "big"))


def _encode(buf: bytearray, value: object, depth: int) -> None:
    if value is None:
        buf.append(0xF6)
    elif value is True:
        buf.append(0xF5)
    elif value is False:
        buf.append(0xF4)
    elif isinstance(value, int):
        if 0 <= value < _UINT64_LIMIT:
            _head(buf, _MAJOR_UINT, value)
        elif -_UINT64_LIMIT <= value < 0:
            _head(buf, _MAJOR_NEGINT, -1 - value)
        else:
            raise ValueError("integer outside the 64-bit CBOR range")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _head(buf, _MAJOR_BYTES, len(value))
        buf.extend(value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        _head(buf, _MAJOR_TEXT, len(raw))
        buf.extend(raw)
    elif depth >= MAX_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_DEPTH}")
    elif isinstance(value, (list, tuple)):
        _head(buf, _MAJOR_ARRAY, len(value))
        for item in value:
            _encode(buf, item, depth + 1)
    elif isinstance(value, dict):
        _head(buf, _MAJOR_MAP, len(value))
        pairs = []
        for key in value:
            if isinstance(key, bool) or not isinstance(key, (int, str, bytes)):
                raise TypeError("map keys must be int, str or bytes")
            key_buf = bytearray()
            _encode(key_buf, key, depth + 1)
            pairs.append((len(key_buf), bytes(key_buf), key))
        # Length-first, then bytewise: the order cbor2's canonical mode uses (see above).
        # The encoded keys are unique, so the sort never compares the third element.
        pairs.sort()
        for _, key_bytes, key in pairs:
            buf.extend(key_bytes)
            _encode(buf, value[key], depth + 1)
    elif isinstance(value, Tag):
        if not isinstance(value.tag, int) or not 0 <= value.tag < _UINT64_LIMIT:
            raise ValueError("tag number must be an unsigned 64-bit int")
        _head(buf, _MAJOR_TAG, value.tag)
        _encode(buf, value.value, depth + 1)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as deterministic CBOR")


def encode(value: object) -> bytes:
    """Deterministic CBOR bytes of `value`; TypeError/ValueError if it is outside the subset."""
    buf = bytearray()
    _encode(buf, value, 0)
    return bytes(buf)


def _is_utf8(raw: bytes) -> bool:
    """Strict UTF-8 check (Unicode table 3-7): no overlongs, surrogates or code points > 10FFFF.

    MicroPython's own decoder lets those through while CPython's refuses them; checking
    here makes both refuse the same byte strings.
    """
    i = 0
    end = len(raw)
    while i < end:
        lead = raw[i]
        i += 1
        if lead < 0x80:
            continue
        low = 0x80
        high = 0xBF
        if 0xC2 <= lead <= 0xDF:
            more = 1
        elif 0xE0 <= lead <= 0xEF:
            more = 2
            if lead == 0xE0:
                low = 0xA0  # shorter forms are overlong
            elif lead == 0xED:
                high = 0x9F  # ED A0..BF would be surrogates
        elif 0xF0 <= lead <= 0xF4:
            more = 3
            if lead == 0xF0:
                low = 0x90  # overlong
            elif lead == 0xF4:
                high = 0x8F  # beyond U+10FFFF
        else:
            return False
        if i + more > end or not low <= raw[i] <= high:
            return False
        for j in range(i + 1, i + more):
            if not 0x80 <= raw[j] <= 0xBF:
                return False
        i += more
    return True


def _decode(data: memoryview, pos: int, depth: int) -> tuple[object, int]:
    """Decode the item at data[pos]; return (value, position after it)."""
    end = len(data)
    if pos >= end:
        raise ValueError("truncated CBOR")
    initial = data[pos]
    pos += 1
    major = initial >> 5
    info = initial & 0x1F
    if major == _MAJOR_SIMPLE:
        if info == 20:
            return False, pos
        if info == 21:
            return True, pos
        if info == 22:
            return None, pos
        if 25 <= info <= 27:
            raise ValueError("floats are not supported")
        if info == 31:
            raise ValueError("unexpected break code")
        if 28 <= info <= 30:
            raise ValueError(f"reserved additional information {info}")
        raise ValueError("unsupported simple value")
    if info < 24:
        arg = info
    elif info <= 27:
        size = 1 << (info - 24)
        if pos + size > end:
            raise ValueError("truncated CBOR")
        arg = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    elif info == 31:
        raise ValueError("indefinite-length items are not supported")
    else:
        raise ValueError(f"reserved additional information {info}")

    if major == _MAJOR_UINT:
        return arg, pos
    if major == _MAJOR_NEGINT:
        return -1 - arg, pos
    if major == _MAJOR_BYTES or major == _MAJOR_TEXT:
        if arg > end - pos:
            raise ValueError("truncated CBOR")
        raw = bytes(data[pos : pos + arg])
        pos += arg
        if major == _MAJOR_BYTES:
            return raw, pos
        if not _is_utf8(raw):
            raise ValueError("text string is not valid UTF-8")
        return str(raw, "utf-8"), pos
    if depth >= MAX_DEPTH:
        raise ValueError(f"nesting deeper than {MAX_DEPTH}")
    if major == _MAJOR_ARRAY:
        if arg > end - pos:  # every item takes at least one byte
            raise ValueError("truncated CBOR")
        items = []
        for _ in range(arg):
            item, pos = _decode(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == _MAJOR_MAP:
        if arg > (end - pos) >> 1:  # every key and every value takes at least one byte
            raise ValueError("truncated CBOR")
        result = {}
        for _ in range(arg):
            key, pos = _decode(data, pos, depth + 1)
            if isinstance(key, bool) or not isinstance(key, (int, str, bytes)):
                raise ValueError("map keys must be int, str or bytes")
            if key in result:
                raise ValueError("duplicate map key")
            result[key], pos = _decode(data, pos, depth + 1)
        return result, pos
    # _MAJOR_TAG: the only major type left.
    value, pos = _decode(data, pos, depth + 1)
    return Tag(arg, value), pos


def decode(data: bytes | bytearray | memoryview) -> object:
    """The value of the one CBOR item that spans all of `data` (bytes-like); ValueError if not."""
    view = memoryview(data)
    value, pos = _decode(view, 0, 0)
    if pos != len(view):
        raise ValueError("trailing bytes after the CBOR item")
    return value
