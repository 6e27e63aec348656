"""The bhyve backend's use of the privileged helper (FreeBSD not needed)."""

import json
import types
from unittest import mock

import pytest

from nova_bhyve.conf import CONF
from nova_bhyve.machine import bhyve, power
from nova_bhyve.machine.base import MachineError, MachineSpec, MachineState

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
    record = json.load(open(backend._path(UUID, "machine.json")))
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
    assert json.load(open(backend._path(UUID, "machine.json")))["intent"] == \
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
