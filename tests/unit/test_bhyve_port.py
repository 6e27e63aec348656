"""Unit tests of the bhyve vmm port's portable C (no FreeBSD needed).

A cffi API-mode module is built from vmm/bhyve/: bhyve_msg.c, bhyve_meta.c,
bhyve_ckpt.c and bhyve_restore.c (declared by the shipped bhyve.cdef
and bhyve.h);
the checkpoint client runs against a stand-in bhyve on a real socket.
"""

import errno
import importlib.util
import os
import re
import shutil
import socket
import stat
import struct
import sys
import tempfile
import threading
import time

import pytest

cffi = pytest.importorskip("cffi")

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..",
                                   "nova_bhyve", "native", "src"))
GiB = 1 << 30
PAGE = 4096
PORTABLE = tuple("vmm/bhyve/" + n for n in (
    "bhyve_msg.c", "bhyve_meta.c", "bhyve_ckpt.c", "bhyve_restore.c"))
COMMON = "vmm/vmm_common.c"



def read_src(name):
    with open(os.path.join(SRC, name)) as f:
        return f.read()


def c_functions(text):
    return set(re.findall(r"^[a-z][\w ]*?[\s*](nb_\w+)\(", text, re.M))


def header_cdef():
    """bhyve.h's declarations the shipped .cdef leaves out."""
    head = read_src("vmm/bhyve/bhyve.h")
    shipped = read_src("vmm/bhyve/bhyve.cdef")
    parts = []
    if "struct nb_bhyve_meta {" not in shipped:
        parts.append(re.search(r"^struct nb_bhyve_meta \{.*?^\};", head,
                               re.M | re.S).group(0))
    for name in sorted(set().union(*(c_functions(read_src(n))
                                     for n in PORTABLE[1:]))):
        if re.search(r"\b%s\(" % name, shipped):
            continue
        parts.append(re.search(r"^int [^;]*?\b%s\(.*?\);" % name, head,
                               re.M | re.S).group(0))
    return "\n".join(parts) + "\nvoid free(void *);\n"


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bhyve_msg")
    ffi = cffi.FFI()
    ffi.cdef(read_src("vmm/bhyve/bhyve.cdef"))
    ffi.cdef(header_cdef())
    ffi.set_source(
        "_nb_bhyve_msg_test",
        '#include <stdlib.h>\n#include "vmm/bhyve/bhyve.h"\n',
        sources=[os.path.join(SRC, n)
                 for n in PORTABLE + (COMMON,)],
        include_dirs=[SRC],
        extra_compile_args=["-std=gnu11"],
    )
    path = ffi.compile(tmpdir=str(tmp))
    spec = importlib.util.spec_from_file_location("_nb_bhyve_msg_test", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def errstr(m, err):
    return m.ffi.string(err).decode()


# ------------------------------------------------------------ nvlist

class Desc(int):
    """A descriptor pair's value: the index of an SCM_RIGHTS descriptor."""


def nv_decode(buf, nfds):
    """Decode a packed nvlist the way libnv's nvlist_xunpack() checks it."""
    buf = bytes(buf)
    assert len(buf) >= 19 and buf[0] == 0x6C and buf[1] == 0
    flags = buf[2]
    assert flags & ~0x83 == 0, "unknown header flags"
    order = ">" if flags & 0x80 else "<"
    ndesc, size = struct.unpack_from(order + "QQ", buf, 3)
    assert size == len(buf) - 19 and ndesc <= nfds
    pos, pairs = 19, []
    while pos < len(buf):
        typ, nsize, dsize, nitems = struct.unpack_from(order + "BHQQ", buf, pos)
        name = buf[pos + 19:pos + 19 + nsize]
        data = buf[pos + 19 + nsize:pos + 19 + nsize + dsize]
        pos += 19 + nsize + dsize
        assert nsize >= 1 and len(name) == nsize and len(data) == dsize
        assert name[-1] == 0 and 0 not in name[:-1] and nitems == 0
        if typ == 4:                                    # string
            assert dsize >= 1 and data[-1] == 0 and 0 not in data[:-1]
            val = data[:-1].decode()
        elif typ == 2:                                  # bool
            assert dsize == 1 and data[0] in (0, 1)
            val = bool(data[0])
        elif typ in (3, 6):                             # number, descriptor
            assert dsize == 8
            val = struct.unpack(order + ("Q" if typ == 3 else "q"), data)[0]
            if typ == 6:
                assert 0 <= val < nfds
                val = Desc(val)
        else:
            raise AssertionError(f"unexpected nvpair type {typ}")
        pairs.append((name[:-1].decode(), val))
    return ndesc, pairs


def pair(typ, name, data):
    name = name.encode() + b"\0"
    return struct.pack("<BHQQ", typ, len(name), len(data), 0) + name + data


def checkpoint_msg(m, filename, suspend):
    out = m.ffi.new("uint8_t[512]")
    n = m.ffi.new("size_t *")
    err = m.ffi.new("char[256]")
    rc = m.lib.nb_bhyve_checkpoint_msg(out, 512, n, filename.encode(),
                                       suspend, err)
    return rc, bytes(m.ffi.buffer(out, n[0])) if rc == 0 else b"", \
        errstr(m, err)


@pytest.mark.parametrize("suspend", [0, 1])
def test_checkpoint_request_matches_hand_packed_libnv_bytes(mod, suspend):
    assert sys.byteorder == "little"
    body = (pair(4, "cmd", b"checkpoint\0")
            + pair(4, "filename", b"ckpt\0")
            + pair(2, "suspend", bytes([suspend]))
            + pair(6, "fddir", struct.pack("<q", 0)))
    expected = struct.pack("<BBBQQ", 0x6C, 0, 0, 1, len(body)) + body
    rc, got, err = checkpoint_msg(mod, "ckpt", suspend)
    assert rc == 0, err
    assert got == expected
    # sizes straight from nvlist_size(): 19 + (19+4+11) + (19+9+5)
    # + (19+8+1) + (19+6+8)
    assert len(got) == 147
    assert got[:19].hex() == "6c0000" + "01" + "00" * 7 + "80" + "00" * 7


def test_checkpoint_request_decodes_like_bhyve_reads_it(mod):
    rc, got, err = checkpoint_msg(mod, "snap-2024.01", 1)
    assert rc == 0, err
    ndesc, pairs = nv_decode(got, nfds=1)
    assert ndesc == 1
    assert pairs == [("cmd", "checkpoint"), ("filename", "snap-2024.01"),
                     ("suspend", True), ("fddir", 0)]
    assert isinstance(pairs[3][1], Desc)
    rc, got, err = checkpoint_msg(mod, "x" * 250, 0)       # longest allowed
    assert rc == 0 and nv_decode(got, 1)[1][1] == ("filename", "x" * 250)


@pytest.mark.parametrize("name,why", [
    ("", "plain file name"), ("a/b", "plain file name"),
    ("..", "plain file name"), ("x" * 251, "250"),
])
def test_checkpoint_request_rejects_bad_file_names(mod, name, why):
    rc, _, err = checkpoint_msg(mod, name, 0)
    assert rc == -1 and why in err


def test_nvlist_packer_numbers_descriptors_and_overflow(mod):
    ffi, lib = mod.ffi, mod.lib
    nv = ffi.new("struct nb_nvbuf *")
    buf = ffi.new("uint8_t[256]")
    n = ffi.new("size_t *")
    err = ffi.new("char[256]")
    lib.nb_nv_init(nv, buf, 256)
    assert lib.nb_nv_add_number(nv, b"memsize", 0x1122334455667788) == 0
    assert lib.nb_nv_add_descriptor(nv, b"a") == 0
    assert lib.nb_nv_add_descriptor(nv, b"b") == 0
    assert lib.nb_nv_finish(nv, n, err) == 0
    ndesc, pairs = nv_decode(ffi.buffer(buf, n[0]), nfds=2)
    assert ndesc == 2
    assert pairs == [("memsize", 0x1122334455667788), ("a", 0), ("b", 1)]
    # too small: the pair is refused and finish explains why
    small = ffi.new("uint8_t[40]")
    lib.nb_nv_init(nv, small, 40)
    assert lib.nb_nv_add_string(nv, b"cmd", b"checkpoint") == -1
    assert lib.nb_nv_finish(nv, n, err) == -1
    assert "does not fit in 40 bytes" in errstr(mod, err)
    lib.nb_nv_init(nv, buf, 256)
    assert lib.nb_nv_add_bool(nv, b"", 1) == -1
    assert lib.nb_nv_finish(nv, n, err) == -1
    assert "name" in errstr(mod, err)


# ------------------------------------------------- dirty log, layout

def make_layout(ffi, low, high=0):
    lay = ffi.new("struct nb_layout *")
    lay.nsegs = 2 if high else 1
    lay.seg[0].gpa, lay.seg[0].len, lay.seg[0].offset = 0, low, 0
    if high:
        lay.seg[1].gpa, lay.seg[1].len, lay.seg[1].offset = 4 * GiB, high, low
    lay.total = low + high
    return lay


def test_dirty_list_becomes_engine_bitmap(mod):
    ffi, lib = mod.ffi, mod.lib
    low, high = 3 * GiB, 8 << 20
    lay = make_layout(ffi, low, high)
    npages = (low + high) // PAGE
    first_high = low // PAGE
    lst = bytearray(npages)
    dirty = [0, 63, 64, first_high - 1, first_high, npages - 1]
    for i in dirty:
        lst[i] = 1
    lst[100] = 7            # any non-zero byte is dirty
    dirty.append(100)
    words = (npages + 63) // 64 + 2
    bitmap = ffi.new("uint64_t[]", [0xFFFFFFFFFFFFFFFF] * words)
    nd = ffi.new("uint64_t *")
    err = ffi.new("char[256]")
    rc = lib.nb_bhyve_dirty_to_bitmap(lay, bytes(lst), npages, bitmap, words,
                                      nd, err)
    assert rc == 0, errstr(mod, err)
    assert nd[0] == len(dirty)
    got = [w * 64 + b for w in range(words) for b in range(64)
           if bitmap[w] >> b & 1]
    assert got == sorted(dirty)
    # highmem page 0 is bit `lowmem pages`: segments in layout order
    assert bitmap[first_high // 64] >> (first_high % 64) & 1


@pytest.mark.parametrize("low,high,npages,words,why", [
    (64, 0, 63, 1, "63 pages, the layout 64"), (128, 0, 128, 1, "too small"),
    (64, 64, 128, 2, "contiguous"),
])
def test_dirty_list_conversion_rejects_mismatches(mod, low, high, npages,
                                                  words, why):
    ffi, err = mod.ffi, mod.ffi.new("char[256]")
    lay = make_layout(ffi, low * PAGE, high * PAGE)
    if high:
        lay.seg[1].offset = 4 * GiB         # not contiguous after lowmem
    bm = ffi.new("uint64_t[]", words)
    assert mod.lib.nb_bhyve_dirty_to_bitmap(lay, bytes(npages), npages, bm,
                                            words, ffi.NULL, err) == -1
    assert why in errstr(mod, err)


LOW3 = ("low3", 3 * GiB, 1 * GiB)
SMALL = ("small", 512 << 20, 0)
ODDLOW = ("oddlow", 2 * GiB, 1 * GiB)


@pytest.mark.parametrize("rc,err_no,wired,smap,lay,has,reason", [
    (0, 0, 1, 0, LOW3, 1, "available"),
    (0, 0, 1, 0, SMALL, 1, "available"),
    (-1, errno.ENOTTY, 1, 0, LOW3, 0, "no VM_GET_DIRTY_PAGE_LIST"),
    (-1, errno.EINVAL, 1, 0, LOW3, 0, "ABI differs"),
    (-1, errno.EPERM, 1, 0, LOW3, 0, "run as root"),
    (-1, errno.EACCES, 1, 0, LOW3, 0, "allow.vmm"),
    (-1, errno.EIO, 1, 0, LOW3, 0, "probe failed"),
    (0, 0, 0, 0, LOW3, 0, "bhyve with -S"),
    (0, 0, 1, 1, LOW3, 0, "SMAP"),
    (0, 0, 1, 0, ODDLOW, 0, "exactly 3 GiB"),
    (-1, errno.ENOTTY, 0, 1, LOW3, 0, "no VM_GET_DIRTY_PAGE_LIST"),
])
def test_dirty_log_decision_table(mod, rc, err_no, wired, smap, lay, has,
                                  reason):
    ffi = mod.ffi
    out = ffi.new("char[256]")
    layout = make_layout(ffi, lay[1], lay[2])
    got = mod.lib.nb_bhyve_probe_decide(rc, err_no, wired, smap, layout, out)
    assert got == has
    assert reason in errstr(mod, out)


def maps(ffi, rows):
    arr = ffi.new("struct nb_bhyve_map[]", len(rows))
    for i, (gpa, length, sysmem, wired) in enumerate(rows):
        arr[i].gpa, arr[i].len = gpa, length
        arr[i].sysmem, arr[i].wired = sysmem, wired
    return arr


def test_layout_from_bhyve_mappings(mod):
    ffi, lib = mod.ffi, mod.lib
    lay = ffi.new("struct nb_layout *")
    wired = ffi.new("int *")
    err = ffi.new("char[256]")
    # libvmmapi layout for 5 GiB with a bootrom just below 4 GiB
    rows = [(0, 3 * GiB, 1, 1), (4 * GiB - (1 << 20), 1 << 20, 0, 0),
            (4 * GiB, 2 * GiB, 1, 1)]
    assert lib.nb_bhyve_layout(maps(ffi, rows), 3, lay, wired, err) == 0
    assert lay.nsegs == 2 and lay.total == 5 * GiB and wired[0] == 1
    assert [(g.gpa, g.len, g.offset) for g in lay.seg] == \
        [(0, 3 * GiB, 0), (4 * GiB, 2 * GiB, 3 * GiB)]
    rows = [(0, 256 << 20, 1, 0)]
    assert lib.nb_bhyve_layout(maps(ffi, rows), 1, lay, wired, err) == 0
    assert lay.nsegs == 1 and lay.total == 256 << 20 and wired[0] == 0


@pytest.mark.parametrize("rows,why", [
    ([], "no guest RAM"),
    ([(4 * GiB - 4096, 4096, 0, 0)], "no guest RAM"),
    ([(0, GiB, 1, 1), (4 * GiB, GiB, 1, 1), (6 * GiB, GiB, 1, 1)], "NUMA"),
    ([(4 * GiB, GiB, 1, 1)], "no guest RAM at GPA 0"),
    ([(0, GiB, 1, 1), (5 * GiB, GiB, 1, 1)], "only lowmem at 0"),
    ([(0, 4 * GiB, 1, 1)], "past 3 GiB"),
    ([(0, GiB + 100, 1, 1)], "page aligned"),
])
def test_layout_rejects_unsupported_mappings(mod, rows, why):
    ffi = mod.ffi
    lay = ffi.new("struct nb_layout *")
    err = ffi.new("char[256]")
    arr = maps(ffi, rows) if rows else ffi.new("struct nb_bhyve_map[1]")
    assert mod.lib.nb_bhyve_layout(arr, len(rows), lay, ffi.NULL, err) == -1
    assert why in errstr(mod, err)


# ----------------------------------------------------------- .meta

KERN_STRUCTS = [("vhpet", 1880), ("vm", 2304), ("vioapic", 408),
                ("vlapic", 9728), ("vmcx", 35840), ("vatpit", 192),
                ("vatpic", 160), ("vpmtmr", 16), ("vrtc", 136)]
DEVICES = [("hostbridge", 1640), ("virtio-blk", 2216), ("virtio-net", 2344),
           ("lpc", 1656), ("atkbdc", 140)]


def bhyve_meta(ncpus=2, memsize=GiB, vmname="vm1", memflags=0,
               kern=KERN_STRUCTS, devs=DEVICES):
    """A .meta as bhyve's snapshot.c writes it through libxo (pretty)."""
    off, lines = 0, ["{", '  "basic metadata": {',
                     f'    "ncpus": {ncpus},', f'    "vmname": "{vmname}",',
                     f'    "memsize": {memsize},',
                     f'    "memflags": {memflags}', "  },"]
    for key, entries, last in (("kern_structs", kern, False),
                               ("devices", devs, True)):
        lines.append(f'  "{key}": [')
        for i, (name, size) in enumerate(entries):
            lines += ["    {", f'      "device": "{name}",',
                      f'      "size": {size},',
                      f'      "file_offset": {off}',
                      "    }" + ("," if i < len(entries) - 1 else "")]
            off += size
        lines.append("  ]" + ("" if last else ","))
    lines.append("}")
    return "\n".join(lines) + "\n", off


def meta_check(m, text, kern_len, ram_len=0):
    data = text.encode() if isinstance(text, str) else text
    out = m.ffi.new("struct nb_bhyve_meta *")
    err = m.ffi.new("char[256]")
    rc = m.lib.nb_bhyve_meta_check(data, len(data), kern_len, ram_len, out,
                                   err)
    return rc, out, errstr(m, err)


def test_meta_validator_accepts_a_bhyve_meta(mod):
    text, kern_len = bhyve_meta(ncpus=4, memsize=5 * GiB, vmname="guest-01",
                                memflags=1)
    rc, out, err = meta_check(mod, text, kern_len, ram_len=5 * GiB)
    assert rc == 0, err
    assert (out.ncpus, out.memsize, out.memflags) == (4, 5 * GiB, 1)
    assert mod.ffi.string(out.vmname) == b"guest-01"
    assert (out.nkern, out.ndev) == (9, 5)
    assert out.kern_used == kern_len
    # compact JSON, unknown members and escapes are fine too
    compact = ('{"basic metadata":{"ncpus":1,"vmname":"v\\u0031",'
               '"memsize":4096,"memflags":0,"future":[1.5,true,null]},'
               '"kern_structs":[{"device":"vm","size":8,"file_offset":0}],'
               '"devices":[],"compatibility_version":3}')
    rc, out, err = meta_check(mod, compact, 8)
    assert rc == 0, err
    assert mod.ffi.string(out.vmname) == b"v1" and out.ndev == 0


def test_meta_validator_rejects_every_truncation(mod):
    text, kern_len = bhyve_meta()
    for cut in range(0, len(text.rstrip())):
        rc, _, err = meta_check(mod, text[:cut], kern_len)
        assert rc == -1, f"accepted .meta cut at {cut}"
        assert err


def test_meta_validator_rejects_truncated_kern(mod):
    text, kern_len = bhyve_meta()
    rc, _, err = meta_check(mod, text, kern_len - 1)
    assert rc == -1
    assert "atkbdc" in err and "truncated" in err


def replace_field(text, old, new):
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("edit,why", [
    (('"size": 1880', '"size": 99999999999'), "must be an integer"),
    (('"size": 1880', '"size": -1'), "must be an integer"),
    (('"size": 1880', '"size": 18.5'), "must be an integer"),
    (('"size": 1880', '"size": "1880"'), "must be a number"),
    (('"size": 1880', '"size": 0'), "must be an integer in 1.."),
    (('"size": 1880', '"size": 9223372036854775807'), "must be an integer"),
    (('"file_offset": 0', '"file_offset": 18446744073709551615'),
     "must be an integer"),
    (('"file_offset": 1880', '"file_offset": 1000'), "overlap"),
    (('"ncpus": 2', '"ncpus": 0'), "ncpus"),
    (('"ncpus": 2', '"ncpus": 100000'), "ncpus"),
    (('"memsize": 1073741824', '"memsize": 1073741825'), "page size"),
    (('"memsize": 1073741824', '"memsize": 1180591620717411303424'),
     "memsize"),
    (('"vmname": "vm1"', '"vmname": "../x/y"'), "vmname"),
    (('"vmname": "vm1"', '"vmname": ""'), "vmname"),
    (('"device": "vm"', '"device": "vhpet"'), "saved twice"),
    (('"memflags": 0', '"memflags": 0, "ncpus": 2'), "appears twice"),
    (('"basic metadata"', '"basic_metadata"'), "no \"basic metadata\""),
    (('"devices"', '"device_list"'), "no \"devices\""),
    (('"kern_structs": [', '"kern_structs": {"x": ['), "expected"),
    (('"vmname": "vm1"', '"vmname": "v\tm"'), "control character"),
    (('"vmname": "vm1"', '"vmname": "v\\u00e9"'), "ASCII"),
    (('"vmname": "vm1"', '"vmname": "v\\q"'), "bad escape"),
])
def test_meta_validator_rejects_absurd_or_malformed(mod, edit, why):
    text, kern_len = bhyve_meta()
    rc, _, err = meta_check(mod, replace_field(text, *edit), kern_len)
    assert rc == -1
    assert why in err, err


def test_meta_validator_rejects_structural_abuse(mod):
    text, kern_len = bhyve_meta()
    cases = [
        (text + "x", "after the JSON document"),
        ("[" * 40 + "]" * 40, "nests deeper"),
        ("[1]", "top level must be a JSON object"),
        ("", "empty"),
        (" " * ((1 << 20) + 1), "more than"),
        (bhyve_meta(kern=[])[0], "no kernel structures"),
        ('{"basic metadata":' + '{"a":1,' * 3, "expected"),
    ]
    for doc, why in cases:
        rc, _, err = meta_check(mod, doc, kern_len)
        assert rc == -1 and why in err, (doc[:40], err)
    assert meta_check(mod, text, 0)[2].startswith(".kern is 0 bytes")
    rc, _, err = meta_check(mod, text, kern_len, ram_len=GiB + PAGE)
    assert rc == -1 and "different checkpoints" in err


# ------------------------------------------------------------- blob

def blob_pack(m, meta, kern):
    cap = 16 + len(meta) + len(kern)
    out = m.ffi.new("uint8_t[]", cap)
    n = m.ffi.new("size_t *")
    err = m.ffi.new("char[256]")
    rc = m.lib.nb_bhyve_blob_pack(out, cap, n, meta, len(meta), kern,
                                  len(kern), err)
    assert rc == 0, errstr(m, err)
    return bytes(m.ffi.buffer(out, n[0]))


def blob_parse(m, blob):
    offs = [m.ffi.new("size_t *") for _ in range(4)]
    err = m.ffi.new("char[256]")
    rc = m.lib.nb_bhyve_blob_parse(blob, len(blob), *offs, err)
    return rc, [o[0] for o in offs], errstr(m, err)


def test_blob_layout_round_trip_and_damage(mod):
    text, kern_len = bhyve_meta()
    meta, kern = text.encode(), os.urandom(kern_len)
    blob = blob_pack(mod, meta, kern)
    assert blob == b"NBBHYVE1" + struct.pack("<II", len(meta), len(kern)) \
        + meta + kern
    rc, (mo, ml, ko, kl), err = blob_parse(mod, blob)
    assert rc == 0, err
    assert blob[mo:mo + ml] == meta and blob[ko:ko + kl] == kern
    assert "NBBHYVE1" in blob_parse(mod, b"NBVMSTAT" + blob[8:])[2]
    assert "truncated" in blob_parse(mod, blob[:-1])[2]
    assert "truncated" in blob_parse(mod, blob + b"\0")[2]
    bad = bytearray(blob)
    struct.pack_into("<I", bad, 12, 0)
    assert blob_parse(mod, bytes(bad))[0] == -1
    # a .meta pointing past the .kern carried with it
    short = blob_pack(mod, text.encode(), bytes(kern_len - 100))
    rc, _, err = blob_parse(mod, short)
    assert rc == -1 and "truncated" in err


# ---------------------------------------------------------- options

def parse_target(m, target):
    o = m.ffi.new("struct nb_bhyve_opts *")
    err = m.ffi.new("char[256]")
    rc = m.lib.nb_bhyve_parse_target(target.encode(), o, err)
    return rc, o, errstr(m, err)


def opts_dict(m, o):
    return {f: (m.ffi.string(getattr(o, f)).decode()
                if f in ("name", "rundir", "scratch", "restore", "pidfile")
                else getattr(o, f))
            for f in ("name", "rundir", "scratch", "restore", "pidfile", "pid",
                      "timeout", "exit_on_save")}


def test_target_defaults_and_options(mod):
    rc, o, err = parse_target(mod, "vm1")
    assert rc == 0, err
    assert opts_dict(mod, o) == {
        "name": "vm1", "rundir": "/var/run/bhyve", "scratch": "/var/tmp",
        "restore": "", "pidfile": "", "pid": 0, "timeout": 600,
        "exit_on_save": 0}
    rc, o, err = parse_target(
        mod, "db-01,rundir=/run/bh,scratch=/tmpfs,restore=/ckpt/ram,"
        "pid=4242,pidfile=/var/run/db.pid,timeout=30,exit_on_save=1")
    assert rc == 0, err
    assert opts_dict(mod, o) == {
        "name": "db-01", "rundir": "/run/bh", "scratch": "/tmpfs",
        "restore": "/ckpt/ram", "pidfile": "/var/run/db.pid", "pid": 4242,
        "timeout": 30, "exit_on_save": 1}



@pytest.mark.parametrize("target,why", [
    ("", "VM name"), (",pid=1", "VM name"), ("a/b", "contains '/'"),
    ("a b", "contains"), ("..", "not a VM name"), ("x" * 230, "VM name"),
    ("vm,colour=blue", "unknown option 'colour'"), ("vm,pid", "key=value"),
    ("vm,pid=0", "pid=0"), ("vm,pid=12x", "pid=12x"),
    ("vm,timeout=0", "timeout"), ("vm,exit_on_save=2", "exit_on_save"),
    ("vm,rundir=run", "absolute path"), ("vm,", "key=value"),
    ("vm,rundir=/" + "r" * 100, "AF_UNIX"),
])
def test_target_rejects_bad_input(mod, target, why):
    rc, _, err = parse_target(mod, target)
    assert rc == -1 and why in err, err


@pytest.mark.parametrize("percent,ncpus,limit", [
    (0, 4, 0), (1, 1, 99), (50, 2, 100), (75, 4, 100), (99, 8, 8),
    (100, 2, "0..99"), (-1, 2, "0..99"), (10, 0, "vCPU count"),
])
def test_rctl_pcpu_limit(mod, percent, ncpus, limit):
    out = mod.ffi.new("int *")
    err = mod.ffi.new("char[256]")
    rc = mod.lib.nb_bhyve_pcpu_limit(percent, ncpus, out, err)
    if isinstance(limit, str):
        assert rc == -1 and limit in errstr(mod, err)
    else:
        assert rc == 0 and out[0] == limit


# ------------------------------------------- checkpoint socket client

class FakeBhyve:
    """bhyve's checkpoint thread (snapshot.c), as far as the client sees it:
    nvlist_recv() of one request, then FILE, FILE.kern and FILE.meta
    written with openat(fddir), then close() without a reply."""

    def __init__(self, rundir, name, write):
        self.path = os.path.join(rundir, name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.sock.settimeout(10)
        self.write = write
        self.request = None
        self.problem = None
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(10)
                hdr = conn.recv(19, socket.MSG_WAITALL)
                size = struct.unpack_from("<Q", hdr, 11)[0]
                body = conn.recv(size, socket.MSG_WAITALL)
                assert len(hdr) == 19 and len(body) == size
                data, fds, _, _ = socket.recv_fds(conn, 1, 1)
                assert data == b"\0" and len(fds) == 1
                _, pairs = nv_decode(hdr + body, nfds=len(fds))
                self.request = dict(pairs)
                assert stat.S_ISDIR(os.fstat(fds[0]).st_mode)
                try:
                    self.write(fds[0], self.request["filename"])
                finally:
                    os.close(fds[0])
        except Exception as exc:        # reported by finish()
            self.problem = exc
        finally:
            self.sock.close()

    def finish(self):
        self.thread.join(15)
        assert not self.thread.is_alive()
        if self.problem:
            raise self.problem


def put(dirfd, name, data=b"", size=None):
    with open(name, "wb", opener=lambda p, f: os.open(p, f, 0o600,
                                                      dir_fd=dirfd)) as f:
        f.write(data)
        f.truncate(size)


RAM = 64 << 20


def good_checkpoint(meta=None, kern=None, ram=RAM):
    text, kern_len = bhyve_meta(memsize=RAM)
    meta = meta if meta is not None else text.encode()
    kern = kern if kern is not None else os.urandom(kern_len)

    def write(dirfd, name):
        put(dirfd, name, size=ram)                  # sparse guest RAM
        put(dirfd, name + ".kern", kern)
        put(dirfd, name + ".meta", meta)
    return write, meta, kern


@pytest.fixture
def dirs():
    base = tempfile.mkdtemp(prefix="nbb", dir="/tmp")   # short AF_UNIX paths
    run, scratch = os.path.join(base, "run"), os.path.join(base, "scr")
    for d in (run, scratch):
        os.mkdir(d)
    yield run, scratch
    shutil.rmtree(base)


def checkpoint(m, target, after=None):
    rc, o, err = parse_target(m, target)
    assert rc == 0, err
    blob = m.ffi.new("uint8_t **")
    n = m.ffi.new("size_t *")
    err = m.ffi.new("char[256]")
    cb = after if after is not None else m.ffi.NULL
    rc = m.lib.nb_bhyve_checkpoint(o, RAM, cb, m.ffi.NULL, blob, n, err)
    data = None
    if rc == 0:
        data = bytes(m.ffi.buffer(blob[0], n[0]))
        m.lib.free(blob[0])
    return rc, data, errstr(m, err), o


def test_checkpoint_client_end_to_end(mod, dirs):
    run, scratch = dirs
    write, meta, kern = good_checkpoint()
    bh = FakeBhyve(run, "vm1", write)
    calls = []

    @mod.ffi.callback("int(void *, char *)")
    def after(ctx, err):
        calls.append(sorted(os.listdir(scratch)))
        return 0

    rc, blob, err, _ = checkpoint(
        mod, f"vm1,rundir={run},scratch={scratch},timeout=10", after)
    bh.finish()
    assert rc == 0, err
    assert bh.request == {"cmd": "checkpoint", "filename": "ckpt",
                          "suspend": False, "fddir": 0}
    assert blob == b"NBBHYVE1" + struct.pack("<II", len(meta), len(kern)) \
        + meta + kern
    # after() ran once bhyve was done, while the directory still existed
    assert len(calls) == 1 and calls[0][0].startswith("nb-bhyve-ckpt.")
    assert os.listdir(scratch) == []        # private directory removed


def test_checkpoint_client_exit_on_save_keeps_the_checkpoint(mod, dirs):
    run, scratch = dirs
    write, meta, kern = good_checkpoint()
    bh = FakeBhyve(run, "db", write)
    rc, blob, err, o = checkpoint(
        mod, f"db,rundir={run},scratch={scratch},exit_on_save=1")
    bh.finish()
    assert rc == 0, err
    assert bh.request["suspend"] is True
    keep = mod.ffi.new("char[300]")
    assert mod.lib.nb_bhyve_keep_dir(o, keep, 300) == 0
    keep = mod.ffi.string(keep).decode()
    assert keep == os.path.join(scratch, "nb-bhyve-db.ckpt")
    assert sorted(os.listdir(keep)) == ["ckpt", "ckpt.kern", "ckpt.meta"]
    assert os.path.getsize(os.path.join(keep, "ckpt")) == RAM
    assert stat.S_IMODE(os.stat(keep).st_mode) == 0o700
    # a second final checkpoint must not overwrite the kept one
    rc, _, err, _ = checkpoint(
        mod, f"db,rundir={run},scratch={scratch},exit_on_save=1")
    assert rc == -1 and "restore or remove it" in err


@pytest.mark.parametrize("kwargs,why", [
    (None, "did not write ckpt.meta"),
    ({"kern": bytes(bhyve_meta(memsize=RAM)[1] - 1)}, "truncated"),
    ({"ram": RAM - PAGE}, "not the 67108864 bytes"),
    ({"kern": b""}, "ckpt.kern is empty"),
])
def test_checkpoint_client_rejects_failed_checkpoints(mod, dirs, kwargs, why):
    run, scratch = dirs
    write = good_checkpoint(**kwargs)[0] if kwargs else (lambda fd, n: None)
    bh = FakeBhyve(run, "vm1", write)
    rc, _, err, _ = checkpoint(mod, f"vm1,rundir={run},scratch={scratch}")
    bh.finish()
    assert rc == -1 and why in err, err
    assert os.listdir(scratch) == []


def test_checkpoint_client_without_bhyve_or_in_time(mod, dirs):
    run, scratch = dirs
    rc, _, err, _ = checkpoint(mod, f"vm1,rundir={run},scratch={scratch}")
    assert rc == -1 and "BHYVE_SNAPSHOT" in err and run in err
    assert os.listdir(scratch) == []

    bh = FakeBhyve(run, "vm2", lambda dirfd, name: time.sleep(2.5))
    rc, _, err, _ = checkpoint(
        mod, f"vm2,rundir={run},scratch={scratch},timeout=1")
    assert rc == -1 and "did not finish the checkpoint of vm2 in 1 s" in err
    bh.finish()
    assert os.listdir(scratch) == []


# ------------------------------------------------------ restore files

def restore(m, target, blob):
    rc, o, err = parse_target(m, target)
    assert rc == 0, err
    err = m.ffi.new("char[256]")
    rc = m.lib.nb_bhyve_restore_files(o, blob, len(blob), err)
    return rc, errstr(m, err)


def test_restore_files_written_for_bhyve_r(mod, tmp_path):
    text, kern_len = bhyve_meta(memsize=RAM)
    kern = os.urandom(kern_len)
    blob = blob_pack(mod, text.encode(), kern)
    ram = tmp_path / "ram"
    rc, err = restore(mod, f"vm1,restore={ram}", blob)
    assert rc == 0, err
    assert (tmp_path / "ram.kern").read_bytes() == kern
    assert (tmp_path / "ram.meta").read_text() == text
    assert stat.S_IMODE((tmp_path / "ram.kern").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["ram.kern", "ram.meta"]
    # with the RAM file present, its size must match the checkpoint
    with open(ram, "wb") as f:
        f.truncate(RAM)
    assert restore(mod, f"vm1,restore={ram}", blob)[0] == 0
    with open(ram, "wb") as f:
        f.truncate(RAM // 2)
    rc, err = restore(mod, f"vm1,restore={ram}", blob)
    assert rc == -1 and "different checkpoints" in err


def test_restore_files_refuse_bad_input(mod, tmp_path):
    text, kern_len = bhyve_meta(memsize=RAM)
    blob = blob_pack(mod, text.encode(), bytes(kern_len))
    rc, err = restore(mod, "vm1", blob)
    assert rc == -1 and "vm1,restore=/path/to/ram" in err
    rc, err = restore(mod, f"vm1,restore={tmp_path}/ram", blob[:-3])
    assert rc == -1 and "truncated" in err
    assert list(tmp_path.iterdir()) == []
