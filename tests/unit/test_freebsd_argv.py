"""Every zfs(8), bhyve(8) and bhyvectl(8) command line the driver builds,
checked against the SYNOPSIS of FreeBSD 15's manual pages.

Where the driver builds them:

- ``nova_bhyve/machine/argv.py`` ``build``: the bhyve command line (boot
  and ``-r`` restore); ``nova_bhyve/privsep.py`` ``supervised_argv`` runs
  it, its reboot variant (``-r`` dropped) and a ``bhyvectl --destroy``;
- ``nova_bhyve/privsep.py``: ``zfs`` (zfs create/clone/set/snapshot/
  destroy), ``destroy_vmm`` and ``checkpoint_guest`` (bhyvectl);
- ``nova_bhyve/privsep_zfs.py``: a migrating zvol's ``zfs snapshot``,
  ``zfs send`` (full, then incremental) and ``zfs receive`` (both parts);
  ``nova_bhyve/machine/zvolmove.py`` removes the snapshots (and, on a
  failed destination, the received zvol) through ``privsep.zfs``;
- ``nova_bhyve/machine/bhyve.py``: ``host_facts``, ``_volsize`` (zfs get)
  and ``_instance_zvols`` (zfs list).

``machine/checkpoint.py``, ``machine/power.py`` and ``machine/hostinfo.py``
build no command line (they read and write files, map exit statuses, read
/proc); the engine under ``native/`` runs no program.

The checker models getopt(3) as FreeBSD's libc has it: options come first
(flags may be clustered, a value is attached or the next word) and option
parsing stops at the first operand or at ``--``; bhyvectl(8) takes only
``--name`` and ``--name=value`` words (getopt_long(3)).  Each grammar below
is written by hand from the synopsis quoted above it, with the value forms
the same manual page (or zfsprops(7)) gives; ``test_grammars_have_the_
options_of_their_synopsis`` checks that each form names exactly the
options of its quoted synopsis line.
"""

import dataclasses
import json
import re
import sys
import types
from unittest import mock

import pytest

from nova_bhyve import privsep, privsep_zfs
from nova_bhyve.conf import CONF
from nova_bhyve.machine import argv as bhyve_argv
from nova_bhyve.machine import bhyve, supervised, zvolmove
from nova_bhyve.machine.base import DiskSpec, MachineSpec, NicSpec

UUID = "0c9d3f2e-6a1b-4c8d-9e7f-112233445566"
INSTANCES = "/var/lib/nova/instances"
DATASET = "zroot/nova"

# -- the manual pages ------------------------------------------------------

# bhyve(8) as man.freebsd.org renders it for FreeBSD 15.1-RELEASE; the same
# SYNOPSIS is in freebsd-src usr.sbin/bhyve/bhyve.8 (.Dd October 28, 2025,
# commit 02eabc44edf3).  BHYVE_DETAILS shortens that file's OPTIONS, PCI
# EMULATION and backend sections to the lines the value checks rest on.
BHYVE_SYNOPSIS = """
     bhyve [-aCDeHhPSuWwxY]
           [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]] [-f
           name,[string|file]=data] [-G [w][bind_address:]port] [-k config_file]
           [-K layout] [-l lpcdev[,conf]] [-m memsize[K|k|M|m|G|g|T|t]]
           [-o var=value] [-p vcpu:hostcpu] [-r file] [-s slot,emulation[,conf]]
           [-U uuid] vmname
     bhyve -l help
     bhyve -s help
"""
BHYVE_DETAILS = """
  -s slot,emulation[,conf]
     The slot can be specified in one of the following formats:
       pcislot
       pcislot:function
       bus:pcislot:function
     The pcislot value is 0 to 31.  The optional function value is 0 to 7.
     The optional bus value is 0 to 255.
  -l lpcdev[,conf]
     The only supported devices are the TTY-class devices com1, com2, com3,
     and com4, the TPM module tpm, the boot ROM device bootrom, the fwcfg
     type and the debug/test device pc-testdev.
  PCI EMULATION: hostbridge, amd_hostbridge, passthru, virtio-net,
     virtio-blk, virtio-scsi, virtio-9p, virtio-rnd, virtio-console,
     virtio-input, ahci, ahci-cd, ahci-hd, e1000, uart, lpc, fbuf, xhci,
     nvme, hda
  Network device backends:
       tapN[,mac=xx:xx:xx:xx:xx:xx][,mtu=N]
       vmnetN[,mac=xx:xx:xx:xx:xx:xx][,mtu=N]
  Block storage device backends:
       /filename[,block-device-options]
       /dev/xxx[,block-device-options]
     The block-device-options are: nocache, direct, ro,
     sectorsize=logical[/physical], nodelete, bootindex=index
  TTY device backends: stdio, /dev/xxx, tcp=ip:port
  Boot ROM device backends:
       romfile[,varfile]
  Framebuffer device backends:
       [rfb=ip-and-port][,w=width][,h=height][,vga=vgaconf][,wait]
       [,password=password]
     rfb=ip-and-port (or tcp=ip-and-port): [IPv4:]port or [IPv6%zone]:port
     Minimal supported resolution is 640x480 pixels, and maximum is
     3840x2160 pixels.
  xHCI USB device backends:
       tablet
  vmname
     Alphanumeric name of the guest.
"""

# bhyvectl(8) as man.freebsd.org renders it for FreeBSD 15.1-RELEASE.
BHYVECTL_SYNOPSIS = """
     bhyvectl --vm=<vmname> [--create] [--destroy] [--get-stats] [--inject-nmi]
              [--force-reset] [--force-poweroff] [--checkpoint=<file>]
              [--suspend=<file>]
"""

# zfs(8) subcommand pages of OpenZFS 2.4.0-rc4, the OpenZFS of FreeBSD
# 15.0-RELEASE (its release announcement), man/man8/zfs-*.8 at tag
# zfs-2.4.0-rc4 of openzfs/zfs rendered with groff -mandoc; at zfs-2.4.4
# these synopses are the same but for a new -u of zfs clone (zfs-send.8
# and zfs-receive.8 are unchanged between the two tags).  The driver runs
# no zfs rename, so its page is not quoted.
ZFS_CREATE_SYNOPSIS = """
     zfs create [-Pnpuv] [-o property=value]… filesystem
     zfs create [-ps] [-b blocksize] [-o property=value]… -V size volume
"""
ZFS_CLONE_SYNOPSIS = """
     zfs clone [-p] [-o property=value]… snapshot filesystem|volume
"""
ZFS_SNAPSHOT_SYNOPSIS = """
     zfs snapshot [-r] [-o property=value]… dataset@snapname…
"""
ZFS_DESTROY_SYNOPSIS = """
     zfs destroy [-Rfnprv] filesystem|volume
     zfs destroy [-Rdnprv] filesystem|volume@snap[%snap[,snap[%snap]]]…
     zfs destroy filesystem|volume#bookmark
"""
ZFS_SEND_SYNOPSIS = """
     zfs send [-DLPVbcehnpsvw] [-R [-X dataset[,dataset]…]]
         [[-I|-i] snapshot] snapshot
     zfs send [-DLPVcensvw] [-i snapshot|bookmark] filesystem|volume|snapshot
     zfs send --redact redaction_bookmark [-DLPVcenpv] [-i snapshot|bookmark]
         snapshot
     zfs send [-PVenv] -t receive_resume_token
     zfs send [-PVnv] -S filesystem
     zfs redact snapshot redaction_bookmark redaction_snapshot…
"""
ZFS_SEND_DETAILS = """
     -i snapshot
         Generate an incremental stream from the first snapshot (the
         incremental source) to the second snapshot (the incremental
         target).  The incremental source can be specified as the last
         component of the snapshot name (the @ character and following)
         and it is assumed to be from the same file system as the
         incremental target.
"""
# zfs-receive.8 (zfs-recv.8 is a link to it)
ZFS_RECEIVE_SYNOPSIS = """
     zfs receive [-FhMnsuv] [-o origin=snapshot] [-o property=value]
         [-x property] filesystem|volume|snapshot
     zfs receive [-FhMnsuv] [-d|-e] [-o origin=snapshot] [-o property=value]
         [-x property] filesystem
     zfs receive -A filesystem|volume
     zfs receive -c [-vn] filesystem|snapshot
"""
# zfs-set.8 (zfs-get.8 is a link to it)
ZFS_SET_GET_SYNOPSIS = """
     zfs set [-u] property=value [property=value]…
         filesystem|volume|snapshot…
     zfs get [-r|-d depth] [-Hp] [-j [--json-int]] [-o field[,field]…] [-s
         source[,source]…] [-t type[,type]…] all|property[,property]…
         [filesystem|volume|snapshot|bookmark]…
"""
ZFS_GET_DETAILS = """
     -o field   A comma-separated list of columns to display, defaults to
                name,property,value,source.
     -t type    A comma-separated list of types to display, where type is
                one of filesystem, snapshot, volume, bookmark, or all.  fs,
                snap, or vol can be used as aliases for filesystem,
                snapshot, or volume.
"""
ZFS_LIST_SYNOPSIS = """
     zfs list [-r|-d depth] [-Hp] [-j [--json-int]] [-o property[,property]…]
         [-s property]… [-S property]… [-t type[,type]…]
         [filesystem|volume|snapshot]…
"""
# zfsprops(7) of the same tag (excerpts): the properties the driver sets or
# reads.
ZFSPROPS = """
     available             The amount of space available to the dataset ...
     used                  The amount of space consumed by this dataset ...
     snapdev=hidden|visible
     volsize=size
     volmode=default|full|geom|dev|none
     The values of numeric properties can be specified using human-readable
     suffixes (for example, k, KB, M, Gb, and so forth, up to Z for
     zettabyte).
"""

# -- the grammars ----------------------------------------------------------

INF = 1 << 20
_COMPONENT = r"[A-Za-z0-9_.:-]+"        # zfsconcepts(7): alnum and _-:.
ZNAME = rf"[A-Za-z][A-Za-z0-9_.:-]*(?:/{_COMPONENT})*"
ZSNAP = rf"{ZNAME}@{_COMPONENT}"
ZSIZE = r"\d+(?:\.\d+)?(?:[KkMmGgTtPpEeZz][Bb]?|[Bb])?"
ZPROPS = {"volmode": "default|full|geom|dev|none", "snapdev": "hidden|visible",
          "volsize": ZSIZE, "available": None, "used": None}
ZPROP_NAME = "|".join(ZPROPS)
ZASSIGN = "|".join(f"{name}=(?:{values})" for name, values in ZPROPS.items()
                   if values)
ZTYPE = "filesystem|snapshot|volume|bookmark|all|fs|snap|vol"


def _list_of(item):
    return rf"(?:{item})(?:,(?:{item}))*"


@dataclasses.dataclass(frozen=True)
class Form:
    """One SYNOPSIS line as getopt(3) reads it."""

    words: tuple = ()           # subcommand words before the options
    flags: str = ""             # options without a value
    options: dict = dataclasses.field(default_factory=dict)  # letter: value
    required: str = ""          # options that must be given
    exclusive: tuple = ()       # strings of options at most one may be given
    operands: tuple = ()        # (pattern, min, max) runs, in order

    def problems(self, args):
        """Return why ``args`` (argv without argv[0]) is not this form."""
        n = len(self.words)
        if tuple(args[:n]) != self.words:
            return [f"does not start with {' '.join(self.words)}"]
        args, seen, i = list(args[n:]), [], 0
        while i < len(args) and args[i].startswith("-") and args[i] != "-":
            if args[i] == "--":
                i += 1
                break
            for j, letter in enumerate(args[i][1:], start=2):
                if letter in self.flags:
                    seen.append(letter)
                    continue
                if letter not in self.options:
                    return [f"unknown option -{letter}"]
                value = args[i][j:]
                if not value:
                    i += 1
                    if i == len(args):
                        return [f"-{letter} needs a value"]
                    value = args[i]
                error = _value_error(self.options[letter], value)
                if error:
                    return [f"-{letter} {value!r}: {error}"]
                seen.append(letter)
                break
            i += 1
        out = [f"-{c} is required" for c in self.required if c not in seen]
        out += [f"-{' and -'.join(g)} exclude each other"
                for g in self.exclusive if len(set(g) & set(seen)) > 1]
        return out + _operand_problems(self.operands, args[i:])


@dataclasses.dataclass(frozen=True)
class LongForm:
    """A SYNOPSIS of ``--name`` and ``--name=value`` words only."""

    options: dict               # name: value pattern, or None for no value
    required: tuple = ()

    def problems(self, args):
        """Return why ``args`` (argv without argv[0]) is not this form."""
        out, seen = [], set()
        for arg in args:
            name, eq, value = arg[2:].partition("=")
            if not arg.startswith("--") or name not in self.options:
                out.append(f"{arg!r} is not an option of the synopsis")
            elif self.options[name] is None and eq:
                out.append(f"--{name} takes no value")
            elif self.options[name] is not None and (
                    not eq or not re.fullmatch(self.options[name], value)):
                out.append(f"--{name} needs ={self.options[name]}")
            seen.add(name)
        return out + [f"--{r} is required" for r in self.required
                      if r not in seen]


def _value_error(check, value):
    if callable(check):
        return check(value)
    return None if re.fullmatch(check, value) else f"is not {check}"


def _operand_problems(runs, operands):
    k = 0
    for pattern, low, high in runs:
        start = k
        while k < len(operands) and k - start < high and \
                re.fullmatch(pattern, operands[k]):
            k += 1
        if k - start < low:
            return [f"expected {low} or more operands matching {pattern}, "
                    f"got {operands[start:]}"]
    return [f"unexpected operands {operands[k:]}"] if k < len(operands) else []


def problems(grammar, argv):
    """Return [] if ``argv[1:]`` is one of the grammar's forms, else why not."""
    out = []
    for form in grammar:
        found = form.problems(argv[1:])
        if not found:
            return []
        out += found
    return out


def assert_conforms(grammar, argv, program):
    """Fail unless argv runs ``program`` as one of the grammar's forms."""
    assert argv[0] == program
    assert problems(grammar, argv) == [], argv


# bhyve(8): -s and -l values, from the OPTIONS and backend lines above
_MAC = r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}"
_EMULATIONS = ("hostbridge amd_hostbridge passthru virtio-net virtio-blk "
               "virtio-scsi virtio-9p virtio-rnd virtio-console virtio-input "
               "ahci ahci-cd ahci-hd e1000 uart lpc fbuf xhci nvme hda").split()
_BACKENDS = {
    # tapN: bhyve picks the tap backend by the prefix "tap"
    # (usr.sbin/bhyve/net_backends.c); the driver's taps are tap devices
    # renamed tap<VIF id prefix>, so N is not a bare unit number here
    "virtio-net": rf"(?:tap|vmnet)[^,]+(?:,mac={_MAC})?(?:,mtu=\d+)?",
    "virtio-blk": r"/[^,]+(?:,(?:nocache|direct|ro|nodelete|"
                  r"sectorsize=\d+(?:/\d+)?|bootindex=\d+))*",
    "fbuf": r"(?:(?:rfb|tcp)=(?:(?:\d{1,3}(?:\.\d{1,3}){3}:)?\d+|"
            r"\[[0-9A-Fa-f:]+(?:%\w+)?\]:\d+))?(?:,w=(?P<w>\d+))?"
            r"(?:,h=(?P<h>\d+))?(?:,vga=(?:io|on|off))?(?:,wait)?"
            r"(?:,password=[^,]+)?",
    "xhci": "tablet",
}


def _bhyve_slot(value):
    """-s slot,emulation[,conf]: a slot form, an emulation, its backend."""
    slot, _, rest = value.partition(",")
    emulation, _, conf = rest.partition(",")
    numbers = slot.split(":")
    if not all(n.isdigit() for n in numbers) or not 1 <= len(numbers) <= 3:
        return f"slot {slot!r} is not pcislot[:function] or bus:pcislot:function"
    limits = {1: (31,), 2: (31, 7), 3: (255, 31, 7)}[len(numbers)]
    if any(int(n) > top for n, top in zip(numbers, limits, strict=True)):
        return f"slot {slot!r} out of range"
    if emulation not in _EMULATIONS:
        return f"{emulation!r} is not a PCI emulation of bhyve(8)"
    if not conf:
        return None
    if emulation not in _BACKENDS:
        return f"no backend grammar for {emulation} here"
    match = re.fullmatch(_BACKENDS[emulation], conf)
    if not match:
        return f"{conf!r} is not a {emulation} backend"
    if emulation == "fbuf" and not (
            640 <= int(match["w"] or 1024) <= 3840 and
            480 <= int(match["h"] or 768) <= 2160):
        return "resolution outside 640x480-3840x2160"
    return None


BHYVE = (Form(
    flags="aCDeHhPSuWwxY",
    options={
        "c": r"(?=.)(?:(?:cpus=)?\d+)?(?:,sockets=\d+)?(?:,cores=\d+)?"
             r"(?:,threads=\d+)?",
        "f": r"[^,]+,(?:string|file)=.*",
        "G": r"w?(?:[^:]+:)?\d+",
        "k": r".+", "K": r".+",
        "l": r"com[1-4](?:,(?:stdio|/dev/\S+|tcp=\S+))?|bootrom,[^,]+"
             r"(?:,[^,]+)?|tpm,.+|fwcfg,(?:bhyve|qemu)|pc-testdev",
        "m": r"\d+[KkMmGgTt]?",
        "o": r"[^=]+=.*",
        "p": r"\d+:\d+",
        "r": r".+",
        "s": _bhyve_slot,
        "U": r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}",
    },
    # "Alphanumeric name of the guest": vmm(4) takes any name that fits a
    # devfs path (229 bytes, sys/dev/vmm/vmm_param.h); the driver's names
    # are instance UUIDs, hyphens included
    operands=((r"[A-Za-z0-9][A-Za-z0-9_.-]{0,228}", 1, 1),)),)

BHYVECTL = (LongForm(
    options={"vm": r"[A-Za-z0-9][A-Za-z0-9_.-]{0,228}", "create": None,
             "destroy": None, "get-stats": None, "inject-nmi": None,
             "force-reset": None, "force-poweroff": None,
             "checkpoint": r".+", "suspend": r".+"},
    required=("vm",)),)

ZFS_CREATE = (
    Form(("create",), flags="Pnpuv", options={"o": ZASSIGN},
         operands=((ZNAME, 1, 1),)),
    Form(("create",), flags="ps",
         options={"b": ZSIZE, "o": ZASSIGN, "V": ZSIZE}, required="V",
         operands=((ZNAME, 1, 1),)))
ZFS_CLONE = (Form(("clone",), flags="p", options={"o": ZASSIGN},
                  operands=((ZSNAP, 1, 1), (ZNAME, 1, 1))),)
ZFS_SNAPSHOT = (Form(("snapshot",), flags="r", options={"o": ZASSIGN},
                     operands=((ZSNAP, 1, INF),)),)
ZFS_DESTROY = (
    Form(("destroy",), flags="Rfnprv", operands=((ZNAME, 1, 1),)),
    Form(("destroy",), flags="Rdnprv",
         operands=((rf"{ZNAME}@{_COMPONENT}(?:%{_COMPONENT})?"
                    rf"(?:,{_COMPONENT}(?:%{_COMPONENT})?)*", 1, INF),)),
    Form(("destroy",), operands=((rf"{ZNAME}#{_COMPONENT}", 1, 1),)))
ZFS_SET = (Form(("set",), flags="u",
                operands=((ZASSIGN, 1, INF), (rf"{ZNAME}(?:@{_COMPONENT})?",
                                               1, INF))),)
ZFS_GET = (Form(
    ("get",), flags="rHpj",
    options={"d": r"\d+", "o": _list_of("name|property|value|source"),
             "s": _list_of("local|default|inherited|temporary|received|none"),
             "t": _list_of(ZTYPE)},
    exclusive=("rd",),
    operands=((rf"all|{_list_of(ZPROP_NAME)}", 1, 1),
              (rf"{ZNAME}(?:[@#]{_COMPONENT})?", 0, INF))),)
ZFS_LIST = (Form(
    ("list",), flags="rHpj",
    options={"d": r"\d+", "o": _list_of(f"name|{ZPROP_NAME}"),
             "s": f"name|{ZPROP_NAME}", "S": f"name|{ZPROP_NAME}",
             "t": _list_of(ZTYPE)},
    exclusive=("rd",),
    operands=((rf"{ZNAME}(?:@{_COMPONENT})?", 0, INF),)),)
_SNAP_OR_SHORT = rf"(?:{ZNAME})?@{_COMPONENT}"     # -i: @snap too (ZFS_SEND_DETAILS)
ZFS_SEND = (
    Form(("send",), flags="DLPVbcehnpsvwR",
         options={"X": _list_of(ZNAME), "I": _SNAP_OR_SHORT,
                  "i": _SNAP_OR_SHORT},
         exclusive=("Ii",), operands=((ZSNAP, 1, 1),)),
    Form(("send",), flags="DLPVcensvw",
         options={"i": rf"{_SNAP_OR_SHORT}|(?:{ZNAME})?#{_COMPONENT}"},
         operands=((rf"{ZNAME}(?:@{_COMPONENT})?", 1, 1),)))
ZFS_RECEIVE = (
    Form(("receive",), flags="FhMnsuv",
         options={"o": rf"origin={ZSNAP}|{ZASSIGN}", "x": ZPROP_NAME},
         operands=((rf"{ZNAME}(?:@{_COMPONENT})?", 1, 1),)),
    Form(("receive",), flags="FhMnsuvde",
         options={"o": rf"origin={ZSNAP}|{ZASSIGN}", "x": ZPROP_NAME},
         exclusive=("de",), operands=((ZNAME, 1, 1),)))
ZFS = ZFS_CREATE + ZFS_CLONE + ZFS_SNAPSHOT + ZFS_DESTROY + ZFS_SET + \
    ZFS_GET + ZFS_LIST + ZFS_SEND + ZFS_RECEIVE

GRAMMARS = [
    (BHYVE, BHYVE_SYNOPSIS), (BHYVECTL, BHYVECTL_SYNOPSIS),
    (ZFS_CREATE, ZFS_CREATE_SYNOPSIS), (ZFS_CLONE, ZFS_CLONE_SYNOPSIS),
    (ZFS_SNAPSHOT, ZFS_SNAPSHOT_SYNOPSIS),
    (ZFS_DESTROY, ZFS_DESTROY_SYNOPSIS), (ZFS_SET, ZFS_SET_GET_SYNOPSIS),
    (ZFS_GET, ZFS_SET_GET_SYNOPSIS), (ZFS_LIST, ZFS_LIST_SYNOPSIS),
    (ZFS_SEND, ZFS_SEND_SYNOPSIS), (ZFS_RECEIVE, ZFS_RECEIVE_SYNOPSIS)]


def _synopsis_lines(text, words):
    """The synopsis lines (continuations joined) of subcommand ``words``."""
    lines = re.split(r"\n(?=\s{5}\S)", text.strip("\n"))
    return [" ".join(line.split()) for line in lines
            if line.split()[1:1 + len(words)] == list(words)]


def _line_options(line):
    """Option letters and long option names of one synopsis line."""
    letters = set()
    for word in re.findall(r"(?<![\w-])-([A-Za-z]+)", line):
        letters.update(word)
    return letters | set(re.findall(r"--([a-z-]+)", line))


@pytest.mark.parametrize("grammar,synopsis", GRAMMARS)
def test_grammars_have_the_options_of_their_synopsis(grammar, synopsis):
    """Each form has the options of its synopsis line, in the same order.

    ``--json-int`` (after -j of zfs get and list) is not modelled: the
    driver does not use -j.
    """
    words = getattr(grammar[0], "words", ())
    lines = _synopsis_lines(synopsis, words)
    assert len(lines) >= len(grammar)
    for form, line in zip(grammar, lines, strict=False):
        named = set(form.options)
        if isinstance(form, Form):
            named |= set(form.flags)
        assert named == _line_options(line) - {"json-int"}, line


# -- bhyve(8) ----------------------------------------------------------------

PATHS = bhyve_argv.BhyvePaths(
    bhyve="/usr/sbin/bhyve",
    firmware="/usr/local/share/uefi-firmware/BHYVE_UEFI_CODE.fd",
    instances_path=INSTANCES, zvol_root=f"/dev/zvol/{DATASET}")
NVRAM = f"{INSTANCES}/{UUID}/nvram.fd"


def _spec(disks=1, nics=1, vnc="127.0.0.1"):
    return MachineSpec(
        uuid=UUID, vcpus=4, memory_mb=4096,
        disks=tuple(DiskSpec(f"/dev/zvol/{DATASET}/{UUID}-disk{i}")
                    for i in range(disks)),
        nics=tuple(NicSpec(vif_id=f"v{i}", tap=f"tap3e4f5a6b-{i:02d}",
                           mac=f"fa:16:3e:00:00:{i:02x}", bridge="bridge0")
                   for i in range(nics)),
        vnc_listen=vnc, vnc_port=5901)


def _file_spec():
    """A guest of ``[bhyve] disk_layout = file``: disk files in its directory."""
    folder = f"{INSTANCES}/{UUID}"
    return MachineSpec(uuid=UUID, vcpus=2, memory_mb=2048, disks=(
        DiskSpec(f"{folder}/disk", boot=True),
        DiskSpec(f"{folder}/disk.swap", name="swap", size_mb=512),
        DiskSpec(f"{folder}/disk.eph0", name="eph0", size_mb=1024)))


@pytest.mark.parametrize("spec,kwargs", [
    (_spec(), {}),
    (_file_spec(), {}),
    (_file_spec(), {"restore_from": f"{INSTANCES}/{UUID}/checkpoint"}),
    (_spec(disks=18, nics=9), {"wire_memory": True, "vnc_wait": True}),
    (_spec(nics=0, vnc=None), {}),
    (_spec(vnc="::1"), {}),
    (_spec(), {"restore_from": f"{INSTANCES}/{UUID}/checkpoint"}),
])
def test_bhyve_command_lines(spec, kwargs):
    argv = bhyve_argv.build(spec, PATHS, NVRAM, **kwargs)
    assert_conforms(BHYVE, argv, "/usr/sbin/bhyve")


@pytest.fixture
def helper_conf(monkeypatch):
    CONF.set_override("instances_path", INSTANCES)
    CONF.set_override("zfs_dataset", DATASET, group="bhyve")
    monkeypatch.setattr(privsep.bhyve_pctxt, "client_mode", False)
    execute = mock.Mock(return_value=("", ""))
    monkeypatch.setattr(privsep.processutils, "execute", execute)
    yield execute
    CONF.clear_override("instances_path")
    CONF.clear_override("zfs_dataset", group="bhyve")


def test_the_helper_starts_a_restore_of_the_incoming_checkpoint(helper_conf):
    """After a live migration: ``bhyve -r <runtime_path>/<uuid>/incoming``."""
    incoming = f"{CONF.bhyve.runtime_path}/{UUID}/incoming"
    argv = bhyve_argv.build(_file_spec(), PATHS, NVRAM, restore_from=incoming)
    cmd = privsep.supervised_argv(UUID, argv)
    assert cmd[-len(argv):] == argv
    assert_conforms(BHYVE, argv, CONF.bhyve.bhyve_path)
    checked = json.loads(cmd[cmd.index("--check-bhyve-files") + 1])
    assert checked["runtime_path"] == CONF.bhyve.runtime_path


def test_supervised_bhyve_its_reboot_and_its_vmm_cleanup(helper_conf):
    argv = bhyve_argv.build(_spec(), PATHS, NVRAM,
                            restore_from=f"{INSTANCES}/{UUID}/checkpoint")
    cmd = privsep.supervised_argv(UUID, argv)
    reboot = json.loads(cmd[cmd.index("--reboot-argv") + 1])
    destroy = json.loads(cmd[cmd.index("--before-restart") + 1])
    assert cmd[-len(argv):] == argv
    assert_conforms(BHYVE, argv, CONF.bhyve.bhyve_path)
    assert_conforms(BHYVE, reboot, CONF.bhyve.bhyve_path)
    assert "-r" not in reboot
    assert_conforms(BHYVECTL, destroy, CONF.bhyve.bhyvectl_path)
    # the driver tells this supervisor, once it runs, by its command line
    supervisor = cmd[cmd.index(sys.executable):]
    assert supervised.supervises(supervisor, UUID)
    assert not supervised.supervises(supervisor, "f" + UUID[1:])


@pytest.mark.parametrize("change,why", [
    (lambda a: a[:1] + ["-A"] + a[1:], "unknown option -A"),
    (lambda a: a[:-1] + ["-c"], "-c needs a value"),
    (lambda a: a[:-1], "operands"),                     # no vmname
    (lambda a: a + ["-H"], "unexpected operands"),      # option after vmname
    (lambda a: [x.replace("4096M", "4GiB") for x in a], "-m"),
    (lambda a: [x.replace("0,hostbridge", "32,hostbridge") for x in a],
     "out of range"),
    (lambda a: [x.replace("virtio-rnd", "virtio-rng") for x in a],
     "not a PCI emulation"),
    (lambda a: [x.replace(",mac=", ",macaddr=") for x in a],
     "virtio-net backend"),
    (lambda a: [x.replace("w=1024", "w=320") for x in a], "resolution"),
    (lambda a: [x.replace("com1,stdio", "com5,stdio") for x in a], "-l"),
])
def test_bhyve_checker_refuses_what_the_manual_does_not_allow(change, why):
    argv = change(bhyve_argv.build(_spec(), PATHS, NVRAM))
    found = problems(BHYVE, argv)
    assert found and why in " ".join(found), found


# -- bhyvectl(8) -------------------------------------------------------------

def test_bhyvectl_destroy_and_suspend(helper_conf):
    privsep.destroy_vmm(UUID)
    assert_conforms(BHYVECTL, list(helper_conf.call_args.args),
                    "/usr/sbin/bhyvectl")
    privsep.checkpoint_guest(UUID, f"{INSTANCES}/{UUID}/checkpoint")
    assert_conforms(BHYVECTL, list(helper_conf.call_args.args),
                    "/usr/sbin/bhyvectl")
    assert helper_conf.call_count == 2


@pytest.mark.parametrize("argv,why", [
    (["bhyvectl", "--destroy"], "--vm is required"),
    (["bhyvectl", "--destroy", UUID], "not an option"),
    (["bhyvectl", "-destroy", f"--vm={UUID}"], "not an option"),
    (["bhyvectl", "--suspend", f"--vm={UUID}"], "--suspend needs"),
    (["bhyvectl", "--destroy=yes", f"--vm={UUID}"], "takes no value"),
    (["bhyvectl", "--pause", f"--vm={UUID}"], "not an option"),
])
def test_bhyvectl_checker_refuses_what_the_manual_does_not_allow(argv, why):
    found = problems(BHYVECTL, argv)
    assert found and why in " ".join(found), found


# -- zfs(8) ------------------------------------------------------------------

@pytest.mark.parametrize("action,name,kwargs,grammar", [
    ("create-volume", f"{DATASET}/{UUID}-disk0", {"size_gb": 20}, ZFS_CREATE),
    ("create-volume", f"{DATASET}/{UUID}-swap", {"size_mb": 512}, ZFS_CREATE),
    ("clone", f"{DATASET}/{UUID}-disk0",
     {"origin": f"{DATASET}/images/0a1b2c@base"}, ZFS_CLONE),
    ("resize", f"{DATASET}/{UUID}-eph0", {"size_gb": 3}, ZFS_SET),
    ("snapshot", f"{DATASET}/{UUID}-disk0@nova-snapshot-1764590000", {},
     ZFS_SNAPSHOT),
    ("destroy", f"{DATASET}/{UUID}-disk0", {}, ZFS_DESTROY),
    ("destroy", f"{DATASET}/{UUID}-disk0@nova-snapshot-1764590000", {},
     ZFS_DESTROY),
])
def test_privileged_zfs_operations(helper_conf, action, name, kwargs,
                                   grammar):
    privsep.zfs(action, name, **kwargs)
    argv = list(helper_conf.call_args.args)
    assert_conforms(grammar, argv, "/sbin/zfs")
    assert_conforms(ZFS, argv, "/sbin/zfs")


# a migration's zvol: what privsep_zfs runs on each host, and what
# zvolmove removes afterwards (through privsep.zfs)
TAG = "mig-0123456789ab"
ZVOL = f"{DATASET}/{UUID}-disk0"


def test_a_migrating_zvols_commands(helper_conf):
    runs = [
        (privsep_zfs.snapshot_argv(ZVOL, TAG, 1), ZFS_SNAPSHOT),
        (privsep_zfs.send_argv(ZVOL, TAG, 0), ZFS_SEND),
        (privsep_zfs.snapshot_argv(ZVOL, TAG, 2), ZFS_SNAPSHOT),
        (privsep_zfs.send_argv(ZVOL, TAG, 1), ZFS_SEND),
        (privsep_zfs.receive_argv(ZVOL, 0), ZFS_RECEIVE),
        (privsep_zfs.receive_argv(ZVOL, 1), ZFS_RECEIVE),
        (privsep_zfs.volsize_argv(ZVOL), ZFS_GET)]
    for argv, grammar in runs:
        assert_conforms(grammar, argv, "/sbin/zfs")
        assert_conforms(ZFS, argv, "/sbin/zfs")
    # the full stream of the first snapshot, then only what the guest
    # wrote up to the second (-i with the source's last component, as
    # zfs-send(8) allows); the full receive makes a device-only zvol
    assert runs[1][0][1:] == ["send", f"{ZVOL}@{TAG}-1"]
    assert runs[3][0][1:] == ["send", "-i", f"@{TAG}-1", f"{ZVOL}@{TAG}-2"]
    assert runs[4][0][1:] == ["receive", "-o", "volmode=dev", ZVOL]
    for committed, role in ((True, "send"), (False, "send"),
                            (True, "receive"), (False, "receive")):
        helper_conf.reset_mock()
        zvolmove.ZvolStreams("/nonexistent", UUID, TAG, {"disk": ZVOL},
                             role).finish(committed)
        destroyed = [list(c.args) for c in helper_conf.call_args_list]
        for argv in destroyed:
            assert_conforms(ZFS_DESTROY, argv, "/sbin/zfs")
        # the snapshots go; a failed destination's zvol goes whole
        assert [argv[-1] for argv in destroyed] == (
            [ZVOL] if (role, committed) == ("receive", False)
            else [f"{ZVOL}@{TAG}-1", f"{ZVOL}@{TAG}-2"])


@pytest.fixture
def backend(tmp_path, monkeypatch):
    CONF.set_override("zfs_dataset", DATASET, group="bhyve")
    monkeypatch.setattr(bhyve, "privsep", mock.Mock())
    outputs = {"available,used": "1000\n2000\n", "volsize": f"{1 << 30}\n",
               "name": f"{DATASET}/{UUID}-disk0\n"}
    calls = []

    def execute(*argv, **kwargs):
        calls.append(list(argv))
        return next(v for k, v in outputs.items() if k in argv), ""
    monkeypatch.setattr(bhyve.processutils, "execute", execute)
    monkeypatch.setattr(bhyve, "sysctl", lambda name: {
        "hw.machine_arch": "amd64", "hw.model": "CPU"}.get(name, "4096"))
    yield types.SimpleNamespace(
        be=bhyve.BhyveBackend(CONF, str(tmp_path / "instances")), calls=calls)
    CONF.clear_override("zfs_dataset", group="bhyve")


def test_backend_zfs_queries(backend):
    backend.be.host_facts()
    backend.be.grow_disk(UUID, 1 << 30)          # reads volsize only
    assert backend.be._instance_zvols(UUID) == [f"{DATASET}/{UUID}-disk0"]
    assert [argv[1] for argv in backend.calls] == ["get", "get", "list"]
    for argv in backend.calls:
        assert_conforms(ZFS_GET + ZFS_LIST, argv, CONF.bhyve.zfs_path)


@pytest.mark.parametrize("argv,why", [
    # create: -V needs a size; a volume needs -V; options before operands
    (["zfs", "create", "-p", "-s", "-V"], "-V needs a value"),
    (["zfs", "create", "-s", "-o", "volmode=dev", "zroot/nova/x"],
     "-V is required"),
    (["zfs", "create", "-V", "1G", "zroot/nova/x", "-o", "volmode=dev"],
     "unexpected operands"),
    (["zfs", "create", "-V", "1G", "-o", "volmode=raw", "zroot/nova/x"],
     "-o 'volmode=raw'"),
    # clone: a snapshot, then the new dataset
    (["zfs", "clone", "zroot/nova/x", "zroot/nova/images/a@base"],
     "operands"),
    # snapshot: dataset@snapname
    (["zfs", "snapshot", "zroot/nova/x"], "operands"),
    # destroy: -d belongs to snapshots only; one filesystem or volume
    (["zfs", "destroy", "-d", "zroot/nova/x"], "operands"),
    (["zfs", "destroy", "-r", "zroot/nova/x", "zroot/nova/y"],
     "unexpected operands"),
    # set: property=value first
    (["zfs", "set", "zroot/nova/x", "volsize=2G"], "operands"),
    (["zfs", "set", "-r", "volsize=2G", "zroot/nova/x"], "unknown option -r"),
    # get: -r and -d exclude each other; -o takes columns
    (["zfs", "get", "-r", "-d", "1", "used", "zroot/nova"],
     "exclude each other"),
    (["zfs", "get", "-Hp", "-o", "size", "used", "zroot/nova"], "-o 'size'"),
    (["zfs", "get", "-Hp", "zroot/nova"], "operands"),
    # list: -t takes types
    (["zfs", "list", "-H", "-t", "zvol", "zroot/nova"], "-t 'zvol'"),
    # send: one snapshot (a volume only in the second form, without -R);
    # -I and -i exclude each other
    (["zfs", "send", "-R", "zroot/nova/x"], "unknown option -R"),
    (["zfs", "send", "-I", "@a", "-i", "@b", "zroot/nova/x@c"],
     "exclude each other"),
    (["zfs", "send", "zroot/nova/x@a", "zroot/nova/x@b"], "operands"),
    # receive: options before the one target; -o takes property=value
    (["zfs", "receive", "zroot/nova/x", "-o", "volmode=dev"], "operands"),
    (["zfs", "receive", "-o", "volmode", "zroot/nova/x"], "-o 'volmode'"),
    (["zfs", "receive", "-d", "-e", "zroot/nova"], "exclude each other"),
])
def test_zfs_checker_refuses_what_the_manual_does_not_allow(argv, why):
    found = problems(ZFS, argv)
    assert found and why in " ".join(found), found
