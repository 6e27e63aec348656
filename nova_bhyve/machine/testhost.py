"""The KVM test host backend: guests run by nb-testhost on Linux.

Each instance has a directory ``<instances_path>/<uuid>/`` holding its disks
(``disk``, a sparse raw file made from the cached Glance image, and
``disk.swap``, ``disk.eph0``… for the flavor's swap and ephemeral disks,
blank sparse raw files) and while suspended the checkpoint set
``checkpoint``, ``checkpoint.kern``, ``checkpoint.meta``; that directory
may be on storage shared with other hosts.  This host's own files about
the guest are in ``<[bhyve] runtime_path>/<uuid>/``: ``machine.json``
(spec and intent), the supervisor's files, nb-testhost's control socket,
pid file and ``console.log``.

Each VIF gets a tap device on its bridge (a Linux bridge made on demand,
removed with its last tap), in the network namespace ``[bhyve]
testhost_netns`` when set, through the privileged helper.  The test host's
VMs have no NIC device: the tap is the host side a bhyve guest's
virtio-net would use, and it carries no guest traffic here.

The root disk is the VM's ATA disk (``nb-testhost --disk``: the guest
payload reads and writes it with ``disk=1``; its writes go to the
dirty-block log the migration engine reads), if its size suits the drive
(whole 512-byte sectors, at least 4 KiB, LBA28: ``attachable``); a root
disk that does not, such as an image of odd size, is left detached and
the guest runs without a disk.  The swap and ephemeral files are never
attached: they stand for the disks a bhyve guest would get as further
virtio-blk disks, and nothing writes them while the guest runs here.

The guest payload is the bundled ``guest.elf``; its command line comes
from the image property ``bhyve_testhost_cmdline`` (default
``[bhyve] testhost_default_cmdline``, ``mode=idle``).  The payload has no
ACPI: a graceful stop or soft reboot ends the process through the control
socket.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

from oslo_concurrency import processutils
from oslo_log import log as logging

from nova_bhyve import polling, privsep
from nova_bhyve.concurrency import offload
from nova_bhyve.machine import (
    checkpoint,
    diskfiles,
    hostinfo,
    images,
    power,
    supervise,
)
from nova_bhyve.machine.base import (
    ROOT_DISK,
    Backend,
    DiskSpec,
    HostFacts,
    MachineError,
    MachineState,
)
from nova_bhyve.machine.statefile import write_json
from nova_bhyve.machine.supervised import SupervisedMachines
from nova_bhyve.testhost import artifacts
from nova_bhyve.testhost.client import ControlClient
from nova_bhyve.testhost.errors import TestHostError

LOG = logging.getLogger(__name__)

MAX_SOCKET_PATH = 107
CMDLINE_MAX = 256
SECTOR = 512
MIN_DISK = 4096             # one dirty-log block
MAX_SECTORS = (1 << 28) - 1     # LBA28
ARCH = "x86_64"            # the only guests the test host runs
_STATUS_TO_STATE = {
    "running": MachineState.RUNNING,
    "paused": MachineState.PAUSED,
    "incoming": MachineState.PAUSED,
    "failed": MachineState.CRASHED,
}


def validate_cmdline(cmdline):
    """Return the guest payload command line, or raise MachineError."""
    if len(cmdline) > CMDLINE_MAX or not all(" " <= c <= "~" for c in cmdline):
        raise MachineError(
            f"guest command line {cmdline[:40]!r}... must be printable ASCII "
            f"of at most {CMDLINE_MAX} characters (image property "
            "bhyve_testhost_cmdline)")
    return cmdline


def attachable(path):
    """True if ``path`` can be the test host's ATA disk (``--disk``)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return False
    return (size >= MIN_DISK and size % SECTOR == 0 and
            size // SECTOR <= MAX_SECTORS)


class TestHostBackend(SupervisedMachines, Backend):
    """Runs guests under the KVM test host, one supervised process each."""

    __test__ = False  # not a pytest test class

    capabilities = {"supports_image_type_raw": True}
    hypervisor_os = "Linux (KVM test host)"

    def __init__(self, conf, instances_path, runtime_path=None):
        super().__init__(instances_path,
                         runtime_path or conf.bhyve.runtime_path)
        self.conf = conf
        self.cache = images.FileImageCache(os.path.join(instances_path, "_base"))
        self.capabilities = dict(
            supports_image_type_raw=True,
            supports_image_type_qcow2=images.qemu_img_available())

    def _binary(self):
        return self.conf.bhyve.testhost_binary or str(artifacts.testhost_binary())

    def _kernel(self):
        return (self.conf.bhyve.testhost_guest_kernel or
                str(artifacts.guest_kernel()))

    # -- host -------------------------------------------------------------
    def init_host(self, host):
        """Check that KVM, nb-testhost and the guest payload are usable."""
        ok, why = artifacts.kvm_available()
        if not ok:
            raise MachineError(f"the KVM test host backend needs KVM: {why}")
        for what, path in (("nb-testhost", self._binary()),
                           ("guest payload", self._kernel())):
            if not os.path.isfile(path):
                raise MachineError(f"{what} not found at {path}: reinstall "
                                   "nova-bhyve-live or fix [bhyve] options")
        os.makedirs(self.instances_path, exist_ok=True)
        sock = self._run("0" * 36, "control.sock")
        if len(sock) > MAX_SOCKET_PATH:
            raise MachineError(
                f"control socket paths would be {len(sock)} bytes long, over "
                f"the {MAX_SOCKET_PATH}-byte limit of unix sockets: choose a "
                "shorter [bhyve] runtime_path")
        self.prepare_runtime_path(host)
        self.warn_legacy_records()

    def host_facts(self):
        """Return this Linux host's CPUs, memory and instances disk."""
        mem_total, mem_used = hostinfo.linux_memory_mb()
        disk_total, disk_used = hostinfo.disk_gb(self.instances_path)
        return HostFacts(
            vcpus=os.cpu_count() or 1, memory_mb=mem_total,
            memory_mb_used=mem_used, disk_gb=disk_total,
            disk_gb_used=disk_used, hypervisor_type="bhyve",
            hypervisor_version=1, arch=ARCH,
            cpu_model=hostinfo.linux_cpu_model(),
            cpu_vendor=hostinfo.linux_cpu_vendor(),
            page_size=os.sysconf("SC_PAGE_SIZE"))

    def _client(self, uuid):
        return ControlClient(self._run(uuid, "control.sock"), timeout=30.0)

    def _launch(self, uuid, argv, reboot_argv):
        self._clear_run_files(uuid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._run(uuid, "control.sock"))
        cmd = [sys.executable, "-m", supervise.MODULE,
               "--rundir", self._run_dir(uuid), "--reboot-argv",
               json.dumps(reboot_argv), "--", *argv]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise MachineError(f"cannot start guest {uuid}: "
                               f"{proc.stderr.strip()}")
        self._wait_socket(uuid)

    def _wait_socket(self, uuid, timeout=30.0):
        if not polling.poll(lambda: self._socket_answers(uuid), timeout):
            raise MachineError(f"guest {uuid} did not open its control socket "
                               f"within {timeout} s: {self._log_tail(uuid)}")

    def _socket_answers(self, uuid):
        """True once the control socket accepts; raises if the guest exited."""
        if os.path.exists(self._run(uuid, "exit.json")):
            raise MachineError(
                f"guest {uuid} exited during start: {self._log_tail(uuid)}")
        if os.path.exists(self._run(uuid, "control.sock")):
            with contextlib.suppress(TestHostError):
                self._client(uuid).close()
                return True
        return False

    def _kill(self, uuid):
        pid = self._child_pid(uuid)
        if pid and self._running(uuid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self._wait_ended(uuid, 30):
            raise MachineError(f"guest {uuid} did not end after SIGKILL")

    def _boot_argv(self, spec, incoming=False):
        argv = [self._binary(), "--name", spec["uuid"], "--rundir",
                self._run_dir(spec["uuid"]), "--mem", f"{spec['memory_mb']}M",
                "--cpus", str(spec["vcpus"])]
        root = self._path(spec["uuid"], "disk")
        if attachable(root):
            argv += ["--disk", root]
        if incoming:
            return argv + ["--incoming"]
        return argv + ["--kernel", self._kernel(), "--cmdline", spec["cmdline"]]

    # -- state ------------------------------------------------------------
    def state(self, uuid):
        """Return the guest's MachineState (KeyError if there is no record)."""
        intent = self._record(uuid)["intent"]
        if self._running(uuid):
            try:
                with self._client(uuid) as client:
                    status = client.status()["state"]
            except TestHostError:
                return MachineState.NOSTATE     # starting, or restarting
            return _STATUS_TO_STATE.get(status, MachineState.NOSTATE)
        if intent == power.INTENT_SUSPENDED and not self._checkpoint(uuid).complete():
            return MachineState.CRASHED
        return self._ended_state(uuid, intent)

    # -- lifecycle --------------------------------------------------------
    def create(self, context, instance, spec, image_meta):
        """Make the instance directory, disk and machine record; return the spec.

        An existing root disk is kept, as the libvirt driver keeps it: an
        evacuation to a host sharing ``instances_path`` finds the guest's
        disk there (a rebuild destroys the disk before it spawns).
        """
        if spec.memory_mb % 2:
            raise MachineError("the test host needs guest memory in whole "
                               f"2 MiB units; flavor has {spec.memory_mb} MiB")
        validate_cmdline(spec.cmdline)
        self._make_dirs(spec.uuid)
        disk = self._path(spec.uuid, "disk")
        base = None
        if not os.path.exists(disk) and image_meta is not None and \
                image_meta.obj_attr_is_set("id") and image_meta.id:
            base = self.cache.get(context, image_meta.id)
        diskfiles.make_root(disk, instance.flavor.root_gb << 30, base)
        extras = tuple(diskfiles.make_extra(self._dir(spec.uuid), d)
                       for d in spec.disks if d.name != ROOT_DISK)
        diskfiles.remove_stale(self._dir(spec.uuid), extras)
        spec = dataclasses.replace(
            spec, disks=(DiskSpec(disk, boot=True),) + extras)
        self._write_record(spec)
        return spec

    def start(self, uuid):
        """Boot the guest, or restore it if it is suspended."""
        with self._locks[uuid]:
            rec = self._record(uuid)
            if self._running(uuid):
                return
            spec = rec["spec"]
            files = self._checkpoint(uuid)
            if rec["intent"] == power.INTENT_SUSPENDED and files.complete():
                self._restore(uuid, spec, files)
                return
            files.remove()
            self._set_intent(uuid, power.INTENT_RUNNING)
            argv = self._boot_argv(spec)
            self._launch(uuid, argv, argv)

    def _restore(self, uuid, spec, files):
        meta = checkpoint.read_meta(files)
        blob = checkpoint.read_kern(files, meta)
        self._set_intent(uuid, power.INTENT_PAUSED)
        self._launch(uuid, self._boot_argv(spec, incoming=True),
                     self._boot_argv(spec))
        try:
            with self._client(uuid) as client:
                fd, layout = client.memfd()
                try:
                    offload(checkpoint.load_ram, files, meta, fd, layout.size)
                finally:
                    os.close(fd)
                client.load_state(blob)
                client.resume()
        except (TestHostError, checkpoint.CheckpointError) as exc:
            self._kill(uuid)
            self._set_intent(uuid, power.INTENT_SUSPENDED)
            raise MachineError(f"cannot restore guest {uuid} from "
                               f"{files.base}: {exc}") from exc
        self._set_intent(uuid, power.INTENT_RUNNING)
        files.remove()
        LOG.debug("Restored guest %s from %s", uuid, files.base)

    def stop(self, uuid, timeout=0, retry_interval=0):
        """Stop the guest; ``timeout`` 0 kills it at once."""
        with self._locks[uuid]:
            self._set_intent(uuid, power.INTENT_STOPPED)
            self._checkpoint(uuid).remove()
            if not self._running(uuid):
                return
            if timeout > 0:
                # no ACPI in the payload: the orderly way is the control socket
                with contextlib.suppress(TestHostError):
                    with self._client(uuid) as client:
                        client.shutdown()
                if self._wait_ended(uuid, timeout):
                    return
                LOG.warning("Guest %s still ran %s s after a graceful stop; "
                            "killing it", uuid, timeout)
            self._kill(uuid)

    def reboot(self, uuid, soft):
        """Stop (gracefully if ``soft``) and boot the guest again."""
        with self._locks[uuid]:
            self.stop(uuid, self.conf.bhyve.soft_reboot_timeout if soft else 0)
            self.start(uuid)

    def pause(self, uuid):
        """Park all vCPUs."""
        with self._locks[uuid], self._client(uuid) as client:
            client.pause()
            self._set_intent(uuid, power.INTENT_PAUSED)

    def unpause(self, uuid):
        """Run the vCPUs again."""
        with self._locks[uuid], self._client(uuid) as client:
            client.resume()
            self._set_intent(uuid, power.INTENT_RUNNING)

    def suspend(self, uuid):
        """Write RAM and state to the checkpoint set, then end the process."""
        with self._locks[uuid]:
            files = self._checkpoint(uuid)
            with self._client(uuid) as client:
                status = client.status()
                client.pause()
                blob = client.save_state()
                fd, layout = client.memfd()
                try:
                    meta = checkpoint.CheckpointMeta(
                        vmname=uuid, ncpus=int(status["cpus"]),
                        memsize=layout.size, lowmem=layout.lowmem,
                        highmem=layout.highmem, highbase=layout.highbase,
                        page_size=layout.page_size,
                        state_format=checkpoint.STATE_FORMAT_TESTHOST,
                        kern_bytes=len(blob), kern_crc32=checkpoint.crc32(blob),
                        arch=ARCH, cpu_vendor=hostinfo.linux_cpu_vendor())
                    offload(checkpoint.write, files, meta, fd, blob)
                finally:
                    os.close(fd)
                self._set_intent(uuid, power.INTENT_SUSPENDED)
                client.shutdown()
            if not self._wait_ended(uuid, 30):
                self._kill(uuid)

    def destroy(self, uuid):
        """Kill the guest process (the record and disk stay)."""
        with self._locks[uuid]:
            try:
                self._set_intent(uuid, power.INTENT_STOPPED)
            except KeyError:
                return
            self._checkpoint(uuid).remove()
            if self._running(uuid):
                self._kill(uuid)

    def delete_files(self, uuid, destroy_disks=True):
        """Remove this host's runtime directory of the guest and, if
        ``destroy_disks``, its instance directory.

        Without ``destroy_disks`` nothing under ``instances_path`` is
        touched: on shared storage it belongs to the host the guest runs on
        now.
        """
        shutil.rmtree(self._run_dir(uuid), ignore_errors=True)
        if destroy_disks:
            shutil.rmtree(self._dir(uuid), ignore_errors=True)
        self._locks.pop(uuid, None)

    # -- migration --------------------------------------------------------
    can_migrate = True
    has_dirty_log = True        # KVM's dirty-page log, via the control socket

    def migration_vmm(self, uuid):
        """Return ("testhost", control socket path) for the engine."""
        self._record(uuid)
        return "testhost", self._run(uuid, "control.sock")

    def start_incoming(self, uuid):
        """Start nb-testhost --incoming for the recorded spec (empty, paused).

        A guest reboot after the migration boots the payload normally.
        """
        with self._locks[uuid]:
            spec = self._record(uuid)["spec"]
            if self._running(uuid):
                raise MachineError(f"guest {uuid} already runs on this host; "
                                   "it cannot also be migrated in")
            self._checkpoint(uuid).remove()
            self._set_intent(uuid, power.INTENT_PAUSED)
            self._launch(uuid, self._boot_argv(spec, incoming=True),
                         self._boot_argv(spec))

    def finish_incoming(self, uuid, paused=False):
        """Mark the migrated-in guest as running, or paused if it came so."""
        want = MachineState.PAUSED if paused else MachineState.RUNNING
        with self._locks[uuid]:
            state = self.state(uuid)
            if state != want:
                raise MachineError(f"guest {uuid} is {state.value} here after "
                                   f"its migration, not {want.value}")
            rec = self._record(uuid)
            rec.pop("adopted", None)    # the guest, and its disks, are ours
            rec["intent"] = power.INTENT_PAUSED if paused else \
                power.INTENT_RUNNING
            write_json(self._run(uuid, "machine.json"), rec)

    def is_incoming(self, uuid):
        """Return True while nb-testhost waits in incoming mode."""
        if not self._running(uuid):
            return False
        try:
            with self._client(uuid) as client:
                return client.status()["state"] == "incoming"
        except TestHostError:
            return False

    def has_disks(self, uuid):
        """Return True if the root disk file exists and its directory is
        writable here."""
        return diskfiles.usable(self._dir(uuid))

    def disk_path(self, uuid):
        """Return the path of the raw root disk file."""
        return self._path(uuid, "disk")

    def disk_paths(self, uuid):
        """Return {name: path} of the root, swap and ephemeral disk files."""
        disks = self._record(uuid)["spec"]["disks"]
        return {d.get("name", ROOT_DISK): d["path"] for d in disks}

    def detached_disks(self, uuid):
        """Return the names of the disks the running VM does not have open.

        The swap and ephemeral files always; the root disk too if the VM
        runs without it (the test host's status says so).
        """
        names = list(self.disk_paths(uuid))
        with self._client(uuid) as client:
            has_root = int(client.status().get("disk_size", 0)) > 0
        return [n for n in names if n != ROOT_DISK or not has_root]

    def grow_disk(self, uuid, size, name=ROOT_DISK):
        """Extend a sparse disk file to ``size`` bytes if it is smaller."""
        diskfiles.grow(self.disk_paths(uuid)[name], size)

    # -- networking -------------------------------------------------------
    def plug_vifs(self, spec):
        """Create each NIC's tap (host side only) and attach it to its bridge."""
        for nic in spec.nics:
            self._net("plug", privsep.plug_tap_linux, nic.tap, nic.bridge,
                      nic.mac)

    def unplug_vifs(self, spec):
        """Delete each NIC's tap (and a bridge left without ports)."""
        for nic in spec.nics:
            self._net("unplug", privsep.unplug_tap_linux, nic.tap, nic.bridge)

    def _net(self, what, call, tap, *args):
        try:
            call(tap, *args)
        except privsep.HelperStartError as exc:
            raise MachineError(
                f"cannot {what} {tap}: the privileged helper did not start "
                f"({exc}); a nova-compute running as root needs "
                "[nova_bhyve_privileged] helper_command = <venv>/bin/"
                "privsep-helper --config-file <its nova.conf>") from exc
        except (privsep.PrivilegeError,
                processutils.ProcessExecutionError) as exc:
            raise MachineError(f"cannot {what} {tap}: {exc}") from exc

    def console_log_path(self, uuid):
        """Return the path of console.log (in the runtime directory)."""
        return self._run(uuid, "console.log")

    def diagnostics(self, uuid):
        """Return pid, vCPUs, memory, uptime and disks of the guest."""
        spec = self._record(uuid)["spec"]
        out = {"state": self.state(uuid), "vcpus": spec["vcpus"],
               "memory_mb": spec["memory_mb"],
               "disks": [d["path"] for d in spec["disks"]],
               "nics": spec["nics"]}
        out.update(self._process_facts(uuid))
        return out

    @contextlib.contextmanager
    def snapshot_disk(self, uuid):
        """Yield the path of the raw root disk file."""
        yield self._path(uuid, "disk")
