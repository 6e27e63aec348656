"""Pre-migration checks: hypervisors, CPUs, memory, disk, storage, mode.

Each check raises ``MigrationPreCheckError`` with a message that names the
host, what differs and what to change; Nova shows it to the user and the
server stays where it is.
"""

import contextlib
import os
import re
import tempfile

from oslo_serialization import jsonutils

from nova import exception

PROBE_PREFIX = ".nova-bhyve-probe-"


def _fail(reason):
    raise exception.MigrationPreCheckError(reason=reason)


def check_hypervisors(src_info, dst_info):
    """Both hosts run bhyve; the destination's version is not older."""
    src_type = src_info.get("hypervisor_type")
    dst_type = dst_info.get("hypervisor_type")
    if src_type != dst_type:
        _fail(f"the source runs hypervisor {src_type!r}, this host "
              f"{dst_type!r}: live migration needs the same hypervisor")
    src_ver = src_info.get("hypervisor_version") or 0
    dst_ver = dst_info.get("hypervisor_version") or 0
    if dst_ver < src_ver:
        _fail(f"this host's hypervisor version {dst_ver} is older than the "
              f"source's {src_ver}: upgrade this host or choose another")


def _cpu(info):
    try:
        return jsonutils.loads(info.get("cpu_info") or "{}")
    except ValueError:
        return {}


def check_cpus(src_info, dst_info):
    """Same architecture, CPU vendor (when known) and page size.

    The engine compares the CPUID feature words a guest may rely on during
    its handshake; this check catches the common mismatches before any
    guest is touched.
    """
    src, dst = _cpu(src_info), _cpu(dst_info)
    for key, what in (("arch", "architecture"), ("vendor", "CPU vendor"),
                      ("page_size", "page size")):
        a, b = src.get(key), dst.get(key)
        if a and b and a != b:
            _fail(f"{what} differs: source {a}, destination {b}; a guest "
                  f"cannot move between them")


def check_free_memory(facts, memory_mb):
    """The host has ``memory_mb`` MiB free right now."""
    free = facts.memory_mb - facts.memory_mb_used
    if free < memory_mb:
        _fail(f"this host has {free} MiB of memory free and the guest needs "
              f"{memory_mb} MiB: free memory here or choose another host")


def check_disk(available_mb, disks, over_commit):
    """The destination can hold the disks (allocated size if over-committing)."""
    if available_mb is None:
        return
    key = "disk_size" if over_commit else "virt_disk_size"
    need = sum(int(d[key]) for d in disks)
    if need > available_mb * (1 << 20):
        _fail(f"the destination has {available_mb} MiB of disk available and "
              f"the instance's disks need {need >> 20} MiB")


def disk_info(path):
    """Return the libvirt-style disk description of one raw disk file."""
    st = os.stat(path)
    return {"path": path, "type": "raw", "virt_disk_size": st.st_size,
            "disk_size": st.st_blocks * 512, "backing_file": "",
            "over_committed_disk_size": max(0, st.st_size - st.st_blocks * 512)}


# -- shared storage probe (as the libvirt driver does it) -------------------
def create_probe(directory):
    """Create a probe file in ``directory``; return its name."""
    fd, path = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=directory)
    os.close(fd)
    return os.path.basename(path)


def probe_exists(directory, name):
    """Return True if the other host's probe file is visible here."""
    if not name or os.sep in name or not name.startswith(PROBE_PREFIX):
        return False
    with contextlib.suppress(OSError):
        os.utime(directory, None)       # make NFS clients look again
    return os.path.exists(os.path.join(directory, name))


def remove_probe(directory, name):
    """Remove a probe file (missing is fine)."""
    if name and os.sep not in name and name.startswith(PROBE_PREFIX):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))


def check_storage_layout(shared, block_migration, host, instances_path):
    """Return whether the live migration copies disks; refuse a mismatch.

    ``block_migration`` is what the user asked for (None: auto).  As the
    libvirt driver: a shared instances path holds the disks on both hosts,
    so a block migration cannot be used; a local one needs it.
    """
    if shared and block_migration:
        raise exception.InvalidLocalStorage(path=host, reason=(
            f"[DEFAULT] instances_path ({instances_path}) is shared with the "
            "destination, so the disks are there already and a block "
            "migration cannot be used with shared storage: live-migrate "
            "without --block-migration (or with block_migration=auto)"))
    if not shared and block_migration is False:
        raise exception.InvalidSharedStorage(path=host, reason=(
            f"[DEFAULT] instances_path ({instances_path}) is not shared with "
            "the destination, so a live migration must copy the disks: "
            "request a block migration (--block-migration, or "
            "block_migration=auto), or share instances_path between the "
            "hosts"))
    return not shared


# -- mode -------------------------------------------------------------------
def choose_mode(src_dirty_log, dst_dirty_log, without_dirty_log):
    """Return "live" or "warm", or refuse, per the dirty-log capabilities."""
    if src_dirty_log and dst_dirty_log:
        return "live"
    missing = " and ".join(h for h, ok in (("the source", src_dirty_log),
                                           ("the destination", dst_dirty_log))
                           if not ok)
    if without_dirty_log == "warm":
        return "warm"
    _fail(f"{missing} cannot track dirty guest memory, so the guest cannot "
          "move while it runs; set [bhyve] live_migration_without_dirty_log "
          "= warm to allow a paused (warm) migration, or enable the dirty "
          "log ([bhyve] live_migration_dirty_log)")


#: an ephemeral disk's name (the driver's disks: disk, swap, eph0, eph1...)
EPHEMERAL_DISK = re.compile(r"eph[0-9]{1,2}")


def _disk_limit(flavor, name):
    """(the most bytes disk ``name`` may have, the flavor's field saying
    so); (None, ...) if unbounded; KeyError for a name not the flavor's."""
    if name == "disk":
        return (flavor.root_gb << 30 or None), f"root_gb {flavor.root_gb} GiB"
    if name == "swap":
        return flavor.swap << 20, f"swap {flavor.swap} MiB"
    if EPHEMERAL_DISK.fullmatch(name):
        return (flavor.ephemeral_gb << 30,
                f"ephemeral_gb {flavor.ephemeral_gb} GiB")
    raise KeyError(name)


def disk_limits(flavor, names):
    """{name: the most bytes disk ``name`` may have under ``flavor``, or
    None if unbounded} for the driver's disk names ``names``; an
    ephemeral disk alone may take all of ephemeral_gb."""
    return {name: _disk_limit(flavor, name)[0] for name in names}


def disk_size_error(flavor, sizes):
    """What is wrong with the source's disk sizes ``sizes`` ({disk name:
    bytes}) for ``flavor``: None if each fits it.

    The root disk may be at most root_gb GiB (a flavor with root_gb 0
    takes the image's size, which this host does not know: not bounded
    here), the swap disk flavor.swap MiB, the ephemeral disks together
    ephemeral_gb GiB; any other name is refused.
    """
    errors = []
    for name, size in sizes.items():
        try:
            limit, allowed = _disk_limit(flavor, name)
        except KeyError:
            errors.append(f"disk {name!r} is none of the flavor's disks")
            continue
        if limit is not None and size > limit:
            errors.append(f"disk {name} is {size} bytes, more than the "
                          f"flavor's {allowed} ({limit} bytes)")
    ephemeral = sum(size for name, size in sizes.items()
                    if EPHEMERAL_DISK.fullmatch(name))
    if not errors and ephemeral > flavor.ephemeral_gb << 30:
        errors.append(f"the ephemeral disks are {ephemeral} bytes together, "
                      "more than the flavor's ephemeral_gb "
                      f"{flavor.ephemeral_gb} GiB")
    if errors:
        return f"the source's disks do not fit the flavor: {'; '.join(errors)}"
    return None
