"""QEMU's storage migration: drive-mirror to an NBD export on the destination.

QEMU's documented flow for a guest whose disk is not shared
(docs/interop/live-block-operations.rst, "live storage migration with
drive-mirror + NBD", and its iotest 194), as libvirt drives it:

1. the destination QEMU starts with ``-incoming defer`` and ``-S`` (its
   guest stays paused after the memory arrives) and an empty disk of the
   same size, which it exports writable over NBD (``nbd-server-start``,
   ``block-export-add``);
2. the source mirrors its disk into that export (``drive-mirror``,
   ``sync=full``, ``mode=existing``) until the job is READY (every block
   copied once; from then on each guest write is copied as it happens);
3. the source migrates the memory (``migrate``) as in the memory-only rows;
4. once the migration completed (the source's guest stopped for good),
   ``block-job-cancel`` on a READY mirror copies what is still dirty and
   ends the job with BLOCK_JOB_COMPLETED: the target is the disk as the
   guest left it;
5. the destination stops its NBD server and runs the guest (``cont``).
"""

import time

from vsqemu.common import BenchError, wait_for

NODE = "disk0"          # the disk's block node on both sides, and the export
JOB = "mirror0"
NBD_PORT = 10809        # the destination's NBD server, in its own namespace


def drive_args(path):
    """QEMU arguments for the guest's disk: the primary IDE master of the
    i440FX machine ("pc", whose PIIX IDE decodes the legacy ports the guest
    drives; q35's AHCI does not)."""
    # holes stay holes: without discard=unmap and detect-zeroes=unmap the
    # zeros the mirror writes over NBD fill the destination's file, and
    # the next migration from there copies them as data
    return ["-blockdev", f"driver=file,filename={path},node-name={NODE}-file,"
            "discard=unmap",
            "-blockdev", f"driver=raw,file={NODE}-file,node-name={NODE},"
            "discard=unmap,detect-zeroes=unmap",
            "-device", f"ide-hd,drive={NODE},id=hd0,bus=ide.0,unit=0"]


class Mirror:
    """Steps 1-2 and 4-5 of the flow above for one migration."""

    def __init__(self, src, dst, addr):
        self.src, self.dst, self.addr = src, dst, addr
        self.ready_s = None             # from the mirror's start to READY

    def start(self, timeout):
        """Export the destination's disk, mirror into it; True once READY,
        False (the job cancelled) if it is not READY within ``timeout`` s."""
        self.dst.qmp.cmd("nbd-server-start", {"addr": {"type": "inet", "data": {
            "host": self.addr, "port": str(NBD_PORT)}}})
        self.dst.qmp.cmd("block-export-add", {
            "type": "nbd", "id": "export0", "node-name": NODE, "name": NODE,
            "writable": True})
        t0 = time.monotonic()
        self.src.qmp.cmd("drive-mirror", {
            "job-id": JOB, "device": NODE, "sync": "full", "mode": "existing",
            "format": "raw", "target": f"nbd://{self.addr}:{NBD_PORT}/{NODE}"})
        while time.monotonic() - t0 < timeout:
            jobs = self.src.qmp.cmd("query-block-jobs")
            if not jobs:
                raise BenchError(f"drive-mirror ended before READY: "
                                 f"{self._job_events()}")
            if jobs[0].get("ready"):
                self.ready_s = time.monotonic() - t0
                return True
            time.sleep(0.01)
        self.abort()
        return False

    def abort(self):
        """Cancel the mirror at once (the migration is given up)."""
        self.src.qmp.cmd("block-job-cancel", {"device": JOB, "force": True})
        wait_for(lambda: not self.src.qmp.cmd("query-block-jobs"), 30,
                 "the cancelled mirror to end")

    def _job_events(self):
        return [e for e in self.src.qmp.events
                if e["event"].startswith("BLOCK_JOB")]

    def finish(self, timeout=60):
        """Steps 4 and 5: end the READY mirror with the guest stopped (its
        last dirty blocks copied), stop the export, run the destination."""
        self.src.qmp.cmd("block-job-cancel", {"device": JOB})
        wait_for(lambda: not self.src.qmp.cmd("query-block-jobs"), timeout,
                 "the mirror to copy its last blocks and end")
        ends = [e for e in self._job_events() if e["event"] in
                ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")]
        if not ends or ends[-1]["event"] != "BLOCK_JOB_COMPLETED" or \
                ends[-1]["data"].get("error"):
            raise BenchError(f"the mirror did not complete: {ends[-1:]}")
        self.dst.qmp.cmd("nbd-server-stop")
        self.dst.qmp.cmd("cont")
