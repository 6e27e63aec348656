"""nova_bhyve.sparse: data extents and copies that keep holes."""

import errno
import mmap
import os

import pytest

from nova_bhyve import sparse

from .conftest import memfd_with

MIB = 1 << 20
PAGE = mmap.PAGESIZE


def _memfd_holes_are_pages():
    """True where a memfd keeps holes a page apart (no large shmem folios)."""
    if not hasattr(os, "memfd_create"):
        return False
    fd = os.memfd_create("nb-sparse-probe")
    try:
        os.ftruncate(fd, 4 * MIB)
        os.pwrite(fd, b"p", 0)
        return os.lseek(fd, 0, sparse.SEEK_HOLE) == PAGE
    finally:
        os.close(fd)


needs_page_holes = pytest.mark.skipif(
    not _memfd_holes_are_pages(),
    reason="needs a memfd whose holes are single pages")


def _allocated(fd):
    return os.fstat(fd).st_blocks * 512


@needs_page_holes
def test_data_extents_are_the_written_pages_only():
    fd = memfd_with(4 * MIB, [(0, b"a" * PAGE), (MIB, b"b" * 2 * PAGE)])
    try:
        assert list(sparse.data_extents(fd, 4 * MIB)) == [
            (0, PAGE), (MIB, 2 * PAGE)]
    finally:
        os.close(fd)


@needs_page_holes
def test_data_extents_stop_at_the_size_given():
    fd = memfd_with(4 * MIB, [(0, b"a" * PAGE), (MIB, b"b" * 2 * PAGE),
                              (3 * MIB, b"c" * PAGE)])
    try:
        # the size cuts an extent short
        assert list(sparse.data_extents(fd, MIB + PAGE)) == [
            (0, PAGE), (MIB, PAGE)]
        # data beyond the size, after a hole, is not an extent
        assert list(sparse.data_extents(fd, 2 * MIB)) == [
            (0, PAGE), (MIB, 2 * PAGE)]
        assert list(sparse.data_extents(fd, 0)) == []
    finally:
        os.close(fd)


@needs_page_holes
def test_a_file_of_holes_has_no_extents():
    fd = memfd_with(4 * MIB)
    try:
        assert list(sparse.data_extents(fd, 4 * MIB)) == []
    finally:
        os.close(fd)


def _failing_seek(err):
    def lseek(fd, pos, how):
        raise OSError(err, os.strerror(err))
    return lseek


def test_a_file_system_that_cannot_tell_holes_is_all_data(monkeypatch):
    monkeypatch.setattr(sparse.os, "lseek", _failing_seek(errno.EINVAL))
    assert list(sparse.data_extents(3, 5 * MIB)) == [(0, 5 * MIB)]


def test_a_seek_that_does_not_move_on_leaves_the_rest_as_data(monkeypatch):
    monkeypatch.setattr(sparse.os, "lseek", lambda fd, pos, how: MIB)
    assert list(sparse.data_extents(3, 5 * MIB)) == [(MIB, 4 * MIB)]


def test_other_seek_errors_are_not_taken_for_holes(monkeypatch):
    monkeypatch.setattr(sparse.os, "lseek", _failing_seek(errno.EIO))
    with pytest.raises(OSError) as exc:
        list(sparse.data_extents(3, MIB))
    assert exc.value.errno == errno.EIO


@needs_page_holes
def test_copy_extents_copies_the_data_and_writes_no_holes():
    data = os.urandom(3 * PAGE)
    src = memfd_with(8 * MIB, [(PAGE, data), (5 * MIB, data[:PAGE])])
    dst = memfd_with(8 * MIB)
    try:
        assert sparse.copy_extents(src, dst, 8 * MIB) == 4 * PAGE
        assert os.pread(dst, 3 * PAGE, PAGE) == data
        assert os.pread(dst, PAGE, 5 * MIB) == data[:PAGE]
        assert os.pread(dst, PAGE, 0) == bytes(PAGE)
        assert _allocated(dst) < MIB
    finally:
        os.close(src)
        os.close(dst)


@needs_page_holes
def test_copy_extents_fails_on_a_source_shorter_than_the_size():
    src = memfd_with(MIB, [(0, b"x" * PAGE)])
    dst = memfd_with(2 * MIB)
    try:
        with pytest.raises(sparse.ShortRead, match="holds 1048576 bytes"):
            sparse.copy_extents(src, dst, 2 * MIB)
    finally:
        os.close(src)
        os.close(dst)


@needs_page_holes
def test_copy_extents_fails_when_the_source_shrinks(monkeypatch):
    src = memfd_with(MIB, [(0, b"x" * 2 * PAGE)])
    dst = memfd_with(MIB)
    monkeypatch.setattr(sparse.os, "pread", lambda fd, n, off: b"")
    try:
        with pytest.raises(sparse.ShortRead, match="inside a data extent"):
            sparse.copy_extents(src, dst, MIB)
    finally:
        os.close(src)
        os.close(dst)


def _file_with_a_page_at_1mib(path, size=2 * MIB):
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(MIB)
        f.write(b"z" * PAGE)


@pytest.mark.parametrize("size,expected", [
    (3 * MIB, 3 * MIB),     # grown to the size asked
    (None, 2 * MIB),        # the source's size
    (MIB, 2 * MIB),         # never shorter than the source
])
def test_copy_file_keeps_the_data_and_its_size(tmp_path, size, expected):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _file_with_a_page_at_1mib(src)
    copied = sparse.copy_file(src, dst, size)
    assert PAGE <= copied <= 2 * MIB
    assert os.path.getsize(dst) == expected
    content = dst.read_bytes()
    assert content[MIB:MIB + PAGE] == b"z" * PAGE
    assert content.count(b"z") == PAGE


def test_copy_file_writes_no_holes_where_the_file_system_has_them(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _file_with_a_page_at_1mib(src, size=64 * MIB)
    if os.stat(src).st_blocks * 512 >= MIB:
        pytest.skip("this file system keeps no holes")
    sparse.copy_file(src, dst)
    assert os.stat(dst).st_blocks * 512 < MIB


def test_a_failed_copy_file_leaves_no_file(tmp_path, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _file_with_a_page_at_1mib(src)
    monkeypatch.setattr(sparse.os, "pread", lambda fd, n, off: b"")
    with pytest.raises(sparse.ShortRead):
        sparse.copy_file(src, dst, 3 * MIB)
    assert not dst.exists()


def test_copy_file_of_a_missing_source_leaves_the_destination(tmp_path):
    dst = tmp_path / "dst"
    dst.write_bytes(b"kept")
    with pytest.raises(FileNotFoundError):
        sparse.copy_file(tmp_path / "nothing", dst)
    assert dst.read_bytes() == b"kept"
