"""The base of the Nova migration scenario scripts (``nova_*migration_scenarios.py``).

Two bhyve computes (``host1``, ``host2``) with their own instances
directories, guest images for the payload's modes, and helpers to watch
a guest move between the hosts.  Imports nova: a script imports it only
after ``nova_scenarios.select_mode`` (see ``nova_scenarios``); pytest
does not collect it.
"""

import base64
import hashlib
import json
import logging
import os
import re
import shutil

import fixtures
from nova_scenario_base import BhyveScenarioTest

import nova_bhyve.migration.data
from nova_bhyve.machine.base import MachineState
from nova_bhyve.native.engine import MigrationError
from nova_bhyve.testhost.console import parse_console

# the mode nova_scenarios.select_mode chose for this process
MODE = ("threading" if os.environ.get("OS_NOVA_DISABLE_EVENTLET_PATCHING") == "1"
        else "eventlet")

GUEST_IMAGES = {
    "idle": ("0c2e8f5a-1d3b-4c6e-9f0a-2b4c6d8e0f1a", "mode=idle"),
    # rewrites one byte of each of 1024 pages, ~16 times a second (on
    # this nested KVM); delta encoding makes that cheap to send
    "stress": ("1d3f9a6b-2e4c-4d7f-8a1b-3c5d7e9f1a2b",
               "mode=stress pattern=touch ws=4M"),
    # rewrites the same 4096 pages as fast as a loop can: even on a host
    # so busy that the guest gets a sliver of a CPU, every page is dirty
    # again long before a round at a few MiB/s ends
    "hot": ("2e4a0b7c-3f5d-4e8a-9b2c-4d6e8f0a2b3c",
            "mode=stress pattern=tight ws=16M"),
    # the touch writer's memory, and versioned blocks written over the
    # first 256 KiB of its root disk (the VM's ATA disk), read back and
    # re-read against the version it remembers (needs a 1 GiB root disk)
    "disk": ("3f5b1c8d-4a6e-4f9b-8c3d-5e7f9a1b3c4d",
             "mode=stress pattern=touch ws=4M disk=1 disksize=256K"),
}
# a migration in one of these has ended: waiting for another is in vain
FINAL_STATUSES = ("completed", "failed", "cancelled", "error")
# what a live migration can be in once it has left running
PAST_RUNNING = ("post-migrating",) + FINAL_STATUSES
# the instance action of each kind of migration
ACTIONS = {"live-migration": "live-migration", "migration": "migrate",
           "resize": "resize", "evacuation": "evacuate"}
SWITCHOVER = re.compile(r"bhyve_switchover mode=(\w+) downtime=([\d.]+)ms "
                        r"total=(\d+)ms bytes=(\d+) rounds=(\d+) "
                        r"throttle=(\d+)% .* disk_bytes=(\d+) "
                        r"disk_blocks=(\d+)$")


class MigrationTestBase(BhyveScenarioTest):
    """Two bhyve computes and helpers to watch guests move between them."""

    HOSTS = ("host1", "host2")
    IMAGES = dict(GUEST_IMAGES.values())
    TMP_PREFIX = "nbm-"
    BHYVE_FLAGS = dict(live_migration_inbound_addr="127.0.0.1",
                       live_migration_monitor_interval=0.5,
                       live_migration_downtime=300,
                       live_migration_downtime_steps=3)
    WAIT_TIMEOUT = 60.0
    WAIT_INTERVAL = 0.05

    def setUp(self):
        super().setUp()
        os.makedirs(os.path.join(self.base, "saved"))
        # every log record at every level, and every secret derived
        self.records = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = self.records.append
        logging.getLogger().addHandler(handler)
        self.addCleanup(logging.getLogger().removeHandler, handler)
        self.secrets = []
        real_derive = nova_bhyve.migration.data.derive

        def derive(*args):
            secrets = real_derive(*args)
            self.secrets.append(secrets)
            return secrets
        self.useFixture(fixtures.MockPatch(
            "nova_bhyve.migration.data.derive", side_effect=derive))

    def _start_bhyve_compute(self, host):
        """Start ``host``; keep the console of each guest that leaves it."""
        compute = super()._start_bhyve_compute(host)
        drv = compute.driver
        real_delete = drv.backend.delete_files

        def delete_files(uuid, destroy_disks=True, _drv=drv, _host=host):
            # keep the console of a guest that leaves a host, for the checks
            log = _drv.backend.console_log_path(uuid)
            if os.path.exists(log):
                shutil.copy(log, self._saved(_host, uuid))
            return real_delete(uuid, destroy_disks)

        drv.backend.delete_files = delete_files
        return compute

    def _sums(self, host, server):
        """SHA-256 of each disk file of ``server`` on ``host``."""
        sums = {}
        for name, path in self.drivers[host].backend.disk_paths(
                server["id"]).items():
            with open(path, "rb") as f:
                sums[name] = hashlib.sha256(f.read()).hexdigest()
        return sums

    def _cold_migrate(self, server, host="host2"):
        """Cold-migrate ``server`` to ``host``; return it and the SHA-256
        of its disks before."""
        before = self._sums(server["OS-EXT-SRV-ATTR:host"], server)
        server = self._migrate_server(server, host=host)
        self.assertEqual(host, server["OS-EXT-SRV-ATTR:host"])
        return server, before

    def _evacuate_to_host2(self, server):
        """Stop host1's compute, force it down and evacuate ``server`` to
        host2; return the server, the stale guest's pid and the service."""
        old_pid = self.drivers["host1"].backend._child_pid(server["id"])
        self.computes["host1"].stop()
        service = self.api.get_services(host="host1",
                                        binary="nova-compute")[0]
        self.api.put_service(service["id"], {"forced_down": True})
        server = self._evacuate_server(server, expected_host="host2",
                                       expected_state="SHUTOFF")
        return server, old_pid, service

    def _saved(self, host, uuid):
        return os.path.join(self.base, "saved", f"{host}-{uuid}.log")

    def _gone(self, host, server):
        """True once ``host`` has no guest and no files for ``server``."""
        backend = self.drivers[host].backend
        return server["id"] not in backend.list_machines() and not \
            os.path.exists(os.path.join(backend.instances_path, server["id"]))

    def _assert_no_secret_logged(self, derived=2):
        """No secret of this test's migrations is in any log record.

        ``derived``: one per side of each migration (a live migration's
        engine session moves memory and disks, a cold migration's the
        stopped guest's disks).
        """
        text = "\n".join(r.getMessage() for r in self.records)
        self.assertEqual(derived, len(self.secrets))
        for value in [pair.memory for pair in self.secrets]:
            for form in (value.hex(), base64.b64encode(value).decode(),
                         repr(value)[2:-1]):
                self.assertNotIn(form, text)

    def _kill_leftovers(self):
        # a failed test may leave a migration running: end it while the
        # services still answer, or stopping them waits for it
        for drv in self.drivers.values():
            for out in list(drv._outgoing.values()):
                out.abort = True
                if out.mig is not None:
                    try:
                        out.mig.handle.cancel()
                    except MigrationError:
                        pass
        self._wait(lambda: not any(d._outgoing for d in self.drivers.values()),
                   "running migrations to end", timeout=60)
        super()._kill_leftovers()

    # -- guests ---------------------------------------------------------------
    def _boot(self, host="host1", image="stress", flavor_id=None):
        server = self._create_server(image_uuid=GUEST_IMAGES[image][0],
                                     flavor_id=flavor_id or self.flavor_id,
                                     networks="none", host=host)
        self.assertEqual(host, server["OS-EXT-SRV-ATTR:host"])
        self._wait_passes(host, server, 1)
        return server

    def _log(self, host, server):
        path = self.drivers[host].backend.console_log_path(server["id"])
        try:
            with open(path, "rb") as f:
                return f.read().decode("ascii", "replace")
        except FileNotFoundError:
            return ""

    def _wait_passes(self, host, server, passes):
        def ok():
            r = parse_console(self._log(host, server))
            return r.heartbeats and r.heartbeats[-1].passes >= passes
        self._wait(ok, f"{passes} working-set pass(es) on {host}")

    def _assert_guest_alive(self, host, server, beats=200):
        """Heartbeats continue on ``host`` with the self-check intact."""
        now = parse_console(self._log(host, server)).last_seq
        self._wait(lambda: parse_console(self._log(host, server)).last_seq
                   > now + beats, f"heartbeats on {host}")
        report = parse_console(self._log(host, server))
        self.assertEqual(0, report.errors, report.fails)
        self.assertEqual([], report.fails)
        return report

    def _assert_moved(self, server, src, dst):
        """The guest left ``src`` for good and continues on ``dst``."""
        uuid = server["id"]
        self.assertEqual(dst, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual("ACTIVE", server["status"])
        self.assertNotIn(uuid, self.drivers[src].backend.list_machines())
        self.assertFalse(os.path.exists(
            os.path.join(self.drivers[src].backend.instances_path, uuid)))
        self.assertEqual(MachineState.RUNNING,
                         self.drivers[dst].backend.state(uuid))
        report = self._assert_guest_alive(dst, server)
        self.assertEqual({}, report.banner, "the guest booted anew")
        with open(self._saved(src, uuid)) as f:
            before = parse_console(f.read())
        combined = parse_console(f"{open(self._saved(src, uuid)).read()}"
                                 f"{self._log(dst, server)}")
        self.assertEqual([], combined.sequence_breaks())
        self.assertGreater(report.heartbeats[0].seq, before.last_seq - 1)
        self.assertGreaterEqual(report.heartbeats[0].passes,
                                before.heartbeats[-1].passes)
        self.assertEqual(0, combined.errors, combined.fails)

    def _assert_stayed(self, server, src="host1", dst="host2"):
        """The server is ACTIVE on ``src``; ``dst`` kept nothing of it."""
        server = self._wait_for_server_parameter(
            server, {"status": "ACTIVE", "OS-EXT-SRV-ATTR:host": src,
                     "OS-EXT-STS:task_state": None}, max_retries=60)
        self.assertEqual(MachineState.RUNNING,
                         self.drivers[src].backend.state(server["id"]))
        self._wait(lambda: not os.path.exists(os.path.join(
            self.drivers[dst].backend.instances_path, server["id"])),
            f"{dst} to remove the incoming guest", timeout=30)
        report = self._assert_guest_alive(src, server)
        self.assertEqual([], report.sequence_breaks())
        return server

    # -- migrations -----------------------------------------------------------
    def _start_live_migration(self, server, host="host2"):
        """Request a live migration of ``server`` to ``host``; return it once
        seen running, or its record once past running (a small idle guest
        can move between two polls)."""
        last = self._migration(server)
        last_id = last["id"] if last else 0
        self.api.post_server_action(
            server["id"],
            {"os-migrateLive": {"host": host, "block_migration": "auto"}})

        def started():
            mig = self._active_migration(server)
            if mig is not None:
                return mig
            mig = self._migration(server)
            if mig and mig["id"] > last_id and mig["status"] in PAST_RUNNING:
                return mig
            return None
        return self._wait(started, "the migration to run", timeout=30,
                          interval=0.02)

    def _active_migration(self, server, with_memory=False):
        for mig in self.api.get_active_migrations(server["id"]):
            if mig["status"] == "running" and (not with_memory or (
                    mig["memory_total_bytes"] and
                    mig["memory_processed_bytes"])):
                return mig
        return None

    def _migration(self, server):
        migs = [m for m in self.api.get_migrations()
                if m["instance_uuid"] == server["id"]]
        return max(migs, key=lambda m: m["id"]) if migs else None

    def _wait_migration(self, server, status, timeout=90.0):
        """Wait for the last migration of ``server`` to reach ``status``;
        fail at once, with its record and its live-migration events, if it
        ends in another final status."""
        # a live migration whose destination failed its preparation goes
        # to error, then (rolled back) to failed
        ended = [s for s in FINAL_STATUSES
                 if s != status and not (status == "failed" and s == "error")]

        def ok():
            mig = self._migration(server)
            if mig is None:
                return None
            if mig["status"] in ended:
                action = ACTIONS.get(mig.get("migration_type"), "migrate")
                events = [(ev["event"], ev["result"], ev.get("details"))
                          for ev in self._events(server, action)]
                self.fail(f"migration went to {mig['status']}, not {status}: "
                          f"{mig}; {action} events: {events}")
            return mig if mig["status"] == status else None
        return self._wait(ok, f"migration status {status}", timeout=timeout,
                          interval=0.1)

    def _events(self, server, action):
        for act in self.api.get_instance_actions(server["id"]):
            if act["action"] == action:
                return self.api.get_instance_action_details(
                    server["id"], act["request_id"])["events"]
        return []

    def _event(self, server, action, prefix):
        def find():
            for ev in self._events(server, action):
                if ev["event"].startswith(prefix) and ev["result"]:
                    return ev
            return None
        return self._wait(find, f"instance action event {prefix}",
                          timeout=30, interval=0.1)

    def _figures(self, server, label):
        """Return and print the switch-over figures of the last migration."""
        ev = self._event(server, "live-migration", "bhyve_switchover")
        m = SWITCHOVER.match(ev["event"])
        self.assertIsNotNone(m, ev["event"])
        figs = dict(zip(("mode", "downtime_ms", "total_ms", "bytes", "rounds",
                         "throttle", "disk_bytes", "disk_blocks"), m.groups()))
        figs = {k: v if k == "mode" else float(v) if k == "downtime_ms"
                else int(v) for k, v in figs.items()}
        print("NOVA-BHYVE-FIGURES " + json.dumps(dict(figs, test=label,
                                                      concurrency=MODE)),
              flush=True)
        self.assertGreater(figs["bytes"], 0)
        self.assertLess(figs["downtime_ms"], figs["total_ms"])
        return figs

    def _server(self, server):
        return self.api.get_server(server["id"])

    def _wait_done(self, server, host):
        self._wait_migration(server, "completed")
        return self._wait_for_server_parameter(
            server, {"status": "ACTIVE", "OS-EXT-SRV-ATTR:host": host,
                     "OS-EXT-STS:task_state": None}, max_retries=60)
