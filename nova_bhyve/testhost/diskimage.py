"""Read what the guest payload's disk writer leaves on its disk.

The block format is specified in ``guest/README.md`` ("Disk writer"):
4 KiB blocks of 512 little-endian 64-bit words, word 0 the magic
``NBDISK01``, word 1 the block number, word 2 the version, the rest a
splitmix64 stream derived from (block, version).  A block never written
(version 0) is all zeros.
"""

import struct

BLOCK = 4096
SECTOR = 512
MAGIC = 0x31304B5349444E42          # "NBDISK01"
_MASK = (1 << 64) - 1
_WORDS = BLOCK // 8


def _mix(x):
    """splitmix64's output function (as the guest's mix64)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def block_bytes(block, version):
    """Return the 4096 bytes the guest writes to ``block`` at ``version``."""
    if version == 0:
        return bytes(BLOCK)
    seed = _mix(((version << 32) ^ block) & _MASK)
    words = [MAGIC, block, version]
    words += [_mix((seed + w) & _MASK) for w in range(3, _WORDS)]
    return struct.pack(f"<{_WORDS}Q", *words)


def sector_versions(image, blocks, candidates):
    """Return the version of every sector of blocks ``0..blocks-1``.

    ``image`` holds the disk's bytes; each sector is matched against the
    ``candidates`` versions (0, all zeros, is always a candidate) and gets
    None if it matches none of them: a torn, lost or foreign write.  The
    result is a flat list, sector 0 of block 0 first.
    """
    versions = []
    candidates = sorted(set(candidates) | {0})
    for block in range(blocks):
        expected = {v: block_bytes(block, v) for v in candidates}
        for offset in range(0, BLOCK, SECTOR):
            have = image[block * BLOCK + offset:block * BLOCK + offset + SECTOR]
            match = [v for v, data in expected.items()
                     if data[offset:offset + SECTOR] == have]
            versions.append(match[0] if match else None)
    return versions


def is_write_front(versions):
    """True if ``versions`` reads ``[v+1] * k + [v] * n`` (k may be 0).

    That is what the writer leaves at a pause: the sectors it has written
    in its current pass, then those still holding the previous pass.
    """
    if None in versions or not versions:
        return False
    distinct = sorted(set(versions), reverse=True)
    if len(distinct) == 1:
        return True
    newer, older = distinct[0], distinct[-1]
    k = versions.index(older)
    return len(distinct) == 2 and newer == older + 1 and \
        versions == [newer] * k + [older] * (len(versions) - k)
