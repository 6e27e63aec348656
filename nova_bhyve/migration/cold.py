"""Cold migration, resize and evacuation for BhyveDriver.

Cold migration and resize (``nova migrate``, ``nova resize``):

- source ``migrate_disk_and_power_off``: stops the guest and offers each
  of its disks (root, swap, ephemerals) on a one-shot listener
  (``diskcopy``); returns ``disk_info``, a JSON text with each listener's
  address and a fresh random token.  Nova
  passes disk_info to the destination over RPC and does not log it;
  the listener serves one authenticated copy, then closes, or gives up
  after ``[bhyve] disk_transfer_timeout``.  The source keeps its files for
  a revert;
- destination ``finish_migration``: creates the instance files with the
  new flavor, pulls the disks, grows the root disk and a single ephemeral
  disk to the new flavor (as Nova's libvirt driver; a swap disk of a new
  size is made blank, not copied; a shrink is refused at the source),
  plugs VIFs and boots the guest (fresh: a cold migration does not carry
  memory);
- source ``confirm_migration`` removes the old guest; ``finish_revert_
  migration`` boots it again from its untouched disk (the destination's
  copy is removed by ``destroy`` before that).

Shared ``instances_path`` (NFS): the source also puts a probe file there
and names it in disk_info; a destination that sees it uses the disks in
place (``Backend.adopt``) instead of pulling them, and records
``nova_bhyve_shared_instance_path`` = ``1`` in the instance's system
metadata, so that ``confirm_migration`` on the source removes only its own
runtime files and keeps the disks.  A revert boots the disks as the
destination left them (grown by a resize, with what the guest wrote):
unlike the libvirt driver nova-bhyve keeps no ``_resize`` copy.

Evacuation (``supports_evacuate``): Nova rebuilds the instance on another
host with ``spawn``.  ``instance_on_disk`` is True when the root disk is
already here (a shared ``instances_path``): ``spawn`` then keeps it, as
the libvirt driver does; otherwise the disk is made from the image.  When
the failed host comes back, Nova's ``_destroy_evacuated_instances`` calls
``destroy`` with ``destroy_disks`` decided by the shared-storage check
below: the stale guest is killed and its runtime files removed, a disk on
shared storage is kept.
"""

import base64
import json
import os
import time

import nova.conf
from oslo_log import log as logging

from nova import exception, objects
from nova_bhyve import guest
from nova_bhyve.machine.base import SWAP_DISK, MachineError
from nova_bhyve.migration import checks, diskcopy, events
from nova_bhyve.migration import data as mdata
from nova_bhyve.migration.live import inbound_addr

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)
#: system metadata key: the last cold migration found instances_path shared
SHARED_KEY = "nova_bhyve_shared_instance_path"


class ColdMigrationMixin:
    """ComputeDriver cold-migration and evacuation methods."""

    def __init__(self, virtapi, *args, **kwargs):
        super().__init__(virtapi, *args, **kwargs)
        self._disk_offers = {}
        self._cold_probes = {}

    def _close_offer(self, uuid):
        for offer in self._disk_offers.pop(uuid, ()):
            offer.close()
        checks.remove_probe(self.backend.instances_path,
                            self._cold_probes.pop(uuid, None))

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
        """Stop the guest and offer every disk to ``dest``; return disk_info."""
        uuid = instance.uuid
        if self._unmovable_devices(instance, block_device_info):
            raise exception.InstanceFaultRollback(exception.MigrationError(
                reason="instances with volumes cannot be migrated by "
                       "nova-bhyve yet"))
        _refuse_shrinks(instance, flavor, block_device_info)
        if not self.backend.can_migrate:
            raise exception.InstanceFaultRollback(exception.MigrationError(
                reason=f"{type(self.backend).__name__} cannot migrate guests "
                       f"yet: {self.backend.migration_blocker}"))
        paths = self.backend.disk_paths(uuid)
        same_host = self._same_host(context, instance)
        self.power_off(instance, timeout, retry_interval)
        if same_host:
            return json.dumps({"version": 1, "same_host": True})
        self._close_offer(uuid)
        addr = inbound_addr()
        offers, disks = [], []
        try:
            for name, path in paths.items():
                token = os.urandom(32)
                offers.append(diskcopy.DiskListener(
                    path, token, diskcopy.SEND, addr,
                    CONF.bhyve.disk_transfer_timeout))
                disks.append({
                    "name": name,
                    "addr": mdata.format_addr(addr, offers[-1].port),
                    "token": base64.b64encode(token).decode("ascii"),
                    "size": os.path.getsize(path)})
        except diskcopy.DiskCopyError as exc:
            for offer in offers:
                offer.close()
            self.power_on(context, instance, network_info)
            raise exception.InstanceFaultRollback(
                exception.MigrationError(reason=str(exc))) from exc
        self._disk_offers[uuid] = offers
        # a destination sharing instances_path sees this file and uses the
        # disks in place
        probe = checks.create_probe(self.backend.instances_path)
        self._cold_probes[uuid] = probe
        LOG.info("Guest stopped; offering its disks (%s) to %s on %s",
                 ", ".join(paths), dest, addr, instance=instance)
        return json.dumps({"version": 1, "disks": disks, "probe": probe})

    def finish_migration(self, context, migration, instance, disk_info,
                         network_info, image_meta, resize_instance,
                         allocations, block_device_info=None, power_on=True,
                         share_info=None):
        """Create the guest here with the new flavor, pull its disks, boot it."""
        uuid = instance.uuid
        try:
            info = json.loads(disk_info or "{}")
        except ValueError:
            info = {}
        same_host = bool(info.get("same_host"))
        if not same_host and not info.get("disks"):
            raise exception.MigrationError(reason=(
                "the source returned no disk offer: both hosts must run "
                "nova-bhyve with cold migration of every disk"))
        spec = guest.build_spec(instance, network_info, CONF,
                                block_device_info)
        shared = not same_host and checks.probe_exists(
            self.backend.instances_path, info.get("probe"))
        try:
            if shared:
                self.backend.adopt(instance, spec)
                LOG.info("The disks are on the shared instances path; using "
                         "them in place", instance=instance)
            else:
                self.backend.create(context, instance, spec,
                                    objects.ImageMeta.from_dict({}))
            if not same_host:
                instance.system_metadata[SHARED_KEY] = "1" if shared else "0"
            if not same_host and not shared:
                self._pull_disks(context, instance, info["disks"])
            if resize_instance:
                self._grow_disks(instance, spec)
            self.backend.plug_vifs(spec)
            if power_on:
                self.backend.start(uuid)
        except (MachineError, diskcopy.DiskCopyError,
                mdata.MigrateDataError) as exc:
            if not same_host:
                self.backend.destroy(uuid)
                self.backend.unplug_vifs(spec)
                self.backend.delete_files(uuid, not shared)
            raise exception.MigrationError(
                reason=f"cannot finish the migration on {self._nodename()}: "
                       f"{exc}") from exc
        LOG.info("Guest moved here (%s vCPU, %s MiB)%s", spec.vcpus,
                 spec.memory_mb, " and started" if power_on else "",
                 instance=instance)

    def _grow_disks(self, instance, spec):
        """Grow the root disk, and a single ephemeral disk, as Nova's libvirt
        driver does; the swap disk was made at its new size by ``create``."""
        if instance.flavor.root_gb:
            self.backend.grow_disk(instance.uuid, instance.flavor.root_gb << 30)
        ephemerals = [d for d in spec.disks if d.name.startswith("eph")]
        if len(ephemerals) == 1 and instance.flavor.ephemeral_gb:
            self.backend.grow_disk(instance.uuid,
                                   instance.flavor.ephemeral_gb << 30,
                                   ephemerals[0].name)

    def _pull_disks(self, context, instance, offers):
        """Copy each offered disk the new spec has; a resized swap is not."""
        paths = self.backend.disk_paths(instance.uuid)
        total, t0 = 0, time.monotonic()
        for offer in offers:
            name = offer.get("name")
            path = paths.get(name)
            size = int(offer.get("size", 0))
            if path is None or (name == SWAP_DISK and
                                os.path.getsize(path) != size):
                LOG.info("Not copying disk %s: the new flavor has it at "
                         "another size or not at all", name,
                         instance=instance)
                continue
            host, port = mdata.parse_addr(offer.get("addr", ""))
            try:
                token = base64.b64decode(offer["token"], validate=True)
            except (KeyError, ValueError):
                raise mdata.MigrateDataError(f"the offer of disk {name} has "
                                             "no valid token") from None
            total += diskcopy.copy(host, port, token, path, diskcopy.RECEIVE,
                                   CONF.bhyve.disk_transfer_timeout,
                                   max_size=size)
        seconds = time.monotonic() - t0
        LOG.info("Disks (%d bytes) copied in %.1f s", total, seconds,
                 instance=instance)
        events.record(context, instance, self._nodename(),
                      f"bhyve_disk_copy bytes={total} seconds={seconds:.1f}")

    def confirm_migration(self, context, migration, instance, network_info):
        """Remove the old guest from this (the source) host.

        Disks on a shared instances path are the destination's now: only
        this host's runtime files go.
        """
        self._close_offer(instance.uuid)
        if migration.source_compute == migration.dest_compute:
            return
        shared = (instance.system_metadata or {}).get(SHARED_KEY) == "1"
        self.destroy(context, instance, network_info, destroy_disks=not shared)
        LOG.info("Old guest removed after the confirmed migration%s",
                 " (its disks, on the shared instances path, stay)"
                 if shared else "", instance=instance)

    def finish_revert_migration(self, context, instance, network_info,
                                migration, block_device_info=None,
                                power_on=True, share_info=None):
        """Boot the guest here again from its untouched disks."""
        self._close_offer(instance.uuid)
        spec = guest.build_spec(instance, network_info, CONF,
                                block_device_info)
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
        """True if the root disk is here (a shared instances path)."""
        return self.backend.has_disks(instance.uuid)


def _refuse_shrinks(instance, flavor, block_device_info):
    """Refuse a resize that would shrink the root or ephemeral disks."""
    what = None
    if flavor.root_gb and flavor.root_gb < instance.flavor.root_gb:
        what = ("root disk", instance.flavor.root_gb, flavor.root_gb)
    eph_gb = guest.ephemeral_gb(instance, block_device_info)
    if flavor.ephemeral_gb < eph_gb:
        what = ("ephemeral disks", eph_gb, flavor.ephemeral_gb)
    if what:
        raise exception.InstanceFaultRollback(exception.ResizeError(
            reason=f"the {what[0]} cannot shrink from {what[1]} GiB to "
                   f"{what[2]} GiB: choose a flavor with at least as much "
                   "disk"))
