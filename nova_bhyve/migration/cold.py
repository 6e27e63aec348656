"""Cold migration, resize and evacuation for BhyveDriver.

Cold migration and resize (``nova migrate``, ``nova resize``) move the
stopped guest's disks (root, swap, ephemerals) with the migration engine,
in a session without memory (vmm port ``none``, cold mode: PROTOCOL.md,
"Disks only"), authenticated and encrypted as a live migration is:

- source ``migrate_disk_and_power_off``: stops the guest, then asks the
  destination to listen for its disks.  Nova gives a driver no call on
  the destination before this one, so the source makes the one
  compute-to-compute call that carries driver data,
  ``check_instance_shared_storage`` (Nova itself makes it between the two
  computes of a resize revert): the request holds a shared-storage probe
  file name, an ephemeral X25519 public key and the disks' file names;
  the destination answers with its listener's address and its own public
  key (``_receive_disks``).  Both sides derive the engine's secret from
  the key exchange as ``migration.data`` does for a live migration; no
  secret crosses Nova's message bus.  The source then sends every disk
  (a swap disk whose size the new flavor changes is not sent: the
  destination makes it blank) and waits for the engine's verdict.  If the
  transfer fails, the guest is started again here (unless it was
  stopped before) and Nova rolls the migration back
  (``InstanceFaultRollback``): the instance stays on this host, in the
  state it had, with its disks untouched, and the destination's engine
  removes the files it created (the listener's directory with them).
  The source keeps its files for a revert; disk_info names what moved;
- destination ``finish_migration``: the disks are already in the
  instance directory; it records the guest with the new flavor, grows the
  root disk and a single ephemeral disk to the new flavor (as Nova's
  libvirt driver; a shrink is refused at the source), plugs VIFs and
  boots the guest (fresh: a cold migration does not carry memory);
- source ``confirm_migration`` removes the old guest; ``finish_revert_
  migration`` boots it again from its untouched disk (the destination's
  copy is removed by ``destroy`` before that).

Shared ``instances_path`` (NFS): a destination that sees the source's
probe file answers that it shares the disks and listens for nothing; it
uses the disks in place (``Backend.adopt``) and records
``nova_bhyve_shared_instance_path`` = ``1`` in the instance's system
metadata, so that ``confirm_migration`` on the source removes only its own
runtime files and keeps the disks.  A revert boots the disks as the
destination left them (grown by a resize, with what the guest wrote):
unlike the libvirt driver nova-bhyve keeps no ``_resize`` copy.

A resize on the same host moves no disk byte: the guest is recorded
again with the new flavor over the same files.

bhyve with ``[bhyve] disk_layout = file`` moves its disk files as the test
host does, with ``nvram.fd`` (``instance_files``) beside them, and over a
shared instances path uses them in place; a destination refuses a request
whose disks (files or zvol streams) are not its own layout.

Disks that move as stream disks (bhyve's zvols, ``backend.stream_disks``)
go in the same session as the engine's streams: the request names them
(``streams``) with a snapshot tag, and the backend's ``instance_files``
(bhyve: ``nvram.fd``) as its files.  Source: a snapshot's full ``zfs
send``, then, at the engine's notify byte, the increment of a second
snapshot (empty: the guest is stopped); destination: ``zfs receive`` of
both (``machine/zvolmove.py``).  The snapshots go on both hosts after;
if the session fails, the destination's received zvols go and the
source's stay.  Over a shared instances path the destination refuses
such a request: the zvols would move while revert and confirm treat the
disks as shared.

Evacuation (``supports_evacuate``): Nova rebuilds the instance on another
host with ``spawn``.  ``instance_on_disk`` is True when the root disk is
already here (a shared ``instances_path``): ``spawn`` then keeps it, as
the libvirt driver does; otherwise the disk is made from the image.  When
the failed host comes back, Nova's ``_destroy_evacuated_instances`` calls
``destroy`` with ``destroy_disks`` decided by the shared-storage check
below: the stale guest is killed and its runtime files removed, a disk on
shared storage is kept.
"""

import contextlib
import json
import os
import re
import shutil
import threading
import time

import nova.conf
import oslo_messaging
from nova.compute import rpcapi as compute_rpcapi
from nova.compute import vm_states
from oslo_concurrency import processutils
from oslo_log import log as logging
from oslo_utils import uuidutils

from nova import exception, objects
from nova_bhyve import guest, privsep_zfs
from nova_bhyve.machine import zvolmove
from nova_bhyve.machine.base import SWAP_DISK, MachineError
from nova_bhyve.migration import checks, events, zvols
from nova_bhyve.migration import data as mdata
from nova_bhyve.migration.live import inbound_addr
from nova_bhyve.native.engine import (
    Migration,
    MigrationError,
    Mode,
    Result,
    VmmKind,
)

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)
#: system metadata key: the last cold migration found instances_path shared
SHARED_KEY = "nova_bhyve_shared_instance_path"
#: the key of a disk-transfer request in check_instance_shared_storage data
REQUEST_KEY = "nova_bhyve_cold_disks"
#: disk_info's version: the disks are on the destination when it arrives
DISK_INFO_VERSION = 2
#: a disk file's name in the instance directory (the source's names), or
#: the UEFI variable store moving beside stream disks
DISK_FILE = re.compile(r"disk(\.[A-Za-z0-9_-]{1,32})?|nvram\.fd")
#: a stream disk's name (bhyve: the zvol ``<uuid>-disk0``, ``-swap``, ``-eph0``)
STREAM_DISK = re.compile(r"disk|swap|eph[0-9]{1,2}")
#: seconds between looks at a running transfer
POLL_INTERVAL = 0.2


class ColdMigrationMixin:
    """ComputeDriver cold-migration and evacuation methods."""

    def __init__(self, virtapi, *args, **kwargs):
        super().__init__(virtapi, *args, **kwargs)
        self._received_disks = {}       # instance uuid: _Receiving
        self._received_lock = threading.Lock()
        self._compute_rpc = None

    @staticmethod
    def _move(context, instance):
        """The Migration record of the move under way, or None."""
        ctxt = instance.migration_context
        if ctxt is None:
            return None
        return objects.Migration.get_by_id(context, ctxt.migration_id)

    def migrate_disk_and_power_off(self, context, instance, dest, flavor,
                                   network_info, block_device_info=None,
                                   timeout=0, retry_interval=0):
        """Stop the guest and send its disks to ``dest``; return disk_info."""
        if self._unmovable_devices(instance, block_device_info):
            raise exception.InstanceFaultRollback(exception.MigrationError(
                reason="instances with volumes cannot be migrated by "
                       "nova-bhyve yet"))
        _refuse_shrinks(instance, flavor, block_device_info)
        if not self.backend.can_migrate:
            raise exception.InstanceFaultRollback(exception.MigrationError(
                reason=f"{type(self.backend).__name__} cannot migrate guests "
                       f"yet: {self.backend.migration_blocker}"))
        paths = dict(self.backend.disk_paths(instance.uuid))
        move = self._move(context, instance)
        same_host = move is not None and \
            move.source_compute == move.dest_compute
        self.power_off(instance, timeout, retry_interval)
        if same_host:
            return json.dumps({"version": DISK_INFO_VERSION,
                               "same_host": True})
        if flavor.swap != instance.flavor.swap:
            paths.pop(SWAP_DISK, None)  # made blank at its new size there
        try:
            if move is None:
                raise mdata.MigrateDataError("the instance has no migration "
                                             "record to send its disks with")
            shared = self._send_disks(context, instance, move.dest_compute,
                                      paths)
        except (MigrationError, MachineError, mdata.MigrateDataError,
                oslo_messaging.MessagingException,
                exception.NovaException) as exc:
            LOG.warning("Sending the disks to %s failed (%s); the guest "
                        "stays here", dest, exc, instance=instance)
            if instance.vm_state != vm_states.STOPPED:   # as it was
                self.power_on(context, instance, network_info)
            raise exception.InstanceFaultRollback(exception.MigrationError(
                reason=f"cannot send the disks to {dest}: {exc}")) from exc
        return json.dumps({"version": DISK_INFO_VERSION, "shared": shared,
                           "disks": [] if shared else list(paths)})

    def _rpc(self):
        if self._compute_rpc is None:
            self._compute_rpc = compute_rpcapi.ComputeAPI()
        return self._compute_rpc

    def _send_disks(self, context, instance, dest_compute, paths):
        """Send ``paths`` to the destination compute with the engine.

        Return True if it shares instances_path (nothing sent); raise
        MigrationError, MigrateDataError or an RPC error on failure.
        """
        uuid = instance.uuid
        private, public = mdata.new_key()
        files, request = _what_moves(self.backend, uuid, paths)
        request.update(uuid=uuid, src_key=public)
        probe = checks.create_probe(self.backend.instances_path)
        request = {"filename": probe, REQUEST_KEY: request}
        try:
            answer = self._rpc().check_instance_shared_storage(
                context, request, instance=instance, host=dest_compute)
        finally:
            checks.remove_probe(self.backend.instances_path, probe)
        if not isinstance(answer, dict):
            raise mdata.MigrateDataError(
                f"{dest_compute} cannot receive disks: both hosts must run "
                "nova-bhyve with engine disk transfer (upgrade the older one)")
        if answer.get("shared"):
            LOG.info("The destination shares the instances path: the disks "
                     "stay where they are", instance=instance)
            return True
        secret = mdata.derive(private, answer.get("dst_key", ""), uuid)
        host, port = mdata.parse_addr(answer.get("addr"))
        t0 = time.monotonic()
        opts = CONF.bhyve
        zs, streams = _open_streams(self.backend, uuid, request[REQUEST_KEY])
        mig = zvols.started(
            zs, LOG, instance, Migration.send,
            vmm_target=uuid, vmm_kind=VmmKind.NONE, mode=Mode.COLD,
            host=host, port=port, secret=secret.memory,
            disks=list(files.values()), streams=streams,
            channels=opts.live_migration_parallel_connections,
            compress=opts.live_migration_compression,
            timeout_ms=opts.disk_transfer_timeout * 1000)
        if zs is not None:
            zs.release()        # the engine holds its own descriptors
        LOG.info("Sending the disks (%s) to %s", ", ".join(paths),
                 mdata.format_addr(host, port), instance=instance)
        with mig:
            stats = _wait(mig)
        zvols.finish(zs, stats.result == Result.COMPLETED, LOG, instance)
        if stats.result != Result.COMPLETED:
            raise stats.exception
        seconds = time.monotonic() - t0
        LOG.info("Disks (%d bytes, %d on the wire) sent in %.1f s",
                 stats.disk_total, stats.bytes_transferred, seconds,
                 instance=instance)
        events.record(context, instance, self._nodename(),
                      f"bhyve_disk_copy bytes={stats.disk_total} "
                      f"wire={stats.bytes_transferred} seconds={seconds:.1f}")
        return False

    def _receive_disks(self, request, probe):
        """Destination: listen for the disks of a cold migration.

        Return {"shared": True} if the source's probe file is visible here,
        else the listener's address and this side's public key.
        """
        uuid = request.get("uuid", "")
        files = request.get("files") or []
        names = request.get("streams") or []
        if not _valid_request(uuid, files, names, request.get("tag")):
            raise exception.MigrationError(
                reason="a disk transfer request with a bad instance, file, "
                       "disk or snapshot name was refused")
        if bool(names) != bool(self.backend.stream_disks):
            raise exception.MigrationError(reason=(
                f"the source sends its disks as {'zvols' if names else 'files'}"
                f" and {self._nodename()} keeps them as "
                f"{'zvols' if self.backend.stream_disks else 'files'}: both "
                "hosts need the same [bhyve] disk_layout"))
        if checks.probe_exists(self.backend.instances_path, probe):
            if names:
                raise exception.MigrationError(reason=(
                    "the hosts share the instances path: nova-bhyve does not "
                    "cold-migrate or resize a guest whose disks are zvols "
                    "over a shared instances path yet; live-migrate it"))
            return {"shared": True}
        if not self.backend.can_migrate:
            raise exception.MigrationError(
                reason=f"{type(self.backend).__name__} cannot receive guests "
                       f"yet: {self.backend.migration_blocker}")
        folder = os.path.join(self.backend.instances_path, uuid)
        if os.path.lexists(os.path.join(folder, "disk")):
            raise exception.MigrationError(
                reason=f"{self._nodename()} already has a disk for instance "
                       f"{uuid} (a stale copy?): remove {folder} and retry")
        try:
            public, secrets = mdata.answer(request.get("src_key", ""), uuid)
        except mdata.MigrateDataError as exc:
            raise exception.MigrationError(reason=str(exc)) from exc
        self._drop_received(uuid)
        made = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        addr = inbound_addr()
        zs = None
        try:
            zs, streams = _open_streams(self.backend, uuid, request,
                                        receiving=True)
            mig = zvols.started(
                zs, LOG, None, Migration.receive,
                vmm_target=uuid, vmm_kind=VmmKind.NONE, secret=secrets.memory,
                host=addr, port=0,
                timeout_ms=CONF.bhyve.disk_transfer_timeout * 1000,
                disks=[os.path.join(folder, f) for f in files], streams=streams)
        except (MigrationError, MachineError) as exc:
            if made:
                shutil.rmtree(folder, ignore_errors=True)
            raise exception.MigrationError(
                reason=f"cannot listen for the disks: {exc}") from exc
        if zs is not None:
            zs.release()        # the engine holds its own descriptors
        receiving = _Receiving(mig, folder if made else None, zs,
                               [os.path.join(folder, f) for f in files])
        with self._received_lock:
            self._received_disks[uuid] = receiving
        threading.Thread(target=receiving.watch, daemon=True,
                         name=f"bhyve-disks-{uuid}").start()
        LOG.info("Listening for the disks of instance %s (%s) on %s", uuid,
                 ", ".join(names + files), mdata.format_addr(addr, mig.port))
        return {"shared": False, "dst_key": public,
                "addr": mdata.format_addr(addr, mig.port)}

    def _drop_received(self, uuid):
        """Forget (closing it) the disk transfer received for ``uuid``."""
        with self._received_lock:
            receiving = self._received_disks.pop(uuid, None)
        if receiving is not None:
            receiving.close()
        return receiving

    def finish_migration(self, context, migration, instance, disk_info,
                         network_info, image_meta, resize_instance,
                         allocations, block_device_info=None, power_on=True,
                         share_info=None):
        """Record the guest here with the new flavor over its received
        disks, grow them for a resize and boot it."""
        uuid = instance.uuid
        try:
            info = json.loads(disk_info or "{}")
        except ValueError:
            info = {}
        if info.get("version") != DISK_INFO_VERSION:
            raise exception.MigrationError(reason=(
                "the source sent no disks: both hosts must run nova-bhyve "
                "with engine disk transfer (upgrade the older one)"))
        same_host = bool(info.get("same_host"))
        shared = bool(info.get("shared"))
        spec = guest.build_spec(instance, network_info, CONF,
                                block_device_info)
        try:
            if not same_host and not shared:
                _check_sizes(self.backend, self._take_received(uuid),
                             instance.flavor)
            if shared:
                self.backend.adopt(instance, spec)
                LOG.info("The disks are on the shared instances path; using "
                         "them in place", instance=instance)
            else:
                self.backend.create(context, instance, spec,
                                    objects.ImageMeta.from_dict({}))
            if not same_host:
                instance.system_metadata[SHARED_KEY] = "1" if shared else "0"
            if resize_instance:
                self._grow_disks(instance, spec)
            self.backend.plug_vifs(spec)
            if power_on:
                self.backend.start(uuid)
        except (MachineError, MigrationError) as exc:
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

    def _take_received(self, uuid):
        """Check that the disks of ``uuid`` arrived (MigrationError if
        not); return their _Receiving."""
        with self._received_lock:
            receiving = self._received_disks.pop(uuid, None)
        if receiving is None:
            raise MigrationError("no disks were received here for this "
                                 "instance (was this compute restarted?)")
        # the source has its verdict: this side's ends at the same time
        stats = receiving.result(timeout=30)
        receiving.close()
        if stats is None or stats.result != Result.COMPLETED:
            raise MigrationError("the disk transfer did not complete: "
                                 f"{stats.error if stats else 'still running'}")
        return receiving

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

    def confirm_migration(self, context, migration, instance, network_info):
        """Remove the old guest from this (the source) host.

        Disks on a shared instances path are the destination's now: only
        this host's runtime files go.
        """
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
        """Return True if the other host's probe file is visible here.

        A cold migration's source asks this way for a disk listener too
        (``REQUEST_KEY`` in ``data``): the answer is then a dict.
        """
        if isinstance(data.get(REQUEST_KEY), dict):
            return self._receive_disks(data[REQUEST_KEY], data.get("filename"))
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


def _names(items, pattern):
    """True for a list of distinct strings that ``pattern`` matches whole."""
    return (isinstance(items, list) and len(set(map(str, items))) == len(items)
            and all(isinstance(i, str) and pattern.fullmatch(i) for i in items))


def _valid_request(uuid, files, names, tag):
    """True for an instance UUID, distinct disk file names and stream disk
    names, the root disk among one of them, and (with streams) a snapshot
    tag: nothing that could name a file outside the instance directory or
    a dataset but the instance's zvols."""
    if not (isinstance(uuid, str) and uuidutils.is_uuid_like(uuid) and
            _names(files, DISK_FILE) and _names(names, STREAM_DISK)):
        return False
    if names:
        return ("disk" in names and isinstance(tag, str) and
                privsep_zfs.TAG_RE.match(tag) is not None)
    return "disk" in files


def _what_moves(backend, uuid, paths):
    """Return ({file name: path} the engine moves as files, the request's
    names): the disk files, or a stream-disk backend's disks (``paths``'
    names) as streams, with the backend's other instance files (bhyve:
    nvram.fd)."""
    files = backend.instance_files(uuid)
    if not backend.stream_disks:
        files = {os.path.basename(p): p for p in paths.values()} | files
        return files, {"files": list(files)}
    return files, {"files": list(files), "streams": list(paths),
                   "tag": zvolmove.new_tag()}


def _open_streams(backend, uuid, request, receiving=False):
    """The ZvolStreams of the request's stream disks (or None) and the
    engine's Streams, the zfs side started; MachineError if it cannot."""
    names = request.get("streams") or []
    if not names:
        return None, ()
    zs = backend.cold_streams(uuid, request["tag"], names, receiving)
    try:
        return zs, zs.open()
    except (OSError, ValueError, processutils.ProcessExecutionError) as exc:
        zvols.finish(zs, False, LOG, None)      # a snapshot taken goes
        raise MachineError(f"cannot start the zfs {zs.role} of the "
                           f"zvols: {exc}") from exc


def _check_sizes(backend, received, flavor):
    """Raise MigrationError unless the received disk files (``disk``,
    ``disk.<name>``; nvram.fd aside) and zvols fit ``flavor`` (the new
    one)."""
    sizes = {}
    for path in received.files:
        name = os.path.basename(path)
        if name != "nvram.fd":
            sizes[name.partition(".")[2] or name] = os.path.getsize(path)
    if received.zs is not None:
        sizes.update(backend.stream_disk_sizes(received.zs.uuid,
                                               list(received.zs.zvols)))
    error = checks.disk_size_error(flavor, sizes)
    if error:
        raise MigrationError(error)


def _wait(mig):
    """Wait for an engine session to end (a short sleep between looks, so
    that eventlet's hub runs meanwhile); return its final stats."""
    while not mig.wait(0):
        time.sleep(POLL_INTERVAL)
    return mig.stats()


class _Receiving:
    """A destination's disk listener and what became of it."""

    def __init__(self, mig, made_folder, zs=None, files=()):
        self.mig = mig
        self.made_folder = made_folder
        self.files = files      # the paths the engine wrote
        self.zs = zs            # the received zvols (ZvolStreams), if any
        self.stats = None
        self._lock = threading.Lock()

    def watch(self):
        """Wait for the end; on a failure remove the folder made for it."""
        stats = _wait(self.mig)
        # the zvols' snapshots go; if it failed, the received zvols too
        zvols.finish(self.zs, stats.result == Result.COMPLETED, LOG, None)
        if stats.result != Result.COMPLETED:
            LOG.warning("Receiving the disks failed (%s); nothing of them is "
                        "kept here", stats.error)
            if self.made_folder:
                shutil.rmtree(self.made_folder, ignore_errors=True)
            if self.zs is not None:     # the runtime directory, if empty
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self.zs.dir))
        with self._lock:            # the result is final once cleaned up
            self.stats = stats
            self.mig.close()

    def result(self, timeout):
        """The final stats, waiting up to ``timeout`` s; None if not over."""
        deadline = time.monotonic() + timeout
        while self.stats is None and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL / 4)
        return self.stats

    def close(self):
        """Cancel a transfer still running and free the session."""
        with self._lock:
            if self.stats is None:
                try:
                    self.mig.cancel()
                except MigrationError:
                    pass
