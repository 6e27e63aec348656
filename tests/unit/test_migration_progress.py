"""A migration's progress in Nova's Migration and instance objects."""

import types
from unittest import mock

from nova_bhyve.migration import progress

MiB = 1 << 20


def _stats(**kw):
    base = dict(round=2, mem_total=256 * MiB, bytes_transferred=300 * MiB,
                bytes_remaining=64 * MiB, finished=False, committed=False,
                disk_total=0, disk_blocks=0, dirty_blocks=0)
    base.update(kw)
    return types.SimpleNamespace(**base)


def _objects(migration_save=None, instance_save=None):
    migration = types.SimpleNamespace(save=mock.Mock(side_effect=migration_save))
    instance = types.SimpleNamespace(save=mock.Mock(side_effect=instance_save),
                                     progress=0)
    return instance, migration


def test_memory_counters_and_the_instance_progress_are_saved():
    instance, migration = _objects()
    progress.report(instance, migration, _stats())
    assert (migration.memory_total, migration.memory_processed,
            migration.memory_remaining) == (256 * MiB, 300 * MiB, 64 * MiB)
    assert not hasattr(migration, "disk_total")     # no disk moved
    assert instance.progress == 75
    migration.save.assert_called_once_with()
    instance.save.assert_called_once_with()


def test_a_zero_is_stored_as_none():
    """Nova's API schema allows null or at least 1 for these fields."""
    instance, migration = _objects()
    progress.report(instance, migration,
                    _stats(finished=True, committed=True, bytes_remaining=0))
    assert migration.memory_remaining is None
    assert instance.progress == 100


def test_disk_counters_are_written_when_disks_move():
    instance, migration = _objects()
    progress.report(instance, migration,
                    _stats(disk_total=64 * MiB, disk_blocks=4000, dirty_blocks=3))
    assert (migration.disk_total, migration.disk_processed,
            migration.disk_remaining) == (64 * MiB, 4000 * 4096, 3 * 4096)


def test_a_failed_save_never_fails_the_migration():
    instance, migration = _objects(migration_save=RuntimeError("db gone"),
                                   instance_save=RuntimeError("db gone"))
    progress.report(instance, migration, _stats())
    assert instance.progress == 75
    instance.save.assert_called_once_with()
