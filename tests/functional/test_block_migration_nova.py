"""Live block migration through Nova with a guest writing its disk.

Runs ``nova_block_migration_scenarios.py`` in a fresh interpreter under
native threads (Nova 34's default) for every scenario, and under eventlet
for the block migration itself.
"""

import pathlib

import pytest

from .conftest import needs_kvm
from .nova_scenarios import run_scenarios

pytestmark = needs_kvm

SCENARIOS = pathlib.Path(__file__).with_name(
    "nova_block_migration_scenarios.py")
ALL = {
    "test_live_block_migration_with_a_guest_writing_its_disk",
    "test_a_cut_mid_disk_keeps_the_guest_and_its_disk_on_the_source",
    "test_live_migration_moves_no_disk_bytes_and_the_disk_holds",
}
EVENTLET = [
    "BlockMigrationTest.test_live_block_migration_with_a_guest_writing_its_disk",
]


@pytest.mark.parametrize("mode,names", [
    ("threading", []),
    ("eventlet", EVENTLET),
])
def test_nova_block_migration_scenarios(mode, names):
    results, lines = run_scenarios(SCENARIOS, mode, names, timeout=900)
    for line in lines:
        if "NOVA-BHYVE-FIGURES " in line:
            print(line[line.index("NOVA-BHYVE-FIGURES "):])
    expected = {n.split(".")[1] for n in names} if names else ALL
    assert results == dict.fromkeys(expected, "ok")
