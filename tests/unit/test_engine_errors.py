"""Typed engine errors: each failure kind reaches Python as its own class."""

import os
import socket

import pytest

from nova_bhyve import polling
from nova_bhyve.native import engine
from nova_bhyve.native.engine import (
    ErrorKind,
    IncompatibleHosts,
    InvalidRequest,
    Migration,
    MigrationError,
    Result,
    VmmKind,
)

from .test_engine_codec import BASE, _with


def _wait(mig, timeout=10.0):
    polling.poll(lambda: mig.stats().finished, timeout)
    return mig.stats()


def test_every_kind_has_its_class():
    for kind in ErrorKind:
        if kind == ErrorKind.NONE:
            continue
        exc = engine.error_for(kind, "why")
        assert isinstance(exc, MigrationError)
        assert exc.kind == kind and str(exc) == "why"


def test_incompatible_preambles_raise_incompatible_hosts():
    with pytest.raises(IncompatibleHosts, match="ncpus"):
        engine.spec_check(BASE, _with(ncpus="4"))


def test_bad_parameters_raise_invalid_request(tmp_path):
    with pytest.raises(InvalidRequest, match="secret"):
        Migration.receive(vmm_target=str(tmp_path / "ck"), secret=b"short",
                          vmm_kind=VmmKind.CHECKPOINT)


def test_a_source_that_never_comes_times_out(tmp_path):
    recv = Migration.receive(vmm_target=str(tmp_path / "ck"),
                             secret=os.urandom(32), timeout_ms=200,
                             vmm_kind=VmmKind.CHECKPOINT)
    st = _wait(recv)
    recv.close()
    assert st.result == Result.FAILED
    assert st.error_kind == ErrorKind.TIMEOUT
    assert isinstance(st.exception, engine.MigrationTimedOut)


def test_cancel_is_typed_and_a_second_cancel_is_refused(tmp_path):
    recv = Migration.receive(vmm_target=str(tmp_path / "ck"),
                             secret=os.urandom(32),
                             vmm_kind=VmmKind.CHECKPOINT)
    recv.cancel()
    st = _wait(recv)
    assert st.result == Result.CANCELLED
    assert st.error_kind == ErrorKind.CANCELLED
    with pytest.raises(InvalidRequest, match="already ended"):
        recv.cancel()
    recv.close()


def test_a_client_without_the_secret_is_an_authentication_failure(tmp_path):
    recv = Migration.receive(vmm_target=str(tmp_path / "ck"),
                             secret=os.urandom(32), timeout_ms=500,
                             vmm_kind=VmmKind.CHECKPOINT)
    with socket.create_connection(("127.0.0.1", recv.port)) as c:
        c.sendall(b"\0" * 64)       # not a HELLO
        c.settimeout(5)
        try:
            while c.recv(4096):
                pass
        except OSError:
            pass
    st = _wait(recv)
    recv.close()
    assert st.result == Result.FAILED
    assert st.error_kind in (ErrorKind.AUTH, ErrorKind.CORRUPT), st
