"""Unit tests of the disk writer's block format as read from a disk image."""

import struct

from nova_bhyve.testhost.diskimage import (
    BLOCK,
    MAGIC,
    SECTOR,
    block_bytes,
    is_write_front,
    sector_versions,
)


def test_blocks_are_self_describing_and_differ_by_version():
    data = block_bytes(5, 3)
    assert len(data) == BLOCK
    assert struct.unpack_from("<3Q", data) == (MAGIC, 5, 3)
    assert data != block_bytes(5, 4) and data != block_bytes(6, 3)
    assert block_bytes(5, 0) == bytes(BLOCK)


def test_stream_words_match_the_guest():
    # values computed with guest/disk.c's mix64 compiled on its own
    assert struct.unpack_from("<Q", block_bytes(0, 1), 3 * 8)[0] == \
        0x903B68E361E6B040
    assert struct.unpack_from("<Q", block_bytes(7, 300), 511 * 8)[0] == \
        0x62F1A3FB9CC5413C
    # two versions of a block share no stream word at the same place
    a, b = block_bytes(1, 1), block_bytes(1, 2)
    words_a = struct.unpack("<512Q", a)[3:]
    words_b = struct.unpack("<512Q", b)[3:]
    assert all(x != y for x, y in zip(words_a, words_b))


def test_sector_versions_follow_a_torn_block():
    image = bytearray(block_bytes(0, 2) + block_bytes(1, 1) + bytes(BLOCK))
    # block 1 half rewritten at version 2: sectors 0..2 new, the rest old
    image[BLOCK:BLOCK + 3 * SECTOR] = block_bytes(1, 2)[:3 * SECTOR]
    versions = sector_versions(bytes(image), 3, [1, 2])
    assert versions == [2] * 8 + [2] * 3 + [1] * 5 + [0] * 8
    assert not is_write_front(versions)              # three versions
    assert is_write_front(versions[:16])
    image[5] ^= 1
    assert sector_versions(bytes(image), 1, [1, 2])[0] is None


def test_write_front_shapes():
    assert is_write_front([3, 3, 2, 2])
    assert is_write_front([2, 2]) and is_write_front([1, 0, 0])
    assert not is_write_front([2, 3])                # older before newer
    assert not is_write_front([3, 2, 3])             # a block went back
    assert not is_write_front([3, 1])                # a pass was lost
    assert not is_write_front([2, None]) and not is_write_front([])
