"""Checkpoint file sets: RAM, state blob and metadata."""

import json
import os
import zlib

import pytest

from nova_bhyve.machine import checkpoint

from .conftest import memfd_with

MiB = 1 << 20


def _meta(size, blob):
    return checkpoint.CheckpointMeta(
        vmname="vm", ncpus=1, memsize=size, lowmem=size, highmem=0,
        highbase=4 << 30, page_size=4096, state_format="nbvmstat/1",
        kern_bytes=len(blob), kern_crc32=zlib.crc32(blob), arch="x86_64",
        cpu_vendor="GenuineIntel")


def test_round_trip_keeps_ram_and_holes(tmp_path):
    size = 8 * MiB
    writes = [(0, b"low"), (3 * MiB + 5, b"x" * 5000), (size - 4096, b"end")]
    src = memfd_with(size, writes)
    files = checkpoint.CheckpointFiles(str(tmp_path / "ckp"))
    blob = b"STATE" * 100
    checkpoint.write(files, _meta(size, blob), src, blob)
    assert files.complete()
    assert os.path.getsize(files.ram) == size
    # never-written guest memory stays a hole in the RAM file
    assert os.stat(files.ram).st_blocks * 512 < size // 2
    assert json.loads(open(files.meta).read())["memsize"] == size

    meta = checkpoint.read_meta(files)
    assert checkpoint.read_kern(files, meta) == blob
    dst = memfd_with(size, [])
    checkpoint.load_ram(files, meta, dst, size)
    for off, data in writes:
        assert os.pread(dst, len(data), off) == data
    assert os.pread(dst, 10, 6 * MiB) == bytes(10)
    files.remove()
    assert not any(os.path.exists(p) for p in (files.ram, files.kern, files.meta))


def _written_set(tmp_path, size):
    files = checkpoint.CheckpointFiles(str(tmp_path / "ckp"))
    blob = b"S" * 64
    checkpoint.write(files, _meta(size, blob), memfd_with(size, [(0, b"ram")]), blob)
    return files, checkpoint.read_meta(files)


def test_a_ram_file_cut_short_before_it_loads_is_refused(tmp_path):
    size = 2 * MiB
    files, meta = _written_set(tmp_path, size)
    os.truncate(files.ram, MiB)         # after read_meta checked its size
    with pytest.raises(checkpoint.CheckpointError, match="short read"):
        checkpoint.load_ram(files, meta, memfd_with(size, []), size)


def test_a_read_cut_short_inside_the_ram_data_is_refused(tmp_path, monkeypatch):
    size = 2 * MiB
    files, meta = _written_set(tmp_path, size)
    monkeypatch.setattr(os, "pread", lambda fd, n, off: b"")
    with pytest.raises(checkpoint.CheckpointError, match="short read"):
        checkpoint.load_ram(files, meta, memfd_with(size, []), size)


def test_untrusted_sets_are_refused(tmp_path):
    size = 2 * MiB
    files = checkpoint.CheckpointFiles(str(tmp_path / "ckp"))
    blob = b"S" * 64
    checkpoint.write(files, _meta(size, blob), memfd_with(size, []), blob)

    with pytest.raises(checkpoint.CheckpointError, match="flavor changed"):
        checkpoint.load_ram(files, checkpoint.read_meta(files),
                            memfd_with(4 * MiB, []), 4 * MiB)
    with open(files.kern, "r+b") as f:
        f.write(b"T")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.read_kern(files, checkpoint.read_meta(files))
    os.truncate(files.ram, MiB)
    with pytest.raises(checkpoint.CheckpointError, match="memsize"):
        checkpoint.read_meta(files)
    os.unlink(files.meta)
    with pytest.raises(checkpoint.CheckpointError, match="incomplete"):
        checkpoint.read_meta(files)


def test_meta_must_be_consistent(tmp_path):
    files = checkpoint.CheckpointFiles(str(tmp_path / "ckp"))
    blob = b"S" * 64
    checkpoint.write(files, _meta(MiB, blob), memfd_with(MiB, []), blob)
    raw = json.loads(open(files.meta).read())
    raw["highmem"] = 4096
    with open(files.meta, "w") as f:
        json.dump(raw, f)
    with pytest.raises(checkpoint.CheckpointError, match="lowmem"):
        checkpoint.read_meta(files)
    with pytest.raises(checkpoint.CheckpointError, match="kern_bytes"):
        checkpoint.write(files, _meta(MiB, b"x"), memfd_with(MiB, []), blob)


def test_a_set_suspended_before_version_2_still_resumes(tmp_path):
    # checkpoint.py's .meta had kern_format and no version, arch or vendor
    size = MiB
    files = checkpoint.CheckpointFiles(str(tmp_path / "ckp"))
    blob = b"S" * 64
    checkpoint.write(files, _meta(size, blob), memfd_with(size, [(0, b"low")]), blob)
    raw = json.loads(open(files.meta).read())
    for name in ("version", "state_format", "arch", "cpu_vendor"):
        del raw[name]
    raw["kern_format"] = "nb-testhost-state-1"
    with open(files.meta, "w") as f:
        json.dump(raw, f)
    meta = checkpoint.read_meta(files)
    assert (meta.version, meta.state_format, meta.arch) == (0, "nbvmstat/1", "")
    assert checkpoint.read_kern(files, meta) == blob
    with open(files.kern, "r+b") as f:
        f.write(b"T")
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.read_kern(files, meta)
