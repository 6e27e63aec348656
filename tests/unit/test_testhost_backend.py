"""The test-host backend: taps through the privileged helper, disk files."""

import os
import stat
import types
from unittest import mock

import pytest
from oslo_concurrency import processutils

from nova import objects
from nova_bhyve import privsep
from nova_bhyve.conf import CONF
from nova_bhyve.machine import testhost
from nova_bhyve.machine.base import (
    DiskSpec,
    MachineError,
    MachineSpec,
    MachineState,
    NicSpec,
)

UUID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
NICS = (NicSpec("v1", "tap0a1b2c3d-4e", "fa:16:3e:01:02:03", "nbr3f2a9c1e7b4"),
        NicSpec("v2", "tap99999999-88", "fa:16:3e:09:09:09", ""))


@pytest.fixture
def backend(tmp_path, monkeypatch):
    helper = mock.Mock(HelperStartError=privsep.HelperStartError,
                       PrivilegeError=privsep.PrivilegeError)
    monkeypatch.setattr(testhost, "privsep", helper)
    be = testhost.TestHostBackend(CONF, str(tmp_path))
    be.helper = helper
    return be


def test_plug_and_unplug_every_nic(backend):
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=64, nics=NICS)
    backend.plug_vifs(spec)
    assert backend.helper.plug_tap_linux.call_args_list == [
        mock.call("tap0a1b2c3d-4e", "nbr3f2a9c1e7b4", "fa:16:3e:01:02:03"),
        mock.call("tap99999999-88", "", "fa:16:3e:09:09:09")]
    backend.unplug_vifs(spec)
    assert backend.helper.unplug_tap_linux.call_args_list == [
        mock.call("tap0a1b2c3d-4e", "nbr3f2a9c1e7b4"),
        mock.call("tap99999999-88", "")]


def test_no_nics_touch_nothing_privileged(backend):
    backend.plug_vifs(MachineSpec(uuid=UUID, vcpus=1, memory_mb=64))
    backend.unplug_vifs(MachineSpec(uuid=UUID, vcpus=1, memory_mb=64))
    assert backend.helper.mock_calls == []


def test_a_helper_that_cannot_start_names_the_setting(backend):
    backend.helper.plug_tap_linux.side_effect = \
        privsep.HelperStartError("sudo: not found")
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=64, nics=NICS[:1])
    with pytest.raises(MachineError, match=r"sudo: not found.*\[nova_bhyve_"
                                           r"privileged\] helper_command"):
        backend.plug_vifs(spec)


def test_a_failed_ip_command_is_a_machine_error(backend):
    backend.helper.unplug_tap_linux.side_effect = \
        processutils.ProcessExecutionError(stderr="RTNETLINK: busy")
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=64, nics=NICS[:1])
    with pytest.raises(MachineError, match="cannot unplug tap0a1b2c3d-4e"):
        backend.unplug_vifs(spec)


def _flavor_instance(root_gb=1):
    return types.SimpleNamespace(
        uuid=UUID, flavor=types.SimpleNamespace(root_gb=root_gb))


def _create(backend, *extras):
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=64, disks=extras)
    return backend.create(None, _flavor_instance(), spec,
                          objects.ImageMeta.from_dict({}))


def test_swap_and_ephemeral_disks_are_sparse_files_in_the_instance_dir(
        backend, tmp_path):
    spec = _create(backend, DiskSpec(name="swap", size_mb=512),
                   DiskSpec(name="eph0", size_mb=2048))
    d = tmp_path / UUID
    assert [(x.name, x.path, x.boot) for x in spec.disks] == [
        ("disk", str(d / "disk"), True), ("swap", str(d / "disk.swap"), False),
        ("eph0", str(d / "disk.eph0"), False)]
    assert os.path.getsize(d / "disk.swap") == 512 << 20
    assert os.path.getsize(d / "disk.eph0") == 2 << 30
    assert os.stat(d / "disk.eph0").st_blocks == 0      # sparse
    assert backend.disk_paths(UUID) == {
        "disk": str(d / "disk"), "swap": str(d / "disk.swap"),
        "eph0": str(d / "disk.eph0")}
    assert backend.diagnostics(UUID)["disks"] == list(
        backend.disk_paths(UUID).values())


def test_create_again_keeps_ephemeral_data_and_remakes_a_resized_swap(
        backend, tmp_path):
    _create(backend, DiskSpec(name="swap", size_mb=16),
            DiskSpec(name="eph0", size_mb=16))
    d = tmp_path / UUID
    for name in ("disk.swap", "disk.eph0"):
        with open(d / name, "r+b") as f:
            f.write(b"data")
    _create(backend, DiskSpec(name="swap", size_mb=16),
            DiskSpec(name="eph0", size_mb=16))
    assert (d / "disk.swap").read_bytes()[:4] == b"data"     # a revert
    _create(backend, DiskSpec(name="swap", size_mb=32),
            DiskSpec(name="eph0", size_mb=16))
    assert (d / "disk.swap").read_bytes()[:4] == b"\0\0\0\0"
    assert os.path.getsize(d / "disk.swap") == 32 << 20
    assert (d / "disk.eph0").read_bytes()[:4] == b"data"
    _create(backend, DiskSpec(name="eph0", size_mb=16))      # swap dropped
    assert not (d / "disk.swap").exists()


def test_grow_an_ephemeral_disk_and_delete_keeping_or_not_the_disks(
        backend, tmp_path):
    _create(backend, DiskSpec(name="eph0", size_mb=16))
    backend.grow_disk(UUID, 32 << 20, "eph0")
    backend.grow_disk(UUID, 8 << 20, "eph0")            # never shrinks
    d = tmp_path / UUID
    assert os.path.getsize(d / "disk.eph0") == 32 << 20
    run = backend._run_dir(UUID)
    assert os.listdir(run) == ["machine.json"]
    with open(backend.console_log_path(UUID), "w") as f:
        f.write("x")
    backend.delete_files(UUID, destroy_disks=False)
    assert sorted(os.listdir(d)) == ["disk", "disk.eph0"]
    assert not os.path.exists(run)
    backend.delete_files(UUID, destroy_disks=True)
    assert not d.exists()


# -- runtime files outside instances_path (shared storage) ------------------
def test_runtime_files_live_in_runtime_path_disks_in_instances_path(
        backend, tmp_path, runtime_path):
    _create(backend, DiskSpec(name="swap", size_mb=1))
    assert sorted(os.listdir(tmp_path / UUID)) == ["disk", "disk.swap"]
    assert os.listdir(runtime_path / UUID) == ["machine.json"]
    run = str(runtime_path / UUID)
    assert backend.console_log_path(UUID) == f"{run}/console.log"
    assert backend.migration_vmm(UUID) == ("testhost", f"{run}/control.sock")
    argv = backend._boot_argv(backend._record(UUID)["spec"])
    assert argv[argv.index("--rundir") + 1] == run


def test_a_guest_recorded_by_another_host_is_not_listed(backend, tmp_path,
                                                        runtime_path):
    """Two hosts share instances_path: each knows only its own guests."""
    other = testhost.TestHostBackend(CONF, str(tmp_path),
                                     str(tmp_path.parent / "other-run"))
    _create(backend)
    assert backend.list_machines() == [UUID]
    assert other.list_machines() == []
    assert other.has_disks(UUID)        # the disk is visible there
    spec = other.adopt(_flavor_instance(),
                       MachineSpec(uuid=UUID, vcpus=1, memory_mb=64))
    assert spec.disks[0].path == str(tmp_path / UUID / "disk")
    assert other.list_machines() == [UUID]
    other.delete_files(UUID, destroy_disks=False)
    assert other.list_machines() == []
    assert backend.list_machines() == [UUID]
    assert os.path.exists(tmp_path / UUID / "disk")


def test_adopt_refuses_a_missing_disk(backend):
    with pytest.raises(MachineError, match="does not share"):
        backend.adopt(_flavor_instance(),
                      MachineSpec(uuid=UUID, vcpus=1, memory_mb=64))
    assert backend.list_machines() == []


def test_create_keeps_an_existing_root_disk(backend, tmp_path, monkeypatch):
    """An evacuation onto shared storage: the disk is used, not re-imaged."""
    (tmp_path / UUID).mkdir()
    (tmp_path / UUID / "disk").write_bytes(b"guest data")
    monkeypatch.setattr(backend.cache, "get", mock.Mock(
        side_effect=AssertionError("image fetched")))
    meta = objects.ImageMeta.from_dict({"id": "1f2e3d4c-0000-4000-8000-"
                                              "000000000001"})
    backend.create(None, _flavor_instance(),
                   MachineSpec(uuid=UUID, vcpus=1, memory_mb=64), meta)
    assert (tmp_path / UUID / "disk").read_bytes() == b"guest data"


def test_runtime_path_is_claimed_by_one_host(backend, runtime_path):
    backend.prepare_runtime_path("host1")
    assert (runtime_path / "host").read_text() == "host1\n"
    backend.prepare_runtime_path("host1")
    with pytest.raises(MachineError, match="belongs to host 'host1'"):
        backend.prepare_runtime_path("host2")


def test_runtime_path_is_made_private(tmp_path):
    path = tmp_path / "fresh" / "run"
    be = testhost.TestHostBackend(CONF, str(tmp_path / "inst"), str(path))
    be.prepare_runtime_path("host1")
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o027 == 0


@pytest.mark.parametrize("where", ["inside", "same", "link"])
def test_runtime_path_must_be_local_and_real(tmp_path, where):
    inst = tmp_path / "inst"
    inst.mkdir()
    path = {"inside": inst / "run", "same": inst,
            "link": tmp_path / "link"}[where]
    if where == "link":
        (tmp_path / "real").mkdir()
        path.symlink_to(tmp_path / "real")
    be = testhost.TestHostBackend(CONF, str(inst), str(path))
    with pytest.raises(MachineError, match="inside|symbolic link"):
        be.prepare_runtime_path("host1")
    assert not (inst / "run").exists()


def test_legacy_records_are_reported(backend, tmp_path):
    (tmp_path / UUID).mkdir()
    (tmp_path / UUID / "machine.json").write_text("{}")
    assert backend.legacy_records() == [UUID]
    assert backend.list_machines() == []


def test_adopted_is_recorded_until_the_guest_is_ours(backend, tmp_path,
                                                     monkeypatch):
    _create(backend)
    assert not backend.adopted(UUID)
    backend.adopt(_flavor_instance(),
                  MachineSpec(uuid=UUID, vcpus=1, memory_mb=64))
    assert backend.adopted(UUID)
    monkeypatch.setattr(backend, "state", lambda uuid: MachineState.RUNNING)
    backend.finish_incoming(UUID)
    assert not backend.adopted(UUID)
    assert backend._record(UUID)["intent"] == "running"


# -- the root disk as the VM's ATA disk --------------------------------------
@pytest.mark.parametrize("size,attached", [
    (1 << 30, True), (64 << 10, True), (4096, True),
    (0, False), (2048, False), (65536 + 100, False)])
def test_the_root_disk_is_attached_when_its_size_suits_the_drive(
        backend, tmp_path, size, attached):
    _create(backend, DiskSpec(name="swap", size_mb=1))
    root = tmp_path / UUID / "disk"
    os.truncate(root, size)
    spec = backend._record(UUID)["spec"]
    for argv in (backend._boot_argv(spec),
                 backend._boot_argv(spec, incoming=True)):
        assert ("--disk" in argv) is attached
        if attached:
            assert argv[argv.index("--disk") + 1] == str(root)
        assert str(tmp_path / UUID / "disk.swap") not in argv


@pytest.mark.parametrize("disk_size,detached", [
    ("1073741824", ["swap", "eph0"]), ("0", ["disk", "swap", "eph0"])])
def test_detached_disks_are_those_the_running_vm_has_not_open(
        backend, monkeypatch, disk_size, detached):
    _create(backend, DiskSpec(name="swap", size_mb=1),
            DiskSpec(name="eph0", size_mb=1))
    client = mock.MagicMock()
    client.__enter__.return_value.status.return_value = {
        "state": "running", "disk_size": disk_size}
    monkeypatch.setattr(backend, "_client", lambda uuid: client)
    assert backend.detached_disks(UUID) == detached
