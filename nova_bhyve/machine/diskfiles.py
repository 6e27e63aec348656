"""Instance disks as sparse raw files in the instance directory.

Used by the test host backend and by the bhyve backend with ``[bhyve]
disk_layout = file``.  In ``<instances_path>/<uuid>/``: ``disk`` (the
root disk, a copy of the cached Glance image grown to the flavor's
root_gb, or blank), ``disk.swap`` and ``disk.eph0``, ``disk.eph1``…
(blank sparse files of the size the flavor or block device mapping asks
for; nothing formats them, the guest does).  The directory may be shared
between hosts (NFS): a file already there is the guest's and is kept.
"""

import contextlib
import dataclasses
import os

from oslo_log import log as logging

from nova_bhyve import sparse
from nova_bhyve.concurrency import offload
from nova_bhyve.machine.base import (
    ROOT_DISK,
    SWAP_DISK,
    MachineError,
    MachineState,
)

LOG = logging.getLogger(__name__)
#: why bhyve cannot live-migrate disk files between unshared instances paths
NO_LIVE_COPY = (
    "the guest's disks are files in [DEFAULT] instances_path ({path}) with "
    "[bhyve] disk_layout = file, and bhyve keeps no log of the blocks a "
    "running guest writes, so a live migration cannot copy them: share "
    "instances_path between the hosts (NFS) so that the disks stay where "
    "they are, or cold-migrate the server (nova migrate); hosts with "
    "[bhyve] disk_layout = zvol live-migrate local disks")


def file_name(name):
    """Return the file name of disk ``name``: ``disk``, ``disk.swap``…"""
    return "disk" if name == ROOT_DISK else "disk." + name


def make_root(path, size, base=None):
    """Make the root disk ``path``: a sparse copy of ``base`` grown to
    ``size`` bytes, or a blank file of ``size``; an existing one is kept
    (received by a cold migration, a revert's, or on shared storage)."""
    if os.path.exists(path):
        LOG.debug("Keeping the existing disk %s", path)
    elif base is not None:
        offload(sparse.copy_file, base, path, size)
    else:
        with open(path, "wb") as f:
            f.truncate(size)


def make_extra(directory, disk):
    """Make the blank sparse file of a swap or ephemeral disk; return
    ``disk`` with its path.

    An existing file is kept (a revert, a same-host resize), except a
    swap file of another size, which is made again blank.
    """
    path = os.path.join(directory, file_name(disk.name))
    size = disk.size_mb << 20
    exists = os.path.exists(path)
    if exists and disk.name == SWAP_DISK and os.path.getsize(path) != size:
        os.unlink(path)
        exists = False
    if not exists:
        with open(path, "wb") as f:
            f.truncate(size)
    return dataclasses.replace(disk, path=path)


def remove_stale(directory, extras):
    """Remove extra disk files the new spec no longer has (swap dropped)."""
    keep = {os.path.basename(d.path) for d in extras}
    for name in os.listdir(directory):
        if name.startswith("disk.") and name not in keep:
            os.unlink(os.path.join(directory, name))


def require_root(directory):
    """Raise MachineError unless the root disk is in ``directory`` (a
    guest adopted over a shared instances path)."""
    disk = os.path.join(directory, file_name(ROOT_DISK))
    if not os.path.isfile(disk):
        raise MachineError(
            f"{disk} is missing: this host does not share [DEFAULT] "
            "instances_path with the host the guest comes from")


def usable(directory):
    """Return True if the root disk file is in ``directory`` and the
    directory is writable here."""
    return (os.path.isfile(os.path.join(directory, file_name(ROOT_DISK))) and
            os.access(directory, os.W_OK))


def grow(path, size):
    """Extend a sparse disk file to ``size`` bytes if it is smaller."""
    if os.path.getsize(path) < size:
        os.truncate(path, size)


@contextlib.contextmanager
def paused_copy(backend, uuid, copy):
    """Yield ``copy``, a sparse copy of the guest's root disk file taken
    with the guest paused if it runs; remove it afterwards."""
    running = backend.state(uuid) == MachineState.RUNNING
    if running:
        backend.pause(uuid)
    try:
        sparse.copy_file(backend.disk_path(uuid), copy)
    finally:
        if running:
            backend.unpause(uuid)
    try:
        yield copy
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(copy)
