"""bhyve(8) command lines (FreeBSD 15.1, amd64) and their validation.

``build`` turns a MachineSpec into argv; ``validate`` is what the
privileged helper runs before it starts anything: argv[0] must be the
configured bhyve binary, the VM name an instance UUID, every option one
this driver emits and every path confined to the places it may use.

Slot layout (PCI bus 0, slots 0-31, one function each):

====  ===============================================
0     hostbridge
1     virtio-rnd (entropy for the guest)
2-19  virtio-blk disks, in order
20-28 virtio-net interfaces, in order
29    fbuf (VNC), when enabled
30    xhci tablet, with the framebuffer
31    lpc (COM1 console, UEFI boot ROM)
====  ===============================================
"""

import dataclasses
import os
import re
import stat
import uuid as uuidlib

from nova_bhyve import beneath

MAX_SLOT = 31
DISK_SLOTS = range(2, 20)
NIC_SLOTS = range(20, 29)
FBUF_SLOT, XHCI_SLOT, LPC_SLOT = 29, 30, 31

TAP_RE = re.compile(r"^tap[0-9a-f-]{1,11}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HOST_PORT_RE = re.compile(r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):(\d{1,5})$")
_SLOT_RE = re.compile(r"^(\d{1,2})(?::(\d))?$")
_EMULATIONS = {"hostbridge", "virtio-rnd", "virtio-blk", "virtio-net",
               "fbuf", "xhci", "lpc"}
_FLAGS = {"-H", "-P", "-u", "-w", "-S", "-D"}


class ArgvError(ValueError):
    """A bhyve command line was refused."""


@dataclasses.dataclass(frozen=True)
class BhyvePaths:
    """Where bhyve and its files may be."""

    bhyve: str
    firmware: str
    instances_path: str
    zvol_root: str          # /dev/zvol/<dataset>
    runtime_path: str = ""  # [bhyve] runtime_path: incoming checkpoints


def incoming_checkpoint(paths, name):
    """Return the checkpoint a migrated guest ``name`` is restored from,
    ``<runtime_path>/<name>/incoming`` ("" without a runtime path)."""
    if not paths.runtime_path:
        return ""
    return os.path.join(os.path.normpath(paths.runtime_path), name, "incoming")


def is_instance_uuid(name):
    """Return True if ``name`` is a canonical instance UUID."""
    try:
        return str(uuidlib.UUID(name)) == name
    except (ValueError, TypeError, AttributeError):
        return False


def confined(path, root):
    """Return True if ``path`` is absolute, normalised and inside ``root``.

    A string check only: ``check_guest_files`` checks the files themselves.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        return False
    if os.path.normpath(path) != path or "," in path:
        return False
    root = os.path.normpath(root)
    return path.startswith(root + "/")


def build(spec, paths, nvram, wire_memory=False, vnc_wait=False,
          restore_from=None):
    """Return the bhyve argv that runs ``spec`` (optionally ``-r`` restore)."""
    if len(spec.disks) > len(DISK_SLOTS):
        raise ArgvError(f"at most {len(DISK_SLOTS)} disks per guest")
    if len(spec.nics) > len(NIC_SLOTS):
        raise ArgvError(f"at most {len(NIC_SLOTS)} network interfaces")
    argv = [paths.bhyve, "-c", str(spec.vcpus), "-m", f"{spec.memory_mb}M",
            "-H", "-P", "-u", "-w"]
    if wire_memory:
        argv.append("-S")
    argv += ["-s", "0,hostbridge", "-s", "1,virtio-rnd"]
    for slot, disk in zip(DISK_SLOTS, spec.disks, strict=False):
        argv += ["-s", f"{slot},virtio-blk,{disk.path}"]
    for slot, nic in zip(NIC_SLOTS, spec.nics, strict=False):
        argv += ["-s", f"{slot},virtio-net,{nic.tap},mac={nic.mac}"]
    if spec.vnc_listen:
        host = (f"[{spec.vnc_listen}]" if ":" in spec.vnc_listen
                else spec.vnc_listen)
        fbuf = f"{FBUF_SLOT},fbuf,tcp={host}:{spec.vnc_port},w=1024,h=768"
        argv += ["-s", fbuf + (",wait" if vnc_wait else ""),
                 "-s", f"{XHCI_SLOT},xhci,tablet"]
    argv += ["-s", f"{LPC_SLOT},lpc", "-l", "com1,stdio",
             "-l", f"bootrom,{paths.firmware},{nvram}",
             "-U", spec.uuid]
    if restore_from:
        argv += ["-r", restore_from]
    return argv + [spec.uuid]


def _check_device(value, paths, vm_dir, slots):
    parts = value.split(",")
    if len(parts) < 2:
        raise ArgvError(f"-s {value}: expected slot,emulation[,conf]")
    match = _SLOT_RE.match(parts[0])
    if not match:
        raise ArgvError(f"-s {value}: bad slot {parts[0]!r}")
    slot, func = int(match.group(1)), int(match.group(2) or 0)
    if slot > MAX_SLOT or func > 7:
        raise ArgvError(f"-s {value}: slot must be 0-31, function 0-7")
    if (slot, func) in slots:
        raise ArgvError(f"-s {value}: PCI slot {slot}:{func} used twice")
    slots.add((slot, func))
    emulation, conf = parts[1], parts[2:]
    if emulation not in _EMULATIONS:
        raise ArgvError(f"-s {value}: emulation {emulation!r} not allowed")
    if emulation == "virtio-blk":
        if len(conf) != 1 or not (confined(conf[0], paths.zvol_root) or
                                  confined(conf[0], vm_dir)):
            raise ArgvError(f"-s {value}: disk must be a zvol under "
                            f"{paths.zvol_root} or a file in {vm_dir}")
    elif emulation == "virtio-net":
        if (len(conf) != 2 or not TAP_RE.match(conf[0]) or
                not conf[1].startswith("mac=") or
                not MAC_RE.match(conf[1][4:])):
            raise ArgvError(f"-s {value}: expected tapNAME,mac=xx:..:xx")
    elif emulation == "fbuf":
        if not conf or not conf[0].startswith("tcp="):
            raise ArgvError(f"-s {value}: fbuf needs tcp=host:port")
        m = _HOST_PORT_RE.match(conf[0][4:])
        if not m or not 1024 <= int(m.group(3)) <= 65535:
            raise ArgvError(f"-s {value}: bad VNC address")
        for opt in conf[1:]:
            if not (re.match(r"^[wh]=\d{3,4}$", opt) or opt == "wait"):
                raise ArgvError(f"-s {value}: fbuf option {opt!r} not allowed")
    elif emulation == "xhci":
        if conf != ["tablet"]:
            raise ArgvError(f"-s {value}: only xhci,tablet is allowed")
    elif conf:
        raise ArgvError(f"-s {value}: {emulation} takes no options")


def _check_lpc(value, paths, vm_dir):
    if value == "com1,stdio":
        return
    parts = value.split(",")
    if (len(parts) == 3 and parts[0] == "bootrom" and
            parts[1] == paths.firmware and confined(parts[2], vm_dir)):
        return
    raise ArgvError(f"-l {value}: only com1,stdio and bootrom,"
                    f"{paths.firmware},<file in {vm_dir}> are allowed")


def validate(argv, paths):
    """Raise ArgvError unless ``argv`` is a bhyve command line we emit."""
    if not argv or argv[0] != paths.bhyve:
        raise ArgvError(f"argv[0] must be {paths.bhyve}")
    name = argv[-1]
    if not is_instance_uuid(name):
        raise ArgvError(f"VM name {name!r} is not an instance UUID")
    vm_dir = os.path.join(os.path.normpath(paths.instances_path), name)
    slots = set()
    args = argv[1:-1]
    i = 0
    while i < len(args):
        opt = args[i]
        if opt in _FLAGS:
            i += 1
            continue
        if i + 1 >= len(args):
            raise ArgvError(f"option {opt} needs a value")
        value = args[i + 1]
        if opt == "-c":
            if not value.isdigit() or not 1 <= int(value) <= 256:
                raise ArgvError(f"-c {value}: 1-256 vCPUs")
        elif opt == "-m":
            if not re.match(r"^\d{1,8}M$", value):
                raise ArgvError(f"-m {value}: expected <MiB>M")
        elif opt == "-s":
            _check_device(value, paths, vm_dir, slots)
        elif opt == "-l":
            _check_lpc(value, paths, vm_dir)
        elif opt == "-U":
            if value != name:
                raise ArgvError("-U must be the VM name")
        elif opt == "-r":
            if not (confined(value, vm_dir) or
                    value == incoming_checkpoint(paths, name) != ""):
                raise ArgvError(f"-r {value}: checkpoint must be in {vm_dir} "
                                "or be the guest's incoming checkpoint")
        else:
            raise ArgvError(f"option {opt} is not allowed")
        i += 2
    if (0, 0) not in slots or (LPC_SLOT, 0) not in slots:
        raise ArgvError("hostbridge (slot 0) and lpc (slot 31) are required")
    return name


def guest_files(argv):
    """Return (path, kind) for each file bhyve opens: disk, nvram, restore."""
    out = []
    for opt, value in zip(argv, argv[1:], strict=False):
        parts = value.split(",")
        if opt == "-s" and parts[1:2] == ["virtio-blk"]:
            out.append((parts[2], "disk"))
        elif opt == "-l" and parts[0] == "bootrom":
            out.append((parts[2], "nvram"))
        elif opt == "-r":
            out += [(value + ext, "restore") for ext in ("", ".kern", ".meta")]
    return out


def check_guest_files(argv, paths):
    """Raise ArgvError unless the files of a validated argv are safe to open.

    bhyve opens these paths itself, as root and following links, so just
    before it starts each must be, with no symbolic link in any component
    below its directory: a zvol device under ``zvol_root``, or a regular
    file with a single link under ``instances_path`` (a migrated guest's
    incoming checkpoint: under ``runtime_path``).  Nothing stops the owner
    of those directories from changing them after this check.
    """
    for path, kind in guest_files(argv):
        zvol = kind == "disk" and confined(path, paths.zvol_root)
        root = paths.zvol_root if zvol else paths.instances_path
        if kind == "restore" and paths.runtime_path and \
                confined(path, os.path.normpath(paths.runtime_path)):
            root = os.path.normpath(paths.runtime_path)
        try:
            st = beneath.lstat_beneath(root, beneath.relative_below(path, root))
        except FileNotFoundError as exc:
            raise ArgvError(f"{kind} {path} does not exist") from exc
        except OSError as exc:
            raise ArgvError(f"{kind} {path}: {exc}") from exc
        if stat.S_ISLNK(st.st_mode):
            raise ArgvError(f"{kind} {path} is a symbolic link")
        if zvol:
            if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ArgvError(f"disk {path} is not a zvol device")
        elif not stat.S_ISREG(st.st_mode):
            raise ArgvError(f"{kind} {path} is not a regular file")
        elif st.st_nlink > 1:
            raise ArgvError(f"{kind} {path} has {st.st_nlink} hard links")
