"""Stream disks in the engine's session (PROTOCOL.md, "Streams"), with
ordinary processes standing in for `zfs send` and `zfs recv`: the first
part from `cat` while the guest runs, the final part from a process the
notify byte starts once the guest is paused, each received by a process
writing a file."""

import os
import subprocess
import sys
import threading

from nova_bhyve.native.engine import Mode, Result, Stream

from .conftest import needs_kvm, reads_no_dirty_log, wait_for
from .migration_helpers import (
    FaultyProxy,
    assert_guest_continued,
    assert_guest_kept_running,
    new_secret,
    start_receive,
    start_send,
    stress_ready,
    wait_both,
)

pytestmark = needs_kvm
# every test once per dirty log the source offers (conftest.VMFactory)
DIRTY_LOGS = ("ranged", "whole")

MiB = 1 << 20
CMDLINE = "mode=stress pattern=touch ws=16M"

# part 1's producer: waits for the notify byte on stdin, records the VM's
# state at that moment, then writes the file to stdout
FINAL_PRODUCER = r"""
import os, shutil, sys
from nova_bhyve.testhost.client import ControlClient
if os.read(0, 1) != b"1":
    sys.exit(3)
with ControlClient(sys.argv[1]) as c:
    state = c.status()["state"]
with open(sys.argv[2], "w") as f:
    f.write(state)
with open(sys.argv[3], "rb") as f:
    shutil.copyfileobj(f, sys.stdout.buffer)
"""

# part 0's producer for warm mode: writes the file, then, before its end
# of file can reach the engine, records the VM's state
FIRST_PRODUCER = r"""
import shutil, sys
from nova_bhyve.testhost.client import ControlClient
with open(sys.argv[3], "rb") as f:
    shutil.copyfileobj(f, sys.stdout.buffer)
sys.stdout.flush()
with ControlClient(sys.argv[1]) as c:
    state = c.status()["state"]
with open(sys.argv[2], "w") as f:
    f.write(state)
"""


def _report_status(procs, fd):
    """Write "ok" to ``fd`` once every process exited 0, else their codes."""
    codes = [p.wait() for p in procs]
    try:
        os.write(fd, b"ok" if not any(codes) else f"exit codes {codes}".encode())
    except BrokenPipeError:
        pass                # the engine had failed and stopped listening
    os.close(fd)


def _status_thread(procs):
    r, w = os.pipe()
    threading.Thread(target=_report_status, args=(procs, w), daemon=True).start()
    return r


def _random_file(path, size):
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


class SourceStream:
    """`cat first` now; the final producer starts on the notify byte."""

    def __init__(self, vm, first, final, state_file, first_state_file=None):
        r0, w0 = os.pipe()
        r1, w1 = os.pipe()
        nr, nw = os.pipe()
        first_argv = ["cat", first] if first_state_file is None else [
            sys.executable, "-c", FIRST_PRODUCER, str(vm.socket_path),
            first_state_file, first]
        self.procs = [
            subprocess.Popen(first_argv, stdout=w0),
            subprocess.Popen([sys.executable, "-c", FINAL_PRODUCER,
                              str(vm.socket_path), state_file, final],
                             stdin=nr, stdout=w1)]
        for fd in (w0, w1, nr):
            os.close(fd)
        self.stream = Stream(first=r0, final=r1, notify=nw,
                             status=_status_thread(self.procs))

    def started(self):
        """The engine holds duplicates: drop ours."""
        for fd in (self.stream.first, self.stream.final, self.stream.notify,
                   self.stream.status):
            os.close(fd)


class DestStream:
    """Each part into a file by a process of its own (the final one exits
    with ``final_exit``)."""

    def __init__(self, out0, out1, final_exit=0):
        r0, w0 = os.pipe()
        r1, w1 = os.pipe()
        self.procs = [
            subprocess.Popen(["sh", "-c", 'cat > "$1"', "sh", out0], stdin=r0),
            subprocess.Popen(["sh", "-c", f'cat > "$1"; exit {final_exit}', "sh",
                              out1], stdin=r1)]
        os.close(r0)
        os.close(r1)
        self.stream = Stream(first=w0, final=w1, status=_status_thread(self.procs))

    def started(self):
        for fd in (self.stream.first, self.stream.final, self.stream.status):
            os.close(fd)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _setup(vms, first_size=8 * MiB, final_size=300 * 1024, final_exit=0,
           watch_first=False):
    base = vms.base
    files = {"first": _random_file(f"{base}/first", first_size),
             "final": _random_file(f"{base}/final", final_size),
             "out0": f"{base}/out0", "out1": f"{base}/out1",
             "state": f"{base}/state-at-notify",
             "first-state": f"{base}/state-at-first-end"}
    src = vms.start("src", cmdline=CMDLINE)
    dst = vms.start("dst", incoming=True)
    stress_ready(src)
    sstream = SourceStream(src, files["first"], files["final"], files["state"],
                           files["first-state"] if watch_first else None)
    dstream = DestStream(files["out0"], files["out1"], final_exit)
    return src, dst, files, sstream, dstream


def _start(src, dst, sstream, dstream, via_proxy=False, **kw):
    secret = new_secret()
    recv = start_receive(dst, secret, streams=[dstream.stream])
    dstream.started()
    proxy = FaultyProxy(recv.port) if via_proxy else None
    send = start_send(src, proxy.port if proxy else recv.port, secret,
                      streams=[sstream.stream], max_downtime_ms=100, **kw)
    sstream.started()
    return send, recv, proxy


def test_live_migration_carries_both_parts_of_a_stream_byte_for_byte(vms):
    src, dst, files, sstream, dstream = _setup(vms)
    send, recv, _ = _start(src, dst, sstream, dstream)
    s, d = wait_both(send, recv, timeout=120)

    assert s.result == Result.COMPLETED, s.error
    assert d.result == Result.COMPLETED, d.error
    assert _read(files["out0"]) == _read(files["first"])
    assert _read(files["out1"]) == _read(files["final"])
    # the final part's producer started only once the guest was paused
    assert _read(files["state"]) == b"paused"
    total = os.path.getsize(files["first"]) + os.path.getsize(files["final"])
    assert s.stream_bytes == d.stream_bytes == total
    assert [p.wait() for p in sstream.procs + dstream.procs] == [0, 0, 0, 0]
    assert src.stop() == 1
    assert_guest_continued(src, dst)


@reads_no_dirty_log
def test_warm_mode_sends_the_first_part_before_it_pauses_the_guest(vms):
    # warm: memory moves with the guest paused; a stream's first part (a
    # full zfs send) must not: it flows in rounds without pages first
    src, dst, files, sstream, dstream = _setup(vms, watch_first=True)
    send, recv, _ = _start(src, dst, sstream, dstream, mode=Mode.WARM)
    s, d = wait_both(send, recv, timeout=120)

    assert s.result == Result.COMPLETED, s.error
    assert d.result == Result.COMPLETED, d.error
    assert _read(files["out0"]) == _read(files["first"])
    assert _read(files["out1"]) == _read(files["final"])
    assert _read(files["first-state"]) == b"running"
    assert _read(files["state"]) == b"paused"
    assert len(s.rounds) >= 2           # page-less rounds, then the pages
    assert s.rounds[0].pages == 0 and s.rounds[-1].pages > 0
    assert src.stop() == 1
    assert_guest_continued(src, dst)


def test_a_receiver_that_fails_leaves_the_guest_on_the_source(vms):
    src, dst, files, sstream, dstream = _setup(vms, final_exit=1)
    send, recv, _ = _start(src, dst, sstream, dstream)
    s, d = wait_both(send, recv, timeout=120)

    assert s.result == Result.FAILED and d.result == Result.FAILED
    assert "its receiver reports: exit codes [0, 1]" in d.error, d.error
    assert "exit codes [0, 1]" in s.error, s.error
    assert not s.committed and not d.committed
    assert s.guest_runs_here and not d.guest_runs_here
    assert_guest_kept_running(src, dst)


def test_a_cut_mid_stream_leaves_the_guest_on_the_source_unpaused(vms):
    # 64 MiB at 8 MiB/s: the first part still flows when the link is cut
    src, dst, files, sstream, dstream = _setup(vms, first_size=64 * MiB)
    send, recv, proxy = _start(src, dst, sstream, dstream, via_proxy=True,
                               max_bandwidth=8 * MiB)
    wait_for(lambda: send.stats().stream_bytes > 4 * MiB, timeout=60,
             what="part of the first stream part sent")
    proxy.cut()
    s, d = wait_both(send, recv, proxy, timeout=120)

    assert s.result == Result.FAILED and d.result == Result.FAILED
    assert not s.committed and not d.committed
    assert s.guest_runs_here and not d.guest_runs_here
    assert_guest_kept_running(src, dst)
    # the guest never paused: the final part's producer was never let go
    # (its notify descriptor closed without the byte) and wrote nothing
    assert sstream.procs[1].wait(30) == 3
    assert not os.path.exists(files["state"])
    # the receivers saw the first part end short: never a whole copy
    dstream.procs[0].wait(30)
    assert os.path.getsize(files["out0"]) < os.path.getsize(files["first"])
