"""Fixtures for tests that run real guests on the KVM test host."""

import shutil
import tempfile

import pytest

from nova_bhyve.testhost import artifacts
from nova_bhyve.testhost.console import parse_console
from nova_bhyve.testhost.errors import TestHostError
from nova_bhyve.testhost.process import TestHostVM

from .polling import wait_for  # noqa: F401  (re-exported for the tests)

_KVM_OK, _KVM_WHY = artifacts.kvm_available()

needs_kvm = pytest.mark.skipif(not _KVM_OK, reason=_KVM_WHY or "no KVM")


def wait_heartbeats(vm, count, timeout=20.0):
    """Wait until the guest printed at least ``count`` heartbeats; return the report."""
    def enough():
        report = parse_console(vm.console_text())
        return report if len(report.heartbeats) >= count else None
    return wait_for(enough, timeout, what=f"{count} heartbeats from {vm.name}")


def start_refused(vms, **kwargs):
    """Start a VM (``vms.start("bad", **kwargs)``) the test host must refuse
    before a VM exists: it exits with status 4, as bhyve's error does.
    Return the reason it gave."""
    with pytest.raises(TestHostError) as err:
        vms.start("bad", **kwargs)
    assert err.value.code == "ECHILD"
    assert "exited with status 4" in err.value.message
    return err.value.message


class VMFactory:
    """Starts test-host VMs in a short run directory and stops them all.

    ``dirty_log``: the dirty log the VMs that run a guest (not the
    incoming ones) offer the engine, where a test does not choose:
    ``ranged`` (the test host's own, peeked and cleared range by range)
    or ``whole`` (read and cleared whole only, as bhyve's;
    ``--dirty-log-whole``).
    """

    def __init__(self, dirty_log="ranged"):
        # unix socket paths are limited to 108 bytes: keep the base short
        self.base = tempfile.mkdtemp(prefix="nbt-")
        self.vms = []
        self.dirty_log = dirty_log

    def start(self, name, mem="256M", **kwargs):
        """Start a VM named ``name`` (see TestHostVM.start)."""
        if self.dirty_log == "whole" and not kwargs.get("incoming"):
            kwargs.setdefault("dirty_log_whole", True)
        vm = TestHostVM.start(name, f"{self.base}/{name}", mem, **kwargs)
        self.vms.append(vm)
        return vm

    def cleanup(self):
        for vm in self.vms:
            if vm.alive():
                vm.kill()
        shutil.rmtree(self.base, ignore_errors=True)


def pytest_generate_tests(metafunc):
    """A module that sets ``DIRTY_LOGS`` runs each of its tests that use
    ``vms`` once per dirty log named there (VMFactory): the engine's path
    for bhyve's whole log runs the same tests as the test host's own.  A
    ``dirty_logs`` mark names the logs a test needs, where not all."""
    logs = getattr(metafunc.module, "DIRTY_LOGS", ())
    mark = metafunc.definition.get_closest_marker("dirty_logs")
    if mark:
        logs = [log for log in logs if log in mark.args]
        if not logs or "vms" not in metafunc.fixturenames:
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: dirty_logs{mark.args} names no "
                f"log of its module's DIRTY_LOGS, or the test uses no vms")
    if logs and "vms" in metafunc.fixturenames:
        metafunc.parametrize("vms", logs, indirect=True)


# For a test whose source reads no dirty log (warm, cold, refused before
# round 0, or no source VM at all): one run tells all.
reads_no_dirty_log = pytest.mark.dirty_logs("ranged")


@pytest.fixture
def vms(request):
    """A VMFactory whose VMs are killed after the test."""
    factory = VMFactory(getattr(request, "param", "ranged"))
    yield factory
    factory.cleanup()
