"""The bhyve ML2 mechanism driver: what it binds, and the events it causes.

The PortContext below implements neutron-lib's abstract PortContext, so a
change of that interface breaks these tests; its plugin records what the
driver asks of the ML2 plugin (status updates, Nova notifications).
"""

import subprocess
import sys
from unittest import mock

import pytest
from neutron_lib import exceptions as n_exc
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins.ml2 import api
from oslo_config import cfg

from nova_bhyve.neutron import mech_driver

NET = "3f2a9c1e-7b4d-4e5f-8a9b-0c1d2e3f4a5b"
PORT = "7d1e0b7c-2f3a-4b5c-8d9e-0a1b2c3d4e5f"
SERVER = "11111111-2222-4333-8444-555555555555"
LOCAL = {api.ID: "seg-local", api.NETWORK_TYPE: "local",
         api.PHYSICAL_NETWORK: None, api.SEGMENTATION_ID: None}
FLAT = {api.ID: "seg-flat", api.NETWORK_TYPE: "flat",
        api.PHYSICAL_NETWORK: "physnet1", api.SEGMENTATION_ID: None}
VLAN = {api.ID: "seg-vlan", api.NETWORK_TYPE: "vlan",
        api.PHYSICAL_NETWORK: "physnet1", api.SEGMENTATION_ID: 100}


class FakePlugin:
    """Records the ML2 plugin calls the driver makes."""

    def __init__(self, bindings=None, notify=True):
        self.bindings = bindings or {}
        self.statuses = []
        if notify:
            self.nova_notifier = mock.Mock()

    def get_port_binding(self, context, host, port_id):
        if host not in self.bindings:
            raise n_exc.PortBindingNotFound(port_id=port_id, host=host)
        return self.bindings[host]

    def update_port_status(self, context, port_id, status, host=None):
        self.statuses.append((port_id, status, host))


class FakePortContext(api.PortContext):
    """A PortContext with the state ML2 hands a mechanism driver."""

    def __init__(self, host="host1", segments=(LOCAL,), vnic="normal",
                 status="DOWN", vif_type="unbound", vif_details=None,
                 profile=None, original_profile=None, plugin=None,
                 admin_state_up=True):
        self._port = {"id": PORT, "device_id": SERVER, "network_id": NET,
                      "device_owner": "compute:nova", "status": status,
                      "admin_state_up": admin_state_up,
                      portbindings.VNIC_TYPE: vnic,
                      portbindings.HOST_ID: host,
                      portbindings.PROFILE: profile or {}}
        self._original = dict(self._port)
        self._original[portbindings.PROFILE] = original_profile or {}
        self._host = host
        self._segments = list(segments)
        self._vif_type = vif_type
        self._vif_details = vif_details or {}
        self._plugin = plugin or FakePlugin()
        self._plugin_context = object()
        self.bound = None

    current = property(lambda self: self._port)
    original = property(lambda self: self._original)
    status = property(lambda self: self._port["status"])
    original_status = property(lambda self: self._original["status"])
    network = property(lambda self: mock.Mock(current={"id": NET}))
    binding_levels = property(lambda self: [])
    original_binding_levels = property(lambda self: [])
    top_bound_segment = property(lambda self: None)
    original_top_bound_segment = property(lambda self: None)
    bottom_bound_segment = property(lambda self: None)
    original_bottom_bound_segment = property(lambda self: None)
    host = property(lambda self: self._host)
    original_host = property(lambda self: self._host)
    vif_type = property(lambda self: self._vif_type)
    original_vif_type = property(lambda self: self._vif_type)
    vif_details = property(lambda self: self._vif_details)
    original_vif_details = property(lambda self: self._vif_details)
    segments_to_bind = property(lambda self: self._segments)

    def host_agents(self, agent_type):
        return []

    def set_binding(self, segment_id, vif_type, vif_details, status=None):
        self.bound = (segment_id, vif_type, vif_details, status)

    def continue_binding(self, segment_id, next_segments_to_bind):
        raise AssertionError("the bhyve driver binds in one level")

    def allocate_dynamic_segment(self, segment):
        raise AssertionError("no dynamic segments")

    def release_dynamic_segment(self, segment_id):
        raise AssertionError("no dynamic segments")


def _driver(hosts="host1,host2", mappings=""):
    conf = cfg.ConfigOpts()
    conf([])
    driver = mech_driver.BhyveMechanismDriver(conf)
    mech_driver.bhyve_conf.register_ml2_opts(conf)
    conf.set_override("hosts", hosts, group="ml2_bhyve")
    conf.set_override("bridge_mappings", mappings, group="ml2_bhyve")
    driver.initialize()
    return driver


def test_module_imports_neither_nova_nor_the_compute_driver():
    heavy = ("nova", "nova_bhyve.driver", "nova_bhyve.machine",
             "nova_bhyve.privsep")
    code = ("import sys, nova_bhyve.neutron.mech_driver; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_binds_a_local_network_to_its_own_bridge_active():
    ctx = FakePortContext(segments=(LOCAL,))
    _driver().bind_port(ctx)
    segment, vif_type, details, status = ctx.bound
    assert (segment, vif_type, status) == ("seg-local", "tap", "ACTIVE")
    assert details == {"bridge_name": "nbr3f2a9c1e7b4", "connectivity": "l2",
                       "port_filter": False}


def test_binds_a_flat_network_to_its_mapped_bridge():
    ctx = FakePortContext(segments=(VLAN, FLAT))
    _driver(mappings="physnet1:bridge0").bind_port(ctx)
    assert ctx.bound[0] == "seg-flat"
    assert ctx.bound[2]["bridge_name"] == "bridge0"


@pytest.mark.parametrize("kwargs,mappings", [
    ({"host": "compute-ovs"}, ""),            # not a bhyve host
    ({"host": ""}, ""),                       # not bound to a host yet
    ({"vnic": "direct"}, ""),                 # SR-IOV and the like
    ({"segments": (FLAT,)}, ""),              # flat without a mapping
    ({"segments": (FLAT,)}, "physnet2:br2"),  # mapping of another physnet
    ({"segments": (VLAN,)}, "physnet1:br1"),  # VLAN: no VLAN interface made
])
def test_leaves_other_ports_unbound(kwargs, mappings):
    ctx = FakePortContext(**kwargs)
    _driver(mappings=mappings).bind_port(ctx)
    assert ctx.bound is None


def test_no_hosts_binds_nothing_and_star_binds_every_host():
    ctx = FakePortContext(host="anything")
    _driver(hosts="").bind_port(ctx)
    assert ctx.bound is None
    _driver(hosts="*").bind_port(ctx)
    assert ctx.bound[1] == "tap"


@pytest.mark.parametrize("bridge", ["br-ex", "bridge0;reboot",
                                    "averyveryverylongname", "0br"])
def test_bad_bridge_mapping_fails_at_start(bridge):
    with pytest.raises(ValueError, match="bridge_mappings"):
        _driver(mappings=f"physnet1:{bridge}")


def test_local_bridge_names_pass_the_compute_side_check():
    name = mech_driver.local_bridge_name(NET)
    assert len(name) <= mech_driver.MAX_IFNAME
    from nova_bhyve import privsep
    assert privsep.check_bridge(name) == name


def _bound(**kwargs):
    kwargs.setdefault("vif_type", "tap")
    kwargs.setdefault("vif_details", {"bridge_name": "nbr3f2a9c1e7b4"})
    return FakePortContext(**kwargs)


def test_activated_binding_is_set_active_again():
    """Activating the destination binding sets DOWN; no agent lifts it."""
    ctx = _bound(host="host2", status="DOWN")
    _driver().update_port_postcommit(ctx)
    assert ctx._plugin.statuses == [(PORT, "ACTIVE", "host2")]


@pytest.mark.parametrize("kwargs", [
    {"status": "ACTIVE"},
    {"status": "DOWN", "admin_state_up": False},
    {"status": "DOWN", "host": "compute-ovs"},
    {"status": "DOWN", "vif_type": "ovs"},
    {"status": "ERROR"},
])
def test_status_is_left_alone_otherwise(kwargs):
    ctx = _bound(**kwargs)
    _driver().update_port_postcommit(ctx)
    assert ctx._plugin.statuses == []


def _migrating(dest="host2", binding=None, **kwargs):
    if binding is None:
        binding = {"host": dest, "vif_type": "tap", "status": "INACTIVE",
                   "vif_details": {"bridge_name": "nbr3f2a9c1e7b4"}}
    plugin = FakePlugin(bindings={dest: binding} if binding else {},
                        notify=kwargs.pop("notify", True))
    return _bound(host="host1", status="ACTIVE",
                  profile={"migrating_to": dest}, plugin=plugin, **kwargs)


def test_migrating_to_a_bhyve_host_sends_network_vif_plugged():
    ctx = _migrating()
    _driver().update_port_postcommit(ctx)
    notifier = ctx._plugin.nova_notifier
    (port,), _ = notifier.notify_port_active_direct.call_args
    # what the notifier reads: attributes and keys of the port
    assert (port.id, port.device_id) == (PORT, SERVER)
    assert port["device_owner"] == "compute:nova"
    port._notify_event = None       # the notifier sets this attribute
    assert ctx._plugin.statuses == []


@pytest.mark.parametrize("kwargs", [
    {"original_profile": {"migrating_to": "host2"}},   # already announced
    {"dest": "compute-ovs"},                           # not our host
    {"binding": False},                                # no multiple bindings
    {"binding": {"vif_type": "ovs", "status": "INACTIVE"}},
    {"binding": {"vif_type": "tap", "status": "ACTIVE"}},
    {"dest": "host1"},                                 # same host
])
def test_no_event_unless_an_inactive_tap_binding_waits(kwargs):
    ctx = _migrating(**kwargs)
    _driver().update_port_postcommit(ctx)
    ctx._plugin.nova_notifier.notify_port_active_direct.assert_not_called()


def test_without_the_nova_notifier_the_driver_says_why(caplog):
    ctx = _migrating(notify=False)
    _driver().update_port_postcommit(ctx)
    assert "notify_nova_on_port_status_changes" in caplog.text
