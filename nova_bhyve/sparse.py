"""Files with holes: their data extents, and copies that keep the holes.

Guest RAM files, checkpoint RAM and disk images are mostly holes; reading
or writing them whole would allocate what the guest never wrote.
"""

import contextlib
import errno
import os

SEEK_DATA = getattr(os, "SEEK_DATA", 3)     # the same on Linux and FreeBSD
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
_CHUNK = 4 << 20


class ShortRead(OSError):
    """A file ended inside one of its data extents while it was copied."""


def data_extents(fd, size):
    """Yield (offset, length) of each data extent of open file ``fd`` below
    ``size`` (SEEK_DATA/SEEK_HOLE; the holes between are left out)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:        # nothing but a hole from pos on
                return
            if exc.errno == errno.EINVAL:       # a file system that cannot
                yield pos, size - pos           # tell: all of it is data
                return
            raise
        if start >= size:
            return
        stop = min(os.lseek(fd, start, SEEK_HOLE), size)
        if stop <= start:       # a seek that does not move on: the rest is data
            yield start, size - start
            return
        yield start, stop - start
        pos = stop


def copy_extents(src_fd, dst_fd, size):
    """Copy the data extents of ``src_fd`` below ``size`` to the same
    offsets of ``dst_fd``, writing nothing where ``src_fd`` has holes;
    return the bytes copied.  Raises ShortRead if ``src_fd`` is shorter
    than ``size`` or shrinks meanwhile."""
    copied = 0
    for off, length in data_extents(src_fd, size):
        end = off + length
        while off < end:
            chunk = os.pread(src_fd, min(_CHUNK, end - off), off)
            if not chunk:
                raise ShortRead(f"the file ended at {off} inside a data "
                                f"extent that ran to {end}")
            os.pwrite(dst_fd, chunk, off)
            off += len(chunk)
            copied += len(chunk)
    end = os.fstat(src_fd).st_size
    if end < size:
        raise ShortRead(f"the file holds {end} bytes, not {size}")
    return copied


def copy_file(src, dst, size=None):
    """Copy file ``src`` to a new ``dst`` hole for hole; grow ``dst`` to
    ``size`` if that is larger; return the bytes copied.  A copy that
    fails is removed."""
    with open(src, "rb") as fin:
        length = os.fstat(fin.fileno()).st_size
        with open(dst, "wb") as fout:
            try:
                os.ftruncate(fout.fileno(), max(length, size or 0))
                return copy_extents(fin.fileno(), fout.fileno(), length)
            except BaseException:
                # a copy cut short must not pass for a whole one: it
                # already has its full size
                with contextlib.suppress(OSError):
                    os.unlink(dst)
                raise
