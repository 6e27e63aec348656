"""Client for the test host's control socket.

The protocol is specified in ``CONTROL_PROTOCOL.md`` beside this file: one
request line, one reply line (``OK key=value ...`` or ``ERR CODE text``),
and for some requests a binary payload whose size the reply states.
"""

import dataclasses
import select
import socket
import struct
import threading

from nova_bhyve.testhost.errors import TestHostError

PAGE_SIZE = 4096
_MAX_REPLY_LINE = 4096


@dataclasses.dataclass(frozen=True)
class MemoryLayout:
    """Guest RAM as the host lays it out (bhyve's layout)."""

    size: int          # total bytes of guest RAM
    lowmem: int        # bytes at GPA 0
    highmem: int       # bytes at GPA ``highbase``
    highbase: int      # GPA of highmem (4 GiB)
    highoffset: int    # offset of highmem in the memory file
    page_size: int

    def segments(self):
        """Yield (gpa, file_offset, length) for each non-empty segment."""
        yield (0, 0, self.lowmem)
        if self.highmem:
            yield (self.highbase, self.highoffset, self.highmem)


def _bitmap_from_runs(body, words):
    """The dirty bitmap (``words`` 64-bit words) from a ``dirty-log`` body.

    The body holds the runs of words with a bit set: u32 first word, u32
    count, then the words, little-endian (CONTROL_PROTOCOL.md).
    """
    out = bytearray(words * 8)
    pos = 0
    while pos < len(body):
        if len(body) - pos < 8:
            raise TestHostError("EPROTO", "dirty-log run header cut short")
        first, count = struct.unpack_from("<II", body, pos)
        pos += 8
        if not count or first + count > words or len(body) - pos < count * 8:
            raise TestHostError("EPROTO", "dirty-log run outside the bitmap")
        out[first * 8:(first + count) * 8] = body[pos:pos + count * 8]
        pos += count * 8
    return bytes(out)


@dataclasses.dataclass(frozen=True)
class DirtyLog:
    """One get-and-clear of the dirty log: a bitmap per memory segment."""

    low: bytes
    high: bytes
    lowpages: int
    highpages: int

    def dirty_pages(self, layout):
        """Return the sorted guest-physical page addresses marked dirty."""
        out = []
        for bitmap, npages, base in ((self.low, self.lowpages, 0),
                                     (self.high, self.highpages,
                                      layout.highbase)):
            for byte_index, byte in enumerate(bitmap):
                if not byte:
                    continue
                for bit in range(8):
                    index = byte_index * 8 + bit
                    if byte >> bit & 1 and index < npages:
                        out.append(base + index * layout.page_size)
        return out

    def count(self):
        """Return how many pages are marked dirty."""
        return (int.from_bytes(self.low, "little").bit_count() +
                int.from_bytes(self.high, "little").bit_count())


@dataclasses.dataclass(frozen=True)
class DiskDirtyLog:
    """One get-and-clear of the disk's dirty-block log."""

    bitmap: bytes      # bit i = block i, little-endian 64-bit words
    blocks: int        # blocks on the disk (the last may be partial)
    block_size: int    # bytes per block (4096)

    def dirty_blocks(self):
        """Return the sorted numbers of the blocks marked dirty."""
        out = []
        for byte_index, byte in enumerate(self.bitmap):
            for bit in range(8):
                index = byte_index * 8 + bit
                if byte >> bit & 1 and index < self.blocks:
                    out.append(index)
        return out

    def count(self):
        """Return how many blocks are marked dirty."""
        return len(self.dirty_blocks())


def _parse_fields(words):
    fields = {}
    for word in words:
        key, sep, value = word.partition("=")
        if sep:
            fields[key] = int(value) if value.isdigit() else value
    return fields


class ControlClient:
    """A connection to one test-host VM's control socket (thread-safe)."""

    def __init__(self, path, timeout=30.0):
        self.path = str(path)
        self._lock = threading.Lock()
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise TestHostError(
                "ECONN", f"cannot connect to {self.path}: {exc}") from exc

    def close(self):
        """Close the connection."""
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- framing ----------------------------------------------------------
    def _recv_more(self, fds=None):
        try:
            if fds is None:
                data = self._sock.recv(65536)
            else:
                while True:
                    try:
                        data, got, _flags, _addr = socket.recv_fds(
                            self._sock, 65536, 1)
                        break
                    except BlockingIOError:
                        # eventlet's green sockets are non-blocking
                        # underneath and recvmsg does not wait: wait here
                        select.select([self._sock], [], [],
                                      self._sock.gettimeout())
                fds.extend(got)
        except OSError as exc:
            raise TestHostError("ECONN", f"control socket {self.path}: {exc}") \
                from exc
        if not data:
            raise TestHostError("ECONN", f"{self.path}: connection closed by "
                                "the test host (did the VM exit?)")
        self._buf += data

    def _readline(self, fds=None):
        while b"\n" not in self._buf:
            if len(self._buf) > _MAX_REPLY_LINE:
                raise TestHostError("EPROTO", "reply line too long")
            self._recv_more(fds)
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("ascii", "replace")

    def _readexact(self, n):
        while len(self._buf) < n:
            self._recv_more()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _call(self, line, payload=b"", fds=None):
        """Send one request; return the reply's fields or raise."""
        try:
            self._sock.sendall(line.encode("ascii") + b"\n" + payload)
        except OSError as exc:
            raise TestHostError("ECONN", f"{self.path}: {exc}") from exc
        reply = self._readline(fds)
        words = reply.split(" ")
        if words[0] == "OK":
            return _parse_fields(words[1:])
        if words[0] == "ERR" and len(words) >= 2:
            raise TestHostError(words[1], " ".join(words[2:]))
        raise TestHostError("EPROTO", f"unexpected reply {reply[:80]!r}")

    def request(self, line, payload=b""):
        """Send a raw request line; return the parsed OK fields."""
        with self._lock:
            return self._call(line, payload)

    # -- requests ---------------------------------------------------------
    def status(self):
        """Return the VM's status fields (state, cpus, mem, ...)."""
        return self.request("status")

    def pause(self):
        """Stop all vCPUs; returns once every vCPU has parked."""
        return self.request("pause")

    def resume(self):
        """Run the vCPUs."""
        return self.request("resume")

    def throttle(self, percent):
        """Keep vCPUs off the CPU for ``percent`` % of the time (0..99)."""
        return self.request(f"throttle {int(percent)}")

    def save_state(self):
        """Return the vCPU + device state blob of the paused VM."""
        with self._lock:
            fields = self._call("save-state")
            return self._readexact(int(fields["bytes"]))

    def load_state(self, blob):
        """Load a state blob into an incoming VM (it stays paused)."""
        return self.request(f"load-state {len(blob)}", bytes(blob))

    def memfd(self):
        """Return (fd, MemoryLayout): a descriptor for guest RAM."""
        fds = []
        with self._lock:
            fields = self._call("memfd", fds=fds)
        if len(fds) != 1:
            for fd in fds:
                socket.close(fd)
            raise TestHostError("EPROTO", "memfd reply carried no descriptor")
        layout = MemoryLayout(
            size=fields["size"], lowmem=fields["lowmem"],
            highmem=fields["highmem"], highbase=fields["highbase"],
            highoffset=fields["highoffset"], page_size=fields["page_size"])
        return fds[0], layout

    def dirty_log(self, first=None, count=None, peek=False):
        """Get-and-clear the dirty log; returns a DirtyLog.

        ``first``/``count``: only those 64-page words are read and cleared
        (the rest reads as clean and stays pending); ``peek``: read all,
        clear nothing.
        """
        line = "dirty-log"
        if peek:
            line += " peek"
        elif first is not None:
            line += f" {int(first)} {int(count)}"
        with self._lock:
            fields = self._call(line)
            body = self._readexact(int(fields["bytes"]))
        data = _bitmap_from_runs(body, int(fields["words"]))
        lowbytes = int(fields["lowbytes"])
        return DirtyLog(low=data[:lowbytes], high=data[lowbytes:],
                        lowpages=int(fields["lowpages"]),
                        highpages=int(fields["highpages"]))

    def disk_dirty_log(self, peek=False):
        """Get-and-clear the disk's dirty-block log; returns a DiskDirtyLog.

        ``peek``: read every bit, clear none.  A VM without a disk answers
        ``EINVAL``.
        """
        with self._lock:
            fields = self._call("disk-dirty-log peek" if peek
                                else "disk-dirty-log")
            data = self._readexact(int(fields["bytes"]))
        return DiskDirtyLog(bitmap=data, blocks=int(fields["blocks"]),
                            block_size=int(fields["block_size"]))

    def shutdown(self):
        """Ask the VM process to exit (the guest is discarded)."""
        return self.request("shutdown")
