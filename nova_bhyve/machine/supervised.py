"""Instance directories, machine records and supervised guest processes.

Shared by the backends.  Each guest has two directories:

- ``<instances_path>/<uuid>/``: its disks (and what else belongs to the
  guest wherever it runs: bhyve's NVRAM, a suspended guest's checkpoint);
  ``instances_path`` may be shared between hosts (NFS);
- ``<[bhyve] runtime_path>/<uuid>/``: this host's own files about the
  guest, never shared: ``machine.json`` (spec and the driver's intent), the
  supervisor's ``supervisor.json``, ``child.pid``, ``process.log``,
  ``console.log`` and, when the guest process has ended for good,
  ``exit.json`` (plus what the test host's nb-testhost keeps there: its
  control socket and pid file).

A host knows the guests it has a machine record for, so two hosts sharing
``instances_path`` never see (or reap) each other's guests.
"""

import collections
import contextlib
import os
import threading
import time

import psutil
from oslo_log import log as logging

from nova_bhyve import polling
from nova_bhyve.machine import checkpoint, diskfiles, power, supervise
from nova_bhyve.machine.base import MachineError, MachineSpec
from nova_bhyve.machine.statefile import read_json, write_json, write_text

LOG = logging.getLogger(__name__)

RUN_FILES = ("exit.json", "supervisor.json", "child.pid")
HOST_FILE = "host"


def supervises(cmdline, uuid):
    """Return True if ``cmdline`` is the supervisor of guest ``uuid``.

    A recorded pid is the supervisor's while that process runs
    ``nova_bhyve.machine.supervise --rundir .../<uuid>``; any other process
    has reused the pid.  The command line, not the start time, tells:
    process start times are read against the wall clock, and a clock step
    (seen: 10 s while the host was busy) made a running guest look ended.
    """
    if supervise.MODULE not in cmdline:
        return False
    own = cmdline[cmdline.index(supervise.MODULE) + 1:]
    own = own[:own.index("--")] if "--" in own else own
    if "--rundir" not in own[:-1]:
        return False
    rundir = own[own.index("--rundir") + 1]
    return os.path.basename(os.path.normpath(rundir)) == uuid


class SupervisedMachines:
    """Records and process supervision for one host's guests."""

    def __init__(self, instances_path, runtime_path):
        self.instances_path = instances_path
        self.runtime_path = runtime_path
        self._locks = collections.defaultdict(threading.RLock)

    def _dir(self, uuid):
        """The guest's instance directory (disks; may be shared)."""
        return os.path.join(self.instances_path, uuid)

    def _path(self, uuid, name):
        return os.path.join(self.instances_path, uuid, name)

    def _run_dir(self, uuid):
        """This host's runtime directory of the guest (never shared)."""
        return os.path.join(self.runtime_path, uuid)

    def _run(self, uuid, name):
        return os.path.join(self.runtime_path, uuid, name)

    def _make_dirs(self, uuid):
        os.makedirs(self._dir(uuid), exist_ok=True)
        os.makedirs(self._run_dir(uuid), mode=0o750, exist_ok=True)

    def prepare_runtime_path(self, host):
        """Create ``runtime_path`` (0750) and claim it for ``host``.

        Raise MachineError when it is a symbolic link, lies inside
        ``instances_path`` (which may be shared) or was claimed by another
        host: two computes must never share their runtime files.
        """
        path = os.path.abspath(self.runtime_path)
        inst = os.path.realpath(self.instances_path)
        if os.path.islink(path):
            raise MachineError(f"[bhyve] runtime_path {path} is a symbolic "
                               "link: name the real directory")
        real = os.path.realpath(path)
        if real == inst or real.startswith(inst.rstrip("/") + "/"):
            raise MachineError(
                f"[bhyve] runtime_path {path} lies inside [DEFAULT] "
                f"instances_path {self.instances_path}, which may be shared "
                "between hosts: choose a directory local to this host, for "
                "example $state_path/bhyve-runtime")
        os.makedirs(path, mode=0o750, exist_ok=True)
        marker = os.path.join(path, HOST_FILE)
        try:
            with open(marker) as f:
                owner = f.read().strip()
        except FileNotFoundError:
            owner = None
        if owner and owner != host:
            raise MachineError(
                f"[bhyve] runtime_path {path} belongs to host {owner!r} "
                f"(its {HOST_FILE} file), not {host!r}: every nova-compute "
                "needs a runtime_path of its own")
        if owner is None:
            write_text(marker, host + "\n")

    def legacy_records(self):
        """Return UUIDs with a machine record in the instance directory.

        Before ``[bhyve] runtime_path`` existed the records lived there;
        such guests are not known to this version.
        """
        try:
            names = os.listdir(self.instances_path)
        except FileNotFoundError:
            return []
        return sorted(n for n in names
                      if os.path.exists(self._path(n, "machine.json")) and
                      not os.path.exists(self._run(n, "machine.json")))

    def warn_legacy_records(self):
        """Log each guest whose record this version ignores (legacy_records)."""
        for uuid in self.legacy_records():
            LOG.warning("Guest %s has its machine record in %s, where "
                        "versions before [bhyve] runtime_path kept it; this "
                        "host ignores it. Stop the guest, then move the "
                        "machine.json to %s", uuid, self._dir(uuid),
                        self._run_dir(uuid))

    def _record(self, uuid):
        rec = read_json(self._run(uuid, "machine.json"))
        if rec is None:
            raise KeyError(uuid)
        return rec

    def _spec(self, uuid):
        return MachineSpec.from_dict(self._record(uuid)["spec"])

    def recorded_spec(self, uuid):
        """Return the MachineSpec recorded for ``uuid`` (KeyError if none)."""
        return self._spec(uuid)

    def _write_record(self, spec, intent=power.INTENT_STOPPED):
        write_json(self._run(spec.uuid, "machine.json"),
                   {"spec": spec.to_dict(), "intent": intent})

    def _set_intent(self, uuid, intent):
        rec = self._record(uuid)
        rec["intent"] = intent
        write_json(self._run(uuid, "machine.json"), rec)

    def adopt(self, instance, spec):
        """Record the guest for the disk files already in its instance
        directory (shared storage): ``create`` keeps them, and the record
        notes that they are not this host's to delete on its own account."""
        diskfiles.require_root(self._dir(spec.uuid))
        spec = self.create(None, instance, spec, None)
        rec = self._record(spec.uuid)
        rec["adopted"] = True
        write_json(self._run(spec.uuid, "machine.json"), rec)
        return spec

    def adopted(self, uuid):
        """Return True if ``adopt`` recorded the guest (disks not ours)."""
        try:
            return bool(self._record(uuid).get("adopted"))
        except KeyError:
            return False

    def _checkpoint(self, uuid):
        return checkpoint.CheckpointFiles(self._path(uuid, "checkpoint"))

    def list_machines(self):
        """Return the UUIDs this host has a machine record for."""
        try:
            names = os.listdir(self.runtime_path)
        except FileNotFoundError:
            return []
        return sorted(n for n in names
                      if os.path.exists(self._run(n, "machine.json")))

    def _clear_run_files(self, uuid):
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._run(uuid, name))

    def _supervisor_alive(self, uuid):
        sup = read_json(self._run(uuid, "supervisor.json"))
        if not sup:
            return False
        try:
            proc = psutil.Process(sup["pid"])
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return supervises(proc.cmdline(), uuid)
        except psutil.Error:
            return False

    def _running(self, uuid):
        """Return True while the guest process is supervised."""
        return (self._supervisor_alive(uuid) and
                not os.path.exists(self._run(uuid, "exit.json")))

    def _child_pid(self, uuid):
        rec = read_json(self._run(uuid, "child.pid"))
        return rec["pid"] if rec else None

    def _wait_ended(self, uuid, timeout):
        return polling.poll(lambda: not self._running(uuid), timeout)

    def _ended_state(self, uuid, intent):
        ended = read_json(self._run(uuid, "exit.json")) or {}
        return power.ended_state(intent, ended.get("status"),
                                 ended.get("signal"))

    def _log_tail(self, uuid):
        try:
            with open(self._run(uuid, "process.log"), "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 1000))
                data = f.read()
        except OSError:
            return "(no process log)"
        return data.decode("utf-8", "replace").strip()

    def _process_facts(self, uuid):
        out = {"pid": None, "uptime": 0}
        if not self._running(uuid):
            return out
        pid = self._child_pid(uuid)
        with contextlib.suppress(psutil.Error, TypeError, ValueError):
            proc = psutil.Process(pid)
            out["pid"] = pid
            out["uptime"] = int(time.time() - proc.create_time())
            out["cpu_time_ns"] = int(sum(proc.cpu_times()[:2]) * 1e9)
        return out
