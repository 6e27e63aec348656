"""Unit tests of the engine's codecs and compatibility check (no KVM)."""

import random

import pytest

from nova_bhyve.native.engine import MigrationError, spec_check

from .conftest import selftest_module

PAGE = 4096


def _delta(old, cur, cap=PAGE // 2):
    ffi, lib = selftest_module()
    out = ffi.new("uint8_t[]", PAGE + 64)
    n = ffi.new("size_t *")
    rc = lib.nb_selftest_delta(old, cur, out, cap, n)
    return None if rc else bytes(ffi.buffer(out, n[0]))


def _undelta(delta, base):
    ffi, lib = selftest_module()
    page = ffi.new("uint8_t[]", bytes(base))
    rc = lib.nb_selftest_undelta(delta, len(delta), page)
    return None if rc else bytes(ffi.buffer(page, PAGE))


@pytest.mark.parametrize("seed", range(20))
def test_delta_round_trips_random_edits(seed):
    rng = random.Random(seed)
    old = bytes(rng.getrandbits(8) for _ in range(PAGE))
    cur = bytearray(old)
    for _ in range(rng.randint(0, 40)):
        at = rng.randrange(PAGE)
        for i in range(at, min(PAGE, at + rng.randint(1, 30))):
            cur[i] = rng.getrandbits(8)
    delta = _delta(old, bytes(cur))
    if delta is None:       # too many changes for a delta: sent whole
        assert sum(a != b for a, b in zip(old, cur)) > 200
        return
    assert _undelta(delta, old) == bytes(cur)


def test_one_changed_byte_costs_a_few_bytes():
    old = bytes(PAGE)
    cur = bytearray(old)
    cur[1234] = 7
    delta = _delta(old, bytes(cur))
    assert len(delta) <= 5
    assert _undelta(delta, old) == bytes(cur)


def test_identical_page_has_an_empty_delta_and_a_big_change_has_none():
    page = bytes(range(256)) * 16
    assert _undelta(_delta(page, page), page) == page
    assert _delta(bytes(PAGE), bytes([1]) * PAGE) is None


@pytest.mark.parametrize("bad", [
    b"\x80",                      # truncated varint
    b"\x00\x05ab",                # run longer than what follows
    b"\xff\x3f\x01x",             # skip beyond the page
    b"\x00\x81\x20" + b"x" * 10,  # run of 4097 bytes
    b"\x80\x80\x80\x01\x00",      # varint too long
])
def test_malformed_deltas_are_refused(bad):
    assert _undelta(bad, bytes(PAGE)) is None


def test_crc32c_matches_the_published_check_value():
    lib = selftest_module()[1]
    # CRC-32C of "123456789" is 0xE3069283
    assert lib.nb_selftest_crc32c(b"123456789", 9) == 0xE3069283
    data = bytes(range(256)) * 40
    assert lib.nb_selftest_crc32c(data, len(data)) == \
        lib.nb_selftest_crc32c(data, len(data))


M64 = (1 << 64) - 1


def _siphash24(k0, k1, words):
    """SipHash-2-4 of 64-bit words (the reference algorithm)."""
    def rotl(x, r):
        return ((x << r) | (x >> (64 - r))) & M64

    v = [k0 ^ 0x736f6d6570736575, k1 ^ 0x646f72616e646f6d,
         k0 ^ 0x6c7967656e657261, k1 ^ 0x7465646279746573]

    def rnd():
        v[0] = (v[0] + v[1]) & M64
        v[1] = rotl(v[1], 13) ^ v[0]
        v[0] = rotl(v[0], 32)
        v[2] = (v[2] + v[3]) & M64
        v[3] = rotl(v[3], 16) ^ v[2]
        v[0] = (v[0] + v[3]) & M64
        v[3] = rotl(v[3], 21) ^ v[0]
        v[2] = (v[2] + v[1]) & M64
        v[1] = rotl(v[1], 17) ^ v[2]
        v[2] = rotl(v[2], 32)

    for m in words + [(len(words) * 8) << 56]:
        v[3] ^= m
        rnd()
        rnd()
        v[0] ^= m
    v[2] ^= 0xff
    for _ in range(4):
        rnd()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def _page_hash(page, nh, k0, k1):
    """H(page) as PROTOCOL.md ("Memory digest") defines it."""
    w = [int.from_bytes(page[i:i + 4], "little") for i in range(0, PAGE, 4)]
    m32 = (1 << 32) - 1

    def nh_pass(k):
        return sum(((w[2 * i] + k[2 * i]) & m32) * ((w[2 * i + 1] + k[2 * i + 1]) & m32)
                   for i in range(PAGE // 8)) & M64

    return _siphash24(k0, k1, [nh_pass(nh), nh_pass(nh[4:])])


def _simd_or_skip(simd, used):
    if used[0] != simd:
        pytest.skip(f"this CPU has no vector level {simd}")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("simd", [0, 1])
def test_page_hash_matches_the_protocol(seed, simd):
    ffi, lib = selftest_module()
    rng = random.Random(seed)
    nh = [rng.getrandbits(32) for _ in range(PAGE // 4 + 4)]
    k0, k1 = rng.getrandbits(64), rng.getrandbits(64)
    page = bytes(rng.getrandbits(8) for _ in range(PAGE))
    if seed == 1:
        page = bytes(PAGE)
    elif seed == 2:
        page = b"\xff" * PAGE      # every sum wraps
    buf = ffi.new("uint8_t[]", PAGE + 1)
    ffi.memmove(buf + 1, page, PAGE)    # pages sit at any offset in a frame
    used = ffi.new("int *")
    h = lib.nb_selftest_page_hash(buf + 1, ffi.new("uint32_t[]", nh), k0, k1,
                                  simd, used)
    _simd_or_skip(simd, used)
    assert h == _page_hash(page, nh, k0, k1)


@pytest.mark.parametrize("seed", range(3))
def test_digest_terms_match_the_protocol(seed):
    """T(pfn, h) - T(pfn, hz) mod 2^64; a zero page adds nothing."""
    ffi, lib = selftest_module()
    rng = random.Random(seed)
    k0, k1, h, hz = (rng.getrandbits(64) for _ in range(4))
    pfn = (1 << 32) + rng.getrandbits(20)       # pfns past 2^32
    want = (_siphash24(k0, k1, [pfn, h]) - _siphash24(k0, k1, [pfn, hz])) & M64
    assert lib.nb_selftest_digest_term(pfn, h, hz, k0, k1) == want != 0
    assert lib.nb_selftest_digest_term(pfn, hz, hz, k0, k1) == 0


@pytest.mark.parametrize("seed", range(3))
def test_disk_terms_match_the_protocol_and_differ_from_page_terms(seed):
    """D(d, b, h) - D(d, b, hz): four words, the first the tag "nbdisk"."""
    ffi, lib = selftest_module()
    rng = random.Random(seed)
    k0, k1, h, hz = (rng.getrandbits(64) for _ in range(4))
    disk, block = rng.getrandbits(3), (1 << 33) + rng.getrandbits(20)
    tag = int.from_bytes(b"nbdisk\0\0", "little")
    want = (_siphash24(k0, k1, [tag, disk, block, h]) -
            _siphash24(k0, k1, [tag, disk, block, hz])) & M64
    assert lib.nb_selftest_disk_term(disk, block, h, hz, k0, k1) == want != 0
    assert lib.nb_selftest_disk_term(disk, block, hz, hz, k0, k1) == 0
    # a block is not a page: the same numbers give another term
    assert want != lib.nb_selftest_digest_term(block, h, hz, k0, k1)


BASE = """protocol=1
arch=x86_64
page_size=4096
cpu_vendor=AuthenticAMD
ncpus=2
state_format=nbvmstat/1
memory=5368709120
segments=2
segment.0=0:c0000000
segment.1=100000000:80000000
cpuid.1.0.c=fed83203
cpuid.7.0.b=219c91a9
"""


def _with(**changes):
    lines = dict(line.split("=", 1) for line in BASE.strip().split("\n"))
    for k, v in changes.items():
        lines[k.replace("_", ".") if k.startswith("cpuid") else k] = v
    return "".join(f"{k}={v}\n" for k, v in lines.items())


def test_identical_hosts_are_compatible():
    spec_check(BASE, BASE)


def test_destination_with_more_cpu_features_is_compatible():
    spec_check(BASE, _with(**{"cpuid.7.0.b": "ffffffff"}))


@pytest.mark.parametrize("field,value,message", [
    ("page_size", "16384", "page_size"),
    ("ncpus", "4", "ncpus"),
    ("cpu_vendor", "GenuineIntel", "cpu_vendor"),
    ("segment.1", "100000000:40000000", "segment.1"),
    ("state_format", "bhyve-ckpt/1", "state_format"),
    ("arch", "aarch64", "arch"),
])
def test_mismatched_hosts_are_refused_with_the_field(field, value, message):
    with pytest.raises(MigrationError, match=message):
        spec_check(BASE, _with(**{field: value}))


def test_disks_must_agree_in_number_and_size():
    one = BASE + "disks=1\ndisk.0=1048576:4096\n"
    spec_check(one, one)
    spec_check(BASE, BASE + "disks=0\n")       # absent: no disks
    with pytest.raises(MigrationError,
                       match="disks is 1 on the source and 0 on the destination"):
        spec_check(one, BASE)
    with pytest.raises(MigrationError, match="disk.0 is 1048576:4096 on the source"):
        spec_check(one, BASE + "disks=1\ndisk.0=2097152:4096\n")


def test_cpu_feature_missing_on_the_destination_is_refused():
    with pytest.raises(MigrationError, match=r"cpuid\.7\.0\.b.*00000001"):
        spec_check(_with(**{"cpuid.7.0.b": "219c91a9"}),
                   _with(**{"cpuid.7.0.b": "219c91a8"}))


def test_delta_cache_keeps_hitting_a_sweep_larger_than_itself():
    lib = selftest_module()[1]
    # 4096 pages rewritten in order through a 1024-page cache: evicting on
    # every collision would never hit; keeping fresh entries hits a
    # steady quarter of the pages round after round
    assert lib.nb_selftest_xcache_sweep(1024, 4096, 5) == 1024
    assert lib.nb_selftest_xcache_sweep(1024, 1024, 3) == 1024


def test_delta_cache_returns_sparse_and_dense_pages_as_stored():
    ffi, lib = selftest_module()
    rng = random.Random(7)
    pages = []
    for k in range(64):
        page = bytearray(4096)
        if k % 4 == 0:                      # dense: random bytes throughout
            page[:] = rng.randbytes(4096)
        elif k % 4 == 1:                    # one byte, as a touch guest writes
            page[rng.randrange(4096)] = rng.randrange(1, 256)
        elif k % 4 == 2:                    # a few scattered words
            for _ in range(rng.randrange(1, 6)):
                at = rng.randrange(4088)
                page[at:at + 8] = rng.randbytes(8)
        else:                               # just over what is kept small
            page[100:100 + 80] = rng.randbytes(80)
        pages.append(bytes(page))
    buf = ffi.from_buffer(b"".join(pages))
    assert lib.nb_selftest_xcache_roundtrip(64, buf, 64) == 64


def test_delta_cache_returns_zeros_for_pages_sent_as_zeros():
    lib = selftest_module()[1]
    # a page sent as zeros must not be delta-encoded against older content:
    # the sweep ends by sending every page as zeros and returns -1 if one
    # then comes back as anything else
    assert lib.nb_selftest_xcache_sweep(64, 64, 2) == 64
    assert lib.nb_selftest_xcache_sweep(64, 64, 1) == 0     # cold first round


def test_delta_cache_keeps_a_page_sent_as_zeros_as_zeros():
    lib = selftest_module()[1]
    # a page the guest zeroes and writes again (a byte a pass that wraps to
    # 0 every 256 passes) went raw, 4 KiB, when the cache forgot it: now
    # its next write is a delta against zeros, a few bytes
    n = lib.nb_selftest_xcache_zeroed(0)
    assert 0 < n <= 8, n
    # a fresher entry for another key keeps the slot: no zeros kept, and
    # nothing older either (a miss, so the page goes whole)
    assert lib.nb_selftest_xcache_zeroed(1) == -1
    # an entry of zeros keeps its slot from no page, even a fresh one
    n = lib.nb_selftest_xcache_zeroed(2)
    assert 0 < n <= 8, n
