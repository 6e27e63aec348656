"""Supervised guest processes: whether a recorded supervisor still runs."""

import json
import os
import subprocess
import sys
import time

import pytest

from nova_bhyve import polling
from nova_bhyve.machine import supervise, supervised
from nova_bhyve.machine.statefile import read_json, write_json

UUID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
OTHER = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"


def _supervisor_cmd(rundir):
    return [sys.executable, "-m", supervise.MODULE, "--foreground",
            "--rundir", str(rundir), "--", "sleep", "60"]


@pytest.mark.parametrize("cmdline,uuid,expected", [
    (_supervisor_cmd(f"/run/nb/{UUID}"), UUID, True),
    (_supervisor_cmd(f"/run/nb/{UUID}/"), UUID, True),
    (_supervisor_cmd(f"/run/nb/{UUID}"), OTHER, False),
    # the guest process itself names the same directory
    (["nb-testhost", "--name", UUID, "--rundir", f"/run/nb/{UUID}"], UUID,
     False),
    # a --rundir after "--" belongs to the supervised command
    ([sys.executable, "-m", supervise.MODULE, "--",
      "nb-testhost", "--rundir", f"/run/nb/{UUID}"], UUID, False),
    ([sys.executable, "-m", supervise.MODULE, "--rundir"], UUID,
     False),
    ([], UUID, False),
])
def test_a_supervisor_is_told_by_its_command_line(cmdline, uuid, expected):
    assert supervised.supervises(cmdline, uuid) is expected


@pytest.fixture
def machines(tmp_path):
    m = supervised.SupervisedMachines(str(tmp_path / "instances"),
                                      str(tmp_path / "run"))
    m._make_dirs(UUID)
    return m


def test_a_running_supervisor_stays_running_across_a_clock_step(machines):
    """The recorded start time may be far from the process's, as after the
    wall clock stepped: the guest still runs."""
    rundir = machines._run_dir(UUID)
    proc = subprocess.Popen(_supervisor_cmd(rundir),
                            stdin=subprocess.DEVNULL)
    try:
        record = os.path.join(rundir, "supervisor.json")
        assert polling.poll(lambda: read_json(record), 30, 0.05)
        sup = read_json(record)
        assert sup["pid"] == proc.pid
        write_json(record, dict(sup, started=sup["started"] - 600))
        assert machines._running(UUID)
    finally:
        proc.terminate()
        proc.wait(30)
    assert polling.poll(lambda: not machines._running(UUID), 10, 0.05)
    assert read_json(os.path.join(rundir, "exit.json"))["signal"] == 15


def test_a_pid_reused_by_another_process_is_not_the_supervisor(machines):
    record = os.path.join(machines._run_dir(UUID), "supervisor.json")
    with open(record, "w") as f:
        json.dump({"pid": os.getpid(), "started": time.time()}, f)
    assert not machines._running(UUID)
