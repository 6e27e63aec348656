"""What the driver asks of a machine layer: specs, states and the interface."""

import abc
import dataclasses
import enum


class MachineState(enum.Enum):
    """A guest's state as the machine layer sees it."""

    RUNNING = "running"
    PAUSED = "paused"
    SUSPENDED = "suspended"     # checkpointed to disk, no process
    SHUTDOWN = "shutdown"       # stopped cleanly, by the guest or by us
    CRASHED = "crashed"         # ended without anyone asking it to
    NOSTATE = "nostate"         # known, but its state cannot be told


#: the name of the root disk; extra disks are ``swap`` and ``eph0``, ``eph1``…
ROOT_DISK = "disk"
SWAP_DISK = "swap"


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    """One virtio-blk disk: a file or a zvol device.

    ``name`` is ``disk`` (root), ``swap`` or ``eph<N>``; ``size_mb`` is the
    size the flavor or block device mapping asks for (0 for the root disk,
    which is sized from the flavor's root_gb).  A spec built from an
    instance has no ``path`` yet: the backend's ``create`` fills it in.
    """

    path: str = ""
    boot: bool = False
    name: str = ROOT_DISK
    size_mb: int = 0


@dataclasses.dataclass(frozen=True)
class NicSpec:
    """One virtio-net interface on a tap device attached to a bridge."""

    vif_id: str
    tap: str
    mac: str
    bridge: str = ""


@dataclasses.dataclass(frozen=True)
class MachineSpec:
    """Everything needed to (re)start one guest."""

    uuid: str
    vcpus: int
    memory_mb: int
    disks: tuple = ()
    nics: tuple = ()
    cmdline: str = ""           # test-host guest payload parameters
    vnc_listen: str = ""        # empty: no framebuffer
    vnc_port: int = 0

    def to_dict(self):
        """Return a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Inverse of to_dict."""
        data = dict(data)
        data["disks"] = tuple(DiskSpec(**d) for d in data.get("disks", ()))
        data["nics"] = tuple(NicSpec(**n) for n in data.get("nics", ()))
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class HostFacts:
    """Resources and identity of the hypervisor host."""

    vcpus: int
    memory_mb: int
    memory_mb_used: int
    disk_gb: int
    disk_gb_used: int
    hypervisor_type: str
    hypervisor_version: int
    arch: str
    cpu_model: str
    cpu_vendor: str = ""        # e.g. GenuineIntel; empty if unknown
    page_size: int = 4096


class MachineError(Exception):
    """A machine-layer operation failed; the message says what to fix."""


class Backend(abc.ABC):
    """A machine layer: runs guests from MachineSpecs, keyed by instance UUID."""

    #: overrides of ComputeDriver.capabilities for this backend
    capabilities = {}
    #: operating system reported in instance diagnostics
    hypervisor_os = "FreeBSD"

    @abc.abstractmethod
    def init_host(self, host):
        """Check prerequisites; raise MachineError naming what is missing."""

    @abc.abstractmethod
    def host_facts(self):
        """Return HostFacts measured on this host."""

    @abc.abstractmethod
    def list_machines(self):
        """Return the UUIDs of all guests this backend knows on this host."""

    @abc.abstractmethod
    def state(self, uuid):
        """Return the MachineState of a guest (raise KeyError if unknown)."""

    @abc.abstractmethod
    def create(self, context, instance, spec, image_meta):
        """Prepare disks and files for ``spec``; return it with its disks."""

    @abc.abstractmethod
    def start(self, uuid):
        """Boot the guest (from a checkpoint if it is suspended)."""

    @abc.abstractmethod
    def stop(self, uuid, timeout=0, retry_interval=0):
        """Stop the guest: gracefully within ``timeout`` s, 0 = immediately."""

    @abc.abstractmethod
    def reboot(self, uuid, soft):
        """Reboot the guest; a soft reboot falls back to a hard one."""

    @abc.abstractmethod
    def pause(self, uuid):
        """Stop the guest's vCPUs, keeping it in memory."""

    @abc.abstractmethod
    def unpause(self, uuid):
        """Run the vCPUs of a paused guest."""

    @abc.abstractmethod
    def suspend(self, uuid):
        """Checkpoint the guest to disk and end its process."""

    @abc.abstractmethod
    def destroy(self, uuid):
        """Stop the guest at once and release its runtime resources."""

    @abc.abstractmethod
    def delete_files(self, uuid, destroy_disks=True):
        """Remove what create() made (disks only if ``destroy_disks``)."""

    @abc.abstractmethod
    def console_log_path(self, uuid):
        """Return the path of the guest's serial console log."""

    @abc.abstractmethod
    def diagnostics(self, uuid):
        """Return a dict of runtime facts (pid, vcpus, memory, disks, nics)."""

    @abc.abstractmethod
    def snapshot_disk(self, uuid):
        """Context manager yielding a readable raw image of the root disk."""

    # -- migration (nova_bhyve.migration) ----------------------------------
    #: the backend implements the migration methods below (cold and live)
    can_migrate = False
    #: why it cannot, for the operator (when can_migrate is False)
    migration_blocker = "this machine layer does not implement guest migration"

    @property
    def can_live_migrate(self):
        """The backend can live-migrate (by default: if it can migrate)."""
        return self.can_migrate
    #: the vmm tracks the pages a running guest writes (live pre-copy)
    has_dirty_log = False
    #: the guest's disks move as stream disks of the engine (zfs send and
    #: receive: ``migration_streams``), whatever the instances path
    stream_disks = False
    #: why a live migration cannot copy the guest's disk files (a local
    #: instances path), for the operator; None: the engine copies them
    #: through the vmm's dirty-block log
    live_disk_copy_blocker = None

    def migration_type(self):
        """Name the backend and disk layout; migrating hosts must agree."""
        return type(self).__name__

    def _no_migration(self, what):
        return MachineError(
            f"{type(self).__name__} cannot {what}: {self.migration_blocker}")

    def migration_vmm(self, uuid):
        """Return (vmm kind name, target) by which the engine reaches the guest."""
        raise self._no_migration("migrate guests")

    def start_incoming(self, uuid):
        """Start an empty, paused VM for the recorded spec that a migration fills."""
        raise self._no_migration("receive a migrating guest")

    def finish_incoming(self, uuid, paused=False):
        """Record that the migrated-in guest now runs (or is paused) here."""
        raise self._no_migration("receive a migrating guest")

    def prepare_incoming_disks(self, instance, spec):
        """Record ``spec`` for a guest whose disks arrive as streams; return it."""
        raise self._no_migration("receive disks as streams")

    def destroy_moved_disks(self, uuid):
        """Destroy the guest's disks that moved away as streams (source)."""
        raise self._no_migration("move disks as streams")

    def migration_streams(self, uuid, tag, receiving):
        """Return the ZvolStreams (machine/zvolmove.py) of the guest's disks."""
        raise self._no_migration("move disks as streams")

    def cold_streams(self, uuid, tag, names, receiving):
        """Return the ZvolStreams of the stopped guest's disks ``names``
        (a cold migration); a destination refuses disks it has already."""
        raise self._no_migration("move disks as streams")

    def stream_disk_sizes(self, uuid, names):
        """Return {name: bytes} of the guest's stream disks ``names``."""
        raise self._no_migration("move disks as streams")

    def instance_files(self, uuid):
        """Return {file name: path} of the files in the instance directory,
        besides the disks, that a cold migration of stream disks moves."""
        return {}

    def is_incoming(self, uuid):
        """Return True while the guest's VM waits for a migration to fill it."""
        return False

    def recorded_spec(self, uuid):
        """Return the MachineSpec recorded for ``uuid``; KeyError if none."""
        raise KeyError(uuid)

    def adopt(self, instance, spec):
        """Record a guest whose root disk is already here (shared storage).

        The disks in the instance directory are used as they are (a resize
        may add or re-make swap and ephemeral disks); raise MachineError if
        the root disk is missing.  Return the spec with its disks.
        """
        raise self._no_migration("use disks on shared storage")

    def adopted(self, uuid):
        """Return True if the guest's record was made by ``adopt``: its
        disks were there before (shared storage) and are not this host's
        to delete on its own account."""
        return False

    def has_disks(self, uuid):
        """Return True if the guest's root disk is here and writable."""
        return False

    def disk_path(self, uuid):
        """Return the root disk as a file path a disk copy reads or writes."""
        raise self._no_migration("copy disks between hosts")

    def disk_paths(self, uuid):
        """Return {disk name: path} of every disk of the guest, root first."""
        return {ROOT_DISK: self.disk_path(uuid)}

    def detached_disks(self, uuid):
        """Return the names of the guest's disks its running VM does not
        have open (nothing writes them while it runs); the others' writes
        are in the vmm's dirty-block log, in ``disk_paths`` order."""
        return []

    def grow_disk(self, uuid, size, name=ROOT_DISK):
        """Grow disk ``name`` to ``size`` bytes (never shrinks it)."""
        raise self._no_migration("resize disks")

    def plug_vifs(self, spec):
        """Create the tap devices of ``spec`` and attach them to bridges."""
        return None

    def unplug_vifs(self, spec):
        """Remove the tap devices of ``spec``."""
        return None
