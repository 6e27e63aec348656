"""Fixtures for tests that run real guests on the KVM test host."""

import shutil
import tempfile

import pytest

from nova_bhyve.testhost import artifacts
from nova_bhyve.testhost.console import parse_console
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


class VMFactory:
    """Starts test-host VMs in a short run directory and stops them all."""

    def __init__(self):
        # unix socket paths are limited to 108 bytes: keep the base short
        self.base = tempfile.mkdtemp(prefix="nbt-")
        self.vms = []

    def start(self, name, mem="256M", **kwargs):
        """Start a VM named ``name`` (see TestHostVM.start)."""
        vm = TestHostVM.start(name, f"{self.base}/{name}", mem, **kwargs)
        self.vms.append(vm)
        return vm

    def cleanup(self):
        for vm in self.vms:
            if vm.alive():
                vm.kill()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def vms():
    """A VMFactory whose VMs are killed after the test."""
    factory = VMFactory()
    yield factory
    factory.cleanup()
