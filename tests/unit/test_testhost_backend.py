"""The test-host backend's networking: taps through the privileged helper."""

from unittest import mock

import pytest
from oslo_concurrency import processutils

from nova_bhyve import privsep
from nova_bhyve.conf import CONF
from nova_bhyve.machine import testhost
from nova_bhyve.machine.base import MachineError, MachineSpec, NicSpec

UUID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
NICS = (NicSpec("v1", "tap0a1b2c3d-4e", "fa:16:3e:01:02:03", "nbr3f2a9c1e7b4"),
        NicSpec("v2", "tap99999999-88", "fa:16:3e:09:09:09", ""))


@pytest.fixture
def backend(tmp_path, monkeypatch):
    helper = mock.Mock(HelperStartError=privsep.HelperStartError,
                       PrivilegeError=privsep.PrivilegeError)
    monkeypatch.setattr(testhost, "privsep", helper)
    be = testhost.TestHostBackend(CONF, str(tmp_path))
    be.helper = helper
    return be


def test_plug_and_unplug_every_nic(backend):
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=64, nics=NICS)
    backend.plug_vifs(spec)
    assert backend.helper.plug_tap_linux.call_args_list == [
        mock.call("tap0a1b2c3d-4e", "nbr3f2a9c1e7b4", "fa:16:3e:01:02:03"),
        mock.call("tap99999999-88", "", "fa:16:3e:09:09:09")]
    backend.unplug_vifs(spec)
    assert backend.helper.unplug_tap_linux.call_args_list == [
        mock.call("tap0a1b2c3d-4e", "nbr3f2a9c1e7b4"),
        mock.call("tap99999999-88", "")]


def test_no_nics_touch_nothing_privileged(backend):
    backend.plug_vifs(MachineSpec(uuid=UUID, vcpus=1, memory_mb=64))
    backend.unplug_vifs(MachineSpec(uuid=UUID, vcpus=1, memory_mb=64))
    assert backend.helper.mock_calls == []


def test_a_helper_that_cannot_start_names_the_setting(backend):
    backend.helper.plug_tap_linux.side_effect = \
        privsep.HelperStartError("sudo: not found")
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=64, nics=NICS[:1])
    with pytest.raises(MachineError, match=r"sudo: not found.*\[nova_bhyve_"
                                           r"privileged\] helper_command"):
        backend.plug_vifs(spec)


def test_a_failed_ip_command_is_a_machine_error(backend):
    backend.helper.unplug_tap_linux.side_effect = \
        processutils.ProcessExecutionError(stderr="RTNETLINK: busy")
    spec = MachineSpec(uuid=UUID, vcpus=1, memory_mb=64, nics=NICS[:1])
    with pytest.raises(MachineError, match="cannot unplug tap0a1b2c3d-4e"):
        backend.unplug_vifs(spec)
