"""Build hooks: compile the migration engine (cffi), the KVM test host and
the guest payload at install."""

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE_DIRS = [
    os.path.join("nova_bhyve", "testhost", "src"),
    os.path.join("nova_bhyve", "testhost", "guest"),
]


class BuildWithNative(build_py):
    """Run the native makefiles before collecting package data.

    The test host is a Linux KVM program (GNU make, <linux/kvm.h>): a
    FreeBSD compute host runs bhyve and installs without it.
    """

    def run(self):
        if sys.platform.startswith("linux"):
            for rel in NATIVE_DIRS:
                subprocess.check_call(["make", "-C", os.path.join(HERE, rel)])
        else:
            print(f"not building the KVM test host on {sys.platform}",
                  file=sys.stderr)
        super().run()


class BinaryDistribution(Distribution):
    """The wheel carries compiled programs: it is platform specific."""

    def has_ext_modules(self):
        return True


setup(
    cmdclass={"build_py": BuildWithNative},
    distclass=BinaryDistribution,
    cffi_modules=["nova_bhyve/native/build_engine.py:ffibuilder"],
)
