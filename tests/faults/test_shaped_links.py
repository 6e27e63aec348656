"""The engine's defaults over links ``tc`` holds to 100 and 10 Mbit/s.

The guest rewrites one byte of every page of its working set in a tight
loop.  It moves between two network namespaces joined by a veth pair
(benchmarks/vsqemu/netns.py) whose ends a token bucket holds to the rate:
the source half in this process, its threads and sockets in the source's
namespace, the destination ``nova-bhyve-migrate receive`` in the other.
The source is given nothing but the address and the secret: page
channels, encoding, delta cache, downtime limit (300 ms) and auto-converge
are the engine's defaults, which must find the link's pace themselves.
"""

import json
import os
import re
import subprocess

import pytest

from benchmarks.vsqemu import netns
from nova_bhyve.native.engine import Migration, Result
from tests.functional.conftest import VMFactory, needs_kvm
from tests.functional.migration_helpers import (
    assert_guest_continued,
    receiver_with_secret,
    stress_ready,
    wait_result,
)

pytestmark = [needs_kvm, pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces need root")]

LIMIT_MS = 300              # the engine's default downtime limit
BURST = 32 << 10            # the token bucket's, in bytes


@pytest.fixture
def vms(request):
    """A VMFactory offering the dirty log named by the test's ``log``."""
    factory = VMFactory(request.getfixturevalue("log"))
    yield factory
    factory.cleanup()


def _shape(net, rate):
    """Hold both ends of the veth pair to ``rate`` (tc's notation)."""
    for ns in (net.ns_a, net.ns_b):
        subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev",
                        net.veth[ns], "root", "tbf", "rate", rate, "burst",
                        f"{BURST // 1024}kb", "latency", "50ms"],
                       check=True, capture_output=True)


def _qdisc_stats(net, ns):
    """The token bucket's counters on ``ns``'s end: bytes it sent (link
    headers included) and the times it held a packet back."""
    out = subprocess.run(["tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev",
                          net.veth[ns]], check=True, capture_output=True,
                         text=True).stdout
    tbf = [q for q in json.loads(out) if q["kind"] == "tbf"]
    assert len(tbf) == 1, out
    return tbf[0]["bytes"], tbf[0]["overlimits"]


# the test host's own dirty log over one link, bhyve's kind (read and
# cleared whole) over the other; one vCPU writing, then two
@pytest.mark.parametrize("rate,bits_per_s,mem,cpus,ws,log", [
    ("100mbit", 100e6, "512M", 1, "128M", "ranged"),
    ("10mbit", 10e6, "512M", 2, "128M", "whole"),
])
def test_a_tight_loop_guest_converges_with_the_defaults_over_a_shaped_link(
        vms, rate, bits_per_s, mem, cpus, ws, log):
    src = vms.start("src", mem=mem, cpus=cpus,
                    cmdline=f"mode=stress pattern=tight ws={ws} cpus={cpus}")
    dst = vms.start("dst", mem=mem, cpus=cpus, incoming=True)
    stress_ready(src)
    with netns.Net() as net:
        _shape(net, rate)
        proc, port, secret = receiver_with_secret(
            dst, netns=net.ns_b, listen=f"{net.addr[net.ns_b]}:0")
        try:
            with netns.entered(net.ns_a):
                send = Migration.send(vmm_target=str(src.socket_path),
                                      host=net.addr[net.ns_b], port=port,
                                      secret=secret)
            try:
                s = wait_result(send, timeout=240)
            finally:
                send.close()
            out, _ = proc.communicate(timeout=30)
            sent, held = _qdisc_stats(net, net.ns_a)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert s.result == Result.COMPLETED, s.error
    assert proc.returncode == 0 and "result: completed" in out, out
    assert re.search(rf"digest {s.digest:016x}\b", out), (s.digest, out)
    # the shaping was in force: the bucket held packets back, and what it
    # let out towards the destination (the whole session's, from before the
    # source's clock started) took no less than the rate allows
    assert held > 0, (sent, held)
    assert sent - BURST <= s.total_ms / 1e3 * bits_per_s / 8, (sent, s)
    # the limit is a ceiling: the pause predicted when the source switched
    # over fitted it, and so did the pause the engine measured
    assert s.expected_downtime_ms <= LIMIT_MS, s
    assert s.downtime_ms <= LIMIT_MS, s
    # the guest runs on the destination alone, and went on where it was
    assert dst.client.status()["state"] == "running"
    assert src.stop() == 1
    assert_guest_continued(src, dst)
