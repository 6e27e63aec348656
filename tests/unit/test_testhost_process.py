"""Unit tests of how TestHostVM.start builds the nb-testhost command line."""

import pytest

from nova_bhyve.testhost.errors import TestHostError
from nova_bhyve.testhost.process import TestHostVM


@pytest.fixture
def recording_binary(tmp_path, monkeypatch):
    """A stand-in nb-testhost that records its arguments and exits 4."""
    record = tmp_path / "argv"
    script = tmp_path / "nb-testhost"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nexit 4\n')
    script.chmod(0o755)
    monkeypatch.setenv("NOVA_BHYVE_TESTHOST_BIN", str(script))
    monkeypatch.setenv("NOVA_BHYVE_GUEST_KERNEL", str(script))
    return record


def _argv(record, **kwargs):
    with pytest.raises(TestHostError) as err:
        TestHostVM.start("vm", record.parent / "run", "64M", timeout=10,
                         **kwargs)
    assert err.value.code == "ECHILD"       # the stand-in exited at once
    return record.read_text().splitlines()


def test_start_passes_the_disk_path(recording_binary, tmp_path):
    argv = _argv(recording_binary, incoming=True, disk=tmp_path / "d.img")
    assert argv[argv.index("--disk") + 1] == str(tmp_path / "d.img")
    assert "--incoming" in argv


def test_start_without_a_disk_passes_no_disk_option(recording_binary):
    assert "--disk" not in _argv(recording_binary, cmdline="disk=1")
