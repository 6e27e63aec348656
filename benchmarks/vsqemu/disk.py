"""Disks of the disk-writing workloads: the image both guests start from,
and the check that a moved disk arrived whole.

The image (``make_image``): the guest's disk-writer region at the start,
then pseudo-random data (incompressible, as media or compressed files
are), then word salad (text-like, zstd makes about a third of it), then
a hole (never-written space, as a file system's free space is).  Both
hypervisors start from copies of the same file.

The check (``compare``): after a migration the source's file is final
(its guest stopped for good), and the destination's guest has gone on
writing its region.  Outside the region the two files must be equal;
inside it every 512-byte sector of the destination must hold either the
source's sector or that sector of a newer version of its block, as the
guest writes it (guest/README.md, "Disk writer"): a sector holding an
older version, or anything else, is a lost or stale write.
"""

import hashlib
import os
import random
import struct

from nova_bhyve import polling, sparse
from nova_bhyve.testhost.console import parse_console

BLOCK, SECTOR = 4096, 512
MAGIC = 0x31304B5349444E42          # "NBDISK01", word 0 of a written block
_M64 = (1 << 64) - 1
_WORDS = ("kernel page block disk guest host migrate round dirty write read "
          "sector cache file system log entry value table index record user "
          "time error state commit the a of to and in is on for with").split()


def parse_size(text):
    """Bytes of a size such as ``512M`` (K, M, G: powers of 1024)."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if mult > 1 else text) * mult


def region_bytes(cmdline):
    """The guest's disk-writer region: ``disksize=`` of its command line."""
    for tok in cmdline.split():
        if tok.startswith("disksize="):
            return parse_size(tok[9:])
    raise ValueError("a disk workload names its writer region (disksize=)")


def make_image(path, size, region, random_bytes, text_bytes):
    """Write the workload's disk image: ``random_bytes`` of pseudo-random
    data and ``text_bytes`` of word salad after the writer's ``region``
    (itself random data until the guest writes it), the rest a hole."""
    rng = random.Random(13)
    salad = " ".join(rng.choices(_WORDS, k=200_000)).encode()[:1 << 20]
    with open(path, "wb") as f:
        f.truncate(size)
        left = region + random_bytes
        while left:
            n = min(left, 8 << 20)
            f.write(rng.randbytes(n))
            left -= n
        left = text_bytes
        while left:
            n = min(left, len(salad))
            f.write(salad[:n])
            left -= n


def copy_sparse(src, dst):
    """Copy a disk image keeping its holes (shutil.copyfile would fill
    them with zeros, which QEMU's mirror then sends as data)."""
    sparse.copy_file(src, dst)


def allocated(path):
    """Bytes of a file's allocated extents (its holes not counted)."""
    return os.stat(path).st_blocks * 512


def _mix(x):
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def block_sector(block, version, sector):
    """Sector ``sector`` of block ``block`` at ``version``, as the guest writes it."""
    words = []
    for w in range(sector * 64, sector * 64 + 64):
        if w < 3:
            words.append((MAGIC, block, version)[w])
        else:
            words.append(_mix((_mix(((version << 32) ^ block) & _M64) + w) & _M64))
    return struct.pack("<64Q", *words)


def _version(data):
    """The version in a block's first sector, 0 if the guest never wrote it."""
    magic, _, version = struct.unpack_from("<3Q", data)
    return version if magic == MAGIC else 0


def _sector_version(block, data, sector, near):
    """The version of one sector as the guest wrote it (it writes a block
    sector by sector, so a stopped guest can leave a block's first sectors
    one version ahead of the others), 0 for anything else."""
    for version in (near, near - 1):
        if version > 0 and data == block_sector(block, version, sector):
            return version
    return 0


def _region_problems(src, dst, nblocks):
    """Compare the writer's region sector by sector (module docstring)."""
    bad, newer = [], 0
    for b in range(nblocks):
        a, c = src[b * BLOCK:(b + 1) * BLOCK], dst[b * BLOCK:(b + 1) * BLOCK]
        if a == c:
            continue
        near = _version(a)
        for s in range(BLOCK // SECTOR):
            sa, sc = a[s * SECTOR:(s + 1) * SECTOR], c[s * SECTOR:(s + 1) * SECTOR]
            if sa != sc and not _newer_sector(
                    b, sc, _sector_version(b, sa, s, near), s):
                bad.append(f"block {b} sector {s}")
                break
        else:
            newer += 1
    return bad, newer


def _newer_sector(block, got, since, sector, lookahead=256):
    """True if ``got`` is sector ``sector`` of ``block`` at a version above
    ``since`` (a write the destination's guest made after the move)."""
    return any(got == block_sector(block, v, sector)
               for v in range(since + 1, since + 1 + lookahead))


def compare(src_path, dst_path, region):
    """Check a moved disk (module docstring); return the check's figures."""
    size = os.path.getsize(src_path)
    if os.path.getsize(dst_path) != size:
        return {"disk_ok": False, "disk_note": f"sizes differ: {size} and "
                f"{os.path.getsize(dst_path)} bytes"}
    with open(src_path, "rb") as fs, open(dst_path, "rb") as fd:
        a, c = fs.read(region), fd.read(region)
        bad, newer = _region_problems(a, c, region // BLOCK)
        ha, hc = hashlib.sha256(), hashlib.sha256()
        while True:
            x, y = fs.read(8 << 20), fd.read(8 << 20)
            if not x and not y:
                break
            ha.update(x)
            hc.update(y)
    rest_ok = ha.digest() == hc.digest()
    notes = bad[:3] + ([] if rest_ok else ["beyond the writer's region"])
    return {"disk_ok": not bad and rest_ok, "disk_rewritten_blocks": newer,
            "disk_note": "; ".join(notes) or "identical" + (
                f" but for {newer} blocks the destination's guest rewrote since"
                if newer else ""),
            "disk_sha256_beyond_region": ha.hexdigest()}


def _disk_passes(text):
    beats = parse_console(text).heartbeats
    return (beats[-1].disk_passes or 0) if beats else 0


def verify_moved(src_text, dst_text, pause, resume, src_path, dst_path, region,
                 timeout=60.0):
    """After a migration: wait until the destination's guest has finished
    another disk-writer pass (its re-reads cover every block of its region:
    a stale block prints FAIL diskold), then pause it, ``compare`` the two
    files and let it run again.  ``dst_text`` returns the destination's
    console so far."""
    before = _disk_passes(src_text)
    went_on = polling.poll(lambda: _disk_passes(dst_text()) > before, timeout, 0.2)
    pause()
    try:
        res = compare(src_path, dst_path, region)
    finally:
        resume()
    res["disk_passes_src"], res["disk_passes_dst"] = before, _disk_passes(dst_text())
    if not went_on:
        res["disk_ok"] = False
        res["disk_note"] = (f"the destination's guest finished no disk pass in "
                            f"{timeout:.0f} s; " + res["disk_note"])
    return res
