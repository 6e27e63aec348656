"""Stream disks at the engine's boundary (PROTOCOL.md, "Streams"): the
preamble's `streams` count and the descriptors a caller must give."""

import fcntl
import os

import pytest

from nova_bhyve.native.engine import (
    InvalidRequest,
    Migration,
    MigrationError,
    Stream,
    spec_check,
)

from .test_engine_codec import BASE


def test_a_peer_without_streams_is_refused_not_ignored():
    # an engine that predates streams writes no `streams` line (read as 0)
    one = BASE + "streams=1\n"
    spec_check(one, one)
    spec_check(BASE, BASE + "streams=0\n")
    with pytest.raises(MigrationError,
                       match="streams is 1 on the source and 0 on the destination"):
        spec_check(one, BASE)
    with pytest.raises(MigrationError,
                       match="streams is 0 on the source and 2 on the destination"):
        spec_check(BASE, BASE + "streams=2\n")


def _is_open(fd):
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def test_a_closed_stream_descriptor_is_refused_before_anything_runs(tmp_path):
    r, w = os.pipe()
    os.close(w)
    closed = next(n for n in range(1000, 1024) if not _is_open(n))
    with pytest.raises(InvalidRequest, match="stream 0: status descriptor"):
        Migration.receive(vmm_target=str(tmp_path / "none"), secret=b"s" * 32,
                          streams=[Stream(first=r, final=r, status=closed)])
    os.close(r)


def test_a_sending_stream_needs_its_notify_descriptor(tmp_path):
    r, w = os.pipe()
    with pytest.raises(InvalidRequest, match="stream 0: notify descriptor -1"):
        Migration.send(vmm_target=str(tmp_path / "none"), host="127.0.0.1",
                       port=9, secret=b"s" * 32,
                       streams=[Stream(first=r, final=r, status=r)])
    os.close(r)
    os.close(w)
