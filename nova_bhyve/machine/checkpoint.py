"""Checkpoint file sets, in the shape of a bhyve checkpoint.

``bhyvectl --suspend=FILE`` writes three files and ``bhyve -r FILE``
restores them; the KVM test host backend and the migration engine's cold
mode use the same set:

- ``FILE``: guest RAM, lowmem then highmem, contiguous (sparse: pages never
  written are holes);
- ``FILE.kern``: the vCPU and device state (bhyve: kernel structs and
  device buffers; test host: its state blob, see STATE_FORMAT.md);
- ``FILE.meta``: JSON describing the other two.

The meta file is written last: a set without it is incomplete.  Treat a
checkpoint as untrusted input: ``read_meta`` and ``load_ram`` check sizes
against the target before anything is copied.
"""

import dataclasses
import os
import zlib

from nova_bhyve.machine.statefile import read_json, write_json

MAX_KERN_BYTES = 16 << 20
_CHUNK = 4 << 20
SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or does not fit the target."""


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """Contents of FILE.meta."""

    vmname: str
    ncpus: int
    memsize: int
    lowmem: int
    highmem: int
    highbase: int
    page_size: int
    kern_format: str        # "nb-testhost-state-1" or "bhyve"
    kern_bytes: int
    kern_crc32: int


@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
    """Paths of one checkpoint set."""

    base: str

    @property
    def ram(self):
        """Path of the RAM file."""
        return self.base

    @property
    def kern(self):
        """Path of the state file."""
        return self.base + ".kern"

    @property
    def meta(self):
        """Path of the JSON metadata."""
        return self.base + ".meta"

    def complete(self):
        """Return True if all three files exist."""
        return all(os.path.exists(p) for p in (self.ram, self.kern, self.meta))

    def remove(self):
        """Delete the set (meta first, so a half-removed set is incomplete)."""
        for path in (self.meta, self.kern, self.ram):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _data_extents(fd, size):
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError:
            return
        if start >= size:
            return
        stop = min(os.lseek(fd, start, SEEK_HOLE), size)
        yield start, stop - start
        pos = stop


def _copy_extents(src_fd, dst_fd, size):
    copied = 0
    for off, length in _data_extents(src_fd, size):
        end = off + length
        while off < end:
            chunk = os.pread(src_fd, min(_CHUNK, end - off), off)
            if not chunk:
                raise CheckpointError("short read while copying guest RAM")
            os.pwrite(dst_fd, chunk, off)
            off += len(chunk)
            copied += len(chunk)
    return copied


def write(files, meta, mem_fd, kern_blob):
    """Write a checkpoint set: RAM from ``mem_fd`` (lowmem, then highmem)."""
    if meta.kern_bytes != len(kern_blob):
        raise CheckpointError("kern_bytes does not match the state blob")
    for path in (files.meta, files.kern, files.ram):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    fd = os.open(files.ram, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, meta.memsize)
        _copy_extents(mem_fd, fd, meta.memsize)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(files.kern, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, kern_blob)
        os.fsync(fd)
    finally:
        os.close(fd)
    write_json(files.meta, dataclasses.asdict(meta))


def read_meta(files):
    """Return the CheckpointMeta of a complete set, checked for sanity."""
    if not files.complete():
        raise CheckpointError(f"checkpoint {files.base} is incomplete")
    raw = read_json(files.meta)
    try:
        meta = CheckpointMeta(**{f.name: raw[f.name]
                                 for f in dataclasses.fields(CheckpointMeta)})
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{files.meta}: bad metadata: {exc}") from exc
    if meta.lowmem + meta.highmem != meta.memsize:
        raise CheckpointError(f"{files.meta}: lowmem + highmem != memsize")
    if not 0 < meta.kern_bytes <= MAX_KERN_BYTES:
        raise CheckpointError(f"{files.meta}: kern_bytes out of range")
    if os.path.getsize(files.ram) != meta.memsize:
        raise CheckpointError(f"{files.ram}: size does not match memsize")
    if os.path.getsize(files.kern) != meta.kern_bytes:
        raise CheckpointError(f"{files.kern}: size does not match kern_bytes")
    return meta


def read_kern(files, meta):
    """Return the state blob, checked against the meta's CRC-32."""
    with open(files.kern, "rb") as f:
        blob = f.read(MAX_KERN_BYTES + 1)
    if len(blob) != meta.kern_bytes or zlib.crc32(blob) != meta.kern_crc32:
        raise CheckpointError(f"{files.kern}: corrupt (size or CRC mismatch)")
    return blob


def load_ram(files, meta, mem_fd, mem_size):
    """Copy the RAM file into ``mem_fd`` (a zeroed guest memory of mem_size)."""
    if mem_size != meta.memsize:
        raise CheckpointError(
            f"checkpoint holds {meta.memsize} bytes of RAM, the target has "
            f"{mem_size}: the flavor changed since the suspend")
    fd = os.open(files.ram, os.O_RDONLY)
    try:
        return _copy_extents(fd, mem_fd, meta.memsize)
    finally:
        os.close(fd)


def crc32(blob):
    """CRC-32 used in FILE.meta."""
    return zlib.crc32(blob)
