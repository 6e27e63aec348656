"""Measure the KVM test host: heartbeat rate, vCPU load, dirty-log sync, state size.

    .venv/bin/python -P benchmarks/testhost_metrics.py

Heartbeat rate: heartbeats per second of host time seen in console.tlog
over 3 s, for idle and stress guests.  vCPU load: the share of 4 s the
guest's vCPU thread spent on a CPU, for an idle guest and a tight loop
over 256 MiB (with the pages that loop writes per second, no migration
running), and, where perf(1) is installed, how many guest instructions
KVM emulated per second meanwhile (`kvm:kvm_emulate_insn`).  Throttle:
the pages per second a tight loop over 4 MiB writes under throttles of
0 to 90 % (`throttle P`, as auto-converge sets it), and a `fill` loop
unthrottled.  Dirty-log
sync: wall time of one get-and-clear `dirty-log` request, per GiB of
guest RAM, for 1 and 4 GiB guests with a stress working set.  State
blob: size of `save-state`.
"""

import math
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from nova_bhyve import polling
from nova_bhyve.testhost.console import parse_console, parse_tlog
from nova_bhyve.testhost.process import TestHostVM

sys.path.append(str(pathlib.Path(__file__).resolve().parent))
from vsqemu.common import vmm_cpu  # noqa: E402


def heartbeat_rate(base, cmdline, seconds=3.0):
    """Heartbeats per second (host clock) and median gap in ms."""
    vm = TestHostVM.start("hb", f"{base}/hb", "256M", cmdline=cmdline, tlog=True)
    try:
        time.sleep(1.0 + seconds)
        stamps = [ns for ns, line in parse_tlog(vm.tlog_path.read_text())
                  if line.startswith("HB ")]
    finally:
        vm.kill()
        shutil.rmtree(f"{base}/hb", ignore_errors=True)
    window = [t for t in stamps if t >= stamps[-1] - seconds * 1e9]
    gaps = [(b - a) / 1e6 for a, b in zip(window, window[1:])]
    return len(window) / seconds, statistics.median(gaps)


def _emulated(pid, seconds):
    """Instructions KVM emulated for process `pid`'s vCPUs in `seconds`, or None."""
    if not shutil.which("perf"):
        return None
    out = subprocess.run(["perf", "stat", "-x,", "-e", "kvm:kvm_emulate_insn",
                          "-p", str(pid), "--", "sleep", str(seconds)],
                         capture_output=True, text=True, check=False)
    for line in out.stderr.splitlines():
        field = line.split(",")[0]
        if "kvm_emulate_insn" in line and field.isdigit():
            return int(field)
    return None


def vcpu_load(base, cmdline, seconds=4.0):
    """Share of `seconds` on a CPU, pages written per second, emulated insns/s."""
    vm = TestHostVM.start("vl", f"{base}/vl", "1G", cmdline=cmdline, tlog=True)
    try:
        polling.poll(lambda: len(parse_console(vm.console_text()).heartbeats) > 500,
                     math.inf, 0.05)
        passes0, (_, t0) = _passes(vm), vmm_cpu(vm.pid)
        time.sleep(seconds)
        passes1, (_, t1) = _passes(vm), vmm_cpu(vm.pid)
        emulated = _emulated(vm.pid, 1)
    finally:
        vm.kill()
        shutil.rmtree(f"{base}/vl", ignore_errors=True)
    return (t1 - t0) / seconds, (passes1 - passes0) / seconds, emulated


def _passes(vm):
    """The passes over its working set the guest reported last."""
    beats = parse_console(vm.console_text()).heartbeats
    return beats[-1].passes if beats else 0


def throttled_rates(base, cmdline, pages, throttles, seconds=4.0):
    """Pages written per second under each throttle (percent) in turn."""
    vm = TestHostVM.start("th", f"{base}/th", "512M", cmdline=cmdline)
    rates = []
    try:
        polling.poll(lambda: _passes(vm) >= 1, math.inf, 0.05)
        for pct in throttles:
            vm.client.throttle(pct)
            time.sleep(0.5)
            p0 = _passes(vm)
            time.sleep(seconds)
            rates.append((_passes(vm) - p0) * pages / seconds)
    finally:
        vm.kill()
        shutil.rmtree(f"{base}/th", ignore_errors=True)
    return rates


def dirty_sync(base, mem, gib):
    """Median wall ms of a dirty-log get-and-clear, and per GiB."""
    vm = TestHostVM.start("dl", f"{base}/dl", mem,
                          cmdline="mode=stress pattern=touch ws=64M")
    try:
        polling.poll(lambda: parse_console(vm.console_text()).heartbeats,
                     math.inf, 0.05)
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            vm.client.dirty_log()
            times.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.02)
        vm.client.pause()
        blob = vm.client.save_state()
    finally:
        vm.kill()
        shutil.rmtree(f"{base}/dl", ignore_errors=True)
    med = statistics.median(times)
    return med, med / gib, len(blob)


def main():
    """Print the measurements."""
    base = tempfile.mkdtemp(prefix="nbm-")
    try:
        for cmd in ("mode=idle", "mode=stress pattern=touch ws=16M"):
            rate, gap = heartbeat_rate(base, cmd)
            print(f"heartbeats ({cmd}): {rate:.0f}/s, median gap {gap:.2f} ms")
        for cmd, pages in (("mode=idle", 0),
                           ("mode=stress pattern=tight ws=256M", 65536)):
            share, passes, emulated = vcpu_load(base, cmd)
            line = f"vCPU load ({cmd}): on a CPU {share:.0%} of the time"
            if pages:
                line += f", {passes * pages:.0f} pages written per second"
            if emulated is not None:
                line += f", {emulated} instructions emulated in 1 s"
            print(line)
        throttles = (0, 20, 50, 76, 90)
        rates = throttled_rates(base, "mode=stress pattern=tight ws=4M",
                                1024, throttles)
        print("pages written per second, tight loop over 4 MiB, by throttle: " +
              ", ".join(f"{t} %: {r:.0f}" for t, r in zip(throttles, rates)))
        fill = throttled_rates(base, "mode=stress pattern=fill ws=1M", 256, (0,))
        print(f"pages written per second, fill over 1 MiB: {fill[0]:.0f}")
        for mem, gib in (("1G", 1), ("4G", 4)):
            med, per_gib, blob = dirty_sync(base, mem, gib)
            print(f"dirty-log sync, {mem} guest: {med:.2f} ms "
                  f"({per_gib:.2f} ms per GiB); state blob {blob} bytes")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
