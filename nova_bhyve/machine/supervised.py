"""Instance directories, machine records and supervised guest processes.

Shared by the backends: ``<instances_path>/<uuid>/machine.json`` holds the
spec and the driver's intent; the supervisor (``supervise.py``, under
daemon(8) on FreeBSD) leaves ``supervisor.json``, ``child.pid`` and, when
the guest process has ended for good, ``exit.json``.
"""

import collections
import contextlib
import os
import threading
import time

import psutil

from nova_bhyve import polling
from nova_bhyve.machine import checkpoint, power
from nova_bhyve.machine.base import MachineSpec
from nova_bhyve.machine.statefile import read_json, write_json

RUN_FILES = ("exit.json", "supervisor.json", "child.pid")


class SupervisedMachines:
    """Records and process supervision for one instances directory."""

    def __init__(self, instances_path):
        self.instances_path = instances_path
        self._locks = collections.defaultdict(threading.RLock)

    def _dir(self, uuid):
        return os.path.join(self.instances_path, uuid)

    def _path(self, uuid, name):
        return os.path.join(self.instances_path, uuid, name)

    def _record(self, uuid):
        rec = read_json(self._path(uuid, "machine.json"))
        if rec is None:
            raise KeyError(uuid)
        return rec

    def _spec(self, uuid):
        return MachineSpec.from_dict(self._record(uuid)["spec"])

    def _write_record(self, spec, intent=power.INTENT_STOPPED):
        write_json(self._path(spec.uuid, "machine.json"),
                   {"spec": spec.to_dict(), "intent": intent})

    def _set_intent(self, uuid, intent):
        rec = self._record(uuid)
        rec["intent"] = intent
        write_json(self._path(uuid, "machine.json"), rec)

    def _checkpoint(self, uuid):
        return checkpoint.CheckpointFiles(self._path(uuid, "checkpoint"))

    def list_machines(self):
        """Return the UUIDs of instance directories with a machine record."""
        try:
            names = os.listdir(self.instances_path)
        except FileNotFoundError:
            return []
        return sorted(n for n in names
                      if os.path.exists(self._path(n, "machine.json")))

    def _clear_run_files(self, uuid):
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(uuid, name))

    def _supervisor_alive(self, uuid):
        sup = read_json(self._path(uuid, "supervisor.json"))
        if not sup:
            return False
        try:
            proc = psutil.Process(sup["pid"])
            if abs(proc.create_time() - sup["started"]) > 5:
                return False        # the pid was reused
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _running(self, uuid):
        """Return True while the guest process is supervised."""
        return (self._supervisor_alive(uuid) and
                not os.path.exists(self._path(uuid, "exit.json")))

    def _child_pid(self, uuid):
        rec = read_json(self._path(uuid, "child.pid"))
        return rec["pid"] if rec else None

    def _wait_ended(self, uuid, timeout):
        return polling.poll(lambda: not self._running(uuid), timeout)

    def _ended_state(self, uuid, intent):
        ended = read_json(self._path(uuid, "exit.json")) or {}
        return power.ended_state(intent, ended.get("status"),
                                 ended.get("signal"))

    def _log_tail(self, uuid):
        try:
            with open(self._path(uuid, "process.log"), "rb") as f:
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
