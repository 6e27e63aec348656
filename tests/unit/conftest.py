"""Fixtures shared by the unit tests: BhyveDrivers on recording backends,
and the engine's test build."""

import functools
import importlib.util
import os
import pathlib
import tempfile
from unittest import mock

import pytest

NATIVE = pathlib.Path(__file__).resolve().parents[2] / "nova_bhyve" / "native"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def native_build():
    """The source tree's build_engine.py (source lists, test build)."""
    return _load("_nb_build_engine", NATIVE / "build_engine.py")


@functools.lru_cache(maxsize=None)
def selftest_module():
    """The test build of the page codecs and src/test/'s shims: (ffi, lib)."""
    name = "_nb_engine_selftest"
    builder = native_build().selftest_builder(name)
    path = builder.compile(tmpdir=tempfile.mkdtemp(prefix="nb-selftest-"))
    module = _load(name, path)
    return module.ffi, module.lib


def memfd_with(size, writes=()):
    """A memfd of ``size`` bytes (guest RAM, as the test host hands it out)
    with ``writes``, (offset, bytes) pairs, written into it."""
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    for off, data in writes:
        os.pwrite(fd, data, off)
    return fd


def host_facts(**changes):
    """HostFacts of a roomy test host, with ``changes``."""
    from nova_bhyve.machine.base import HostFacts

    fields = dict(vcpus=8, memory_mb=32000, memory_mb_used=1000, disk_gb=500,
                  disk_gb_used=100, hypervisor_type="bhyve",
                  hypervisor_version=1501000, arch="x86_64", cpu_model="Test CPU")
    fields.update(changes)
    return HostFacts(**fields)


def new_driver():
    """A BhyveDriver whose backend is a recording autospec of Backend:
    ``create`` returns the spec it is given, ``host_facts`` host_facts(),
    and it copies disk files in a live migration (no blocker)."""
    import nova_bhyve.driver as bhyve_driver
    from nova_bhyve.machine.base import Backend

    drv = bhyve_driver.BhyveDriver(mock.Mock())
    drv.backend = mock.create_autospec(Backend, instance=True)
    drv.backend.create.side_effect = lambda ctx, inst, spec, meta: spec
    drv.backend.host_facts.return_value = host_facts()
    drv.backend.has_disks.return_value = False
    drv.backend.migration_type.return_value = "Backend"
    drv.backend.live_disk_copy_blocker = None
    drv.backend.instance_files.return_value = {}
    return drv


@pytest.fixture
def driver():
    """A BhyveDriver on a recording backend (see new_driver)."""
    return new_driver()


@pytest.fixture
def make_driver():
    """new_driver, for a test that needs more than one driver."""
    return new_driver


@pytest.fixture(autouse=True)
def runtime_path(tmp_path_factory):
    """``[bhyve] runtime_path`` in a fresh directory for every test (its
    default, below nova's state_path, is nova's package directory here)."""
    from nova_bhyve.conf import CONF

    path = tmp_path_factory.mktemp("run")
    CONF.set_override("runtime_path", str(path), group="bhyve")
    yield path
    CONF.clear_override("runtime_path", group="bhyve")
