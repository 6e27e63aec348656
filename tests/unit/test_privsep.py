"""The privileged helper refuses anything it was not built to run."""

import json
import sys
from unittest import mock

import pytest

from nova_bhyve import privsep
from nova_bhyve.machine import argv as bhyve_argv
from nova_bhyve.machine.base import DiskSpec, MachineSpec, NicSpec

UUID = "7d1e0b7c-2f3a-4b5c-8d9e-0a1b2c3d4e5f"
INSTANCES = "/var/lib/nova/instances"


@pytest.fixture(autouse=True)
def conf(monkeypatch):
    conf = privsep.CONF
    conf.set_override("instances_path", INSTANCES)
    conf.set_override("zfs_dataset", "zroot/nova", group="bhyve")
    # run entrypoints in this process instead of a privsep daemon
    monkeypatch.setattr(privsep.bhyve_pctxt, "client_mode", False)
    yield conf
    conf.clear_override("instances_path")
    conf.clear_override("zfs_dataset", group="bhyve")


@pytest.fixture
def execute(monkeypatch):
    fake = mock.Mock(return_value=("tap7\n", ""))
    monkeypatch.setattr(privsep.processutils, "execute", fake)
    return fake


def _argv():
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=512,
                       disks=(DiskSpec(f"/dev/zvol/zroot/nova/{UUID}-disk0"),),
                       nics=(NicSpec("v", "tap7d1e0b7c-2f", "fa:16:3e:aa:bb:cc",
                                     "bridge0"),))
    return bhyve_argv.build(spec, privsep._paths(),
                            f"{INSTANCES}/{UUID}/nvram.fd")


@pytest.mark.parametrize("name", [
    "vm1", UUID.upper(), UUID + "/..", "../" + UUID, "", None, 42])
def test_names_must_be_instance_uuids(name):
    with pytest.raises(privsep.PrivilegeError):
        privsep.check_uuid(name)


@pytest.mark.parametrize("path", [
    "/etc/passwd", f"{INSTANCES}/../../etc/passwd", f"{INSTANCES}",
    "relative/path", f"{INSTANCES}/{UUID}/x,y", f"{INSTANCES}x/{UUID}/a"])
def test_paths_are_confined(path):
    with pytest.raises(privsep.PrivilegeError):
        privsep.check_instance_path(path)


def test_instance_path_of_another_instance_is_refused():
    other = "11111111-2222-4333-8444-555555555555"
    assert privsep.check_instance_path(f"{INSTANCES}/{UUID}/ckp", UUID)
    with pytest.raises(privsep.PrivilegeError):
        privsep.check_instance_path(f"{INSTANCES}/{other}/ckp", UUID)


@pytest.mark.parametrize("name,snap,ok", [
    (f"zroot/nova/{UUID}-disk0", False, True),
    ("zroot/nova/images/abc@base", True, True),
    ("zroot/nova/images/abc@base", False, False),
    ("zroot/other", False, False),
    ("zroot/nova", False, False),
    ("zroot/nova/../other", False, False),
    ("zroot/nova/a b", False, False),
    ("zroot/nova/x;rm -rf /", False, False),
])
def test_datasets(name, snap, ok):
    if ok:
        assert privsep.check_dataset(name, allow_snapshot=snap) == name
    else:
        with pytest.raises(privsep.PrivilegeError):
            privsep.check_dataset(name, allow_snapshot=snap)


@pytest.mark.parametrize("tap", ["em0", "tap", "tap; ifconfig", "tapABCDEF",
                                 "tap0123456789abcdef"])
def test_tap_names(tap):
    with pytest.raises(privsep.PrivilegeError):
        privsep.check_tap(tap)


def test_start_guest_pins_daemon_supervisor_and_bhyve(execute):
    argv = _argv()
    privsep.start_guest(UUID, argv)
    cmd = list(execute.call_args.args)
    assert cmd[0] == "/usr/sbin/daemon"
    assert cmd[cmd.index("--") + 1:cmd.index("--") + 4] == [
        sys.executable, "-m", "nova_bhyve.machine.supervise"]
    assert cmd[-len(argv):] == argv
    restart = json.loads(cmd[cmd.index("--before-restart") + 1])
    assert restart == ["/usr/sbin/bhyvectl", "--destroy", f"--vm={UUID}"]


@pytest.mark.parametrize("bad", [
    lambda a: ["/bin/sh", "-c", "id"] + a[-1:],
    lambda a: a[:-1] + ["-k", "/tmp/x.conf", UUID],
    lambda a: [x.replace(f"/dev/zvol/zroot/nova/{UUID}-disk0", "/dev/ada0")
               for x in a],
])
def test_start_guest_refuses_other_commands(execute, bad):
    with pytest.raises(privsep.PrivilegeError):
        privsep.start_guest(UUID, bad(_argv()))
    execute.assert_not_called()


def test_start_guest_name_must_match(execute):
    other = "11111111-2222-4333-8444-555555555555"
    with pytest.raises(privsep.PrivilegeError):
        privsep.start_guest(other, _argv())
    execute.assert_not_called()


def test_entrypoints_check_before_running(execute):
    with pytest.raises(privsep.PrivilegeError):
        privsep.zfs("destroy", "zroot/ROOT/default")
    with pytest.raises(privsep.PrivilegeError):
        privsep.zfs("rollback", f"zroot/nova/{UUID}-disk0")
    with pytest.raises(privsep.PrivilegeError):
        privsep.zfs("create-volume", f"zroot/nova/{UUID}-disk0", size_gb=10**9)
    with pytest.raises(privsep.PrivilegeError):
        privsep.destroy_vmm("not-a-uuid")
    with pytest.raises(privsep.PrivilegeError):
        privsep.checkpoint_guest(UUID, "/tmp/ckp")
    with pytest.raises(privsep.PrivilegeError):
        privsep.create_tap("em0", "bridge0", "fa:16:3e:aa:bb:cc")
    with pytest.raises(privsep.PrivilegeError):
        privsep.create_tap("tap7d1e0b7c-2f", "bridge0; reboot", "fa:16:3e:aa:bb:cc")
    with pytest.raises(privsep.PrivilegeError):
        privsep.signal_guest(UUID, "HUP")
    with pytest.raises(privsep.PrivilegeError):
        privsep.copy_image("/etc/master.passwd", f"{INSTANCES}/{UUID}/x")
    execute.assert_not_called()


def test_entrypoints_build_their_own_commands(execute):
    privsep.zfs("clone", f"zroot/nova/{UUID}-disk0",
                origin="zroot/nova/images/abc@base")
    assert execute.call_args.args == (
        "/sbin/zfs", "clone", "-o", "volmode=dev", "zroot/nova/images/abc@base",
        f"zroot/nova/{UUID}-disk0")
    privsep.checkpoint_guest(UUID, f"{INSTANCES}/{UUID}/checkpoint")
    assert execute.call_args.args == (
        "/usr/sbin/bhyvectl", f"--suspend={INSTANCES}/{UUID}/checkpoint",
        f"--vm={UUID}")
    privsep.create_tap("tap7d1e0b7c-2f", "bridge0", "fa:16:3e:aa:bb:cc")
    calls = [c.args for c in execute.call_args_list[-4:]]
    assert calls[0] == ("/sbin/ifconfig", "tap", "create")
    assert calls[1] == ("/sbin/ifconfig", "tap7", "name", "tap7d1e0b7c-2f")
    assert calls[3][1:] == ("bridge0", "addm", "tap7d1e0b7c-2f")


def test_signal_guest_checks_the_process(tmp_path, conf):
    conf.set_override("instances_path", str(tmp_path))
    (tmp_path / UUID).mkdir()
    (tmp_path / UUID / "child.pid").write_text(json.dumps({"pid": 1}))
    assert privsep.signal_guest(UUID, "KILL") is False     # pid 1 refused
    import os
    (tmp_path / UUID / "child.pid").write_text(json.dumps({"pid": os.getpid()}))
    with pytest.raises(privsep.PrivilegeError, match="not the bhyve"):
        privsep.signal_guest(UUID, "KILL")
