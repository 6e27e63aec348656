"""BhyveDriver.live_migration against a scripted engine: every ending."""

import json
import logging
import threading
import types
from unittest import mock

import pytest

import nova_bhyve.driver as bhyve_driver
from nova import exception, objects
from nova_bhyve import polling
from nova_bhyve.machine.base import HostFacts
from nova_bhyve.migration import checks, live
from nova_bhyve.migration import data as mdata
from nova_bhyve.native.engine import (
    ErrorKind,
    MigrationError,
    Mode,
    Phase,
    Result,
    RoundStats,
)

UUID = "3b0f6c9e-8d2a-4f1b-9c3e-5a6b7c8d9e0f"
CONF = bhyve_driver.CONF
MiB = 1 << 20


def _rounds(n):
    return tuple(RoundStats(i * 100.0, 90.0, 1000, 4 * MiB, 10)
                 for i in range(n))


def _stats(**kw):
    base = dict(phase=Phase.ITERATE, result=Result.RUNNING, round=1,
                mem_total=256 * MiB, bytes_transferred=10 * MiB,
                bytes_remaining=5 * MiB, expected_downtime_ms=50,
                max_downtime_ms=100, downtime_ms=0.0, total_ms=0.0,
                committed=False, guest_runs_here=True, rounds=(), error="",
                error_kind=ErrorKind.NONE, mode=Mode.LIVE, throttle=0,
                delta_cache_bytes=0, compressing=0, disk_total=0,
                disk_bytes=0, disk_blocks=0, dirty_blocks=0, pages_zero=0,
                pages_delta=0, pages_compressed=0, pages_raw=0, rtt_ms=0.1,
                bandwidth=100.0 * MiB, channels=1, pause_stop_ms=0.0,
                pause_final_ms=0.0, pause_verify_ms=0.0, pause_commit_ms=0.0)
    base.update(kw)
    st = types.SimpleNamespace(**base)
    st.finished = st.result != Result.RUNNING
    return st


class FakeSend:
    """An engine send whose stats follow a script; records the calls."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = []
        self.lock = threading.Lock()
        self.closed = False

    def stats(self):
        with self.lock:
            if len(self.script) > 1:
                return self.script.pop(0)
            return self.script[0]

    def end(self, **kw):
        with self.lock:
            self.script = [_stats(**kw)]

    def set_param(self, name, value):
        self.calls.append((name, value))

    def force_complete(self):
        self.calls.append(("force_complete",))
        self.end(result=Result.COMPLETED, phase=Phase.DONE, committed=True,
                 guest_runs_here=False, downtime_ms=12.5, total_ms=900,
                 rounds=_rounds(2))

    def cancel(self):
        self.calls.append(("cancel",))
        if self.script[0].committed:
            raise MigrationError("refused once committed")
        self.end(result=Result.CANCELLED, phase=Phase.CANCELLED,
                 error="cancelled")

    def close(self):
        self.closed = True


@pytest.fixture
def env(driver, monkeypatch, tmp_path):
    drv = driver
    drv.backend.can_migrate = drv.backend.can_live_migrate = True
    drv.backend.has_dirty_log = True
    drv.backend.stream_disks = False    # file disks (zvols: *_zvols.py)
    drv.backend.migration_vmm.return_value = ("testhost", "/run/x/control.sock")
    disk = tmp_path / "disk"
    disk.write_bytes(b"d" * 65536)
    drv.backend.disk_path.return_value = str(disk)
    drv.backend.disk_paths.return_value = {"disk": str(disk)}
    drv.backend.detached_disks.return_value = []
    drv.backend.host_facts.return_value = HostFacts(
        vcpus=2, memory_mb=4096, memory_mb_used=100, disk_gb=10,
        disk_gb_used=1, hypervisor_type="bhyve", hypervisor_version=1,
        arch="x86_64", cpu_model="x")
    drv._host = "src"
    monkeypatch.setattr(live, "POLL", 0.001)
    ev = mock.Mock()
    monkeypatch.setattr(live, "events", ev)
    send = FakeSend([_stats()])
    engine = mock.Mock()
    engine.send.return_value = send
    monkeypatch.setattr(live, "Migration", engine)
    # the key exchange of a real check/pre_live_migration pair
    data = mdata.new_data()
    data.block_migration = True
    data.target_connect_addr = "127.0.0.1:40000"
    mdata.put(data, "mode", "live")
    mdata.put(data, "disks", "disk")
    dst_pub, dst_secrets = mdata.answer(drv._lm_keys.new(UUID), UUID)
    mdata.put(data, "dst_key", dst_pub)
    objects.register_all()
    data.migration = objects.Migration()
    data.migration.save = mock.Mock()
    flavor = types.SimpleNamespace(memory_mb=256, root_gb=1, ephemeral_gb=0,
                                   swap=0, vcpus=1)
    inst = types.SimpleNamespace(uuid=UUID, flavor=flavor, vm_state="active",
                                 system_metadata={},
                                 save=mock.Mock(), progress=0)
    post, recover = mock.Mock(), mock.Mock()
    overrides = []

    def flags(**kw):
        for k, v in kw.items():
            CONF.set_override(k, v, group="bhyve")
            overrides.append(k)

    yield types.SimpleNamespace(drv=drv, send=send, engine=engine, data=data,
                                inst=inst, post=post, recover=recover,
                                dst_secrets=dst_secrets,
                                events=ev, flags=flags)
    for k in overrides:
        CONF.clear_override(k, group="bhyve")


def _migrate(env):
    env.drv.live_migration(mock.sentinel.ctx, env.inst, "dst", env.post,
                           env.recover, True, env.data)


def _done(**kw):
    base = dict(result=Result.COMPLETED, phase=Phase.DONE, committed=True,
                guest_runs_here=False, downtime_ms=7.0, total_ms=1500,
                bytes_transferred=40 * MiB, rounds=_rounds(3),
                pause_stop_ms=0.4, pause_final_ms=3.1, pause_verify_ms=2.25,
                pause_commit_ms=1.25)
    base.update(kw)
    return _stats(**base)


def test_completed_calls_post_once_and_reports(env):
    env.send.script = [_stats(round=0, bytes_transferred=MiB)] * 3 + [_done()]
    _migrate(env)
    env.post.assert_called_once_with(mock.sentinel.ctx, env.inst, "dst", True,
                                     env.data)
    env.recover.assert_not_called()
    assert env.send.closed
    kwargs = env.engine.send.call_args.kwargs
    assert kwargs["mode"] == Mode.LIVE and kwargs["port"] == 40000
    assert kwargs["vmm_target"] == "/run/x/control.sock"
    assert kwargs["max_downtime_ms"] == 50          # first downtime step
    secret = kwargs["secret"]
    assert kwargs["disks"] == [env.drv.backend.disk_path.return_value]
    assert kwargs["detached_disks"] == []
    names = [c.args[3] for c in env.events.record.call_args_list]
    assert len(names) == 1
    assert names[0].startswith("bhyve_switchover mode=live downtime=7.0ms "
                               "total=1500ms bytes=41943040 rounds=3")
    assert names[0].endswith(" predicted=50.0ms pause=0.4/3.1/2.2/1.2ms "
                             "disk_bytes=0 disk_blocks=0")
    env.events.finish.assert_called_once_with(
        mock.sentinel.ctx, env.inst, "bhyve_live_migration_live")
    # the last report: everything copied
    assert env.data.migration.memory_total == 256 * MiB
    assert env.data.migration.memory_remaining is None     # 0 -> None
    assert env.inst.progress == 100
    assert secret.hex() not in repr(env.events.mock_calls)
    assert len(secret) == 32 and secret == _secrets_of(env)


def _secrets_of(env):
    """The memory secret the destination derived for the fixture's data."""
    return env.dst_secrets.memory


def test_failure_before_commit_recovers(env):
    env.send.script = [_stats(), _stats(result=Result.FAILED,
                                        phase=Phase.FAILED,
                                        error="destination went away")]
    _migrate(env)
    env.recover.assert_called_once_with(mock.sentinel.ctx, env.inst, "dst",
                                        env.data)
    env.post.assert_not_called()
    assert env.events.finish.call_args.args[3] == "destination went away"


def test_failure_after_commit_still_finishes_on_the_destination(env):
    env.send.script = [_stats(result=Result.FAILED, committed=True,
                              error="after COMMIT: check the destination")]
    _migrate(env)
    env.post.assert_called_once()
    env.recover.assert_not_called()


def _engine_started(env):
    out = env.drv._outgoing.get(UUID)
    return out is not None and out.mig


def test_abort_from_another_thread_cancels(env):
    def abort_soon():
        polling.poll(lambda: _engine_started(env), 10, 0.001)
        env.drv.live_migration_abort(env.inst)

    t = threading.Thread(target=abort_soon)
    t.start()
    _migrate(env)
    t.join()
    assert ("cancel",) in env.send.calls
    env.recover.assert_called_once_with(mock.sentinel.ctx, env.inst, "dst",
                                        env.data, migration_status="cancelled")
    env.post.assert_not_called()


def test_abort_after_the_hand_over_is_refused(env):
    out = live._Outgoing(mig=live._Run(FakeSend([_stats(committed=True)])))
    env.drv._outgoing[UUID] = out
    with pytest.raises(exception.MigrationError, match="too late"):
        env.drv.live_migration_abort(env.inst)


def test_abort_or_force_while_the_engine_is_closed_leaves_it_alone(env):
    send = FakeSend([_stats()])
    out = live._Outgoing(mig=live._Run(send), stopping=True)
    env.drv._outgoing[UUID] = out
    env.drv.live_migration_abort(env.inst)
    env.drv.live_migration_force_complete(env.inst)
    assert send.calls == [] and not out.abort


def test_an_abort_just_before_the_start_applies(env):
    env.drv.live_migration_abort(env.inst)         # nothing runs yet
    _migrate(env)
    env.engine.send.assert_not_called()
    env.recover.assert_called_once_with(mock.sentinel.ctx, env.inst, "dst",
                                        env.data, migration_status="cancelled")


def test_force_complete(env):
    with pytest.raises(exception.NoActiveMigrationForInstance):
        env.drv.live_migration_force_complete(env.inst)

    def force_soon():
        polling.poll(lambda: _engine_started(env), 10, 0.001)
        env.drv.live_migration_force_complete(env.inst)

    t = threading.Thread(target=force_soon)
    t.start()
    _migrate(env)
    t.join()
    assert ("force_complete",) in env.send.calls
    env.post.assert_called_once()


def test_completion_timeout_abort_marks_cancelled(env, monkeypatch):
    monkeypatch.setattr(live.policy, "completion_timeout", lambda c, g: 0.05)
    _migrate(env)
    assert ("cancel",) in env.send.calls
    env.recover.assert_called_once_with(mock.sentinel.ctx, env.inst, "dst",
                                        env.data, migration_status="cancelled")
    assert "completion timeout" in env.events.finish.call_args.args[3]


def test_completion_timeout_force_complete(env, monkeypatch):
    env.flags(live_migration_timeout_action="force_complete")
    monkeypatch.setattr(live.policy, "completion_timeout", lambda c, g: 0.05)
    _migrate(env)
    assert env.send.calls.count(("force_complete",)) == 1
    env.post.assert_called_once()


def test_auto_converge_is_the_engines_and_only_when_permitted(env):
    """The engine throttles (live mode only, when the option permits it);
    the driver reports the highest throttle it saw."""
    env.send.script = [_done()]
    _migrate(env)
    assert env.engine.send.call_args.kwargs["auto_converge"] is False
    env.flags(live_migration_permit_auto_converge=True)
    env.send.script = [_stats(round=r, throttle=20 + 10 * r)
                       for r in range(1, 4)] + [_done(throttle=50)]
    _rekey(env)
    _migrate(env)
    assert env.engine.send.call_args.kwargs["auto_converge"] is True
    assert not [c for c in env.send.calls if c[0] == "throttle"]
    names = [c.args[3] for c in env.events.record.call_args_list]
    assert any("throttle=50%" in n for n in names), names


def test_round_trips_beyond_the_allowance_are_said_once(env, caplog):
    """A link whose two round trips exceed the downtime allowed: the
    operator reads why the migration waits, once, not each poll."""
    env.send.script = [_stats(round=r, rtt_ms=40.0, max_downtime_ms=50,
                              expected_downtime_ms=82.0)
                       for r in range(1, 4)] + [_done()]
    with caplog.at_level(logging.INFO):
        _migrate(env)
    said = [r for r in caplog.records if "control round trips" in r.getMessage()]
    assert len(said) == 1, said
    assert "40.0 ms" in said[0].getMessage()
    assert "50 ms" in said[0].getMessage()


@pytest.mark.parametrize("setting,passed", [(-1, "auto"), (0, 0),
                                            (256, 256 << 20)])
def test_delta_cache_option_reaches_the_engine(env, setting, passed):
    """-1 lets the engine size the cache; MiB otherwise."""
    env.flags(live_migration_delta_cache=setting)
    env.send.script = [_done()]
    _migrate(env)
    assert env.engine.send.call_args.kwargs["delta_cache"] == passed
    assert env.engine.send.call_args.kwargs["compress"] == "auto"


def _rekey(env):
    """A new check/pre_live_migration key exchange for the next migration."""
    dst_pub, _secrets = mdata.answer(env.drv._lm_keys.new(UUID), UUID)
    mdata.put(env.data, "dst_key", dst_pub)


def test_no_key_means_no_migration(env):
    env.drv._lm_keys.take(UUID)
    _migrate(env)
    env.engine.send.assert_not_called()
    env.recover.assert_called_once()
    assert "no key" in env.events.finish.call_args.args[3]


def test_engine_refusal_recovers(env):
    env.engine.send.side_effect = MigrationError("cannot reach 127.0.0.1")
    _migrate(env)
    env.recover.assert_called_once()
    env.post.assert_not_called()


def test_downtime_steps_raise_the_limit(env, monkeypatch):
    env.flags(live_migration_downtime=400, live_migration_downtime_steps=4)
    clock = [1000.0]
    monkeypatch.setattr(live.time, "monotonic", lambda: clock[0])

    def tick(_s):
        clock[0] += 1000            # each poll: 1000 s later
    monkeypatch.setattr(live.time, "sleep", tick)
    env.send.script = [_stats()] * 4 + [_done()]
    _migrate(env)
    steps = [c[1] for c in env.send.calls if c[0] == "max_downtime_ms"]
    assert steps and steps == sorted(steps) and steps[-1] == 400


# -- the destination and the checks ------------------------------------------
class FakeRecv:
    """A receive half that reports fixed stats."""

    def __init__(self, **kw):
        self.st = _stats(**kw)
        self.port = 40000
        self.cancelled = self.closed = False

    def stats(self):
        return self.st

    def cancel(self):
        self.cancelled = True

    def close(self):
        self.closed = True


def test_rollback_at_destination_removes_an_incoming_vm(env):
    recv = FakeRecv(guest_runs_here=False)
    env.drv._incoming[UUID] = live._Incoming(recv)
    env.drv.rollback_live_migration_at_destination(None, env.inst, [], None)
    assert recv.cancelled and recv.closed
    env.drv.backend.destroy.assert_called_once_with(UUID)
    env.drv.backend.delete_files.assert_called_once_with(UUID, True)


@pytest.mark.parametrize("session", [True, False])
def test_rollback_at_destination_never_destroys_a_handed_over_guest(env,
                                                                     session):
    if session:
        env.drv._incoming[UUID] = live._Incoming(
            FakeRecv(committed=True, guest_runs_here=True))
    else:       # nova-compute restarted: the VM runs, it is not incoming
        env.drv.backend.state.return_value = bhyve_driver.MachineState.RUNNING
    with pytest.raises(exception.MigrationError, match="handed over"):
        env.drv.rollback_live_migration_at_destination(None, env.inst, [],
                                                       None)
    env.drv.backend.destroy.assert_not_called()
    env.drv.backend.delete_files.assert_not_called()


def test_post_at_destination_takes_over_and_keeps_a_pause(env):
    env.drv._incoming[UUID] = live._Incoming(
        FakeRecv(result=Result.COMPLETED, committed=True))
    env.inst.vm_state = "paused"
    env.drv.post_live_migration_at_destination(None, env.inst, [])
    # the engine delivered it paused; the backend records it so
    env.drv.backend.finish_incoming.assert_called_once_with(UUID, paused=True)
    env.drv.backend.pause.assert_not_called()


def test_post_at_destination_says_what_to_check(env):
    env.drv.backend.finish_incoming.side_effect = \
        bhyve_driver.MachineError("paused here, not running")
    with pytest.raises(exception.NovaException, match="stopped it for good"):
        env.drv.post_live_migration_at_destination(None, env.inst, [])


def test_failed_pre_live_migration_removes_what_it_made(env):
    env.engine.receive.side_effect = MigrationError("cannot listen")
    env.drv.backend.list_machines.return_value = []
    data = mdata.new_data()
    data.block_migration = True
    mdata.put(data, "src_key", mdata.KeyStore().new(UUID))
    with pytest.raises(exception.MigrationError, match="cannot listen"):
        env.drv.pre_live_migration(None, env.inst, None, [],
                                   _disk_info(env), data)
    env.drv.backend.start_incoming.assert_called_once_with(UUID)
    env.drv.backend.destroy.assert_called_once_with(UUID)
    env.drv.backend.delete_files.assert_called_once_with(UUID, True)
    assert UUID not in env.drv._incoming


def _disk_info(env, **sizes):
    """The source's get_instance_disk_info for the fixture's disks."""
    return json.dumps([
        {"path": f"/src/{UUID}/{path.rsplit('/', 1)[1]}",
         "virt_disk_size": sizes.get(name, live.os.path.getsize(path))}
        for name, path in env.drv.backend.disk_paths.return_value.items()])


def _shared_data(env):
    data = mdata.new_data()
    data.block_migration = False
    data.is_shared_instance_path = True
    data.is_shared_block_storage = False
    mdata.put(data, "src_key", env.drv._lm_keys.new(UUID))
    data.migration = env.data.migration
    return data


def test_shared_path_pre_live_migration_adopts_the_disks(env, monkeypatch):
    """The destination records the guest for the disks already there: no
    create (which could make disk files), no disk for the engine."""
    monkeypatch.setattr(live, "inbound_addr", lambda: "127.0.0.1")
    env.drv.backend.list_machines.return_value = []
    env.engine.receive.return_value.port = 40000
    data = _shared_data(env)
    env.drv.pre_live_migration(None, env.inst, None, [], None, data)
    env.drv.backend.adopt.assert_called_once()
    env.drv.backend.create.assert_not_called()
    env.drv.backend.grow_disk.assert_not_called()
    assert env.engine.receive.call_args.kwargs["disks"] == []
    assert mdata.get(data, "disks") is None
    assert data.target_connect_addr == "127.0.0.1:40000"
    env.drv._incoming.pop(UUID).close()


def test_shared_path_failed_pre_live_migration_keeps_the_disks(env):
    env.engine.receive.side_effect = MigrationError("cannot listen")
    env.drv.backend.list_machines.return_value = []
    with pytest.raises(exception.MigrationError, match="cannot listen"):
        env.drv.pre_live_migration(None, env.inst, None, [], None,
                                   _shared_data(env))
    env.drv.backend.destroy.assert_called_once_with(UUID)
    env.drv.backend.delete_files.assert_called_once_with(UUID, False)


def test_shared_path_live_migration_sends_memory_only(env):
    env.data.block_migration = False
    env.data.is_shared_instance_path = True
    env.send.script = [_done()]
    env.drv.live_migration(mock.sentinel.ctx, env.inst, "dst", env.post,
                           env.recover, False, env.data)
    env.post.assert_called_once()
    env.recover.assert_not_called()
    assert env.engine.send.call_args.kwargs["disks"] == []
    env.drv.backend.detached_disks.assert_not_called()
    names = [c.args[3] for c in env.events.record.call_args_list]
    assert [n.split()[0] for n in names] == ["bhyve_switchover"]
    assert not env.data.migration.obj_attr_is_set("disk_total")
    assert not env.data.migration.obj_attr_is_set("disk_processed")


def test_shared_path_post_at_source_removes_only_runtime_files(env):
    env.drv.post_live_migration(None, env.inst, None, _shared_data(env))
    env.drv.backend.destroy.assert_called_once_with(UUID)
    env.drv.backend.delete_files.assert_called_once_with(
        UUID, destroy_disks=False)


def test_local_path_post_at_source_leaves_files_to_cleanup(env):
    env.drv.post_live_migration(None, env.inst, None, env.data)
    env.drv.backend.destroy.assert_called_once_with(UUID)
    env.drv.backend.delete_files.assert_not_called()


@pytest.mark.parametrize("destroy_disks", [True, False])
def test_shared_path_rollback_at_destination_keeps_the_disks(env,
                                                             destroy_disks):
    env.drv._incoming[UUID] = live._Incoming(FakeRecv(guest_runs_here=False))
    env.drv.rollback_live_migration_at_destination(
        None, env.inst, [], None, destroy_disks=destroy_disks,
        migrate_data=_shared_data(env))
    env.drv.backend.delete_files.assert_called_once_with(UUID, False)


def test_block_migration_gives_every_disk_to_the_engine_on_both_sides(
        env, tmp_path, monkeypatch):
    """pre_live_migration sizes the destination's files as the source's
    and hands them to the engine's receive; live_migration hands the
    source's to its send, naming the ones the VM does not have open."""
    monkeypatch.setattr(live, "inbound_addr", lambda: "127.0.0.1")
    names = ("disk", "swap", "eph0")
    sizes = {"disk": 65536, "swap": 1 << 20, "eph0": 2 << 20}
    dst = tmp_path / "dst"
    dst.mkdir()
    for name in names:
        (dst / f"disk.{name}").write_bytes(b"")

    def grow(uuid, size, name):
        live.os.truncate(dst / f"disk.{name}", size)
    env.drv.backend.grow_disk.side_effect = grow
    env.drv.backend.list_machines.return_value = []
    env.drv.backend.disk_paths.return_value = {
        n: str(dst / f"disk.{n}") for n in names}
    env.engine.receive.return_value.port = 40000
    env.inst.flavor.swap, env.inst.flavor.ephemeral_gb = 1, 1
    data = mdata.new_data()
    data.block_migration = True
    mdata.put(data, "src_key", env.drv._lm_keys.new(UUID))
    data.migration = env.data.migration
    info = json.dumps([{"path": f"/src/{UUID}/disk.{n}",
                        "virt_disk_size": sizes[n]} for n in names])
    env.drv.pre_live_migration(None, env.inst, None, [], info, data)
    assert env.engine.receive.call_args.kwargs["disks"] == [
        str(dst / f"disk.{n}") for n in names]
    assert [live.os.path.getsize(dst / f"disk.{n}") for n in names] == [
        sizes[n] for n in names]
    assert mdata.get(data, "disks") == "disk,swap,eph0"
    assert mdata.get(data, "disk_ports") is None

    src = {n: f"/src/{UUID}/disk.{n}" for n in names}
    monkeypatch.setattr(live.os.path, "getsize", lambda path: 1 << 20)
    env.drv.backend.disk_paths.return_value = src
    env.drv.backend.detached_disks.return_value = ["swap", "eph0"]
    env.send.script = [_done()]
    env.drv.live_migration(None, env.inst, "dst", env.post, env.recover,
                           True, data)
    env.post.assert_called_once()
    kwargs = env.engine.send.call_args.kwargs
    assert kwargs["disks"] == [src[n] for n in names]
    assert kwargs["detached_disks"] == [src["swap"], src["eph0"]]
    env.drv._incoming.pop(UUID).close()


def test_a_destination_disk_of_another_size_fails_pre_live_migration(env):
    env.drv.backend.list_machines.return_value = []
    data = mdata.new_data()
    data.block_migration = True
    mdata.put(data, "src_key", mdata.KeyStore().new(UUID))
    with pytest.raises(exception.MigrationError,
                       match="65536 bytes here and 4096 on the source"):
        env.drv.pre_live_migration(None, env.inst, None, [],
                                   _disk_info(env, disk=4096), data)
    env.engine.receive.assert_not_called()
    env.drv.backend.delete_files.assert_called_once_with(UUID, True)


@pytest.mark.parametrize("sizes, message", [
    ({"disk": (1 << 30) + 512}, "disk disk is 1073742336 bytes, more than "
     "the flavor's root_gb 1 GiB (1073741824 bytes)"),
    ({"swap": 2 << 20}, "disk swap is 2097152 bytes, more than the "
     "flavor's swap 1 MiB (1048576 bytes)"),
    ({"eph0": 3 << 30}, "disk eph0 is 3221225472 bytes, more than the "
     "flavor's ephemeral_gb 2 GiB"),
    ({"eph0": 1 << 30, "eph1": (1 << 30) + 512}, "the ephemeral disks are "
     "2147484160 bytes together, more than the flavor's ephemeral_gb 2 GiB"),
    ({"vdz": 512}, "disk 'vdz' is none of the flavor's disks"),
])
def test_a_source_announcing_disks_bigger_than_the_flavor_is_refused(
        env, tmp_path, sizes, message):
    """The destination grows nothing to what the flavor does not allow."""
    env.drv.backend.list_machines.return_value = []
    env.inst.flavor.swap, env.inst.flavor.ephemeral_gb = 1, 2
    names = {"disk": 4096, "swap": 1 << 20, "eph0": 4096}
    names.update(sizes)
    env.drv.backend.disk_paths.return_value = {
        n: str(tmp_path / f"disk.{n}") for n in names}
    data = mdata.new_data()
    data.block_migration = True
    mdata.put(data, "src_key", mdata.KeyStore().new(UUID))
    info = json.dumps([{"path": f"/src/{UUID}/disk.{n}", "virt_disk_size": v}
                       for n, v in names.items()])
    with pytest.raises(exception.MigrationError) as err:
        env.drv.pre_live_migration(None, env.inst, None, [], info, data)
    assert "the source's disks do not fit the flavor: " + message in str(
        err.value)
    env.drv.backend.grow_disk.assert_not_called()
    env.engine.receive.assert_not_called()
    env.drv.backend.delete_files.assert_called_once_with(UUID, True)


def test_a_root_gb_0_flavor_leaves_the_root_disk_to_the_image():
    """root_gb 0: the root disk has the image's size, unknown here."""
    flavor = types.SimpleNamespace(root_gb=0, swap=0, ephemeral_gb=0)
    assert checks.disk_size_error(flavor, {"disk": 5 << 30}) is None
    assert "swap 0 MiB" in checks.disk_size_error(flavor, {"swap": 512})


def test_disks_the_destination_did_not_prepare_fail_before_the_engine(env):
    env.drv.backend.disk_paths.return_value = dict(
        env.drv.backend.disk_paths.return_value, swap="/run/x/disk.swap")
    _migrate(env)
    env.engine.send.assert_not_called()
    env.recover.assert_called_once()
    assert "the destination prepared disks disk; this guest has disk, swap" \
        in env.events.finish.call_args.args[3]


def test_disk_info_and_space_check_count_every_disk(env, tmp_path):
    for name, size in (("disk", 4096), ("disk.swap", 8192)):
        (tmp_path / name).write_bytes(b"x" * size)
    env.drv.backend.disk_paths.return_value = {
        "disk": str(tmp_path / "disk"), "swap": str(tmp_path / "disk.swap")}
    info = json.loads(env.drv.get_instance_disk_info(env.inst))
    assert [(d["path"], d["virt_disk_size"]) for d in info] == [
        (str(tmp_path / "disk"), 4096), (str(tmp_path / "disk.swap"), 8192)]


def _dest_check(env, tmp_path, **kw):
    tmp_path.mkdir(exist_ok=True)
    env.drv.backend.instances_path = str(tmp_path)
    info = {"hypervisor_type": "bhyve", "hypervisor_version": 1,
            "cpu_info": "{}", "disk_available_least": 100}
    return env.drv.check_can_live_migrate_destination(
        None, env.inst, info, info, **kw)


def test_source_check_sets_block_migration_mode_and_key(env, tmp_path):
    disk = tmp_path / "disk"
    disk.write_bytes(b"x")
    env.drv.backend.disk_paths.return_value = {"disk": str(disk)}
    data = _dest_check(env, tmp_path / "elsewhere", block_migration=None)
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    env.drv.backend.instances_path = str(tmp_path)   # the source's own path
    data = env.drv.check_can_live_migrate_source(None, env.inst, data)
    assert data.block_migration is True
    assert data.is_shared_instance_path is False
    assert mdata.get(data, "mode") == "live"
    assert mdata.get(data, "src_key")


@pytest.mark.parametrize("asked", [None, False])
def test_a_shared_instances_path_moves_no_disk(env, tmp_path, asked):
    """auto (None) or an explicit no: no block migration, no disk check."""
    env.drv.backend.disk_paths.side_effect = AssertionError("disk checked")
    data = _dest_check(env, tmp_path, block_migration=asked)
    data = env.drv.check_can_live_migrate_source(None, env.inst, data)
    assert data.is_shared_instance_path is True
    assert data.is_shared_block_storage is False
    assert data.block_migration is False
    assert mdata.get(data, "mode") == "live"
    assert mdata.get(data, "src_key")


def test_nova_cleans_up_after_a_shared_path_migration_keeping_disks(
        env, tmp_path):
    """Nova's cleanup flags: the source's cleanup and the destination's
    rollback run, with destroy_disks False (what target_mdevs is for)."""
    from nova.compute.manager import ComputeManager

    data = _dest_check(env, tmp_path, block_migration=None)
    data = env.drv.check_can_live_migrate_source(None, env.inst, data)
    assert ComputeManager._live_migration_cleanup_flags(None, data) == \
        (True, False)
    (tmp_path / "elsewhere").mkdir()
    data = _dest_check(env, tmp_path / "d", block_migration=None)
    env.drv.backend.disk_paths.return_value = {}
    env.drv.backend.instances_path = str(tmp_path)
    data = env.drv.check_can_live_migrate_source(None, env.inst, data)
    assert "target_mdevs" not in data
    assert ComputeManager._live_migration_cleanup_flags(None, data) == \
        (True, True)


def test_block_migration_on_a_shared_instances_path_is_refused(env, tmp_path):
    data = _dest_check(env, tmp_path, block_migration=True)
    with pytest.raises(exception.InvalidLocalStorage,
                       match=r"shared with the destination.*without "
                             r"--block-migration"):
        env.drv.check_can_live_migrate_source(None, env.inst, data)


def test_source_check_refuses_no_block_migration(env, tmp_path):
    data = _dest_check(env, tmp_path / "d", block_migration=False)
    env.drv.backend.instances_path = str(tmp_path)
    with pytest.raises(exception.InvalidSharedStorage,
                       match=r"not shared.*request a block migration "
                             r"\(--block-migration"):
        env.drv.check_can_live_migrate_source(None, env.inst, data)


def test_warm_without_a_dirty_log_on_the_destination(env, tmp_path):
    disk = tmp_path / "disk"
    disk.write_bytes(b"x")
    env.drv.backend.disk_paths.return_value = {"disk": str(disk)}
    env.flags(live_migration_dirty_log="no")
    data = _dest_check(env, tmp_path / "d", block_migration=None)
    env.flags(live_migration_dirty_log="auto")
    env.drv.backend.instances_path = str(tmp_path)
    data = env.drv.check_can_live_migrate_source(None, env.inst, data)
    assert mdata.get(data, "mode") == "warm"


def test_backends_without_migration_are_refused_up_front(env, tmp_path):
    env.drv.backend.can_live_migrate = False
    with pytest.raises(exception.MigrationPreCheckError,
                       match="cannot migrate guests yet"):
        _dest_check(env, tmp_path)


def test_a_paused_server_moves_paused(env):
    """The engine is told to keep it paused: it never runs on either host."""
    env.send.script = [_done()]
    _migrate(env)
    assert env.engine.send.call_args.kwargs["keep_paused"] is False
    env.inst.vm_state = "paused"
    env.send.script = [_done()]
    _rekey(env)
    _migrate(env)
    assert env.engine.send.call_args.kwargs["keep_paused"] is True


@pytest.mark.parametrize("adopted", [True, False])
def test_restart_reaps_incoming_vms_keeping_adopted_disks(env, adopted):
    """nova-compute restarted while a guest was migrating in: its VM and
    its taps go; disks adopted on a shared instances path are the source's
    and stay."""
    env.drv.backend.list_machines.return_value = [UUID]
    env.drv.backend.is_incoming.return_value = True
    env.drv.backend.adopted.return_value = adopted
    env.drv._reap_incoming()
    env.drv.backend.destroy.assert_called_once_with(UUID)
    env.drv.backend.unplug_vifs.assert_called_once_with(
        env.drv.backend.recorded_spec.return_value)
    env.drv.backend.delete_files.assert_called_once_with(UUID, not adopted)


def test_orphan_watch_removes_the_incoming_guest(env, monkeypatch):
    """The source's compute restarted mid-migration and will never ask for
    the rollback: the driver's watch frees the listener, the VM, its taps
    and its files once the grace has passed."""
    from nova_bhyve.migration import orphans
    recv = mock.Mock()
    recv.stats.return_value = _stats(result=Result.FAILED, finished=True,
                                     committed=False, guest_runs_here=False)
    inc = mock.Mock(wraps=live._Incoming(recv))
    env.drv._incoming[UUID] = inc
    env.drv.backend.adopted.return_value = False
    nova_view = types.SimpleNamespace(uuid=UUID, host="host1",
                                      task_state=None, deleted=False)
    monkeypatch.setattr(orphans, "lookup", lambda ctx, uuid: nova_view)
    monkeypatch.setattr(orphans, "release_port_bindings", mock.Mock())
    monkeypatch.setattr(orphans, "close_events", mock.Mock())
    env.drv._orphans.check(context="ctx", now=0.0)
    env.drv.backend.destroy.assert_not_called()
    env.drv._orphans.check(context="ctx", now=1e6)
    recv.cancel.assert_not_called()         # finished already
    inc.close.assert_called_once_with(cancel=True)
    recv.close.assert_called_once_with()
    env.drv.backend.destroy.assert_called_once_with(UUID)
    env.drv.backend.unplug_vifs.assert_called_once_with(
        env.drv.backend.recorded_spec.return_value)
    env.drv.backend.delete_files.assert_called_once_with(UUID, True)
    orphans.release_port_bindings.assert_called_once_with(
        "ctx", nova_view, env.drv._nodename())
    assert UUID not in env.drv._incoming
