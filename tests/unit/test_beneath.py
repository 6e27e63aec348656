"""Opening below a directory: no symbolic link anywhere, no escape, no
hard-linked regular file.  Linux cases use real files; FreeBSD's is mocked.
"""

import errno
import os
import sys
from unittest import mock

import pytest

from nova_bhyve import beneath

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="openat2(2) is Linux's")


@pytest.fixture
def tree(tmp_path):
    """root/ (trusted) with dir/file; outside/secret beside it."""
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_text("inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    return root, outside


def _read(fd):
    with os.fdopen(fd, "rb") as f:
        return f.read()


@linux_only
def test_a_plain_file_opens(tree):
    root, _ = tree
    assert _read(beneath.open_beneath(str(root), "dir/file",
                                      os.O_RDONLY)) == b"inside"
    dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _read(beneath.open_regular(dirfd, "dir/file",
                                          os.O_RDONLY)) == b"inside"
    finally:
        os.close(dirfd)


@linux_only
@pytest.mark.parametrize("where", ["last", "middle", "inner"])
def test_symlinks_are_refused(tree, where):
    root, outside = tree
    if where == "last":         # root/link -> outside/secret
        (root / "link").symlink_to(outside / "secret")
        rel = "link"
    elif where == "middle":     # root/ldir -> outside, then ldir/secret
        (root / "ldir").symlink_to(outside)
        rel = "ldir/secret"
    else:                       # a link that stays inside is refused too
        (root / "ldir").symlink_to(root / "dir")
        rel = "ldir/file"
    for flags in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND | os.O_CREAT):
        with pytest.raises(beneath.UnsafePathError, match="symbolic link"):
            beneath.open_beneath(str(root), rel, flags)
    with pytest.raises(OSError):
        beneath.create_beneath(str(root), rel)
    assert (outside / "secret").read_text() == "secret"


@linux_only
def test_replace_refuses_a_planted_link_and_replaces_a_stale_file(tree):
    root, outside = tree
    (root / "dir" / "out").symlink_to(outside / "secret")
    with pytest.raises(beneath.UnsafePathError, match="symbolic link"):
        beneath.create_beneath(str(root), "dir/out", replace=True)
    assert (root / "dir" / "out").is_symlink()
    os.link(outside / "secret", root / "dir" / "hard")
    with pytest.raises(beneath.UnsafePathError, match="hard links"):
        beneath.create_beneath(str(root), "dir/hard", replace=True)
    fd = beneath.create_beneath(str(root), "dir/file", replace=True)
    os.write(fd, b"new")
    os.close(fd)
    assert (root / "dir" / "file").read_text() == "new"
    assert (outside / "secret").read_text() == "secret"


@linux_only
def test_create_replace_refuses_a_linked_directory(tree):
    root, outside = tree
    (root / "ldir").symlink_to(outside)
    with pytest.raises(beneath.UnsafePathError):
        beneath.create_beneath(str(root), "ldir/secret", replace=True)
    assert (outside / "secret").read_text() == "secret"


@linux_only
def test_hard_links_and_other_kinds_are_refused(tree):
    root, outside = tree
    os.link(outside / "secret", root / "hard")
    with pytest.raises(beneath.UnsafePathError, match="hard links"):
        beneath.open_regular(str(root), "hard", os.O_RDONLY)
    with pytest.raises(beneath.UnsafePathError, match="not a regular"):
        beneath.open_regular(str(root), "dir", os.O_RDONLY)
    os.mkfifo(root / "fifo")
    with pytest.raises(beneath.UnsafePathError, match="not a regular"):
        beneath.open_regular(str(root), "fifo", os.O_RDONLY)


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "../outside/secret",
                                 "dir/../../outside/secret", "dir//file",
                                 "./dir/file", None])
def test_relative_paths_must_be_plain(tree, rel):
    root, _ = tree
    with pytest.raises(beneath.UnsafePathError):
        beneath.open_beneath(str(root), rel, os.O_RDONLY)


@linux_only
def test_lstat_sees_the_link_itself(tree):
    root, outside = tree
    (root / "dir" / "link").symlink_to(outside / "secret")
    st = beneath.lstat_beneath(str(root), "dir/link")
    assert os.path.stat.S_ISLNK(st.st_mode)
    (root / "ldir").symlink_to(outside)
    with pytest.raises(beneath.UnsafePathError):
        beneath.lstat_beneath(str(root), "ldir/secret")
    with pytest.raises(FileNotFoundError):
        beneath.lstat_beneath(str(root), "dir/missing")


@linux_only
def test_open_dir_nofollow(tree, monkeypatch):
    root, outside = tree
    os.close(beneath.open_dir_nofollow(str(root / "dir")))
    monkeypatch.chdir(root)
    os.close(beneath.open_dir_nofollow("dir"))
    (root / "ldir").symlink_to(outside)
    with pytest.raises(beneath.UnsafePathError):
        beneath.open_dir_nofollow(str(root / "ldir"))


def test_relative_below():
    assert beneath.relative_below("/a/b/c", "/a") == "b/c"
    for bad in ("/a", "/ab/c", "/a/../etc", "/a/b/", "a/b"):
        with pytest.raises(beneath.UnsafePathError):
            beneath.relative_below(bad, "/a")


def test_linux_without_openat2_says_so(tree, monkeypatch):
    root, _ = tree

    def no_syscall(*_args):
        import ctypes
        ctypes.set_errno(errno.ENOSYS)
        return -1
    monkeypatch.setattr(beneath.sys, "platform", "linux")
    monkeypatch.setattr(beneath, "_libc_syscall", lambda: no_syscall)
    with pytest.raises(beneath.BeneathUnavailable, match="openat2"):
        beneath.open_beneath(str(root), "dir/file", os.O_RDONLY)


def test_freebsd_opens_each_component_beneath_and_nofollow(monkeypatch):
    monkeypatch.setattr(beneath.sys, "platform", "freebsd15")
    fake_open = mock.Mock(side_effect=[11, 12, 13])
    monkeypatch.setattr(beneath.os, "open", fake_open)
    monkeypatch.setattr(beneath.os, "close", mock.Mock())
    assert beneath.open_beneath(5, "a/b/c", os.O_RDONLY) == 13
    safe = beneath.O_RESOLVE_BENEATH | os.O_NOFOLLOW | os.O_CLOEXEC
    names = [(c.args[0], c.kwargs["dir_fd"]) for c in fake_open.call_args_list]
    assert names == [("a", 5), ("b", 11), ("c", 12)]
    for c in fake_open.call_args_list:
        assert c.args[1] & safe == safe
    assert fake_open.call_args_list[0].args[1] & os.O_DIRECTORY
    assert [c.args for c in beneath.os.close.call_args_list] == [(11,), (12,)]


@pytest.mark.parametrize("err,refused", [
    (errno.EMLINK, True),       # FreeBSD: O_NOFOLLOW met a link
    (beneath.ENOTCAPABLE, True),    # FreeBSD: O_RESOLVE_BENEATH escape
    (errno.ENOENT, False)])
def test_freebsd_errors_become_refusals(monkeypatch, err, refused):
    monkeypatch.setattr(beneath.sys, "platform", "freebsd15")
    monkeypatch.setattr(beneath.os, "open",
                        mock.Mock(side_effect=OSError(err, "x")))
    with pytest.raises(OSError) as info:
        beneath.open_beneath(5, "link", os.O_RDONLY)
    assert isinstance(info.value, beneath.UnsafePathError) == refused
    assert info.value.errno == err
