"""The engine moving a guest's disk with its memory, in one session: the
guest writes both while pre-copy runs (PROTOCOL.md, "Disk records")."""

import hashlib
import os
import signal

import pytest

from nova_bhyve.native.engine import InvalidRequest, Mode, Result
from nova_bhyve.testhost.console import parse_console

from .conftest import needs_kvm, reads_no_dirty_log, wait_for
from .migration_helpers import (
    TO_DEST,
    FaultyProxy,
    RawSource,
    assert_guest_continued,
    assert_guest_kept_running,
    new_secret,
    preamble_for,
    receiver_with_secret,
    start_receive,
    start_send,
    stress_ready,
    wait_both,
    wait_result,
)

pytestmark = needs_kvm
# every test once per dirty log the source offers (conftest.VMFactory)
DIRTY_LOGS = ("ranged", "whole")

MiB = 1 << 20
DISK = 4 * MiB
REGION_BLOCKS = 16
# memory and disk at once: the touch writer over 16 MiB, the disk writer
# over the first 16 blocks (64 KiB) of a 4 MiB disk (a few blocks a
# second where the host is busy)
CMDLINE = (f"mode=stress pattern=touch ws=16M disk=1 "
           f"disksize={REGION_BLOCKS * 4}K")
COMMIT = 12


def _disk_file(vms, name, size=DISK, data=None):
    path = f"{vms.base}/{name}"
    with open(path, "wb") as f:
        f.truncate(size)
        if data:
            f.write(data)
    return path


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _disk_passes(vm):
    report = parse_console(vm.console_text())
    return report.heartbeats[-1].disk_passes if report.heartbeats else 0


def _wait_disk_passes(vm, count, timeout=60):
    wait_for(lambda: _disk_passes(vm) >= count, timeout=timeout,
             what=f"{count} disk passes on {vm.name}")


def test_live_migration_moves_memory_and_disk_together(vms):
    src_disk, dst_disk = _disk_file(vms, "src.img"), _disk_file(vms, "dst.img")
    src = vms.start("src", cmdline=CMDLINE, disk=src_disk)
    dst = vms.start("dst", incoming=True, disk=dst_disk)
    stress_ready(src)
    _wait_disk_passes(src, 2)
    secret = new_secret()
    recv = start_receive(dst, secret, disks=[dst_disk])
    proxy = FaultyProxy(recv.port, frames=True)
    sums = {}

    def at_commit(frame):
        # the source is paused for good, the destination holds the final
        # round on stable storage: neither file changes until COMMIT
        sums["src"], sums["dst"] = _sha(src_disk), _sha(dst_disk)
        return frame

    proxy.on_frame(0, TO_DEST, COMMIT, at_commit)
    # a slow link: round 0 (16 MiB of raw pages) takes seconds, and the
    # guest's disk writer rewrites blocks of its region meanwhile
    send = start_send(src, proxy.port, secret, disks=[src_disk],
                      max_downtime_ms=100, max_bandwidth=4 * MiB,
                      compress="off")
    s, d = wait_both(send, recv, proxy, timeout=120)

    assert s.result == Result.COMPLETED, s.error
    assert d.result == Result.COMPLETED, d.error
    assert s.digest == d.digest != 0
    assert s.disk_digest == d.disk_digest != 0
    assert s.disk_total == d.disk_total == DISK
    assert s.disk_bytes > 0 and s.disk_blocks > 0 and d.disk_blocks > 0
    assert s.rounds[0].blocks > 0
    # the guest kept writing its disk while pre-copy ran: later rounds
    # resent the blocks it wrote
    assert sum(r.blocks for r in s.rounds[1:]) >= 2, s.rounds
    assert src.client.status()["state"] == "paused"
    assert src.stop() == 1          # the source VM is gone
    assert _sha(src_disk) == sums["src"] == sums["dst"]
    assert_guest_continued(src, dst)
    # the disk writer's re-reads cover every block of its region on the
    # destination: a lost or stale block would print FAIL diskold
    _wait_disk_passes(dst, _disk_passes(src) + 2)
    report = parse_console(src.console_text() + dst.console_text())
    assert report.errors == 0 and report.fails == [], report.fails
    assert report.sequence_breaks() == []


def test_a_detached_disk_goes_whole_in_round_0_beside_the_attached_one(vms):
    # a swap or ephemeral file the VM does not have open: no dirty-block
    # log to read, nothing writes it; round 0 must carry all of its data
    src_disk, dst_disk = _disk_file(vms, "src.img"), _disk_file(vms, "dst.img")
    extra = os.urandom(256 * 1024)
    src_extra = _disk_file(vms, "src.swap", 2 * MiB)
    with open(src_extra, "r+b") as f:
        f.seek(MiB)
        f.write(extra)
    dst_extra = f"{vms.base}/dst.swap"              # the engine creates it
    src = vms.start("src", cmdline=CMDLINE, disk=src_disk)
    dst = vms.start("dst", incoming=True, disk=dst_disk)
    stress_ready(src)
    _wait_disk_passes(src, 1)
    secret = new_secret()
    recv = start_receive(dst, secret, disks=[dst_disk, dst_extra])
    send = start_send(src, recv.port, secret, disks=[src_disk, src_extra],
                      detached_disks=[src_extra], max_downtime_ms=100,
                      max_bandwidth=8 * MiB, compress="off")
    s, d = wait_both(send, recv, timeout=120)
    assert s.result == Result.COMPLETED, s.error
    assert d.result == Result.COMPLETED, d.error
    assert s.disk_digest == d.disk_digest != 0
    assert s.disk_total == d.disk_total == DISK + 2 * MiB
    assert src.stop() == 1
    # the guest, running on the destination, writes its attached disk
    # (the digests compared that one); nothing writes the detached one
    assert _sha(src_extra) == _sha(dst_extra)
    assert_guest_continued(src, dst)


def test_a_detached_disk_beyond_the_disks_given_is_refused(vms):
    src_disk = _disk_file(vms, "src.img")
    src = vms.start("src", cmdline=CMDLINE, disk=src_disk)
    with pytest.raises(InvalidRequest, match="not one of the disks"):
        start_send(src, 1, new_secret(), disks=[src_disk],
                   detached_disks=[f"{vms.base}/other"])


@reads_no_dirty_log
def test_warm_migration_with_full_verification_reads_the_disks_back(vms):
    # a disk whose size is not a whole number of blocks: its last block
    # is short; verify=full digests both files as they are after the copy
    size = DISK + 512
    src_disk, dst_disk = (_disk_file(vms, "src.img", size),
                          _disk_file(vms, "dst.img", size))
    with open(dst_disk, "r+b") as f:
        f.write(os.urandom(DISK))           # stale content to overwrite
    src = vms.start("src", cmdline=CMDLINE, disk=src_disk)
    dst = vms.start("dst", incoming=True, disk=dst_disk)
    stress_ready(src)
    _wait_disk_passes(src, 1)
    secret = new_secret()
    recv = start_receive(dst, secret, disks=[dst_disk], verify="full")
    send = start_send(src, recv.port, secret, disks=[src_disk], mode=Mode.WARM,
                      verify="full")
    s, d = wait_both(send, recv)
    assert s.result == Result.COMPLETED, s.error
    assert d.result == Result.COMPLETED, d.error
    assert s.disk_digest == d.disk_digest != 0
    assert len(s.rounds) == 1 and s.disk_total == size
    assert src.stop() == 1
    # the destination's stale bytes are gone (the guest, running there
    # now, writes only its region, which the digests compared)
    region = REGION_BLOCKS * 4096
    with open(dst_disk, "rb") as f:
        assert os.fstat(f.fileno()).st_size == size
        f.seek(region)
        assert f.read() == bytes(size - region)
    assert_guest_continued(src, dst)


def _patchwork(size):
    """A disk image's bytes beyond the writer's region: holes, random data
    longer than a direct-write run (1 MiB), zero blocks written out
    inside the data, compressible text, and a short last block."""
    data = bytearray(size)
    data[1 * MiB:3 * MiB + 512 * 1024] = os.urandom(5 * MiB // 2)
    data[3 * MiB + 512 * 1024:3 * MiB + 520 * 1024] = bytes(8 * 1024)
    text = b"".join(b"line %06d of a text file\n" % i for i in range(60000))
    data[3 * MiB + 520 * 1024:5 * MiB] = text[:5 * MiB - (3 * MiB + 520 * 1024)]
    data[size - 512:] = os.urandom(512)
    return bytes(data)


@pytest.mark.parametrize("channels,compress", [(1, "off"), (2, "on")])
def test_every_kind_of_block_lands_where_it_belongs(vms, channels, compress):
    # runs of whole blocks go out with direct I/O, the rest through the
    # page cache: both kinds, over one and two channels, raw and zstd,
    # and a destination file full of stale bytes to overwrite
    size = 6 * MiB + 512
    data = _patchwork(size)
    region = REGION_BLOCKS * 4096
    src_disk = _disk_file(vms, "src.img", size)
    with open(src_disk, "r+b") as f:
        f.seek(region)
        f.write(data[region:])
    dst_disk = _disk_file(vms, "dst.img", size, data=os.urandom(size))
    src = vms.start("src", cmdline=CMDLINE, disk=src_disk)
    dst = vms.start("dst", incoming=True, disk=dst_disk)
    stress_ready(src)
    _wait_disk_passes(src, 1)
    secret = new_secret()
    recv = start_receive(dst, secret, disks=[dst_disk])
    send = start_send(src, recv.port, secret, disks=[src_disk],
                      channels=channels, compress=compress)
    s, d = wait_both(send, recv)
    assert s.result == Result.COMPLETED, s.error
    assert d.result == Result.COMPLETED, d.error
    assert s.disk_digest == d.disk_digest != 0
    assert s.channels == d.channels == channels
    assert src.stop() == 1
    with open(dst_disk, "rb") as f:
        assert os.fstat(f.fileno()).st_size == size
        f.seek(region)
        assert f.read() == data[region:]
    assert_guest_continued(src, dst)
    _wait_disk_passes(dst, _disk_passes(src) + 1)
    report = parse_console(src.console_text() + dst.console_text())
    assert report.errors == 0 and report.fails == [], report.fails


def _big_disk_source(vms):
    """A source guest whose disk holds 64 MiB of data beyond the writer's
    region: round 0 takes seconds at 16 MiB/s, so a failure can be made
    to strike while disk blocks flow.  Returns (src, its disk, the data)."""
    filler = os.urandom(64 * MiB)
    src_disk = _disk_file(vms, "src.img", size=80 * MiB)
    with open(src_disk, "r+b") as f:
        f.seek(16 * MiB)
        f.write(filler)
    src = vms.start("src", cmdline=CMDLINE, disk=src_disk)
    stress_ready(src)
    _wait_disk_passes(src, 1)
    return src, src_disk, filler


def _send_until_mid_disk(src, port, secret, src_disk):
    send = start_send(src, port, secret, disks=[src_disk],
                      max_bandwidth=16 * MiB, compress="off")
    wait_for(lambda: send.stats().disk_blocks > 1000, timeout=60,
             what="disk blocks on the wire")
    return send


def _assert_disk_intact_on_the_source(src, src_disk, filler):
    """The guest runs on with its disk: the writer's re-reads find every
    block it wrote, and the data beyond its region is untouched."""
    _wait_disk_passes(src, _disk_passes(src) + 1)
    src.client.pause()
    with open(src_disk, "rb") as f:
        f.seek(16 * MiB)
        assert f.read(64 * MiB) == filler
    report = parse_console(src.console_text())
    assert report.errors == 0 and report.fails == [], report.fails


def test_a_migration_cut_mid_disk_leaves_the_guest_and_its_disk_on_the_source(vms):
    src, src_disk, filler = _big_disk_source(vms)
    dst = vms.start("dst", incoming=True)
    target = f"{vms.base}/new.img"          # the engine creates it
    secret = new_secret()
    recv = start_receive(dst, secret, disks=[target])
    proxy = FaultyProxy(recv.port)
    send = _send_until_mid_disk(src, proxy.port, secret, src_disk)
    assert os.path.exists(target)
    proxy.cut()
    s, d = wait_result(send), wait_result(recv)
    proxy.close()
    assert s.result == Result.FAILED and d.result == Result.FAILED
    assert not s.committed and s.guest_runs_here
    send.close()
    recv.close()
    assert not os.path.exists(target), "the engine left its disk file behind"
    assert_guest_kept_running(src, dst)
    _assert_disk_intact_on_the_source(src, src_disk, filler)


def test_a_destination_killed_mid_disk_leaves_the_guest_on_the_source(vms):
    src, src_disk, filler = _big_disk_source(vms)
    dst = vms.start("dst", incoming=True)
    target = f"{vms.base}/new.img"
    proc, port, secret = receiver_with_secret(dst, extra=["--disk", target])
    send = _send_until_mid_disk(src, port, secret, src_disk)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = wait_result(send)
    assert s.result == Result.FAILED and not s.committed
    assert s.guest_runs_here
    send.close()
    # a killed process cleans nothing up: its partial file, like the
    # incoming VM, is the caller's to discard
    assert os.path.exists(target)
    assert_guest_kept_running(src, dst)
    _assert_disk_intact_on_the_source(src, src_disk, filler)


def test_a_destination_without_the_disks_refuses(vms):
    src_disk = _disk_file(vms, "src.img")
    src = vms.start("src", cmdline=CMDLINE, disk=src_disk)
    dst = vms.start("dst", incoming=True, disk=_disk_file(vms, "dst.img"))
    stress_ready(src)
    secret = new_secret()
    recv = start_receive(dst, secret)                  # no disks given
    send = start_send(src, recv.port, secret, disks=[src_disk])
    s, d = wait_both(send, recv)
    assert s.result == d.result == Result.FAILED
    assert "disks is 1 on the source and 0 on the destination" in d.error
    assert "disks is 1 on the source" in s.error, s.error
    assert_guest_kept_running(src, dst)


def test_a_destination_pointed_at_the_sources_own_disk_refuses(vms):
    # both halves on one host, one path: the destination must not
    # truncate the disk the source is moving (the source's shared lock)
    src_disk = _disk_file(vms, "src.img")
    src = vms.start("src", cmdline=CMDLINE, disk=src_disk)
    dst = vms.start("dst", incoming=True)
    stress_ready(src)
    _wait_disk_passes(src, 1)
    secret = new_secret()
    recv = start_receive(dst, secret, disks=[src_disk])
    send = start_send(src, recv.port, secret, disks=[src_disk])
    s, d = wait_both(send, recv)
    assert s.result == d.result == Result.FAILED
    assert "is in use" in d.error and "is in use" in s.error, (d.error, s.error)
    assert os.path.getsize(src_disk) == DISK
    assert_guest_kept_running(src, dst)
    _wait_disk_passes(src, _disk_passes(src) + 1)
    report = parse_console(src.console_text())
    assert report.errors == 0 and report.fails == [], report.fails


def test_a_disk_of_another_block_size_is_refused_with_the_reason(vms):
    target = f"{vms.base}/new.img"
    dst = vms.start("dst", incoming=True)
    secret = new_secret()
    recv = start_receive(dst, secret, disks=[target], timeout_ms=5000)
    raw = RawSource(recv.port, secret)
    raw.handshake()
    raw.send(5, preamble_for(dst, extra=["disks=1", "disk.0=1048576:512"]))
    mtype, reason = raw.recv()
    raw.close()
    d = wait_result(recv)
    recv.close()
    assert mtype == 15, (mtype, reason)             # REFUSE
    assert b"disk 0: block size 512 is not supported" in reason, reason
    assert d.result == Result.FAILED and "block size 512" in d.error
    assert not os.path.exists(target)
