"""A guest's zvols moving with it through the engine, end to end on Linux:
nova-compute's half (machine/zvolmove.py) and the privileged helper's
(privsep_zfs.py, run in this process) around a stand-in for zfs(8), the
engine between two test-host VMs.  Only the zfs program is not FreeBSD's:
the FIFOs, the order both sides open them in, the notify byte starting
the final snapshot, the verdicts and the cleanup are the driver's own."""

import os
import sys

import pytest

from nova_bhyve import privsep
from nova_bhyve.machine import zvolmove
from nova_bhyve.native.engine import Result
from tests.unit.test_zvolmove import FAKE_ZFS

from .conftest import needs_kvm
from .migration_helpers import (
    assert_guest_continued,
    assert_guest_kept_running,
    new_secret,
    start_receive,
    start_send,
    stress_ready,
    wait_both,
)

pytestmark = needs_kvm

SRC_UUID = "7d1e0b7c-2f3a-4b5c-8d9e-0a1b2c3d4e5f"   # the two hosts' records
DST_UUID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"   # (one machine here)
TAG = "mig-0123456789ab"
DATASET = "zroot/nova"
# the stand-in also records the source VM's state when the final
# snapshot is taken
STATE_AT_SNAPSHOT = r"""
case "$*" in
"snapshot "*"-2") "$ZFAKE_PY" -c 'import sys
from nova_bhyve.testhost.client import ControlClient
with ControlClient(sys.argv[1]) as c:
    print(c.status()["state"])' "$ZFAKE_VM" >> "$ZFAKE/state-at-final-snapshot" ;;
esac
"""


@pytest.fixture
def zfs_hosts(vms, monkeypatch):
    base = vms.base
    fake = os.path.join(base, "fake")
    os.mkdir(fake)
    zfs = os.path.join(base, "zfs")
    with open(zfs, "w") as f:
        f.write(FAKE_ZFS.replace("verb=$1", STATE_AT_SNAPSHOT + "verb=$1"))
    os.chmod(zfs, 0o755)
    for uuid in (SRC_UUID, DST_UUID):
        os.makedirs(os.path.join(base, "run", uuid))
    monkeypatch.setenv("ZFAKE", fake)
    monkeypatch.setenv("ZFAKE_PY", sys.executable)
    monkeypatch.setattr(privsep.bhyve_pctxt, "client_mode", False)
    conf = privsep.CONF
    conf.set_override("zfs_path", zfs, group="bhyve")
    conf.set_override("runtime_path", os.path.join(base, "run"), group="bhyve")
    conf.set_override("zfs_dataset", DATASET, group="bhyve")
    yield fake
    for opt in ("zfs_path", "runtime_path", "zfs_dataset"):
        conf.clear_override(opt, group="bhyve")


def _zvol(uuid):
    return f"{DATASET}/{uuid}-disk0"


def _snapshot(fake, n, size):
    data = os.urandom(size)
    with open(os.path.join(fake, f"{_zvol(SRC_UUID)}@{TAG}-{n}".replace("/", "_")),
              "wb") as f:
        f.write(data)
    return data


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _migrate(vms, fake, monkeypatch, limits=None):
    full, increment = _snapshot(fake, 1, 3 << 20), _snapshot(fake, 2, 500_000)
    src = vms.start("src", cmdline="mode=stress pattern=touch ws=16M")
    dst = vms.start("dst", incoming=True)
    stress_ready(src)
    monkeypatch.setenv("ZFAKE_VM", str(src.socket_path))
    run = os.path.join(vms.base, "run")
    into = zvolmove.ZvolStreams(os.path.join(run, DST_UUID), DST_UUID, TAG,
                                {"disk": _zvol(DST_UUID)}, "receive", limits)
    out = zvolmove.ZvolStreams(os.path.join(run, SRC_UUID), SRC_UUID, TAG,
                               {"disk": _zvol(SRC_UUID)}, "send")
    secret = new_secret()
    recv = start_receive(dst, secret, streams=into.open())
    into.release()
    send = start_send(src, recv.port, secret, streams=out.open(),
                      max_downtime_ms=100)
    out.release()
    s, d = wait_both(send, recv, timeout=120)
    return src, dst, out, into, s, d, full, increment


def test_the_zvols_move_whole_with_the_guests_writes_after_the_pause(
        vms, zfs_hosts, monkeypatch):
    fake = zfs_hosts
    src, dst, out, into, s, d, full, increment = _migrate(vms, fake, monkeypatch)
    assert s.result == Result.COMPLETED, s.error
    assert d.result == Result.COMPLETED, d.error
    assert _read(os.path.join(fake, "recv-0")) == full
    assert _read(os.path.join(fake, "recv-1")) == increment
    assert s.stream_bytes == d.stream_bytes == len(full) + len(increment)
    # the final snapshot was taken with the guest paused, the first one
    # while it ran (before the engine started)
    assert _read(os.path.join(fake, "state-at-final-snapshot")) == b"paused\n"
    out.finish(committed=True)
    into.finish(committed=True)
    log = _read(os.path.join(fake, "log")).decode().splitlines()
    assert sorted(line for line in log if line.startswith("destroy")) == sorted(
        f"destroy -r {_zvol(u)}@{TAG}-{n}" for u in (SRC_UUID, DST_UUID)
        for n in (1, 2))
    assert not os.path.exists(out.dir) and not os.path.exists(into.dir)
    assert src.stop() == 1
    assert_guest_continued(src, dst)


def test_a_failed_zfs_receive_leaves_the_guest_and_its_zvol_on_the_source(
        vms, zfs_hosts, monkeypatch):
    fake = zfs_hosts
    open(os.path.join(fake, "fail-receive"), "w").close()
    src, dst, out, into, s, d, _, _ = _migrate(vms, fake, monkeypatch)
    assert s.result == Result.FAILED and d.result == Result.FAILED
    assert "receive -o exited 1: cannot receive: injected" in d.error, d.error
    assert not s.committed and not d.committed and s.guest_runs_here
    assert_guest_kept_running(src, dst)
    out.finish(committed=False)
    into.finish(committed=False)
    log = _read(os.path.join(fake, "log")).decode().splitlines()
    destroyed = [line for line in log if line.startswith("destroy")]
    # the destination's received zvol goes; the source's stays (its
    # snapshots go)
    assert f"destroy -r {_zvol(DST_UUID)}" in destroyed
    assert not any(line == f"destroy -r {_zvol(SRC_UUID)}" for line in destroyed)
    assert f"destroy -r {_zvol(SRC_UUID)}@{TAG}-1" in destroyed


def test_a_received_zvol_larger_than_the_flavor_fails_before_the_commit(
        vms, zfs_hosts, monkeypatch):
    fake = zfs_hosts
    # the stream makes a 2 GiB zvol where the flavor allows 1 GiB
    with open(os.path.join(fake, "volsize"), "w") as f:
        f.write(f"{2 << 30}\n")
    src, dst, out, into, s, d, _, _ = _migrate(vms, fake, monkeypatch,
                                               limits={"disk": 1 << 30})
    assert s.result == Result.FAILED and d.result == Result.FAILED
    assert (f"the received zvol {_zvol(DST_UUID)} is {2 << 30} bytes, more "
            f"than the {1 << 30} its flavor allows") in d.error, d.error
    assert not s.committed and not d.committed and s.guest_runs_here
    assert_guest_kept_running(src, dst)
    out.finish(committed=False)
    into.finish(committed=False)
    log = _read(os.path.join(fake, "log")).decode().splitlines()
    assert f"destroy -r {_zvol(DST_UUID)}" in log
    assert f"destroy -r {_zvol(SRC_UUID)}" not in log
