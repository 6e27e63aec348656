"""BhyveDriver through Nova's own control plane, in both concurrency modes.

Nova chooses native threads or eventlet monkey patching once per process,
when ``nova.tests`` is imported, so each mode runs the scenarios of
``nova_driver_scenarios.py`` in a fresh interpreter (as nova's own tox
runs its functional tests once per mode).  The scenarios start real guests
on the KVM test host.
"""

import pathlib

import pytest

from .conftest import needs_kvm
from .nova_scenarios import run_scenarios

pytestmark = needs_kvm

SCENARIOS = pathlib.Path(__file__).with_name("nova_driver_scenarios.py")
EXPECTED = {
    "test_lifecycle_through_the_api",
    "test_guest_killed_outside_nova_is_crashed_and_becomes_shutoff",
    "test_placement_inventory_matches_the_host",
    "test_snapshot_uploads_the_root_disk",
    "test_swap_and_ephemeral_disks_through_the_api",
}


@pytest.mark.parametrize("mode", ["threading", "eventlet"])
def test_nova_scenarios(mode):
    results, _lines = run_scenarios(SCENARIOS, mode)
    assert results == dict.fromkeys(EXPECTED, "ok")
