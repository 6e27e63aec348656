"""nova_bhyve.sparse: data extents and copies that keep holes."""

import os

import pytest

from nova_bhyve import sparse

MIB = 1 << 20
PAGE = 4096


def _memfd_with(size, writes):
    """A memfd (holes at page granularity on any Linux) of ``size`` bytes
    with ``writes`` ({offset: bytes}) written into it."""
    fd = os.memfd_create("nb-sparse-test")
    os.ftruncate(fd, size)
    for off, data in writes.items():
        os.pwrite(fd, data, off)
    return fd


def _allocated(fd):
    return os.fstat(fd).st_blocks * 512


def test_data_extents_are_the_written_pages_only():
    fd = _memfd_with(4 * MIB, {0: b"a" * PAGE, MIB: b"b" * 2 * PAGE})
    try:
        assert list(sparse.data_extents(fd, 4 * MIB)) == [
            (0, PAGE), (MIB, 2 * PAGE)]
    finally:
        os.close(fd)


def test_data_extents_stop_at_the_size_given():
    fd = _memfd_with(4 * MIB, {0: b"a" * PAGE, MIB: b"b" * 2 * PAGE,
                               3 * MIB: b"c" * PAGE})
    try:
        assert list(sparse.data_extents(fd, MIB + PAGE)) == [
            (0, PAGE), (MIB, PAGE)]
        assert list(sparse.data_extents(fd, 0)) == []
    finally:
        os.close(fd)


def test_a_file_of_holes_has_no_extents():
    fd = _memfd_with(4 * MIB, {})
    try:
        assert list(sparse.data_extents(fd, 4 * MIB)) == []
    finally:
        os.close(fd)


def test_copy_extents_copies_the_data_and_writes_no_holes():
    data = os.urandom(3 * PAGE)
    src = _memfd_with(8 * MIB, {PAGE: data, 5 * MIB: data[:PAGE]})
    dst = _memfd_with(8 * MIB, {})
    try:
        assert sparse.copy_extents(src, dst, 8 * MIB) == 4 * PAGE
        assert os.pread(dst, 3 * PAGE, PAGE) == data
        assert os.pread(dst, PAGE, 5 * MIB) == data[:PAGE]
        assert os.pread(dst, PAGE, 0) == bytes(PAGE)
        assert _allocated(dst) == 4 * PAGE
    finally:
        os.close(src)
        os.close(dst)


def test_copy_extents_fails_when_the_source_shrinks(monkeypatch):
    src = _memfd_with(MIB, {0: b"x" * 2 * PAGE})
    dst = _memfd_with(MIB, {})
    monkeypatch.setattr(sparse.os, "pread", lambda fd, n, off: b"")
    try:
        with pytest.raises(sparse.ShortRead, match="inside a data extent"):
            sparse.copy_extents(src, dst, MIB)
    finally:
        os.close(src)
        os.close(dst)


def test_copy_file_keeps_holes_and_grows_to_the_size_asked(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.truncate(2 * MIB)
        f.seek(MIB)
        f.write(b"z" * PAGE)
    assert sparse.copy_file(src, dst, 3 * MIB) == PAGE
    assert os.path.getsize(dst) == 3 * MIB
    with open(dst, "rb") as f:
        f.seek(MIB)
        assert f.read(PAGE) == b"z" * PAGE
    assert dst.read_bytes().count(b"z") == PAGE
