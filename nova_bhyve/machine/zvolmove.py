"""A migrating guest's zvols as stream disks of the engine (bhyve backend).

Source: per zvol a snapshot ``@<tag>-1`` and its full ``zfs send`` while
memory is copied, then, once the engine has paused the guest, a snapshot
``@<tag>-2`` and ``zfs send -i @<tag>-1`` of what the guest wrote since.
Destination: ``zfs receive`` of the full stream (creating the zvol) and
then of the increment.  The privileged half is ``nova_bhyve.privsep_zfs``;
this half makes the FIFOs both meet at, opens nova-compute's ends in the
order that half expects, and hands the engine ``Stream`` descriptors.

After the migration: the snapshots go on both hosts once it committed;
if it failed, the destination's received zvols are destroyed and the
source keeps its zvols (their snapshots go).
"""

import contextlib
import os
import secrets
import shutil

from nova_bhyve import privsep, privsep_zfs
from nova_bhyve.native.engine import Stream

#: FIFOs nova-compute reads, per role (it writes the others)
OURS_READ = {"send": ("first", "final", "status"), "receive": ("status",)}


def ordered(zvols):
    """``zvols`` with the root disk first, then the others by name."""
    return dict(sorted(zvols.items(), key=lambda kv: (kv[0] != "disk", kv[0])))


def new_tag():
    """A fresh name for one migration's snapshots (``mig-<12 hex>``)."""
    return "mig-" + secrets.token_hex(6)


class ZvolStreams:
    """The zvols of one guest moving in one migration, on one host.

    ``zvols``: {disk name: zvol}; the engine's streams go in the order of
    ``ordered`` (the same on both hosts: the root disk, then the others
    by name).
    ``role``: "send" or "receive".
    ``limits``: {disk name: the most bytes its received zvol may have}
    (a receiver's bound; a disk not named is not bounded).
    """

    def __init__(self, run_dir, uuid, tag, zvols, role, limits=None):
        self.uuid, self.tag, self.role = uuid, privsep_zfs.check_tag(tag), role
        self.limits = limits or {}
        self.zvols = ordered(zvols)
        self.dir = os.path.join(run_dir, f"zfs-{tag}")
        self._fds = []

    def _fifo(self, disk, which):
        return os.path.join(self.dir, f"{disk}.{which}")

    def open(self):
        """Make the FIFOs, start the helper's side; return the engine's Streams."""
        os.makedirs(self.dir, mode=0o700)
        streams = []
        try:
            for disk, zvol in self.zvols.items():
                streams.append(self._open_disk(disk, zvol))
        except BaseException:
            self.release()
            raise
        return streams

    def _open_disk(self, disk, zvol):
        for which in privsep_zfs.FIFOS[self.role]:
            os.mkfifo(self._fifo(disk, which), 0o600)
        ours = {}
        for which in OURS_READ[self.role]:      # readers first: nobody blocks
            ours[which] = self._open(disk, which, os.O_RDONLY)
        privsep_zfs.zvol_stream_open(self.uuid, self.tag, disk, self.role, zvol,
                                     max_bytes=self.limits.get(disk))
        for which in privsep_zfs.FIFOS[self.role]:
            if which not in ours:       # the helper reads these: it opened them
                ours[which] = self._open(disk, which, os.O_WRONLY)
        for fd in ours.values():
            os.set_blocking(fd, True)
        privsep_zfs.zvol_stream_start(self.uuid, self.tag, disk)
        return Stream(first=ours["first"], final=ours["final"],
                      status=ours["status"], notify=ours.get("notify", -1))

    def _open(self, disk, which, flags):
        fd = os.open(self._fifo(disk, which), flags | os.O_NONBLOCK | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    def release(self):
        """Close nova-compute's descriptors (the engine holds its own
        copies once started) and remove the FIFOs."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        shutil.rmtree(self.dir, ignore_errors=True)

    def finish(self, committed):
        """Remove the snapshots; a failed destination also drops its zvols."""
        self.release()
        for zvol in self.zvols.values():
            if self.role == "receive" and not committed:
                privsep.zfs("destroy", zvol)
                continue
            for snap in privsep_zfs.snapshot_names(zvol, self.tag):
                privsep.zfs("destroy", snap)
