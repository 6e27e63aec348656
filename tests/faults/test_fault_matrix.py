"""A few cells of the fault matrix (the whole one: doc/faults.md)."""

import os

import pytest

from benchmarks.vsqemu import netns
from tests.faults.harness import Hosts
from tests.functional.conftest import VMFactory, needs_kvm

pytestmark = [needs_kvm, pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces need root")]


@pytest.fixture(scope="module")
def hosts():
    """One stress guest on two namespace hosts, shared by the cells."""
    vms = VMFactory()
    try:
        with netns.Net() as net:
            h = Hosts(net, vms)
            h.boot()
            yield h
    finally:
        vms.cleanup()


@pytest.mark.parametrize("fault,phase,moved,kind", [
    (None, None, True, ""),
    ("cancel", "precopy", False, "CANCELLED"),
    ("kill_dest", "switchover", False, "PEER_GONE"),
    ("flip", "verify", False, "CORRUPT"),
    ("abort", "precopy", False, "PEER_GONE"),
    ("abort", "commit", False, "PEER_GONE"),
    ("flip", "commit", False, "REFUSED"),
    ("stall", "precopy", False, ""),  # either side may time out first
    ("stall", "verify", False, "TIMEOUT"),
    ("kill_dest", "commit", True, "PEER_GONE"),
    ("force", "iterate", True, ""),
    ("cancel", "commit", True, ""),
])
def test_fault_cell(hosts, fault, phase, moved, kind):
    hop = hosts.hop(fault, phase)
    assert hop.ok, hop.failures
    assert hop.moved == moved
    assert hop.src_error.startswith(kind), hop.src_error
