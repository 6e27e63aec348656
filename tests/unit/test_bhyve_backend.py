"""The bhyve backend's use of the privileged helper (FreeBSD not needed)."""

import json
import os
import types
from unittest import mock

import pytest

from nova import objects
from nova_bhyve.conf import CONF
from nova_bhyve.machine import bhyve, power
from nova_bhyve.machine.base import (
    DiskSpec,
    MachineError,
    MachineSpec,
    MachineState,
    NicSpec,
)
from nova_bhyve.privsep import PrivilegeError

UUID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"


@pytest.fixture
def backend(tmp_path, monkeypatch):
    CONF.set_override("zfs_dataset", "zroot/nova", group="bhyve")
    vars_template = tmp_path / "VARS.fd"
    vars_template.write_bytes(b"NVRAM")
    CONF.set_override("uefi_vars_template", str(vars_template), group="bhyve")
    helper = mock.Mock()
    monkeypatch.setattr(bhyve, "privsep", helper)
    be = bhyve.BhyveBackend(CONF, str(tmp_path / "instances"))
    be.helper = helper
    yield be
    CONF.clear_override("zfs_dataset", group="bhyve")
    CONF.clear_override("uefi_vars_template", group="bhyve")


def _create(be, monkeypatch, uuid=UUID, vnc="127.0.0.1"):
    def fetch(context, image_id, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
    monkeypatch.setattr(bhyve.images, "fetch_raw", fetch)
    instance = types.SimpleNamespace(flavor=types.SimpleNamespace(root_gb=20))
    meta = mock.Mock(id="img-1")
    meta.obj_attr_is_set.return_value = True
    spec = MachineSpec(uuid=uuid, vcpus=2, memory_mb=2048, vnc_listen=vnc)
    return be.create(None, instance, spec, meta)


def test_create_clones_the_cached_image(backend, monkeypatch):
    spec = _create(backend, monkeypatch)
    calls = [(c.args[0], c.args[1], c.kwargs)
             for c in backend.helper.zfs.call_args_list]
    key = bhyve.hashlib.sha1(b"img-1").hexdigest()
    assert calls == [
        ("destroy", f"zroot/nova/images/{key}", {}),
        ("create-volume", f"zroot/nova/images/{key}", {"size_gb": 1}),
        ("snapshot", f"zroot/nova/images/{key}@base", {}),
        ("clone", f"zroot/nova/{UUID}-disk0",
         {"origin": f"zroot/nova/images/{key}@base"}),
        ("resize", f"zroot/nova/{UUID}-disk0", {"size_gb": 20}),
    ]
    assert spec.disks[0].path == f"/dev/zvol/zroot/nova/{UUID}-disk0"
    assert spec.vnc_port == 5900
    nvram = backend._path(UUID, "nvram.fd")
    assert open(nvram, "rb").read() == b"NVRAM"
    record = json.load(open(backend._run(UUID, "machine.json")))
    assert record["intent"] == power.INTENT_STOPPED
    # the next guest gets the next VNC port
    other = "1a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
    assert _create(backend, monkeypatch, uuid=other).vnc_port == 5901


def test_start_boots_or_restores(backend, monkeypatch):
    _create(backend, monkeypatch)
    running = iter([False, True])
    monkeypatch.setattr(backend, "_running", lambda uuid: next(running, True))
    monkeypatch.setattr(backend, "_child_pid", lambda uuid: 4242)
    backend.start(UUID)
    uuid, argv = backend.helper.start_guest.call_args.args
    assert uuid == UUID and argv[-1] == UUID and "-r" not in argv
    backend.helper.destroy_vmm.assert_called_with(UUID)

    backend._set_intent(UUID, power.INTENT_SUSPENDED)
    files = backend._checkpoint(UUID)
    for path in (files.ram, files.kern, files.meta):
        open(path, "w").close()
    running = iter([False, True])
    backend.start(UUID)
    argv = backend.helper.start_guest.call_args.args[1]
    assert argv[argv.index("-r") + 1] == files.base


def test_a_start_the_helper_refuses_is_a_machine_error(backend, monkeypatch):
    _create(backend, monkeypatch)
    backend.helper.start_guest.side_effect = PrivilegeError(
        "disk.img: a symbolic link")
    with pytest.raises(MachineError, match="refused to start guest .*link"):
        backend.start(UUID)


def test_stop_timeout_zero_kills_at_once(backend, monkeypatch):
    _create(backend, monkeypatch)
    alive = {"v": True}
    monkeypatch.setattr(backend, "_running", lambda uuid: alive["v"])
    monkeypatch.setattr(backend, "state", lambda uuid: MachineState.RUNNING)

    def signal_guest(uuid, name):
        if name == "KILL":
            alive["v"] = False
    backend.helper.signal_guest.side_effect = signal_guest
    backend.stop(UUID, 0)
    assert [c.args[1] for c in backend.helper.signal_guest.call_args_list] == [
        "KILL"]
    assert json.load(open(backend._run(UUID, "machine.json")))["intent"] == \
        power.INTENT_STOPPED


def test_graceful_stop_sends_the_acpi_power_button(backend, monkeypatch):
    _create(backend, monkeypatch)
    alive = {"v": True}
    monkeypatch.setattr(backend, "_running", lambda uuid: alive["v"])
    monkeypatch.setattr(backend, "state", lambda uuid: MachineState.RUNNING)

    def signal_guest(uuid, name):
        if name == "TERM":
            alive["v"] = False          # the guest honours ACPI power-off
    backend.helper.signal_guest.side_effect = signal_guest
    backend.stop(UUID, 30, 5)
    assert [c.args[1] for c in backend.helper.signal_guest.call_args_list] == [
        "TERM"]


def test_paused_means_a_stopped_bhyve_process(backend, monkeypatch):
    _create(backend, monkeypatch)
    monkeypatch.setattr(backend, "_running", lambda uuid: True)
    monkeypatch.setattr(backend, "_child_pid", lambda uuid: 4242)
    proc = mock.Mock()
    monkeypatch.setattr(bhyve.psutil, "Process", lambda pid: proc)
    proc.status.return_value = bhyve.psutil.STATUS_STOPPED
    assert backend.state(UUID) is MachineState.PAUSED
    proc.status.return_value = bhyve.psutil.STATUS_SLEEPING
    assert backend.state(UUID) is MachineState.RUNNING


def test_init_host_explains_what_is_missing(backend, monkeypatch):
    monkeypatch.setattr(bhyve.sys, "platform", "linux")
    with pytest.raises(MachineError, match="backend = testhost"):
        backend.init_host("h")
    monkeypatch.setattr(bhyve.sys, "platform", "freebsd15")
    CONF.set_override("zfs_dataset", None, group="bhyve")
    backend.dataset = None
    with pytest.raises(MachineError, match="zfs_dataset"):
        backend.init_host("h")


# -- migration -------------------------------------------------------------



def _incoming(be, monkeypatch):
    """A created guest after start_incoming (nothing runs)."""
    _create(be, monkeypatch)
    monkeypatch.setattr(be, "_running", lambda uuid: False)
    old = be._incoming_checkpoint(UUID)
    open(old.meta, "w").close()             # a stale set is removed
    be.start_incoming(UUID)
    assert not old.complete() and not os.path.exists(old.meta)
    be.helper.destroy_vmm.assert_called_with(UUID)
    # memory arrives in this host's runtime directory, never under the
    # instances path (which may be shared with the source)
    assert old.base == os.path.join(be._run_dir(UUID), "incoming")
    assert not old.base.startswith(be.instances_path)
    return old


def test_migration_targets_of_source_and_destination(backend, monkeypatch):
    files = _incoming(backend, monkeypatch)
    assert backend.can_live_migrate and backend.stream_disks
    assert not backend.has_dirty_log
    # cold migration and resize move the zvols as stream disks too
    assert backend.can_migrate
    assert backend.migration_vmm(UUID) == (
        "bhyve", f"{UUID},restore={files.base},ncpus=2,memsize=2147483648")
    assert backend.is_incoming(UUID)
    assert backend.state(UUID) is MachineState.PAUSED
    backend.helper.start_guest.assert_not_called()

    monkeypatch.setattr(bhyve.processutils, "execute",
                        mock.Mock(return_value=("", "")))   # zfs list
    _create(backend, monkeypatch)           # a fresh record: not incoming
    assert not backend.is_incoming(UUID)
    with pytest.raises(MachineError, match="does not run on this host"):
        backend.migration_vmm(UUID)
    monkeypatch.setattr(backend, "_running", lambda uuid: True)
    monkeypatch.setattr(backend, "_child_pid", lambda uuid: 4242)
    assert backend.migration_vmm(UUID) == (
        "bhyve", f"{UUID},rundir=/var/run/bhyve,"
                 f"scratch={backend._run_dir(UUID)},pid=4242")


def test_start_incoming_refuses_a_running_guest_or_a_full_disk(
        backend, monkeypatch):
    _create(backend, monkeypatch)
    monkeypatch.setattr(backend, "_running", lambda uuid: True)
    with pytest.raises(MachineError, match="already runs"):
        backend.start_incoming(UUID)
    monkeypatch.setattr(backend, "_running", lambda uuid: False)
    monkeypatch.setattr(bhyve.os, "statvfs", lambda path: types.SimpleNamespace(
        f_bavail=100, f_frsize=1 << 20))
    with pytest.raises(MachineError, match="has 100 MiB free.*2048 MiB"):
        backend.start_incoming(UUID)
    assert not backend.is_incoming(UUID)


def _committed(files):
    for path in (files.ram, files.kern, files.meta):
        with open(path, "w") as f:
            f.write("x")


def _fake_bhyve(be, monkeypatch, tmp_path, sock_appears=True, exits=False):
    """Make start_guest 'run' bhyve; record what exists when it starts."""
    rundir = tmp_path / "run"
    rundir.mkdir()
    be.checkpoint_rundir = str(rundir)
    alive = {"v": False}
    seen = {}
    monkeypatch.setattr(be, "_running", lambda uuid: alive["v"])
    monkeypatch.setattr(be, "_child_pid", lambda uuid: 4242 if alive["v"]
                        else None)

    def start_guest(uuid, argv):
        files = be._incoming_checkpoint(uuid)
        seen["complete_at_start"] = files.complete()
        seen["argv"] = argv
        alive["v"] = not exits
        if exits:
            with open(be._run(uuid, "exit.json"), "w") as f:
                json.dump({"status": 4, "signal": None}, f)
            with open(be._run(uuid, "process.log"), "w") as f:
                f.write("bhyve: restore failed: memflags mismatch\n")
        with open(be._run(uuid, "child.pid"), "w") as f:
            json.dump({"pid": 4242}, f)
        if sock_appears:
            (rundir / uuid).touch()

    def signal_guest(uuid, name):
        if name == "KILL":
            alive["v"] = False
    be.helper.start_guest.side_effect = start_guest
    be.helper.signal_guest.side_effect = signal_guest
    return alive, seen


def test_finish_incoming_restores_then_removes_the_set(backend, monkeypatch,
                                                        tmp_path):
    files = _incoming(backend, monkeypatch)
    _committed(files)
    assert not backend.is_incoming(UUID)        # committed: not reaped
    alive, seen = _fake_bhyve(backend, monkeypatch, tmp_path)
    backend.finish_incoming(UUID)
    b = CONF.bhyve
    assert seen["argv"] == [
        b.bhyve_path, "-c", "2", "-m", "2048M", "-H", "-P", "-u", "-w",
        "-s", "0,hostbridge", "-s", "1,virtio-rnd",
        "-s", f"2,virtio-blk,/dev/zvol/zroot/nova/{UUID}-disk0",
        "-s", "29,fbuf,tcp=127.0.0.1:5900,w=1024,h=768", "-s", "30,xhci,tablet",
        "-s", "31,lpc", "-l", "com1,stdio",
        "-l", f"bootrom,{b.uefi_firmware},{backend._path(UUID, 'nvram.fd')}",
        "-U", UUID, "-r", files.base, UUID]
    assert seen["complete_at_start"]            # removed only after the start
    assert not any(os.path.exists(p) for p in (files.ram, files.kern,
                                               files.meta))
    rec = json.load(open(backend._run(UUID, "machine.json")))
    assert rec["intent"] == power.INTENT_RUNNING and "incoming" not in rec
    assert alive["v"]


@pytest.mark.parametrize("kwargs,why", [
    ({"exits": True}, "memflags mismatch"),
    ({"sock_appears": False}, "did not appear within 0 s"),
])
def test_failed_restore_leaves_nothing_running_and_keeps_the_set(
        backend, monkeypatch, tmp_path, kwargs, why):
    files = _incoming(backend, monkeypatch)
    _committed(files)
    alive, _seen = _fake_bhyve(backend, monkeypatch, tmp_path, **kwargs)
    backend.RESTORE_TIMEOUT = backend.RESTORE_PER_GIB = 0
    with pytest.raises(MachineError) as info:
        backend.finish_incoming(UUID)
    text = str(info.value)
    assert why in text and "Nothing runs" in text
    assert "BHYVE_SNAPSHOT" in text and "resume the server" in text
    assert not alive["v"]
    # the set moved from the runtime directory to where resume reads it
    assert backend._checkpoint(UUID).complete() and not files.complete()
    assert backend._checkpoint(UUID).base in text
    backend.helper.destroy_vmm.assert_called_with(UUID)
    assert backend.state(UUID) is MachineState.SUSPENDED


def test_finish_incoming_without_a_commit(backend, monkeypatch):
    files = _incoming(backend, monkeypatch)
    open(files.ram, "w").close()
    with pytest.raises(MachineError, match="did not commit"):
        backend.finish_incoming(UUID)
    backend.helper.start_guest.assert_not_called()


def test_zvol_disk_path_and_growth(backend, monkeypatch):
    assert backend.disk_path(UUID) == f"/dev/zvol/zroot/nova/{UUID}-disk0"
    execute = mock.Mock(return_value=(f"{10 << 30}\n", ""))
    monkeypatch.setattr(bhyve.processutils, "execute", execute)
    backend.grow_disk(UUID, 10 << 30)
    backend.helper.zfs.assert_not_called()
    execute.assert_called_with(CONF.bhyve.zfs_path, "get", "-Hp", "-o",
                               "value", "volsize", f"zroot/nova/{UUID}-disk0")
    backend.grow_disk(UUID, (20 << 30) + 1)
    backend.helper.zfs.assert_called_once_with(
        "resize", f"zroot/nova/{UUID}-disk0", size_gb=21)


def test_vifs_are_taps_on_their_bridges(backend, monkeypatch):
    nic = NicSpec("v1", "tap0a1b2c3d-4e", "fa:16:3e:01:02:03", "nbr3f2a9c1e7b4")
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=512, nics=(nic,))
    monkeypatch.setattr(bhyve.socket, "if_nametoindex",
                        mock.Mock(side_effect=OSError("no such device")))
    backend.plug_vifs(spec)
    backend.helper.create_tap.assert_called_once_with(
        "tap0a1b2c3d-4e", "nbr3f2a9c1e7b4", "fa:16:3e:01:02:03")
    backend.unplug_vifs(spec)
    backend.helper.destroy_tap.assert_called_once_with(
        "tap0a1b2c3d-4e", "nbr3f2a9c1e7b4")


def test_swap_and_ephemeral_disks_are_zvols_after_the_root_disk(
        backend, monkeypatch):
    monkeypatch.setattr(bhyve.images, "fetch_raw", lambda c, i, p: None)
    instance = types.SimpleNamespace(flavor=types.SimpleNamespace(root_gb=5))
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=512, disks=(
        DiskSpec(name="swap", size_mb=512), DiskSpec(name="eph0", size_mb=2048)))
    spec = backend.create(None, instance, spec, objects.ImageMeta.from_dict({}))
    assert [c.args + tuple(sorted(c.kwargs.items()))
            for c in backend.helper.zfs.call_args_list] == [
        ("create-volume", f"zroot/nova/{UUID}-disk0", ("size_gb", 5)),
        ("create-volume", f"zroot/nova/{UUID}-swap", ("size_mb", 512)),
        ("create-volume", f"zroot/nova/{UUID}-eph0", ("size_mb", 2048))]
    zvols = {"disk": f"/dev/zvol/zroot/nova/{UUID}-disk0",
             "swap": f"/dev/zvol/zroot/nova/{UUID}-swap",
             "eph0": f"/dev/zvol/zroot/nova/{UUID}-eph0"}
    assert [(d.name, d.path, d.boot) for d in spec.disks] == [
        ("disk", zvols["disk"], True), ("swap", zvols["swap"], False),
        ("eph0", zvols["eph0"], False)]
    assert backend.disk_paths(UUID) == zvols
    argv = backend._argv(spec)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-s"][2:5] == [
        f"2,virtio-blk,{zvols['disk']}", f"3,virtio-blk,{zvols['swap']}",
        f"4,virtio-blk,{zvols['eph0']}"]
    bhyve.bhyve_argv.validate(argv, backend.paths)


def test_delete_destroys_every_zvol_of_the_instance(backend, monkeypatch):
    listing = "\n".join(["zroot/nova/images", f"zroot/nova/{UUID}-disk0",
                         f"zroot/nova/{UUID}-swap", f"zroot/nova/{UUID}-eph0",
                         "zroot/nova/1a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d-disk0"])
    execute = mock.Mock(return_value=(listing + "\n", ""))
    monkeypatch.setattr(bhyve.processutils, "execute", execute)
    backend.delete_files(UUID, destroy_disks=True)
    assert execute.call_args.args == (
        CONF.bhyve.zfs_path, "list", "-H", "-o", "name", "-t", "volume",
        "-d", "1", "zroot/nova")
    assert [c.args for c in backend.helper.zfs.call_args_list] == [
        ("destroy", f"zroot/nova/{UUID}-disk0"),
        ("destroy", f"zroot/nova/{UUID}-swap"),
        ("destroy", f"zroot/nova/{UUID}-eph0")]


def test_recreate_remakes_a_resized_swap_and_keeps_ephemeral_data(
        backend, monkeypatch):
    os.makedirs(backend._run_dir(UUID))
    open(backend._run(UUID, "machine.json"), "w").write("{}")
    sizes = {f"zroot/nova/{UUID}-swap": 256 << 20,
             f"zroot/nova/{UUID}-eph0": 1 << 30}

    def execute(*argv, **kw):
        if argv[1] == "list":
            return "\n".join(sizes) + f"\nzroot/nova/{UUID}-eph1\n", ""
        return f"{sizes[argv[-1]]}\n", ""
    monkeypatch.setattr(bhyve.processutils, "execute", execute)
    real_exists = os.path.exists
    monkeypatch.setattr(bhyve.os.path, "exists", lambda p: p.startswith(
        "/dev/zvol/") or real_exists(p))
    os.makedirs(backend._dir(UUID))
    with open(backend._path(UUID, "nvram.fd"), "wb") as f:
        f.write(b"the guest's boot order")
    instance = types.SimpleNamespace(flavor=types.SimpleNamespace(root_gb=1))
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=512, disks=(
        DiskSpec(name="swap", size_mb=512), DiskSpec(name="eph0", size_mb=1024)))
    backend.create(None, instance, spec, objects.ImageMeta.from_dict({}))
    calls = [c.args + tuple(c.kwargs.values())
             for c in backend.helper.zfs.call_args_list]
    # the root zvol (a revert, a same-host resize, a cold migration's
    # received one) and the UEFI variables are kept as they are
    with open(backend._path(UUID, "nvram.fd"), "rb") as f:
        assert f.read() == b"the guest's boot order"
    assert calls == [
        ("destroy", f"zroot/nova/{UUID}-swap"),
        ("create-volume", f"zroot/nova/{UUID}-swap", 512),
        ("destroy", f"zroot/nova/{UUID}-eph1")]     # no longer in the flavor


def test_grow_an_ephemeral_zvol(backend, monkeypatch):
    execute = mock.Mock(return_value=(f"{1 << 30}\n", ""))
    monkeypatch.setattr(bhyve.processutils, "execute", execute)
    backend.grow_disk(UUID, 3 << 30, "eph0")
    backend.helper.zfs.assert_called_once_with(
        "resize", f"zroot/nova/{UUID}-eph0", size_gb=3)


# -- zvols as stream disks ---------------------------------------------------
def _incoming_spec(uuid=UUID):
    return MachineSpec(uuid=uuid, vcpus=2, memory_mb=2048, vnc_listen="",
                       disks=(DiskSpec(name="disk"), DiskSpec(name="swap",
                                                              size_mb=512)))


def test_an_incoming_guest_is_recorded_without_making_its_zvols(backend):
    spec = backend.prepare_incoming_disks(None, _incoming_spec())
    # zfs receive makes them: nothing is cloned or created beforehand
    backend.helper.zfs.assert_not_called()
    assert [(d.name, d.path, d.boot) for d in spec.disks] == [
        ("disk", f"/dev/zvol/zroot/nova/{UUID}-disk0", True),
        ("swap", f"/dev/zvol/zroot/nova/{UUID}-swap", False)]
    assert backend.recorded_spec(UUID) == spec
    with open(backend._path(UUID, "nvram.fd"), "rb") as f:
        assert f.read() == b"NVRAM"


def test_an_incoming_guest_keeps_the_nvram_of_a_shared_instances_path(backend):
    os.makedirs(backend._dir(UUID))
    with open(backend._path(UUID, "nvram.fd"), "wb") as f:
        f.write(b"the source's UEFI variables")
    backend.prepare_incoming_disks(None, _incoming_spec())
    with open(backend._path(UUID, "nvram.fd"), "rb") as f:
        assert f.read() == b"the source's UEFI variables"


def test_an_incoming_guest_refuses_zvols_that_exist(backend, monkeypatch):
    real = os.path.exists
    monkeypatch.setattr(bhyve.os.path, "exists", lambda p: p.endswith(
        "-swap") or real(p))
    with pytest.raises(MachineError, match=f"zvol zroot/nova/{UUID}-swap "
                                           "exists on this host already"):
        backend.prepare_incoming_disks(None, _incoming_spec())


def test_migration_streams_name_every_zvol_in_the_runtime_directory(
        backend, monkeypatch):
    spec = backend.prepare_incoming_disks(None, _incoming_spec())
    out = backend.migration_streams(UUID, "mig-0123456789ab", receiving=False)
    into = backend.migration_streams(UUID, "mig-0123456789ab", receiving=True)
    assert (out.role, into.role) == ("send", "receive")
    assert out.zvols == into.zvols == {
        "disk": f"zroot/nova/{UUID}-disk0", "swap": f"zroot/nova/{UUID}-swap"}
    assert out.dir == os.path.join(backend._run_dir(UUID), "zfs-mig-0123456789ab")
    assert not out.dir.startswith(backend.instances_path)
    assert spec.disks[0].path.endswith(out.zvols["disk"])
