"""Unit tests of the test-host client side (no KVM needed)."""

import os
import socket
import struct
import tempfile
import threading

import pytest

from nova_bhyve.testhost import artifacts
from nova_bhyve.testhost.client import (
    ControlClient,
    DirtyLog,
    DiskDirtyLog,
    MemoryLayout,
)
from nova_bhyve.testhost.console import (
    largest_heartbeat_gap,
    parse_console,
    parse_tlog,
)
from nova_bhyve.testhost.errors import TestHostError
from nova_bhyve.testhost.memory import GuestMemory, copy_memory

GiB = 1 << 30


def test_console_parser_reads_every_line_kind():
    text = ("NBGUEST 1 mode=stress pattern=touch ws=4096 tsc_khz=2000\n"
            "WS 0x1000000 0x1001000\nREADY\nHB 1 0 0\nHB 2 0 0\n"
            "FAIL touch addr=0x1000000 want=0x2 got=0x1\nHB 3 1 1\n"
            "HB 4 1")  # torn last line: ignored
    report = parse_console(text)
    assert report.banner == {"mode": "stress", "pattern": "touch",
                             "ws": "4096", "tsc_khz": "2000"}
    assert report.ranges == [(0x1000000, 0x1001000)]
    assert report.ready
    assert [h.seq for h in report.heartbeats] == [1, 2, 3]
    assert report.errors == 1
    assert report.sequence_breaks() == []


def test_console_parser_reads_the_disk_writer_lines():
    text = ("NBGUEST 1 mode=stress ws=0 cpus=1 disk=1\n"
            "DISK sectors=2048 blocks=16 block=4096\nREADY\n"
            "HB 1 0 0 0\nHB 2 0 0 1\n"
            "FAIL diskold addr=0x3000 want=0x2 got=0x1\nHB 3 0 1 1\n"
            "HB 4 0 1 2 9\nHB 5 0 1 x\n")      # malformed heartbeats: other
    report = parse_console(text)
    assert report.banner["disk"] == "1"
    assert report.disk == {"sectors": 2048, "blocks": 16, "block": 4096}
    assert [(h.seq, h.disk_passes) for h in report.heartbeats] == \
        [(1, 0), (2, 1), (3, 1)]
    assert report.errors == 1 and report.fails[0].startswith("FAIL diskold ")
    assert report.other == ["HB 4 0 1 2 9", "HB 5 0 1 x"]
    assert parse_console("HB 1 2 0\n").heartbeats[0].disk_passes is None


def test_largest_gap_counts_disk_writer_heartbeats():
    gap, seq = largest_heartbeat_gap(parse_tlog(
        "1000000 HB 1 0 0 0\n3000000 HB 2 0 0 0\n3500000 HB 3 0 0 1\n"))
    assert (seq, gap) == (1, pytest.approx(0.002))


def test_console_parser_finds_sequence_breaks():
    report = parse_console("HB 1 0 0\nHB 2 0 0\nHB 5 0 0\nHB 5 0 0\n")
    assert report.sequence_breaks() == [(2, 5), (5, 5)]


def test_largest_gap_spans_two_logs():
    src = parse_tlog("1000000 HB 1 0 0\n2000000 HB 2 0 0\n")
    dst = parse_tlog("9000000 HB 3 0 0\n10000000 HB 4 0 0\n")
    gap, seq = largest_heartbeat_gap(src + dst)
    assert seq == 2
    assert gap == pytest.approx(0.007)


def test_largest_gap_keeps_to_the_sequence_range():
    log = parse_tlog("1000000 HB 1 0 0\n9000000 HB 2 0 0\n"
                     "10000000 HB 3 0 0\n30000000 HB 4 0 0\n")
    gap, seq = largest_heartbeat_gap(log, min_seq=2, max_seq=3)
    assert (seq, gap) == (2, pytest.approx(0.001))


def test_dirty_log_bitmaps_map_to_guest_physical_pages():
    layout = MemoryLayout(size=5 * GiB, lowmem=3 * GiB, highmem=2 * GiB,
                          highbase=4 * GiB, highoffset=3 * GiB, page_size=4096)
    low = bytearray(8)
    low[0] = 0b101          # pages 0 and 2
    high = bytearray(16)
    high[9] = 0x80          # page 79 of highmem
    log = DirtyLog(bytes(low), bytes(high), lowpages=64, highpages=128)
    assert log.dirty_pages(layout) == [0, 0x2000, 4 * GiB + 79 * 4096]
    assert log.count() == 3


def test_layout_segments_follow_bhyve():
    layout = MemoryLayout(size=5 * GiB, lowmem=3 * GiB, highmem=2 * GiB,
                          highbase=4 * GiB, highoffset=3 * GiB, page_size=4096)
    assert list(layout.segments()) == [(0, 0, 3 * GiB),
                                       (4 * GiB, 3 * GiB, 2 * GiB)]


def _memfd_memory(size, lowmem):
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    layout = MemoryLayout(size=size, lowmem=lowmem, highmem=size - lowmem,
                          highbase=4 * GiB, highoffset=lowmem, page_size=4096)
    return GuestMemory(fd, layout)


def test_guest_memory_translates_addresses_and_copies_only_written_data():
    with _memfd_memory(8 << 20, 4 << 20) as src, \
            _memfd_memory(8 << 20, 4 << 20) as dst:
        src.write(0x1000, b"low")
        src.write(4 * GiB + 0x2000, b"high")
        assert src.offset(4 * GiB + 0x2000) == (4 << 20) + 0x2000
        with pytest.raises(TestHostError):
            src.offset(5 << 20)          # in the hole below 4 GiB
        copied = copy_memory(src, dst)
        assert copied < 8 << 20          # holes were skipped
        assert dst.read(0x1000, 3) == b"low"
        assert dst.read(4 * GiB + 0x2000, 4) == b"high"


def test_kernel_image_range_reads_elf32_program_headers(tmp_path):
    ehdr = bytearray(52)
    ehdr[:7] = b"\x7fELF\x01\x01\x01"
    struct.pack_into("<I", ehdr, 28, 52)              # e_phoff
    struct.pack_into("<HH", ehdr, 42, 32, 2)          # phentsize, phnum
    ph = struct.pack("<8I", 1, 0, 0, 0x100000, 0x10, 0x3000, 0, 0x1000)
    ph += struct.pack("<8I", 1, 0, 0, 0x104000, 0, 0x2000, 0, 0x1000)
    path = tmp_path / "k.elf"
    path.write_bytes(bytes(ehdr) + ph)
    assert artifacts.kernel_image_range(path) == (0x100000, 0x106000)
    path.write_bytes(b"\x7fELF\x02" + bytes(60))
    with pytest.raises(TestHostError):
        artifacts.kernel_image_range(path)


class FakeHost:
    """A unix-socket server that answers each request from a script."""

    def __init__(self, replies):
        self.dir = tempfile.mkdtemp(prefix="nbu-")
        self.path = os.path.join(self.dir, "s")
        self.replies = list(replies)
        self.requests = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.srv.accept()
        with conn:
            buf = b""
            for reply in self.replies:
                while b"\n" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                line, _, buf = buf.partition(b"\n")
                self.requests.append(line.decode())
                conn.sendall(reply)

    def close(self):
        self.srv.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


def test_client_parses_ok_fields_and_raises_on_err():
    host = FakeHost([b"OK state=running cpus=2 name=vm1\n",
                     b"ERR EBUSY VM is incoming; load a state blob first\n",
                     b"WAT\n"])
    try:
        client = ControlClient(host.path)
        assert client.status() == {"state": "running", "cpus": 2, "name": "vm1"}
        with pytest.raises(TestHostError) as err:
            client.resume()
        assert err.value.code == "EBUSY"
        assert "load a state blob" in err.value.message
        with pytest.raises(TestHostError) as err:
            client.pause()
        assert err.value.code == "EPROTO"
        assert host.requests == ["status", "resume", "pause"]
        client.close()
    finally:
        host.close()


def _run(first, *words):
    """A dirty-log run: u32 first word, u32 count, the words."""
    return struct.pack(f"<II{len(words)}Q", first, len(words), *words)


def test_client_reads_binary_payloads_of_the_stated_size():
    bitmap = bytes([1, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0])
    host = FakeHost([b"OK bytes=5 crc32=0\nSTATE",
                     b"OK bytes=24 words=2 lowpages=64 highpages=64 lowbytes=8\n" +
                     _run(0, 1, 0x80)])
    try:
        client = ControlClient(host.path)
        assert client.save_state() == b"STATE"
        log = client.dirty_log()
        assert log.low == bitmap[:8] and log.high == bitmap[8:]
        assert log.count() == 2
        client.close()
    finally:
        host.close()


def test_client_puts_the_dirty_logs_runs_back_into_a_bitmap():
    runs = _run(1, 0b101) + _run(3, 1 << 63, 1)
    host = FakeHost([f"OK bytes={len(runs)} words=5 lowpages=256 highpages=64 "
                     "lowbytes=32\n".encode() + runs,
                     b"OK bytes=0 words=5 lowpages=256 highpages=64 lowbytes=32\n"])
    try:
        client = ControlClient(host.path)
        log = client.dirty_log()
        assert log.low == struct.pack("<4Q", 0, 0b101, 0, 1 << 63)
        assert log.high == struct.pack("<Q", 1)
        assert log.count() == 4
        assert client.dirty_log(peek=True).count() == 0     # no run: all clean
        client.close()
    finally:
        host.close()


@pytest.mark.parametrize("body", [
    _run(4, 1, 1),                  # reaches past the last word
    _run(0)[:8],                    # a run of no words
    _run(0, 1)[:12],                # its words cut short
    _run(0, 1) + b"\0\0\0",          # a header cut short
])
def test_client_refuses_a_dirty_log_run_outside_the_bitmap(body):
    host = FakeHost([f"OK bytes={len(body)} words=5 lowpages=256 highpages=64 "
                     "lowbytes=32\n".encode() + body])
    try:
        client = ControlClient(host.path)
        with pytest.raises(TestHostError) as err:
            client.dirty_log()
        assert err.value.code == "EPROTO"
        client.close()
    finally:
        host.close()


def test_client_reads_the_disk_dirty_log():
    bitmap = bytes([0b1001, 0, 0, 0, 0, 0, 0, 0x80,
                    0x03, 0, 0, 0, 0, 0, 0, 0])         # 2 bits past the end
    host = FakeHost([b"OK bytes=16 blocks=65 block_size=4096\n" + bitmap,
                     b"OK bytes=8 blocks=3 block_size=4096\n" + bytes(8),
                     b"ERR EINVAL this VM has no disk (start it with --disk)\n"])
    try:
        client = ControlClient(host.path)
        log = client.disk_dirty_log()
        assert log == DiskDirtyLog(bitmap, blocks=65, block_size=4096)
        assert log.dirty_blocks() == [0, 3, 63, 64]
        assert log.count() == 4
        assert client.disk_dirty_log(peek=True).count() == 0
        with pytest.raises(TestHostError) as err:
            client.disk_dirty_log()
        assert err.value.code == "EINVAL"
        assert host.requests == ["disk-dirty-log", "disk-dirty-log peek",
                                 "disk-dirty-log"]
        client.close()
    finally:
        host.close()


def test_client_reports_a_host_that_went_away():
    host = FakeHost([])
    try:
        client = ControlClient(host.path)
        with pytest.raises(TestHostError) as err:
            client.status()
        assert err.value.code == "ECONN"
    finally:
        host.close()


def test_connecting_to_a_missing_socket_says_where():
    with pytest.raises(TestHostError) as err:
        ControlClient("/nonexistent/control.sock")
    assert "/nonexistent/control.sock" in str(err.value)
