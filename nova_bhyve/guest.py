"""From Nova objects to machine specs, and machine states to Nova events.

Image properties read by the driver (copied by Nova into the instance's
system metadata as ``image_<name>``):

``bhyve_testhost_cmdline``
    KVM test host only: the guest payload's command line, for example
    ``mode=stress pattern=touch ws=64M``.  Default: ``[bhyve]
    testhost_default_cmdline``, which defaults to ``mode=idle``.
"""

from nova.virt import driver
from nova.virt import event as virtevent
from nova_bhyve.machine.base import (
    SWAP_DISK,
    DiskSpec,
    MachineSpec,
    MachineState,
    NicSpec,
)

IMAGE_PROP_CMDLINE = "bhyve_testhost_cmdline"
VIF_TYPE_TAP = "tap"        # as bound by the bhyve ML2 mechanism driver
MAX_EXTRA_DISKS = 17        # bhyve: 18 virtio-blk slots, one is the root

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


def vif_bridge(vif):
    """Return the bridge a VIF's tap joins.

    The ``bhyve`` ML2 mechanism driver binds ports as VIF type ``tap``
    with the bridge in ``vif_details`` (``bridge_name``); Nova fills
    ``network['bridge']`` only for VIF types it plugs itself (OVS), and
    refuses VIF type ``bridge`` since Linux bridge support left it.
    """
    details = vif.get("details") or {}
    network = vif.get("network") or {}
    return details.get("bridge_name") or network.get("bridge") or ""


def nics_from_network_info(network_info):
    """Return NicSpecs for the VIFs of ``network_info``."""
    return tuple(NicSpec(vif_id=vif["id"],
                         tap=vif.get("devname") or tap_name(vif["id"]),
                         mac=vif["address"], bridge=vif_bridge(vif))
                 for vif in network_info or ())


def unsupported_vifs(network_info):
    """Return "port (type)" for each VIF this driver cannot plug."""
    return [f"{vif['id']} ({vif.get('type')})" for vif in network_info or ()
            if vif.get("type") != VIF_TYPE_TAP]


def vif_plugged_events(network_info):
    """Return the network-vif-plugged events to wait for after plugging.

    As in Nova's libvirt driver: only VIFs Neutron reports as not active
    will see a DOWN to ACTIVE transition, hence an event.  Ports bound by
    the ``bhyve`` mechanism driver are ACTIVE from their binding on.
    """
    return [("network-vif-plugged", vif["id"]) for vif in network_info or ()
            if vif.get("active", True) is False]


def extra_disks(instance, block_device_info=None):
    """Return the DiskSpecs (no paths) of the swap and ephemeral disks.

    As Nova passes them: ``block_device_info['swap']`` (MiB) and
    ``['ephemerals']`` (GiB each), else the flavor's ``swap`` (MiB) and
    ``ephemeral_gb`` (one disk).  Nova updates the swap mapping on a
    resize but not the ephemeral ones.
    """
    disks = []
    swap = driver.block_device_info_get_swap(block_device_info)
    swap_mb = (swap["swap_size"] if driver.swap_is_usable(swap)
               else instance.flavor.swap)
    if swap_mb:
        disks.append(DiskSpec(name=SWAP_DISK, size_mb=int(swap_mb)))
    ephemerals = driver.block_device_info_get_ephemerals(block_device_info)
    sizes = [int(eph.get("size") or 0) for eph in ephemerals]
    if not ephemerals and instance.flavor.ephemeral_gb:
        sizes = [instance.flavor.ephemeral_gb]
    disks += [DiskSpec(name=f"eph{i}", size_mb=gb << 10)
              for i, gb in enumerate(sizes) if gb]
    return tuple(disks)


def ephemeral_gb(instance, block_device_info=None):
    """Return the total size of the ephemeral disks in GiB."""
    return sum(d.size_mb >> 10 for d in extra_disks(instance, block_device_info)
               if d.name != SWAP_DISK)


def build_spec(instance, network_info, conf, block_device_info=None):
    """Return the MachineSpec of ``instance``.

    ``disks`` lists the swap and ephemeral disks to make, without paths;
    the backend's ``create`` adds the root disk and the paths.
    """
    sysmeta = instance.system_metadata or {}
    cmdline = (sysmeta.get("image_" + IMAGE_PROP_CMDLINE) or
               conf.bhyve.testhost_default_cmdline)
    vnc = conf.vnc.server_listen if conf.vnc.enabled else ""
    return MachineSpec(uuid=instance.uuid, vcpus=instance.flavor.vcpus,
                       memory_mb=instance.flavor.memory_mb,
                       nics=nics_from_network_info(network_info),
                       disks=extra_disks(instance, block_device_info),
                       cmdline=cmdline, vnc_listen=vnc)


def lifecycle_event(uuid, state):
    """Return the LifecycleEvent announcing ``state``, or None."""
    transition = _EVENTS.get(state)
    if transition is None:
        return None
    return virtevent.LifecycleEvent(uuid, transition)
