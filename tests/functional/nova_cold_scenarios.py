"""Cold migration, resize, revert and evacuation through Nova, with real
guests: as ``nova_migration_scenarios`` (on the base of ``nova_migration_base``),
in a fresh interpreter per concurrency mode::

    cd tests/functional
    NOVA_BHYVE_CONCURRENCY=threading python nova_cold_scenarios.py
    NOVA_BHYVE_CONCURRENCY=eventlet python nova_cold_scenarios.py \\
        ColdMigrationTest.test_cold_migrate_and_confirm

The disks move with the migration engine (vmm port ``none``, cold mode).
Each disk is compared byte for byte (SHA-256) with what the source held;
``DiskWriterColdTest`` moves a guest that writes its root disk (the VM's
ATA disk) and compares the file as the source's VM stopped with the one
the destination is about to boot.  The failure scenarios fill the
ephemeral disk with random data first, so that the transfer is still
under way when the destination gives up.  The last line of standard output is
``NOVA-BHYVE-RESULTS`` and a JSON object of test name to outcome.
"""

import sys

import nova_scenarios

MODE = nova_scenarios.select_mode()

# first nova import: it applies (or forbids) eventlet patching
from nova.tests.functional import integrated_helpers  # noqa: E402,F401

# isort: split

import hashlib  # noqa: E402
import os  # noqa: E402

import fixtures  # noqa: E402
from nova_migration_base import MigrationTestBase  # noqa: E402
from nova_scenario_base import IMAGE_DATA  # noqa: E402

import nova_bhyve.driver  # noqa: E402
from nova import context as nova_context  # noqa: E402
from nova import objects  # noqa: E402
from nova_bhyve.machine.base import MachineState  # noqa: E402
from nova_bhyve.native.engine import Migration  # noqa: E402
from nova_bhyve.testhost.console import parse_console  # noqa: E402

nova_scenarios.install_shim(nova_bhyve.driver)
from nova_block_migration_scenarios import DiskWriterTestBase  # noqa: E402


def _sha(path, size):
    """SHA-256 of the first ``size`` bytes of a file (holes as zeros)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while size > 0 and (chunk := f.read(min(size, 8 << 20))):
            digest.update(chunk)
            size -= len(chunk)
    return digest.hexdigest()


class ColdMigrationTest(MigrationTestBase):
    """Cold migration, resize, revert and evacuation."""

    def _assert_fresh_boot_on(self, host, server, disk_size=None):
        self._wait_passes(host, server, 1)
        report = parse_console(self._log(host, server))
        self.assertEqual("stress", report.banner.get("mode"))
        path = self.drivers[host].backend.disk_path(server["id"])
        self.assertEqual(disk_size or len(IMAGE_DATA), os.path.getsize(path))
        with open(path, "rb") as f:
            self.assertEqual(IMAGE_DATA, f.read(len(IMAGE_DATA)))

    def test_cold_migrate_and_confirm(self):
        server, before = self._cold_migrate(self._boot())
        self._assert_fresh_boot_on("host2", server)
        self.assertEqual(before, self._sums("host2", server))
        # the source keeps its stopped guest until the confirmation
        self.assertEqual(MachineState.SHUTDOWN,
                         self.drivers["host1"].backend.state(server["id"]))
        self._event(server, "migrate", "bhyve_disk_copy")
        server = self._confirm_resize(server)
        self._wait(lambda: self._gone("host1", server),
                   "the source to drop the old guest", timeout=30)
        self._assert_guest_alive("host2", server)
        # one key exchange (one derivation a side), no disk-copy secret
        self._assert_no_secret_logged(derived=2)

    def test_cold_migrate_and_revert(self):
        server = self._boot()
        server = self._migrate_server(server, host="host2")
        self._assert_fresh_boot_on("host2", server)
        self.api.post_server_action(server["id"], {"revertResize": None})
        server = self._wait_for_server_parameter(
            server, {"status": "ACTIVE", "OS-EXT-SRV-ATTR:host": "host1"},
            max_retries=60)
        self._wait_migration(server, "reverted")
        self._wait(lambda: self._gone("host2", server),
                   "host2 to drop its copy", timeout=30)
        self._wait(lambda: self.drivers["host1"].backend.state(server["id"])
                   == MachineState.RUNNING, "the guest back on host1")
        # the same disk, booted again: a second banner in the same log
        self.assertEqual(2, self._log("host1", server).count("NBGUEST "))
        self._assert_guest_alive("host1", server)

    def test_resize_and_revert(self):
        server = self._boot()
        before = self._sums("host1", server)
        bigger = self._create_flavor(memory_mb=256, vcpu=2, disk=1,
                                     ephemeral=0)
        self.flags(allow_resize_to_same_host=False)
        self.api.post_server_action(server["id"],
                                    {"resize": {"flavorRef": bigger}})
        server = self._wait_for_state_change(server, "VERIFY_RESIZE",
                                             max_retries=60)
        self.assertEqual("host2", server["OS-EXT-SRV-ATTR:host"])
        self._assert_fresh_boot_on("host2", server, disk_size=1 << 30)
        self._event(server, "resize", "bhyve_disk_copy")
        diag = self.drivers["host2"].backend.diagnostics(server["id"])
        self.assertEqual((2, 256), (diag["vcpus"], diag["memory_mb"]))
        self.api.post_server_action(server["id"], {"revertResize": None})
        server = self._wait_for_server_parameter(
            server, {"status": "ACTIVE", "OS-EXT-SRV-ATTR:host": "host1"},
            max_retries=60)
        self._wait(lambda: self._gone("host2", server),
                   "host2 to drop the resized guest", timeout=30)
        self._wait(lambda: self.drivers["host1"].backend.state(server["id"])
                   == MachineState.RUNNING, "the guest back on host1")
        diag = self.drivers["host1"].backend.diagnostics(server["id"])
        self.assertEqual((1, 128), (diag["vcpus"], diag["memory_mb"]))
        self._assert_guest_alive("host1", server)
        self.assertEqual(before, self._sums("host1", server))

    def test_evacuate_and_the_old_host_coming_back(self):
        server = self._boot()
        server, old_pid, service = self._evacuate_to_host2(server)
        self.assertEqual(MachineState.SHUTDOWN,
                         self.drivers["host2"].backend.state(server["id"]))
        server = self._start_server(server)
        self._assert_fresh_boot_on("host2", server)
        # the stale guest still runs on host1 until its compute returns
        self.assertTrue(self.drivers["host1"].backend._running(server["id"]))
        self._start_bhyve_compute("host1")
        self.api.put_service(service["id"], {"forced_down": False})
        self._wait(lambda: self._gone("host1", server),
                   "host1 to destroy the evacuated guest", timeout=30)
        with self.assertRaises(ProcessLookupError):
            os.kill(old_pid, 0)
        self.assertEqual("completed", self._migration(server)["status"])
        self.assertEqual(MachineState.RUNNING,
                         self.drivers["host2"].backend.state(server["id"]))
        # the instance can move on from its new host
        ctxt = nova_context.get_admin_context()
        inst = objects.Instance.get_by_uuid(ctxt, server["id"])
        self.assertEqual("host2", inst.host)


class ColdFailureTest(MigrationTestBase):
    """A cold migration or resize whose destination gives up mid-disk: the
    guest stays on the source, started again from its intact disks, and
    the destination keeps nothing of it."""

    def setUp(self):
        super().setUp()
        self.extra_flavor = self._create_flavor(memory_mb=128, vcpu=1, disk=0,
                                                ephemeral=1, swap=64)

    def _fail_mid_disk(self, action):
        """Start ``action`` (a cold migration or resize) of a guest whose
        ephemeral disk holds 48 MiB of data, sent at 8 MiB/s, and make the
        destination give up once a thousand blocks are in.  Return the
        server and the SHA-256 of its disks before."""
        server = self._boot(flavor_id=self.extra_flavor)
        uuid = server["id"]
        with open(self.drivers["host1"].backend.disk_paths(uuid)["eph0"],
                  "r+b") as f:
            f.seek(8 << 20)
            f.write(os.urandom(48 << 20))
        before = self._sums("host1", server)
        send = Migration.send

        def slow_send(**kwargs):
            return send(**dict(kwargs, max_bandwidth=8 << 20,
                               compress="off"))
        self.useFixture(fixtures.MockPatch(
            "nova_bhyve.migration.cold.Migration.send",
            side_effect=slow_send))
        self.api.post_server_action(uuid, action)
        host2 = self.drivers["host2"]

        def mid_disk():
            receiving = host2._received_disks.get(uuid)
            if receiving is None:
                return None
            with receiving._lock:     # its session is not freed meanwhile
                if receiving.stats is None and \
                        receiving.mig.stats().disk_blocks > 1000:
                    return receiving
            return None
        receiving = self._wait(mid_disk, "disk blocks arriving on host2",
                               timeout=60, interval=0.05)
        self.assertTrue(os.path.exists(os.path.join(
            host2.backend.instances_path, uuid, "disk.eph0")))
        receiving.close()       # the destination's listener gives up
        return server, before

    def _assert_kept_on_the_source(self, server, before):
        """The move failed cleanly: ACTIVE on host1, the guest booted
        again from its intact disks, nothing of it on host2."""
        uuid = server["id"]
        self._wait_migration(server, "error")
        server = self._wait_for_server_parameter(
            server, {"status": "ACTIVE", "OS-EXT-SRV-ATTR:host": "host1",
                     "OS-EXT-STS:task_state": None}, max_retries=60)
        self.assertEqual(MachineState.RUNNING,
                         self.drivers["host1"].backend.state(uuid))
        self._wait(lambda: self._gone("host2", server),
                   "host2 to remove what it received", timeout=30)
        self.assertEqual(before, self._sums("host1", server))
        self._wait_passes("host1", server, 1)
        # the same disks booted again: a second banner in the same console
        self.assertEqual(2, self._log("host1", server).count("NBGUEST "))
        self._assert_guest_alive("host1", server)
        text = "\n".join(r.getMessage() for r in self.records)
        self.assertIn("the guest stays here", text)
        self._assert_no_secret_logged(derived=2)

    def test_cold_migration_failing_mid_disk_keeps_the_guest_on_the_source(
            self):
        server, before = self._fail_mid_disk({"migrate": {"host": "host2"}})
        self._assert_kept_on_the_source(server, before)

    def test_resize_failing_mid_disk_keeps_the_guest_on_the_source(self):
        bigger = self._create_flavor(memory_mb=256, vcpu=2, disk=0,
                                     ephemeral=1, swap=64)
        self.flags(allow_resize_to_same_host=False)
        server, before = self._fail_mid_disk({"resize": {"flavorRef": bigger}})
        self._assert_kept_on_the_source(server, before)
        diag = self.drivers["host1"].backend.diagnostics(server["id"])
        self.assertEqual((1, 128), (diag["vcpus"], diag["memory_mb"]))


class DiskWriterColdTest(DiskWriterTestBase):
    """Cold migration and resize of a guest that writes its root disk (the
    VM's ATA disk): the disk the destination boots is, byte for byte, the
    one the source's guest left when it stopped."""

    def _move_writer(self, action, host_state):
        """Start ``action`` on a disk-writing guest; return the server and
        the SHA-256 of its disk as the source's VM stopped and as the
        destination's is about to boot it."""
        server, src_path, _data = self._boot_writer(filler=8 << 20)
        uuid = server["id"]
        sums = {}
        src, dst = self.drivers["host1"].backend, self.drivers["host2"].backend
        real_stop, real_start = src.stop, dst.start

        def stop(uid, *args):
            real_stop(uid, *args)
            sums.setdefault("stopped", _sha(src_path, 1 << 30))

        def start(uid):
            # the first GiB: what the source had (a resize grows the file)
            sums.setdefault("arrived", _sha(dst.disk_path(uid), 1 << 30))
            real_start(uid)
        src.stop, dst.start = stop, start
        self.api.post_server_action(uuid, action)
        server = self._wait_for_state_change(server, "VERIFY_RESIZE",
                                             max_retries=90)
        self.assertEqual("host2", server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual(host_state, src.state(uuid))
        return server, sums

    def _assert_writes_on_the_destination(self, server):
        """The guest booted anew on host2 and its disk writer runs clean."""
        self._wait_disk_passes("host2", server, 2)
        report = parse_console(self._log("host2", server))
        self.assertEqual("stress", report.banner.get("mode"))
        self.assertEqual(0, report.errors, report.fails)
        self.assertEqual([], report.fails)

    def test_cold_migration_of_a_guest_writing_its_disk(self):
        server, sums = self._move_writer({"migrate": {"host": "host2"}},
                                         MachineState.SHUTDOWN)
        self.assertEqual(sums["stopped"], sums["arrived"])
        self._event(server, "migrate", "bhyve_disk_copy")
        self._assert_writes_on_the_destination(server)
        server = self._confirm_resize(server)
        self._wait(lambda: self._gone("host1", server),
                   "the source to drop the old guest", timeout=30)
        self._assert_no_secret_logged(derived=2)

    def test_resize_of_a_guest_writing_its_disk(self):
        bigger = self._create_flavor(memory_mb=256, vcpu=2, disk=2,
                                     ephemeral=0)
        self.flags(allow_resize_to_same_host=False)
        server, sums = self._move_writer({"resize": {"flavorRef": bigger}},
                                         MachineState.SHUTDOWN)
        # grown to the new root size
        path = self.drivers["host2"].backend.disk_path(server["id"])
        self.assertEqual(2 << 30, os.path.getsize(path))
        self.assertEqual(sums["stopped"], sums["arrived"])
        self._assert_writes_on_the_destination(server)
        diag = self.drivers["host2"].backend.diagnostics(server["id"])
        self.assertEqual((2, 256), (diag["vcpus"], diag["memory_mb"]))


if __name__ == "__main__":
    sys.exit(nova_scenarios.main(
        __name__, [ColdMigrationTest, ColdFailureTest, DiskWriterColdTest],
        sys.argv[1:]))
