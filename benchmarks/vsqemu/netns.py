"""Two network namespaces joined by a veth pair shaped to 1 Gbit/s.

Each namespace is one "host".  Loopback runs stay inside one namespace
(its own ``lo``, which nothing else on the machine uses, so its counters
are the migration's alone); 1 Gbit/s runs cross the veth pair, whose two
ends carry addresses from a private /30 that exists only inside these
namespaces: nothing can reach any other address from there, as the
namespaces have no other interface and no route.

With ``wan_rtt_ms``, a third link joins them: "wan", 1 Gbit/s with that
round trip, through a TUN device in each namespace and a forwarder that
delays every packet (``delayline.py``), addresses from a second private
/30.
"""

import contextlib
import ctypes
import os
import re
import subprocess

from . import delayline

PREFIX = "nbbench-"
SUBNET = ("10.213.57.1", "10.213.57.2")   # a /30 private to the namespaces
RATE = "1gbit"
# Token bucket on both ends: 128 KiB burst (~1 ms at line rate) and at most
# 5 ms of queue, roughly a switch port's buffer.
TBF = ["tbf", "rate", RATE, "burst", "128kb", "latency", "5ms"]
WAN_SUBNET = ("10.213.58.1", "10.213.58.2")
# The same on the long link's TUN devices, whose packets are up to 64 KiB.
WAN_TBF = ["tbf", "rate", RATE, "burst", "256kb", "latency", "5ms"]
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _setns(fd):
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(ns):
    """Run the calling thread inside namespace ``ns`` for the ``with`` block.

    Sockets and threads (Python's or the engine's native ones) created in
    the block stay in ``ns`` after it: a thread inherits the namespace of
    the thread that creates it.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def remove_stale():
    """Delete namespaces left behind by runs whose process is gone."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True,
                         text=True).stdout
    for name in re.findall(rf"^({PREFIX}(\d+)[ab])\b", out, re.M):
        if not os.path.exists(f"/proc/{name[1]}"):
            subprocess.run(["ip", "netns", "del", name[0]], capture_output=True)


class Net:
    """Namespaces ``ns_a`` and ``ns_b`` (and, with ``wan_rtt_ms``, the long
    link between them); use as a context manager."""

    def __init__(self, wan_rtt_ms=None):
        tag = f"{PREFIX}{os.getpid()}"
        self.ns_a, self.ns_b = tag + "a", tag + "b"
        self.addr = {self.ns_a: SUBNET[0], self.ns_b: SUBNET[1]}
        self.veth = {self.ns_a: f"nbb{os.getpid()}a", self.ns_b: f"nbb{os.getpid()}b"}
        self.wan_rtt_ms = wan_rtt_ms
        self.wan_addr = {self.ns_a: WAN_SUBNET[0], self.ns_b: WAN_SUBNET[1]}
        self.tun = {self.ns_a: f"nbw{os.getpid()}a", self.ns_b: f"nbw{os.getpid()}b"}
        self.tun_fds, self.forwarder = [], None
        self.created = []

    def __enter__(self):
        remove_stale()
        try:
            for ns in (self.ns_a, self.ns_b):
                _ip("netns", "add", ns)
                self.created.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            va, vb = self.veth[self.ns_a], self.veth[self.ns_b]
            _ip("link", "add", va, "netns", self.ns_a, "type", "veth",
                "peer", "name", vb, "netns", self.ns_b)
            for ns in (self.ns_a, self.ns_b):
                _ip("-n", ns, "addr", "add", f"{self.addr[ns]}/30",
                    "dev", self.veth[ns])
                _ip("-n", ns, "link", "set", self.veth[ns], "up")
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev",
                                self.veth[ns], "root", *TBF],
                               check=True, capture_output=True)
            if self.wan_rtt_ms is not None:
                self._add_wan()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()

    def _add_wan(self):
        """The long link: a TUN device in each namespace, the forwarder
        between them."""
        for ns in (self.ns_a, self.ns_b):
            with entered(ns):
                self.tun_fds.append(delayline.open_tun(self.tun[ns]))
            peer = self.wan_addr[self.other(ns)]
            _ip("-n", ns, "addr", "add", self.wan_addr[ns], "peer", peer,
                "dev", self.tun[ns])
            _ip("-n", ns, "link", "set", self.tun[ns], "mtu", str(delayline.MTU),
                "txqueuelen", "10000", "up")
            subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", self.tun[ns],
                            "root", *WAN_TBF], check=True, capture_output=True)
        self.forwarder = delayline.start(*self.tun_fds, self.wan_rtt_ms)

    def remove(self):
        """Delete the namespaces (and with them the links)."""
        if self.forwarder is not None:
            self.forwarder.kill()
            self.forwarder.wait()
            self.forwarder = None
        for fd in self.tun_fds:
            os.close(fd)
        self.tun_fds = []
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created = []

    def link(self, ns, up):
        """Take ``ns``'s end of the veth pair down (up=False) or up again.

        Up again, both ends forget their neighbours: an address that went
        unanswered while the link was down stays FAILED for a while, and a
        connect to it then fails at once with "No route to host".
        """
        _ip("-n", ns, "link", "set", self.veth[ns], "up" if up else "down")
        if up:
            for end in (ns, self.other(ns)):
                _ip("-n", end, "neigh", "flush", "all")

    def other(self, ns):
        """The namespace at the other end of the veth pair."""
        return self.ns_b if ns == self.ns_a else self.ns_a

    def route(self, link, src_ns):
        """Return (destination namespace, address, interface) from ``src_ns``."""
        if link == "loopback":
            return src_ns, "127.0.0.1", "lo"
        dst = self.other(src_ns)
        if link == "wan":
            return dst, self.wan_addr[dst], self.tun[dst]
        return dst, self.addr[dst], self.veth[dst]
