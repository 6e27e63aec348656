"""OrphanWatch: incoming migrations whose source never calls back."""

import threading
import types
from unittest import mock

import pytest

from nova_bhyve.migration import live, orphans

UUID = "0c9a3f0e-5b1d-4c2e-8f3a-1d2e3f4a5b6c"
HOST = "host2"


def _incoming(committed=False, runs_here=False):
    stats = types.SimpleNamespace(committed=committed,
                                  guest_runs_here=runs_here)
    return live._Incoming(recv=mock.Mock(**{"stats.return_value": stats}))


def _instance(host="host1", task_state=None, deleted=False):
    return types.SimpleNamespace(uuid=UUID, host=host, task_state=task_state,
                                 deleted=deleted)


@pytest.fixture
def watch(monkeypatch):
    seen = types.SimpleNamespace(instance=_instance(), removed=[],
                                 released=[], closed=[])
    monkeypatch.setattr(orphans, "lookup", lambda ctx, uuid: seen.instance)
    monkeypatch.setattr(orphans, "release_port_bindings",
                        lambda ctx, inst, host: seen.released.append(host))
    monkeypatch.setattr(orphans, "close_events",
                        lambda ctx, inst, why: seen.closed.append(why))
    table = {}
    w = orphans.OrphanWatch(lambda: HOST, table, threading.Lock(),
                            lambda uuid, inc: seen.removed.append((uuid, inc)),
                            grace=60)
    seen.table, seen.check = table, lambda now: w.check(context="ctx", now=now)
    return seen


@pytest.mark.parametrize("instance,orphan", [
    (None, True),
    (_instance(deleted=True), True),
    (_instance(host="host1", task_state=None), True),
    (_instance(host="host1", task_state="migrating"), False),
    (_instance(host=HOST, task_state=None), False),
    (_instance(host=HOST, task_state="migrating"), False),
])
def test_is_orphan(instance, orphan):
    """Only a migration Nova has given up on, to another host, is orphaned."""
    assert orphans.is_orphan(instance, HOST) is orphan


def test_orphan_is_removed_after_the_grace_period(watch):
    """The source's compute restarted: Nova reset the instance and never
    asked this host for the rollback.  After the grace the VM goes, the
    port bindings of this host are deleted and the event says why."""
    inc = watch.table[UUID] = _incoming()
    watch.check(100.0)
    watch.check(159.0)
    assert watch.removed == [] and UUID in watch.table
    watch.check(160.0)
    assert watch.removed == [(UUID, inc)]
    assert UUID not in watch.table
    assert watch.released == [HOST]
    assert len(watch.closed) == 1
    assert "stays on host1" in watch.closed[0]
    assert "nova-compute stopped or restarted" in watch.closed[0]
    watch.check(300.0)
    assert len(watch.removed) == 1


def test_a_running_migration_is_never_reaped(watch):
    """task_state migrating: the source is still at work."""
    watch.instance = _instance(task_state="migrating")
    watch.table[UUID] = _incoming()
    for t in (0.0, 100.0, 1000.0):
        watch.check(t)
    assert watch.removed == []


def test_the_grace_restarts_when_the_migration_resumes(watch):
    """An orphan that stops being one (task state back to migrating) needs
    a whole new grace period."""
    watch.table[UUID] = _incoming()
    watch.check(0.0)
    watch.instance = _instance(task_state="migrating")
    watch.check(30.0)
    watch.instance = _instance()
    watch.check(61.0)
    watch.check(120.0)
    assert watch.removed == []
    watch.check(121.0)
    assert len(watch.removed) == 1


@pytest.mark.parametrize("committed,runs_here", [(True, False), (False, True)])
def test_a_handed_over_guest_is_never_reaped(watch, committed, runs_here):
    """The guest may run here: removing it could lose the only copy."""
    watch.table[UUID] = _incoming(committed, runs_here)
    watch.check(0.0)
    watch.check(1000.0)
    assert watch.removed == [] and UUID in watch.table


def test_a_late_rollback_wins(watch):
    """The rollback took the entry during the grace: nothing more to do."""
    watch.table[UUID] = _incoming()
    watch.check(0.0)
    del watch.table[UUID]
    watch.check(100.0)
    assert watch.removed == [] and watch.released == []


def test_a_new_migration_replaces_the_entry(watch):
    """A fresh pre_live_migration for the same instance is not the orphan."""
    watch.table[UUID] = _incoming()
    watch.check(0.0)
    watch.table[UUID] = _incoming()
    watch.instance = _instance(task_state="migrating")
    watch.check(100.0)
    assert watch.removed == []


def test_deleted_instance_is_reaped_without_touching_neutron(watch):
    """A deleted instance has no port bindings or events left to fix."""
    watch.instance = None
    watch.table[UUID] = _incoming()
    watch.check(0.0)
    watch.check(60.0)
    assert len(watch.removed) == 1
    assert watch.released == [] and watch.closed == []


@pytest.mark.parametrize("grace,interval", [(0, 0), (2, 1.0), (60, 15.0),
                                            (20, 5.0), (600, 15.0)])
def test_check_interval(grace, interval):
    """A quarter of the grace, between 1 and 15 s; 0 turns the check off."""
    assert orphans.check_interval(grace) == interval


def test_close_events_closes_only_open_engine_events(monkeypatch):
    """The open bhyve_live_migration_* event of the latest action."""
    evs = [types.SimpleNamespace(event="bhyve_live_migration_live",
                                 finish_time=None),
           types.SimpleNamespace(event="bhyve_live_migration_warm",
                                 finish_time="done"),
           types.SimpleNamespace(event="compute_live_migration",
                                 finish_time=None)]
    objs = mock.Mock()
    objs.InstanceActionList.get_by_instance_uuid.return_value = [
        types.SimpleNamespace(id=7)]
    objs.InstanceActionEventList.get_by_action.return_value = evs
    finish = mock.Mock()
    monkeypatch.setattr(orphans, "objects", objs)
    monkeypatch.setattr(orphans.events, "finish", finish)
    orphans.close_events("ctx", _instance(), "why")
    objs.InstanceActionEventList.get_by_action.assert_called_once_with(
        "ctx", 7)
    finish.assert_called_once_with("ctx", mock.ANY,
                                   "bhyve_live_migration_live", "why")


def test_release_port_bindings_failure_is_logged_not_raised(monkeypatch):
    """The VM is already gone; a Neutron error must not stop the watch."""
    api = mock.Mock()
    api.return_value.setup_networks_on_host.side_effect = RuntimeError("x")
    monkeypatch.setattr(orphans.neutron, "API", api)
    orphans.release_port_bindings("ctx", _instance(), HOST)
    api.return_value.setup_networks_on_host.assert_called_once_with(
        "ctx", mock.ANY, HOST, teardown=True)
