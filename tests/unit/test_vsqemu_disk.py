"""The disk check of benchmarks/compare_qemu.py's disk workload
(benchmarks/vsqemu/disk.py): what counts as a faithful copy of a disk
whose guest goes on writing on the destination."""

import os

from benchmarks.vsqemu import disk

REGION_BLOCKS = 8
REGION = REGION_BLOCKS * disk.BLOCK


def _block(b, versions):
    """Block ``b`` with sector s at versions[s], as the guest writes it."""
    return b"".join(disk.block_sector(b, v, s) for s, v in enumerate(versions))


def _pair(tmp_path, src_blocks, dst_blocks, tail=b"\x5a" * 8192):
    """Two disk files: the region's blocks, then ``tail`` (same on both)."""
    paths = []
    for name, blocks in (("src.img", src_blocks), ("dst.img", dst_blocks)):
        path = tmp_path / name
        path.write_bytes(b"".join(blocks) + tail)
        paths.append(path)
    return paths


def _region(overrides_src=None, overrides_dst=None, version=4):
    src = [_block(b, [version] * 8) for b in range(REGION_BLOCKS)]
    dst = list(src)
    for b, versions in (overrides_src or {}).items():
        src[b] = _block(b, versions)
    for b, versions in (overrides_dst or {}).items():
        dst[b] = _block(b, versions)
    return src, dst


def test_block_sector_matches_the_guest_layout():
    # words 0-2 of sector 0: magic, block number, version
    first = disk.block_sector(7, 3, 0)
    assert first[:8] == disk.MAGIC.to_bytes(8, "little")
    assert first[8:16] == (7).to_bytes(8, "little")
    assert first[16:24] == (3).to_bytes(8, "little")
    assert disk.block_sector(7, 3, 1) != disk.block_sector(7, 4, 1)


def test_identical_disks_pass(tmp_path):
    src, dst = _region()
    res = disk.compare(*_pair(tmp_path, src, dst), REGION)
    assert res["disk_ok"] and res["disk_rewritten_blocks"] == 0
    assert res["disk_note"] == "identical"


def test_blocks_the_destination_rewrote_later_pass(tmp_path):
    # block 2 rewritten at version 5; block 5 paused mid-write at version 6
    src, dst = _region(overrides_dst={2: [5] * 8, 5: [6, 6, 6, 4, 4, 4, 4, 4]})
    res = disk.compare(*_pair(tmp_path, src, dst), REGION)
    assert res["disk_ok"], res
    assert res["disk_rewritten_blocks"] == 2


def test_a_block_the_source_stopped_in_mid_write_may_be_completed(tmp_path):
    # the source's guest stopped after 3 sectors of version 5; the
    # destination's guest finished the block
    src, dst = _region(overrides_src={1: [5, 5, 5, 4, 4, 4, 4, 4]},
                       overrides_dst={1: [5] * 8})
    res = disk.compare(*_pair(tmp_path, src, dst), REGION)
    assert res["disk_ok"], res


def test_a_stale_sector_fails(tmp_path):
    src, dst = _region(overrides_dst={3: [4, 4, 3, 4, 4, 4, 4, 4]})
    res = disk.compare(*_pair(tmp_path, src, dst), REGION)
    assert not res["disk_ok"]
    assert res["disk_note"] == "block 3 sector 2"


def test_a_sector_of_another_block_fails(tmp_path):
    src, dst = _region()
    dst[4] = disk.block_sector(6, 5, 0) + dst[4][disk.SECTOR:]
    res = disk.compare(*_pair(tmp_path, src, dst), REGION)
    assert not res["disk_ok"] and "block 4 sector 0" in res["disk_note"]


def test_a_difference_beyond_the_region_fails(tmp_path):
    src, dst = _region()
    s, d = _pair(tmp_path, src, dst)
    with open(d, "r+b") as f:
        f.seek(REGION + 4096)
        f.write(b"\x00")
    res = disk.compare(s, d, REGION)
    assert not res["disk_ok"] and "beyond the writer's region" in res["disk_note"]


def test_sizes_that_differ_fail(tmp_path):
    src, dst = _region()
    s, d = _pair(tmp_path, src, dst)
    os.truncate(d, REGION)
    assert not disk.compare(s, d, REGION)["disk_ok"]


def test_make_image_and_copy_sparse_keep_the_hole(tmp_path):
    image, copy = tmp_path / "image.img", tmp_path / "copy.img"
    size = 8 << 20
    disk.make_image(image, size, 64 << 10, 1 << 20, 1 << 20)
    disk.copy_sparse(image, copy)
    assert copy.read_bytes() == image.read_bytes()
    assert os.path.getsize(copy) == size
    # data up to 2 MiB + 64 KiB, the rest a hole (file systems allocate
    # in blocks of at most a few MiB beyond the data)
    assert disk.allocated(copy) < size // 2
    text = image.read_bytes()[(64 << 10) + (1 << 20):(64 << 10) + (2 << 20)]
    assert text.count(b" ") > 10000


def test_parse_size_and_region():
    assert disk.parse_size("512M") == 512 << 20
    assert disk.parse_size("4096") == 4096
    assert disk.region_bytes("mode=idle disk=1 disksize=128K") == 128 << 10
