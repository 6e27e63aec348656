"""cffi (API mode) build of the migration engine: nova_bhyve.native._engine.

Compiled at install by setup.py (``cffi_modules``).  The C declarations
come from ``src/engine.h`` itself, so the header stays the one source of
truth for the Python binding.
"""

import pathlib
import re
import sys

import cffi

HERE = pathlib.Path(__file__).resolve().parent
SRC = HERE / "src"

SOURCES = ["engine.c", "source.c", "dest.c", "protocol.c", "codec.c",
           "vmm_common.c", "vmm_testhost.c", "vmm_ckpt.c", "vmm_bhyve.c",
           "bhyve_meta.c", "bhyve_ckpt.c", "bhyve_restore.c",
           "bhyve_msg.c"]


def _cdef_from_header(text):
    """Turn engine.h into cffi cdef text (drop preprocessor lines)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            match = re.match(r"#define\s+(NB_[A-Z_]+)\s+(\d+)\s*$", line)
            if match:
                out.append(f"#define {match.group(1)} {match.group(2)}")
            continue
        out.append(line)
    return "\n".join(out)


ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef_from_header((SRC / "engine.h").read_text()))
_extra = (SRC / "bhyve_msg.cdef")
if _extra.exists():
    ffibuilder.cdef(_extra.read_text())
ffibuilder.set_source(
    "nova_bhyve.native._engine",
    '#include "engine.h"\n' + ('#include "bhyve_msg.h"\n'
                               if (SRC / "bhyve_msg.h").exists() else ""),
    sources=[str(SRC / name) for name in SOURCES if (SRC / name).exists()],
    include_dirs=[str(SRC)],
    libraries=["crypto", "zstd"],
    extra_compile_args=["-O2", "-std=gnu11", "-pthread", "-Wall",
                        "-Wno-unused-parameter", "-Wno-format-truncation"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".",
                       verbose=True)
