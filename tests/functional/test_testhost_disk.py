"""The test host's ATA disk with the guest's disk writer: real writes, the
dirty-block log, and the disk state across a state round trip."""

import os
import shutil
import struct
import time

import pytest

from nova_bhyve.testhost.console import (
    largest_heartbeat_gap,
    parse_console,
    parse_tlog,
    timed_heartbeats,
)
from nova_bhyve.testhost.diskimage import (
    BLOCK,
    is_write_front,
    sector_versions,
)
from nova_bhyve.testhost.errors import TestHostError
from nova_bhyve.testhost.memory import GuestMemory, copy_memory

from .conftest import needs_kvm, start_refused, wait_for

pytestmark = needs_kvm

MiB = 1 << 20
REGION_BLOCKS = 8
# memory and disk at once: the touch writer over 4 MiB, the disk writer
# over the first 8 blocks of a 1 MiB disk
CMDLINE = f"mode=stress pattern=touch ws=4M disk=1 disksize={REGION_BLOCKS * 4}K"
# the disk writer alone: the vCPU is nearly always inside a transfer
DISK_ONLY = f"mode=stress ws=0 disk=1 disksize={REGION_BLOCKS * 4}K"
FLUSH_DELAY_MS = 300        # --flush-delay-ms: a drive on slow storage


def _disk(vms, name="disk.img", size=MiB):
    path = f"{vms.base}/{name}"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _disk_passes(vm):
    report = parse_console(vm.console_text())
    return report.heartbeats[-1].disk_passes if report.heartbeats else 0


def _wait_disk_passes(vm, count, timeout=60):
    return wait_for(lambda: (r := parse_console(vm.console_text())).heartbeats
                    and r.heartbeats[-1].disk_passes >= count and r,
                    timeout=timeout, what=f"{count} disk passes on {vm.name}")


def _check_disk_file(path, passes_reported):
    """The region holds the writer's front, the rest of the disk zeros."""
    with open(path, "rb") as f:
        image = f.read()
    candidates = range(passes_reported, passes_reported + 3)
    versions = sector_versions(image, REGION_BLOCKS, candidates)
    assert is_write_front(versions), versions
    assert min(versions) >= passes_reported >= 1, (versions, passes_reported)
    assert image[REGION_BLOCKS * BLOCK:] == bytes(len(image) - REGION_BLOCKS * BLOCK)


def test_disk_writer_writes_the_disk_and_the_dirty_block_log_shows_it(vms):
    path = _disk(vms)
    vm = vms.start("disk", cmdline=CMDLINE, disk=path)
    assert vm.client.status()["disk_size"] == MiB
    assert vm.client.status()["disk_block"] == 4096
    first = vm.client.disk_dirty_log()          # every block, as memory's
    assert (first.blocks, first.block_size) == (256, 4096)
    assert first.count() == 256
    report = _wait_disk_passes(vm, 2)
    assert report.disk == {"sectors": 2048, "blocks": REGION_BLOCKS,
                           "block": 4096}
    start = _disk_passes(vm)
    _wait_disk_passes(vm, start + 1)            # a whole pass since `first`
    # the memory writer runs too (on a loaded host its share of the vCPU
    # can be as small as a page per disk step, so its first pass may come
    # after the disk writer's)
    wait_for(lambda: (r := parse_console(vm.console_text())).heartbeats
             and r.heartbeats[-1].passes >= 1, timeout=60,
             what=f"a memory pass on {vm.name}")
    written = vm.client.disk_dirty_log().dirty_blocks()
    assert written == list(range(REGION_BLOCKS))

    vm.client.pause()
    vm.client.disk_dirty_log()
    time.sleep(0.2)
    assert vm.client.disk_dirty_log(peek=True).count() == 0   # paused: quiet
    report = parse_console(vm.console_text())
    assert report.errors == 0 and report.fails == []
    assert report.sequence_breaks() == []
    _check_disk_file(path, report.heartbeats[-1].disk_passes)
    assert report.heartbeats[-1].passes >= 1    # the memory writer ran too

    vm.client.resume()
    _wait_disk_passes(vm, report.heartbeats[-1].disk_passes + 1)
    assert vm.client.disk_dirty_log().count() > 0
    assert parse_console(vm.console_text()).errors == 0


def _migrate(src, dst, disk_for_dst=None, loaded=None):
    """Pause src, move memory and state to the incoming dst, run dst;
    ``loaded(dst)``, if given, runs once dst holds the state, paused."""
    src.client.pause()
    blob = src.client.save_state()
    if disk_for_dst:
        disk_for_dst()
    with GuestMemory.from_client(src.client) as sm, \
            GuestMemory.from_client(dst.client) as dm:
        copy_memory(sm, dm)
    assert dst.client.load_state(blob) == {"state": "paused"}
    if loaded:
        loaded(dst)
    assert src.stop() == 1
    dst.client.resume()
    return blob


def test_state_round_trip_with_the_same_disk_continues_clean(vms):
    path = _disk(vms)
    src = vms.start("src", cmdline=CMDLINE, disk=path)
    _wait_disk_passes(src, 1)
    dst = vms.start("dst", incoming=True, disk=path)
    _migrate(src, dst)
    before = parse_console(src.console_text())
    _wait_disk_passes(dst, before.heartbeats[-1].disk_passes + 2)
    dst_text = dst.console_text()
    after = parse_console(dst_text)
    assert after.banner == {} and not after.ready   # continued, not rebooted
    combined = parse_console(src.console_text() + dst_text)
    assert combined.sequence_breaks() == []
    assert combined.errors == 0 and combined.fails == []
    dst.client.pause()
    _check_disk_file(path, parse_console(dst.console_text()).heartbeats[-1]
                     .disk_passes)


def _ata_section(blob):
    """The `ata` section (kind 25) of a state blob (STATE_FORMAT.md)."""
    off = 32
    for _ in range(struct.unpack_from("<I", blob, 12)[0]):
        kind, _ver, _inst, _z, length = struct.unpack_from("<4HI", blob, off)
        if kind == 25:
            return blob[off + 16:off + 16 + length]
        off += 16 + (length + 7) // 8 * 8
    raise AssertionError("no ata section")


def test_transfers_in_flight_survive_a_chain_of_round_trips(vms):
    # disk only: the vCPU is nearly always inside a transfer, so most
    # pauses catch one (registers, half a sector) and the destination
    # must finish it exactly where the source stopped
    path = _disk(vms)
    vm = vms.start("hop0", cmdline=DISK_ONLY, disk=path)
    _wait_disk_passes(vm, 1)
    texts, in_flight = [], 0
    for hop in range(1, 16):
        dst = vms.start(f"hop{hop}", incoming=True, disk=path)
        time.sleep(0.1 + 0.05 * (hop % 5))
        ata = _ata_section(_migrate(vm, dst))
        in_flight += ata[11] != 0                   # transfer state
        texts.append(vm.console_text())
        vm = dst
        if in_flight >= 3 and hop >= 5:
            break
    assert in_flight >= 3, "pauses never caught a transfer in flight"
    _wait_disk_passes(vm, parse_console("".join(texts)).heartbeats[-1]
                      .disk_passes + 1)
    combined = parse_console("".join(texts) + vm.console_text())
    assert combined.sequence_breaks() == []
    assert combined.errors == 0 and combined.fails == []


def test_a_destination_with_a_stale_disk_copy_is_caught(vms):
    # the same round trip, but the destination gets a copy of the disk
    # taken a pass earlier: the guest's re-reads find old versions (or,
    # if the pause split a block write, its read-back finds the sectors
    # written before the pause missing)
    path, stale = _disk(vms), f"{vms.base}/stale.img"
    src = vms.start("src", cmdline=CMDLINE, disk=path)
    _wait_disk_passes(src, 1)
    src.client.pause()
    shutil.copyfile(path, stale)
    src.client.resume()
    _wait_disk_passes(src, _disk_passes(src) + 2)
    dst = vms.start("dst", incoming=True, disk=stale)
    _migrate(src, dst)
    report = wait_for(lambda: (r := parse_console(dst.console_text())).fails
                      and r, timeout=60, what="a FAIL for a stale block")
    assert report.fails[0].split()[:2] in (["FAIL", "diskold"],
                                           ["FAIL", "disk"]), report.fails
    assert parse_console(src.console_text()).errors == 0


def test_disk_state_must_match_the_destination(vms):
    src = vms.start("src", cmdline=CMDLINE, disk=_disk(vms))
    _wait_disk_passes(src, 1)
    src.client.pause()
    blob = src.client.save_state()
    for name, kwargs in (("nodisk", {}),
                         ("small", {"disk": _disk(vms, "small.img", MiB // 2)})):
        dst = vms.start(name, incoming=True, **kwargs)
        with pytest.raises(TestHostError, match="state refused: ata section"):
            dst.client.load_state(blob)
        assert dst.client.status()["state"] == "incoming"
        if name == "nodisk":
            with pytest.raises(TestHostError, match="EINVAL.*no disk"):
                dst.client.disk_dirty_log()
            assert dst.client.status()["disk_size"] == 0


@pytest.mark.parametrize("setup,message", [
    ("symlink", "is a symbolic link"),
    ("missing", "No such file or directory"),
    ("odd size", "not a multiple of 512"),
])
def test_a_bad_disk_path_ends_the_process_with_a_clear_error(vms, setup,
                                                             message):
    path = f"{vms.base}/bad.img"
    if setup == "symlink":
        os.symlink(_disk(vms), path)
    elif setup == "odd size":
        _disk(vms, "bad.img", 5000)
    assert message in start_refused(vms, incoming=True, disk=path)


def _wait_timed_disk_passes(vm, count, timeout):
    """Wait for a heartbeat of the timestamped console log reporting
    ``count`` disk passes; return it as (ns, Heartbeat)."""
    def reached():
        beats = timed_heartbeats(parse_tlog(vm.tlog_path.read_text()))
        return beats and (beats[-1][1].disk_passes or 0) >= count and beats[-1]
    return wait_for(reached, timeout=timeout,
                    what=f"{count} disk passes on {vm.name}")


def test_a_flush_the_host_holds_up_does_not_stop_the_heartbeat(vms):
    """FLUSH CACHE runs on the drive's flusher thread and the guest polls
    the busy drive between heartbeats, so a flush the host holds up
    (300 ms each, ``--flush-delay-ms``) leaves the heartbeat going over
    three disk passes, each of which ends with a flush.  When the vCPU ran
    `fdatasync` itself, its heartbeat stopped for as long as each flush
    took."""
    path = _disk(vms)
    vm = vms.start("flush", cmdline=DISK_ONLY, disk=path, tlog=True,
                   flush_delay_ms=FLUSH_DELAY_MS)
    first = _wait_timed_disk_passes(vm, 1, timeout=60)
    last = _wait_timed_disk_passes(vm, first[1].disk_passes + 3, timeout=30)
    gap, _ = largest_heartbeat_gap(parse_tlog(vm.tlog_path.read_text()),
                                   min_seq=first[1].seq, max_seq=last[1].seq)
    # the passes waited for their flushes: the delay was in force (the
    # flushes of the second and third passes after `first` began and
    # ended between the two heartbeats) ...
    assert (last[0] - first[0]) / 1e9 >= 2 * FLUSH_DELAY_MS / 1e3, \
        (first, last)
    # ... and no heartbeat waited for one (a third of a flush leaves room
    # for a busy host's scheduler, which can hold a vCPU out for tens of ms)
    assert gap < FLUSH_DELAY_MS / 3e3, gap
    vm.client.pause()
    report = parse_console(vm.console_text())
    assert report.errors == 0 and report.fails == []
    assert report.sequence_breaks() == []
    _check_disk_file(path, report.heartbeats[-1].disk_passes)


def test_a_flush_in_flight_travels_in_the_state(vms):
    """A pause that catches a flush still running saves the drive busy
    with it (status BSY, command FLUSH CACHE); the destination's drive
    runs the flush again on its own file and completes it, and the
    guest's writer goes on clean.  Each drive holds its flushes 300 ms
    (``--flush-delay-ms``), so the drive is busy with one most of the
    time whatever this host's storage does (a storage hog made it so only
    where the storage was slow, and once left all of 24 pauses between
    flushes), and a destination that took a flush in flight is still
    busy with it when its state is read back before it runs."""
    path = _disk(vms)
    slow = {"disk": path, "flush_delay_ms": FLUSH_DELAY_MS}
    vm = vms.start("hop0", cmdline=DISK_ONLY, **slow)
    _wait_disk_passes(vm, 1)
    texts, busy, loaded = [], 0, []

    def read_back(dst):
        loaded.append(_ata_section(dst.client.save_state()))

    for hop in range(1, 13):
        dst = vms.start(f"hop{hop}", incoming=True, **slow)
        time.sleep(0.05 * (hop % 5))
        ata = _ata_section(_migrate(vm, dst, loaded=read_back))
        busy += bool(ata[7] & 0x80)
        if ata[7] & 0x80:
            assert ata[10] == 0xE7 and ata[11] == 0, ata[:12]
            # the destination runs the flush again: busy with it
            assert loaded[-1][7] & 0x80 and loaded[-1][10] == 0xE7, \
                loaded[-1][:12]
        texts.append(vm.console_text())
        vm = dst
        if busy >= 2:
            break
    assert busy >= 2, f"{busy} of {hop} pauses caught a flush"
    _wait_disk_passes(vm, parse_console("".join(texts)).heartbeats[-1]
                      .disk_passes + 2)
    vm.client.pause()
    combined = parse_console("".join(texts) + vm.console_text())
    assert combined.sequence_breaks() == []
    assert combined.errors == 0 and combined.fails == []
    _check_disk_file(path, combined.heartbeats[-1].disk_passes)


@pytest.mark.parametrize("bad,why", [
    ("0", "--flush-delay-ms 0: must be 1..10000"),
    ("10001", "--flush-delay-ms 10001: must be 1..10000"),
    ("-5", "--flush-delay-ms -5: must be 1..10000"),
    ("3x", "--flush-delay-ms 3x: must be 1..10000"),
    ("300", "--flush-delay-ms needs --disk"),
])
def test_a_bad_flush_delay_is_refused_with_its_reason(vms, bad, why):
    """``--flush-delay-ms`` takes 1 to 10000, and only with a disk;
    anything else stops the process before a VM exists (status 4, as
    bhyve's error), saying why."""
    assert why in start_refused(vms, incoming=True, flush_delay_ms=bad)
