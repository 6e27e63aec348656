"""Live migration of a backend whose disks move as the engine's stream
disks (bhyve's zvols, migration/zvols.py): the checks, and the zfs side
started, handed to the engine and ended on both hosts."""

from unittest import mock

import pytest
from nova.compute.manager import ComputeManager

from nova import exception
from nova_bhyve.migration import data as mdata
from nova_bhyve.migration import live, zvols
from nova_bhyve.native.engine import Phase, Result

from .test_live_migration_driver import (  # noqa: F401 - env is a fixture
    UUID,
    _dest_check,
    _done,
    _migrate,
    _shared_data,
    _stats,
    env,
)


@pytest.fixture
def zenv(env):  # noqa: F811 - the fixture imported above
    env.drv.backend.stream_disks = True
    env.drv.backend.dataset = "zroot/nova"
    env.drv.backend.disk_paths.side_effect = AssertionError("a file disk check")
    zs = mock.Mock(tag="mig-0123456789ab", limits=None,
                   zvols={"disk": f"zroot/nova/{UUID}-disk",
                          "swap": f"zroot/nova/{UUID}-swap"})
    zs.open.return_value = [mock.sentinel.stream]
    env.drv.backend.migration_streams.return_value = zs
    env.zs = zs
    mdata.put(env.data, zvols.TAG_KEY, "mig-0123456789ab")
    return env


@pytest.mark.parametrize("shared", [False, True])
def test_the_zvols_always_move_and_get_a_snapshot_tag(zenv, tmp_path, shared):
    if shared:
        data = _dest_check(zenv, tmp_path, block_migration=None)
    else:
        data = _dest_check(zenv, tmp_path / "d", block_migration=None)
        zenv.drv.backend.instances_path = str(tmp_path)
    data = zenv.drv.check_can_live_migrate_source(None, zenv.inst, data)
    assert data.block_migration is True
    assert data.is_shared_instance_path is shared
    assert mdata.get(data, zvols.TAG_KEY).startswith("mig-")
    # Nova's cleanup: the source's runs; its disks go with destroy_disks
    # on a local path, or through post_live_migration on a shared one
    assert ComputeManager._live_migration_cleanup_flags(None, data) == \
        (True, not shared)


def test_asking_not_to_move_the_zvols_says_what_to_do(zenv, tmp_path):
    data = _dest_check(zenv, tmp_path, block_migration=False)
    with pytest.raises(exception.InvalidSharedStorage,
                       match=r"zvols under \[bhyve\] zfs_dataset \(zroot/nova\)"
                             r".*even with the shared instances_path.*"
                             r"--block-migration"):
        zenv.drv.check_can_live_migrate_source(None, zenv.inst, data)


def test_the_source_hands_its_zvols_to_the_engine_and_drops_the_snapshots(zenv):
    zenv.send.script = [_done()]
    _migrate(zenv)
    zenv.post.assert_called_once()
    zenv.drv.backend.migration_streams.assert_called_once_with(
        UUID, "mig-0123456789ab", False)
    assert zenv.zs.limits is None               # a sender's are not bounded
    assert zenv.engine.send.call_args.kwargs["streams"] == [mock.sentinel.stream]
    assert not zenv.engine.send.call_args.kwargs["disks"]     # no file disk
    assert zenv.zs.mock_calls == [mock.call.open(), mock.call.release(),
                                  mock.call.finish(True)]


def test_a_failed_source_keeps_its_zvols(zenv):
    zenv.send.script = [_stats(result=Result.FAILED, phase=Phase.FAILED,
                               error="stream 0: its receiver reports: no")]
    _migrate(zenv)
    zenv.recover.assert_called_once()
    zenv.zs.finish.assert_called_once_with(False)


def test_an_engine_that_refuses_to_start_ends_the_zfs_side(zenv):
    zenv.engine.send.side_effect = live.MigrationError("bad parameter")
    _migrate(zenv)
    zenv.recover.assert_called_once()
    zenv.zs.finish.assert_called_once_with(False)


def test_the_destination_receives_into_zvols_it_does_not_make(zenv, monkeypatch):
    monkeypatch.setattr(live, "inbound_addr", lambda: "127.0.0.1")
    zenv.drv.backend.list_machines.return_value = []
    zenv.engine.receive.return_value.port = 40000
    data = _shared_data(zenv)
    data.block_migration = True
    mdata.put(data, zvols.TAG_KEY, "mig-0123456789ab")
    zenv.drv.pre_live_migration(None, zenv.inst, None, [], None, data)
    zenv.drv.backend.migration_streams.assert_called_once_with(
        UUID, "mig-0123456789ab", True)
    # a received zvol larger than the flavor allows fails the migration
    # (privsep_zfs checks each part's volsize against these)
    flavor = zenv.inst.flavor
    assert zenv.zs.limits == {"disk": flavor.root_gb << 30,
                              "swap": flavor.swap << 20}
    zenv.drv.backend.prepare_incoming_disks.assert_called_once()
    zenv.drv.backend.create.assert_not_called()
    zenv.drv.backend.adopt.assert_not_called()
    assert zenv.engine.receive.call_args.kwargs["streams"] == [
        mock.sentinel.stream]
    zenv.zs.release.assert_called_once()
    zenv.engine.receive.return_value.stats.return_value = _stats(
        result=Result.FAILED, committed=False, guest_runs_here=False)
    zenv.drv.rollback_live_migration_at_destination(
        None, zenv.inst, [], None, destroy_disks=False, migrate_data=data)
    zenv.zs.finish.assert_called_once_with(False)     # its zvols go


def test_a_committed_destination_drops_only_the_snapshots(zenv, monkeypatch):
    monkeypatch.setattr(live, "inbound_addr", lambda: "127.0.0.1")
    zenv.drv.backend.list_machines.return_value = []
    data = _shared_data(zenv)
    mdata.put(data, zvols.TAG_KEY, "mig-0123456789ab")
    zenv.drv.pre_live_migration(None, zenv.inst, None, [], None, data)
    zenv.engine.receive.return_value.stats.return_value = _done()
    zenv.drv.post_live_migration_at_destination(None, zenv.inst, [])
    zenv.zs.finish.assert_called_once_with(True)


def test_a_shared_path_source_destroys_the_zvols_that_left(zenv):
    zenv.drv.post_live_migration(None, zenv.inst, None, _shared_data(zenv))
    zenv.drv.backend.delete_files.assert_called_once_with(
        UUID, destroy_disks=False)
    zenv.drv.backend.destroy_moved_disks.assert_called_once_with(UUID)
