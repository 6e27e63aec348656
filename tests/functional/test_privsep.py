"""Taps and bridges for real: the privileged helper in its own process.

Runs the helper as oslo.privsep starts it for a root nova-compute (a forked
daemon keeping only the capabilities the context lists), in two fresh
network namespaces, the way two test-host computes on one machine use it.
"""

import os
import shutil
import subprocess
import sys

import pytest
from oslo_privsep import priv_context

from nova_bhyve import privsep

CONF = privsep.CONF
TAP = "tap7d1e0b7c-2f"
OTHER_TAP = "tap0a1b2c3d-4e"
BRIDGE = "nbr3f2a9c1e7b4"
MAC = "fa:16:3e:aa:bb:cc"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or
    not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun")


def _links(netns):
    """Return {name: (master, address, alias)} of the links in ``netns``."""
    out = subprocess.run(["ip", "-n", netns, "-o", "link", "show"],
                         capture_output=True, text=True, check=True).stdout
    links = {}
    for line in out.splitlines():
        words = line.replace("\\", " ").split()
        name = words[1].rstrip(":").split("@")[0]
        after = {k: v for k, v in zip(words, words[1:])}
        links[name] = (after.get("master"), after.get("link/ether"),
                       after.get("alias"))
    return links


@pytest.fixture
def helper_in():
    """Start the privileged helper for a namespace; remove namespaces after."""
    made = []

    def start(netns):
        privsep.bhyve_pctxt.stop()
        CONF.set_override("testhost_netns", netns, group="bhyve")
        made.append(netns)
        privsep.bhyve_pctxt.start(priv_context.Method.FORK)
        assert privsep.bhyve_pctxt.channel.running
    yield start
    privsep.bhyve_pctxt.stop()
    CONF.clear_override("testhost_netns", group="bhyve")
    for netns in made:
        subprocess.run(["ip", "netns", "del", netns], check=False)


def test_plug_and_unplug_in_a_namespace(helper_in):
    netns = f"nbt-{os.getpid()}-a"
    helper_in(netns)
    privsep.plug_tap_linux(TAP, BRIDGE, MAC)
    privsep.plug_tap_linux(OTHER_TAP, BRIDGE, "fa:16:3e:00:00:01")
    links = _links(netns)
    assert links[TAP][:2] == (BRIDGE, "fe:16:3e:aa:bb:cc")
    assert links[OTHER_TAP][0] == BRIDGE
    assert links[BRIDGE][2] == "nova-bhyve"
    root = subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                          text=True, check=True).stdout
    assert TAP not in root and BRIDGE not in root

    privsep.plug_tap_linux(TAP, BRIDGE, MAC)        # again: no error
    privsep.unplug_tap_linux(TAP, BRIDGE)
    links = _links(netns)
    assert TAP not in links and BRIDGE in links     # the other tap stays
    privsep.unplug_tap_linux(OTHER_TAP, BRIDGE)
    assert set(_links(netns)) == {"lo"}
    privsep.unplug_tap_linux(OTHER_TAP, BRIDGE)     # gone already: fine


def test_two_computes_hold_the_same_tap_name(helper_in):
    """A live migration's destination plugs the tap the source still has."""
    source, dest = f"nbt-{os.getpid()}-s", f"nbt-{os.getpid()}-d"
    helper_in(source)
    privsep.plug_tap_linux(TAP, BRIDGE, MAC)
    helper_in(dest)
    privsep.plug_tap_linux(TAP, BRIDGE, MAC)
    assert _links(source)[TAP][0] == BRIDGE
    assert _links(dest)[TAP][0] == BRIDGE
    privsep.unplug_tap_linux(TAP, BRIDGE)           # the destination's
    assert TAP in _links(source) and TAP not in _links(dest)


def test_helper_command_of_a_root_compute(tmp_path):
    """The helper started by ``helper_command`` reads its own config files."""
    netns = f"nbt-{os.getpid()}-h"
    conf_file = tmp_path / "nova-host1.conf"
    conf_file.write_text(f"[bhyve]\ntesthost_netns = {netns}\n")
    helper = os.path.join(os.path.dirname(sys.executable), "privsep-helper")
    privsep.bhyve_pctxt.stop()
    CONF.set_override("helper_command",
                      f"{helper} --config-file {conf_file}",
                      group="nova_bhyve_privileged")
    try:
        privsep.plug_tap_linux(TAP, BRIDGE, MAC)    # starts the helper
        assert _links(netns)[TAP][0] == BRIDGE      # its namespace, not ours
        privsep.unplug_tap_linux(TAP, BRIDGE)
        assert set(_links(netns)) == {"lo"}
    finally:
        privsep.bhyve_pctxt.stop()
        CONF.clear_override("helper_command", group="nova_bhyve_privileged")
        subprocess.run(["ip", "netns", "del", netns], check=False)
