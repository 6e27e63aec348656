"""The bhyve backend with ``[bhyve] disk_layout = file``: disks as raw
files in the instance directory (machine/diskfiles.py), the privileged
helper recorded (FreeBSD not needed)."""

import json
import os
import types
from unittest import mock

import pytest

from nova import objects
from nova_bhyve.conf import CONF
from nova_bhyve.machine import argv as bhyve_argv
from nova_bhyve.machine import bhyve, images
from nova_bhyve.machine.base import DiskSpec, MachineError, MachineSpec

UUID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
IMAGE = b"MBR!" + b"\0" * 508 + b"\x55\xaa" + b"rootfs" * 1000


def file_backend(tmp_path, monkeypatch, instances="instances", host="host"):
    """A file-layout BhyveBackend on ``tmp_path/instances`` (which two
    backends may share) with its own runtime path; ``helper`` records the
    privileged calls of all such backends (zfs among them: none expected)."""
    CONF.set_override("disk_layout", "file", group="bhyve")
    CONF.set_override("zfs_dataset", None, group="bhyve")
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"NVRAM".ljust(128 << 10, b"\0"))
    CONF.set_override("uefi_vars_template", str(template), group="bhyve")
    helper = bhyve.privsep      # one recorder for the backends of a test
    if not isinstance(helper, mock.Mock):
        helper = mock.Mock()
        monkeypatch.setattr(bhyve, "privsep", helper)

    def fetch(context, image_id, path):
        with open(path, "wb") as f:
            f.write(IMAGE)
    monkeypatch.setattr(bhyve.images, "fetch_raw", fetch)
    be = bhyve.BhyveBackend(CONF, str(tmp_path / instances),
                            str(tmp_path / f"run-{host}"))
    be.helper = helper
    return be


@pytest.fixture
def backend(tmp_path, monkeypatch):
    yield file_backend(tmp_path, monkeypatch)
    for opt in ("disk_layout", "zfs_dataset", "uefi_vars_template"):
        CONF.clear_override(opt, group="bhyve")


def create(be, root_gb=2, swap_mb=64, eph_mb=128, image="img-1", uuid=UUID):
    """Create the guest with a root disk from ``image`` (None: blank)."""
    instance = types.SimpleNamespace(flavor=types.SimpleNamespace(
        root_gb=root_gb))
    disks = ((DiskSpec(name="swap", size_mb=swap_mb),) if swap_mb else ()) + \
        ((DiskSpec(name="eph0", size_mb=eph_mb),) if eph_mb else ())
    spec = MachineSpec(uuid=uuid, vcpus=1, memory_mb=512, disks=disks)
    meta = objects.ImageMeta.from_dict({"id": image} if image else {})
    return be.create(None, instance, spec, meta)


def test_disks_are_sparse_files_in_the_instance_directory(backend):
    spec = create(backend)
    folder = backend._dir(UUID)
    assert [(d.name, d.path, d.boot) for d in spec.disks] == [
        ("disk", f"{folder}/disk", True),
        ("swap", f"{folder}/disk.swap", False),
        ("eph0", f"{folder}/disk.eph0", False)]
    with open(f"{folder}/disk", "rb") as f:
        assert f.read(len(IMAGE)) == IMAGE      # the cached image's bytes
    assert os.path.getsize(f"{folder}/disk") == 2 << 30     # root_gb
    assert os.path.getsize(f"{folder}/disk.swap") == 64 << 20
    assert os.path.getsize(f"{folder}/disk.eph0") == 128 << 20
    for name in ("disk", "disk.swap", "disk.eph0"):     # sparse
        assert os.stat(f"{folder}/{name}").st_blocks * 512 < 1 << 20
    with open(f"{folder}/nvram.fd", "rb") as f:
        assert f.read(6) == b"NVRAM\0"
    # the image stays cached beside the instance directories, no zvol made
    cached = os.path.join(backend.instances_path, "_base",
                          images.cache_name("img-1"))
    assert os.path.getsize(cached) == len(IMAGE)
    backend.helper.zfs.assert_not_called()
    assert backend.disk_paths(UUID) == {d.name: d.path for d in spec.disks}
    assert backend.disk_path(UUID) == f"{folder}/disk"


def test_only_what_travels_with_the_guest_is_in_the_instance_directory(
        backend, monkeypatch):
    create(backend)
    monkeypatch.setattr(backend, "_running", lambda uuid: False)
    backend.start_incoming(UUID)        # a migration's destination
    assert sorted(os.listdir(backend._dir(UUID))) == [
        "disk", "disk.eph0", "disk.swap", "nvram.fd"]
    assert "machine.json" in os.listdir(backend._run_dir(UUID))
    assert not backend._run_dir(UUID).startswith(backend.instances_path)


def test_file_disks_on_the_bhyve_command_line(backend):
    """Each file a virtio-blk slot after the root disk (bhyve(8): ``-s
    slot,virtio-blk,path``), accepted by the helper's checks, which also
    look at the files themselves."""
    spec = create(backend)
    argv = backend._argv(spec)
    folder = backend._dir(UUID)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-s"][2:5] == [
        f"2,virtio-blk,{folder}/disk", f"3,virtio-blk,{folder}/disk.swap",
        f"4,virtio-blk,{folder}/disk.eph0"]
    assert bhyve_argv.validate(argv, backend.paths) == UUID
    bhyve_argv.check_guest_files(argv, backend.paths)
    os.link(f"{folder}/disk.swap", f"{folder}/swap-link")
    with pytest.raises(bhyve_argv.ArgvError, match="disk.swap has 2 hard"):
        bhyve_argv.check_guest_files(argv, backend.paths)


def test_a_blank_root_disk_and_an_image_of_root_gb_0(backend, tmp_path):
    create(backend, root_gb=0, swap_mb=0, eph_mb=0, image=None)
    assert os.path.getsize(backend._path(UUID, "disk")) == 1 << 30
    other = "1a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
    create(backend, root_gb=0, swap_mb=0, eph_mb=0, uuid=other)
    # the image's size, rounded up to whole sectors (as bhyve sees it)
    assert len(IMAGE) % 512 and os.path.getsize(
        backend._path(other, "disk")) == -(-len(IMAGE) // 512) * 512


def test_create_again_keeps_the_guests_data_and_remakes_a_resized_swap(
        backend):
    create(backend)
    for name, data in (("disk", b"root data"), ("disk.swap", b"old swap"),
                       ("disk.eph0", b"eph data"), ("nvram.fd", b"boot")):
        with open(backend._path(UUID, name), "r+b") as f:
            f.write(data)
    # a revert or resize here: a bigger swap, no ephemeral disk any more
    create(backend, root_gb=3, swap_mb=32, eph_mb=0)
    with open(backend._path(UUID, "disk"), "rb") as f:
        assert f.read(9) == b"root data"
    with open(backend._path(UUID, "nvram.fd"), "rb") as f:
        assert f.read(5) == b"bootM"    # written over "NVRAM", kept
    with open(backend._path(UUID, "disk.swap"), "rb") as f:
        assert f.read(8) == b"\0" * 8
    assert os.path.getsize(backend._path(UUID, "disk.swap")) == 32 << 20
    assert not os.path.exists(backend._path(UUID, "disk.eph0"))
    backend.grow_disk(UUID, 3 << 30)
    assert os.path.getsize(backend._path(UUID, "disk")) == 3 << 30
    backend.grow_disk(UUID, 1 << 30)            # never shrinks
    assert os.path.getsize(backend._path(UUID, "disk")) == 3 << 30


def test_migration_traits_of_the_file_layout(backend):
    assert backend.can_live_migrate and backend.can_migrate
    assert backend.stream_disks is False
    assert backend.migration_type() == "BhyveBackend-files"
    reason = backend.live_disk_copy_blocker
    assert backend.instances_path in reason
    assert "bhyve keeps no log of the blocks a running guest writes" in reason
    assert "share instances_path" in reason and "disk_layout = zvol" in reason
    with pytest.raises(MachineError, match="cannot receive zvols.*same "
                                           "disk_layout"):
        backend.cold_streams(UUID, "mig-0123456789ab", ["disk"], True)
    create(backend)
    assert backend.instance_files(UUID) == {
        "nvram.fd": backend._path(UUID, "nvram.fd")}


def test_adopt_takes_the_files_of_a_shared_instances_path(
        backend, tmp_path, monkeypatch):
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=512,
                       disks=(DiskSpec(name="swap", size_mb=64),))
    instance = types.SimpleNamespace(flavor=types.SimpleNamespace(root_gb=2))
    with pytest.raises(MachineError, match="does not share"):
        backend.adopt(instance, spec)
    create(backend, eph_mb=0)
    with open(backend._path(UUID, "disk"), "r+b") as f:
        f.write(b"the source's data")
    there = file_backend(tmp_path, monkeypatch, host="other")
    assert there.has_disks(UUID)
    spec = there.adopt(instance, spec)
    assert there.adopted(UUID) and not backend.adopted(UUID)
    assert spec.disks[0].path == backend._path(UUID, "disk")
    with open(backend._path(UUID, "disk"), "rb") as f:
        assert f.read(17) == b"the source's data"
    record = json.load(open(there._run(UUID, "machine.json")))
    assert record["adopted"] is True
    # the other host forgets it, keeping the disks
    there.delete_files(UUID, destroy_disks=False)
    assert not os.path.exists(there._run_dir(UUID))
    assert os.path.exists(backend._path(UUID, "disk"))
    backend.delete_files(UUID)
    assert not os.path.exists(backend._dir(UUID))
    backend.helper.zfs.assert_not_called()


def test_zvol_layout_adopts_nothing(backend):
    CONF.set_override("disk_layout", "zvol", group="bhyve")
    CONF.set_override("zfs_dataset", "zroot/nova", group="bhyve")
    zvols = bhyve.BhyveBackend(CONF, backend.instances_path,
                               backend.runtime_path)
    assert zvols.stream_disks and zvols.migration_type() == "BhyveBackend"
    assert zvols.live_disk_copy_blocker is None
    assert not zvols.has_disks(UUID)
    with pytest.raises(MachineError, match="nothing to adopt"):
        zvols.adopt(None, MachineSpec(uuid=UUID, vcpus=1, memory_mb=512))


def test_snapshot_copies_the_root_file_with_the_guest_paused(
        backend, monkeypatch):
    create(backend)
    with open(backend._path(UUID, "disk"), "r+b") as f:
        f.write(b"snap me")
    calls = []
    monkeypatch.setattr(backend, "state", lambda uuid: bhyve.MachineState.RUNNING)
    monkeypatch.setattr(backend, "pause", lambda uuid: calls.append("pause"))
    monkeypatch.setattr(backend, "unpause",
                        lambda uuid: calls.append("unpause"))
    with backend.snapshot_disk(UUID) as copy:
        assert calls == ["pause", "unpause"]
        assert copy == backend._run(UUID, "snapshot.raw")   # not shared
        with open(copy, "rb") as f:
            assert f.read(7) == b"snap me"
        assert os.path.getsize(copy) == 2 << 30
    assert not os.path.exists(copy)


def test_host_facts_measure_the_instances_path(backend, monkeypatch):
    values = {"hw.pagesize": "4096", "hw.physmem": str(8 << 30),
              "vm.stats.vm.v_free_count": "1000",
              "vm.stats.vm.v_inactive_count": "0", "hw.ncpu": "4",
              "kern.osreldate": "1500000", "hw.machine_arch": "amd64",
              "hw.model": "cpu"}
    monkeypatch.setattr(bhyve, "sysctl", values.__getitem__)
    execute = mock.Mock(side_effect=AssertionError("zfs asked"))
    monkeypatch.setattr(bhyve.processutils, "execute", execute)
    os.makedirs(backend.instances_path)
    facts = backend.host_facts()
    st = os.statvfs(backend.instances_path)
    assert facts.disk_gb == st.f_frsize * st.f_blocks >> 30
    assert facts.vcpus == 4 and facts.memory_mb == 8192


def test_init_host_needs_no_zfs_dataset(backend, monkeypatch, tmp_path):
    monkeypatch.setattr(bhyve.sys, "platform", "freebsd15")
    seen = []
    real_isfile = os.path.isfile
    monkeypatch.setattr(bhyve.os.path, "isfile", lambda p: seen.append(p) or (
        True if p.startswith("/usr") or p.startswith("/sbin") else
        real_isfile(p)))
    monkeypatch.setattr(bhyve.os.path, "isdir", lambda p: p != "/dev/vmm")
    with pytest.raises(MachineError, match="/dev/vmm is missing"):
        backend.init_host("host")
    assert CONF.bhyve.zfs_path not in seen      # zfs(8) not required
