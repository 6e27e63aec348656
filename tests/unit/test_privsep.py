"""The privileged helper refuses anything it was not built to run."""

import json
import os
import stat
import sys
import types
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


@pytest.fixture
def files(tmp_path, conf, monkeypatch):
    """Real instances_path and /dev/zvol below tmp_path, and an outside.

    ``outside/secret`` stands for /etc/crontab or /etc/shadow.  The zvols
    are character devices like /dev/null (FreeBSD's zvols are character
    devices).
    """
    tree = types.SimpleNamespace(
        instances=tmp_path / "instances", zvol=tmp_path / "zvol",
        outside=tmp_path / "outside", runtime=tmp_path / "runtime")
    tree.inst = tree.instances / UUID
    tree.inst.mkdir(parents=True)
    tree.run = tree.runtime / UUID
    tree.run.mkdir(parents=True)
    (tree.instances / "_base").mkdir()
    tree.outside.mkdir()
    tree.secret = tree.outside / "secret"
    tree.secret.write_bytes(b"root:secret\n")
    tree.images = tree.zvol / "zroot" / "nova" / "images"
    tree.images.mkdir(parents=True)
    for node in (tree.images / "abc", tree.images / "abc@base",
                 tree.zvol / "zroot" / "nova" / f"{UUID}-disk0",
                 tree.zvol / "zroot" / "nova" / f"{UUID}-disk0@snap"):
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (tree.inst / "nvram.fd").write_bytes(b"vars")
    conf.set_override("instances_path", str(tree.instances))
    conf.set_override("runtime_path", str(tree.runtime), group="bhyve")
    monkeypatch.setattr(privsep, "ZVOL_DIR", str(tree.zvol))
    return tree


def _argv(restore_from=None):
    paths = privsep._paths()
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=512,
                       disks=(DiskSpec(f"{paths.zvol_root}/{UUID}-disk0"),),
                       nics=(NicSpec("v", "tap7d1e0b7c-2f", "fa:16:3e:aa:bb:cc",
                                     "bridge0"),))
    return bhyve_argv.build(spec, paths,
                            f"{paths.instances_path}/{UUID}/nvram.fd",
                            restore_from=restore_from)


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


def test_start_guest_pins_daemon_supervisor_and_bhyve(execute, files):
    argv = _argv()
    privsep.start_guest(UUID, argv)
    cmd = list(execute.call_args.args)
    assert cmd[:3] == ["/usr/sbin/daemon", "-f", "--"]     # no -o, no -P
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
        privsep.zfs("create-volume", f"zroot/nova/{UUID}-swap", size_mb="1G")
    with pytest.raises(privsep.PrivilegeError):
        privsep.zfs("create-volume", "zroot/nova/../swap", size_mb=512)
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
    privsep.zfs("create-volume", f"zroot/nova/{UUID}-swap", size_mb=512)
    assert execute.call_args.args == (
        "/sbin/zfs", "create", "-p", "-s", "-V", "512M", "-o", "volmode=dev",
        "-o", "snapdev=visible", f"zroot/nova/{UUID}-swap")
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
    conf.set_override("runtime_path", str(tmp_path), group="bhyve")
    (tmp_path / UUID).mkdir()
    (tmp_path / UUID / "child.pid").write_text(json.dumps({"pid": 1}))
    assert privsep.signal_guest(UUID, "KILL") is False     # pid 1 refused
    import os
    (tmp_path / UUID / "child.pid").write_text(json.dumps({"pid": os.getpid()}))
    with pytest.raises(privsep.PrivilegeError, match="not the bhyve"):
        privsep.signal_guest(UUID, "KILL")


# -- tap and bridge plumbing --------------------------------------------------
TAP = "tap7d1e0b7c-2f"
MAC = "fa:16:3e:aa:bb:cc"


class FakeLinks:
    """processutils.execute for ifconfig(8) and ip(8): a few links, recorded.

    ``links`` maps an interface name to its description/alias; ``members``
    maps a bridge to its ports.
    """

    def __init__(self, links=(), members=None):
        self.links = dict(links)
        self.members = members or {}
        self.calls = []

    def __call__(self, *cmd, check_exit_code=(0,)):
        self.calls.append(cmd)
        args = [a for a in cmd[1:]]
        if cmd[0] == "/sbin/ip":
            if args[:1] == ["-n"]:
                args = args[2:]
            if args[:4] == ["-o", "link", "show", "dev"]:
                name = args[4]
                if name not in self.links:
                    return "", f'Device "{name}" does not exist.'
                return f"5: {name}: <UP> mtu 1500\\    alias " \
                       f"{self.links[name]}\n", ""
            if args[:4] == ["-o", "link", "show", "master"]:
                return "".join(f"9: {p}: <UP>\n" for p in
                               self.members.get(args[4], ())), ""
            return "", ""
        # ifconfig
        if len(args) == 1:
            name = args[0]
            if name not in self.links:
                return "", f"ifconfig: interface {name} does not exist"
            members = "".join(f"\tmember: {p} flags=143\n"
                              for p in self.members.get(name, ()))
            return (f"{name}: flags=8843<UP>\n\tdescription: "
                    f"{self.links[name]}\n{members}"), ""
        if args[1:] == ["create"]:
            return f"{args[0]}3\n", ""
        return "", ""


@pytest.fixture
def links(monkeypatch):
    def make(**kwargs):
        fake = FakeLinks(**kwargs)
        monkeypatch.setattr(privsep.processutils, "execute", fake)
        return fake
    return make


@pytest.fixture
def netns(conf, tmp_path, monkeypatch):
    conf.set_override("testhost_netns", "nb-host2", group="bhyve")
    monkeypatch.setattr(privsep, "NETNS_DIR", str(tmp_path))
    yield tmp_path
    conf.clear_override("testhost_netns", group="bhyve")


def test_freebsd_makes_a_missing_bridge_then_adds_the_tap(links):
    fake = links()
    privsep.create_tap(TAP, "nbr3f2a9c1e7b4", MAC)
    assert fake.calls == [
        ("/sbin/ifconfig", "nbr3f2a9c1e7b4"),
        ("/sbin/ifconfig", "bridge", "create"),
        ("/sbin/ifconfig", "bridge3", "name", "nbr3f2a9c1e7b4"),
        ("/sbin/ifconfig", "nbr3f2a9c1e7b4", "description", "nova-bhyve",
         "up"),
        ("/sbin/ifconfig", "tap", "create"),
        ("/sbin/ifconfig", "tap3", "name", TAP),
        ("/sbin/ifconfig", TAP, "description", f"nova-bhyve {MAC}", "up"),
        ("/sbin/ifconfig", "nbr3f2a9c1e7b4", "addm", TAP)]


def test_freebsd_uses_an_existing_bridge(links):
    fake = links(links={"bridge0": "uplink"})
    privsep.create_tap(TAP, "bridge0", MAC)
    assert ("/sbin/ifconfig", "bridge", "create") not in fake.calls
    assert fake.calls[-1] == ("/sbin/ifconfig", "bridge0", "addm", TAP)


@pytest.mark.parametrize("owner,members,destroyed", [
    ("nova-bhyve", (), True),
    ("nova-bhyve", ("tap1234",), False),        # another guest's tap
    ("uplink", (), False),                      # the operator's bridge
])
def test_freebsd_destroys_only_its_own_empty_bridge(links, owner, members,
                                                    destroyed):
    fake = links(links={"bridge0": owner}, members={"bridge0": members})
    privsep.destroy_tap(TAP, "bridge0")
    assert fake.calls[0] == ("/sbin/ifconfig", TAP, "destroy")
    assert (("/sbin/ifconfig", "bridge0", "destroy") in fake.calls) == \
        destroyed


def test_linux_plug_makes_namespace_bridge_and_tap(links, netns,
                                                   monkeypatch):
    fake = links()
    real_ip = privsep._ip

    def ip(ns, *args, **kwargs):    # `ip netns add` makes the namespace
        if args[:2] == ("netns", "add"):
            (netns / args[2]).touch()
        return real_ip(ns, *args, **kwargs)
    monkeypatch.setattr(privsep, "_ip", ip)
    privsep.plug_tap_linux(TAP, "nbr3f2a9c1e7b4", MAC)
    n = ("/sbin/ip", "-n", "nb-host2")
    assert fake.calls == [
        ("/sbin/ip", "netns", "add", "nb-host2"),
        n + ("link", "set", "dev", "lo", "up"),
        n + ("-o", "link", "show", "dev", "nbr3f2a9c1e7b4"),
        n + ("link", "add", "name", "nbr3f2a9c1e7b4", "type", "bridge"),
        n + ("link", "set", "dev", "nbr3f2a9c1e7b4", "alias", "nova-bhyve"),
        n + ("link", "set", "dev", "nbr3f2a9c1e7b4", "up"),
        n + ("-o", "link", "show", "dev", TAP),
        n + ("tuntap", "add", "dev", TAP, "mode", "tap"),
        n + ("link", "set", "dev", TAP, "address", "fe:16:3e:aa:bb:cc"),
        n + ("link", "set", "dev", TAP, "master", "nbr3f2a9c1e7b4"),
        n + ("link", "set", "dev", TAP, "up")]


def test_linux_plug_again_keeps_what_exists(links, netns):
    (netns / "nb-host2").touch()
    fake = links(links={"nbr3f2a9c1e7b4": "nova-bhyve", TAP: ""})
    privsep.plug_tap_linux(TAP, "nbr3f2a9c1e7b4", MAC)
    made = [c for c in fake.calls if "add" in c]
    assert made == []
    assert fake.calls[-2][-4:] == ("dev", TAP, "master", "nbr3f2a9c1e7b4")


def test_linux_without_a_namespace_runs_plain_ip(links, conf):
    fake = links()
    privsep.plug_tap_linux(TAP, "", MAC)
    assert all(c[1] != "-n" and "netns" not in c for c in fake.calls)
    assert not any("master" in c for c in fake.calls)


@pytest.mark.parametrize("owner,members,deleted", [
    ("nova-bhyve", (), True),
    ("nova-bhyve", ("tap1234",), False),
    ("", (), False),
])
def test_linux_unplug_deletes_only_its_own_empty_bridge(links, netns, owner,
                                                        members, deleted):
    (netns / "nb-host2").touch()
    fake = links(links={"br0": owner}, members={"br0": members})
    privsep.unplug_tap_linux(TAP, "br0")
    n = ("/sbin/ip", "-n", "nb-host2")
    assert fake.calls[0] == n + ("link", "del", "dev", TAP)
    assert (n + ("link", "del", "dev", "br0") in fake.calls) == deleted


def test_linux_unplug_in_a_namespace_never_made_does_nothing(links, netns):
    fake = links()
    privsep.unplug_tap_linux(TAP, "br0")
    assert fake.calls == []


@pytest.mark.parametrize("name", ["../../proc/1/ns/net", "a/b", ".hidden",
                                  "x" * 33, "ns with space", None])
def test_namespace_names_are_checked(links, conf, name):
    fake = links()
    conf.set_override("testhost_netns", name, group="bhyve")
    try:
        with pytest.raises(privsep.PrivilegeError):
            privsep.plug_tap_linux(TAP, "br0", MAC)
        with pytest.raises(privsep.PrivilegeError):
            privsep.unplug_tap_linux(TAP, "br0")
    finally:
        conf.clear_override("testhost_netns", group="bhyve")
    assert fake.calls == []


@pytest.mark.parametrize("tap,bridge,mac", [
    ("eth0", "br0", MAC), (TAP, "br-ex;reboot", MAC), (TAP, "br0", "FA:16"),
    (TAP, "br0", None)])
def test_linux_plug_checks_its_arguments(links, conf, tap, bridge, mac):
    fake = links()
    with pytest.raises(privsep.PrivilegeError):
        privsep.plug_tap_linux(tap, bridge, mac)
    assert fake.calls == []


# -- files opened as root: no link followed, nothing touched outside ----------
def _untouched(files):
    assert files.secret.read_bytes() == b"root:secret\n"
    assert sorted(p.name for p in files.outside.iterdir()) == ["secret"]


def _plant(files, rel, how, root=None):
    """Make instances/<rel> (or <root>/<rel>) a symlink or hard link to
    outside/secret, or make its first directory a symlink to outside (a
    middle component)."""
    root = files.instances if root is None else root
    path = root / rel
    if how == "middle":
        first = root / rel.split("/")[0]
        if first.is_dir():
            for child in first.iterdir():
                child.unlink()
            first.rmdir()
        first.symlink_to(files.outside)
        return
    if path.exists():
        path.unlink()
    if how == "symlink":
        path.symlink_to(files.secret)
    else:
        os.link(files.secret, path)


def test_copy_image_from_the_image_cache_and_to_a_snapshot_file(files):
    (files.instances / "_base" / "abc").write_bytes(b"image")
    privsep.copy_image(str(files.instances / "_base" / "abc"),
                       f"{files.zvol}/zroot/nova/images/abc")
    raw = files.inst / "snapshot.raw"
    raw.write_bytes(b"stale")               # left by a crash: replaced
    privsep.copy_image(f"{files.zvol}/zroot/nova/{UUID}-disk0@snap", str(raw))
    assert raw.read_bytes() == b""          # the null device reads empty
    assert stat.S_IMODE(raw.stat().st_mode) & 0o044 == 0o044    # nova reads it
    _untouched(files)


@pytest.mark.parametrize("how", ["symlink", "hardlink", "middle"])
def test_copy_image_refuses_a_planted_source(files, how):
    (files.instances / "_base" / "abc").write_bytes(b"image")
    _plant(files, "_base/abc", how)
    with pytest.raises(privsep.PrivilegeError,
                       match="symbolic link|hard links"):
        privsep.copy_image(str(files.instances / "_base" / "abc"),
                           f"{files.zvol}/zroot/nova/images/abc")
    _untouched(files)


@pytest.mark.parametrize("how", ["symlink", "hardlink", "middle"])
def test_copy_image_refuses_a_planted_destination(files, how):
    rel = f"{UUID}/snapshot.raw"
    (files.instances / rel).write_bytes(b"stale")
    _plant(files, rel, how)
    with pytest.raises(privsep.PrivilegeError,
                       match="symbolic link|hard links"):
        privsep.copy_image(f"{files.zvol}/zroot/nova/{UUID}-disk0@snap",
                           str(files.instances / rel))
    _untouched(files)


@pytest.mark.parametrize("how", ["symlink", "middle", "regular"])
def test_copy_image_refuses_a_zvol_that_is_not_a_device(files, how):
    (files.instances / "_base" / "abc").write_bytes(b"image")
    node = files.images / "abc"
    node.unlink()
    if how == "symlink":
        node.symlink_to(files.secret)
    elif how == "middle":
        for child in files.images.iterdir():
            child.unlink()
        files.images.rmdir()
        files.images.symlink_to(files.outside)
        (files.outside / "abc").write_bytes(b"")    # what a link would reach
    else:
        node.write_bytes(b"")
    with pytest.raises(privsep.PrivilegeError,
                       match="symbolic link|not a zvol"):
        privsep.copy_image(str(files.instances / "_base" / "abc"), str(node))
    assert files.secret.read_bytes() == b"root:secret\n"
    if how == "middle":
        assert (files.outside / "abc").read_bytes() == b""


def test_copy_image_checks_both_names_before_opening(files):
    (files.inst / "x").write_bytes(b"x")
    with pytest.raises(privsep.PrivilegeError):
        privsep.copy_image(str(files.inst / "x"), str(files.secret))
    with pytest.raises(privsep.PrivilegeError):
        privsep.copy_image(str(files.secret), str(files.inst / "x"))
    assert (files.inst / "x").read_bytes() == b"x"
    _untouched(files)


def test_checkpoint_guest_checks_the_files_bhyve_writes(files, execute):
    base = files.inst / "checkpoint"
    privsep.checkpoint_guest(UUID, str(base))       # none there yet
    base.write_bytes(b"old")                        # a stale set is fine
    privsep.checkpoint_guest(UUID, str(base))
    assert execute.call_count == 2


@pytest.mark.parametrize("ext", ["", ".kern", ".meta"])
@pytest.mark.parametrize("how", ["symlink", "hardlink", "middle"])
def test_checkpoint_guest_refuses_planted_files(files, execute, ext, how):
    rel = f"{UUID}/checkpoint{ext}"
    (files.instances / rel).write_bytes(b"old")
    _plant(files, rel, how)
    with pytest.raises(privsep.PrivilegeError,
                       match="symbolic link|hard links"):
        privsep.checkpoint_guest(UUID, str(files.inst / "checkpoint"))
    execute.assert_not_called()
    _untouched(files)


@pytest.mark.parametrize("how", ["symlink", "hardlink", "middle"])
def test_signal_guest_refuses_a_planted_pid_file(files, how):
    (files.run / "child.pid").write_text(json.dumps({"pid": 2}))
    _plant(files, f"{UUID}/child.pid", how, files.runtime)
    with pytest.raises(privsep.PrivilegeError,
                       match="symbolic link|hard links"):
        privsep.signal_guest(UUID, "KILL")
    _untouched(files)


def test_signal_guest_without_a_pid_file(files):
    assert privsep.signal_guest(UUID, "KILL") is False


def test_start_guest_checks_disk_nvram_and_restore_files(files, execute):
    for ext in ("", ".kern", ".meta"):
        (files.inst / f"checkpoint{ext}").write_bytes(b"ckp")
    argv = _argv(restore_from=str(files.inst / "checkpoint"))
    privsep.start_guest(UUID, argv)
    assert list(execute.call_args.args[-len(argv):]) == argv


@pytest.mark.parametrize("name", ["nvram.fd", "checkpoint", "checkpoint.kern",
                                  "checkpoint.meta"])
@pytest.mark.parametrize("how", ["symlink", "hardlink", "middle"])
def test_start_guest_refuses_planted_files(files, execute, name, how):
    for ext in ("", ".kern", ".meta"):
        (files.inst / f"checkpoint{ext}").write_bytes(b"ckp")
    argv = _argv(restore_from=str(files.inst / "checkpoint"))
    _plant(files, f"{UUID}/{name}", how)
    with pytest.raises(privsep.PrivilegeError,
                       match="symbolic link|hard links"):
        privsep.start_guest(UUID, argv)
    execute.assert_not_called()
    _untouched(files)


@pytest.mark.parametrize("how", ["symlink", "regular", "missing"])
def test_start_guest_refuses_a_disk_that_is_not_a_zvol(files, execute, how):
    disk = files.zvol / "zroot" / "nova" / f"{UUID}-disk0"
    disk.unlink()
    if how == "symlink":
        disk.symlink_to(files.secret)
    elif how == "regular":
        disk.write_bytes(b"")
    with pytest.raises(privsep.PrivilegeError,
                       match="symbolic link|not a zvol|does not exist"):
        privsep.start_guest(UUID, _argv())
    execute.assert_not_called()


def test_the_supervisor_keeps_its_files_in_runtime_path(files, execute):
    """pid, exit and log files and the console go to this host's runtime
    directory, not to a (possibly shared) instance directory."""
    privsep.start_guest(UUID, _argv())
    cmd = execute.call_args.args
    rundir = cmd[cmd.index("--rundir") + 1]
    assert rundir == str(files.run)
    assert cmd[cmd.index("--stdout") + 1] == f"{files.run}/console.log"
