"""Open files below a directory without following any symbolic link.

The privileged helper and the root-run guest supervisor work in
directories that nova-compute owns, so any name there may have been
replaced by a symbolic link (or a hard link) pointing elsewhere.  Every
file they touch is opened relative to a descriptor of a trusted directory
(``instances_path``, an instance directory, ``/dev/zvol/<dataset>``) with
no symbolic link followed in any component and no escape above it:

- Linux: ``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``
  (Linux 5.6 or later; called through ctypes, Python has no os.openat2);
- FreeBSD: each component opened with ``O_RESOLVE_BENEATH | O_NOFOLLOW``
  relative to the one before (``O_NOFOLLOW`` alone only covers the last).

The directory given as the anchor is trusted as it is; only what lies
below it is checked.
"""

import contextlib
import ctypes
import errno
import os
import stat
import sys

SYS_OPENAT2 = 437               # the same number on every Linux architecture
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
O_RESOLVE_BENEATH = getattr(os, "O_RESOLVE_BENEATH", 0x00800000)  # FreeBSD
ENOTCAPABLE = getattr(errno, "ENOTCAPABLE", 93)                    # FreeBSD
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class UnsafePathError(OSError):
    """A path was refused: a link, an escape, or not the expected kind."""


class BeneathUnavailable(OSError):
    """This kernel cannot open files without following links."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def split_relative(relpath):
    """Return the components of a relative path; refuse '', '.', '..', '/x'."""
    if not isinstance(relpath, str) or not relpath or relpath.startswith("/"):
        raise UnsafePathError(errno.EINVAL, f"{relpath!r} is not a relative "
                              "path")
    parts = relpath.split("/")
    if any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise UnsafePathError(errno.EINVAL, f"{relpath!r} has an empty, '.' "
                              "or '..' component")
    return parts


def relative_below(path, root):
    """Return ``path`` relative to ``root``; refuse a path not inside it."""
    root = os.path.normpath(root)
    if (not isinstance(path, str) or os.path.normpath(path) != path or
            not path.startswith(root + "/")):
        raise UnsafePathError(errno.EINVAL, f"{path!r} is not inside {root}")
    return path[len(root) + 1:]


@contextlib.contextmanager
def anchored(dirfd_or_path):
    """Yield a directory descriptor: the one given, or the path opened."""
    if isinstance(dirfd_or_path, int):
        yield dirfd_or_path
        return
    fd = os.open(dirfd_or_path, _DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _refused(exc, relpath, dirfd_or_path):
    where = dirfd_or_path if isinstance(dirfd_or_path, str) else "its directory"
    if exc.errno in (errno.ELOOP, errno.EMLINK):
        why = "a symbolic link is on the path"
    elif exc.errno in (errno.EXDEV, ENOTCAPABLE):
        why = "the path leads outside"
    else:
        return exc
    return UnsafePathError(exc.errno, f"{relpath!r} below {where} refused: "
                           f"{why}")


def _libc_syscall():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall


def _openat2(dirfd, relpath, flags, mode):
    how = _OpenHow(flags=flags, mode=mode if flags & os.O_CREAT else 0,
                   resolve=RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
                   RESOLVE_NO_MAGICLINKS)
    fd = _libc_syscall()(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd),
                         ctypes.c_char_p(os.fsencode(relpath)),
                         ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise BeneathUnavailable(err, "this kernel has no openat2(2) "
                                     "(Linux 5.6 or later is needed)")
        raise OSError(err, os.strerror(err), relpath)
    return fd


def _open_freebsd(dirfd, parts, flags, mode):
    safe = O_RESOLVE_BENEATH | os.O_NOFOLLOW | os.O_CLOEXEC
    cur = dirfd
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS | safe, dir_fd=cur)
            if cur != dirfd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | safe, mode, dir_fd=cur)
    finally:
        if cur != dirfd:
            os.close(cur)


def open_beneath(dirfd_or_path, relpath, flags, mode=0o600):
    """Open ``relpath`` below a directory, following no link; return the fd."""
    parts = split_relative(relpath)
    flags |= os.O_CLOEXEC
    with anchored(dirfd_or_path) as dirfd:
        try:
            if sys.platform.startswith("freebsd"):
                return _open_freebsd(dirfd, parts, flags, mode)
            if sys.platform.startswith("linux"):
                return _openat2(dirfd, "/".join(parts), flags, mode)
        except BeneathUnavailable:
            raise
        except OSError as exc:
            raise _refused(exc, relpath, dirfd_or_path) from None
    raise BeneathUnavailable(errno.ENOSYS, f"no safe open on {sys.platform}")


def _check_stale(st, name):
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(errno.ELOOP, f"{name!r} is a symbolic link "
                              "(refused)")
    _check_regular_stat(st, name)


def check_regular(fd, name):
    """Raise UnsafePathError unless ``fd`` is a regular file with one link."""
    return _check_regular_stat(os.fstat(fd), name)


def _check_regular_stat(st, name):
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(errno.EINVAL, f"{name!r} is not a regular file")
    if st.st_nlink > 1:
        raise UnsafePathError(errno.EMLINK, f"{name!r} has {st.st_nlink} hard "
                              "links (refused)")
    return st


def open_regular(dirfd_or_path, relpath, flags, mode=0o600):
    """Open a regular, singly linked file below a directory; return the fd."""
    fd = open_beneath(dirfd_or_path, relpath, flags | os.O_NONBLOCK |
                      os.O_NOCTTY, mode)
    try:
        check_regular(fd, relpath)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_parent(dirfd_or_path, relpath):
    """Return (descriptor of the directory holding ``relpath``, last name)."""
    parts = split_relative(relpath)
    if len(parts) == 1:
        with anchored(dirfd_or_path) as dirfd:
            return os.dup(dirfd), parts[0]
    fd = open_beneath(dirfd_or_path, "/".join(parts[:-1]),
                      os.O_RDONLY | os.O_DIRECTORY)
    return fd, parts[-1]


def lstat_beneath(dirfd_or_path, relpath):
    """Return the lstat of ``relpath`` below a directory (no link followed)."""
    parent, name = open_parent(dirfd_or_path, relpath)
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def create_beneath(dirfd_or_path, relpath, mode=0o666, replace=False):
    """Create a new regular file below a directory (O_EXCL); return the fd.

    With ``replace``, an existing regular, singly linked file of that name
    is unlinked first; a symbolic link or hard link there is refused.
    """
    parent, name = open_parent(dirfd_or_path, relpath)
    try:
        if replace:
            with contextlib.suppress(FileNotFoundError):
                _check_stale(os.stat(name, dir_fd=parent,
                                     follow_symlinks=False), relpath)
                os.unlink(name, dir_fd=parent)
        return open_beneath(parent, name, os.O_WRONLY | os.O_CREAT |
                            os.O_EXCL, mode)
    finally:
        os.close(parent)


def open_dir_nofollow(path):
    """Open directory ``path``; its last component must not be a link."""
    parent, name = os.path.split(os.path.abspath(path))
    if not name or not parent:
        raise UnsafePathError(errno.EINVAL, f"{path!r} has no parent")
    return open_beneath(parent, name, os.O_RDONLY | os.O_DIRECTORY)
