"""Locate the compiled test host binary and guest payload."""

import os
import pathlib
import struct

from nova_bhyve.testhost.errors import TestHostError

_HERE = pathlib.Path(__file__).resolve().parent


def _find(env_var, default, what):
    path = pathlib.Path(os.environ.get(env_var) or default)
    if not path.is_file():
        raise TestHostError(
            "ENOENT",
            f"{what} not found at {path}: reinstall the package (it is "
            f"compiled at install) or set {env_var}")
    return path


def testhost_binary():
    """Return the path of the nb-testhost executable."""
    return _find("NOVA_BHYVE_TESTHOST_BIN", _HERE / "bin" / "nb-testhost",
                 "the KVM test host binary")


def guest_kernel():
    """Return the path of the multiboot guest payload (guest.elf)."""
    return _find("NOVA_BHYVE_GUEST_KERNEL", _HERE / "guest" / "guest.elf",
                 "the guest payload kernel")


def kvm_available():
    """Return (ok, reason): whether /dev/kvm can be opened read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, "/dev/kvm does not exist (no KVM on this machine)"
    except PermissionError:
        return False, "/dev/kvm is not accessible (run as root or join the kvm group)"
    os.close(fd)
    return True, ""


def kernel_image_range(path):
    """Return (start, end) guest-physical bytes a multiboot ELF32 image occupies."""
    data = pathlib.Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 1:
        raise TestHostError("EINVAL", f"{path} is not an ELF32 file")
    phoff, = struct.unpack_from("<I", data, 28)
    phentsize, phnum = struct.unpack_from("<HH", data, 42)
    start, end = None, None
    for i in range(phnum):
        p_type, _off, _vaddr, paddr, _filesz, memsz = struct.unpack_from(
            "<IIIIII", data, phoff + i * phentsize)
        if p_type == 1 and memsz:
            start = paddr if start is None else min(start, paddr)
            end = paddr + memsz if end is None else max(end, paddr + memsz)
    if start is None:
        raise TestHostError("EINVAL", f"{path} has no loadable segment")
    return start, end
