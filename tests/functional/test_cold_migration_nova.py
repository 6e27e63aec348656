"""Cold migration, resize, revert and evacuation through Nova's control
plane.

Runs ``nova_cold_scenarios.py`` in a fresh interpreter per Nova
concurrency mode: every scenario under native threads, Nova 34's default,
and one move of each kind under eventlet.
"""

import pathlib

import pytest

from .conftest import needs_kvm
from .nova_scenarios import run_scenarios

pytestmark = needs_kvm

SCENARIOS = pathlib.Path(__file__).with_name("nova_cold_scenarios.py")
COLD = {
    "test_cold_migrate_and_confirm",
    "test_cold_migrate_and_revert",
    "test_resize_and_revert",
    "test_evacuate_and_the_old_host_coming_back",
}
DISK_WRITER = {
    "test_cold_migration_of_a_guest_writing_its_disk",
    "test_resize_of_a_guest_writing_its_disk",
}
FAILURES = {
    "test_cold_migration_failing_mid_disk_keeps_the_guest_on_the_source",
    "test_resize_failing_mid_disk_keeps_the_guest_on_the_source",
}
EVENTLET = [
    "ColdMigrationTest.test_cold_migrate_and_confirm",
    "ColdMigrationTest.test_evacuate_and_the_old_host_coming_back",
    "ColdFailureTest.test_cold_migration_failing_mid_disk_keeps_the_guest_"
    "on_the_source",
]


@pytest.mark.parametrize("mode,names", [
    ("threading", []),
    ("eventlet", EVENTLET),
])
def test_nova_cold_migration_scenarios(mode, names):
    results, _lines = run_scenarios(SCENARIOS, mode, names, timeout=1200)
    expected = ({n.split(".")[1] for n in names} if names
                else COLD | DISK_WRITER | FAILURES)
    assert results == dict.fromkeys(expected, "ok")
