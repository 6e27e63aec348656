"""Measurements shared by both engines: CPU time, wire bytes, heartbeat gaps."""

import os
import pathlib
import shutil

from nova_bhyve import polling
from nova_bhyve.testhost.console import (
    largest_heartbeat_gap,
    parse_tlog,
    timed_heartbeats,
)

from . import netns

_TICK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark step failed (the run is reported as an error)."""


def guest_cpus(cmdline):
    """The vCPUs a guest needs: ``cpus=`` of the payload's command line."""
    for tok in cmdline.split():
        if tok.startswith("cpus=") and tok[5:].isdigit():
            return int(tok[5:])
    return 1


def wait_for(pred, timeout, what, interval=0.02):
    """Poll ``pred`` until it is true; raise BenchError after ``timeout`` s."""
    value = polling.poll(pred, timeout, interval)
    if not value:
        raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
    return value


def _stat_times(path):
    """Return (comm, cpu seconds) from a /proc stat file."""
    text = pathlib.Path(path).read_text()
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, (int(fields[11]) + int(fields[12])) / _TICK


def _is_vcpu(comm):
    # QEMU's "CPU n/KVM" (with debug-threads=on), the test host's "vcpu n"
    return comm.startswith("CPU ") or comm.startswith("vcpu ")


def vmm_cpu(pid):
    """Return (process CPU s, vCPU threads' CPU s) of a VMM process, (0, 0) if gone."""
    try:
        _, total = _stat_times(f"/proc/{pid}/stat")
        vcpu = 0.0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                comm, t = _stat_times(f"/proc/{pid}/task/{tid}/stat")
            except OSError:
                continue
            if _is_vcpu(comm):
                vcpu += t
        return total, vcpu
    except OSError:
        return 0.0, 0.0


def cpu_outside_guest(before, after):
    """CPU seconds a VMM spent outside its vCPUs between two vmm_cpu() samples."""
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1]))


def iface_bytes(ns, ifname):
    """Bytes of all packets both ways through ``ifname`` in namespace ``ns``."""
    # read from inside the namespace, not through a process in it, which
    # may have exited (a QEMU destination does when its migration is cancelled)
    with netns.entered(ns):
        text = pathlib.Path("/proc/thread-self/net/dev").read_text()
    # lo counts each packet once (sent); a veth end needs received + sent
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == ifname:
            f = rest.split()
            rx, tx = int(f[0]), int(f[8])
            return tx if ifname == "lo" else rx + tx
    raise BenchError(f"no interface {ifname} in namespace {ns}")


def console_tail(path):
    """Return the raw console's unfinished last line ('' if it ends in a newline)."""
    try:
        data = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        return ""
    return data[data.rfind(b"\n") + 1:].decode("ascii", "replace")


def read_tlog(path):
    """Parse a timestamped console log; [] if it does not exist."""
    try:
        return parse_tlog(pathlib.Path(path).read_text("ascii", "replace"))
    except FileNotFoundError:
        return []


def keep_consoles(res, dest, src, dst):
    """Copy both consoles of a switch-over whose heartbeats broke, or whose
    guest reported self-check errors, to ``dest``."""
    if (res.get("hb_continuous") and not res.get("guest_errors")) or dest is None:
        return
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for tag, vm in (("src", src), ("dst", dst)):
        for path in (vm.console_path, vm.tlog_path):
            if path.exists():
                shutil.copy(path, dest / f"{tag}-{path.name}")
    res["consoles_kept"] = str(dest)


# The guest's heartbeats after the switch-over that are judged (one a
# millisecond) before the source host's VM is stopped: on one machine its
# teardown would take CPU from the destination's guest, which two hosts
# would not.  Both engines' harnesses wait for them.
JUDGED_BEATS = 50


def last_seq(entries):
    """Sequence number of the last heartbeat among tlog entries (0 if none)."""
    beats = timed_heartbeats(entries)
    return beats[-1][1].seq if beats else 0


def heartbeats(entries, min_seq=0):
    """Return (ns, seq, errors) for the heartbeat lines among tlog entries."""
    return [(ns, hb.seq, hb.errors) for ns, hb in timed_heartbeats(entries)
            if hb.seq >= min_seq]


def switchover(src_entries, src_tail, dst_entries, min_seq):
    """Widest heartbeat gap from ``min_seq`` on, sequence breaks and guest errors."""
    # a line the guest began on the source and finished on the destination
    # is put back together, stamped when its end arrived
    dst_entries = list(dst_entries)
    if src_tail and dst_entries:
        ns, first = dst_entries[0]
        dst_entries[0] = (ns, src_tail + first)
    merged = list(src_entries) + dst_entries
    gap, before = largest_heartbeat_gap(merged, min_seq=min_seq)
    beats = heartbeats(merged, min_seq)
    seqs = [s for _, s, _ in beats]
    breaks = [(a, b) for a, b in zip(seqs, seqs[1:]) if b != a + 1]
    errors = max((e for _, _, e in beats), default=0)
    after_dst = len(heartbeats(dst_entries, min_seq))
    # the widest gap began with the source's last heartbeat: it is the
    # switch-over's; else the guest stalled during pre-copy or after
    src_last = last_seq(src_entries)
    return {"guest_downtime_ms": gap * 1e3, "gap_after_seq": before,
            "gap_at_switchover": before in (src_last, src_last + 1),
            "hb_continuous": bool(seqs) and not breaks,
            "hb_breaks": breaks[:5], "guest_errors": errors,
            "dst_heartbeats": after_dst}


def judge(src, dst, start_seq, keep):
    """Wait for JUDGED_BEATS of the destination's heartbeats, judge the
    switch-over (switchover()), keep both consoles in ``keep`` if it broke."""
    wait_for(lambda: len(read_tlog(dst.tlog_path)) > JUDGED_BEATS, 20,
             "heartbeats from the destination")
    res = switchover(read_tlog(src.tlog_path), console_tail(src.console_path),
                     read_tlog(dst.tlog_path), start_seq)
    keep_consoles(res, keep, src, dst)
    return res
