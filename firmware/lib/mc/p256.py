"""P-256 ECDSA for the meter board: RFC 6979 deterministic signing, key generation, verification.

The same module runs unchanged under MicroPython and CPython and gives byte-identical
signatures on both (RFC 6979 makes the signature a pure function of key and message).

Signatures are the 64-byte r||s form COSE ES256 uses.  s is *not* normalised to the
lower half of the group order: the output is exactly RFC 6979 section 2.4 (it matches the
RFC's test vectors and the `ecdsa` package's `sign_deterministic`), and COSE/OpenSSL
verifiers accept either half.

Speed: k*G uses a fixed-base comb (8 teeth, spacing 32) over a table of the 255 sums of
{2^(32*t) * G}, built once on first use (or by `precompute()` at boot) and kept as a
16320-byte bytearray of affine x||y.  A signature then costs 31 doublings (Jacobian
coordinates, a = -3 formulas) and at most 32 mixed Jacobian+affine additions, plus one
field inversion and one inversion mod n (extended Euclid, which is about 3x faster than
pow(a, p-2, p) on MicroPython's mpz).  The hot loop is written out inline because a
function call costs as much as several big-int multiplications on MicroPython.
Measured on the MicroPython WebAssembly port (`meterchain bench sign`): about 2 ms per
signature, 35 ms to build the table.  Fewer teeth trade speed for RAM: 6 teeth (63
entries, 4 KB) measured 2.9 ms, 4 teeth (15 entries, 1 KB) 3.9 ms.

Memory: besides the table, a signature's live working set is a few dozen big ints
(about 2 KB), but it allocates some 200 KB of short-lived ones in total, which the
collector reclaims as it goes; building the table peaks near 32 KB including the table.

Side channels: this is NOT constant-time.  MicroPython (and CPython) integers are
arbitrary-precision with data-dependent running time and allocation, and the comb skips
zero columns; a physical attacker who can time or probe the board many times could learn
key bits.  What RFC 6979 does remove is the classic ECDSA failure on small devices: a weak
or repeated nonce from a poor RNG leaking the private key.  The nonce is derived from the
key and the message hash by HMAC-SHA-256, so no RNG is needed at signing time; the RNG is
needed only once, to make the key (`secret_from_random`).
"""

import hashlib

try:
    from micropython import const
except ImportError:  # CPython: constants are plain module globals
    const = lambda x: x  # noqa: E731


# Curve P-256 (SEC 2 secp256r1 / FIPS 186-4 D.1.2.3); a = -3.
_P = const(0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF)
_N = const(0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551)
_B = const(0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B)
_GX = const(0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296)
_GY = const(0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)

# Comb geometry: 8 teeth spaced 32 bits apart cover the 256-bit scalar in 32 columns.
_TEETH = const(8)
_SPACING = const(32)
_ENTRIES = const(255)  # 2**_TEETH - 1 non-zero tooth patterns
_ENTRY_BYTES = const(64)  # affine x || y, 32 bytes each, big-endian
# Column c of scalar k is bits c, c+32, ..., c+224.  `(k >> c) & _TOOTH_MASK` keeps
# them; multiplying by _GATHER moves bit 32*t to position 217 + t with no carries
# (all partial products land on distinct bit positions), so one shift and mask yield
# the 8-bit table index.  This replaces 8 single-bit extractions per column.
_TOOTH_MASK = const(0x100000001000000010000000100000001000000010000000100000001)
_GATHER = const(0x2000000040000000800000010000000200000004000000080000001)
_GATHER_SHIFT = const(217)
# Points are normalised to affine in batches of this many (one inversion per batch)
# while the table is built, which bounds the temporary memory of the build.
_BATCH = const(8)

# Bytes of randomness `secret_from_random` needs: FIPS 186-4 B.4.1 asks for 64 bits more
# than the order's 256 so that reducing them leaves a bias below 2**-64.
RANDOM_BYTES = const(40)

_IPAD = int.from_bytes(b"\x36" * 64, "big")
_OPAD = int.from_bytes(b"\x5c" * 64, "big")

_table: bytearray | None = None  # the comb table (bytearray), built on first use


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA-256 (RFC 2104) of bytes `msg` under bytes `key`.

    Built on hashlib.sha256 because not every MicroPython port ships an `hmac` module.
    """
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    padded = int.from_bytes(key, "big") << ((64 - len(key)) << 3)
    inner = hashlib.sha256((padded ^ _IPAD).to_bytes(64, "big"))
    inner.update(msg)
    outer = hashlib.sha256((padded ^ _OPAD).to_bytes(64, "big"))
    outer.update(inner.digest())
    return outer.digest()


def _inverse(a: int, m: int) -> int:
    """a**-1 mod prime m for a not divisible by m (extended Euclid, one cofactor tracked).

    Not pow(a, -1, m): MicroPython 1.27 returns 0 for it instead of raising or inverting.
    """
    u = a % m
    if not u:
        raise ValueError("no inverse of 0")
    v = m
    x1 = 1
    x2 = 0
    # Invariant: u == x1*a and v == x2*a (mod m); gcd(a, m) == 1 ends the loop at u == 1.
    while u != 1:
        q = v // u
        v, u = u, v - q * u
        x2, x1 = x1, x2 - q * x1
    return x1 % m


def _double(x: int, y: int, z: int) -> tuple[int, int, int]:
    """2*(x, y, z) in Jacobian coordinates (dbl-2001-b, a = -3); z == 0 is infinity."""
    p = _P
    delta = z * z % p
    gamma = y * y % p
    beta = x * gamma % p
    alpha = (x - delta) * (x + delta) * 3 % p
    z = (y * z << 1) % p
    x = (alpha * alpha - (beta << 3)) % p
    y = (alpha * ((beta << 2) - x) - (gamma * gamma << 3)) % p
    return x, y, z


def _add_affine(x1: int, y1: int, z1: int, x2: int, y2: int) -> tuple[int, int, int]:
    """(x1, y1, z1) + affine (x2, y2) in Jacobian coordinates, every special case handled."""
    p = _P
    if not z1:
        return x2, y2, 1
    zz = z1 * z1 % p
    h = x2 * zz % p - x1
    r = y2 * zz * z1 % p - y1
    if not h:
        if r:
            return 0, 1, 0  # P + (-P): the point at infinity
        return _double(x1, y1, z1)
    hh = h * h % p
    hhh = h * hh % p
    v = x1 * hh % p
    x3 = (r * r - hhh - (v << 1)) % p
    return x3, (r * (v - x3) - y1 * hhh) % p, z1 * h % p


def _affine_batch(points: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Affine (x, y) of each finite Jacobian point, with one inversion for all (Montgomery)."""
    p = _P
    prefix = []
    acc = 1
    for pt in points:
        acc = acc * pt[2] % p
        prefix.append(acc)
    inv = _inverse(acc, p)  # raises ValueError if any point is at infinity
    out = [(0, 0)] * len(points)
    for i in range(len(points) - 1, -1, -1):
        x, y, z = points[i]
        zi = inv * prefix[i - 1] % p if i else inv
        inv = inv * z % p
        zi2 = zi * zi % p
        out[i] = (x * zi2 % p, y * zi2 * zi % p)
    return out


def _build_table() -> bytearray:
    """Fill the comb table: entry i (1..255) holds sum of 2**(32*t) * G over set bits t of i."""
    global _table
    table = bytearray(_ENTRIES * _ENTRY_BYTES)
    bx = _GX
    by = _GY
    for tooth in range(_TEETH):
        if tooth:
            x, y, z = bx, by, 1
            for _ in range(_SPACING):
                x, y, z = _double(x, y, z)
            bx, by = _affine_batch([(x, y, z)])[0]
        base = 1 << tooth
        o = (base - 1) * _ENTRY_BYTES
        table[o : o + 32] = bx.to_bytes(32, "big")
        table[o + 32 : o + 64] = by.to_bytes(32, "big")
        # Entries base+1 .. 2*base-1 add this tooth's point to the entries already built.
        for start in range(1, base, _BATCH):
            stop = min(start + _BATCH, base)
            sums = []
            for j in range(start, stop):
                o = (j - 1) * _ENTRY_BYTES
                x = int.from_bytes(table[o : o + 32], "big")
                y = int.from_bytes(table[o + 32 : o + 64], "big")
                sums.append(_add_affine(bx, by, 1, x, y))
            j = base + start
            for x, y in _affine_batch(sums):
                o = (j - 1) * _ENTRY_BYTES
                table[o : o + 32] = x.to_bytes(32, "big")
                table[o + 32 : o + 64] = y.to_bytes(32, "big")
                j += 1
    _table = table
    return table


def precompute() -> int:
    """Build the k*G table now (about 16 KB, kept for the life of the program).

    Call once at boot, before the heap fragments; otherwise the first signature builds it.
    Returns the table's size in bytes.
    """
    table = _table if _table is not None else _build_table()
    return len(table)


def _mul_g(k: int) -> tuple[int, int, int]:
    """k*G for 0 < k < n as Jacobian (x, y, z), by the fixed-base comb."""
    table = _table if _table is not None else _build_table()
    entries = memoryview(table)
    p = _P
    x = 0
    y = 1
    z = 0  # start at infinity
    for c in range(_SPACING - 1, -1, -1):
        if z:
            # Doubling, dbl-2001-b with a = -3 (3M + 5S), inlined for speed.
            delta = z * z % p
            gamma = y * y % p
            beta = x * gamma % p
            alpha = (x - delta) * (x + delta) * 3 % p
            z = (y * z << 1) % p
            x = (alpha * alpha - (beta << 3)) % p
            y = (alpha * ((beta << 2) - x) - (gamma * gamma << 3)) % p
        i = ((((k >> c) & _TOOTH_MASK) * _GATHER) >> _GATHER_SHIFT) & 0xFF
        if i:
            o = (i - 1) << 6  # * _ENTRY_BYTES
            x2 = int.from_bytes(entries[o : o + 32], "big")
            y2 = int.from_bytes(entries[o + 32 : o + 64], "big")
            if z:
                # Mixed addition Jacobian + affine (8M + 3S), inlined for speed.  Its one
                # special case, equal x (h == 0), cannot occur for 0 < k < n: here the
                # running point is a*G and the entry b*G with K = a + b the scalar's
                # columns >= c shifted down by c.  a == b would make K == 2*b, whose
                # column-c bits are 0, so b == 0; a + b == n would need K == n, but K <= k
                # < n.  (Had it happened, z would become 0 and the caller's inversion of z
                # would raise instead of signing with a wrong point.)
                zz = z * z % p
                h = x2 * zz % p - x
                r = y2 * zz * z % p - y
                hh = h * h % p
                hhh = h * hh % p
                v = x * hh % p
                x = (r * r - hhh - (v << 1)) % p
                y = (r * (v - x) - y * hhh) % p
                z = z * h % p
            else:
                x = x2
                y = y2
                z = 1
    return x, y, z


def _check_secret(secret: int) -> None:
    if not isinstance(secret, int) or isinstance(secret, bool):
        raise TypeError("secret must be an int")
    if not 0 < secret < _N:
        raise ValueError("secret must be in [1, n-1]")


def public_key(secret: int) -> bytes:
    """65-byte uncompressed SEC1 point (0x04 || x || y) of the private scalar `secret`."""
    _check_secret(secret)
    x, y, z = _mul_g(secret)
    x, y = _affine_batch([(x, y, z)])[0]
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


def sign(secret: int, msg: bytes) -> bytes:
    """ECDSA P-256/SHA-256 signature of bytes `msg` as 64-byte r||s, nonce by RFC 6979."""
    _check_secret(secret)
    h1 = hashlib.sha256(msg).digest()
    e = int.from_bytes(h1, "big")  # bits2int: qlen == hlen == 256, no shift needed
    x_oct = secret.to_bytes(32, "big")
    h_oct = (e % _N).to_bytes(32, "big")  # bits2octets
    # RFC 6979 section 3.2, steps b to h.
    v = b"\x01" * 32
    key = b"\x00" * 32
    key = hmac_sha256(key, v + b"\x00" + x_oct + h_oct)
    v = hmac_sha256(key, v)
    key = hmac_sha256(key, v + b"\x01" + x_oct + h_oct)
    v = hmac_sha256(key, v)
    while True:
        v = hmac_sha256(key, v)
        k = int.from_bytes(v, "big")
        if 0 < k < _N:
            x, _, z = _mul_g(k)
            zi = _inverse(z, _P)
            r = x * zi * zi % _P % _N
            if r:
                s = _inverse(k, _N) * (e + r * secret) % _N
                if s:
                    return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        # Step h.3: this k was unusable; derive the next candidate.
        key = hmac_sha256(key, v + b"\x00")
        v = hmac_sha256(key, v)


def secret_from_random(rand: bytes) -> int:
    """Private scalar uniform in [1, n-1] from at least RANDOM_BYTES (40) random bytes.

    FIPS 186-4 B.4.1 ("extra random bits"): c = int(rand) mod (n-1) + 1.  Every input maps
    to a valid key deterministically (no rejection loop, no retry); with 64 spare bits the
    distance from uniform is below 2**-64.  Longer inputs are used whole.
    """
    if len(rand) < RANDOM_BYTES:
        raise ValueError("need at least 40 random bytes")
    return int.from_bytes(rand, "big") % (_N - 1) + 1


def _mul_point(k: int, qx: int, qy: int) -> tuple[int, int, int]:
    """k*Q for affine Q and 0 <= k < n as Jacobian (x, y, z), 4-bit fixed window."""
    multiples = [(qx, qy, 1), _double(qx, qy, 1)]
    for _ in range(13):
        x, y, z = multiples[-1]
        multiples.append(_add_affine(x, y, z, qx, qy))
    window = _affine_batch(multiples)  # window[w-1] == w*Q
    x = 0
    y = 1
    z = 0
    for shift in range(252, -1, -4):
        if z:
            for _ in range(4):
                x, y, z = _double(x, y, z)
        w = (k >> shift) & 15
        if w:
            x2, y2 = window[w - 1]
            x, y, z = _add_affine(x, y, z, x2, y2)
    return x, y, z


def verify(pub: bytes, msg: bytes, sig: bytes) -> bool:
    """True when `sig` (64-byte r||s) is a valid ECDSA P-256/SHA-256 signature of `msg`.

    `pub` is the 65-byte uncompressed point.  Meant for the board's self-test: slower
    than signing and, like it, not constant-time (verification handles public data).
    """
    if len(pub) != 65 or pub[0] != 4 or len(sig) != 64:
        return False
    p = _P
    qx = int.from_bytes(pub[1:33], "big")
    qy = int.from_bytes(pub[33:65], "big")
    if qx >= p or qy >= p or (qy * qy - qx * qx * qx + 3 * qx - _B) % p:
        return False  # not a point on the curve
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    if not (0 < r < _N and 0 < s < _N):
        return False
    w = _inverse(s, _N)
    u1 = int.from_bytes(hashlib.sha256(msg).digest(), "big") * w % _N
    u2 = r * w % _N
    x, y, z = _mul_point(u2, qx, qy)
    if u1:
        if z:
            ax, ay = _affine_batch([(x, y, z)])[0]
            x, y, z = _mul_g(u1)
            x, y, z = _add_affine(x, y, z, ax, ay)
        else:
            x, y, z = _mul_g(u1)
    if not z:
        return False
    zi = _inverse(z, p)
    return x * zi * zi % p % _N == r
