"""The privileged operations of the bhyve backend (oslo.privsep).

There is no "run this argv as root" entrypoint.  Each entrypoint takes
names and values, checks them, and builds its own command line:

- guest names are instance UUIDs;
- paths lie under ``[DEFAULT] instances_path`` (or the zvols of
  ``[bhyve] zfs_dataset``);
- the guest command line is checked by ``nova_bhyve.machine.argv.validate``
  (argv[0] pinned to ``[bhyve] bhyve_path``);
- interface names match the tap and bridge patterns, network namespace
  names their own (and come from ``[bhyve] testhost_netns``, not from the
  caller).

Bridges are created when a tap needs them and marked as made by nova-bhyve
(description on FreeBSD, alias on Linux); only such a bridge is removed,
and only once its last member is gone.

Files are opened relative to a descriptor of ``instances_path``, of
``[bhyve] runtime_path`` (the supervisor's files) or of
``/dev/zvol/<dataset>`` through ``nova_bhyve.beneath``: no symbolic link
is followed in any component below it, files that must be regular are
checked to be (with a single link) and new files are made with O_EXCL.
nova-compute owns the instance and runtime directories; that is what this
guards.

The ``check_*`` functions hold the checks and are what the unit tests call.
"""

import contextlib
import dataclasses
import json
import os
import re
import signal
import stat
import sys
import threading

import nova.conf
import psutil
from oslo_concurrency import processutils
from oslo_privsep import capabilities as caps
from oslo_privsep import daemon as privsep_daemon
from oslo_privsep import priv_context

import nova_bhyve.conf  # noqa: F401
from nova_bhyve import beneath
from nova_bhyve.machine import argv as bhyve_argv
from nova_bhyve.machine import supervise

CONF = nova.conf.CONF

bhyve_pctxt = priv_context.PrivContext(
    "nova_bhyve",
    cfg_section="nova_bhyve_privileged",
    pypath=__name__ + ".bhyve_pctxt",
    capabilities=[caps.CAP_SYS_ADMIN, caps.CAP_NET_ADMIN, caps.CAP_KILL,
                  caps.CAP_DAC_OVERRIDE, caps.CAP_CHOWN, caps.CAP_FOWNER],
)

BRIDGE_RE = re.compile(r"^[a-z][a-z0-9_.]{0,14}$")
NETNS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
NETNS_DIR = "/run/netns"
OWNER_MARK = "nova-bhyve"    # description/alias of the bridges we create
_NET_LOCK = threading.Lock()    # one plug or unplug at a time per helper
DATASET_PART_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
ZVOL_DIR = "/dev/zvol"
MAX_JSON_BYTES = 64 << 10
_SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL,
            "STOP": signal.SIGSTOP, "CONT": signal.SIGCONT}


class PrivilegeError(ValueError):
    """A privileged request was refused; nothing was run."""


#: what a call raises when the helper itself cannot start
HelperStartError = privsep_daemon.FailedToDropPrivileges


def _paths():
    return bhyve_argv.BhyvePaths(
        bhyve=CONF.bhyve.bhyve_path, firmware=CONF.bhyve.uefi_firmware,
        instances_path=os.path.normpath(CONF.instances_path),
        zvol_root=f"{ZVOL_DIR}/{CONF.bhyve.zfs_dataset or '-'}",
        runtime_path=_runtime_root())


def check_uuid(name):
    """Return ``name`` if it is an instance UUID, else raise."""
    if not bhyve_argv.is_instance_uuid(name):
        raise PrivilegeError(f"{name!r} is not an instance UUID")
    return name


def check_instance_path(path, uuid=None):
    """Return ``path`` if it is inside the instances directory (of ``uuid``)."""
    root = os.path.normpath(CONF.instances_path)
    if uuid is not None:
        root = os.path.join(root, check_uuid(uuid))
    if not bhyve_argv.confined(path, root):
        raise PrivilegeError(f"{path!r} is outside {root}")
    return path


def _instances_root():
    return os.path.normpath(CONF.instances_path)


@contextlib.contextmanager
def _refusing():
    """Turn an unsafe or unexpected file into a PrivilegeError."""
    try:
        yield
    except beneath.UnsafePathError as exc:
        raise PrivilegeError(str(exc)) from exc


def check_instance_file(path, uuid, missing_ok=False):
    """Raise unless ``path`` is a regular, singly linked file of ``uuid``.

    No component below ``instances_path`` may be a symbolic link.
    """
    root = _instances_root()
    rel = beneath.relative_below(check_instance_path(path, uuid), root)
    with _refusing():
        try:
            st = beneath.lstat_beneath(root, rel)
        except FileNotFoundError:
            if missing_ok:
                return
            raise
        if stat.S_ISLNK(st.st_mode):
            raise PrivilegeError(f"{path!r} is a symbolic link")
        if not stat.S_ISREG(st.st_mode):
            raise PrivilegeError(f"{path!r} is not a regular file")
        if st.st_nlink > 1:
            raise PrivilegeError(f"{path!r} has {st.st_nlink} hard links")


def _runtime_root():
    return os.path.normpath(CONF.bhyve.runtime_path)


def _read_runtime_json(uuid, name):
    """Return the JSON in a guest's runtime directory file (None if missing)."""
    try:
        with _refusing():
            fd = beneath.open_regular(_runtime_root(),
                                      f"{check_uuid(uuid)}/{name}",
                                      os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise PrivilegeError(f"{name} of {uuid} is too large")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise PrivilegeError(f"{name} of {uuid} is not JSON") from exc


def check_dataset(name, allow_snapshot=False):
    """Return ``name`` if it is a ZFS name below ``[bhyve] zfs_dataset``."""
    base = CONF.bhyve.zfs_dataset
    if not base:
        raise PrivilegeError("[bhyve] zfs_dataset is not set")
    if not isinstance(name, str) or not name.startswith(base + "/"):
        raise PrivilegeError(f"{name!r} is not below {base}")
    rest = name[len(base) + 1:]
    if allow_snapshot and rest.count("@") == 1:
        rest = rest.replace("@", "/")
    for part in rest.split("/"):
        if part in ("", ".", "..") or not DATASET_PART_RE.match(part):
            raise PrivilegeError(f"{name!r} is not a valid dataset name")
    return name


def check_tap(name):
    """Return ``name`` if it is a tap device name this driver creates."""
    if not isinstance(name, str) or not bhyve_argv.TAP_RE.match(name):
        raise PrivilegeError(f"{name!r} is not a tap name (tapXXXXXXXXXXX)")
    return name


def check_bridge(name):
    """Return ``name`` if it looks like an interface name."""
    if not isinstance(name, str) or not BRIDGE_RE.match(name):
        raise PrivilegeError(f"{name!r} is not a bridge interface name")
    return name


def supervised_argv(uuid, argv):
    """Return the daemon(8) command that supervises a checked bhyve argv."""
    check_uuid(uuid)
    try:
        name = bhyve_argv.validate(argv, _paths())
    except bhyve_argv.ArgvError as exc:
        raise PrivilegeError(str(exc)) from exc
    if name != uuid:
        raise PrivilegeError("the guest name must be the instance UUID")
    rundir = os.path.join(_runtime_root(), uuid)
    reboot_argv = list(argv)
    if "-r" in argv:        # a reboot after a restore boots normally
        i = argv.index("-r")
        reboot_argv = argv[:i] + argv[i + 2:]
    destroy = [CONF.bhyve.bhyvectl_path, "--destroy", f"--vm={uuid}"]
    # daemon(8) opens no file: its -o and -P would follow links as root;
    # the supervisor opens its logs below the runtime directory itself
    return [CONF.bhyve.daemon_path, "-f", "--",
            sys.executable, "-m", supervise.MODULE,
            "--foreground", "--output-to-log", "--rundir", rundir,
            "--check-bhyve-files", json.dumps(dataclasses.asdict(_paths())),
            "--stdout", os.path.join(rundir, "console.log"),
            "--reboot-argv", json.dumps(reboot_argv),
            "--before-restart", json.dumps(destroy), "--", *argv]


@bhyve_pctxt.entrypoint
def start_guest(uuid, argv):
    """Start a checked bhyve argv for instance ``uuid`` under daemon(8)."""
    cmd = supervised_argv(uuid, argv)
    try:
        bhyve_argv.check_guest_files(argv, _paths())
    except bhyve_argv.ArgvError as exc:
        raise PrivilegeError(str(exc)) from exc
    processutils.execute(*cmd)


@bhyve_pctxt.entrypoint
def signal_guest(uuid, signame):
    """Signal the guest's bhyve: TERM (ACPI power button), KILL, STOP, CONT."""
    check_uuid(uuid)
    if signame not in _SIGNALS:
        raise PrivilegeError(f"signal {signame!r} is not allowed")
    rec = _read_runtime_json(uuid, "child.pid") or {}
    pid = rec.get("pid") if isinstance(rec, dict) else None
    if not isinstance(pid, int) or pid <= 1:
        return False
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        if cmdline[:1] != [CONF.bhyve.bhyve_path] or cmdline[-1:] != [uuid]:
            raise PrivilegeError(f"pid {pid} is not the bhyve of {uuid}")
        proc.send_signal(_SIGNALS[signame])
    except psutil.NoSuchProcess:
        return False
    return True


@bhyve_pctxt.entrypoint
def destroy_vmm(uuid):
    """Destroy the /dev/vmm object of guest ``uuid`` (bhyvectl --destroy)."""
    processutils.execute(CONF.bhyve.bhyvectl_path, "--destroy",
                         f"--vm={check_uuid(uuid)}", check_exit_code=[0, 1])


@bhyve_pctxt.entrypoint
def checkpoint_guest(uuid, base):
    """Write a checkpoint set and stop guest ``uuid`` (bhyvectl --suspend).

    bhyve writes the files itself, following links: each must be absent or
    a regular, singly linked file, with no link on the way to it.
    """
    for ext in ("", ".kern", ".meta"):
        check_instance_file(base + ext, uuid, missing_ok=True)
    processutils.execute(CONF.bhyve.bhyvectl_path, f"--suspend={base}",
                         f"--vm={check_uuid(uuid)}")


def check_mac(mac):
    """Return ``mac`` if it is a lower-case colon-separated MAC address."""
    if not isinstance(mac, str) or not bhyve_argv.MAC_RE.match(mac):
        raise PrivilegeError(f"{mac!r} is not a MAC address")
    return mac


def check_netns(name):
    """Return ``name`` if it is a network namespace name ('' = current)."""
    if name == "":
        return name
    if not isinstance(name, str) or not NETNS_RE.match(name):
        raise PrivilegeError(f"{name!r} is not a network namespace name")
    return name


def _ifconfig(*args, exit_codes=(0,)):
    out, _err = processutils.execute(CONF.bhyve.ifconfig_path, *args,
                                     check_exit_code=list(exit_codes))
    return out


def _ifconfig_create(kind, name, description):
    """``ifconfig <kind> create``, renamed to ``name``, described, up."""
    created = _ifconfig(kind, "create").strip()
    if not re.match(rf"^{kind}\d+$", created):
        raise PrivilegeError(f"ifconfig created {created!r}, not a {kind}")
    _ifconfig(created, "name", name)
    _ifconfig(name, "description", description, "up")


@bhyve_pctxt.entrypoint
def create_tap(tap, bridge, mac):
    """Create tap device ``tap`` and add it to ``bridge`` (made if missing)."""
    check_tap(tap)
    if bridge:
        check_bridge(bridge)
    check_mac(mac)
    with _NET_LOCK:
        if bridge and not _ifconfig(bridge, exit_codes=(0, 1)).strip():
            _ifconfig_create("bridge", bridge, OWNER_MARK)
        _ifconfig_create("tap", tap, f"{OWNER_MARK} {mac}")
        if bridge:
            _ifconfig(bridge, "addm", tap)


@bhyve_pctxt.entrypoint
def destroy_tap(tap, bridge=""):
    """Destroy tap ``tap`` and then ``bridge`` if it is ours and empty."""
    check_tap(tap)
    if bridge:
        check_bridge(bridge)
    with _NET_LOCK:
        _ifconfig(tap, "destroy", exit_codes=(0, 1))
        if not bridge:
            return
        out = _ifconfig(bridge, exit_codes=(0, 1))
        if f"description: {OWNER_MARK}\n" in out + "\n" and \
                "member:" not in out:
            _ifconfig(bridge, "destroy", exit_codes=(0, 1))


def host_tap_mac(mac):
    """Return the MAC of the host side of a tap: the guest's with fe first.

    As libvirt does: a bridge port with the guest's own address would make
    the bridge deliver the guest's frames to the host.
    """
    return "fe" + check_mac(mac)[2:]


def _ip(netns, *args, exit_codes=(0,)):
    cmd = [CONF.bhyve.ip_path]
    if netns:
        cmd += ["-n", netns]
    out, _err = processutils.execute(*cmd, *args,
                                     check_exit_code=list(exit_codes))
    return out


def _ip_link(netns, name):
    """Return ``ip -o link show dev name`` ('' if there is no such link)."""
    return _ip(netns, "-o", "link", "show", "dev", name,
               exit_codes=(0, 1)).strip()


def _ensure_netns(netns):
    if not netns or os.path.exists(os.path.join(NETNS_DIR, netns)):
        return
    _ip("", "netns", "add", netns, exit_codes=(0, 1))   # 1: made meanwhile
    if not os.path.exists(os.path.join(NETNS_DIR, netns)):
        raise PrivilegeError(f"ip netns add {netns} made no {NETNS_DIR}/"
                             f"{netns}")
    _ip(netns, "link", "set", "dev", "lo", "up")


@bhyve_pctxt.entrypoint
def plug_tap_linux(tap, bridge, mac):
    """Create tap ``tap`` in ``[bhyve] testhost_netns``, on ``bridge``."""
    netns = check_netns(CONF.bhyve.testhost_netns)
    check_tap(tap)
    if bridge:
        check_bridge(bridge)
    host_mac = host_tap_mac(mac)
    with _NET_LOCK:
        _ensure_netns(netns)
        if bridge and not _ip_link(netns, bridge):
            _ip(netns, "link", "add", "name", bridge, "type", "bridge")
            _ip(netns, "link", "set", "dev", bridge, "alias", OWNER_MARK)
            _ip(netns, "link", "set", "dev", bridge, "up")
        if not _ip_link(netns, tap):
            _ip(netns, "tuntap", "add", "dev", tap, "mode", "tap")
        _ip(netns, "link", "set", "dev", tap, "address", host_mac)
        if bridge:
            _ip(netns, "link", "set", "dev", tap, "master", bridge)
        _ip(netns, "link", "set", "dev", tap, "up")


@bhyve_pctxt.entrypoint
def unplug_tap_linux(tap, bridge=""):
    """Delete tap ``tap`` and then ``bridge`` if it is ours and empty."""
    netns = check_netns(CONF.bhyve.testhost_netns)
    check_tap(tap)
    if bridge:
        check_bridge(bridge)
    with _NET_LOCK:
        if netns and not os.path.exists(os.path.join(NETNS_DIR, netns)):
            return
        _ip(netns, "link", "del", "dev", tap, exit_codes=(0, 1))
        if not bridge:
            return
        link = _ip_link(netns, bridge)
        if link.endswith(f"alias {OWNER_MARK}") and not _ip(
                netns, "-o", "link", "show", "master", bridge).strip():
            _ip(netns, "link", "del", "dev", bridge, exit_codes=(0, 1))


@bhyve_pctxt.entrypoint
def zfs(action, name, size_gb=None, origin=None, size_mb=None):
    """Run one of the zfs(8) operations the image cache and disks need."""
    zfs_path = CONF.bhyve.zfs_path
    if action == "create-volume":
        if size_mb is not None:     # swap disks come in MiB
            if not isinstance(size_mb, int) or not 0 < size_mb <= 65536 << 10:
                raise PrivilegeError(f"volume size {size_mb!r} MiB out of "
                                     "range")
            size = f"{size_mb}M"
        elif not isinstance(size_gb, int) or not 0 < size_gb <= 65536:
            raise PrivilegeError(f"volume size {size_gb!r} GiB out of range")
        else:
            size = f"{size_gb}G"
        processutils.execute(zfs_path, "create", "-p", "-s", "-V",
                             size, "-o", "volmode=dev",
                             "-o", "snapdev=visible", check_dataset(name))
    elif action == "clone":
        processutils.execute(zfs_path, "clone", "-o", "volmode=dev",
                             check_dataset(origin, allow_snapshot=True),
                             check_dataset(name))
    elif action == "resize":
        if not isinstance(size_gb, int) or not 0 < size_gb <= 65536:
            raise PrivilegeError(f"volume size {size_gb!r} GiB out of range")
        processutils.execute(zfs_path, "set", f"volsize={size_gb}G",
                             check_dataset(name))
    elif action == "snapshot":
        processutils.execute(zfs_path, "snapshot",
                             check_dataset(name, allow_snapshot=True))
    elif action == "destroy":
        processutils.execute(zfs_path, "destroy", "-r",
                             check_dataset(name, allow_snapshot=True),
                             check_exit_code=[0, 1])
    else:
        raise PrivilegeError(f"zfs action {action!r} is not allowed")


def _open_zvol(path, writing):
    zvol_root = _paths().zvol_root
    check_dataset(path[len(ZVOL_DIR) + 1:], allow_snapshot=True)
    if not path.startswith(zvol_root + "/"):
        raise PrivilegeError(f"{path!r} is outside {zvol_root}")
    with _refusing():
        fd = beneath.open_beneath(zvol_root,
                                  beneath.relative_below(path, zvol_root),
                                  os.O_WRONLY if writing else os.O_RDONLY)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise PrivilegeError(f"{path!r} is not a zvol device")
    return fd


def _open_copy_end(path, writing):
    """Open one end of copy_image: a zvol, or a file below instances_path.

    A file read must be regular with a single link; a file written is made
    anew (O_EXCL) after whatever had its name is unlinked, not followed.
    """
    if not isinstance(path, str):
        raise PrivilegeError(f"{path!r} is not a path")
    if path.startswith(ZVOL_DIR + "/"):
        return _open_zvol(path, writing)
    root = _instances_root()
    rel = beneath.relative_below(check_instance_path(path), root)
    with _refusing():
        if writing:
            return beneath.create_beneath(root, rel, mode=0o644, replace=True)
        return beneath.open_regular(root, rel, os.O_RDONLY)


@bhyve_pctxt.entrypoint
def copy_image(src, dst):
    """Copy between an instances-directory file and a zvol of the dataset."""
    for path in (src, dst):     # check both names before opening either
        if isinstance(path, str) and path.startswith(ZVOL_DIR + "/"):
            check_dataset(path[len(ZVOL_DIR) + 1:], allow_snapshot=True)
        else:
            check_instance_path(path)
    with os.fdopen(_open_copy_end(src, False), "rb") as fin, \
            os.fdopen(_open_copy_end(dst, True), "wb") as fout:
        while True:
            chunk = fin.read(4 << 20)
            if not chunk:
                break
            fout.write(chunk)
