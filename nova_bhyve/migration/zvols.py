"""Live migration of disks that move as the engine's stream disks.

The bhyve backend's disks are zvols: local to each host's pool whether
or not ``[DEFAULT] instances_path`` is shared, so a live migration always
moves them (``machine/zvolmove.py``: zfs send and receive inside the
engine's session).  A shared instances path then only means that the
instance directory (the UEFI variables) is already on the destination.
What ``live.py`` calls for such a backend is here, and the choice of
what a live migration does with the disks (``check_layout``).
"""

from nova import exception
from nova_bhyve.machine import zvolmove
from nova_bhyve.migration import checks
from nova_bhyve.migration import data as mdata

TAG_KEY = "zfs_tag"


def check_layout(backend, data, shared, asked, host):
    """Return whether the live migration copies the disks; refuse what the
    backend's disk layout cannot do.

    Stream disks (zvols) always move: a request not to move them is
    refused, and ``data`` names the migration's snapshots.  Disk files stay
    on a shared instances path; on a local one the engine copies them,
    unless the backend cannot (``live_disk_copy_blocker``: refused).
    """
    if not backend.stream_disks:
        if not shared and backend.live_disk_copy_blocker:
            raise exception.InvalidSharedStorage(
                path=host, reason=backend.live_disk_copy_blocker)
        return checks.check_storage_layout(shared, asked, host,
                                           backend.instances_path)
    if asked is False:
        raise exception.InvalidSharedStorage(path=host, reason=(
            f"the guest's disks are zvols under [bhyve] zfs_dataset "
            f"({backend.dataset}) on this host's pool, which the destination "
            "cannot reach, so a live migration always copies them (zfs send "
            "and receive)" + (", even with the shared instances_path" if shared
                              else "") +
            ": live-migrate with --block-migration or block_migration=auto"))
    mdata.put(data, TAG_KEY, zvolmove.new_tag())
    return True


def open_streams(backend, uuid, migrate_data, flavor=None):
    """Start the zfs side of the guest's zvols; return (ZvolStreams, Streams).

    A destination passes the guest's ``flavor``: a received zvol larger
    than the flavor allows for its disk fails the migration before the
    commit (and is destroyed with the others).
    """
    zs = backend.migration_streams(uuid, mdata.require(migrate_data, TAG_KEY),
                                   flavor is not None)
    if flavor is not None:
        zs.limits = checks.disk_limits(flavor, zs.zvols)
    return zs, zs.open()


def started(zs, log, instance, start, **kwargs):
    """``start(**kwargs)`` (the engine); if it refuses, the zfs side ends
    as a failed migration's does."""
    try:
        return start(**kwargs)
    except Exception:
        finish(zs, False, log, instance)
        raise


def finish(zs, committed, log, instance):
    """Remove the migration's snapshots (a failed destination: its zvols);
    a failure here is logged: the guest is where the engine left it."""
    if zs is None:
        return
    try:
        zs.finish(committed)
    except Exception as exc:        # noqa: BLE001 - logged, nothing to undo
        log.warning("Could not remove the migration's zfs snapshots (%s): "
                    "%s; remove them with zfs destroy", zs.tag, exc,
                    instance=instance)
