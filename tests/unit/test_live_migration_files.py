"""Live migration between bhyve hosts with ``[bhyve] disk_layout = file``
(real backends, the helper and the engine recorded): over a shared
instances path only memory and device state move; over a local one the
source's check refuses, saying what to change."""

import os
from unittest import mock

import pytest

from nova import exception
from nova_bhyve.conf import CONF
from nova_bhyve.machine import bhyve
from nova_bhyve.migration import data as mdata
from nova_bhyve.migration import live, zvols

from .conftest import host_facts
from .test_bhyve_file_layout import create, file_backend
from .test_live_migration_driver import (  # noqa: F401 - env is a fixture
    UUID,
    _done,
    env,
)

INFO = {"hypervisor_type": "bhyve", "hypervisor_version": 1,
        "cpu_info": "{}", "disk_available_least": 100}


@pytest.fixture
def hosts(env, make_driver, tmp_path, monkeypatch):  # noqa: F811
    """(source, destination) drivers on file-layout bhyve backends; the
    guest was created and runs on the source."""
    src, dst = env.drv, make_driver()
    src._host, dst._host = "src", "dst"
    for drv, host in ((src, "src"), (dst, "dst")):
        drv.backend = file_backend(tmp_path, monkeypatch, host=host)
        drv.backend.host_facts = host_facts
    env.flags(live_migration_without_dirty_log="warm")
    create(src.backend, swap_mb=64, eph_mb=0, uuid=UUID)
    with open(src.backend._path(UUID, "disk"), "r+b") as f:
        f.write(b"written by the guest")
    alive = {"v": True}             # until post_live_migration kills it
    monkeypatch.setattr(src.backend, "_running", lambda uuid: alive["v"])
    src.backend.helper.signal_guest.side_effect = \
        lambda uuid, name: alive.update(v=name != "KILL")
    monkeypatch.setattr(src.backend, "_child_pid", lambda uuid: 4242)
    monkeypatch.setattr(live, "inbound_addr", lambda: "127.0.0.1")
    monkeypatch.setattr(bhyve.zvolmove, "ZvolStreams", mock.Mock(
        side_effect=AssertionError("a zfs stream was opened")))
    env.engine.receive.return_value.port = 40000
    env.inst.flavor.swap = 64
    yield src, dst
    dst._incoming.clear()
    for opt in ("disk_layout", "zfs_dataset", "uefi_vars_template"):
        CONF.clear_override(opt, group="bhyve")


def _checks(src, dst, inst, **kw):
    data = dst.check_can_live_migrate_destination(None, inst, INFO, INFO, **kw)
    try:
        return src.check_can_live_migrate_source(None, inst, data)
    finally:
        dst.cleanup_live_migration_destination_check(None, data)


def _snapshot(folder):
    return {n: (os.stat(os.path.join(folder, n)).st_ino,
                open(os.path.join(folder, n), "rb").read(64))
            for n in sorted(os.listdir(folder))}


@pytest.mark.parametrize("asked", [None, False])
def test_a_shared_instances_path_moves_only_memory_and_device_state(
        env, hosts, asked):  # noqa: F811
    src, dst = hosts
    folder = src.backend._dir(UUID)
    before = _snapshot(folder)
    data = _checks(src, dst, env.inst, block_migration=asked)
    assert data.is_shared_instance_path is True
    assert data.block_migration is False
    assert mdata.get(data, zvols.TAG_KEY) is None       # no zfs snapshot
    assert mdata.get(data, "mode") == "warm"
    data.migration = env.data.migration

    dst.pre_live_migration(None, env.inst, None, [], None, data)
    kwargs = env.engine.receive.call_args.kwargs
    assert kwargs["disks"] == [] and tuple(kwargs["streams"]) == ()
    assert kwargs["vmm_target"].startswith(f"{UUID},restore=")
    assert dst.backend.adopted(UUID)
    assert [d.path for d in dst.backend.recorded_spec(UUID).disks] == [
        f"{folder}/disk", f"{folder}/disk.swap"]

    env.send.script = [_done()]
    src.live_migration(mock.sentinel.ctx, env.inst, "dst", env.post,
                       env.recover, False, data)
    env.post.assert_called_once()
    kwargs = env.engine.send.call_args.kwargs
    assert kwargs["disks"] == [] and kwargs["detached_disks"] == []
    assert tuple(kwargs["streams"]) == ()
    src.post_live_migration(None, env.inst, None, data)
    # the source's own files go; the disks, on the shared path, are as
    # they were (the same files: no byte of them moved)
    assert not os.path.exists(src.backend._run_dir(UUID))
    assert _snapshot(folder) == before
    assert src.backend.helper is dst.backend.helper
    src.backend.helper.zfs.assert_not_called()


@pytest.mark.parametrize("asked", [None, True])
def test_a_local_instances_path_is_refused_with_what_to_change(
        env, hosts, tmp_path, monkeypatch, asked):  # noqa: F811
    src, dst = hosts
    dst.backend = file_backend(tmp_path, monkeypatch, instances="elsewhere",
                               host="dst")
    dst.backend.host_facts = host_facts
    os.makedirs(dst.backend.instances_path)
    with pytest.raises(exception.InvalidSharedStorage,
                       match=r"disk_layout = file, and bhyve keeps no log of "
                             r"the blocks a running guest writes.*share "
                             r"instances_path.*disk_layout = zvol"):
        _checks(src, dst, env.inst, block_migration=asked)
    env.engine.receive.assert_not_called()
    env.engine.send.assert_not_called()


def test_hosts_of_different_disk_layouts_refuse(env, hosts):  # noqa: F811
    src, dst = hosts
    CONF.set_override("disk_layout", "zvol", group="bhyve")
    CONF.set_override("zfs_dataset", "zroot/nova", group="bhyve")
    dst.backend = bhyve.BhyveBackend(CONF, src.backend.instances_path,
                                     dst.backend.runtime_path)
    dst.backend.host_facts = host_facts
    with pytest.raises(exception.MigrationPreCheckError,
                       match="BhyveBackend'.*BhyveBackend-files'.*same "
                             r"backend and \[bhyve\] disk_layout"):
        _checks(src, dst, env.inst, block_migration=None)
