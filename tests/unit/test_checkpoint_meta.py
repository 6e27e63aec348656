"""FILE.meta of a checkpoint set: the engine's C parser and writer
(vmm/ckpt_meta.c) and checkpoint.py's CheckpointMeta hold one schema.

Every case goes through both parsers, which must agree on what they accept
and on why they refuse.  The engine then moves a set written by
checkpoint.py into a set of its own, which checkpoint.py reads back (no
KVM needed: both ends are checkpoint file sets).
"""

import json
import os
import re
import zlib

import pytest
from nova_bhyve.native._engine import ffi, lib

from nova_bhyve.machine import checkpoint, statefile
from nova_bhyve.native.engine import Migration, Mode, Result, VmmFailure, VmmKind

from .conftest import memfd_with

MiB = 1 << 20
PAGE = 4096


def meta(**changes):
    """A version 2 CheckpointMeta of a 4 MiB, 2-vCPU guest."""
    fields = dict(vmname="vm1", ncpus=2, memsize=4 * MiB, lowmem=4 * MiB,
                  highmem=0, highbase=4 << 30, page_size=PAGE,
                  state_format="nbvmstat/1", kern_bytes=64, kern_crc32=7,
                  arch="x86_64", cpu_vendor="GenuineIntel")
    fields.update(changes)
    return checkpoint.CheckpointMeta(**fields)


def c_parse(data):
    """The engine's parser: (dict of the fields, None) or (None, error)."""
    out = ffi.new("struct nb_ckpt_meta *")
    err = ffi.new("char[256]")
    if lib.nb_ckpt_meta_parse(data, len(data), out, err) != 0:
        return None, ffi.string(err).decode()
    fields = {name: getattr(out, name) for name in (
        "version", "ncpus", "memsize", "lowmem", "highmem", "highbase",
        "page_size", "kern_bytes", "kern_crc32")}
    for name in ("vmname", "state_format", "arch", "cpu_vendor"):
        fields[name] = ffi.string(getattr(out, name)).decode()
    if not out.kern_recorded:
        fields["kern_bytes"] = fields["kern_crc32"] = None
    return fields, None


def py_parse(data):
    """checkpoint.py's parser, in c_parse's terms."""
    try:
        parsed = checkpoint.CheckpointMeta.from_json(data)
    except checkpoint.CheckpointError as exc:
        return None, str(exc)
    return vars(parsed), None


def c_format(m):
    """The engine's writer for CheckpointMeta ``m``: (text, error)."""
    c = ffi.new("struct nb_ckpt_meta *")
    for name, value in vars(m).items():
        if isinstance(value, str):
            getattr(c, name)[0:len(value.encode())] = value.encode()
        elif value is not None:
            setattr(c, name, value)
    c.kern_recorded = m.kern_bytes is not None
    out = ffi.new("char[]", checkpoint.MAX_META_BYTES + 1)
    n = ffi.new("size_t *")
    err = ffi.new("char[256]")
    if lib.nb_ckpt_meta_format(c, out, len(out), n, err) != 0:
        return None, ffi.string(err).decode()
    return ffi.buffer(out, n[0])[:], None


def test_both_writers_write_the_same_bytes_and_both_parsers_read_them():
    m = meta(vmname='a "quoted"\\ name\twith\x01controls')
    text = m.to_json().encode()
    assert c_format(m) == (text, None)
    assert c_parse(text) == py_parse(text) == (vars(m), None)
    assert json.loads(text)["version"] == checkpoint.META_VERSION == 2


def test_crc32_is_zlibs():
    blob = os.urandom(100_000)
    assert lib.nb_crc32_ieee(blob, len(blob)) == zlib.crc32(blob)
    assert lib.nb_crc32_ieee(b"", 0) == zlib.crc32(b"") == 0


OLDER_ENGINE = {    # what vmm_ckpt.c wrote before version 2
    "version": 1, "ncpus": 2, "memsize": 4 * MiB, "lowmem": 4 * MiB,
    "highmem": 0, "highbase": 4 << 30, "page_size": PAGE,
    "state_format": "bhyve-ckpt/1", "arch": "x86_64",
    "cpu_vendor": "AuthenticAMD"}
OLDER_PYTHON = {    # what checkpoint.py wrote before version 2
    "vmname": "vm1", "ncpus": 2, "memsize": 4 * MiB, "lowmem": 4 * MiB,
    "highmem": 0, "highbase": 4 << 30, "page_size": PAGE,
    "kern_format": "nb-testhost-state-1", "kern_bytes": 64, "kern_crc32": 7}


@pytest.mark.parametrize("raw,expect", [
    (OLDER_ENGINE, dict(version=1, vmname="", state_format="bhyve-ckpt/1",
                        kern_bytes=None, kern_crc32=None,
                        cpu_vendor="AuthenticAMD")),
    (OLDER_PYTHON, dict(version=0, arch="", cpu_vendor="")),
    ({"ncpus": 1, "memsize": MiB, "lowmem": MiB, "highmem": 0},
     dict(version=0, vmname="", ncpus=1, memsize=MiB, lowmem=MiB, arch="",
          cpu_vendor="", kern_bytes=None, kern_crc32=None)),
], ids=["engine-v1", "checkpoint.py", "minimal"])
def test_older_sets_stay_readable(raw, expect):
    text = json.dumps(raw).encode()
    want = vars(meta(**expect))
    assert c_parse(text) == py_parse(text) == (want, None)


def _v2(**changes):
    raw = json.loads(meta().to_json())
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize("text,why", [
    (b"[]", "not a flat JSON object"),
    (b"{", "not a flat JSON object"),
    (b'{"ncpus": 1} x', "not a flat JSON object"),
    (b" " * 8193, "is over 8192 bytes"),
    (_v2()[:-1] + b', "ncpus": 2}', "ncpus appears twice"),
    (_v2(ncpus=-1), "ncpus is not a non-negative integer"),
    (_v2(ncpus=1.5), "ncpus is not a non-negative integer"),
    (_v2(ncpus=True), "ncpus is not a non-negative integer"),
    (_v2(ncpus="2"), "ncpus is not a non-negative integer"),
    (_v2(ncpus=1 << 32), "ncpus is out of range"),
    (_v2(memsize=1 << 64), "memsize is out of range"),
    (_v2(vmname=7), "vmname is not a string"),
    (_v2(vmname="x" * 256), "vmname is longer than 255 bytes"),
    (_v2(extra={"a": 1}), "extra is not a non-negative integer"),
    (_v2(version=3), "has version 3; this reader knows 1 to 2"),
    (_v2(version=0), "has version 0; this reader knows 1 to 2"),
    (json.dumps({k: v for k, v in json.loads(_v2()).items()
                 if k != "kern_crc32"}).encode(), "lacks kern_crc32"),
    (json.dumps({"ncpus": 1, "memsize": MiB, "lowmem": MiB}).encode(),
     "lacks highmem"),
    (json.dumps(dict(OLDER_PYTHON, kern_format="qemu")).encode(),
     "unknown kern_format"),
    (json.dumps(dict(OLDER_ENGINE, kern_bytes=5)).encode(),
     "has only one of kern_bytes and kern_crc32"),
    (_v2(ncpus=0), "ncpus is out of range"),
    (_v2(page_size=2 * PAGE), "page_size is not 4096"),
    (_v2(highmem=PAGE), "lowmem + highmem != memsize"),
    (_v2(lowmem=4 * MiB - 1, highmem=1), "not a positive number of pages"),
    (_v2(memsize=2 << 40, lowmem=2 << 40), "memsize is over 1 TiB"),
    (_v2(lowmem=MiB, highmem=3 * MiB, highbase=PAGE), "highbase is below lowmem"),
    (_v2(state_format=""), "state_format is empty"),
    (_v2(kern_bytes=0), "kern_bytes out of range"),
    (_v2(kern_bytes=(16 << 20) + 1), "kern_bytes out of range"),
])
def test_malformed_meta_is_refused_by_both_for_the_same_reason(text, why):
    (c_fields, c_err), (py_fields, py_err) = c_parse(text), py_parse(text)
    assert c_fields is None and why in c_err, c_err
    assert py_fields is None and why in py_err, py_err


def test_unknown_members_are_ignored():
    text = _v2(added_later="x", count=3)
    assert c_parse(text) == py_parse(text) == (vars(meta()), None)


def test_the_engine_refuses_to_write_what_it_could_not_read():
    assert c_format(meta(ncpus=0)) == (None, "ncpus is out of range")
    assert "not set" in c_format(meta(kern_bytes=None, kern_crc32=None))[1]


# --------------------------------------------- engine <-> checkpoint.py


def _move(src, dst):
    """The engine moves checkpoint set ``src`` into a new set ``dst``."""
    secret = os.urandom(32)
    recv = Migration.receive(vmm_target=str(dst), vmm_kind=VmmKind.CHECKPOINT,
                             secret=secret)
    send = Migration.send(vmm_target=str(src), host="127.0.0.1", port=recv.port,
                          secret=secret, mode=Mode.COLD,
                          vmm_kind=VmmKind.CHECKPOINT)
    try:
        assert send.wait(30) and recv.wait(30), "the engine did not finish"
        return send.stats(), recv.stats()
    finally:
        send.close()
        recv.close()


def test_a_set_written_by_checkpoint_py_moves_through_the_engine_and_back(tmp_path):
    size = 8 * MiB
    writes = [(0, b"low"), (5 * MiB + 3, os.urandom(9000)), (size - PAGE, b"end")]
    blob = os.urandom(3000)
    written = meta(memsize=size, lowmem=size, kern_bytes=len(blob),
                   kern_crc32=zlib.crc32(blob))
    src = checkpoint.CheckpointFiles(str(tmp_path / "a"))
    checkpoint.write(src, written, memfd_with(size, writes), blob)

    s, d = _move(src.base, tmp_path / "b")
    assert s.result == d.result == Result.COMPLETED, (s.error, d.error)
    dst = checkpoint.CheckpointFiles(str(tmp_path / "b"))
    read = checkpoint.read_meta(dst)
    assert read == meta(memsize=size, lowmem=size, kern_bytes=len(blob),
                        kern_crc32=zlib.crc32(blob), vmname="",
                        cpu_vendor=read.cpu_vendor)
    assert checkpoint.read_kern(dst, read) == blob
    ram = memfd_with(size, [])
    checkpoint.load_ram(dst, read, ram, size)
    for off, data in writes:
        assert os.pread(ram, len(data), off) == data


def test_the_engine_refuses_a_state_file_that_does_not_match(tmp_path):
    blob = b"S" * 64
    src = checkpoint.CheckpointFiles(str(tmp_path / "a"))
    checkpoint.write(src, meta(kern_crc32=zlib.crc32(blob)), memfd_with(4 * MiB, []),
                     blob)
    with open(src.kern, "r+b") as f:
        f.write(b"T")
    s, d = _move(src.base, tmp_path / "b")
    assert s.result == Result.FAILED, s.error
    assert "is corrupt (size or CRC-32 differs" in s.error
    assert not os.path.exists(tmp_path / "b.meta")


@pytest.mark.parametrize("damage,why", [
    ("meta", "a.meta: lowmem + highmem != memsize"),
    ("ram", "the RAM file has 1048576 bytes, memsize says 4194304"),
    ("kern", "the state file has 63 bytes, not kern_bytes"),
])
def test_the_engine_refuses_to_open_a_damaged_set(tmp_path, damage, why):
    blob = b"S" * 64
    src = checkpoint.CheckpointFiles(str(tmp_path / "a"))
    checkpoint.write(src, meta(kern_crc32=zlib.crc32(blob)), memfd_with(4 * MiB, []),
                     blob)
    if damage == "meta":
        raw = json.loads(open(src.meta).read())
        statefile.write_text(src.meta, json.dumps(dict(raw, highmem=PAGE)))
    elif damage == "ram":
        os.truncate(src.ram, MiB)
    else:
        os.truncate(src.kern, 63)
    with pytest.raises(VmmFailure, match=re.escape(why)):
        _move(src.base, tmp_path / "b")
    assert not os.path.exists(tmp_path / "b.meta")


@pytest.mark.parametrize("suffix", ["", ".kern", ".kern.tmp", ".meta", ".meta.tmp"])
def test_a_destination_never_writes_through_a_planted_link(tmp_path, suffix):
    blob = b"S" * 64
    src = checkpoint.CheckpointFiles(str(tmp_path / "a"))
    checkpoint.write(src, meta(kern_crc32=zlib.crc32(blob)), memfd_with(4 * MiB, []),
                     blob)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, str(tmp_path / "b") + suffix)
    s, d = _move(src.base, tmp_path / "b")
    assert s.result == d.result == Result.COMPLETED, (s.error, d.error)
    assert victim.read_bytes() == b"keep me"
    assert checkpoint.read_kern(checkpoint.CheckpointFiles(str(tmp_path / "b")),
                                checkpoint.read_meta(
                                    checkpoint.CheckpointFiles(str(tmp_path / "b")))
                                ) == blob


@pytest.mark.parametrize("suffix", ["", ".kern", ".meta"])
def test_a_source_refuses_a_set_with_a_link_in_it(tmp_path, suffix):
    blob = b"S" * 64
    real = checkpoint.CheckpointFiles(str(tmp_path / "real"))
    checkpoint.write(real, meta(kern_crc32=zlib.crc32(blob)), memfd_with(4 * MiB, []),
                     blob)
    src = checkpoint.CheckpointFiles(str(tmp_path / "a"))
    checkpoint.write(src, meta(kern_crc32=zlib.crc32(blob)), memfd_with(4 * MiB, []),
                     blob)
    os.unlink(str(tmp_path / "a") + suffix)
    os.symlink(str(tmp_path / "real") + suffix, str(tmp_path / "a") + suffix)
    with pytest.raises(VmmFailure, match="symbolic link|not a regular file"):
        _move(src.base, tmp_path / "b")
    assert not os.path.exists(tmp_path / "b.meta")


def test_a_set_in_a_linked_directory_is_refused(tmp_path):
    blob = b"S" * 64
    (tmp_path / "d").mkdir()
    src = checkpoint.CheckpointFiles(str(tmp_path / "d" / "a"))
    checkpoint.write(src, meta(kern_crc32=zlib.crc32(blob)), memfd_with(4 * MiB, []),
                     blob)
    os.symlink(tmp_path / "d", tmp_path / "link")
    with pytest.raises(VmmFailure, match="is a symbolic link"):
        _move(str(tmp_path / "link" / "a"), tmp_path / "b")
