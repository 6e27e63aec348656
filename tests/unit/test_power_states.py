"""How guest endings map to Nova power states."""

import signal

import pytest
from nova.compute import power_state

from nova_bhyve.machine import power
from nova_bhyve.machine.base import MachineState

S = MachineState


@pytest.mark.parametrize("intent,status,signum,expected", [
    # we asked for the stop: never a crash, however it ended
    (power.INTENT_STOPPED, None, signal.SIGKILL, S.SHUTDOWN),
    (power.INTENT_STOPPED, 1, None, S.SHUTDOWN),
    (power.INTENT_STOPPED, None, None, S.SHUTDOWN),
    # the guest powered off or halted by itself
    (power.INTENT_RUNNING, power.EXIT_POWEROFF, None, S.SHUTDOWN),
    (power.INTENT_RUNNING, power.EXIT_HALT, None, S.SHUTDOWN),
    (power.INTENT_PAUSED, power.EXIT_POWEROFF, None, S.SHUTDOWN),
    # ACPI power button from outside (SIGTERM to bhyve) is orderly
    (power.INTENT_RUNNING, None, signal.SIGTERM, S.SHUTDOWN),
    # crashes
    (power.INTENT_RUNNING, power.EXIT_TRIPLEFAULT, None, S.CRASHED),
    (power.INTENT_RUNNING, power.EXIT_ERROR, None, S.CRASHED),
    (power.INTENT_RUNNING, None, signal.SIGKILL, S.CRASHED),
    (power.INTENT_RUNNING, None, signal.SIGSEGV, S.CRASHED),
    (power.INTENT_RUNNING, power.EXIT_REBOOT, None, S.CRASHED),
    (power.INTENT_RUNNING, None, None, S.CRASHED),   # vanished (host reboot)
    # a checkpointed guest is suspended, not stopped
    (power.INTENT_SUSPENDED, power.EXIT_POWEROFF, None, S.SUSPENDED),
])
def test_ended_state(intent, status, signum, expected):
    assert power.ended_state(intent, status, signum) is expected


def test_nova_power_states_are_distinct():
    mapped = {state: power.to_power_state(state) for state in MachineState}
    assert mapped == {
        S.RUNNING: power_state.RUNNING, S.PAUSED: power_state.PAUSED,
        S.SUSPENDED: power_state.SUSPENDED, S.SHUTDOWN: power_state.SHUTDOWN,
        S.CRASHED: power_state.CRASHED, S.NOSTATE: power_state.NOSTATE}
    assert len(set(mapped.values())) == len(mapped)
