"""Telling guest states apart: process exits, intents and Nova power states.

bhyve(8) and the KVM test host share their exit statuses: 0 the guest
rebooted, 1 it powered off, 2 it halted, 3 it triple-faulted, 4 error.
The supervisor records how the guest process ended; the driver records
what it asked for (its *intent*).  A guest we stopped ourselves -- even
with SIGKILL -- is shut down, not crashed.
"""

import signal

from nova.compute import power_state

from nova_bhyve.machine.base import MachineState

EXIT_REBOOT = 0
EXIT_POWEROFF = 1
EXIT_HALT = 2
EXIT_TRIPLEFAULT = 3
EXIT_ERROR = 4

# What the driver last asked a guest to be.
INTENT_RUNNING = "running"
INTENT_PAUSED = "paused"
INTENT_STOPPED = "stopped"
INTENT_SUSPENDED = "suspended"

_POWER_STATES = {
    MachineState.RUNNING: power_state.RUNNING,
    MachineState.PAUSED: power_state.PAUSED,
    MachineState.SUSPENDED: power_state.SUSPENDED,
    MachineState.SHUTDOWN: power_state.SHUTDOWN,
    MachineState.CRASHED: power_state.CRASHED,
    MachineState.NOSTATE: power_state.NOSTATE,
}


def to_power_state(state):
    """Return the nova.compute.power_state value for a MachineState."""
    return _POWER_STATES[state]


def ended_state(intent, status=None, signum=None):
    """Return the MachineState of a guest whose process has ended.

    ``status`` is the exit status and ``signum`` the signal that ended the
    process (both None when nothing was recorded, for example after a host
    reboot).
    """
    if intent == INTENT_SUSPENDED:
        return MachineState.SUSPENDED
    if intent == INTENT_STOPPED:
        return MachineState.SHUTDOWN
    if signum is not None:
        # killed from outside while we wanted it running (SIGTERM is the
        # ACPI power button: an orderly poweroff)
        if signum == signal.SIGTERM:
            return MachineState.SHUTDOWN
        return MachineState.CRASHED
    if status in (EXIT_POWEROFF, EXIT_HALT):
        return MachineState.SHUTDOWN
    # a reboot exit is restarted by the supervisor; seeing one here means
    # the restart failed.  Triple faults, errors and unknown endings too.
    return MachineState.CRASHED
