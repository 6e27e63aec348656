"""bhyve(8) command lines, checked against the FreeBSD 15.1 manual."""

import dataclasses
import re

import pytest

from nova_bhyve.machine import argv as bhyve_argv
from nova_bhyve.machine.base import DiskSpec, MachineSpec, NicSpec

UUID = "0c9d3f2e-6a1b-4c8d-9e7f-112233445566"
PATHS = bhyve_argv.BhyvePaths(
    bhyve="/usr/sbin/bhyve",
    firmware="/usr/local/share/uefi-firmware/BHYVE_UEFI_CODE.fd",
    instances_path="/var/lib/nova/instances",
    zvol_root="/dev/zvol/zroot/nova")
NVRAM = f"/var/lib/nova/instances/{UUID}/nvram.fd"
# -s slot forms from bhyve(8): pcislot, pcislot:function, bus:pcislot:function
SLOT_RE = re.compile(r"^(?:(\d{1,3}):)?(\d{1,2})(?::(\d))?,([a-z0-9_-]+)(,.*)?$")


def _spec(disks=1, nics=2, vnc="127.0.0.1"):
    return MachineSpec(
        uuid=UUID, vcpus=2, memory_mb=1024,
        disks=tuple(DiskSpec(f"/dev/zvol/zroot/nova/{UUID}-disk{i}")
                    for i in range(disks)),
        nics=tuple(NicSpec(vif_id=f"v{i}", tap=f"tap1234567890{i}"[:14],
                           mac=f"fa:16:3e:00:00:0{i}", bridge="bridge0")
                   for i in range(nics)),
        vnc_listen=vnc, vnc_port=5901)


def _options(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_full_command_line_follows_the_manual():
    argv = bhyve_argv.build(_spec(disks=3, nics=2), PATHS, NVRAM)
    assert argv[0] == "/usr/sbin/bhyve" and argv[-1] == UUID
    assert _options(argv, "-c") == ["2"]
    assert _options(argv, "-m") == ["1024M"]
    assert "-A" not in argv          # removed from bhyve(8) in FreeBSD 15
    slots = []
    for dev in _options(argv, "-s"):
        m = SLOT_RE.match(dev)
        assert m, dev
        slot, func = int(m.group(2)), int(m.group(3) or 0)
        assert 0 <= slot <= 31 and 0 <= func <= 7
        slots.append((slot, func))
    assert len(slots) == len(set(slots)), "PCI slot collision"
    devices = _options(argv, "-s")
    assert "0,hostbridge" in devices and "31,lpc" in devices
    assert [d for d in devices if ",virtio-blk," in d] == [
        f"{2 + i},virtio-blk,/dev/zvol/zroot/nova/{UUID}-disk{i}"
        for i in range(3)]
    assert "20,virtio-net,tap12345678900,mac=fa:16:3e:00:00:00" in devices
    assert "29,fbuf,tcp=127.0.0.1:5901,w=1024,h=768" in devices
    assert "30,xhci,tablet" in devices
    assert _options(argv, "-l") == [
        "com1,stdio", f"bootrom,{PATHS.firmware},{NVRAM}"]
    assert _options(argv, "-U") == [UUID]
    assert bhyve_argv.validate(argv, PATHS) == UUID


# bhyve(8), FreeBSD 15.1, SYNOPSIS: "... [-s slot,emulation[,conf]] ...
# vmname"; a virtio-blk conf starts with the backing file or device path.
def test_extra_disks_take_the_slots_after_the_root_disk():
    root = DiskSpec(f"/dev/zvol/zroot/nova/{UUID}-disk0", boot=True)
    swap = DiskSpec(f"/dev/zvol/zroot/nova/{UUID}-swap", name="swap",
                    size_mb=512)
    eph = DiskSpec(f"/dev/zvol/zroot/nova/{UUID}-eph0", name="eph0",
                   size_mb=1024)
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=512,
                       disks=(root, swap, eph))
    argv = bhyve_argv.build(spec, PATHS, NVRAM)
    blk = [d for d in _options(argv, "-s") if ",virtio-blk," in d]
    assert blk == [f"2,virtio-blk,{root.path}", f"3,virtio-blk,{swap.path}",
                   f"4,virtio-blk,{eph.path}"]
    for dev in blk:
        m = SLOT_RE.match(dev)
        assert m and m.group(4) == "virtio-blk" and m.group(5)[1:] in (
            root.path, swap.path, eph.path)
    bhyve_argv.validate(argv, PATHS)
    outside = DiskSpec("/dev/zvol/zroot/other/swap", name="swap")
    bad = bhyve_argv.build(dataclasses.replace(spec, disks=(root, outside)),
                           PATHS, NVRAM)
    with pytest.raises(bhyve_argv.ArgvError, match="zvol under"):
        bhyve_argv.validate(bad, PATHS)


def test_disk_files_of_the_file_layout_are_virtio_blk_files():
    """disk_layout = file: ``-s slot,virtio-blk,path`` with a regular file
    as the backing path (bhyve(8)), only in the instance's own directory."""
    folder = f"{PATHS.instances_path}/{UUID}"
    disks = (DiskSpec(f"{folder}/disk", boot=True),
             DiskSpec(f"{folder}/disk.swap", name="swap", size_mb=64),
             DiskSpec(f"{folder}/disk.eph0", name="eph0", size_mb=128))
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=512, disks=disks)
    argv = bhyve_argv.build(spec, PATHS, NVRAM)
    blk = [d for d in _options(argv, "-s") if ",virtio-blk," in d]
    assert blk == [f"{2 + i},virtio-blk,{d.path}" for i, d in enumerate(disks)]
    for dev in blk:
        m = SLOT_RE.match(dev)
        assert m and m.group(4) == "virtio-blk"
    assert bhyve_argv.validate(argv, PATHS) == UUID
    other = "1c9d3f2e-6a1b-4c8d-9e7f-112233445566"
    for path in (f"{PATHS.instances_path}/{other}/disk",      # another guest's
                 f"{PATHS.instances_path}/_base/0123abcd",    # the image cache
                 f"{folder}/../{other}/disk"):
        bad = bhyve_argv.build(dataclasses.replace(spec, disks=(
            DiskSpec(path, boot=True),)), PATHS, NVRAM)
        with pytest.raises(bhyve_argv.ArgvError, match=f"a file in {folder}"):
            bhyve_argv.validate(bad, PATHS)


def test_optional_parts():
    argv = bhyve_argv.build(_spec(nics=0, vnc=""), PATHS, NVRAM,
                            wire_memory=True, vnc_wait=True,
                            restore_from=f"/var/lib/nova/instances/{UUID}/checkpoint")
    assert "-S" in argv
    assert not any("fbuf" in d for d in _options(argv, "-s"))
    assert _options(argv, "-r") == [f"/var/lib/nova/instances/{UUID}/checkpoint"]
    bhyve_argv.validate(argv, PATHS)
    ipv6 = bhyve_argv.build(_spec(vnc="::1"), PATHS, NVRAM, vnc_wait=True)
    assert "29,fbuf,tcp=[::1]:5901,w=1024,h=768,wait" in _options(ipv6, "-s")
    bhyve_argv.validate(ipv6, PATHS)


def test_device_limits_keep_slots_in_range():
    argv = bhyve_argv.build(_spec(disks=18, nics=9), PATHS, NVRAM)
    bhyve_argv.validate(argv, PATHS)
    with pytest.raises(bhyve_argv.ArgvError):
        bhyve_argv.build(_spec(disks=19), PATHS, NVRAM)
    with pytest.raises(bhyve_argv.ArgvError):
        bhyve_argv.build(_spec(nics=10), PATHS, NVRAM)


def _replace(argv, old, new):
    return [new if a == old else a for a in argv]


@pytest.mark.parametrize("mutate,reason", [
    (lambda a: ["/bin/sh"] + a[1:], r"argv\[0\] must be"),
    (lambda a: a[:-1] + ["vm1"], "not an instance UUID"),
    (lambda a: a[:-1] + ["-k", "/tmp/cfg", UUID], "not allowed"),
    (lambda a: a[:-1] + ["-G", "1234", UUID], "not allowed"),
    (lambda a: _replace(a, "0,hostbridge", "32,hostbridge"), "slot must be"),
    (lambda a: _replace(a, "1,virtio-rnd", "0,virtio-rnd"), "used twice"),
    (lambda a: _replace(a, "1,virtio-rnd", "1,passthru,ppt0"), "not allowed"),
    (lambda a: _replace(a, f"2,virtio-blk,/dev/zvol/zroot/nova/{UUID}-disk0",
                        "2,virtio-blk,/etc/master.passwd"), "disk must be"),
    (lambda a: _replace(a, f"2,virtio-blk,/dev/zvol/zroot/nova/{UUID}-disk0",
                        "2,virtio-blk,/dev/zvol/zroot/nova/../other"),
     "disk must be"),
    (lambda a: _replace(a, "20,virtio-net,tap12345678900,mac=fa:16:3e:00:00:00",
                        "20,virtio-net,em0,mac=fa:16:3e:00:00:00"), "tapNAME"),
    (lambda a: _replace(a, "29,fbuf,tcp=127.0.0.1:5901,w=1024,h=768",
                        "29,fbuf,tcp=127.0.0.1:5901,password=x"), "not allowed"),
    (lambda a: _replace(a, "com1,stdio", "com1,/dev/nmdm0A"), "only com1"),
    (lambda a: _replace(a, f"bootrom,{PATHS.firmware},{NVRAM}",
                        f"bootrom,/tmp/evil.fd,{NVRAM}"), "only com1"),
    (lambda a: _replace(a, "31,lpc", "28,lpc"), "required"),
    (lambda a: _replace(a, "-m", "-p"), "not allowed"),
])
def test_validation_refuses(mutate, reason):
    argv = mutate(bhyve_argv.build(_spec(), PATHS, NVRAM))
    with pytest.raises(bhyve_argv.ArgvError, match=reason):
        bhyve_argv.validate(argv, PATHS)


def test_restore_file_must_be_in_the_instance_directory():
    argv = bhyve_argv.build(_spec(), PATHS, NVRAM, restore_from="/tmp/ckp")
    with pytest.raises(bhyve_argv.ArgvError, match="checkpoint"):
        bhyve_argv.validate(argv, PATHS)


@pytest.mark.parametrize("path,ok", [
    (f"/var/lib/nova/instances/{UUID}/disk", True),
    ("/var/lib/nova/instances/../../etc/passwd", False),
    ("var/lib/nova/instances/x", False),
    ("/var/lib/nova/instances", False),
    ("/var/lib/nova/instancesX/y", False),
    (f"/var/lib/nova/instances/{UUID}/a,b", False),
])
def test_confined(path, ok):
    assert bhyve_argv.confined(path, "/var/lib/nova/instances") is ok


def test_guest_files_are_what_bhyve_opens():
    argv = bhyve_argv.build(_spec(disks=2, nics=1), PATHS, NVRAM,
                            restore_from=f"{PATHS.instances_path}/{UUID}/ckp")
    base = f"{PATHS.instances_path}/{UUID}"
    assert bhyve_argv.guest_files(argv) == [
        (f"/dev/zvol/zroot/nova/{UUID}-disk0", "disk"),
        (f"/dev/zvol/zroot/nova/{UUID}-disk1", "disk"),
        (NVRAM, "nvram"),
        (f"{base}/ckp", "restore"), (f"{base}/ckp.kern", "restore"),
        (f"{base}/ckp.meta", "restore")]


@pytest.mark.parametrize("how", ["ok", "symlink", "hardlink", "middle",
                                 "missing"])
def test_file_disks_are_checked_below_the_instance_dir(tmp_path, how):
    paths = dataclasses.replace(PATHS, instances_path=str(tmp_path / "inst"))
    vm_dir = tmp_path / "inst" / UUID
    vm_dir.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("secret")
    (vm_dir / "nvram.fd").write_text("vars")
    disk = vm_dir / "disk.img"
    if how == "ok":
        disk.write_text("disk")
    elif how == "symlink":
        disk.symlink_to(secret)
    elif how == "hardlink":
        disk.hardlink_to(secret)
    elif how == "middle":
        (tmp_path / "inst" / UUID).rename(tmp_path / "real")
        (tmp_path / "inst" / UUID).symlink_to(tmp_path / "real")
        (tmp_path / "real" / "disk.img").write_text("disk")
    spec = dataclasses.replace(_spec(disks=0, nics=0),
                               disks=(DiskSpec(str(disk)),))
    argv = bhyve_argv.build(spec, paths, str(vm_dir / "nvram.fd"))
    bhyve_argv.validate(argv, paths)
    if how == "ok":
        bhyve_argv.check_guest_files(argv, paths)
    else:
        with pytest.raises(bhyve_argv.ArgvError,
                           match="symbolic link|hard links|does not exist"):
            bhyve_argv.check_guest_files(argv, paths)
    assert secret.read_text() == "secret"


def test_a_migrated_guest_restores_from_its_incoming_checkpoint():
    """finish_incoming runs ``bhyve -r <runtime_path>/<uuid>/incoming``:
    that one path below the runtime path, and no other, is accepted."""
    paths = dataclasses.replace(PATHS, runtime_path="/var/db/nova/run")
    incoming = f"/var/db/nova/run/{UUID}/incoming"
    assert bhyve_argv.incoming_checkpoint(paths, UUID) == incoming
    argv = bhyve_argv.build(_spec(), paths, NVRAM, restore_from=incoming)
    assert bhyve_argv.validate(argv, paths) == UUID
    other = "1c9d3f2e-6a1b-4c8d-9e7f-112233445566"
    for path, where in ((incoming, PATHS),      # no runtime path known
                        (f"/var/db/nova/run/{other}/incoming", paths),
                        (f"/var/db/nova/run/{UUID}/console.log", paths),
                        (f"/var/db/nova/run/{UUID}/../{other}/incoming",
                         paths)):
        bad = bhyve_argv.build(_spec(), where, NVRAM, restore_from=path)
        with pytest.raises(bhyve_argv.ArgvError, match="incoming checkpoint"):
            bhyve_argv.validate(bad, where)


@pytest.mark.parametrize("how", ["ok", "symlink"])
def test_the_incoming_checkpoint_is_checked_below_the_runtime_path(
        tmp_path, how):
    paths = dataclasses.replace(PATHS, instances_path=str(tmp_path / "inst"),
                                runtime_path=str(tmp_path / "run"))
    (tmp_path / "inst" / UUID).mkdir(parents=True)
    nvram = tmp_path / "inst" / UUID / "nvram.fd"
    nvram.write_text("vars")
    run = tmp_path / "run" / UUID
    run.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("secret")
    for ext in ("", ".kern", ".meta"):
        if how == "symlink" and ext == ".meta":
            (run / f"incoming{ext}").symlink_to(secret)
        else:
            (run / f"incoming{ext}").write_text("set")
    spec = dataclasses.replace(_spec(disks=0, nics=0), disks=())
    argv = bhyve_argv.build(spec, paths, str(nvram),
                            restore_from=str(run / "incoming"))
    bhyve_argv.validate(argv, paths)
    if how == "ok":
        bhyve_argv.check_guest_files(argv, paths)
    else:
        with pytest.raises(bhyve_argv.ArgvError, match="symbolic link"):
            bhyve_argv.check_guest_files(argv, paths)
