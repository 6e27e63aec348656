"""BhyveDriver's translation of Nova calls, with a recording backend."""

import contextlib
import logging
import os
import subprocess
import sys
import types
from unittest import mock

import pytest
from nova.compute import power_state, provider_tree

import nova_bhyve.driver as bhyve_driver
from nova import exception
from nova.virt import event as virtevent
from nova_bhyve import guest
from nova_bhyve.machine import images
from nova_bhyve.machine.base import MachineError, MachineState

UUID = "3b0f6c9e-8d2a-4f1b-9c3e-5a6b7c8d9e0f"
SECRET = "Tr0ub4dor&3-admin"
CONF = bhyve_driver.CONF


def _instance(**sysmeta):
    flavor = types.SimpleNamespace(vcpus=2, memory_mb=256, root_gb=1,
                                   ephemeral_gb=0, swap=0)
    return types.SimpleNamespace(uuid=UUID, flavor=flavor,
                                 system_metadata=sysmeta, project_id="p1")


def test_capabilities_are_truthful():
    drv = bhyve_driver.BhyveDriver(mock.Mock())
    caps = drv.capabilities
    assert caps["supports_image_type_raw"] is True
    assert caps["supports_image_type_qcow2"] is images.qemu_img_available()
    assert caps["supports_evacuate"] is True
    assert caps["has_imagecache"] is False
    assert caps["supports_attach_interface"] is False
    traits = drv.capabilities_as_traits()
    assert traits["COMPUTE_IMAGE_TYPE_RAW"] is True
    assert traits["COMPUTE_IMAGE_TYPE_ISO"] is False


def test_spawn_builds_the_spec_and_boots(driver):
    inst = _instance(image_bhyve_testhost_cmdline="mode=stress ws=8M")
    vif = {"id": "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9",
           "address": "fa:16:3e:01:02:03", "devname": "tap0a1b2c3d-4e",
           "type": "tap", "network": {"bridge": "bridge0"}}
    driver.spawn(mock.sentinel.ctx, inst, mock.sentinel.meta, [], SECRET, {},
                 network_info=[vif])
    spec = driver.backend.create.call_args.args[2]
    assert (spec.uuid, spec.vcpus, spec.memory_mb) == (UUID, 2, 256)
    assert spec.cmdline == "mode=stress ws=8M"
    assert [(n.tap, n.mac, n.bridge) for n in spec.nics] == [
        ("tap0a1b2c3d-4e", "fa:16:3e:01:02:03", "bridge0")]
    driver.backend.plug_vifs.assert_called_once_with(spec)
    driver.backend.start.assert_called_once_with(UUID)


VIF_ID = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"


def _tap_vif(active):
    """A VIF as Nova builds it from a port the bhyve mech driver bound."""
    return {"id": VIF_ID, "address": "fa:16:3e:01:02:03",
            "devname": "tap0a1b2c3d-4e", "type": "tap", "active": active,
            "details": {"bridge_name": "nbr3f2a9c1e7b4"},
            "network": {"bridge": None}}


class _RecordingVirtAPI:
    """wait_for_instance_event as Nova's: plan, run the body, then wait."""

    def __init__(self, log, timeout=False):
        self.log, self.timeout, self.waited = log, timeout, []

    @contextlib.contextmanager
    def wait_for_instance_event(self, instance, events, timeout,
                                error_callback=None):
        self.waited.append((events, timeout))
        self.log.append("prepare")
        yield
        self.log.append("waited")
        if self.timeout:
            raise exception.InstanceEventTimeout()


def _recording(driver, **kwargs):
    log = []
    driver.virtapi = _RecordingVirtAPI(log, **kwargs)
    driver.backend.plug_vifs.side_effect = lambda spec: log.append("plug")
    driver.backend.start.side_effect = lambda uuid: log.append("start")
    return log


def test_spawn_plugs_a_tap_vif_on_the_bridge_of_its_details(driver):
    log = _recording(driver)
    driver.spawn(None, _instance(), None, [], None, {},
                 network_info=[_tap_vif(active=True)])
    spec = driver.backend.create.call_args.args[2]
    assert [(n.tap, n.bridge) for n in spec.nics] == [
        ("tap0a1b2c3d-4e", "nbr3f2a9c1e7b4")]
    assert log == ["plug", "start"]     # active port: nothing to wait for
    assert driver.virtapi.waited == []


def test_spawn_waits_for_inactive_vifs_before_booting(driver):
    log = _recording(driver)
    driver.spawn(None, _instance(), None, [], None, {},
                 network_info=[_tap_vif(active=False)])
    assert log == ["prepare", "plug", "waited", "start"]
    assert driver.virtapi.waited == [
        ([("network-vif-plugged", VIF_ID)], CONF.vif_plugging_timeout)]


def test_ports_of_other_vif_types_are_refused_before_anything_is_made(
        driver):
    vif = dict(_tap_vif(active=True), type="ovs",
               network={"bridge": "br-int"})
    with pytest.raises(exception.InstanceDeployFailure,
                       match=rf"type tap .*{VIF_ID} \(ovs\)"):
        driver.spawn(None, _instance(), None, [], None, {},
                     network_info=[vif])
    driver.backend.create.assert_not_called()


def test_vif_timeout_is_fatal_by_default_and_cleans_up(driver):
    log = _recording(driver, timeout=True)
    with pytest.raises(exception.VirtualInterfaceCreateException):
        driver.spawn(None, _instance(), None, [], None, {},
                     network_info=[_tap_vif(active=False)])
    assert "start" not in log
    spec = driver.backend.create.call_args.args[2]
    driver.backend.unplug_vifs.assert_called_once_with(spec)
    driver.backend.delete_files.assert_called_once_with(UUID, True)


def test_vif_timeout_not_fatal_boots_anyway(driver):
    CONF.set_override("vif_plugging_is_fatal", False)
    try:
        log = _recording(driver, timeout=True)
        driver.spawn(None, _instance(), None, [], None, {},
                     network_info=[_tap_vif(active=False)])
    finally:
        CONF.clear_override("vif_plugging_is_fatal")
    assert log[-1] == "start"


@pytest.mark.parametrize("power_on,timeout", [(False, 300), (True, 0)])
def test_no_vif_wait_when_not_booting_or_disabled(driver, power_on, timeout):
    CONF.set_override("vif_plugging_timeout", timeout)
    try:
        log = _recording(driver)
        driver.spawn(None, _instance(), None, [], None, {},
                     network_info=[_tap_vif(active=False)],
                     power_on=power_on)
    finally:
        CONF.clear_override("vif_plugging_timeout")
    assert driver.virtapi.waited == []
    assert log[0] == "plug"


def test_default_guest_cmdline_is_mode_idle():
    spec = guest.build_spec(_instance(), None, CONF)
    assert spec.cmdline == "mode=idle"


def test_no_secrets_in_logs(driver, caplog):
    caplog.set_level(logging.DEBUG)
    bdi = {"block_device_mapping": [], "root_device_name": "/dev/vda",
           "connection_info": {"auth_password": SECRET}}
    driver.spawn(mock.sentinel.ctx, _instance(), mock.sentinel.meta, [],
                 SECRET, {}, network_info=[], block_device_info=bdi)
    driver.power_off(_instance())
    driver.destroy(mock.sentinel.ctx, _instance(), [], bdi)
    assert caplog.records, "the driver logged nothing at all"
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_volumes_are_refused_before_anything_is_made(driver):
    bdi = {"block_device_mapping": [{"connection_info": {}}]}
    with pytest.raises(exception.InstanceDeployFailure, match="volumes"):
        driver.spawn(None, _instance(), None, [], None, {},
                     block_device_info=bdi)
    driver.backend.create.assert_not_called()


def test_spawn_asks_the_backend_for_swap_and_ephemeral_disks(driver):
    inst = _instance()
    inst.flavor.swap, inst.flavor.ephemeral_gb = 512, 2
    bdi = {"swap": {"device_name": "/dev/vdc", "swap_size": 512},
           "ephemerals": [{"device_name": "/dev/vdb", "size": 2, "num": 0}]}
    driver.spawn(None, inst, None, [], None, {}, block_device_info=bdi)
    spec = driver.backend.create.call_args.args[2]
    assert [(d.name, d.size_mb, d.path) for d in spec.disks] == [
        ("swap", 512, ""), ("eph0", 2048, "")]
    driver.backend.start.assert_called_once_with(UUID)


def test_more_extra_disks_than_bhyve_has_slots_are_refused(driver):
    bdi = {"ephemerals": [{"size": 1, "num": i} for i in range(18)]}
    with pytest.raises(exception.InstanceDeployFailure,
                       match="more than 17 swap and ephemeral disks"):
        driver.spawn(None, _instance(), None, [], None, {},
                     block_device_info=bdi)
    driver.backend.create.assert_not_called()


@pytest.mark.parametrize("state,expected", [
    (MachineState.RUNNING, power_state.RUNNING),
    (MachineState.PAUSED, power_state.PAUSED),
    (MachineState.SUSPENDED, power_state.SUSPENDED),
    (MachineState.SHUTDOWN, power_state.SHUTDOWN),
    (MachineState.CRASHED, power_state.CRASHED),
])
def test_get_info(driver, state, expected):
    driver.backend.state.return_value = state
    assert driver.get_info(_instance()).state == expected


def test_unknown_instance(driver):
    driver.backend.state.side_effect = KeyError(UUID)
    with pytest.raises(exception.InstanceNotFound):
        driver.get_info(_instance())
    driver.backend.pause.side_effect = KeyError(UUID)
    with pytest.raises(exception.InstanceNotFound):
        driver.pause(_instance())


def test_power_calls(driver):
    driver.power_off(_instance())                      # default: immediate
    driver.power_off(_instance(), timeout=60, retry_interval=10)
    assert driver.backend.stop.call_args_list == [
        mock.call(UUID, 0, 0), mock.call(UUID, 60, 10)]
    driver.reboot(None, _instance(), [], "SOFT")
    driver.reboot(None, _instance(), [], "HARD")
    assert driver.backend.reboot.call_args_list == [
        mock.call(UUID, True), mock.call(UUID, False)]


def test_resume_state_on_host_boot_starts_only_stopped_guests(driver):
    driver.backend.state.return_value = MachineState.RUNNING
    driver.resume_state_on_host_boot(None, _instance(), [], None)
    driver.backend.start.assert_not_called()
    driver.backend.state.return_value = MachineState.CRASHED
    driver.resume_state_on_host_boot(None, _instance(), [], None)
    driver.backend.start.assert_called_once_with(UUID)


def test_provider_tree_reports_host_inventory(driver):
    CONF.set_override("reserved_host_memory_mb", 2048)
    try:
        tree = provider_tree.ProviderTree()
        tree.new_root("node1", "c1d2e3f4-0000-4000-8000-000000000001")
        driver.update_provider_tree(tree, "node1")
        inv = tree.data("node1").inventory
    finally:
        CONF.clear_override("reserved_host_memory_mb")
    assert inv["VCPU"]["total"] == 8 and inv["VCPU"]["max_unit"] == 8
    assert inv["MEMORY_MB"]["total"] == 32000
    assert inv["MEMORY_MB"]["reserved"] == 2048
    assert inv["DISK_GB"]["total"] == 500
    res = driver.get_available_resource("node1")
    assert (res["vcpus"], res["memory_mb"], res["local_gb"]) == (8, 32000, 500)
    assert res["supported_instances"] == [("x86_64", "bhyve", "hvm")]


def test_console_output_is_the_log_tail(driver, tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"A" * 200000 + b"HB 1 0 0\n")
    driver.backend.console_log_path.return_value = str(log)
    out = driver.get_console_output(None, _instance())
    assert len(out) == CONF.bhyve.console_log_max_bytes
    assert out.endswith(b"HB 1 0 0\n")


def test_state_watcher_emits_lifecycle_events(driver):
    events = []
    driver.register_event_listener(events.append)
    driver.backend.list_machines.return_value = [UUID]
    driver.backend.state.return_value = MachineState.RUNNING
    driver._watch_states()
    assert events == []                       # first sight: no transition
    driver.backend.state.return_value = MachineState.SHUTDOWN
    driver._watch_states()
    driver._watch_states()                    # no change, no second event
    driver.backend.state.return_value = MachineState.RUNNING
    driver._watch_states()
    assert [(e.get_instance_uuid(), e.get_transition()) for e in events] == [
        (UUID, virtevent.EVENT_LIFECYCLE_STOPPED),
        (UUID, virtevent.EVENT_LIFECYCLE_STARTED)]


def test_modules_import_without_eventlet():
    """Nova forbids importing eventlet in threading mode; so do we."""
    code = (
        "from nova import monkey_patch; monkey_patch.patch('threading')\n"
        "import nova_bhyve.driver, nova_bhyve.privsep\n"
        "import nova_bhyve.machine.testhost, nova_bhyve.machine.bhyve\n"
        "import sys; assert 'eventlet' not in sys.modules\n")
    env = dict(os.environ, OS_NOVA_DISABLE_EVENTLET_PATCHING="1")
    # -P: the installed package (with its compiled engine), not the sources
    proc = subprocess.run([sys.executable, "-P", "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_failed_spawn_removes_what_it_made(driver):
    driver.backend.start.side_effect = MachineError("nb-testhost exited: boom")
    with pytest.raises(exception.InstanceDeployFailure, match="boom"):
        driver.spawn(None, _instance(), None, [], None, {})
    driver.backend.destroy.assert_called_once_with(UUID)
    driver.backend.delete_files.assert_called_once_with(UUID, True)


def test_failed_spawn_on_a_disk_already_here_keeps_it(driver):
    """An evacuation onto a shared instances path: the disk is the guest's."""
    driver.backend.has_disks.return_value = True
    driver.backend.start.side_effect = MachineError("nb-testhost exited: boom")
    with pytest.raises(exception.InstanceDeployFailure, match="boom"):
        driver.spawn(None, _instance(), None, [], None, {})
    driver.backend.delete_files.assert_called_once_with(UUID, False)


def test_machine_errors_name_the_guest(driver):
    driver.backend.suspend.side_effect = MachineError("no checkpoint support")
    with pytest.raises(bhyve_driver.GuestOperationFailed,
                       match=f"{UUID}: no checkpoint support"):
        driver.suspend(None, _instance())


def test_host_uptime_is_what_uptime_prints(driver):
    # The os-hypervisors API asks every compute for it; nova's base raises.
    text = driver.get_host_uptime()
    assert "load average" in text
