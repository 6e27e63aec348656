"""cffi (API mode) build of the migration engine: nova_bhyve.native._engine.

Compiled at install by setup.py (``cffi_modules``).  The C declarations
come from ``src/engine.h`` itself, so the header stays the one source of
truth for the Python binding.  Sources are collected by layer folder
(``LAYERS``); ``src/test/`` holds test-only shims, compiled only by
``selftest_builder`` into the unit tests' own module.
"""

import pathlib
import re
import sys

import cffi

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE / "src"

# Layers, lowest first: the engine core drives the wire protocol and a vmm
# port; the bhyve port's portable helpers sit under vmm/bhyve/.
LAYERS = ("core", "wire", "vmm", "vmm/bhyve")
BHYVE_CDEF = SRC / "vmm" / "bhyve" / "bhyve.cdef"
CKPT_META_H = SRC / "vmm" / "ckpt_meta.h"    # checkpoint .meta, for the tests
COMPILE_ARGS = ["-O2", "-std=gnu11", "-pthread", "-Wall",
                "-Wno-unused-parameter", "-Wno-format-truncation"]


def layer_sources(*layers):
    """The C files of the given layer folders (not their subfolders)."""
    return [str(p) for layer in layers for p in sorted((SRC / layer).glob("*.c"))]


def _cdef_from_header(text):
    """Turn a header into cffi cdef text (drop preprocessor lines)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            match = re.match(r"#define\s+(NB_[A-Z_]+)\s+(\d+)\s*$", line)
            if match:
                out.append(f"#define {match.group(1)} {match.group(2)}")
            continue
        out.append(line)
    return "\n".join(out)


def selftest_builder(module_name="_nb_engine_selftest"):
    """An FFI for the test build: codecs, the cipher, phase tables, shims."""
    builder = cffi.FFI()
    builder.cdef(_cdef_from_header((SRC / "test" / "selftest.h").read_text()))
    builder.set_source(
        module_name, '#include "test/selftest.h"\n',
        sources=[str(SRC / "core" / "codec.c"), str(SRC / "core" / "adapt.c"),
                 str(SRC / "core" / "converge.c"), str(SRC / "core" / "transitions.c"),
                 str(SRC / "wire" / "crc32c.c"), str(SRC / "wire" / "gcm.c"),
                 *layer_sources("test")],
        include_dirs=[str(SRC)], libraries=["crypto"],
        extra_compile_args=COMPILE_ARGS, extra_link_args=["-pthread"])
    return builder


ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef_from_header((SRC / "engine.h").read_text()))
ffibuilder.cdef(BHYVE_CDEF.read_text())
ffibuilder.cdef(_cdef_from_header(CKPT_META_H.read_text()))
ffibuilder.set_source(
    "nova_bhyve.native._engine",
    '#include "engine.h"\n#include "vmm/bhyve/bhyve.h"\n'
    '#include "vmm/ckpt_meta.h"\n',
    sources=layer_sources(*LAYERS),
    include_dirs=[str(SRC)],
    libraries=["crypto", "zstd"],
    extra_compile_args=COMPILE_ARGS,
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".",
                       verbose=True)
