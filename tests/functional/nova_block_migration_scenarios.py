"""Live block migration through Nova with a guest writing its disk.

As ``nova_migration_scenarios``: Nova's control plane and two computes
on ``bhyve.BhyveDriver`` in one process, the KVM test host underneath.
The guest's root disk is its VM's ATA disk; the payload's disk writer
(``disk=1``) writes versioned blocks over the first 256 KiB of it, reads
them back and re-reads them later against the version it remembers,
while its memory writer runs.  The engine moves memory and disk in one
session; a connection broken mid-disk, and a shared instances path, are
covered too.  Run in a fresh interpreter per concurrency mode::

    NOVA_BHYVE_CONCURRENCY=threading python nova_block_migration_scenarios.py

The last line of standard output is ``NOVA-BHYVE-RESULTS`` and a JSON
object of test name to outcome.
"""

import os
import pathlib
import sys

import nova_scenarios

nova_scenarios.select_mode()

# first nova import: it applies (or forbids) eventlet patching
from nova.tests.functional import integrated_helpers  # noqa: E402,F401

# isort: split

import hashlib  # noqa: E402

from nova_migration_base import MigrationTestBase  # noqa: E402

import nova_bhyve.driver  # noqa: E402
from nova_bhyve import sparse  # noqa: E402
from nova_bhyve.machine.base import MachineState  # noqa: E402
from nova_bhyve.migration import data as mdata  # noqa: E402
from nova_bhyve.testhost.console import parse_console  # noqa: E402

nova_scenarios.install_shim(nova_bhyve.driver)
# the engine tests' fault-injecting forwarder (a package module)
sys.path.append(str(pathlib.Path(__file__).resolve().parents[2]))
from tests.functional.migration_helpers import (  # noqa: E402
    TO_DEST,
    FaultyProxy,
)

MiB = 1 << 20
REGION = 256 << 10          # the disk writer's region (image "disk")
COMMIT = 12                 # PROTOCOL.md, message types
CHUNK = 64 << 10            # _sha's unit
ZEROS = bytes(CHUNK)


def _sha(path):
    """SHA-256 of a file's content: its size, then each 64 KiB chunk that
    is not all zeros, with its offset.  Holes and zero chunks alike are
    left out: it reads only the data extents (a few MiB of a 1 GiB disk,
    not the whole of it while the hand-over waits), and two files holding
    the same bytes agree however their holes lie."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        digest.update(size.to_bytes(8, "little"))
        done = 0                # the first chunk not hashed yet
        for start, length in sparse.data_extents(fd, size):
            for off in range(max(start - start % CHUNK, done), start + length,
                             CHUNK):
                chunk = os.pread(fd, CHUNK, off)
                if chunk != ZEROS[:len(chunk)]:
                    digest.update(off.to_bytes(8, "little") + chunk)
                done = off + CHUNK
    return digest.hexdigest()


class DiskWriterTestBase(MigrationTestBase):
    """A 1 GiB root disk the guest writes; helpers for its disk writer."""

    def setUp(self):
        super().setUp()
        self.disk_flavor = self._create_flavor(memory_mb=128, vcpu=1, disk=1,
                                               ephemeral=0)

    def _boot_writer(self, filler=0):
        """Boot the disk-writing guest on host1 and wait for a full pass
        of its memory and its disk; ``filler`` random bytes are written
        beyond its region first (data for round 0 to carry)."""
        server = self._boot(image="disk", flavor_id=self.disk_flavor)
        self._wait_disk_passes("host1", server, 1)
        path = self.drivers["host1"].backend.disk_path(server["id"])
        self.assertEqual(1 << 30, os.path.getsize(path))
        data = os.urandom(filler)
        with open(path, "r+b") as f:
            f.seek(16 * MiB)
            f.write(data)
            # on stable storage now, not in the guest's next FLUSH CACHE,
            # which slow storage would stretch past the migration
            f.flush()
            os.fsync(f.fileno())
        self._wait_disk_passes("host1", server,
                               self._disk_passes("host1", server) + 1)
        return server, path, data

    def _disk_passes(self, host, server):
        beats = parse_console(self._log(host, server)).heartbeats
        return beats[-1].disk_passes if beats else 0

    def _wait_disk_passes(self, host, server, passes, timeout=90):
        self._wait(lambda: (self._disk_passes(host, server) or 0) >= passes,
                   f"{passes} disk pass(es) on {host}", timeout=timeout)

    def _assert_full_passes_clean(self, host, server, after):
        """The guest completes two more full passes of its memory and its
        disk on ``host`` than ``after`` (a console report) showed, and its
        self-checks stay clean: every block it wrote before, reread
        against the version it remembers, is intact."""
        last = after.heartbeats[-1]
        self._wait_passes(host, server, last.passes + 2)
        self._wait_disk_passes(host, server, last.disk_passes + 2)
        report = parse_console(self._log(host, server))
        self.assertEqual(0, report.errors, report.fails)
        self.assertEqual([], report.fails)
        return report

    def _assert_continued_clean(self, src, dst, server):
        """The guest's console on ``src`` and then ``dst`` is one unbroken
        heartbeat sequence, and on ``dst`` it completes two more full,
        clean passes; returns the combined console report."""
        with open(self._saved(src, server["id"])) as f:
            on_source = f.read()
        self._assert_full_passes_clean(dst, server, parse_console(on_source))
        combined = parse_console(on_source + self._log(dst, server))
        self.assertEqual([], combined.sequence_breaks())
        return combined

    def _proxy_incoming(self, **kw):
        """Put a FaultyProxy between the hosts: host2's pre_live_migration
        returns the proxy's address instead of its engine's."""
        drv = self.drivers["host2"]
        real = drv.pre_live_migration
        proxies = []

        def pre_live_migration(*args, **kwargs):
            data = real(*args, **kwargs)
            host, port = mdata.parse_addr(data.target_connect_addr)
            proxies.append(FaultyProxy(port, target_host=host, **kw))
            self.addCleanup(proxies[-1].close)
            data.target_connect_addr = mdata.format_addr(host,
                                                         proxies[-1].port)
            return data
        drv.pre_live_migration = pre_live_migration
        return proxies


class BlockMigrationTest(DiskWriterTestBase):
    """Local instances paths: the disk moves with the memory."""

    def test_live_block_migration_with_a_guest_writing_its_disk(self):
        server, src_path, _data = self._boot_writer(filler=8 * MiB)
        uuid = server["id"]
        dst_path = os.path.join(self.drivers["host2"].backend.instances_path,
                                uuid, "disk")
        proxies = self._proxy_incoming(frames=True)
        sums = {}

        def at_commit(frame):
            # the source is paused for good and the destination holds the
            # final round on stable storage: neither file changes until
            # COMMIT arrives there
            sums["src"], sums["dst"] = _sha(src_path), _sha(dst_path)
            return frame

        # raw pages and blocks at 4 MiB/s: pre-copy lasts seconds, and the
        # guest writes memory and disk blocks meanwhile
        self.flags(live_migration_bandwidth=4,
                   live_migration_compression="off", group="bhyve")
        self._start_live_migration(server)
        self._wait(lambda: proxies, "the destination's listener")
        proxies[0].on_frame(0, TO_DEST, COMMIT, at_commit)
        real_destroy = self.drivers["host1"].backend.destroy

        def destroy(uid):
            real_destroy(uid)
            if uid == uuid and "stopped" not in sums:
                sums["stopped"] = _sha(src_path)
        self.drivers["host1"].backend.destroy = destroy
        server = self._wait_done(server, "host2")
        self._assert_moved(server, "host1", "host2")
        # the disk went in the engine's session, beside the memory: round
        # 0 the filler's and the region's blocks, later rounds the blocks
        # the guest wrote meanwhile
        figs = self._figures(server, "block migration, disk writer")
        self.assertGreater(figs["disk_blocks"], (8 * MiB + REGION) // 4096)
        self.assertGreater(figs["disk_bytes"], 8 * MiB)
        # the source file after its VM stopped is the destination's at
        # the hand-over, byte for byte
        self.assertEqual(sums["stopped"], sums["src"])
        self.assertEqual(sums["src"], sums["dst"])
        # on the destination every block reads back as written
        combined = self._assert_continued_clean("host1", "host2", server)
        self.assertEqual(0, combined.errors, combined.fails)
        # the source VM and its files are gone
        self.assertFalse(os.path.exists(src_path))
        self.assertNotIn(uuid, self.drivers["host1"].backend.list_machines())
        self._assert_no_secret_logged(derived=2)

    def test_a_cut_mid_disk_keeps_the_guest_and_its_disk_on_the_source(self):
        server, src_path, filler = self._boot_writer(filler=64 * MiB)
        uuid = server["id"]
        proxies = self._proxy_incoming()
        # 64 MiB of disk at 4 MiB/s: the cut finds blocks on the wire
        self.flags(live_migration_bandwidth=4,
                   live_migration_compression="off", group="bhyve")
        self._start_live_migration(server)
        drv = self.drivers["host1"]

        def blocks_sent():
            out = drv._outgoing.get(uuid)
            return out and out.mig and out.mig.handle.stats().disk_blocks
        self._wait(lambda: (blocks_sent() or 0) > 1000,
                   "disk blocks on the wire", timeout=60)
        stats = drv._outgoing[uuid].mig.handle.stats()
        self.assertEqual(0, stats.round)            # still round 0
        proxies[0].cut()
        mig = self._wait_migration(server, "failed")
        self.assertEqual("host2", mig["dest_compute"])
        server = self._assert_stayed(server)
        # nothing of the guest on the destination: no VM, no disk file
        self.assertNotIn(uuid, self.drivers["host2"].backend.list_machines())
        self.assertEqual([], [p for p in pathlib.Path(
            self.drivers["host2"].backend.instances_path).rglob("*")
            if uuid in str(p)])
        # the guest runs on with its disk: the writer's re-reads find
        # every block it wrote, and the data beyond its region is intact
        on_source = parse_console(self._log("host1", server))
        self._assert_full_passes_clean("host1", server, on_source)
        with open(src_path, "rb") as f:
            f.seek(16 * MiB)
            self.assertEqual(filler, f.read(len(filler)))
        self.assertEqual(MachineState.RUNNING,
                         drv.backend.state(uuid))


class SharedDiskWriterTest(DiskWriterTestBase):
    """One instances path for both hosts: no disk byte moves, and the
    guest finds on the destination every block it wrote on the source."""

    SHARED_INSTANCES = True

    def test_live_migration_moves_no_disk_bytes_and_the_disk_holds(self):
        server, path, _data = self._boot_writer()
        uuid = server["id"]
        self.flags(live_migration_bandwidth=4,
                   live_migration_compression="off", group="bhyve")
        self._start_live_migration(server)
        server = self._wait_done(server, "host2")
        figs = self._figures(server, "shared path, disk writer")
        self.assertEqual(0, figs["disk_bytes"])
        self.assertEqual(0, figs["disk_blocks"])
        self.assertEqual(path, self.drivers["host2"].backend.disk_path(uuid))
        self.assertEqual(MachineState.RUNNING,
                         self.drivers["host2"].backend.state(uuid))
        self._assert_continued_clean("host1", "host2", server)
        self._assert_no_secret_logged(derived=2)


if __name__ == "__main__":
    sys.exit(nova_scenarios.main(
        __name__, [BlockMigrationTest, SharedDiskWriterTest], sys.argv[1:]))
