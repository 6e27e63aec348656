"""BhyveDriver under Nova's in-process control plane, with real guests.

Nova's API, conductor, scheduler, Placement and a compute service running
``bhyve.BhyveDriver`` on the KVM test host, in one process.  Nova picks its
concurrency mode (native threads or eventlet monkey patching) when
``nova.tests`` is first imported, for the whole process, so this module
is not collected by pytest: ``test_driver_nova.py`` runs it in a fresh
interpreter per mode::

    NOVA_BHYVE_CONCURRENCY=threading python tests/functional/nova_driver_scenarios.py
    NOVA_BHYVE_CONCURRENCY=eventlet python tests/functional/nova_driver_scenarios.py

(further arguments name tests, e.g.
``BhyveDriverLifecycleTest.test_lifecycle_through_the_api``).  The last
line of standard output is ``NOVA-BHYVE-RESULTS`` and a JSON object of
test name to outcome.
"""

import os
import sys

import nova_scenarios

nova_scenarios.select_mode()

# first nova import: it applies (or forbids) eventlet patching
from nova.tests.functional import integrated_helpers  # noqa: E402,F401

# isort: split

import signal  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

from nova_scenario_base import IMAGE_DATA, BhyveScenarioTest  # noqa: E402

import nova_bhyve.driver  # noqa: E402
from nova import context as nova_context  # noqa: E402
from nova_bhyve.machine import hostinfo  # noqa: E402
from nova_bhyve.machine.base import MachineState  # noqa: E402
from nova_bhyve.machine.statefile import read_json  # noqa: E402
from nova_bhyve.testhost.console import parse_console  # noqa: E402

nova_scenarios.install_shim(nova_bhyve.driver)

RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED = 1, 3, 4, 6, 7
IMAGE_ID = "5f0ac2a8-3c5e-4b7e-9d0a-6a1f3b2c4d5e"
CMDLINE = "mode=stress pattern=touch ws=4M"


class BhyveDriverLifecycleTest(BhyveScenarioTest):
    """Servers on BhyveDriver + KVM test host, driven through Nova's API."""

    IMAGES = {IMAGE_ID: CMDLINE}
    TMP_PREFIX = "nbd-"

    def setUp(self):
        super().setUp()
        self.compute = self.compute_services["host1"]
        self.driver = self.drivers["host1"]
        self.instances_path = self.driver.backend.instances_path

    # -- helpers ------------------------------------------------------------
    def _boot(self):
        server = self._create_server(image_uuid=IMAGE_ID,
                                     flavor_id=self.flavor_id,
                                     networks="none")
        self.assertEqual(RUNNING, server["OS-EXT-STS:power_state"])
        return server

    def _console(self, server):
        output = self.api.post_server_action(
            server["id"], {"os-getConsoleOutput": {}})["output"]
        return parse_console(output)

    def _wait_heartbeats(self, server, more_than=0, count=20):
        def enough():
            report = self._console(server)
            beats = [h for h in report.heartbeats if h.seq > more_than]
            return report if len(beats) >= count else None
        return self._wait(enough, f"heartbeats after seq {more_than}")

    def _full_log(self, server):
        path = self.driver.backend.console_log_path(server["id"])
        with open(path, "rb") as f:
            return f.read().decode("ascii", "replace")

    def _boots(self, server):
        return self._full_log(server).count("NBGUEST ")

    def _state(self, server):
        return self.driver.backend.state(server["id"])

    # -- scenarios ------------------------------------------------------------
    def test_lifecycle_through_the_api(self):
        server = self._boot()
        report = self._wait_heartbeats(server)
        self.assertEqual("stress", report.banner["mode"])
        self.assertTrue(report.ready)
        self.assertEqual(0, report.errors)
        # nova's diagnostics schema knows no "bhyve" driver: the field stays
        # null, which the API's default response validation ("warn") allows
        self.flags(response_validation="warn", group="api")
        diags = self.admin_api.api_get(
            f"/servers/{server['id']}/diagnostics").body
        self.assertEqual("running", diags["state"])
        self.assertIsNone(diags["driver"])
        self.assertEqual("bhyve", diags["hypervisor"])
        self.assertEqual(1, diags["num_cpus"])
        self.assertEqual(128, diags["memory_details"]["maximum"])
        # the disk is the image, byte for byte
        disk = self.driver.backend._path(server["id"], "disk")
        with open(disk, "rb") as f:
            self.assertEqual(IMAGE_DATA, f.read())

        # stop: a clean shutdown, not a crash; start boots the guest again
        server = self._stop_server(server)
        self.assertEqual(SHUTDOWN, server["OS-EXT-STS:power_state"])
        self.assertEqual(MachineState.SHUTDOWN, self._state(server))
        server = self._start_server(server)
        self.assertEqual(RUNNING, server["OS-EXT-STS:power_state"])
        self.assertEqual(2, self._boots(server))
        self._wait_heartbeats(server)

        # soft and hard reboot each boot the payload anew
        for hard, boots in ((False, 3), (True, 4)):
            server = self._reboot_server(server, hard=hard)
            self.assertEqual(RUNNING, server["OS-EXT-STS:power_state"])
            self._wait(lambda b=boots, s=server: self._boots(s) == b and
                       "HB " in self._full_log(s).split("NBGUEST ")[-1],
                       f"boot number {boots}")

        # pause freezes the heartbeats, unpause continues them
        self.api.post_server_action(server["id"], {"pause": None})
        server = self._wait_for_state_change(server, "PAUSED")
        self.assertEqual(PAUSED, server["OS-EXT-STS:power_state"])
        frozen = parse_console(self._full_log(server)).last_seq
        time.sleep(0.3)
        self.assertEqual(frozen, parse_console(self._full_log(server)).last_seq)
        self.api.post_server_action(server["id"], {"unpause": None})
        server = self._wait_for_state_change(server, "ACTIVE")
        self._wait_heartbeats(server, more_than=frozen)

        # suspend: RAM and state go to a checkpoint set, the process ends
        before = parse_console(self._full_log(server))
        server = self._suspend_server(server)
        self.assertEqual(SUSPENDED, server["OS-EXT-STS:power_state"])
        self.assertFalse(self.driver.backend._running(server["id"]))
        base = self.driver.backend._path(server["id"], "checkpoint")
        for path in (base, base + ".kern", base + ".meta"):
            self.assertTrue(os.path.exists(path), path)
        self.assertEqual(128 << 20, os.path.getsize(base))
        suspended_seq = parse_console(self._full_log(server)).last_seq
        self.assertGreater(suspended_seq, before.last_seq - 1)

        # resume continues the same guest: no new boot, no gap, no errors
        server = self._resume_server(server)
        self.assertEqual(RUNNING, server["OS-EXT-STS:power_state"])
        self._wait_heartbeats(server, more_than=suspended_seq, count=200)
        log = parse_console(self._full_log(server).split("NBGUEST ")[-1])
        self.assertEqual(4, self._boots(server))
        self.assertEqual([], log.sequence_breaks())
        self.assertEqual(0, log.errors)
        self.assertEqual([], log.fails)
        self.assertFalse(os.path.exists(base + ".meta"))

        # delete removes the guest and its files
        self._delete_server(server)
        self.assertNotIn(server["id"], self.driver.list_instance_uuids())
        self.assertFalse(os.path.exists(
            os.path.join(self.instances_path, server["id"])))

    def test_swap_and_ephemeral_disks_through_the_api(self):
        """A flavor with swap and an ephemeral disk, as Tempest's swap tests."""
        flavor = self._create_flavor(memory_mb=128, vcpu=1, disk=0,
                                     ephemeral=1, swap=64)
        server = self._create_server(image_uuid=IMAGE_ID, flavor_id=flavor,
                                     networks="none")
        self.assertEqual(RUNNING, server["OS-EXT-STS:power_state"])
        report = self._wait_heartbeats(server)
        self.assertEqual(0, report.errors)
        # the test host's VM attaches no disks: the files are what a bhyve
        # guest would get, blank and sparse
        folder = os.path.join(self.instances_path, server["id"])
        disks = self.driver.backend.disk_paths(server["id"])
        self.assertEqual({"disk": f"{folder}/disk",
                          "swap": f"{folder}/disk.swap",
                          "eph0": f"{folder}/disk.eph0"}, disks)
        self.assertEqual(64 << 20, os.path.getsize(disks["swap"]))
        self.assertEqual(1 << 30, os.path.getsize(disks["eph0"]))
        self.assertEqual(0, os.stat(disks["eph0"]).st_blocks)
        instance = mock.Mock(uuid=server["id"])
        self.assertEqual(3, len(self.driver.get_instance_diagnostics(
            instance).disk_details))
        self._delete_server(server)
        self.assertFalse(os.path.exists(folder))

    def test_guest_killed_outside_nova_is_crashed_and_becomes_shutoff(self):
        server = self._boot()
        self._wait_heartbeats(server, count=5)
        pid = self.driver.backend._child_pid(server["id"])
        os.kill(pid, signal.SIGKILL)
        instance = mock.Mock(uuid=server["id"])
        self._wait(lambda: self.driver.get_info(instance).state == CRASHED,
                   "the driver to report a crash")
        # nova's power-state sync stops an instance whose guest crashed
        self.compute.manager._sync_power_states(
            nova_context.get_admin_context())
        self._wait_for_state_change(server, "SHUTOFF", max_retries=60)
        # a forced power-off of a running guest is not a crash
        server = self._start_server(server)
        self.driver.power_off(mock.Mock(uuid=server["id"]), timeout=0)
        self.assertEqual(MachineState.SHUTDOWN, self._state(server))
        # timeout 0 means no graceful attempt: the process was SIGKILLed
        ended = read_json(self.driver.backend._run(server["id"], "exit.json"))
        self.assertEqual(signal.SIGKILL, ended["signal"])
        # and the state watcher's "stopped" event makes nova stop it too
        server = self._wait_for_state_change(server, "SHUTOFF", max_retries=60)
        self.assertEqual(SHUTDOWN, server["OS-EXT-STS:power_state"])

    def test_placement_inventory_matches_the_host(self):
        rp_uuid = self._get_provider_uuid_by_host("host1")
        inventory = self._get_provider_inventory(rp_uuid)
        mem_total, _used = hostinfo.linux_memory_mb()
        disk_total, _used = hostinfo.disk_gb(self.instances_path)
        self.assertEqual(os.cpu_count(), inventory["VCPU"]["total"])
        self.assertEqual(mem_total, inventory["MEMORY_MB"]["total"])
        self.assertEqual(disk_total, inventory["DISK_GB"]["total"])
        server = self._boot()
        usage = self.placement.get(
            f"/resource_providers/{rp_uuid}/usages").body["usages"]
        self.assertEqual({"VCPU": 1, "MEMORY_MB": 128, "DISK_GB": 0}, usage)
        traits = self._get_provider_traits(rp_uuid)
        self.assertIn("COMPUTE_IMAGE_TYPE_RAW", traits)
        self._delete_server(server)

    def test_snapshot_uploads_the_root_disk(self):
        server = self._boot()
        uploaded = {}
        real_update = self.glance.update

        def update(context, image_id, metadata, data=None, purge_props=False):
            if data is not None:
                uploaded[image_id] = data.read()
            return real_update(context, image_id, metadata, None, purge_props)

        with mock.patch.object(self.glance, "update", side_effect=update):
            self._snapshot_server(server, "snap1")
            self._wait(lambda: uploaded, "the snapshot upload")
            self._wait_for_server_parameter(
                server, {"OS-EXT-STS:task_state": None})
        image = next(i for i in self.glance.images.values()
                     if i["name"] == "snap1")
        self.assertEqual(IMAGE_DATA, uploaded[image["id"]])
        self.assertEqual("raw", image["disk_format"])
        self.assertEqual(CMDLINE,
                         image["properties"]["bhyve_testhost_cmdline"])
        self._delete_server(server)


if __name__ == "__main__":
    sys.exit(nova_scenarios.main(__name__, [BhyveDriverLifecycleTest],
                                 sys.argv[1:]))
