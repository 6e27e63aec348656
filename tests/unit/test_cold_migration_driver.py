"""BhyveDriver's cold migration, resize and evacuation hooks, mocked."""

import base64
import json
import os
import types
from unittest import mock

import pytest

import nova_bhyve.driver as bhyve_driver
from nova import exception
from nova_bhyve.migration import cold

UUID = "3b0f6c9e-8d2a-4f1b-9c3e-5a6b7c8d9e0f"
CONF = bhyve_driver.CONF


def _flavor(root_gb=1, memory_mb=128, vcpus=1, ephemeral_gb=0, swap=0):
    return types.SimpleNamespace(root_gb=root_gb, memory_mb=memory_mb,
                                 vcpus=vcpus, ephemeral_gb=ephemeral_gb,
                                 swap=swap)


@pytest.fixture
def drv(driver, tmp_path, monkeypatch):
    d = driver
    d.backend.can_migrate = True
    d.backend.instances_path = str(tmp_path)
    disk = tmp_path / "disk"
    disk.write_bytes(b"root disk")
    d.backend.disk_path.return_value = str(disk)
    d.backend.disk_paths.return_value = {"disk": str(disk)}
    d._host = "src"
    monkeypatch.setattr(cold.ColdMigrationMixin, "_same_host",
                        staticmethod(lambda ctx, inst: False))
    monkeypatch.setattr(cold, "inbound_addr", lambda: "127.0.0.1")
    monkeypatch.setattr(cold, "events", mock.Mock())
    yield d
    for offers in d._disk_offers.values():
        for offer in offers:
            offer.close()


def _instance(**kw):
    base = dict(uuid=UUID, flavor=_flavor(), system_metadata={},
                vm_state="active")
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_power_off_and_offer_the_disk(drv):
    info = json.loads(drv.migrate_disk_and_power_off(
        None, _instance(), "192.0.2.9", _flavor(root_gb=2), [], None, 30, 5))
    drv.backend.stop.assert_called_once_with(UUID, 30, 5)
    [offer] = info["disks"]
    assert offer["name"] == "disk"
    assert offer["addr"].startswith("127.0.0.1:")
    assert len(base64.b64decode(offer["token"])) == 32
    assert offer["size"] == len(b"root disk")
    assert UUID in drv._disk_offers
    drv.confirm_migration(None, types.SimpleNamespace(
        source_compute="src", dest_compute="dst"), _instance(), [])
    assert UUID not in drv._disk_offers
    drv.backend.destroy.assert_called_once_with(UUID)
    drv.backend.delete_files.assert_called_once_with(UUID, True)


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


def test_every_disk_is_offered_and_copied_a_resized_swap_is_made_anew(
        drv, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    disks = {}
    for name, data in (("disk", b"root"), ("swap", b"swap data"),
                       ("eph0", b"ephemeral data")):
        (src / name).write_bytes(data)
        disks[name] = str(src / name)
    drv.backend.disk_paths.return_value = disks
    inst = _instance(flavor=_flavor(ephemeral_gb=1, swap=1))
    info = drv.migrate_disk_and_power_off(
        None, inst, "d", _flavor(root_gb=2, ephemeral_gb=3, swap=2), [])
    assert [d["name"] for d in json.loads(info)["disks"]] == [
        "disk", "swap", "eph0"]

    dst = tmp_path / "dst"
    dst.mkdir()
    # the destination's own instances_path: the source's probe is not there
    drv.backend.instances_path = str(dst)

    def create(ctx, instance, spec, meta):
        """The destination makes its files for the new flavor."""
        (dst / "disk").write_bytes(b"")
        (dst / "swap").write_bytes(b"\0" * 2)      # the new swap size
        (dst / "eph0").write_bytes(b"")
        return spec
    drv.backend.create.side_effect = create
    drv.backend.disk_paths.return_value = {n: str(dst / n) for n in disks}
    new = _instance(flavor=_flavor(root_gb=2, ephemeral_gb=3, swap=2))
    drv.finish_migration(None, None, new, info, [], None, True, {})
    assert (dst / "disk").read_bytes() == b"root"
    assert (dst / "eph0").read_bytes() == b"ephemeral data"
    assert (dst / "swap").read_bytes() == b"\0\0"      # not copied
    assert [c.args for c in drv.backend.grow_disk.call_args_list] == [
        (UUID, 2 << 30), (UUID, 3 << 30, "eph0")]
    spec = drv.backend.create.call_args.args[2]
    assert [(d.name, d.size_mb) for d in spec.disks] == [
        ("swap", 2), ("eph0", 3 << 10)]


def test_backends_without_migration_are_refused(drv):
    drv.backend.can_migrate = False
    with pytest.raises(exception.InstanceFaultRollback):
        drv.migrate_disk_and_power_off(None, _instance(), "d", _flavor(), [])
    drv.backend.stop.assert_not_called()


def test_same_host_resize_copies_nothing(drv, monkeypatch):
    monkeypatch.setattr(cold.ColdMigrationMixin, "_same_host",
                        staticmethod(lambda ctx, inst: True))
    info = drv.migrate_disk_and_power_off(None, _instance(), "d", _flavor(),
                                          [])
    assert json.loads(info) == {"version": 1, "same_host": True}
    copy = mock.Mock()
    monkeypatch.setattr(cold.diskcopy, "copy", copy)
    drv.finish_migration(None, None, _instance(flavor=_flavor(2, 256, 2)),
                         info, [], None, True, {})
    copy.assert_not_called()
    spec = drv.backend.create.call_args.args[2]
    assert (spec.vcpus, spec.memory_mb) == (2, 256)
    drv.backend.grow_disk.assert_called_once_with(UUID, 2 << 30)
    drv.backend.start.assert_called_once_with(UUID)
    drv.confirm_migration(None, types.SimpleNamespace(
        source_compute="h", dest_compute="h"), _instance(), [])
    drv.backend.destroy.assert_not_called()


def test_finish_migration_pulls_the_disk(drv, monkeypatch):
    copy = mock.Mock(return_value=9)
    monkeypatch.setattr(cold.diskcopy, "copy", copy)
    token = base64.b64encode(b"t" * 32).decode()
    info = json.dumps({"version": 1, "disks": [{
        "name": "disk", "addr": "[fd00::2]:4000", "token": token,
        "size": 9}]})
    drv.finish_migration(None, None, _instance(), info, [], None, False, {},
                         power_on=False)
    args = copy.call_args
    assert args.args[:5] == ("fd00::2", 4000, b"t" * 32,
                             drv.backend.disk_path.return_value, "receive")
    assert args.kwargs["max_size"] == 9
    drv.backend.grow_disk.assert_not_called()
    drv.backend.start.assert_not_called()


def test_a_failed_pull_removes_the_new_files(drv, monkeypatch):
    monkeypatch.setattr(cold.diskcopy, "copy", mock.Mock(
        side_effect=cold.diskcopy.DiskCopyError("the peer closed")))
    info = json.dumps({"disks": [{"name": "disk", "addr": "127.0.0.1:1",
                                  "token": "dA==", "size": 1}]})
    with pytest.raises(exception.MigrationError, match="the peer closed"):
        drv.finish_migration(None, None, _instance(), info, [], None, False,
                             {})
    drv.backend.delete_files.assert_called_once_with(UUID, True)


def test_a_missing_offer_is_a_clear_error(drv):
    with pytest.raises(exception.MigrationError, match="no disk offer"):
        drv.finish_migration(None, None, _instance(), "{}", [], None, False,
                             {})
    drv.backend.create.assert_not_called()


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


def test_shared_instances_path_cold_migration_keeps_the_disks(
        drv, monkeypatch):
    """The destination sees the source's probe: it adopts the disks in
    place, pulls nothing and says so in the system metadata; the source's
    confirm then keeps the disks."""
    copy = mock.Mock(side_effect=AssertionError("a disk was copied"))
    monkeypatch.setattr(cold.diskcopy, "copy", copy)
    info = drv.migrate_disk_and_power_off(None, _instance(), "d", _flavor(),
                                          [])
    probe = json.loads(info)["probe"]
    assert os.path.exists(os.path.join(drv.backend.instances_path, probe))
    new = _instance()
    drv.finish_migration(None, None, new, info, [], None, False, {})
    drv.backend.adopt.assert_called_once()
    drv.backend.create.assert_not_called()
    assert new.system_metadata[cold.SHARED_KEY] == "1"
    drv.confirm_migration(None, types.SimpleNamespace(
        source_compute="src", dest_compute="d"), new, [])
    drv.backend.destroy.assert_called_once_with(UUID)
    drv.backend.delete_files.assert_called_once_with(UUID, False)
    assert not os.path.exists(os.path.join(drv.backend.instances_path, probe))


def test_local_instances_path_confirm_removes_the_disks(drv):
    inst = _instance(system_metadata={cold.SHARED_KEY: "0"})
    drv.confirm_migration(None, types.SimpleNamespace(
        source_compute="src", dest_compute="d"), inst, [])
    drv.backend.delete_files.assert_called_once_with(UUID, True)


def test_a_failed_finish_on_a_shared_path_keeps_the_disks(drv, tmp_path):
    drv.backend.start.side_effect = bhyve_driver.MachineError("no KVM")
    probe = cold.checks.create_probe(str(tmp_path))
    info = json.dumps({"version": 1, "probe": probe, "disks": [
        {"name": "disk", "addr": "127.0.0.1:1", "token": "dA==", "size": 1}]})
    with pytest.raises(exception.MigrationError, match="no KVM"):
        drv.finish_migration(None, None, _instance(), info, [], None, False,
                             {})
    drv.backend.delete_files.assert_called_once_with(UUID, False)
