"""Fixtures shared by the unit tests."""

import functools
import importlib.util
import pathlib
import tempfile

NATIVE = pathlib.Path(__file__).resolve().parents[2] / "nova_bhyve" / "native"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def native_build():
    """The source tree's build_engine.py (source lists, test build)."""
    return _load("_nb_build_engine", NATIVE / "build_engine.py")


@functools.lru_cache(maxsize=None)
def selftest_module():
    """The test build of the page codecs and src/test/'s shims: (ffi, lib)."""
    name = "_nb_engine_selftest"
    builder = native_build().selftest_builder(name)
    path = builder.compile(tmpdir=tempfile.mkdtemp(prefix="nb-selftest-"))
    module = _load(name, path)
    return module.ffi, module.lib
