"""A long link without netem: a TUN device in each namespace and a
forwarder process that holds every packet for half the round trip.

Not every kernel has netem (``tc qdisc ... netem delay``); TUN devices are
everywhere.  Each namespace routes the other's address of a private /30
through its own TUN device; the forwarder reads each packet one device
sends and writes it into the other one once its time has come, in order.
TCP on both ends then sees the round trip a distant host would have, with
its slow start, its windows and its retransmissions.  Each device has a
large MTU so that the forwarder handles a few thousand packets a second
at 1 Gbit/s (on a veth pair TCP sends 64 KiB segments too), and the rate
is shaped by tc on each device as on the veth pair.

Run as a script, this file is the forwarder:
``delayline.py FD_A FD_B ONE_WAY_S`` (the two TUN descriptors inherited).
"""

import collections
import fcntl
import os
import select
import struct
import subprocess
import sys
import time

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
MTU = 65000


def open_tun(name):
    """Create TUN device ``name`` in the calling thread's namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(),
                                                _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def start(fd_a, fd_b, rtt_ms):
    """Start the forwarder between two TUN descriptors; returns its Popen."""
    return subprocess.Popen(
        [sys.executable, "-P", __file__, str(fd_a), str(fd_b), str(rtt_ms / 2e3)],
        pass_fds=(fd_a, fd_b), stdin=subprocess.DEVNULL)


def forward(fd_a, fd_b, one_way_s):
    """Pass each packet read from one device to the other ``one_way_s``
    seconds later, until a device is gone or the parent process is."""
    parent = os.getppid()
    peer = {fd_a: fd_b, fd_b: fd_a}
    held = collections.deque()      # (due, device, packet): one delay, so in order
    for fd in peer:
        os.set_blocking(fd, False)
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, out, packet = held.popleft()
            try:
                os.write(out, packet)
            except BlockingIOError:
                pass                # the device's queue is full: a drop, as on a wire
        if not held and os.getppid() != parent:
            return
        wait = max(0.0, held[0][0] - now) if held else 1.0
        ready, _, _ = select.select(list(peer), [], [], wait)
        now = time.monotonic()
        for fd in ready:
            for _ in range(64):
                try:
                    packet = os.read(fd, MTU + 64)
                except BlockingIOError:
                    break
                held.append((now + one_way_s, peer[fd], packet))


if __name__ == "__main__":
    try:
        forward(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
    except (OSError, KeyboardInterrupt):
        pass
