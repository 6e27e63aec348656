"""The engine moving a stopped guest's disks without memory: vmm port
"none" in cold mode (PROTOCOL.md, "Disks only"), as cold migration and
resize use it.  No VM runs, so these need no KVM."""

import hashlib
import os

import pytest

from nova_bhyve.native.engine import (
    AuthenticationFailed,
    InvalidRequest,
    Migration,
    Mode,
    Result,
    VmmKind,
)

from .conftest import wait_for
from .migration_helpers import FaultyProxy, new_secret, wait_both, wait_result

MiB = 1 << 20


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _disk(path, size, chunks):
    """A sparse file of ``size`` bytes with data at the given offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks:
            f.seek(offset)
            f.write(data)
    return str(path)


def _receive(secret, disks, **kw):
    kw.setdefault("timeout_ms", 20000)
    return Migration.receive(vmm_target="guest", vmm_kind=VmmKind.NONE,
                             secret=secret, disks=disks, **kw)


def _send(port, secret, disks, **kw):
    kw.setdefault("timeout_ms", 20000)
    return Migration.send(vmm_target="guest", vmm_kind=VmmKind.NONE,
                          mode=Mode.COLD, host="127.0.0.1", port=port,
                          secret=secret, disks=disks, **kw)


@pytest.fixture
def disks(tmp_path):
    """Source root, swap and ephemeral files (data, holes, a short tail)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    src = [
        _disk(tmp_path / "src" / "disk", 8 * MiB + 512,
              [(0, os.urandom(MiB)), (5 * MiB, os.urandom(4096)),
               (8 * MiB, os.urandom(512))]),
        _disk(tmp_path / "src" / "disk.swap", 4 * MiB, [(MiB, b"swap" * 9)]),
        _disk(tmp_path / "src" / "disk.eph0", 16 * MiB,
              [(15 * MiB, os.urandom(MiB))]),
    ]
    dst = [str(tmp_path / "dst" / os.path.basename(p)) for p in src]
    return src, dst


def test_a_stopped_guests_disks_move_byte_for_byte(disks):
    src, dst = disks
    before = [_sha(p) for p in src]
    secret = new_secret()
    recv = _receive(secret, dst)
    send = _send(recv.port, secret, src, channels=2)
    s, d = wait_both(send, recv)
    assert (s.result, d.result) == (Result.COMPLETED, Result.COMPLETED), \
        (s.error, d.error)
    assert s.mode == d.mode == Mode.COLD
    assert s.mem_total == 0 and s.pages_sent == 0
    assert d.disk_total == sum(os.path.getsize(p) for p in src)
    assert s.disk_digest == d.disk_digest != 0
    assert [_sha(p) for p in dst] == before == [_sha(p) for p in src]
    # holes stay holes: the 16 MiB ephemeral disk holds 1 MiB of data
    assert os.stat(dst[2]).st_blocks * 512 < 4 * MiB
    assert d.guest_runs_here and not s.guest_runs_here


def test_a_cut_mid_disk_removes_the_destinations_files_and_keeps_the_sources(
        disks, tmp_path):
    src, dst = disks
    big = _disk(tmp_path / "src" / "big", 64 * MiB, [(0, os.urandom(64 * MiB))])
    src, dst = src + [big], dst + [str(tmp_path / "dst" / "big")]
    before = [_sha(p) for p in src]
    secret = new_secret()
    recv = _receive(secret, dst)
    proxy = FaultyProxy(recv.port)
    send = _send(proxy.port, secret, src, channels=1, compress="off",
                 max_bandwidth=8 * MiB)
    wait_for(lambda: send.stats().disk_blocks > 500, timeout=60,
             what="disk blocks on the wire")
    assert all(os.path.exists(p) for p in dst)
    proxy.cut()
    s, d = wait_result(send), wait_result(recv)
    proxy.close()
    assert s.result == Result.FAILED and d.result == Result.FAILED
    assert not s.committed and not d.guest_runs_here
    send.close()
    recv.close()
    assert [p for p in dst if os.path.exists(p)] == []
    assert [_sha(p) for p in src] == before


def test_a_destination_without_the_secret_gets_nothing(disks):
    src, dst = disks
    recv = _receive(new_secret(), dst, timeout_ms=3000)
    send = _send(recv.port, new_secret(), src)
    s = wait_result(send)
    assert s.result == Result.FAILED
    assert isinstance(s.exception, AuthenticationFailed), s.error
    recv.cancel()
    wait_result(recv)
    send.close()
    recv.close()
    assert [p for p in dst if os.path.exists(p)] == []


def test_a_stopped_guest_moves_in_cold_mode_only(disks):
    src, _dst = disks
    with pytest.raises(InvalidRequest, match="cold mode only"):
        Migration.send(vmm_target="guest", vmm_kind=VmmKind.NONE,
                       mode=Mode.LIVE, host="127.0.0.1", port=9,
                       secret=new_secret(), disks=src)


def test_a_running_guest_cannot_take_a_stopped_guests_disks(disks, tmp_path):
    """A destination expecting memory (a checkpoint) refuses a source with
    none: the state formats differ."""
    src, dst = disks
    secret = new_secret()
    recv = Migration.receive(vmm_target=str(tmp_path / "dst" / "ckpt"),
                             vmm_kind=VmmKind.CHECKPOINT, secret=secret,
                             disks=dst, timeout_ms=20000)
    send = _send(recv.port, secret, src)
    s, d = wait_both(send, recv)
    assert s.result == Result.FAILED and d.result == Result.FAILED
    why = "the source's preamble does not describe a guest this host can hold"
    assert d.error == why and s.error == f"peer refused: {why}"
    assert [p for p in dst if os.path.exists(p)] == []
