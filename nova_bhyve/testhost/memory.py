"""Map a test-host VM's guest RAM through the descriptor it hands out."""

import mmap
import os

from nova_bhyve import sparse
from nova_bhyve.testhost.errors import TestHostError


class GuestMemory:
    """Guest RAM of one VM, mapped shared into this process."""

    def __init__(self, fd, layout):
        self.fd = fd
        self.layout = layout
        self._map = mmap.mmap(fd, layout.size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)

    @classmethod
    def from_client(cls, client):
        """Ask a ControlClient for the memory descriptor and map it."""
        fd, layout = client.memfd()
        return cls(fd, layout)

    def close(self):
        """Unmap and close the descriptor."""
        self.view.release()
        self._map.close()
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def offset(self, gpa, length=1):
        """Return the file offset of guest-physical ``gpa``."""
        for seg_gpa, seg_off, seg_len in self.layout.segments():
            if seg_gpa <= gpa and gpa + length <= seg_gpa + seg_len:
                return seg_off + (gpa - seg_gpa)
        raise TestHostError("EFAULT", f"GPA {gpa:#x}+{length:#x} is not guest RAM")

    def read(self, gpa, length):
        """Return bytes of guest memory at ``gpa``."""
        off = self.offset(gpa, length)
        return bytes(self.view[off:off + length])

    def write(self, gpa, data):
        """Write bytes into guest memory at ``gpa``."""
        off = self.offset(gpa, len(data))
        self.view[off:off + len(data)] = data

    def data_extents(self):
        """Yield (offset, length) of the parts of the memory file ever written.

        Never-touched memory is a hole in the memfd and reads as zero, so a
        copy may skip it.
        """
        return sparse.data_extents(self.fd, self.layout.size)


def copy_memory(src, dst):
    """Copy all guest RAM from ``src`` to ``dst`` (same layout); return bytes copied."""
    if src.layout != dst.layout:
        raise TestHostError("EINVAL", f"memory layouts differ: {src.layout} "
                            f"vs {dst.layout}")
    copied = 0
    for off, length in src.data_extents():
        dst.view[off:off + length] = src.view[off:off + length]
        copied += length
    return copied
