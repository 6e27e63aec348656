"""Locate the compiled test host binary and guest payload."""

import os
import pathlib

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
