"""Cold migration, resize and evacuation for BhyveDriver.

Cold migration and resize (``nova migrate``, ``nova resize``):

- source ``migrate_disk_and_power_off``: stops the guest and offers its
  root disk on a one-shot listener (``diskcopy``); returns ``disk_info``, a
  JSON text with the listener's address and a fresh random token.  Nova
  passes disk_info to the destination over RPC and does not log it;
  the listener serves one authenticated copy, then closes, or gives up
  after ``[bhyve] disk_transfer_timeout``.  The source keeps its files for
  a revert;
- destination ``finish_migration``: creates the instance files with the
  new flavor, pulls the disk, grows it if the flavor's root disk grew,
  plugs VIFs and boots the guest (fresh: a cold migration does not carry
  memory);
- source ``confirm_migration`` removes the old guest; ``finish_revert_
  migration`` boots it again from its untouched disk (the destination's
  copy is removed by ``destroy`` before that).

Evacuation (``supports_evacuate``): Nova rebuilds the instance on another
host with ``spawn`` from its image, because instance disks are local to
each host (``instance_on_disk`` is always False).  When the failed host
comes back, Nova's ``_destroy_evacuated_instances`` calls ``destroy`` with
``destroy_disks`` decided by the shared-storage check below: the stale
guest is killed and its files removed, a disk on shared storage is kept.
"""

import base64
import json
import os
import time

import nova.conf
from oslo_log import log as logging

from nova import exception, objects
from nova_bhyve import guest
from nova_bhyve.machine.base import MachineError
from nova_bhyve.migration import checks, diskcopy, events
from nova_bhyve.migration import data as mdata
from nova_bhyve.migration.live import inbound_addr

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)


class ColdMigrationMixin:
    """ComputeDriver cold-migration and evacuation methods."""

    def __init__(self, virtapi, *args, **kwargs):
        super().__init__(virtapi, *args, **kwargs)
        self._disk_offers = {}

    def _close_offer(self, uuid):
        offer = self._disk_offers.pop(uuid, None)
        if offer is not None:
            offer.close()

    @staticmethod
    def _same_host(context, instance):
        ctxt = instance.migration_context
        if ctxt is None:
            return False
        migration = objects.Migration.get_by_id(context, ctxt.migration_id)
        return migration.source_compute == migration.dest_compute

    def migrate_disk_and_power_off(self, context, instance, dest, flavor,
                                   network_info, block_device_info=None,
                                   timeout=0, retry_interval=0):
        """Stop the guest and offer its disk to ``dest``; return disk_info."""
        uuid = instance.uuid
        if self._unmovable_devices(instance, block_device_info):
            raise exception.InstanceFaultRollback(exception.MigrationError(
                reason="instances with volumes, ephemeral or swap disks "
                       "cannot be migrated by nova-bhyve yet"))
        if flavor.root_gb and flavor.root_gb < instance.flavor.root_gb:
            raise exception.InstanceFaultRollback(exception.ResizeError(
                reason=f"the root disk cannot shrink from "
                       f"{instance.flavor.root_gb} GiB to {flavor.root_gb} "
                       "GiB: choose a flavor with at least as much disk"))
        if not self.backend.can_migrate:
            raise exception.InstanceFaultRollback(exception.MigrationError(
                reason=f"{type(self.backend).__name__} cannot migrate guests "
                       f"yet: {self.backend.migration_blocker}"))
        path = self.backend.disk_path(uuid)
        same_host = self._same_host(context, instance)
        self.power_off(instance, timeout, retry_interval)
        if same_host:
            return json.dumps({"version": 1, "same_host": True})
        self._close_offer(uuid)
        token = os.urandom(32)
        addr = inbound_addr()
        try:
            offer = diskcopy.DiskListener(path, token, diskcopy.SEND, addr,
                                          CONF.bhyve.disk_transfer_timeout)
        except diskcopy.DiskCopyError as exc:
            self.power_on(context, instance, network_info)
            raise exception.InstanceFaultRollback(
                exception.MigrationError(reason=str(exc))) from exc
        self._disk_offers[uuid] = offer
        LOG.info("Guest stopped; offering its disk to %s on %s", dest,
                 mdata.format_addr(addr, offer.port), instance=instance)
        return json.dumps({
            "version": 1, "addr": mdata.format_addr(addr, offer.port),
            "token": base64.b64encode(token).decode("ascii"),
            "size": os.path.getsize(path)})

    def finish_migration(self, context, migration, instance, disk_info,
                         network_info, image_meta, resize_instance,
                         allocations, block_device_info=None, power_on=True,
                         share_info=None):
        """Create the guest here with the new flavor, pull its disk, boot it."""
        uuid = instance.uuid
        try:
            info = json.loads(disk_info or "{}")
        except ValueError:
            info = {}
        same_host = bool(info.get("same_host"))
        if not same_host and "addr" not in info:
            raise exception.MigrationError(reason=(
                "the source returned no disk offer: both hosts must run "
                "nova-bhyve with cold migration support"))
        spec = guest.build_spec(instance, network_info, CONF)
        try:
            self.backend.create(context, instance, spec,
                                objects.ImageMeta.from_dict({}))
            if not same_host:
                self._pull_disk(context, instance, info)
            if resize_instance and instance.flavor.root_gb:
                self.backend.grow_disk(uuid, instance.flavor.root_gb << 30)
            self.backend.plug_vifs(spec)
            if power_on:
                self.backend.start(uuid)
        except (MachineError, diskcopy.DiskCopyError,
                mdata.MigrateDataError) as exc:
            if not same_host:
                self.backend.destroy(uuid)
                self.backend.unplug_vifs(spec)
                self.backend.delete_files(uuid, True)
            raise exception.MigrationError(
                reason=f"cannot finish the migration on {self._nodename()}: "
                       f"{exc}") from exc
        LOG.info("Guest moved here (%s vCPU, %s MiB)%s", spec.vcpus,
                 spec.memory_mb, " and started" if power_on else "",
                 instance=instance)

    def _pull_disk(self, context, instance, info):
        host, port = mdata.parse_addr(info["addr"])
        try:
            token = base64.b64decode(info["token"], validate=True)
        except (KeyError, ValueError):
            raise mdata.MigrateDataError("the disk offer has no valid "
                                         "token") from None
        t0 = time.monotonic()
        size = diskcopy.copy(host, port, token,
                             self.backend.disk_path(instance.uuid),
                             diskcopy.RECEIVE, CONF.bhyve.disk_transfer_timeout,
                             max_size=int(info.get("size", 0)))
        seconds = time.monotonic() - t0
        LOG.info("Root disk (%d bytes) copied from %s in %.1f s", size, host,
                 seconds, instance=instance)
        events.record(context, instance, self._nodename(),
                      f"bhyve_disk_copy bytes={size} seconds={seconds:.1f}")

    def confirm_migration(self, context, migration, instance, network_info):
        """Remove the old guest from this (the source) host."""
        self._close_offer(instance.uuid)
        if migration.source_compute == migration.dest_compute:
            return
        self.destroy(context, instance, network_info)
        LOG.info("Old guest removed after the confirmed migration",
                 instance=instance)

    def finish_revert_migration(self, context, instance, network_info,
                                migration, block_device_info=None,
                                power_on=True, share_info=None):
        """Boot the guest here again from its untouched disk."""
        self._close_offer(instance.uuid)
        spec = guest.build_spec(instance, network_info, CONF)
        try:
            self.backend.create(context, instance, spec,
                                objects.ImageMeta.from_dict({}))
            self.backend.plug_vifs(spec)
            if power_on:
                self.backend.start(instance.uuid)
        except MachineError as exc:
            raise exception.MigrationError(
                reason=f"cannot restart the guest on {self._nodename()} after "
                       f"the revert: {exc}") from exc
        LOG.info("Guest restored after the reverted migration",
                 instance=instance)

    # -- shared storage checks (revert, evacuation) ------------------------
    def check_instance_shared_storage_local(self, context, instance):
        """Create a probe file that a host sharing our storage would see."""
        return {"filename": checks.create_probe(self.backend.instances_path)}

    def check_instance_shared_storage_remote(self, context, data):
        """Return True if the other host's probe file is visible here."""
        return checks.probe_exists(self.backend.instances_path,
                                   data.get("filename"))

    def check_instance_shared_storage_cleanup(self, context, data):
        """Remove the probe file."""
        checks.remove_probe(self.backend.instances_path, data.get("filename"))

    def instance_on_disk(self, instance):
        """Always False: instance disks are local, an evacuation rebuilds."""
        return False
