"""From Nova objects to machine specs, and machine states to Nova events.

Image properties read by the driver (copied by Nova into the instance's
system metadata as ``image_<name>``):

``bhyve_testhost_cmdline``
    KVM test host only: the guest payload's command line, for example
    ``mode=stress pattern=touch ws=64M``.  Default: ``[bhyve]
    testhost_default_cmdline``, which defaults to ``mode=idle``.
"""

from nova.virt import event as virtevent
from nova_bhyve.machine.base import MachineSpec, MachineState, NicSpec

IMAGE_PROP_CMDLINE = "bhyve_testhost_cmdline"

_EVENTS = {
    MachineState.RUNNING: virtevent.EVENT_LIFECYCLE_STARTED,
    MachineState.PAUSED: virtevent.EVENT_LIFECYCLE_PAUSED,
    MachineState.SUSPENDED: virtevent.EVENT_LIFECYCLE_SUSPENDED,
    MachineState.SHUTDOWN: virtevent.EVENT_LIFECYCLE_STOPPED,
    MachineState.CRASHED: virtevent.EVENT_LIFECYCLE_STOPPED,
}


def tap_name(vif_id):
    """Return the tap device name of a VIF (``tap`` + 11 characters, as Nova)."""
    return ("tap" + vif_id)[:14]


def nics_from_network_info(network_info):
    """Return NicSpecs for the VIFs of ``network_info``."""
    nics = []
    for vif in network_info or ():
        network = vif.get("network") or {}
        nics.append(NicSpec(vif_id=vif["id"],
                            tap=vif.get("devname") or tap_name(vif["id"]),
                            mac=vif["address"],
                            bridge=network.get("bridge") or ""))
    return tuple(nics)


def build_spec(instance, network_info, conf):
    """Return the MachineSpec of ``instance`` (disks are added by the backend)."""
    sysmeta = instance.system_metadata or {}
    cmdline = (sysmeta.get("image_" + IMAGE_PROP_CMDLINE) or
               conf.bhyve.testhost_default_cmdline)
    vnc = conf.vnc.server_listen if conf.vnc.enabled else ""
    return MachineSpec(uuid=instance.uuid, vcpus=instance.flavor.vcpus,
                       memory_mb=instance.flavor.memory_mb,
                       nics=nics_from_network_info(network_info),
                       cmdline=cmdline, vnc_listen=vnc)


def lifecycle_event(uuid, state):
    """Return the LifecycleEvent announcing ``state``, or None."""
    transition = _EVENTS.get(state)
    if transition is None:
        return None
    return virtevent.LifecycleEvent(uuid, transition)
