"""BhyveDriver: Nova's compute driver for bhyve (and the KVM test host).

The driver translates Nova calls into machine-layer calls; how guests are
started, stopped and checkpointed lives in ``nova_bhyve.machine``.  Live
migration, cold migration and evacuation come from the mixins of
``nova_bhyve.migration`` placed before ``ComputeDriver`` in the bases.
"""

import contextlib
import os

import nova.conf
import nova.virt.node
from nova.compute import task_states
from nova.image import glance
from nova.objects import diagnostics as diagnostics_obj
from nova.objects import fields
from oslo_concurrency import processutils
from oslo_log import log as logging
from oslo_serialization import jsonutils
from oslo_utils import excutils

import nova_bhyve.conf  # noqa: F401  (registers [bhyve])
from nova import exception
from nova.virt import driver, hardware
from nova_bhyve import guest
from nova_bhyve.concurrency import PeriodicThread
from nova_bhyve.machine import load_backend, power
from nova_bhyve.machine.base import MachineError, MachineState
from nova_bhyve.migration import orphans
from nova_bhyve.migration.cold import ColdMigrationMixin
from nova_bhyve.migration.live import LiveMigrationMixin

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

_DIAG_STATES = {
    MachineState.RUNNING: "running", MachineState.PAUSED: "paused",
    MachineState.SUSPENDED: "suspended", MachineState.SHUTDOWN: "shutdown",
    MachineState.CRASHED: "crashed", MachineState.NOSTATE: "pending",
}


class GuestOperationFailed(exception.NovaException):
    """The machine layer could not carry out an operation."""

    msg_fmt = "Guest %(uuid)s: %(reason)s"


class BhyveDriver(LiveMigrationMixin, ColdMigrationMixin, driver.ComputeDriver):
    """Runs Nova instances as bhyve guests (KVM test host on Linux)."""

    capabilities = dict(
        driver.ComputeDriver.capabilities,
        has_imagecache=False,
        supports_evacuate=True,
        supports_image_type_raw=True,
    )

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi)
        self.backend = load_backend(CONF, CONF.instances_path)
        self.capabilities = dict(self.capabilities, **self.backend.capabilities)
        self._host = None
        self._node_uuid = None
        self._last_states = {}
        self._watcher = PeriodicThread("bhyve-state-watch",
                                       CONF.bhyve.state_poll_interval,
                                       self._watch_states)
        self._orphan_watch = PeriodicThread(
            "bhyve-orphan-watch",
            orphans.check_interval(CONF.bhyve.live_migration_orphan_grace),
            self._orphans.check)
        self._image_api = None

    # -- host ---------------------------------------------------------------
    def init_host(self, host):
        """Check the backend's prerequisites and start the state watcher."""
        self._host = host
        # read once: the process-wide cache would give every driver object
        # in one process (functional tests) the same node
        self._node_uuid = nova.virt.node.get_local_node_uuid()
        try:
            self.backend.init_host(host)
        except MachineError as exc:
            raise exception.NovaException(str(exc)) from exc
        self._reap_incoming()
        self._last_states = self._current_states()
        self._watcher.start()
        self._orphan_watch.start()

    def cleanup_host(self, host):
        """Stop the watchers; guests keep running."""
        self._watcher.stop()
        self._orphan_watch.stop()

    def _nodename(self):
        return self._host or CONF.host

    def get_available_nodes(self, refresh=False):
        """Return the single node this service manages (the host name)."""
        return [self._nodename()]

    def get_nodenames_by_uuid(self, refresh=False):
        """Return {node UUID: node name} for this host's single node."""
        if self._node_uuid is None:
            return super().get_nodenames_by_uuid(refresh)
        return {self._node_uuid: self._nodename()}

    def get_host_ip_addr(self):
        """Return ``[DEFAULT] my_ip``."""
        return CONF.my_ip

    def get_host_uptime(self):
        """Return what ``uptime`` prints on this host (the os-hypervisors API)."""
        out, _err = processutils.execute("uptime")
        return out.strip()

    def get_available_resource(self, nodename):
        """Return CPUs, memory and disk measured on this host."""
        facts = self.backend.host_facts()
        resources = {
            "vcpus": facts.vcpus, "memory_mb": facts.memory_mb,
            "local_gb": facts.disk_gb, "vcpus_used": 0,
            "memory_mb_used": facts.memory_mb_used,
            "local_gb_used": facts.disk_gb_used,
            "hypervisor_type": facts.hypervisor_type,
            "hypervisor_version": facts.hypervisor_version,
            "hypervisor_hostname": nodename,
            "cpu_info": jsonutils.dumps({"arch": facts.arch,
                                         "model": facts.cpu_model,
                                         "vendor": facts.cpu_vendor,
                                         "page_size": facts.page_size,
                                         "topology": {"cells": 1,
                                                      "cores": facts.vcpus,
                                                      "threads": 1}}),
            "disk_available_least": facts.disk_gb - facts.disk_gb_used,
            "numa_topology": None,
            "supported_instances": [(facts.arch, fields.HVType.BHYVE,
                                     fields.VMMode.HVM)],
        }
        if self._node_uuid is not None:
            resources["uuid"] = self._node_uuid
        return resources

    def update_provider_tree(self, provider_tree, nodename, allocations=None):
        """Report VCPU, MEMORY_MB and DISK_GB inventory of this host."""
        facts = self.backend.host_facts()
        inventory = provider_tree.data(nodename).inventory
        ratios = self._get_allocation_ratios(inventory)
        totals = {"VCPU": (facts.vcpus, CONF.reserved_host_cpus),
                  "MEMORY_MB": (facts.memory_mb, CONF.reserved_host_memory_mb),
                  "DISK_GB": (facts.disk_gb,
                              self._get_reserved_host_disk_gb_from_config())}
        result = {}
        for rc, (total, reserved) in totals.items():
            if total <= 0:
                continue
            result[rc] = {"total": total, "min_unit": 1, "max_unit": total,
                          "step_size": 1, "allocation_ratio": ratios[rc],
                          "reserved": reserved}
        provider_tree.update_inventory(nodename, result)

    # -- instances ----------------------------------------------------------
    def list_instance_uuids(self):
        """Return the UUIDs of all guests on this host."""
        return self.backend.list_machines()

    def list_instances(self):
        """Return guest names; guests are named by instance UUID."""
        return self.backend.list_machines()

    def instance_exists(self, instance):
        """Return True if this host has a guest for ``instance``."""
        return instance.uuid in self.backend.list_machines()

    def _state(self, instance):
        try:
            return self.backend.state(instance.uuid)
        except KeyError:
            raise exception.InstanceNotFound(
                instance_id=instance.uuid) from None

    def get_info(self, instance, use_cache=True):
        """Return the guest's real power state."""
        return hardware.InstanceInfo(
            state=power.to_power_state(self._state(instance)))

    def _call(self, instance, func, *args):
        try:
            return func(instance.uuid, *args)
        except KeyError:
            raise exception.InstanceNotFound(
                instance_id=instance.uuid) from None
        except MachineError as exc:
            raise GuestOperationFailed(uuid=instance.uuid,
                                       reason=str(exc)) from exc

    def spawn(self, context, instance, image_meta, injected_files,
              admin_password, allocations, network_info=None,
              block_device_info=None, power_on=True, accel_info=None):
        """Create the guest's disk from its image and boot it."""
        unsupported = self._unsupported_devices(instance, block_device_info)
        if unsupported:
            raise exception.InstanceDeployFailure(
                reason=f"nova-bhyve does not support {unsupported} yet",
                instance_id=instance.uuid)
        bad_vifs = guest.unsupported_vifs(network_info)
        if bad_vifs:
            raise exception.InstanceDeployFailure(
                reason=f"nova-bhyve plugs ports bound as VIF type "
                       f"{guest.VIF_TYPE_TAP} (ML2 mechanism driver bhyve, "
                       f"[ml2_bhyve] hosts must list {self._nodename()}); "
                       f"these are not: {', '.join(bad_vifs)}",
                instance_id=instance.uuid)
        spec = guest.build_spec(instance, network_info, CONF, block_device_info)
        # an evacuation to a host sharing instances_path finds the disk here
        keep_disks = self.backend.has_disks(instance.uuid)
        try:
            spec = self.backend.create(context, instance, spec, image_meta)
            self._plug_and_wait(instance, spec, network_info, power_on)
            if power_on:
                self.backend.start(instance.uuid)
        except Exception as exc:
            with excutils.save_and_reraise_exception() as ctxt:
                self.backend.destroy(instance.uuid)
                self.backend.unplug_vifs(spec)
                self.backend.delete_files(instance.uuid, not keep_disks)
                if isinstance(exc, MachineError):
                    ctxt.reraise = False
            raise exception.InstanceDeployFailure(
                reason=str(exc), instance_id=instance.uuid) from exc
        LOG.info("Guest created (%s vCPU, %s MiB)%s", spec.vcpus,
                 spec.memory_mb, " and started" if power_on else "",
                 instance=instance)

    def _plug_and_wait(self, instance, spec, network_info, power_on):
        """Plug the VIFs; wait for Neutron to report inactive ones wired."""
        events = []
        if power_on and CONF.vif_plugging_timeout:
            events = guest.vif_plugged_events(network_info)
        waiting = contextlib.nullcontext()
        if events:
            waiting = self.virtapi.wait_for_instance_event(
                instance, events, timeout=CONF.vif_plugging_timeout,
                error_callback=self._neutron_failed_callback)
        try:
            with waiting:
                self.backend.plug_vifs(spec)
        except exception.InstanceEventTimeout:
            if CONF.vif_plugging_is_fatal:
                raise exception.VirtualInterfaceCreateException() from None
            LOG.warning("Neutron did not report %s within %s s "
                        "([DEFAULT] vif_plugging_timeout); booting anyway "
                        "as [DEFAULT] vif_plugging_is_fatal is off",
                        events, CONF.vif_plugging_timeout, instance=instance)

    @staticmethod
    def _neutron_failed_callback(event_name, instance):
        LOG.error("Neutron reported failure on event %s", event_name,
                  instance=instance)
        if CONF.vif_plugging_is_fatal:
            raise exception.VirtualInterfaceCreateException()

    @staticmethod
    def _unsupported_devices(instance, block_device_info):
        if driver.block_device_info_get_mapping(block_device_info):
            return "volumes"
        extras = guest.extra_disks(instance, block_device_info)
        if len(extras) > guest.MAX_EXTRA_DISKS:
            return (f"more than {guest.MAX_EXTRA_DISKS} swap and ephemeral "
                    f"disks (asked for {len(extras)})")
        return ""

    @staticmethod
    def _unmovable_devices(instance, block_device_info):
        """Return what a migration cannot move yet (empty if nothing)."""
        if driver.block_device_info_get_mapping(block_device_info):
            return "volumes"
        return ""

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        """Stop the guest at once and remove its files."""
        self.backend.destroy(instance.uuid)
        self.cleanup(context, instance, network_info, block_device_info,
                     destroy_disks)

    def cleanup(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, migrate_data=None, destroy_vifs=True,
                destroy_secrets=True):
        """Unplug VIFs and remove the guest's files."""
        if destroy_vifs:
            self.unplug_vifs(instance, network_info)
        self.backend.delete_files(instance.uuid, destroy_disks)
        self._last_states.pop(instance.uuid, None)

    def reboot(self, context, instance, network_info, reboot_type,
               block_device_info=None, bad_volumes_callback=None,
               accel_info=None, share_info=None):
        """Reboot: SOFT asks the guest first, HARD restarts it at once."""
        self._call(instance, self.backend.reboot, reboot_type == "SOFT")

    def power_off(self, instance, timeout=0, retry_interval=0):
        """Power off: gracefully within ``timeout`` s; 0 means immediately."""
        self._call(instance, self.backend.stop, timeout, retry_interval)

    def power_on(self, context, instance, network_info,
                 block_device_info=None, accel_info=None, share_info=None):
        """Boot the stopped guest."""
        self._plug(instance, network_info)
        self._call(instance, self.backend.start)

    def pause(self, instance):
        """Stop the guest's vCPUs."""
        self._call(instance, self.backend.pause)

    def unpause(self, instance):
        """Run the paused guest's vCPUs."""
        self._call(instance, self.backend.unpause)

    def suspend(self, context, instance):
        """Checkpoint the guest to disk and end its process."""
        self._call(instance, self.backend.suspend)

    def resume(self, context, instance, network_info, block_device_info=None,
               share_info=None):
        """Restore the suspended guest from its checkpoint."""
        self._plug(instance, network_info)
        self._call(instance, self.backend.start)

    def resume_state_on_host_boot(self, context, instance, network_info,
                                  share_info, block_device_info=None):
        """Start a guest that should run but does not (after a host boot)."""
        state = self._state(instance)
        if state in (MachineState.RUNNING, MachineState.PAUSED):
            return
        self._plug(instance, network_info)
        self._call(instance, self.backend.start)

    def _plug(self, instance, network_info):
        if network_info:
            self.plug_vifs(instance, network_info)

    def plug_vifs(self, instance, network_info):
        """Create the guest's tap devices on their bridges."""
        self.backend.plug_vifs(guest.build_spec(instance, network_info, CONF))

    def unplug_vifs(self, instance, network_info):
        """Remove the guest's tap devices."""
        self.backend.unplug_vifs(guest.build_spec(instance, network_info, CONF))

    def get_console_output(self, context, instance):
        """Return the end of the guest's serial console log (bytes)."""
        path = self.backend.console_log_path(instance.uuid)
        limit = CONF.bhyve.console_log_max_bytes
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
                return f.read(limit)
        except FileNotFoundError:
            if instance.uuid not in self.backend.list_machines():
                raise exception.InstanceNotFound(
                    instance_id=instance.uuid) from None
            return b""

    def get_instance_diagnostics(self, instance):
        """Return Diagnostics: state, uptime, vCPUs, memory, disks, NICs."""
        info = self._call(instance, self.backend.diagnostics)
        diags = diagnostics_obj.Diagnostics(
            state=_DIAG_STATES[info["state"]], hypervisor="bhyve",
            hypervisor_os=self.backend.hypervisor_os,
            uptime=info.get("uptime") or 0, config_drive=False)
        for cpu in range(info["vcpus"]):
            diags.add_cpu(id=cpu)
        for nic in info["nics"]:
            diags.add_nic(mac_address=nic["mac"])
        for _disk in info["disks"]:
            diags.add_disk()
        diags.memory_details = diagnostics_obj.MemoryDiagnostics(
            maximum=info["memory_mb"])
        return diags

    def snapshot(self, context, instance, image_id, update_task_state):
        """Upload the root disk to Glance as a raw image."""
        if self._image_api is None:
            self._image_api = glance.API()
        snapshot = self._image_api.get(context, image_id)
        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        props = {"image_location": "snapshot", "image_state": "available",
                 "owner_id": instance.project_id}
        sysmeta = instance.system_metadata or {}
        if sysmeta.get("image_" + guest.IMAGE_PROP_CMDLINE):
            props[guest.IMAGE_PROP_CMDLINE] = sysmeta[
                "image_" + guest.IMAGE_PROP_CMDLINE]
        metadata = {"name": snapshot["name"], "status": "active",
                    "disk_format": "raw", "container_format": "bare",
                    "properties": props}
        with self._call(instance, self.backend.snapshot_disk) as path:
            update_task_state(task_state=task_states.IMAGE_UPLOADING,
                              expected_state=task_states.IMAGE_PENDING_UPLOAD)
            with open(path, "rb") as data:
                self._image_api.update(context, image_id, metadata, data,
                                       purge_props=False)
        LOG.info("Snapshot uploaded as image %s", image_id, instance=instance)

    # -- state watcher ------------------------------------------------------
    def _current_states(self):
        states = {}
        for uuid in self.backend.list_machines():
            try:
                states[uuid] = self.backend.state(uuid)
            except KeyError:
                continue
        return states

    def _watch_states(self):
        """Emit a lifecycle event for every guest whose state changed."""
        current = self._current_states()
        for uuid, state in current.items():
            before = self._last_states.get(uuid)
            if before is not None and before != state and \
                    state != MachineState.NOSTATE:
                event = guest.lifecycle_event(uuid, state)
                if event is not None:
                    self.emit_event(event)
        self._last_states = current

