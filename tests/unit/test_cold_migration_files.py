"""Cold migration and resize between bhyve hosts with ``[bhyve]
disk_layout = file`` (real backends, the helper recorded): the disk files
and nvram.fd move through the real engine as the test host's files do; a
shared instances path moves nothing; a destination of the other layout
refuses."""

import json
import os
import types
from unittest import mock

import pytest

from nova import exception
from nova_bhyve.conf import CONF
from nova_bhyve.machine import bhyve
from nova_bhyve.migration import cold

from .test_bhyve_file_layout import create, file_backend
from .test_cold_migration_driver import (
    UUID,
    FakeComputeRPC,
    _flavor,
    _instance,
    _sha,
)

FLAVOR = dict(root_gb=0, ephemeral_gb=1, swap=8)


def _hosts(make_driver, tmp_path, monkeypatch, shared=False):
    """(source, destination) drivers on file-layout backends, the guest
    (root disk from the image, 8 MiB swap, 16 MiB ephemeral) on the source."""
    src, dst = make_driver(), make_driver()
    for drv, host in ((src, "src"), (dst, "dst")):
        drv.backend = file_backend(tmp_path, monkeypatch, host=host,
                                   instances="shared" if shared else host)
        os.makedirs(drv.backend.instances_path, exist_ok=True)
        drv._host = host
    src._compute_rpc = FakeComputeRPC({"dst": dst})
    monkeypatch.setattr(cold.ColdMigrationMixin, "_move", staticmethod(
        lambda ctx, inst: types.SimpleNamespace(source_compute="src",
                                                dest_compute="dst")))
    monkeypatch.setattr(cold, "inbound_addr", lambda: "127.0.0.1")
    monkeypatch.setattr(cold, "events", mock.Mock())
    monkeypatch.setattr(bhyve.zvolmove, "ZvolStreams", mock.Mock(
        side_effect=AssertionError("a zfs stream was opened")))
    create(src.backend, root_gb=0, swap_mb=8, eph_mb=16, uuid=UUID)
    for name, data in (("disk", b"root data"), ("disk.eph0", os.urandom(4096)),
                       ("nvram.fd", b"boot order")):
        with open(src.backend._path(UUID, name), "r+b") as f:
            f.seek(4096)
            f.write(data)
    return src, dst


@pytest.fixture
def clean_conf():
    yield
    for opt in ("disk_layout", "zfs_dataset", "uefi_vars_template"):
        CONF.clear_override(opt, group="bhyve")


def _shas(folder):
    return {n: _sha(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}


def test_the_files_and_nvram_move_through_the_engine(
        make_driver, tmp_path, monkeypatch, clean_conf):
    src, dst = _hosts(make_driver, tmp_path, monkeypatch)
    before = _shas(src.backend._dir(UUID))
    assert sorted(before) == ["disk", "disk.eph0", "disk.swap", "nvram.fd"]
    inst = _instance(flavor=_flavor(**FLAVOR))
    info = json.loads(src.migrate_disk_and_power_off(
        "ctx", inst, "192.0.2.9", _flavor(**FLAVOR), [], None, 0, 0))
    assert info == {"version": 2, "shared": False,
                    "disks": ["disk", "swap", "eph0"]}
    [(_host, request)] = src._compute_rpc.requests
    assert request[cold.REQUEST_KEY]["files"] == [
        "disk", "disk.swap", "disk.eph0", "nvram.fd"]
    assert "streams" not in request[cold.REQUEST_KEY]
    assert _shas(dst.backend._dir(UUID)) == before
    assert _shas(src.backend._dir(UUID)) == before      # kept for a revert

    dst.finish_migration("ctx", None, inst, json.dumps(info), [], None,
                         False, {}, power_on=False)
    folder = dst.backend._dir(UUID)
    assert [(d.name, d.path) for d in dst.backend.recorded_spec(UUID).disks] \
        == [("disk", f"{folder}/disk"), ("swap", f"{folder}/disk.swap"),
            ("eph0", f"{folder}/disk.eph0")]
    # create kept what arrived (the ephemeral disk at its received size)
    assert _shas(folder) == before
    assert not dst.backend.adopted(UUID)
    assert inst.system_metadata[cold.SHARED_KEY] == "0"
    src.backend.helper.zfs.assert_not_called()


def test_a_shared_instances_path_moves_no_byte_and_keeps_the_files(
        make_driver, tmp_path, monkeypatch, clean_conf):
    src, dst = _hosts(make_driver, tmp_path, monkeypatch, shared=True)
    folder = src.backend._dir(UUID)
    before = _shas(folder)
    inodes = {n: os.stat(os.path.join(folder, n)).st_ino for n in before}
    inst = _instance(flavor=_flavor(**FLAVOR))
    info = json.loads(src.migrate_disk_and_power_off(
        "ctx", inst, "192.0.2.9", _flavor(**FLAVOR), [], None, 0, 0))
    assert info == {"version": 2, "shared": True, "disks": []}
    dst.finish_migration("ctx", None, inst, json.dumps(info), [], None,
                         False, {}, power_on=False)
    assert dst.backend.adopted(UUID)
    assert inst.system_metadata[cold.SHARED_KEY] == "1"
    src.confirm_migration("ctx", types.SimpleNamespace(
        source_compute="src", dest_compute="dst"), inst, [])
    assert not os.path.exists(src.backend._run_dir(UUID))
    assert _shas(folder) == before
    assert {n: os.stat(os.path.join(folder, n)).st_ino for n in before} == \
        inodes
    src.backend.helper.zfs.assert_not_called()


def test_a_destination_keeping_zvols_refuses_disk_files(
        make_driver, tmp_path, monkeypatch, clean_conf):
    src, dst = _hosts(make_driver, tmp_path, monkeypatch)
    CONF.set_override("disk_layout", "zvol", group="bhyve")
    CONF.set_override("zfs_dataset", "zroot/nova", group="bhyve")
    dst.backend = bhyve.BhyveBackend(CONF, dst.backend.instances_path,
                                     dst.backend.runtime_path)
    with pytest.raises(exception.InstanceFaultRollback) as err:
        src.migrate_disk_and_power_off(
            "ctx", _instance(vm_state="stopped", flavor=_flavor(**FLAVOR)),
            "192.0.2.9", _flavor(**FLAVOR), [])
    assert "sends its disks as files and dst keeps them as zvols: both " \
        "hosts need the same [bhyve] disk_layout" in str(
            err.value.inner_exception)
    assert not os.path.exists(dst.backend._dir(UUID))
