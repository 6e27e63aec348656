"""The engine's own AES-256-GCM (wire/gcm.c) against an independent one.

The reference is the ``cryptography`` package's AESGCM (its own OpenSSL
build).  Messages are fed to gcm.c in uneven pieces, as the destination
opens a frame while its payload arrives.
"""

import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .conftest import selftest_module

# The GCM specification's test case 16 (AES-256, 60-byte text, 20 bytes
# of additional data).
SPEC_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308"
                         "feffe9928665731c6d6a8f9467308308")
SPEC_IV = bytes.fromhex("cafebabefacedbaddecaf888")
SPEC_AAD = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
SPEC_PT = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
SPEC_CT = bytes.fromhex(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662")
SPEC_TAG = bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")


def _gcm(key, iv, aad, data, pieces, decrypt):
    ffi, lib = selftest_module()
    out = ffi.new("uint8_t[]", max(len(data), 1))
    tag = ffi.new("uint8_t[16]")
    cuts = ffi.new("size_t[]", pieces or [0])
    rc = lib.nb_selftest_gcm(key, iv, aad, len(aad), data, out, len(data),
                             cuts, len(pieces), int(decrypt), tag)
    if rc < 0:
        pytest.skip("this CPU has no VAES / VPCLMULQDQ / AVX-512: the "
                    "engine uses OpenSSL's AES-GCM")
    return bytes(ffi.buffer(out, len(data))), bytes(ffi.buffer(tag, 16))


def test_the_specifications_test_case_16():
    ct, tag = _gcm(SPEC_KEY, SPEC_IV, SPEC_AAD, SPEC_PT, [7, 16, 1], False)
    assert (ct, tag) == (SPEC_CT, SPEC_TAG)
    pt, tag = _gcm(SPEC_KEY, SPEC_IV, SPEC_AAD, SPEC_CT, [33], True)
    assert (pt, tag) == (SPEC_PT, SPEC_TAG)


def _pieces(rng, length):
    cuts = []
    while sum(cuts) < length and len(cuts) < 40:
        cuts.append(rng.choice((1, 15, 16, 17, 255, 256, 257, 4096,
                                rng.randrange(1, 5000))))
    return cuts


@pytest.mark.parametrize("seed", range(6))
def test_matches_an_independent_aes_gcm_in_any_pieces(seed):
    rng = random.Random(seed)
    for _ in range(60):
        key, iv = rng.randbytes(32), rng.randbytes(12)
        aad = rng.randbytes(rng.choice((0, 12, 16, 31)))
        length = rng.choice((0, 1, 15, 16, 255, 256, 257, 4096, 65536 + 12,
                             rng.randrange(0, 300000)))
        pt = rng.randbytes(length)
        sealed = AESGCM(key).encrypt(iv, pt, aad)
        ct, tag = _gcm(key, iv, aad, pt, _pieces(rng, length), False)
        assert ct + tag == sealed
        back, tag2 = _gcm(key, iv, aad, ct, _pieces(rng, length), True)
        assert (back, tag2) == (pt, tag)


def test_a_changed_byte_changes_the_tag():
    rng = random.Random(7)
    key, iv, pt = rng.randbytes(32), rng.randbytes(12), rng.randbytes(9000)
    ct, tag = _gcm(key, iv, b"hdr", pt, [], False)
    for at in (0, 255, 4096, 8999):
        bad = bytearray(ct)
        bad[at] ^= 0x01
        _pt, bad_tag = _gcm(key, iv, b"hdr", bytes(bad), [], True)
        assert bad_tag != tag
    _pt, aad_tag = _gcm(key, iv, b"hdR", ct, [], True)
    assert aad_tag != tag
