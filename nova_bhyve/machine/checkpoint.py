"""Checkpoint file sets, in the shape of a bhyve checkpoint.

``bhyvectl --suspend=FILE`` writes three files and ``bhyve -r FILE``
restores them; the KVM test host backend and the migration engine's cold
mode use the same set:

- ``FILE``: guest RAM, lowmem then highmem, contiguous (sparse: pages never
  written are holes);
- ``FILE.kern``: the vCPU and device state (bhyve: kernel structs and
  device buffers; test host: its state blob, see STATE_FORMAT.md);
- ``FILE.meta``: JSON describing the other two, in the schema of
  ``nova_bhyve/native/src/vmm/CHECKPOINT.md``; the engine's checkpoint
  port (``vmm/ckpt_meta.c``) reads and writes the same, and
  ``CheckpointMeta`` here is its one definition in Python.

The meta file is written last: a set without it is incomplete.  Treat a
checkpoint as untrusted input: ``read_meta`` and ``load_ram`` check sizes
against the target before anything is copied.
"""

import dataclasses
import json
import os
import zlib

from nova_bhyve import sparse
from nova_bhyve.machine.statefile import write_text

META_VERSION = 2
MAX_META_BYTES = 8192
MAX_KERN_BYTES = 16 << 20
MAX_CPUS = 1024
MAX_MEMSIZE = 1 << 40
MAX_HIGHBASE = 1 << 48
PAGE_SIZE = 4096
OLDER_HIGHBASE = 4 << 30        # highbase of an older set that has none
STATE_FORMAT_TESTHOST = "nbvmstat/1"    # the test host's state blob
STATE_FORMAT_BHYVE = "bhyve-ckpt/1"     # the bhyve port's state blob
# kern_format, the name of state_format in this module's sets before version 2
OLDER_KERN_FORMATS = {"nb-testhost-state-1": STATE_FORMAT_TESTHOST,
                      "bhyve": STATE_FORMAT_BHYVE}


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or does not fit the target."""


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """Contents of FILE.meta (CHECKPOINT.md; ``struct nb_ckpt_meta`` in C).

    ``kern_bytes`` and ``kern_crc32`` are None only for an older set that
    recorded neither; ``version`` is that of the set read.
    """

    vmname: str             # the VM the set was taken from; may be empty
    ncpus: int
    memsize: int            # bytes of FILE: lowmem + highmem
    lowmem: int             # RAM at guest-physical 0, first in FILE
    highmem: int            # RAM at highbase, after lowmem in FILE
    highbase: int
    page_size: int          # 4096
    state_format: str       # STATE_FORMAT_TESTHOST or STATE_FORMAT_BHYVE
    kern_bytes: int | None  # size of FILE.kern
    kern_crc32: int | None  # zlib.crc32 of FILE.kern
    arch: str               # "x86_64"; empty if an older set did not say
    cpu_vendor: str         # CPU vendor of the writing host; may be empty
    version: int = META_VERSION

    def to_json(self):
        """The text of FILE.meta (version 2), byte for byte as the engine
        writes it."""
        fields = dataclasses.asdict(self)
        fields["version"] = META_VERSION
        return json.dumps(fields, indent=1, sort_keys=True,
                          ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, data):
        """Parse and check FILE.meta's bytes; raise CheckpointError."""
        return _check(_parse(data))

    def check(self):
        """Raise CheckpointError unless the fields describe a possible VM."""
        _check(self)


# name: (type, bytes or bits at most), as struct nb_ckpt_meta holds them
_FIELDS = {
    "version": (int, 32), "vmname": (str, 255), "ncpus": (int, 32),
    "memsize": (int, 64), "lowmem": (int, 64), "highmem": (int, 64),
    "highbase": (int, 64), "page_size": (int, 32), "state_format": (str, 31),
    "kern_bytes": (int, 64), "kern_crc32": (int, 32), "arch": (str, 15),
    "cpu_vendor": (str, 15), "kern_format": (str, 31),
}
_OLDER_REQUIRED = ("ncpus", "memsize", "lowmem", "highmem")


def _no_duplicates(pairs):
    names = [name for name, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise CheckpointError(f"{name} appears twice")
    return dict(pairs)


def _typed_value(name, value):
    kind, limit = _FIELDS.get(name, (None, 64))
    is_int = type(value) is int and value >= 0
    if kind is str or (kind is None and isinstance(value, str)):
        if not isinstance(value, str):
            raise CheckpointError(f"{name} is not a string")
        if kind is str and len(value.encode()) > limit:
            raise CheckpointError(f"{name} is longer than {limit} bytes")
        return value
    if not is_int:
        raise CheckpointError(f"{name} is not a non-negative integer")
    if value >= 1 << limit:
        raise CheckpointError(f"{name} is out of range")
    return value


def _parse(data):
    """FILE.meta's bytes into a CheckpointMeta, any version, unchecked."""
    if len(data) > MAX_META_BYTES:
        raise CheckpointError(f"is over {MAX_META_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"not a flat JSON object: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError("not a flat JSON object")
    raw = {name: _typed_value(name, value) for name, value in raw.items()}
    version = raw.get("version", 0)
    if "version" in raw and not 1 <= version <= META_VERSION:
        raise CheckpointError(f"has version {version}; this reader knows 1 "
                              f"to {META_VERSION}")
    names = [f.name for f in dataclasses.fields(CheckpointMeta)]
    if version == META_VERSION:
        required = names
    else:
        required = _OLDER_REQUIRED
        raw = _fill_older(raw)
    for name in required:
        if name not in raw:
            raise CheckpointError(f"lacks {name}")
    return CheckpointMeta(**{name: raw[name] for name in names})


def _fill_older(raw):
    """Defaults for a set written before version 2: by the engine (version
    1) or by this module (no version, kern_format for state_format)."""
    if ("kern_bytes" in raw) != ("kern_crc32" in raw):
        raise CheckpointError("has only one of kern_bytes and kern_crc32")
    filled = {"vmname": "", "highbase": OLDER_HIGHBASE, "page_size": PAGE_SIZE,
              "kern_bytes": None, "kern_crc32": None, "arch": "",
              "cpu_vendor": "", "state_format": STATE_FORMAT_TESTHOST,
              "version": 0}
    if "kern_format" in raw and "state_format" not in raw:
        if raw["kern_format"] not in OLDER_KERN_FORMATS:
            raise CheckpointError(f"unknown kern_format {raw['kern_format']!r}")
        filled["state_format"] = OLDER_KERN_FORMATS[raw["kern_format"]]
    filled.update(raw)
    return filled


def _check(meta):
    """The checks of every version: a VM the engine can size by it."""
    for f in dataclasses.fields(meta):
        value = getattr(meta, f.name)
        if not (value is None and f.name.startswith("kern_")):
            _typed_value(f.name, value)
    if (meta.kern_bytes is None) != (meta.kern_crc32 is None):
        raise CheckpointError("has only one of kern_bytes and kern_crc32")
    why = None
    if not 1 <= meta.ncpus <= MAX_CPUS:
        why = "ncpus is out of range"
    elif meta.page_size != PAGE_SIZE:
        why = "page_size is not 4096"
    elif meta.lowmem + meta.highmem != meta.memsize:
        why = "lowmem + highmem != memsize"
    elif meta.lowmem == 0 or meta.lowmem % PAGE_SIZE or meta.highmem % PAGE_SIZE:
        why = "lowmem or highmem is not a positive number of pages"
    elif meta.memsize > MAX_MEMSIZE:
        why = "memsize is over 1 TiB"
    elif meta.highmem and (meta.highbase < meta.lowmem or
                           meta.highbase % PAGE_SIZE or
                           meta.highbase > MAX_HIGHBASE):
        why = "highbase is below lowmem, unaligned or out of range"
    elif not meta.state_format:
        why = "state_format is empty"
    elif meta.kern_bytes is not None and not 0 < meta.kern_bytes <= MAX_KERN_BYTES:
        why = "kern_bytes out of range"
    if why:
        raise CheckpointError(why)
    return meta


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


def _copy_extents(src_fd, dst_fd, size):
    try:
        return sparse.copy_extents(src_fd, dst_fd, size)
    except sparse.ShortRead as exc:
        raise CheckpointError(f"short read while copying guest RAM: {exc}") from None


def write(files, meta, mem_fd, kern_blob):
    """Write a checkpoint set: RAM from ``mem_fd`` (lowmem, then highmem)."""
    if meta.kern_bytes != len(kern_blob):
        raise CheckpointError("kern_bytes does not match the state blob")
    if meta.kern_crc32 != crc32(kern_blob):
        raise CheckpointError("kern_crc32 does not match the state blob")
    meta.check()
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
    write_text(files.meta, meta.to_json())


def read_meta(files):
    """Return the CheckpointMeta of a complete set, checked for sanity."""
    if not files.complete():
        raise CheckpointError(f"checkpoint {files.base} is incomplete")
    with open(files.meta, "rb") as f:
        data = f.read(MAX_META_BYTES + 1)
    try:
        meta = CheckpointMeta.from_json(data)
    except CheckpointError as exc:
        raise CheckpointError(f"{files.meta}: {exc}") from None
    if os.path.getsize(files.ram) != meta.memsize:
        raise CheckpointError(f"{files.ram}: size does not match memsize")
    kern_bytes = os.path.getsize(files.kern)
    if meta.kern_bytes is None:
        if not 0 < kern_bytes <= MAX_KERN_BYTES:
            raise CheckpointError(f"{files.kern}: size out of range")
    elif kern_bytes != meta.kern_bytes:
        raise CheckpointError(f"{files.kern}: size does not match kern_bytes")
    return meta


def read_kern(files, meta):
    """Return the state blob, checked against the meta's size and CRC-32
    (an older set without them: against the size limit)."""
    with open(files.kern, "rb") as f:
        blob = f.read(MAX_KERN_BYTES + 1)
    if meta.kern_bytes is None:
        if not 0 < len(blob) <= MAX_KERN_BYTES:
            raise CheckpointError(f"{files.kern}: corrupt (size out of range)")
        return blob
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
