"""Privileged zfs send and receive of a migrating guest's zvols.

A zvol moves as a stream disk of the migration engine (PROTOCOL.md,
"Streams"): on the source a snapshot ``<zvol>@<tag>-1`` and its full
``zfs send`` while memory is copied; once the guest is paused a second
snapshot ``@<tag>-2`` and ``zfs send -i @<tag>-1`` (what the guest wrote
during the migration); on the destination ``zfs receive`` of each.

nova-compute and this helper meet at four FIFOs per disk that
nova-compute makes in ``<[bhyve] runtime_path>/<uuid>/zfs-<tag>/``:
``<disk>.first`` and ``<disk>.final`` (the two parts), ``<disk>.notify``
(source: the engine writes one byte there once the guest is paused) and
``<disk>.status`` (``ok`` or what failed, written once the zfs processes
ended).  The helper opens them beneath the runtime directory, following
no link, and refuses anything but a FIFO.  Each side opens its FIFO ends
without blocking; the reader of a FIFO always opens first, so neither
waits (``zvol_stream_open``: nova-compute has opened what it reads, the
helper opens the rest; ``zvol_stream_start``: nova-compute has opened
what it writes, the helper's processes start).  A reader therefore never
sees an end of file before its writer came.
"""

import dataclasses
import errno
import os
import re
import stat
import subprocess
import threading

from oslo_concurrency import processutils
from oslo_log import log as logging

from nova_bhyve import beneath
from nova_bhyve.privsep import (
    CONF,
    PrivilegeError,
    _refusing,
    _runtime_root,
    bhyve_pctxt,
    check_dataset,
    check_uuid,
)

LOG = logging.getLogger(__name__)
TAG_RE = re.compile(r"^mig-[0-9a-f]{12}$")
DISK_RE = re.compile(r"^(disk|swap|eph[0-9]{1,2})$")
#: the FIFOs of one disk, per role
FIFOS = {"send": ("first", "final", "notify", "status"),
         "receive": ("first", "final", "status")}
#: which FIFO ends the helper reads, per role (it writes the others)
HELPER_READS = {"send": ("notify",), "receive": ("first", "final")}
MAX_STATUS = 200
_JOBS = {}
_JOBS_LOCK = threading.Lock()


# -- the command lines (checked against zfs(8) in tests/unit) --------------
def snapshot_names(zvol, tag):
    """The first and the final snapshot of ``zvol`` for migration ``tag``."""
    return f"{zvol}@{tag}-1", f"{zvol}@{tag}-2"


def snapshot_argv(zvol, tag, which):
    """``zfs snapshot`` of the first (1) or final (2) snapshot."""
    return [CONF.bhyve.zfs_path, "snapshot", snapshot_names(zvol, tag)[which - 1]]


def send_argv(zvol, tag, part):
    """``zfs send`` of part 0 (the first snapshot, full) or part 1 (the
    final snapshot, incremental from the first)."""
    first, final = snapshot_names(zvol, tag)
    if part == 0:
        return [CONF.bhyve.zfs_path, "send", first]
    return [CONF.bhyve.zfs_path, "send", "-i", f"@{tag}-1", final]


def receive_argv(zvol, part):
    """``zfs receive`` of part 0 (creates ``zvol``, a device-only volume as
    the driver makes them) or part 1 (the increment, onto it)."""
    if part == 0:
        return [CONF.bhyve.zfs_path, "receive", "-o", "volmode=dev", zvol]
    return [CONF.bhyve.zfs_path, "receive", zvol]


def volsize_argv(zvol):
    """``zfs get`` of ``zvol``'s volsize, in bytes, the value alone."""
    return [CONF.bhyve.zfs_path, "get", "-Hp", "-o", "value", "volsize", zvol]


def check_tag(tag):
    """Return ``tag`` if it names a migration's snapshots (mig-<12 hex>)."""
    if not isinstance(tag, str) or not TAG_RE.match(tag):
        raise PrivilegeError(f"{tag!r} is not a migration snapshot tag")
    return tag


def check_disk_name(name):
    """Return ``name`` if it is a disk name of the driver (disk, swap, ephN)."""
    if not isinstance(name, str) or not DISK_RE.match(name):
        raise PrivilegeError(f"{name!r} is not a disk name")
    return name


# -- the FIFOs ---------------------------------------------------------------
def _open_fifo(uuid, tag, disk, which, reading):
    rel = f"{check_uuid(uuid)}/zfs-{check_tag(tag)}/{check_disk_name(disk)}.{which}"
    flags = (os.O_RDONLY if reading else os.O_WRONLY) | os.O_NONBLOCK
    try:
        with _refusing():
            fd = beneath.open_beneath(_runtime_root(), rel, flags)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise PrivilegeError(f"{rel}: nobody reads it (open the reading "
                                 "ends before calling)") from exc
        raise
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise PrivilegeError(f"{rel} is not a FIFO")
    return fd


@dataclasses.dataclass
class _Job:
    role: str
    zvol: str
    tag: str
    fds: dict
    first: subprocess.Popen = None
    max_bytes: int = None


def _blocking(fd):
    os.set_blocking(fd, True)
    return fd


def _close(fds, *names):
    for name in names:
        fd = fds.pop(name, None)
        if fd is not None:
            os.close(fd)


@bhyve_pctxt.entrypoint
def zvol_stream_open(uuid, tag, disk, role, zvol, max_bytes=None):
    """Open the helper's FIFO ends of disk ``disk``; a source also takes
    the first snapshot and starts its full send into ``first``.  A
    receiver given ``max_bytes`` fails a received zvol larger than that."""
    if role not in HELPER_READS:
        raise PrivilegeError(f"role {role!r} is neither send nor receive")
    if max_bytes is not None and (type(max_bytes) is not int or max_bytes <= 0):
        raise PrivilegeError(f"max_bytes {max_bytes!r} is not a positive integer")
    check_dataset(zvol)
    key = (check_uuid(uuid), check_tag(tag), check_disk_name(disk))
    fds = {}
    try:
        for which in FIFOS[role]:
            fds[which] = _open_fifo(uuid, tag, disk, which,
                                    which in HELPER_READS[role])
        job = _Job(role, zvol, tag, fds, max_bytes=max_bytes)
        if role == "send":
            processutils.execute(*snapshot_argv(zvol, tag, 1))
            job.first = subprocess.Popen(send_argv(zvol, tag, 0),
                                         stdin=subprocess.DEVNULL,
                                         stdout=_blocking(fds["first"]),
                                         stderr=subprocess.PIPE)
            _close(fds, "first")
    except BaseException:
        _close(fds, *list(fds))
        raise
    with _JOBS_LOCK:
        _JOBS[key] = job


@bhyve_pctxt.entrypoint
def zvol_stream_start(uuid, tag, disk):
    """nova-compute has opened its ends: let the rest of the work run."""
    key = (check_uuid(uuid), check_tag(tag), check_disk_name(disk))
    with _JOBS_LOCK:
        job = _JOBS.pop(key, None)
    if job is None:
        raise PrivilegeError(f"no zfs stream of {'/'.join(key)} was opened")
    for fd in job.fds.values():
        _blocking(fd)
    run = _run_send if job.role == "send" else _run_receive
    threading.Thread(target=_report, args=(job, run), daemon=True).start()


def _report(job, run):
    """Run the job; write its verdict to the status FIFO, then close all."""
    try:
        verdict = run(job)
    except Exception as exc:        # noqa: BLE001 - the verdict says it
        verdict = f"{type(exc).__name__}: {exc}"
    if verdict != "ok":
        LOG.warning("zfs stream of %s: %s", job.zvol, verdict)
    try:
        os.write(job.fds["status"], verdict.encode()[:MAX_STATUS])
    except OSError:
        pass                        # the engine stopped listening: it failed
    _close(job.fds, *list(job.fds))


def _ended(argv, proc):
    """"" if ``proc`` exited 0, else what failed."""
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.wait() == 0:
        return ""
    tail = " ".join(err.split())[-120:]
    return f"{' '.join(argv[1:3])} exited {proc.returncode}: {tail}"


def _run_send(job):
    """Part 1 once the guest is paused; the verdict on both sends."""
    paused = os.read(job.fds["notify"], 1) == b"1"
    _close(job.fds, "notify")
    if not paused:
        job.first.kill()
        _close(job.fds, "final")
        job.first.wait()
        return "not sent: the migration ended before the guest was paused"
    processutils.execute(*snapshot_argv(job.zvol, job.tag, 2))
    argv = send_argv(job.zvol, job.tag, 1)
    final = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                             stdout=job.fds["final"], stderr=subprocess.PIPE)
    _close(job.fds, "final")
    failed = (_ended(send_argv(job.zvol, job.tag, 0), job.first) or
              _ended(argv, final))
    return failed or "ok"


def _run_receive(job):
    """zfs receive of part 0, then of part 1; the verdict on both."""
    for part, which in enumerate(("first", "final")):
        argv = receive_argv(job.zvol, part)
        proc = subprocess.Popen(argv, stdin=job.fds[which],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _close(job.fds, which)
        failed = _ended(argv, proc) or _oversized(job)
        if failed:
            return failed
    return "ok"


def _oversized(job):
    """"" unless the received zvol is larger than the job allows (each
    part of a stream may set its volsize): then what is wrong."""
    if job.max_bytes is None:
        return ""
    out, _err = processutils.execute(*volsize_argv(job.zvol))
    size = int(out.strip())
    if size <= job.max_bytes:
        return ""
    return (f"the received zvol {job.zvol} is {size} bytes, more than the "
            f"{job.max_bytes} its flavor allows")
