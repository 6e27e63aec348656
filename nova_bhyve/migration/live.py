"""Live migration: BhyveDriver's side of Nova's live-migration contract.

Call order (``doc/migration.md`` has the whole story):

1. destination ``check_can_live_migrate_destination``: hypervisor, CPU,
   page size, free memory; a shared-storage probe file;
2. source ``check_can_live_migrate_source``: shared storage (a shared
   instances path moves no disk: no block migration; a local one needs
   one), disk space, mode (live or warm), the source's key share;
3. destination ``cleanup_live_migration_destination_check``;
4. destination ``pre_live_migration``: instance files (the disks sized
   as the source's), VIFs, an incoming VM, the engine's listener (which
   also receives the disks unless the instances path is shared); returns
   its address, port, key share and disk names in migrate_data
   (``nova_bhyve.migration.data``);
5. source ``live_migration``: runs the engine, which moves the memory and,
   unless the instances path is shared, every disk in one authenticated,
   encrypted session (the disks the VM has open through its dirty-block
   log, the others whole in round 0), and a monitor; then calls exactly
   one of ``post_method``/``recover_method``;
6. success: ``post_live_migration`` (the paused source VM is destroyed),
   ``post_live_migration_at_source``, ``cleanup``,
   ``post_live_migration_at_destination``; failure:
   ``rollback_live_migration_at_source`` and
   ``rollback_live_migration_at_destination`` (the incoming VM goes).

The engine runs on its own native threads; the driver only polls it, so
the monitor works the same under native threads and eventlet.
"""

import dataclasses
import os
import threading
import time

import nova.conf
from oslo_log import log as logging
from oslo_serialization import jsonutils

from nova import exception, objects
from nova_bhyve import guest, polling
from nova_bhyve.machine.base import MachineError, MachineState
from nova_bhyve.migration import checks, events, orphans, policy, progress, zvols
from nova_bhyve.migration import data as mdata
from nova_bhyve.native.engine import (
    Migration,
    MigrationError,
    Mode,
    Result,
    VmmKind,
)

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

POLL = 0.2                  # seconds between looks at the engine
SOURCE_TIMEOUT_MS = 60000   # the source engine's connect and idle timeout
FINISH_WAIT = 60.0          # seconds the destination waits for its half
PENDING_ABORT_WINDOW = 10.0
_VMM = {"testhost": VmmKind.TESTHOST, "bhyve": VmmKind.BHYVE}
_MODES = {"live": Mode.LIVE, "warm": Mode.WARM}


@dataclasses.dataclass
class _Outgoing:
    """The source's handle on one running migration."""

    mig: object = None
    abort: bool = False
    force: bool = False
    timeout_fired: bool = False
    timed_out: bool = False     # aborted by the completion timeout
    final: object = None        # the engine's last stats
    stopping: bool = False      # the engine handle is being closed (lock)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


@dataclasses.dataclass
class _Incoming:
    """The destination's engine listener for one migration."""

    recv: object
    zvols: object = None        # ZvolStreams of a stream-disk backend

    def handed_over(self):
        """True once the guest was committed here or runs here."""
        stats = self.recv.stats()
        return bool(stats.committed or stats.guest_runs_here)

    def close(self, cancel=False):
        """Free the listener (cancelling an unfinished receive)."""
        if cancel and not self.recv.stats().finished:
            try:
                self.recv.cancel()
            except MigrationError:
                pass
        self.recv.close()


def inbound_addr():
    """The address migrations to this host connect to."""
    return CONF.bhyve.live_migration_inbound_addr or CONF.my_ip


class LiveMigrationMixin:
    """ComputeDriver live-migration methods; needs ``self.backend``."""

    def __init__(self, virtapi, *args, **kwargs):
        super().__init__(virtapi, *args, **kwargs)
        self._lm_keys = mdata.KeyStore()
        self._outgoing = {}
        self._incoming = {}
        self._incoming_lock = threading.Lock()
        self._pending_aborts = {}
        self._orphans = orphans.OrphanWatch(
            self._nodename, self._incoming, self._incoming_lock,
            self._remove_incoming, CONF.bhyve.live_migration_orphan_grace)

    # -- capabilities ------------------------------------------------------
    def _has_dirty_log(self):
        setting = CONF.bhyve.live_migration_dirty_log
        if setting == "auto":
            return bool(self.backend.has_dirty_log)
        return setting == "yes"

    def _image_type(self):
        return mdata.IMAGE_TYPE_PREFIX + self.backend.migration_type()

    def _check_can_migrate(self):
        if not self.backend.can_live_migrate:
            raise exception.MigrationPreCheckError(reason=(
                f"{self._nodename()} runs the {type(self.backend).__name__} "
                f"machine layer, which cannot migrate guests yet: "
                f"{self.backend.migration_blocker}"))

    def _reap_incoming(self):
        """Destroy VMs left waiting for a migration that died with nova-compute."""
        for uuid in self.backend.list_machines():
            if self.backend.is_incoming(uuid):
                LOG.warning("Destroying guest %s: it waited for a migration "
                            "that ended when nova-compute stopped; the guest "
                            "still runs on its source host", uuid)
                self._remove_incoming(uuid)

    def _remove_incoming(self, uuid, incoming=None):
        """Free an incoming migration: listeners, VM, taps, own files.

        Disks adopted on a shared instances path are the source's and stay.
        """
        if incoming is not None:
            incoming.close(cancel=True)
        keep = self.backend.adopted(uuid)
        try:        # its taps: no rollback will come to remove them
            spec = self.backend.recorded_spec(uuid)
        except KeyError:
            spec = None
        self.backend.destroy(uuid)
        if spec is not None:
            self.backend.unplug_vifs(spec)
        self.backend.delete_files(uuid, not keep)

    def _take_incoming(self, uuid):
        with self._incoming_lock:
            return self._incoming.pop(uuid, None)

    # -- checks ------------------------------------------------------------
    def check_can_live_migrate_destination(self, context, instance,
                                           src_compute_info, dst_compute_info,
                                           block_migration=False,
                                           disk_over_commit=False):
        """Check hypervisor, CPU and free memory here; start the storage probe."""
        self._check_can_migrate()
        checks.check_hypervisors(src_compute_info, dst_compute_info)
        checks.check_cpus(src_compute_info, dst_compute_info)
        checks.check_free_memory(self.backend.host_facts(),
                                 instance.flavor.memory_mb)
        key = "free_disk_gb" if disk_over_commit else "disk_available_least"
        available_gb = dst_compute_info.get(key)
        data = mdata.new_data()
        data.filename = checks.create_probe(self.backend.instances_path)
        data.image_type = self._image_type()
        if block_migration is not None:
            data.block_migration = block_migration
        if disk_over_commit is not None:
            data.disk_over_commit = disk_over_commit
        data.disk_available_mb = (
            None if available_gb is None else
            available_gb * 1024 - CONF.reserved_host_disk_mb)
        mdata.put(data, "dst_dirty_log", int(self._has_dirty_log()))
        return data

    def cleanup_live_migration_destination_check(self, context,
                                                 dest_check_data):
        """Remove the shared-storage probe file."""
        checks.remove_probe(self.backend.instances_path,
                            getattr(dest_check_data, "filename", None))

    def check_can_live_migrate_source(self, context, instance,
                                      dest_check_data, block_device_info=None):
        """Check storage, disk space and mode; add the source's key share."""
        self._check_can_migrate()
        data = dest_check_data
        theirs = data.image_type if "image_type" in data else None
        if theirs != self._image_type():
            raise exception.MigrationPreCheckError(reason=(
                f"the destination reports {theirs!r}, this host "
                f"{self._image_type()!r}: both must run nova-bhyve with the "
                "same backend and [bhyve] disk_layout"))
        if self._unmovable_devices(instance, block_device_info):
            raise exception.MigrationPreCheckError(
                reason="instances with volumes cannot be migrated by "
                       "nova-bhyve yet")
        shared = checks.probe_exists(self.backend.instances_path,
                                     data.filename)
        data.is_shared_instance_path = shared
        data.is_shared_block_storage = False
        asked = data.block_migration if "block_migration" in data else None
        data.block_migration = zvols.check_layout(
            self.backend, data, shared, asked, self._nodename())
        if shared:
            # nova runs the source's cleanup and the destination's rollback
            # for a shared instances path only with this field present (as
            # for libvirt's mdev guests): they remove this host's or the
            # destination's runtime files and keep the disks
            data.target_mdevs = {}
        elif not self.backend.stream_disks:
            paths = self.backend.disk_paths(instance.uuid).values()
            checks.check_disk(data.disk_available_mb,
                              [checks.disk_info(path) for path in paths],
                              bool(data.disk_over_commit)
                              if "disk_over_commit" in data else False)
        dst_dirty = mdata.require(data, "dst_dirty_log") == "1"
        mode = checks.choose_mode(self._has_dirty_log(), dst_dirty,
                                  CONF.bhyve.live_migration_without_dirty_log)
        mdata.put(data, "mode", mode)
        mdata.put(data, "src_key", self._lm_keys.new(instance.uuid))
        data.instance_relative_path = instance.uuid
        return data

    def get_instance_disk_info(self, instance, block_device_info=None):
        """Return a JSON list describing every disk of the instance."""
        return jsonutils.dumps(
            [checks.disk_info(path) for path in
             self.backend.disk_paths(instance.uuid).values()])

    # -- destination -------------------------------------------------------
    def pre_live_migration(self, context, instance, block_device_info,
                           network_info, disk_info, migrate_data):
        """Prepare files, VIFs, an incoming VM and the engine's listener."""
        uuid = instance.uuid
        if self._unmovable_devices(instance, block_device_info):
            raise exception.MigrationError(
                reason="volumes cannot migrate yet")
        if uuid in self.backend.list_machines():
            raise exception.MigrationError(reason=(
                f"this host already has a machine record for {uuid} in "
                f"{self.backend.runtime_path}: remove the stale guest "
                "(or delete that directory) and retry"))
        shared = _shared(migrate_data)
        old = self._take_incoming(uuid)
        if old is not None:
            old.close(cancel=True)
        try:
            public, secrets = mdata.answer(
                mdata.require(migrate_data, "src_key"), uuid)
        except mdata.MigrateDataError as exc:
            raise exception.MigrationError(reason=str(exc)) from exc
        addr = inbound_addr()
        spec = guest.build_spec(instance, network_info, CONF,
                                block_device_info)
        incoming = streams = zs = None
        try:
            disks = {}
            if self.backend.stream_disks:   # zfs receive makes them
                self.backend.prepare_incoming_disks(instance, spec)
            elif shared:      # the disks are here already: use them
                self.backend.adopt(instance, spec)
            else:
                self.backend.create(context, instance, spec,
                                    objects.ImageMeta.from_dict({}))
                disks = self._size_incoming_disks(uuid, disk_info,
                                                  instance.flavor)
            self.backend.plug_vifs(spec)
            self.backend.start_incoming(uuid)
            kind, target = self.backend.migration_vmm(uuid)
            if self.backend.stream_disks:
                zs, streams = zvols.open_streams(self.backend, uuid,
                                                 migrate_data, instance.flavor)
            # the engine writes the disks beneath their directory, never
            # through a link, and removes the ones it made if it fails
            recv = Migration.receive(
                vmm_target=target, vmm_kind=_VMM[kind], secret=secrets.memory,
                host=addr, port=0, verify=CONF.bhyve.live_migration_verify,
                timeout_ms=CONF.bhyve.live_migration_listen_timeout * 1000,
                keep_paused=instance.vm_state == "paused",
                disks=list(disks.values()), streams=streams or ())
            incoming = _Incoming(recv, zvols=zs)
            if zs is not None:
                zs.release()        # the engine holds its own descriptors
            if disks:
                mdata.put(migrate_data, "disks", ",".join(disks))
        except (MachineError, MigrationError) as exc:
            if incoming is not None:
                incoming.close(cancel=True)
            zvols.finish(zs, False, LOG, instance)
            self.backend.destroy(uuid)
            self.backend.unplug_vifs(spec)
            self.backend.delete_files(uuid, not shared)
            raise exception.MigrationError(
                reason=f"cannot prepare {self._nodename()} for the incoming "
                       f"guest: {exc}") from exc
        with self._incoming_lock:
            self._incoming[uuid] = incoming
        migrate_data.target_connect_addr = mdata.format_addr(
            addr, incoming.recv.port)
        mdata.put(migrate_data, "dst_key", public)
        LOG.info("Waiting for the guest on %s", migrate_data.target_connect_addr,
                 instance=instance)
        return migrate_data

    def _size_incoming_disks(self, uuid, disk_info, flavor):
        """Size this host's disk files as the source's, within what
        ``flavor`` allows; return {name: path}.

        The incoming VM opens its disk at that size; the engine then
        rewrites every file with the source's content.
        """
        sizes = _source_sizes(disk_info)
        paths = self.backend.disk_paths(uuid)
        wanted = {}
        for name, path in paths.items():
            wanted[name] = sizes.get(os.path.basename(path))
            if wanted[name] is None:
                raise MigrationError(
                    f"the source reports no disk {os.path.basename(path)} "
                    f"(its disks: {', '.join(sorted(sizes)) or 'none'})")
        error = checks.disk_size_error(flavor, wanted)
        if error:
            raise MigrationError(error)
        for name, path in paths.items():
            self.backend.grow_disk(uuid, wanted[name], name)
            if os.path.getsize(path) != wanted[name]:
                raise MigrationError(
                    f"disk {name} is {os.path.getsize(path)} bytes here and "
                    f"{wanted[name]} on the source")
        return paths

    def post_live_migration_at_destination(self, context, instance,
                                           network_info, block_migration=False,
                                           block_device_info=None):
        """Confirm that the guest runs here and take it over."""
        uuid = instance.uuid
        incoming = self._take_incoming(uuid)
        if incoming is not None:
            polling.poll(lambda: incoming.recv.stats().finished, FINISH_WAIT,
                         POLL)
            stats = incoming.recv.stats()
            incoming.close(cancel=False)
            zvols.finish(incoming.zvols, stats.committed, LOG, instance)
            if stats.result != Result.COMPLETED:
                LOG.error("This host's half of the migration ended %s: %s",
                          stats.result.name.lower(), stats.error,
                          instance=instance)
        try:
            self.backend.finish_incoming(uuid,
                                         paused=instance.vm_state == "paused")
        except (KeyError, MachineError) as exc:
            raise exception.NovaException(
                f"guest {uuid} did not start on {self._nodename()} after its "
                f"migration ({exc}); the source has stopped it for good. "
                "Check the VM here: if its memory was fully received it can "
                "be resumed, otherwise hard-reboot the server") from exc
        LOG.info("Guest now %s on %s", "is (paused)" if
                 instance.vm_state == "paused" else "runs",
                 self._nodename(), instance=instance)

    def rollback_live_migration_at_destination(self, context, instance,
                                               network_info, block_device_info,
                                               destroy_disks=True,
                                               migrate_data=None):
        """Destroy the incoming VM and its files after a failed migration.

        The disks stay when ``destroy_disks`` is False or the instances
        path is shared: they are the source's.
        """
        uuid = instance.uuid
        incoming = self._take_incoming(uuid)
        if incoming is not None:
            stats = incoming.recv.stats()
            handed_over = incoming.handed_over()
            if stats.finished and stats.error:
                LOG.warning("This host's half of the migration ended %s in "
                            "phase %s: %s", stats.result.name.lower(),
                            stats.phase.name.lower(), stats.error,
                            instance=instance)
        else:       # nova-compute restarted: only an incoming VM is safe
            try:
                handed_over = self.backend.state(uuid) == MachineState.RUNNING
            except KeyError:
                handed_over = False
        if handed_over:
            if incoming is not None:
                incoming.close()
            raise exception.MigrationError(reason=(
                f"not rolling back {uuid} on {self._nodename()}: the guest "
                "was handed over and runs here; check where it should run "
                "before removing either copy"))
        if incoming is not None:
            incoming.close(cancel=True)
            zvols.finish(incoming.zvols, False, LOG, instance)
        keep = not destroy_disks or _shared(migrate_data)
        self.destroy(context, instance, network_info, block_device_info,
                     destroy_disks=not keep)
        LOG.info("Removed the incoming guest after the failed migration%s",
                 " (its disks, on the shared instances path, stay)" if keep
                 else "", instance=instance)

    # -- source ------------------------------------------------------------
    def live_migration(self, context, instance, dest, post_method,
                       recover_method, block_migration=False,
                       migrate_data=None):
        """Move memory and disks to ``dest``; then call post or recover."""
        uuid = instance.uuid
        out = _Outgoing()
        self._outgoing[uuid] = out
        asked = self._pending_aborts.pop(uuid, None)
        if asked is not None and time.monotonic() - asked < PENDING_ABORT_WINDOW:
            out.abort = True
        mode = mdata.get(migrate_data, "mode", "live")
        event = f"bhyve_live_migration_{mode}"
        events.start(context, instance, self._nodename(), event)
        stats, error = None, None
        try:
            stats = self._run_outgoing(context, instance, migrate_data, out,
                                       mode)
        except (MachineError, MigrationError, mdata.MigrateDataError) as exc:
            error, stats = str(exc), out.final
        except Exception as exc:
            LOG.exception("Live migration failed unexpectedly",
                          instance=instance)
            error, stats = str(exc) or type(exc).__name__, out.final
        finally:
            self._outgoing.pop(uuid, None)
        self._finish(context, instance, dest, post_method, recover_method,
                     block_migration, migrate_data, out, event, stats, error)

    def _finish(self, context, instance, dest, post_method, recover_method,
                block_migration, migrate_data, out, event, stats, error):
        """Log and record the outcome; call exactly one of post/recover."""
        end = policy.outcome(stats, out.abort)
        if end == "completed":
            text = policy.summary(stats, out.mig.peak if out.mig else 0)
            LOG.info("Live migration to %s completed: %s", dest, text,
                     instance=instance)
            LOG.debug("Live migration rounds:\n  %s",
                      "\n  ".join(policy.round_lines(stats)),
                      instance=instance)
            events.finish(context, instance, event)
            events.record(context, instance, self._nodename(),
                          f"bhyve_switchover {text}")
            post_method(context, instance, dest, block_migration, migrate_data)
            return
        if end == "handed_over":
            # the source stopped for good; the destination owns the guest
            LOG.error("Live migration to %s broke after the hand-over (%s: "
                      "%s); finishing on the destination", dest,
                      stats.error_kind.name.lower(), stats.error,
                      instance=instance)
            events.finish(context, instance, event, stats.error)
            post_method(context, instance, dest, block_migration, migrate_data)
            return
        # an abort, asked for or by the completion timeout, ends the
        # migration "cancelled", as the libvirt driver reports it
        cancelled = end == "cancelled"
        if stats is not None:
            error = stats.error or error
        if out.timed_out:
            LOG.debug("Engine error after the timeout abort: %s", error,
                      instance=instance)
            reason = ("not completed within its completion timeout ([bhyve] "
                      "live_migration_completion_timeout); cancelled")
        else:
            reason = "cancelled on request" if cancelled else error
        LOG.warning("Live migration to %s %s (%s): %s; the guest keeps "
                    "running here", dest, end,
                    policy.failure_kind(stats).name.lower(), reason,
                    instance=instance)
        events.finish(context, instance, event, reason)
        if cancelled:
            recover_method(context, instance, dest, migrate_data,
                           migration_status="cancelled")
        else:
            recover_method(context, instance, dest, migrate_data)

    def _run_outgoing(self, context, instance, migrate_data, out, mode):
        """Run the engine (memory and disks) to its end; return its last stats."""
        uuid = instance.uuid
        private = self._lm_keys.take(uuid)
        if private is None:
            raise MigrationError("this host has no key for the migration "
                                 "(nova-compute restarted since the checks?); "
                                 "retry the migration")
        secrets = mdata.derive(private, mdata.require(migrate_data, "dst_key"),
                               uuid)
        host, port = mdata.parse_addr(migrate_data.target_connect_addr)
        migration = migrate_data.migration
        t0 = time.monotonic()
        zs, streams = None, ()
        if self.backend.stream_disks:
            LOG.info("The zvols move with the memory (zfs send)",
                     instance=instance)
            disks, detached = [], []
        else:
            disks, detached = self._outgoing_disks(instance, migrate_data)
        gb = policy.data_gb(instance.flavor.memory_mb,
                            [os.path.getsize(p) for p in disks])
        steps = policy.downtime_steps(CONF.bhyve, gb)
        kind, target = self.backend.migration_vmm(uuid)
        opts = CONF.bhyve
        with out.lock:
            if out.abort:
                raise MigrationError("cancelled before the memory copy began")
            if self.backend.stream_disks:
                zs, streams = zvols.open_streams(self.backend, uuid,
                                                 migrate_data)
            out.mig = _Run(zvols.started(zs, LOG, instance, Migration.send,
                vmm_target=target, vmm_kind=_VMM[kind], host=host, port=port,
                secret=secrets.memory, mode=_MODES[mode],
                channels=opts.live_migration_parallel_connections,
                compress=opts.live_migration_compression,
                delta_cache=_delta_cache(opts.live_migration_delta_cache),
                auto_converge=(mode == "live" and
                               opts.live_migration_permit_auto_converge),
                max_bandwidth=opts.live_migration_bandwidth << 20,
                max_downtime_ms=steps[0][1],
                verify=opts.live_migration_verify,
                timeout_ms=SOURCE_TIMEOUT_MS,
                keep_paused=instance.vm_state == "paused",
                disks=disks, detached_disks=detached, streams=streams))
            if zs is not None:
                zs.release()        # the engine holds its own descriptors
            if out.force:
                out.mig.handle.force_complete()
        LOG.info("Migrating the guest to %s:%s in %s mode", host, port, mode,
                 instance=instance)
        try:
            return self._monitor(instance, migration, out, steps,
                                 policy.completion_timeout(opts, gb), t0,
                                 mode == "live")
        finally:
            with out.lock:          # no abort or force is inside the engine now
                out.stopping = True
            out.final = _stop(out.mig.handle, instance)
            zvols.finish(zs, bool(out.final and out.final.committed), LOG,
                         instance)

    def _outgoing_disks(self, instance, migrate_data):
        """Return (disk paths to move, those the VM does not have open).

        None on a shared instances path; else every disk, in the order the
        destination's engine writes them (its ``disks`` tag).
        """
        uuid = instance.uuid
        if _shared(migrate_data):
            LOG.info("The disks stay on the shared instances path; only "
                     "memory and device state move", instance=instance)
            return [], []
        if not migrate_data.block_migration:
            return [], []
        paths = self.backend.disk_paths(uuid)
        theirs = mdata.require(migrate_data, "disks").split(",")
        if theirs != list(paths):
            raise MigrationError(
                f"the destination prepared disks {', '.join(theirs)}; this "
                f"guest has {', '.join(paths)}")
        detached = self.backend.detached_disks(uuid)
        LOG.info("Moving disks %s with the memory (%s not attached to the "
                 "VM: sent whole)", ", ".join(paths),
                 ", ".join(detached) or "none", instance=instance)
        return list(paths.values()), [paths[n] for n in detached]

    def _monitor(self, instance, migration, out, steps, timeout, t0, live):
        """Drive downtime steps and the timeout; report progress."""
        run = out.mig
        opts = CONF.bhyve
        downtime = steps[0][1]
        last_report = 0.0
        while True:
            stats = run.handle.stats()
            if stats.finished:
                break
            elapsed = time.monotonic() - t0
            allowed = policy.downtime_at(steps, elapsed)
            if allowed != downtime:
                downtime = allowed
                run.set("max_downtime_ms", allowed, instance)
            if timeout and elapsed > timeout and not out.timeout_fired:
                self._on_timeout(instance, out, timeout)
            if stats.throttle > run.peak:
                run.peak = stats.throttle
                LOG.info("Guest dirties memory faster than it can be copied; "
                         "the engine throttles its vCPUs to %d%%",
                         stats.throttle, instance=instance)
            run.note_round_trips(stats, instance)
            if time.monotonic() - last_report >= \
                    opts.live_migration_monitor_interval:
                last_report = time.monotonic()
                progress.report(instance, migration, stats)
                LOG.debug("Migration %s round %d: %d of %d bytes remaining, "
                          "expected downtime %.0f ms (allowed %d)",
                          stats.phase.name.lower(), stats.round,
                          policy.memory_progress(stats)[2], stats.mem_total,
                          stats.expected_downtime_ms, stats.max_downtime_ms,
                          instance=instance)
            time.sleep(POLL)
        progress.report(instance, migration, stats)
        return stats

    def _on_timeout(self, instance, out, timeout):
        out.timeout_fired = True
        action = CONF.bhyve.live_migration_timeout_action
        LOG.warning("Live migration not completed after %d s "
                    "([bhyve] live_migration_completion_timeout); %s", timeout,
                    "forcing completion" if action == "force_complete"
                    else "aborting", instance=instance)
        if action == "force_complete":
            out.mig.handle.force_complete()
            return
        with out.lock:
            out.abort = out.timed_out = True
            try:
                out.mig.handle.cancel()
            except MigrationError as exc:
                LOG.warning("Too late to abort: %s", exc, instance=instance)
                out.abort = out.timed_out = False

    def live_migration_abort(self, instance):
        """Cancel the running migration; the guest stays on this host."""
        out = self._outgoing.get(instance.uuid)
        if out is None:
            self._pending_aborts[instance.uuid] = time.monotonic()
            LOG.warning("No live migration runs for this instance here; an "
                        "abort arriving within %d s of its start applies to "
                        "it", PENDING_ABORT_WINDOW, instance=instance)
            return
        with out.lock:
            if out.stopping:
                return              # the engine has ended; nothing to cancel
            out.abort = True
            if out.mig is None:
                return              # seen before the engine starts
            try:
                out.mig.handle.cancel()
            except MigrationError as exc:
                out.abort = False
                raise exception.MigrationError(reason=(
                    f"too late to abort: {exc}; the guest has been handed "
                    "over to the destination")) from exc
        LOG.info("Live migration abort requested", instance=instance)

    def live_migration_force_complete(self, instance):
        """Switch over at the next opportunity, whatever the downtime."""
        out = self._outgoing.get(instance.uuid)
        if out is None:
            raise exception.NoActiveMigrationForInstance(
                instance_id=instance.uuid)
        with out.lock:
            out.force = True
            if out.mig is not None and not out.stopping:
                out.mig.handle.force_complete()
        LOG.info("Live migration force-complete requested", instance=instance)

    def post_live_migration(self, context, instance, block_device_info,
                            migrate_data=None):
        """Destroy the source VM: after the hand-over it is paused for good.

        On a shared instances path this host's runtime files of the guest
        go too (the disks are the destination's now).
        """
        self.backend.destroy(instance.uuid)
        self._last_states.pop(instance.uuid, None)
        if _shared(migrate_data):
            self.backend.delete_files(instance.uuid, destroy_disks=False)
            if self.backend.stream_disks:   # the zvols were this host's own
                self.backend.destroy_moved_disks(instance.uuid)

    def post_live_migration_at_source(self, context, instance, network_info):
        """Unplug the guest's VIFs on this host."""
        self.unplug_vifs(instance, network_info)

    def rollback_live_migration_at_source(self, context, instance,
                                          migrate_data):
        """Forget the migration's key; the engine already resumed the guest.

        A paused server's guest was never resumed (the engine ran with
        keep_paused); pausing it again covers an engine that ended early.
        """
        self._lm_keys.take(instance.uuid)
        try:
            state = self.backend.state(instance.uuid)
        except KeyError:
            return
        if state == MachineState.RUNNING and instance.vm_state == "paused":
            self.backend.pause(instance.uuid)
        elif state != MachineState.RUNNING and instance.vm_state == "active":
            LOG.warning("After the failed migration the guest is %s here; "
                        "nova's power-state sync will report it",
                        state.value, instance=instance)


class _Run:
    """A running engine send and the highest throttle it applied (percent)."""

    def __init__(self, handle):
        self.handle = handle
        self.peak = 0
        self.rtt_noted = False

    def note_round_trips(self, stats, instance):
        """Say once if the link's round trips alone exceed the allowance."""
        if self.rtt_noted or not policy.round_trips_exceed_limit(stats):
            return
        self.rtt_noted = True
        LOG.info("The switch-over holds two control round trips of %.1f ms, "
                 "more than the %d ms of downtime allowed now: the guest "
                 "keeps running here, unthrottled, until the allowance grows "
                 "(live_migration_downtime_steps) or the migration is "
                 "forced to complete", stats.rtt_ms, stats.max_downtime_ms,
                 instance=instance)

    def set(self, name, value, instance):
        """Change an engine parameter; a refusal is logged, not raised."""
        try:
            self.handle.set_param(name, value)
        except MigrationError as exc:
            LOG.debug("Engine refused %s=%s: %s", name, value, exc,
                      instance=instance)


def _stop(handle, instance, wait=30.0):
    """Return the engine's final stats, cancelling it if it still runs."""
    stats = handle.stats()
    if not stats.finished:
        LOG.warning("Stopping the migration engine: its monitor failed",
                    instance=instance)
        try:
            handle.cancel()
        except MigrationError:
            pass
        polling.poll(lambda: handle.stats().finished, wait, POLL)
        stats = handle.stats()
    handle.close()
    return stats


def _delta_cache(mib):
    """The engine's delta_cache for ``[bhyve] live_migration_delta_cache``."""
    return "auto" if mib < 0 else mib << 20


def _shared(migrate_data):
    """True if the source's check found the instances path shared."""
    return bool(migrate_data is not None and
                "is_shared_instance_path" in migrate_data and
                migrate_data.is_shared_instance_path)


def _source_sizes(disk_info):
    """Return {file name: bytes} of the source's disks (its ``disk_info``)."""
    try:
        return {os.path.basename(d["path"]): int(d["virt_disk_size"])
                for d in jsonutils.loads(disk_info or "[]")}
    except (ValueError, KeyError, TypeError) as exc:
        raise MigrationError(f"the source's disk_info is not a list of "
                             f"disks with path and size: {exc}") from None
