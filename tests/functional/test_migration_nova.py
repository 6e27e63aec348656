"""Live migration, and cold migration of extra disks, through Nova's
control plane (cold migration and resize: test_cold_migration_nova).

Runs ``nova_migration_scenarios.py`` in a fresh interpreter per Nova
concurrency mode (Nova picks its mode once per process): every scenario
under native threads, Nova 34's default, and the ones that exercise each
kind of move under eventlet.  The measured figures of each completed live
migration are printed (``pytest -s`` or ``-rP`` shows them).
"""

import pathlib

import pytest

from .conftest import needs_kvm
from .nova_scenarios import run_scenarios

pytestmark = needs_kvm

SCENARIOS = pathlib.Path(__file__).with_name("nova_migration_scenarios.py")
LIVE = {
    "test_live_migrate_to_a_named_host",
    "test_live_migrate_to_a_scheduler_chosen_host_and_back",
    "test_abort_keeps_the_guest_on_the_source",
    "test_destination_vm_killed_mid_migration",
    "test_warm_mode_without_a_dirty_log",
    "test_refused_without_a_dirty_log_when_configured",
}
HOT = {
    "test_force_complete_finishes_what_cannot_converge",
    "test_auto_converge_finishes_it",
    "test_completion_timeout_aborts",
    "test_completion_timeout_forces_completion",
}
COLD = {
    "test_cold_migrate_and_confirm_with_swap_and_ephemeral",
    "test_live_block_migrate_with_swap_and_ephemeral",
}
SHARED = {
    "test_live_migrate_moves_no_disk_bytes",
    "test_abort_keeps_the_guest_and_its_disk",
    "test_block_migration_is_refused_with_what_to_fix",
    "test_cold_migrate_and_confirm_keeps_the_disk",
    "test_cold_migrate_and_revert_keeps_the_disk",
    "test_evacuate_keeps_the_disk_and_the_old_host_coming_back",
}
EVENTLET = [
    "LiveMigrationTest.test_live_migrate_to_a_named_host",
    "LiveMigrationTest.test_abort_keeps_the_guest_on_the_source",
    "HotGuestTest.test_auto_converge_finishes_it",
    "SharedStorageTest.test_live_migrate_moves_no_disk_bytes",
]


@pytest.mark.parametrize("mode,names", [
    ("threading", []),
    ("eventlet", EVENTLET),
])
def test_nova_migration_scenarios(mode, names):
    results, lines = run_scenarios(SCENARIOS, mode, names, timeout=1200)
    for line in lines:
        if "NOVA-BHYVE-FIGURES " in line:
            print(line[line.index("NOVA-BHYVE-FIGURES "):])
    expected = ({n.split(".")[1] for n in names} if names
                else LIVE | HOT | COLD | SHARED)
    assert results == dict.fromkeys(expected, "ok")
