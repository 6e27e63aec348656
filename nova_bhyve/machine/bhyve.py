"""The bhyve backend (FreeBSD): bhyve(8) under daemon(8), disks on ZFS or files.

Per instance:

- ``[bhyve] disk_layout = zvol`` (default): root disk zvol
  ``<zfs_dataset>/<uuid>-disk0``, cloned from the cached image
  ``<zfs_dataset>/images/<sha1 of image id>@base`` (Glance raw images are
  written as they are; qcow2 ones are converted with qemu-img after nova's
  safety checks) and grown to the flavor's root_gb; swap and ephemeral
  disks: blank sparse zvols ``<uuid>-swap``, ``<uuid>-eph0``…;
- ``disk_layout = file``: raw files in the instance directory, as the
  test host's (machine/diskfiles.py): ``disk`` from the image cached in
  ``<instances_path>/_base``, ``disk.swap``, ``disk.eph0``…;
- either way the disks are virtio-blk slots, root first, then swap; nothing
  formats swap or ephemeral disks, the guest does;
- ``<instances_path>/<uuid>/``: ``nvram.fd`` (a copy of the UEFI variable
  store template) and, while suspended, the checkpoint set written by
  ``bhyvectl --suspend`` (needs a bhyve built with BHYVE_SNAPSHOT); this
  directory may be shared between hosts (NFS), as with the libvirt driver;
- ``<[bhyve] runtime_path>/<uuid>/``: this host's ``machine.json``,
  ``console.log`` (COM1), the supervisor's files and, while a migration
  runs, its checkpoint scratch files (source), the incoming checkpoint
  (destination), the FIFOs of the zvols' zfs streams and a snapshot's copy
  of a root disk file;
- one tap device per VIF, added to the VIF's bridge (an if_bridge made on
  demand, and destroyed with its last tap, when nova-bhyve made it);
- a VNC framebuffer on ``[vnc] server_listen`` when ``[vnc] enabled``.

Guests run as ``daemon(8) -> supervise -> bhyve``; a guest reboot (exit 0)
destroys and restarts the VM, other exits end it.  Stale ``/dev/vmm``
objects of instances that no longer run are destroyed at init_host.
Pause stops the bhyve process (SIGSTOP): the guest's clock jumps on unpause.

Migration (written against FreeBSD 15 and unit-tested on Linux only; the
engine's bhyve port, ``native/src/vmm/vmm_bhyve.c``, needs a bhyve built with
BHYVE_SNAPSHOT on both hosts):

- source: the engine opens ``/dev/vmm/<uuid>`` and reaches bhyve's
  checkpoint socket ``/var/run/bhyve/<uuid>``; bhyve writes the device
  checkpoint (and a full RAM copy) under the runtime directory;
- destination: no bhyve runs while memory arrives.  The engine's port, in
  restore-only mode, writes guest RAM into ``<runtime dir>/incoming``
  (needs free space for all of guest RAM) and, at the commit, the
  ``.kern`` and ``.meta`` files, ``.meta`` last.  ``finish_incoming`` then
  starts ``bhyve -r`` under the usual supervision, as resume does, and
  removes the set once bhyve has restored it (its checkpoint socket is up);
- stock vmm(4) has no dirty-page log, so ``has_dirty_log`` is False and
  Nova live migrations run in warm mode (guest paused while its memory is
  copied); set ``[bhyve] live_migration_dirty_log = yes`` on hosts whose
  kernel carries the migration patches (guest memory wired, no SMAP);
- zvols move as stream disks of the engine (zvolmove.py): a snapshot and
  its full ``zfs send`` while memory is copied, a final snapshot and
  incremental send once the guest is paused, ``zfs receive`` on the
  destination, which creates them; ``grow_disk`` raises ``volsize``.  Cold
  migration and resize (migration/cold.py) move the stopped guest's zvols
  the same way (``cold_streams``: the final increment is empty) and
  ``nvram.fd`` as a file (``instance_files``); ``create`` keeps a root
  zvol and ``nvram.fd`` already there (received, or a revert's);
- disk files stay where they are on a shared instances path (the
  destination adopts them; only memory and device state move); bhyve has
  no dirty-block log, so a live migration without a shared instances path
  is refused (``live_disk_copy_blocker``); cold migration and resize copy
  the files and ``nvram.fd`` as the engine's disk files.
"""

import contextlib
import dataclasses
import hashlib
import os
import shutil
import socket
import sys
import time

import psutil
from oslo_concurrency import lockutils, processutils
from oslo_log import log as logging

from nova_bhyve import polling, privsep
from nova_bhyve.machine import argv as bhyve_argv
from nova_bhyve.machine import (
    checkpoint,
    diskfiles,
    hostinfo,
    images,
    power,
    zvolmove,
)
from nova_bhyve.machine.base import (
    ROOT_DISK,
    SWAP_DISK,
    Backend,
    DiskSpec,
    HostFacts,
    MachineError,
    MachineState,
)
from nova_bhyve.machine.statefile import write_json
from nova_bhyve.machine.supervised import SupervisedMachines
from nova_bhyve.privsep import PrivilegeError

LOG = logging.getLogger(__name__)
VNC_PORTS = range(5900, 6000)
CHECKPOINT_RUNDIR = "/var/run/bhyve"    # bhyve's checkpoint sockets
_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


def sysctl(name):
    """Return the value of a sysctl(8) variable as a string."""
    out, _err = processutils.execute("/sbin/sysctl", "-n", name)
    return out.strip()


class BhyveBackend(SupervisedMachines, Backend):
    """Runs guests with bhyve(8) on FreeBSD."""

    hypervisor_os = "FreeBSD"

    def __init__(self, conf, instances_path, runtime_path=None):
        super().__init__(instances_path,
                         runtime_path or conf.bhyve.runtime_path)
        self.conf = conf
        self.capabilities = dict(
            supports_image_type_raw=True,
            supports_image_type_qcow2=images.qemu_img_available())
        self.dataset = conf.bhyve.zfs_dataset
        self.files = conf.bhyve.disk_layout == "file"
        self.cache = images.FileImageCache(os.path.join(instances_path, "_base"))
        self.paths = bhyve_argv.BhyvePaths(
            bhyve=conf.bhyve.bhyve_path, firmware=conf.bhyve.uefi_firmware,
            instances_path=os.path.normpath(instances_path),
            zvol_root=f"/dev/zvol/{self.dataset}",
            runtime_path=os.path.normpath(self.runtime_path))

    # -- host -------------------------------------------------------------
    def init_host(self, host):
        """Check binaries, firmware, ZFS and vmm(4); reclaim stale VMs."""
        if not sys.platform.startswith("freebsd"):
            raise MachineError("the bhyve backend runs on FreeBSD only; set "
                               "[bhyve] backend = testhost on Linux")
        if not self.dataset and not self.files:
            raise MachineError("set [bhyve] zfs_dataset (for example "
                               "zroot/nova): instance disks are zvols; or "
                               "[bhyve] disk_layout = file")
        needed = ["bhyve_path", "bhyvectl_path", "daemon_path",
                  "uefi_firmware", "uefi_vars_template"]
        if not self.files:
            needed.append("zfs_path")
        for opt in needed:
            path = getattr(self.conf.bhyve, opt)
            if not os.path.isfile(path):
                raise MachineError(f"[bhyve] {opt} = {path} does not exist")
        if not os.path.isdir("/dev/vmm"):
            raise MachineError("/dev/vmm is missing: load vmm(4) "
                               "(kldload vmm, vmm_load=YES in loader.conf)")
        os.makedirs(self.instances_path, exist_ok=True)
        self.prepare_runtime_path(host)
        self.warn_legacy_records()
        for name in os.listdir("/dev/vmm"):
            if bhyve_argv.is_instance_uuid(name) and not self._running(name):
                LOG.info("Destroying stale VM %s left in /dev/vmm", name)
                privsep.destroy_vmm(name)

    def host_facts(self):
        """Return CPUs and memory from sysctl(8), disk from the ZFS dataset
        (the instances path's file system with disk_layout = file)."""
        pagesize = int(sysctl("hw.pagesize"))
        total = int(sysctl("hw.physmem")) >> 20
        free_pages = (int(sysctl("vm.stats.vm.v_free_count")) +
                      int(sysctl("vm.stats.vm.v_inactive_count")))
        if self.files:
            disk_gb, disk_used = hostinfo.disk_gb(self.instances_path)
        else:
            out, _err = processutils.execute(
                self.conf.bhyve.zfs_path, "get", "-Hp", "-o", "value",
                "available,used", self.dataset)
            avail, used = (int(v) for v in out.split())
            disk_gb, disk_used = (avail + used) >> 30, used >> 30
        return HostFacts(
            vcpus=int(sysctl("hw.ncpu")), memory_mb=total,
            memory_mb_used=total - (free_pages * pagesize >> 20),
            disk_gb=disk_gb, disk_gb_used=disk_used,
            hypervisor_type="bhyve",
            hypervisor_version=int(sysctl("kern.osreldate")),
            arch=_ARCH.get(sysctl("hw.machine_arch"), "x86_64"),
            cpu_model=sysctl("hw.model"))

    # -- disks ------------------------------------------------------------
    def _disk_name(self, uuid, name=ROOT_DISK):
        """Return the zvol of disk ``name``: ``<uuid>-disk0``, ``-swap``, ``-eph0``."""
        return f"{self.dataset}/{uuid}-{'disk0' if name == ROOT_DISK else name}"

    def _cached_image(self, context, image_id):
        """Return the ``@base`` snapshot holding the image, creating it once."""
        key = hashlib.sha1(image_id.encode()).hexdigest()
        volume = f"{self.dataset}/images/{key}"
        snap = volume + "@base"
        with lockutils.lock("nova-bhyve-image-" + key):
            if os.path.exists(f"/dev/zvol/{snap}"):
                return snap
            staging = os.path.join(self.instances_path, "_base")
            os.makedirs(staging, exist_ok=True)
            raw = os.path.join(staging, key)
            try:
                images.fetch_raw(context, image_id, raw)
                size_gb = max(1, -(-os.path.getsize(raw) // (1 << 30)))
                privsep.zfs("destroy", volume)
                privsep.zfs("create-volume", volume, size_gb=size_gb)
                privsep.copy_image(raw, f"/dev/zvol/{volume}")
                privsep.zfs("snapshot", snap)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(raw)
        return snap

    def create(self, context, instance, spec, image_meta):
        """Clone the root zvol (or copy the root file), make swap and
        ephemeral zvols (files), write the record."""
        again = os.path.exists(self._run(spec.uuid, "machine.json"))
        self._make_dirs(spec.uuid)
        self._make_nvram(spec.uuid)
        if self.files:
            spec = self._create_files(context, instance, spec, image_meta)
        else:
            spec = self._create_zvols(context, instance, spec, image_meta,
                                      again)
        spec = dataclasses.replace(
            spec, vnc_port=self._free_vnc_port() if spec.vnc_listen else 0)
        self._write_record(spec)
        return spec

    def _make_nvram(self, uuid):
        """Copy the UEFI variable store template, unless the guest has its own."""
        nvram = self._path(uuid, "nvram.fd")
        if not os.path.exists(nvram):
            shutil.copyfile(self.conf.bhyve.uefi_vars_template, nvram)

    def _create_files(self, context, instance, spec, image_meta):
        """The disks as raw files (disk_layout = file): the root disk a
        copy of the cached image grown to root_gb (root_gb 0: to whole
        512-byte sectors), or blank (at least 1 GiB), the others blank
        sparse files; files already there are kept."""
        folder = self._dir(spec.uuid)
        disk = self._path(spec.uuid, diskfiles.file_name(ROOT_DISK))
        base = None
        if not os.path.exists(disk) and image_meta is not None and \
                image_meta.obj_attr_is_set("id") and image_meta.id:
            base = self.cache.get(context, image_meta.id)
        size = instance.flavor.root_gb << 30
        if base and not size:       # root_gb 0: the image's size, in sectors
            size = -(-os.path.getsize(base) // 512) * 512
        diskfiles.make_root(disk, size or 1 << 30, base)
        extras = tuple(diskfiles.make_extra(folder, d) for d in spec.disks
                       if d.name != ROOT_DISK)
        diskfiles.remove_stale(folder, extras)
        return dataclasses.replace(
            spec, disks=(DiskSpec(disk, boot=True),) + extras)

    def _create_zvols(self, context, instance, spec, image_meta, again):
        """The disks as zvols (disk_layout = zvol)."""
        disk = self._disk_name(spec.uuid)
        root_gb = max(1, instance.flavor.root_gb)
        if image_meta.obj_attr_is_set("id") and image_meta.id:
            privsep.zfs("clone", disk,
                        origin=self._cached_image(context, image_meta.id))
            privsep.zfs("resize", disk, size_gb=root_gb)
        elif not os.path.exists(f"/dev/zvol/{disk}"):
            # (a zvol already here was received by a cold migration, or is
            # the guest's own on a revert or a same-host resize: kept)
            privsep.zfs("create-volume", disk, size_gb=root_gb)
        extras = tuple(self._make_extra_disk(spec.uuid, d) for d in spec.disks
                       if d.name != ROOT_DISK)
        if again:           # a revert or same-host resize may drop the swap
            self._remove_stale_disks(spec.uuid, extras)
        return dataclasses.replace(
            spec, disks=(DiskSpec(f"/dev/zvol/{disk}", boot=True),) + extras)

    def _volsize(self, name):
        out, _err = processutils.execute(
            self.conf.bhyve.zfs_path, "get", "-Hp", "-o", "value", "volsize",
            name)
        return int(out.strip())

    def _instance_zvols(self, uuid):
        """Return the names of this instance's zvols (root and extras)."""
        out, _err = processutils.execute(
            self.conf.bhyve.zfs_path, "list", "-H", "-o", "name", "-t",
            "volume", "-d", "1", self.dataset, check_exit_code=[0, 1])
        prefix = f"{self.dataset}/{uuid}-"
        return [n for n in out.split() if n.startswith(prefix)]

    def _make_extra_disk(self, uuid, disk):
        """Make the blank zvol of a swap or ephemeral disk.

        An existing zvol is kept (a revert, a same-host resize), except a
        swap zvol of another size, which is made again blank.
        """
        name = self._disk_name(uuid, disk.name)
        exists = os.path.exists(f"/dev/zvol/{name}")
        if exists and disk.name == SWAP_DISK and \
                self._volsize(name) != disk.size_mb << 20:
            privsep.zfs("destroy", name)
            exists = False
        if not exists:
            privsep.zfs("create-volume", name, size_mb=disk.size_mb)
        return dataclasses.replace(disk, path=f"/dev/zvol/{name}")

    def _remove_stale_disks(self, uuid, extras):
        """Destroy extra zvols the new spec no longer has (swap dropped)."""
        keep = {self._disk_name(uuid)} | {
            d.path[len("/dev/zvol/"):] for d in extras}
        for name in self._instance_zvols(uuid):
            if name not in keep:
                privsep.zfs("destroy", name)

    def _free_vnc_port(self):
        used = set()
        for uuid in self.list_machines():
            with contextlib.suppress(KeyError):
                used.add(self._spec(uuid).vnc_port)
        for port in VNC_PORTS:
            if port not in used:
                return port
        raise MachineError("no free VNC port in 5900-5999")

    # -- state ------------------------------------------------------------
    def state(self, uuid):
        """Return the guest's MachineState (KeyError if there is no record)."""
        rec = self._record(uuid)
        intent = rec["intent"]
        if rec.get("incoming") and not self._running(uuid) and \
                not self._incoming_checkpoint(uuid).complete():
            return MachineState.PAUSED      # memory still arriving
        if self._running(uuid):
            pid = self._child_pid(uuid)
            try:
                status = psutil.Process(pid).status()
            except (psutil.Error, TypeError, ValueError):
                return MachineState.NOSTATE
            if status == psutil.STATUS_STOPPED:
                return MachineState.PAUSED
            return MachineState.RUNNING
        if intent == power.INTENT_SUSPENDED and not self._checkpoint(uuid).complete():
            return MachineState.CRASHED
        return self._ended_state(uuid, intent)

    # -- lifecycle --------------------------------------------------------
    def _argv(self, spec, restore_from=None):
        return bhyve_argv.build(
            spec, self.paths, self._path(spec.uuid, "nvram.fd"),
            wire_memory=self.conf.bhyve.wire_guest_memory,
            vnc_wait=self.conf.bhyve.vnc_wait, restore_from=restore_from)

    def _launch(self, spec, restore_from=None):
        self._clear_run_files(spec.uuid)
        privsep.destroy_vmm(spec.uuid)
        try:
            privsep.start_guest(spec.uuid, self._argv(spec, restore_from))
        except processutils.ProcessExecutionError as exc:
            raise MachineError(f"cannot start guest {spec.uuid}: {exc.stderr}"
                               ) from exc
        except PrivilegeError as exc:
            raise MachineError(f"refused to start guest {spec.uuid}: {exc}"
                               ) from exc
        if not polling.poll(lambda: self._started(spec.uuid), 30, 0.05):
            raise MachineError(f"guest {spec.uuid} did not start within "
                               f"30 s: {self._log_tail(spec.uuid)}")

    def _started(self, uuid):
        """True once bhyve runs; raises if it already exited."""
        if self._running(uuid) and self._child_pid(uuid):
            return True
        if os.path.exists(self._run(uuid, "exit.json")):
            raise MachineError(f"guest {uuid} exited during start: "
                               f"{self._log_tail(uuid)}")
        return False

    def start(self, uuid):
        """Boot the guest, or restore it (``bhyve -r``) if it is suspended."""
        with self._locks[uuid]:
            rec = self._record(uuid)
            if self._running(uuid):
                return
            spec = self._spec(uuid)
            files = self._checkpoint(uuid)
            if rec["intent"] == power.INTENT_SUSPENDED and files.complete():
                self._set_intent(uuid, power.INTENT_RUNNING)
                self._launch(spec, restore_from=files.base)
                return
            files.remove()
            self._set_intent(uuid, power.INTENT_RUNNING)
            self._launch(spec)

    def stop(self, uuid, timeout=0, retry_interval=0):
        """ACPI power-off within ``timeout`` s, then SIGKILL; 0 = SIGKILL now."""
        with self._locks[uuid]:
            self._set_intent(uuid, power.INTENT_STOPPED)
            self._checkpoint(uuid).remove()
            if self._running(uuid):
                if self._state_is_paused(uuid):
                    privsep.signal_guest(uuid, "CONT")
                if timeout > 0:
                    self._acpi_poweroff(uuid, timeout, retry_interval)
                if self._running(uuid):
                    privsep.signal_guest(uuid, "KILL")
                    if not self._wait_ended(uuid, 30):
                        raise MachineError(f"bhyve of {uuid} survived SIGKILL")
            privsep.destroy_vmm(uuid)

    def _state_is_paused(self, uuid):
        return self.state(uuid) == MachineState.PAUSED

    def _acpi_poweroff(self, uuid, timeout, retry_interval):
        deadline = time.monotonic() + timeout
        step = retry_interval if retry_interval > 0 else timeout
        while time.monotonic() < deadline:
            privsep.signal_guest(uuid, "TERM")
            if self._wait_ended(uuid, min(step, deadline - time.monotonic())):
                return
        LOG.warning("Guest %s ignored the ACPI power button for %s s; "
                    "forcing it off", uuid, timeout)

    def reboot(self, uuid, soft):
        """Power-cycle the guest (ACPI first when ``soft``)."""
        with self._locks[uuid]:
            self.stop(uuid, self.conf.bhyve.soft_reboot_timeout if soft else 0)
            self.start(uuid)

    def pause(self, uuid):
        """Stop the bhyve process (all vCPUs and devices) with SIGSTOP."""
        with self._locks[uuid]:
            privsep.signal_guest(uuid, "STOP")
            self._set_intent(uuid, power.INTENT_PAUSED)

    def unpause(self, uuid):
        """Continue the stopped bhyve process."""
        with self._locks[uuid]:
            privsep.signal_guest(uuid, "CONT")
            self._set_intent(uuid, power.INTENT_RUNNING)

    def suspend(self, uuid):
        """``bhyvectl --suspend``: checkpoint set in the instance dir, VM gone."""
        with self._locks[uuid]:
            files = self._checkpoint(uuid)
            files.remove()
            if self._state_is_paused(uuid):
                privsep.signal_guest(uuid, "CONT")
            self._set_intent(uuid, power.INTENT_SUSPENDED)
            try:
                privsep.checkpoint_guest(uuid, files.base)
            except processutils.ProcessExecutionError as exc:
                self._set_intent(uuid, power.INTENT_RUNNING)
                raise MachineError(
                    f"bhyvectl --suspend failed for {uuid} (is bhyve built "
                    f"with BHYVE_SNAPSHOT?): {exc.stderr}") from exc
            if not self._wait_ended(uuid, 60):
                privsep.signal_guest(uuid, "KILL")
            privsep.destroy_vmm(uuid)

    def destroy(self, uuid):
        """Kill the guest at once (record and disk stay)."""
        try:
            self.stop(uuid, 0)
        except KeyError:
            return

    def delete_files(self, uuid, destroy_disks=True):
        """Remove this host's runtime directory of the guest and, if asked,
        the instance's zvols (disk_layout = zvol) and instance directory
        (disk files, NVRAM, checkpoint)."""
        if destroy_disks:
            if not self.files:
                for name in self._instance_zvols(uuid) or [
                        self._disk_name(uuid)]:
                    privsep.zfs("destroy", name)
            shutil.rmtree(self._dir(uuid), ignore_errors=True)
        shutil.rmtree(self._run_dir(uuid), ignore_errors=True)
        self._locks.pop(uuid, None)

    def console_log_path(self, uuid):
        """Return the path of console.log (COM1 output)."""
        return self._run(uuid, "console.log")

    def diagnostics(self, uuid):
        """Return pid, vCPUs, memory, uptime, disks and NICs of the guest."""
        spec = self._record(uuid)["spec"]
        out = {"state": self.state(uuid), "vcpus": spec["vcpus"],
               "memory_mb": spec["memory_mb"],
               "disks": [d["path"] for d in spec["disks"]],
               "nics": spec["nics"]}
        out.update(self._process_facts(uuid))
        return out

    @contextlib.contextmanager
    def snapshot_disk(self, uuid):
        """Yield a raw copy of the root disk: of a zvol snapshot, or of the
        root file (a running guest paused meanwhile) in the runtime
        directory."""
        if self.files:
            with diskfiles.paused_copy(self, uuid, self._run(
                    uuid, "snapshot.raw")) as copy:
                yield copy
            return
        snap = f"{self._disk_name(uuid)}@nova-snapshot-{int(time.time())}"
        copy = self._path(uuid, "snapshot.raw")
        privsep.zfs("snapshot", snap)
        try:
            privsep.copy_image(f"/dev/zvol/{snap}", copy)
            yield copy
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy)
            privsep.zfs("destroy", snap)

    # -- migration --------------------------------------------------------
    #: live: memory and device state through the engine's bhyve port, the
    #: zvols as its stream disks (zfs send and receive); disk files stay
    #: on the shared instances path
    can_live_migrate = True

    @property
    def stream_disks(self):
        """The disks are zvols, which move as the engine's stream disks."""
        return not self.files

    @property
    def live_disk_copy_blocker(self):
        """Why a live migration cannot copy disk files: bhyve keeps no
        log of the blocks a running guest writes."""
        if not self.files:
            return None
        return diskfiles.NO_LIVE_COPY.format(path=self.instances_path)

    def migration_type(self):
        """The backend and its disk layout (both hosts must agree)."""
        return "BhyveBackend-files" if self.files else "BhyveBackend"

    #: cold migration and resize move the zvols as stream disks too, and
    #: the UEFI variables (nvram.fd) as a file (migration/cold.py)
    can_migrate = True
    #: stock vmm(4) has no dirty-page log; the engine's port probes for the
    #: migration branch's one when it opens a VM, but the driver chooses
    #: live or warm before that: ``[bhyve] live_migration_dirty_log``
    #: overrides this (``yes`` on kernels with the migration patches)
    has_dirty_log = False
    checkpoint_rundir = CHECKPOINT_RUNDIR
    RESTORE_TIMEOUT = 60        # s, plus RESTORE_PER_GIB per GiB of RAM
    RESTORE_PER_GIB = 10

    def migration_vmm(self, uuid):
        """Return ("bhyve", target) for the engine's bhyve port.

        Incoming guests are reached in restore-only mode (RAM into the
        checkpoint file); running ones through /dev/vmm and the checkpoint
        socket, with the instance directory as checkpoint scratch space.
        """
        rec = self._record(uuid)
        spec = rec["spec"]
        if rec.get("incoming"):
            return "bhyve", (
                f"{uuid},restore={self._incoming_checkpoint(uuid).base},"
                f"ncpus={spec['vcpus']},memsize={spec['memory_mb'] << 20}")
        pid = self._child_pid(uuid) if self._running(uuid) else None
        if not pid:
            raise MachineError(f"guest {uuid} does not run on this host: "
                               "only a running guest can be migrated")
        return "bhyve", (f"{uuid},rundir={self.checkpoint_rundir},"
                         f"scratch={self._run_dir(uuid)},pid={pid}")

    def _incoming_checkpoint(self, uuid):
        """Where a migrating guest's memory and state arrive: this host's
        runtime directory (never the instances path, which may be shared)."""
        return checkpoint.CheckpointFiles(self._run(uuid, "incoming"))

    def adopt(self, instance, spec):
        """Record the guest for the disk files already in its instance
        directory (disk_layout = file, a shared instances path)."""
        if not self.files:
            raise MachineError("the disks are zvols on each host's own pool "
                               "(disk_layout = zvol): nothing to adopt")
        return super().adopt(instance, spec)

    def has_disks(self, uuid):
        """Return True if the root disk file is here and its directory
        writable (disk_layout = file; zvols are never shared)."""
        return self.files and diskfiles.usable(self._dir(uuid))

    def _zvols(self, spec):
        return {d.name: self._disk_name(spec.uuid, d.name) for d in spec.disks}

    def prepare_incoming_disks(self, instance, spec):
        """Record a guest whose zvols arrive by zfs receive (none may exist
        here yet); its NVRAM is kept if the instances path is shared."""
        self._make_dirs(spec.uuid)
        _refuse_existing(self._zvols(spec).values())
        nvram = self._path(spec.uuid, "nvram.fd")
        if not os.path.exists(nvram):
            shutil.copyfile(self.conf.bhyve.uefi_vars_template, nvram)
        disks = tuple(dataclasses.replace(d, path=f"/dev/zvol/{z}",
                                          boot=d.name == ROOT_DISK)
                      for d, z in zip(spec.disks, self._zvols(spec).values()))
        spec = dataclasses.replace(
            spec, disks=disks,
            vnc_port=self._free_vnc_port() if spec.vnc_listen else 0)
        self._write_record(spec)
        return spec

    def destroy_moved_disks(self, uuid):
        """Destroy the zvols of a guest that migrated away (the instances
        path is shared, so Nova's cleanup keeps the disks)."""
        for name in self._instance_zvols(uuid):
            privsep.zfs("destroy", name)

    def migration_streams(self, uuid, tag, receiving):
        """Return the ZvolStreams moving the guest's zvols in one migration."""
        return zvolmove.ZvolStreams(self._run_dir(uuid), uuid, tag,
                                    self._zvols(self._spec(uuid)),
                                    "receive" if receiving else "send")

    def cold_streams(self, uuid, tag, names, receiving):
        """Return the ZvolStreams moving the stopped guest's disks ``names``
        in a cold migration; a destination must not have one of them yet."""
        if self.files:
            raise MachineError("this host keeps disks as files ([bhyve] "
                               "disk_layout = file) and cannot receive zvols: "
                               "both hosts need the same disk_layout")
        zvols = {n: self._disk_name(uuid, n) for n in names}
        if receiving:
            _refuse_existing(zvols.values())
        self._make_dirs(uuid)
        return zvolmove.ZvolStreams(self._run_dir(uuid), uuid, tag, zvols,
                                    "receive" if receiving else "send")

    def stream_disk_sizes(self, uuid, names):
        """Return {name: volsize in bytes} of the guest's zvols ``names``."""
        return {n: self._volsize(self._disk_name(uuid, n)) for n in names}

    def instance_files(self, uuid):
        """Return {file name: path} of the UEFI variable store, which a cold
        migration moves beside the zvols."""
        nvram = self._path(uuid, "nvram.fd")
        return {"nvram.fd": nvram} if os.path.exists(nvram) else {}

    def start_incoming(self, uuid):
        """Prepare to receive the guest: no bhyve runs until finish_incoming."""
        with self._locks[uuid]:
            spec = self._spec(uuid)
            if self._running(uuid):
                raise MachineError(f"guest {uuid} already runs on this host; "
                                   "it cannot also be migrated in")
            need = spec.memory_mb << 20
            st = os.statvfs(self._run_dir(uuid))
            if st.f_bavail * st.f_frsize < need:
                raise MachineError(
                    f"{self._run_dir(uuid)} has "
                    f"{st.f_bavail * st.f_frsize >> 20} MiB free; receiving "
                    f"guest {uuid} needs room for its {spec.memory_mb} MiB of "
                    "RAM there: free space under [bhyve] runtime_path")
            self._incoming_checkpoint(uuid).remove()
            privsep.destroy_vmm(uuid)       # the port must not find a VM
            rec = self._record(uuid)
            rec.update(intent=power.INTENT_SUSPENDED, incoming=True)
            write_json(self._run(uuid, "machine.json"), rec)

    def is_incoming(self, uuid):
        """Return True while the guest's memory is being received here."""
        try:
            rec = self._record(uuid)
        except KeyError:
            return False
        return bool(rec.get("incoming")) and not self._running(uuid) and \
            not self._incoming_checkpoint(uuid).complete()

    def finish_incoming(self, uuid, paused=False):
        """Start ``bhyve -r`` on the received checkpoint, then remove it.

        bhyve runs a restored guest at once: a server that was paused is
        paused again (SIGSTOP) as soon as bhyve has restored it.
        """
        with self._locks[uuid]:
            rec = self._record(uuid)
            if not rec.get("incoming") and self._running(uuid):
                return
            files = self._incoming_checkpoint(uuid)
            if not files.complete():
                raise MachineError(
                    f"guest {uuid} was not handed over to this host: the "
                    f"migration did not commit ({files.meta} is missing)")
            self._set_intent(uuid, power.INTENT_RUNNING)
            try:
                self._launch(self._spec(uuid), restore_from=files.base)
                self._wait_restored(uuid)
            except MachineError as exc:
                kept = self._end_failed_restore(uuid)
                raise MachineError(
                    f"bhyve -r {files.base} did not restore guest {uuid}: "
                    f"{exc}. Nothing runs; the checkpoint set, now {kept}"
                    "{,.kern,.meta}, holds the guest and stays: check that "
                    "bhyve is built with BHYVE_SNAPSHOT and that both hosts "
                    "run the same bhyve and [bhyve] wire_guest_memory, then "
                    "resume the server to restore it") from exc
            files.remove()
            rec = self._record(uuid)
            rec.pop("incoming", None)
            rec.pop("adopted", None)    # the guest, and its disks, are ours
            write_json(self._run(uuid, "machine.json"), rec)
            LOG.info("Guest %s restored from its migrated checkpoint", uuid)
        if paused:
            self.pause(uuid)

    def _wait_restored(self, uuid):
        """Wait until bhyve has read the checkpoint (its socket appears)."""
        sock = os.path.join(self.checkpoint_rundir, uuid)
        timeout = self.RESTORE_TIMEOUT + self.RESTORE_PER_GIB * (
            self._spec(uuid).memory_mb >> 10)

        def restored():
            if not self._running(uuid):
                raise MachineError(f"bhyve exited: {self._log_tail(uuid)}")
            with contextlib.suppress(OSError):
                return os.stat(sock).st_mtime >= self._started_at(uuid) - 1
            return False

        if not polling.poll(restored, timeout, 0.1):
            raise MachineError(f"{sock} did not appear within "
                               f"{timeout} s: {self._log_tail(uuid)}")

    def _started_at(self, uuid):
        try:
            return os.stat(self._run(uuid, "child.pid")).st_mtime
        except OSError:
            return time.time()

    def _end_failed_restore(self, uuid):
        """Leave nothing running and the received set where resume looks:
        the guest is this host's now, suspended.  Returns the set's base."""
        self._set_intent(uuid, power.INTENT_SUSPENDED)
        if self._running(uuid):
            privsep.signal_guest(uuid, "KILL")
            if not self._wait_ended(uuid, 30):
                LOG.error("bhyve of %s survived SIGKILL", uuid)
        privsep.destroy_vmm(uuid)
        got, kept = self._incoming_checkpoint(uuid), self._checkpoint(uuid)
        kept.remove()
        for src, dst in ((got.ram, kept.ram), (got.kern, kept.kern),
                         (got.meta, kept.meta)):        # .meta last: complete
            shutil.move(src, dst)
        rec = self._record(uuid)
        rec.pop("incoming", None)
        write_json(self._run(uuid, "machine.json"), rec)
        return kept.base

    def disk_path(self, uuid):
        """Return the root zvol's device node (or the root disk file)."""
        if self.files:
            return self._path(uuid, diskfiles.file_name(ROOT_DISK))
        return f"/dev/zvol/{self._disk_name(uuid)}"

    def disk_paths(self, uuid):
        """Return {name: zvol device node or file} of the root, swap and
        ephemeral disks."""
        return {d.name: d.path for d in self._spec(uuid).disks}

    def grow_disk(self, uuid, size, name=ROOT_DISK):
        """Raise a zvol's volsize to ``size`` bytes (whole GiB, up), or
        extend a disk file to ``size`` bytes."""
        if self.files:
            diskfiles.grow(self.disk_paths(uuid)[name], size)
            return
        zvol = self._disk_name(uuid, name)
        if self._volsize(zvol) < size:
            privsep.zfs("resize", zvol, size_gb=-(-size // (1 << 30)))

    # -- networking -------------------------------------------------------
    def plug_vifs(self, spec):
        """Create each NIC's tap device and add it to its bridge."""
        for nic in spec.nics:
            try:
                socket.if_nametoindex(nic.tap)
                continue                    # exists already
            except OSError:
                pass
            privsep.create_tap(nic.tap, nic.bridge, nic.mac)

    def unplug_vifs(self, spec):
        """Destroy each NIC's tap device (and a bridge left empty)."""
        for nic in spec.nics:
            privsep.destroy_tap(nic.tap, nic.bridge)


def _refuse_existing(zvols):
    """Raise MachineError if one of ``zvols`` exists (zfs receive makes them)."""
    here = [z for z in zvols if os.path.exists(f"/dev/zvol/{z}")]
    if here:
        raise MachineError(
            f"zvol {', '.join(here)} exists on this host already; the "
            "migration creates the guest's zvols by zfs receive: destroy "
            "the stale ones (zfs destroy -r) and retry")
