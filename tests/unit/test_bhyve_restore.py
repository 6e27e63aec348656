"""The bhyve port's restore-only mode, driven by the real engine on loopback.

A checkpoint file set in bhyve's shape (state format ``bhyve-ckpt/1``, the
save_state blob as ``.kern``) is the source; the destination is the bhyve
port opened as ``NAME,restore=PATH,ncpus=N,memsize=BYTES``, which works on
Linux too because no /dev/vmm is involved.  No KVM and no FreeBSD needed.
"""

import json
import os

import pytest
from nova_bhyve.native._engine import ffi, lib

from nova_bhyve import polling
from nova_bhyve.machine import checkpoint
from nova_bhyve.native.engine import (
    Migration,
    MigrationError,
    Mode,
    Result,
    VmmKind,
)

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
MEM = 8 * MiB
NCPUS = 2
KERN = [("vm", 2304), ("vlapic", 9728), ("vmcx", 35840)]
DEVS = [("hostbridge", 1640), ("virtio-blk", 2216), ("lpc", 1656)]


def bhyve_meta(memsize=MEM, ncpus=NCPUS):
    """A .meta as bhyve's snapshot.c writes it, and the .kern length."""
    off, kern_structs, devices = 0, [], []
    for out, entries in ((kern_structs, KERN), (devices, DEVS)):
        for name, size in entries:
            out.append({"device": name, "size": size, "file_offset": off})
            off += size
    meta = {"basic metadata": {"ncpus": ncpus, "vmname": "vm1",
                               "memsize": memsize, "memflags": 0},
            "kern_structs": kern_structs, "devices": devices}
    return json.dumps(meta, indent=2).encode() + b"\n", off


def blob_pack(meta, kern):
    cap = 16 + len(meta) + len(kern)
    out = ffi.new("uint8_t[]", cap)
    n = ffi.new("size_t *")
    err = ffi.new("char[256]")
    assert lib.nb_bhyve_blob_pack(out, cap, n, meta, len(meta), kern,
                                  len(kern), err) == 0, ffi.string(err)
    return bytes(ffi.buffer(out, n[0]))


def source_set(tmp_path, memsize=MEM, ncpus=NCPUS, meta_ncpus=NCPUS):
    """A bhyve-shaped checkpoint set; returns (base, ram bytes, meta, kern)."""
    base = tmp_path / "src" / "ckpt"
    base.parent.mkdir()
    meta, kern_len = bhyve_meta(memsize, meta_ncpus)
    kern = os.urandom(kern_len)
    ram = bytearray(memsize)
    for page in (0, 1, 17, memsize // PAGE - 1):
        ram[page * PAGE:(page + 1) * PAGE] = os.urandom(PAGE)
    base.write_bytes(bytes(ram))
    blob = blob_pack(meta, kern)
    (tmp_path / "src" / "ckpt.kern").write_bytes(blob)
    (tmp_path / "src" / "ckpt.meta").write_text(checkpoint.CheckpointMeta(
        vmname="vm1", ncpus=ncpus, memsize=memsize, lowmem=memsize, highmem=0,
        highbase=4 << 30, page_size=PAGE,
        state_format=checkpoint.STATE_FORMAT_BHYVE, kern_bytes=len(blob),
        kern_crc32=checkpoint.crc32(blob), arch="x86_64",
        cpu_vendor="").to_json())
    return base, bytes(ram), meta, kern


def wait(mig, timeout=30):
    polling.poll(lambda: mig.stats().finished, timeout)
    return mig.stats()


def migrate(src_base, target):
    secret = os.urandom(32)
    recv = Migration.receive(vmm_target=target, vmm_kind=VmmKind.BHYVE,
                             secret=secret)
    send = Migration.send(vmm_target=str(src_base), host="127.0.0.1",
                          port=recv.port, secret=secret, mode=Mode.COLD,
                          vmm_kind=VmmKind.CHECKPOINT)
    s, d = wait(send), wait(recv)
    send.close()
    recv.close()
    return s, d


def test_guest_ram_and_state_land_in_the_files_bhyve_r_reads(tmp_path):
    base, ram, meta, kern = source_set(tmp_path)
    dst = tmp_path / "dst" / "checkpoint"
    dst.parent.mkdir()
    (tmp_path / "dst" / "checkpoint.meta").write_text("stale")
    s, d = migrate(base, f"vm1,restore={dst},ncpus={NCPUS},memsize={MEM}")
    assert s.result == d.result == Result.COMPLETED, (s.error, d.error)
    assert d.committed and s.digest == d.digest
    assert dst.read_bytes() == ram
    assert (tmp_path / "dst" / "checkpoint.kern").read_bytes() == kern
    assert (tmp_path / "dst" / "checkpoint.meta").read_bytes() == meta
    assert sorted(p.name for p in dst.parent.iterdir()) == [
        "checkpoint", "checkpoint.kern", "checkpoint.meta"]
    assert oct(dst.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("target,why", [
    ("ncpus=4,memsize=%d" % MEM, "ncpus is 2 on the source and 4"),
    ("ncpus=2,memsize=%d" % (2 * MEM), "memory is"),
])
def test_a_vm_prepared_differently_is_refused(tmp_path, target, why):
    base = source_set(tmp_path)[0]
    dst = tmp_path / "ram"
    s, d = migrate(base, f"vm1,restore={dst},{target}")
    assert d.result != Result.COMPLETED and why in d.error, d.error
    assert not os.path.exists(f"{dst}.meta")


def test_state_that_does_not_fit_leaves_no_complete_set(tmp_path):
    # the checkpoint's own .meta says 4 vCPUs: refused at load_state
    base = source_set(tmp_path, meta_ncpus=4)[0]
    dst = tmp_path / "ram"
    s, d = migrate(base, f"vm1,restore={dst},ncpus={NCPUS},memsize={MEM}")
    assert d.result == Result.FAILED and not d.committed
    assert "has 4 vCPUs, VM vm1 was prepared with 2" in d.error, d.error
    assert not os.path.exists(f"{dst}.meta")
    assert not os.path.exists(f"{dst}.kern")


def test_cancelled_receive_leaves_no_complete_set(tmp_path):
    dst = tmp_path / "ram"
    recv = Migration.receive(
        vmm_target=f"vm1,restore={dst},ncpus=1,memsize={MEM}",
        vmm_kind=VmmKind.BHYVE, secret=os.urandom(32))
    assert dst.stat().st_size == MEM and dst.stat().st_blocks == 0
    recv.cancel()
    assert wait(recv).result == Result.CANCELLED
    recv.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ram"]


@pytest.mark.parametrize("target,why", [
    ("vm1,restore={d}/ram", "give restore=PATH, ncpus= and memsize="),
    ("vm1,restore={d}/ram,ncpus=1", "memsize="),
    ("vm1,restore={d}/no/such/ram,ncpus=1,memsize=8388608",
     "cannot create the RAM file"),
    ("vm1,restore={d}/ram,ncpus=1,memsize=1000", "memsize=1000"),
    ("vm1,ncpus=1", "only available on FreeBSD"),
])
def test_restore_only_targets_are_checked_at_open(tmp_path, target, why):
    with pytest.raises(MigrationError, match=why.replace("(", r"\(")):
        Migration.receive(vmm_target=target.format(d=tmp_path),
                          vmm_kind=VmmKind.BHYVE, secret=os.urandom(32))


def test_restore_only_port_cannot_be_a_source(tmp_path):
    secret = os.urandom(32)
    recv = Migration.receive(vmm_target=str(tmp_path / "out"), secret=secret,
                             vmm_kind=VmmKind.CHECKPOINT)
    send = Migration.send(
        vmm_target=f"vm1,restore={tmp_path}/ram,ncpus=1,memsize={MEM}",
        vmm_kind=VmmKind.BHYVE, host="127.0.0.1", port=recv.port,
        secret=secret, mode=Mode.WARM)
    s = wait(send)
    assert s.result == Result.FAILED
    assert "cannot pause VM vm1: it does not run here" in s.error, s.error
    send.close()
    wait(recv)
    recv.close()


def parse_target(target):
    o = ffi.new("struct nb_bhyve_opts *")
    err = ffi.new("char[256]")
    rc = lib.nb_bhyve_parse_target(target.encode(), o, err)
    return rc, o, ffi.string(err).decode()


def test_target_restore_only_options():
    rc, o, err = parse_target("vm1,restore=/i/ckpt,ncpus=4,"
                              "memsize=5368709120")
    assert rc == 0, err
    assert (o.ncpus, o.memsize) == (4, 5 << 30)
    rc, o, err = parse_target("vm1")
    assert (o.ncpus, o.memsize) == (0, 0)


@pytest.mark.parametrize("target,why", [
    ("vm,ncpus=0", "ncpus=0"), ("vm,ncpus=1025", "ncpus=1025"),
    ("vm,memsize=0", "memsize=0"), ("vm,memsize=4097", "multiple of 4096"),
    ("vm,memsize=-4096", "memsize=-4096"), ("vm,memsize=1G", "memsize=1G"),
    ("vm,memsize=%d" % ((1 << 44) + 4096), "up to 17592186044416"),
])
def test_target_rejects_bad_restore_options(target, why):
    rc, _, err = parse_target(target)
    assert rc == -1 and why in err, err


@pytest.mark.parametrize("memsize,segs", [
    (GiB, [(0, GiB, 0)]),
    (3 * GiB, [(0, 3 * GiB, 0)]),
    (5 * GiB, [(0, 3 * GiB, 0), (4 * GiB, 2 * GiB, 3 * GiB)]),
])
def test_restore_layout_is_libvmmapis(memsize, segs):
    lay = ffi.new("struct nb_layout *")
    err = ffi.new("char[256]")
    assert lib.nb_bhyve_restore_layout(memsize, lay, err) == 0
    assert lay.total == memsize and lay.nsegs == len(segs)
    assert [(lay.seg[i].gpa, lay.seg[i].len, lay.seg[i].offset)
            for i in range(lay.nsegs)] == segs
    assert lib.nb_bhyve_restore_layout(memsize + 1, lay, err) == -1
    assert "multiple of 4096" in ffi.string(err).decode()
