"""The benchmarks' long link (benchmarks/vsqemu/delayline.py, netns.Net
with ``wan_rtt_ms``): TCP across it sees the round trip asked for, gets
every byte through intact and in order, and nothing stays behind."""

import hashlib
import os
import socket
import subprocess
import threading
import time

import pytest

from benchmarks.vsqemu import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="needs root and /dev/net/tun")

RTT_MS = 20.0


def _server(net):
    """A listener in the second namespace that echoes one byte at a time,
    then hashes everything after the first 16 bytes it reads."""
    with netns.entered(net.ns_b):
        srv = socket.create_server((net.wan_addr[net.ns_b], 0))
    got = {}

    def serve():
        conn, _ = srv.accept()
        with conn:
            for _ in range(16):
                conn.sendall(conn.recv(1))
            h, n = hashlib.sha256(), 0
            while data := conn.recv(1 << 20):
                h.update(data)
                n += len(data)
            got.update(n=n, digest=h.hexdigest())
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv, thread, got


def test_a_round_trip_takes_as_long_as_asked_and_every_byte_arrives():
    with netns.Net(wan_rtt_ms=RTT_MS) as net:
        srv, thread, got = _server(net)
        with netns.entered(net.ns_a):
            cli = socket.create_connection((net.wan_addr[net.ns_b],
                                            srv.getsockname()[1]))
        cli.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        trips = []
        for _ in range(16):
            t0 = time.monotonic()
            cli.sendall(b"x")
            assert cli.recv(1) == b"x"
            trips.append((time.monotonic() - t0) * 1e3)
        payload = os.urandom(16 << 20)
        cli.sendall(payload)
        cli.close()
        thread.join(30)
        srv.close()
        forwarder = net.forwarder
        assert min(trips) >= RTT_MS, trips
        assert sorted(trips)[8] < 2 * RTT_MS, trips
        digest = hashlib.sha256(payload).hexdigest()
        assert got == {"n": len(payload), "digest": digest}
    assert forwarder.poll() is not None
    left = subprocess.run(["ip", "netns", "list"], capture_output=True,
                          text=True).stdout
    assert net.ns_a not in left and net.ns_b not in left
