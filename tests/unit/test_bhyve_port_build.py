"""The bhyve vmm port's build: its portable files compile warning-free
as C11, vmm_bhyve.c compiles on Linux and refuses to open, and the
shipped .cdef, the header and the engine's build agree."""

import os
import subprocess

import pytest

from .conftest import native_build
from .test_bhyve_port import COMMON, PORTABLE, SRC, c_functions, read_src


def cc(*args, cwd=None):
    return subprocess.run(["cc", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", PORTABLE)
def test_portable_sources_build_warning_free_as_c11(name, tmp_path):
    r = cc("-std=c11", "-O2", "-Wall", "-Wextra", "-Wpedantic", "-Werror",
           "-I", SRC, "-c", os.path.join(SRC, name), "-o",
           str(tmp_path / "x.o"))
    assert r.returncode == 0, r.stderr


def test_vmm_bhyve_builds_on_linux_and_refuses_to_open(tmp_path):
    src = os.path.join(SRC, "vmm", "vmm_bhyve.c")
    r = cc("-std=gnu11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
           "-I", SRC, src)
    assert r.returncode == 0, r.stderr
    main = tmp_path / "main.c"
    main.write_text('#include <stdio.h>\n#include "vmm/vmm.h"\nint main(void) {'
                    ' struct nb_vmm v; char err[NB_ERRLEN] = "";'
                    ' int rc = nb_vmm_open_bhyve(&v, "vm1,pid=1", err);'
                    ' printf("%d|%s\\n", rc, err); return 0; }\n')
    exe = tmp_path / "open_bhyve"
    # vmm_common.c needs -Wno-format-truncation, as in the engine's build
    r = cc("-std=gnu11", "-Wall", "-Werror", "-Wno-format-truncation",
           "-I", SRC, str(main), src,
           *[os.path.join(SRC, n) for n in PORTABLE + (COMMON,)],
           "-o", str(exe))
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True,
                         timeout=30).stdout
    assert out == "-1|the bhyve vmm port is only available on FreeBSD\n"


def test_cdef_matches_what_the_engine_build_compiles():
    """bhyve.cdef joins the engine's cdef, whose build compiles the
    portable files: it may only name functions defined there, and
    build_engine.py must compile them.  The header declares exactly the
    functions the portable files define."""
    declared = c_functions(read_src("vmm/bhyve/bhyve.cdef"))
    assert "nb_bhyve_checkpoint_msg" in declared
    build = native_build()
    compiled = build.layer_sources(*build.LAYERS)
    defined = set()
    for name in PORTABLE:
        defined |= c_functions(read_src(name))
        assert os.path.join(SRC, name) in compiled
    assert declared <= defined
    assert c_functions(read_src("vmm/bhyve/bhyve.h")) == defined
