"""ML2 mechanism driver that binds ports on bhyve hosts (no L2 agent).

``mechanism_drivers = bhyve`` in ``[ml2]`` (entry point
``neutron.ml2.mechanism_drivers``).  For a host listed in ``[ml2_bhyve]
hosts`` it binds ports of vnic_type ``normal`` on ``local`` and ``flat``
segments with VIF type ``tap`` and the bridge in ``vif_details
bridge_name``; nova-bhyve creates the tap device and adds it to that
bridge (``if_bridge`` on FreeBSD, a Linux bridge on the KVM test host).

No agent reports the tap as up, so the driver stands in for one:

- a binding is committed with port status ACTIVE, which makes Neutron send
  ``network-vif-plugged`` when the port is first bound (spawn);
- during a live migration Nova's destination plugs the taps in
  ``pre_live_migration`` and then sets ``binding:profile migrating_to``;
  when that names a host with an inactive binding of this driver, the
  driver sends ``network-vif-plugged`` itself (what ML2's RPC does when an
  agent reports a device up on a host the port is not bound to), which the
  source compute waits for before it starts the transfer;
- activating the destination binding sets the port DOWN; the driver sets
  it ACTIVE again, as the destination's agent would.
"""

from neutron_lib import constants
from neutron_lib import exceptions as n_exc
from neutron_lib.api.definitions import portbindings
from neutron_lib.api.definitions import portbindings_extended as pbe_ext
from neutron_lib.plugins.ml2 import api
from oslo_config import cfg
from oslo_log import log as logging

from nova_bhyve import conf as bhyve_conf

LOG = logging.getLogger(__name__)

VIF_TYPE = portbindings.VIF_TYPE_TAP
LOCAL_BRIDGE_PREFIX = "nbr"
MIGRATING_TO = "migrating_to"
SUPPORTED_TYPES = (constants.TYPE_LOCAL, constants.TYPE_FLAT)
MAX_IFNAME = 15


def local_bridge_name(network_id):
    """Return the bridge of a ``local`` network: nbr + 11 hex digits."""
    return LOCAL_BRIDGE_PREFIX + network_id.replace("-", "")[:11]


class _NotifierPort(dict):
    """A port dict with the attribute access Neutron's Nova notifier uses."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class BhyveMechanismDriver(api.MechanismDriver):
    """Bind ports of bhyve hosts to a tap device on a bridge."""

    def __init__(self, conf=None):
        super().__init__()
        self.conf = conf or cfg.CONF
        self.hosts = frozenset()
        self.bridge_mappings = {}

    def initialize(self):
        """Read ``[ml2_bhyve]``; refuse bridge names no host could create."""
        bhyve_conf.register_ml2_opts(self.conf)
        opts = self.conf.ml2_bhyve
        self.hosts = frozenset(h.strip() for h in opts.hosts if h.strip())
        for physnet, bridge in opts.bridge_mappings.items():
            if not bridge or len(bridge) > MAX_IFNAME or \
                    not bridge[0].isalpha() or \
                    not all(c.isalnum() or c in "_." for c in bridge):
                raise ValueError(
                    f"[ml2_bhyve] bridge_mappings: {physnet}:{bridge} is not "
                    f"an interface name (a letter, then up to {MAX_IFNAME - 1}"
                    " letters, digits, '_' or '.')")
        self.bridge_mappings = dict(opts.bridge_mappings)
        if not self.hosts:
            LOG.warning("[ml2_bhyve] hosts is empty: the bhyve mechanism "
                        "driver binds no port")
        LOG.info("bhyve mechanism driver binds ports on %s; flat networks: "
                 "%s", ", ".join(sorted(self.hosts)) or "no host",
                 self.bridge_mappings or "none")

    @property
    def connectivity(self):
        """Ports need only layer 2 (they may have no IP address)."""
        return portbindings.CONNECTIVITY_L2

    def serves(self, host):
        """Return True if this driver binds ports on ``host``."""
        return bool(host) and ("*" in self.hosts or host in self.hosts)

    def bridge_for(self, segment, network_id):
        """Return the bridge a port on ``segment`` joins, or None."""
        kind = segment.get(api.NETWORK_TYPE)
        if kind == constants.TYPE_LOCAL:
            return local_bridge_name(network_id)
        if kind == constants.TYPE_FLAT:
            return self.bridge_mappings.get(segment.get(api.PHYSICAL_NETWORK))
        return None

    def vif_details(self, bridge):
        """Return the binding's vif_details for a tap on ``bridge``."""
        return {portbindings.VIF_DETAILS_BRIDGE_NAME: bridge,
                portbindings.VIF_DETAILS_CONNECTIVITY: self.connectivity,
                portbindings.CAP_PORT_FILTER: False}

    def bind_port(self, context):
        """Bind to the first segment with a bridge, port status ACTIVE."""
        port = context.current
        vnic = port.get(portbindings.VNIC_TYPE, portbindings.VNIC_NORMAL)
        if vnic != portbindings.VNIC_NORMAL or not self.serves(context.host):
            return
        network_id = context.network.current["id"]
        for segment in context.segments_to_bind:
            bridge = self.bridge_for(segment, network_id)
            if bridge:
                context.set_binding(segment[api.ID], VIF_TYPE,
                                    self.vif_details(bridge),
                                    status=constants.PORT_STATUS_ACTIVE)
                LOG.debug("Bound port %s on %s to bridge %s", port["id"],
                          context.host, bridge)
                return
        LOG.warning("Cannot bind port %s on %s: no segment of network %s is "
                    "local or flat with a bridge in [ml2_bhyve] "
                    "bridge_mappings (segments: %s)", port["id"], context.host,
                    network_id, [(s.get(api.NETWORK_TYPE),
                                  s.get(api.PHYSICAL_NETWORK))
                                 for s in context.segments_to_bind])

    def _bound_here(self, context):
        details = context.vif_details or {}
        return (context.vif_type == VIF_TYPE and self.serves(context.host)
                and bool(details.get(portbindings.VIF_DETAILS_BRIDGE_NAME)))

    def update_port_postcommit(self, context):
        """Announce a live migration's plugged taps; keep bound ports ACTIVE."""
        self._announce_migration(context)
        port = context.current
        if (self._bound_here(context) and port.get("admin_state_up", True)
                and context.status in (constants.PORT_STATUS_DOWN,
                                       constants.PORT_STATUS_BUILD)):
            LOG.debug("Port %s bound on %s is %s; no agent will report it "
                      "up: setting it ACTIVE", port["id"], context.host,
                      context.status)
            context._plugin.update_port_status(
                context._plugin_context, port["id"],
                constants.PORT_STATUS_ACTIVE, context.host)

    def _announce_migration(self, context):
        dest = _profile(context.current).get(MIGRATING_TO)
        if not dest or dest == context.host or not self.serves(dest) or \
                dest == _profile(context.original).get(MIGRATING_TO):
            return
        port = context.current
        binding = self._binding_on(context, dest)
        if binding is None:
            return
        if binding.get(pbe_ext.VIF_TYPE) != VIF_TYPE or \
                binding.get(pbe_ext.STATUS) != constants.INACTIVE:
            LOG.debug("Port %s has no inactive tap binding on %s: no "
                      "network-vif-plugged", port["id"], dest)
            return
        notifier = getattr(context._plugin, "nova_notifier", None)
        if notifier is None:
            LOG.warning("Neutron does not notify Nova (notify_nova_on_port_"
                        "status_changes is off): the live migration of port "
                        "%s to %s waits in vain for network-vif-plugged",
                        port["id"], dest)
            return
        LOG.info("Port %s is plugged on live-migration destination %s: "
                 "sending network-vif-plugged", port["id"], dest)
        notifier.notify_port_active_direct(_NotifierPort(port))

    @staticmethod
    def _binding_on(context, host):
        try:
            return context._plugin.get_port_binding(
                context._plugin_context, host, context.current["id"])
        except (n_exc.PortBindingNotFound, n_exc.BadRequest) as exc:
            # no binding for that host: Nova did not use multiple bindings
            LOG.debug("No binding of port %s on %s: %s",
                      context.current["id"], host, exc)
            return None


def _profile(port):
    return (port or {}).get(portbindings.PROFILE) or {}
