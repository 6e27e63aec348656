"""BhyveDriver's cold migration, resize and evacuation hooks, on
recording backends; the disks move through the real engine on this host
(a stopped guest's session needs no VM), between two drivers joined by a
stand-in for Nova's compute RPC."""

import hashlib
import json
import os
import threading
import types
from unittest import mock

import pytest

import nova_bhyve.driver as bhyve_driver
from nova import exception
from nova_bhyve.migration import cold
from nova_bhyve.native import engine

UUID = "3b0f6c9e-8d2a-4f1b-9c3e-5a6b7c8d9e0f"
CONF = bhyve_driver.CONF
MiB = 1 << 20


def _flavor(root_gb=1, memory_mb=128, vcpus=1, ephemeral_gb=0, swap=0):
    return types.SimpleNamespace(root_gb=root_gb, memory_mb=memory_mb,
                                 vcpus=vcpus, ephemeral_gb=ephemeral_gb,
                                 swap=swap)


def _instance(**kw):
    base = dict(uuid=UUID, flavor=_flavor(), system_metadata={},
                vm_state="active")
    base.update(kw)
    return types.SimpleNamespace(**base)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class FakeComputeRPC:
    """Nova's compute RPC between the two drivers: records each request."""

    def __init__(self, computes):
        self.computes = computes
        self.requests = []

    def check_instance_shared_storage(self, ctxt, data, instance=None,
                                      host=None):
        self.requests.append((host, json.loads(json.dumps(data))))
        answer = self.computes[host].check_instance_shared_storage_remote(
            ctxt, data)
        return json.loads(json.dumps(answer))   # as over the message bus


def _disks(folder, **data):
    """Sparse disk files in ``folder`` with data at 1 MiB; {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, payload in data.items():
        path = folder / ("disk" if name == "disk" else f"disk.{name}")
        with open(path, "wb") as f:
            f.truncate(8 * MiB)
            f.seek(MiB)
            f.write(payload)
        paths[name] = str(path)
    return paths


@pytest.fixture
def pair(make_driver, tmp_path, monkeypatch):
    """(source, destination) drivers on their own instances paths."""
    src, dst = make_driver(), make_driver()
    for drv, host in ((src, "src"), (dst, "dst")):
        drv.backend.can_migrate = True
        drv.backend.stream_disks = False  # file disks (zvols: *_zvols.py)
        drv.backend.instances_path = str(tmp_path / host)
        os.makedirs(drv.backend.instances_path)
        drv._host = host
    src._compute_rpc = FakeComputeRPC({"dst": dst, "src": src})
    src.backend.disk_paths.return_value = _disks(
        tmp_path / "src" / UUID, disk=b"root " * 1000, swap=b"swap",
        eph0=os.urandom(3 * MiB))
    monkeypatch.setattr(cold.ColdMigrationMixin, "_move", staticmethod(
        lambda ctx, inst: types.SimpleNamespace(source_compute="src",
                                                dest_compute="dst")))
    monkeypatch.setattr(cold, "inbound_addr", lambda: "127.0.0.1")
    monkeypatch.setattr(cold, "events", mock.Mock())
    yield src, dst
    for drv in (src, dst):
        for uuid in list(drv._received_disks):
            drv._drop_received(uuid)


@pytest.fixture
def drv(pair):
    """The source driver alone."""
    return pair[0]


def _wait_gone(path):
    for _ in range(100):
        if not os.path.exists(path):
            return True
        cold.time.sleep(0.05)
    return False


def test_power_off_and_send_every_disk_through_the_engine(pair, tmp_path):
    src, dst = pair
    before = {n: _sha(p) for n, p in src.backend.disk_paths(UUID).items()}
    inst = _instance(flavor=_flavor(ephemeral_gb=1, swap=8))
    info = json.loads(src.migrate_disk_and_power_off(
        "ctx", inst, "192.0.2.9", _flavor(root_gb=2, ephemeral_gb=3, swap=16),
        [], None, 30, 5))
    src.backend.stop.assert_called_once_with(UUID, 30, 5)
    src.backend.start.assert_not_called()
    # a swap disk the new flavor resizes is made blank there, not sent
    assert info == {"version": 2, "shared": False, "disks": ["disk", "eph0"]}
    folder = tmp_path / "dst" / UUID
    assert sorted(os.listdir(folder)) == ["disk", "disk.eph0"]
    assert _sha(folder / "disk") == before["disk"]
    assert _sha(folder / "disk.eph0") == before["eph0"]
    # the request carries a public key and names, no secret; the probe is gone
    [(host, request)] = src._compute_rpc.requests
    assert host == "dst"
    assert sorted(request[cold.REQUEST_KEY]) == ["files", "src_key", "uuid"]
    assert request[cold.REQUEST_KEY]["files"] == ["disk", "disk.eph0"]
    assert not os.path.exists(os.path.join(src.backend.instances_path,
                                           request["filename"]))
    cold.events.record.assert_called_once()
    assert "bhyve_disk_copy bytes=" in cold.events.record.call_args.args[3]
    # the source keeps its files for a revert
    assert {n: _sha(p) for n, p in src.backend.disk_paths(UUID).items()} == before

    new = _instance(flavor=_flavor(root_gb=2, ephemeral_gb=3, swap=16))
    dst.finish_migration("ctx", None, new, json.dumps(info), [], None, True,
                         {})
    assert dst._received_disks == {}
    assert new.system_metadata[cold.SHARED_KEY] == "0"
    assert [c.args for c in dst.backend.grow_disk.call_args_list] == [
        (UUID, 2 << 30), (UUID, 3 << 30, "eph0")]
    spec = dst.backend.create.call_args.args[2]
    assert [(d.name, d.size_mb) for d in spec.disks] == [
        ("swap", 16), ("eph0", 3 << 10)]
    dst.backend.start.assert_called_once_with(UUID)


def test_a_failed_transfer_keeps_the_guest_and_leaves_nothing_there(
        pair, tmp_path):
    """The destination gives up as the source connects: the source starts
    its guest again and Nova rolls back; the destination's files go."""
    src, dst = pair
    before = {n: _sha(p) for n, p in src.backend.disk_paths(UUID).items()}
    real = dst.check_instance_shared_storage_remote

    def listen_then_give_up(ctxt, data):
        answer = real(ctxt, data)
        dst._received_disks[UUID].mig.cancel()
        return answer
    dst.check_instance_shared_storage_remote = listen_then_give_up
    with pytest.raises(exception.InstanceFaultRollback) as err:
        src.migrate_disk_and_power_off("ctx", _instance(), "192.0.2.9",
                                       _flavor(), [])
    assert "cannot send the disks to 192.0.2.9" in str(
        err.value.inner_exception)
    src.backend.stop.assert_called_once()
    src.backend.start.assert_called_once_with(UUID)
    assert {n: _sha(p) for n, p in src.backend.disk_paths(UUID).items()} == before
    assert _wait_gone(tmp_path / "dst" / UUID)


def test_a_stopped_guest_stays_stopped_when_its_move_fails(pair):
    src, dst = pair
    dst.check_instance_shared_storage_remote = lambda ctxt, data: False
    with pytest.raises(exception.InstanceFaultRollback):
        src.migrate_disk_and_power_off("ctx", _instance(vm_state="stopped"),
                                       "d", _flavor(), [])
    src.backend.start.assert_not_called()


def test_an_older_destination_is_a_rollback_with_what_to_do(pair):
    src, dst = pair
    dst.check_instance_shared_storage_remote = lambda ctxt, data: False
    with pytest.raises(exception.InstanceFaultRollback) as err:
        src.migrate_disk_and_power_off("ctx", _instance(), "d", _flavor(), [])
    assert "upgrade the older one" in str(err.value.inner_exception)
    src.backend.start.assert_called_once_with(UUID)


@pytest.mark.parametrize("request_", [
    {"uuid": UUID, "src_key": "x", "files": ["../disk"]},
    {"uuid": UUID, "src_key": "x", "files": ["disk/../../etc"]},
    {"uuid": "../x", "src_key": "x", "files": ["disk"]},
    {"uuid": UUID, "src_key": "x", "files": ["disk.swap"]},
    {"uuid": UUID, "src_key": "x", "files": ["disk", "disk"]},
    {"uuid": UUID, "src_key": "x", "files": ["disk", {"a": 1}]},
    {"uuid": UUID, "src_key": "x", "files": "disk"},
    # stream disks: their names, a snapshot tag, the root among them
    {"uuid": UUID, "src_key": "x", "files": [], "streams": ["disk"]},
    {"uuid": UUID, "src_key": "x", "files": [], "streams": ["disk"],
     "tag": "mig-0123456789ab; rm -rf /"},
    {"uuid": UUID, "src_key": "x", "files": ["nvram.fd"], "streams": ["eph0"],
     "tag": "mig-0123456789ab"},
    {"uuid": UUID, "src_key": "x", "files": [], "streams": ["disk", "../x"],
     "tag": "mig-0123456789ab"},
    {"uuid": UUID, "src_key": "x", "files": [], "streams": ["disk", "disk"],
     "tag": "mig-0123456789ab"},
    {"uuid": UUID, "src_key": "x", "files": ["nvram.fd"]},
])
def test_a_request_naming_files_outside_the_instance_is_refused(
        pair, request_, tmp_path):
    _src, dst = pair
    with pytest.raises(exception.MigrationError, match="bad instance, file"):
        dst.check_instance_shared_storage_remote(
            None, {"filename": "p", cold.REQUEST_KEY: request_})
    assert os.listdir(tmp_path / "dst") == []


def test_a_destination_with_a_disk_of_the_instance_refuses(pair, tmp_path):
    src, _dst = pair
    stale = _disks(tmp_path / "dst" / UUID, disk=b"stale")["disk"]
    with pytest.raises(exception.InstanceFaultRollback) as err:
        src.migrate_disk_and_power_off("ctx", _instance(), "d", _flavor(), [])
    assert "already has a disk" in str(err.value.inner_exception)
    with open(stale, "rb") as f:
        f.seek(MiB)
        assert f.read(5) == b"stale"


def test_finish_without_received_disks_is_a_clear_error(pair):
    _src, dst = pair
    info = json.dumps({"version": 2, "shared": False, "disks": ["disk"]})
    with pytest.raises(exception.MigrationError, match="no disks were "
                       "received"):
        dst.finish_migration(None, None, _instance(), info, [], None, False,
                             {})
    dst.backend.delete_files.assert_called_once_with(UUID, True)


def test_finish_waits_for_the_destinations_own_verdict(pair):
    """The source's session may end a moment before this side's: finish
    waits for it rather than cancelling a transfer that is completing."""
    _src, dst = pair
    mig = mock.Mock()
    ends = iter([False, False, False, True])
    mig.wait.side_effect = lambda timeout: next(ends, True)
    mig.stats.return_value = types.SimpleNamespace(
        result=engine.Result.COMPLETED, error="")
    receiving = cold._Receiving(mig, None)
    dst._received_disks[UUID] = receiving
    threading.Thread(target=receiving.watch).start()
    info = json.dumps({"version": 2, "shared": False, "disks": ["disk"]})
    dst.finish_migration(None, None, _instance(), info, [], None, False, {})
    dst.backend.create.assert_called_once()
    mig.cancel.assert_not_called()
    mig.close.assert_called_once()
    assert dst._received_disks == {}


def test_received_disks_bigger_than_the_new_flavor_are_refused(
        pair, tmp_path):
    """The engine made the files at the source's sizes: finish checks
    them against the flavor before it records anything over them."""
    src, dst = pair
    inst = _instance(flavor=_flavor(ephemeral_gb=1, swap=8))
    info = src.migrate_disk_and_power_off(
        "ctx", inst, "192.0.2.9", _flavor(ephemeral_gb=1, swap=8), [])
    # the source's files are 8 MiB each; this flavor allows a 4 MiB swap
    small = _instance(flavor=_flavor(ephemeral_gb=1, swap=4))
    with pytest.raises(exception.MigrationError) as err:
        dst.finish_migration("ctx", None, small, info, [], None, False, {})
    assert ("the source's disks do not fit the flavor: disk swap is 8388608 "
            "bytes, more than the flavor's swap 4 MiB (4194304 bytes)"
            in str(err.value))
    dst.backend.create.assert_not_called()
    dst.backend.delete_files.assert_called_once_with(UUID, True)


def test_a_source_of_the_older_kind_is_a_clear_error(pair):
    _src, dst = pair
    for info in ("{}", json.dumps({"version": 1, "disks": [{"name": "disk"}]})):
        with pytest.raises(exception.MigrationError, match="upgrade"):
            dst.finish_migration(None, None, _instance(), info, [], None,
                                 False, {})
    dst.backend.create.assert_not_called()


def test_the_root_disk_cannot_shrink(drv):
    with pytest.raises(exception.InstanceFaultRollback) as err:
        drv.migrate_disk_and_power_off(None, _instance(flavor=_flavor(5)),
                                       "d", _flavor(root_gb=2), [])
    assert "root disk cannot shrink" in str(err.value.inner_exception)
    drv.backend.stop.assert_not_called()


def test_ephemeral_disks_cannot_shrink_but_swap_may(drv):
    bdi = {"ephemerals": [{"size": 2, "num": 0}]}
    inst = _instance(flavor=_flavor(ephemeral_gb=2, swap=512))
    with pytest.raises(exception.InstanceFaultRollback) as err:
        drv.migrate_disk_and_power_off(None, inst, "d", _flavor(ephemeral_gb=1),
                                       [], bdi)
    assert ("ephemeral disks cannot shrink from 2 GiB to 1 GiB"
            in str(err.value.inner_exception))
    drv.backend.stop.assert_not_called()
    drv.migrate_disk_and_power_off(None, inst, "d",
                                   _flavor(ephemeral_gb=2, swap=0), [], bdi)
    drv.backend.stop.assert_called_once()
    drv.backend.start.assert_not_called()


def test_backends_without_migration_are_refused(drv):
    drv.backend.can_migrate = False
    with pytest.raises(exception.InstanceFaultRollback):
        drv.migrate_disk_and_power_off(None, _instance(), "d", _flavor(), [])
    drv.backend.stop.assert_not_called()


def test_same_host_resize_moves_nothing(drv, monkeypatch):
    monkeypatch.setattr(cold.ColdMigrationMixin, "_move", staticmethod(
        lambda ctx, inst: types.SimpleNamespace(source_compute="h",
                                                dest_compute="h")))
    monkeypatch.setattr(cold, "Migration", mock.Mock(wraps=engine.Migration))
    info = drv.migrate_disk_and_power_off(None, _instance(), "d", _flavor(),
                                          [])
    assert json.loads(info) == {"version": 2, "same_host": True}
    drv.finish_migration(None, None, _instance(flavor=_flavor(2, 256, 2)),
                         info, [], None, True, {})
    assert drv._compute_rpc.requests == []
    cold.Migration.send.assert_not_called()
    cold.Migration.receive.assert_not_called()
    spec = drv.backend.create.call_args.args[2]
    assert (spec.vcpus, spec.memory_mb) == (2, 256)
    drv.backend.grow_disk.assert_called_once_with(UUID, 2 << 30)
    drv.backend.start.assert_called_once_with(UUID)
    drv.confirm_migration(None, types.SimpleNamespace(
        source_compute="h", dest_compute="h"), _instance(), [])
    drv.backend.destroy.assert_not_called()


def test_a_shared_instances_path_moves_no_disk_byte(pair, monkeypatch):
    """The destination sees the source's probe: no listener, no transfer;
    it adopts the disks in place and says so in the system metadata; the
    source's confirm then keeps the disks."""
    src, dst = pair
    dst.backend.instances_path = src.backend.instances_path
    monkeypatch.setattr(cold, "Migration", mock.Mock(wraps=engine.Migration))
    info = src.migrate_disk_and_power_off(None, _instance(), "d", _flavor(),
                                          [])
    assert json.loads(info) == {"version": 2, "shared": True, "disks": []}
    cold.Migration.send.assert_not_called()
    cold.Migration.receive.assert_not_called()
    new = _instance()
    dst.finish_migration(None, None, new, info, [], None, False, {})
    dst.backend.adopt.assert_called_once()
    dst.backend.create.assert_not_called()
    assert new.system_metadata[cold.SHARED_KEY] == "1"
    src.confirm_migration(None, types.SimpleNamespace(
        source_compute="src", dest_compute="dst"), new, [])
    src.backend.destroy.assert_called_once_with(UUID)
    src.backend.delete_files.assert_called_once_with(UUID, False)
    assert os.listdir(src.backend.instances_path) == [UUID]   # no probe left


def test_a_failed_finish_on_a_shared_path_keeps_the_disks(pair):
    _src, dst = pair
    dst.backend.start.side_effect = bhyve_driver.MachineError("no KVM")
    info = json.dumps({"version": 2, "shared": True, "disks": []})
    with pytest.raises(exception.MigrationError, match="no KVM"):
        dst.finish_migration(None, None, _instance(), info, [], None, True,
                             {})
    dst.backend.delete_files.assert_called_once_with(UUID, False)


def test_revert_boots_the_old_guest_again(drv):
    drv.finish_revert_migration(None, _instance(), [], None, power_on=True)
    drv.backend.create.assert_called_once()
    drv.backend.start.assert_called_once_with(UUID)


def test_shared_storage_checks(drv, make_driver, tmp_path):
    data = drv.check_instance_shared_storage_local(None, _instance())
    assert drv.check_instance_shared_storage_remote(None, data)
    other = make_driver()
    other.backend.instances_path = str(tmp_path / "x")
    (tmp_path / "x").mkdir()
    assert not other.check_instance_shared_storage_remote(None, data)
    drv.check_instance_shared_storage_cleanup(None, data)
    assert not drv.check_instance_shared_storage_remote(None, data)
    assert drv.instance_on_disk(_instance()) is False


def test_instance_on_disk_when_the_disk_is_here(drv):
    """An evacuation onto a host sharing instances_path keeps the disk."""
    drv.backend.has_disks.return_value = True
    assert drv.instance_on_disk(_instance()) is True
    drv.backend.has_disks.assert_called_once_with(UUID)


def test_local_instances_path_confirm_removes_the_disks(drv):
    inst = _instance(system_metadata={cold.SHARED_KEY: "0"})
    drv.confirm_migration(None, types.SimpleNamespace(
        source_compute="src", dest_compute="d"), inst, [])
    drv.backend.delete_files.assert_called_once_with(UUID, True)


