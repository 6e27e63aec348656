"""BhyveDriver through Nova's own control plane, in both concurrency modes.

Nova chooses native threads or eventlet monkey patching once per process,
when ``nova.tests`` is imported, so each mode runs the scenarios of
``nova_driver_scenarios.py`` in a fresh interpreter (as nova's own tox
runs its functional tests once per mode).  The scenarios start real guests
on the KVM test host.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from .conftest import needs_kvm

pytestmark = needs_kvm

SCENARIOS = pathlib.Path(__file__).with_name("nova_driver_scenarios.py")
EXPECTED = {
    "test_lifecycle_through_the_api",
    "test_guest_killed_outside_nova_is_crashed_and_becomes_shutoff",
    "test_placement_inventory_matches_the_host",
    "test_snapshot_uploads_the_root_disk",
}


@pytest.mark.parametrize("mode", ["threading", "eventlet"])
def test_nova_scenarios(mode):
    env = dict(os.environ, NOVA_BHYVE_CONCURRENCY=mode)
    env.pop("OS_NOVA_DISABLE_EVENTLET_PATCHING", None)
    proc = subprocess.run([sys.executable, str(SCENARIOS)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=900, check=False)
    summary = [line for line in proc.stdout.splitlines()
               if line.startswith("NOVA-BHYVE-RESULTS ")]
    assert summary, f"{mode} mode: no results\n{proc.stderr[-20000:]}"
    results = json.loads(summary[-1].split(" ", 1)[1])
    assert proc.returncode == 0, (
        f"{mode} mode: {results}\n{proc.stderr[-20000:]}")
    assert results == dict.fromkeys(EXPECTED, "ok")
