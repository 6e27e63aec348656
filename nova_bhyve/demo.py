"""Demo: boot a stress guest on the KVM test host and move it to a second VM.

Run by ``tools/bootstrap demo``.  Prints the guest's heartbeats, then moves
the running guest between two test-host processes and reports the downtime
the guest saw (the widest gap between its heartbeats on the host clock).
"""

import argparse
import shutil
import sys
import tempfile
import time

from nova_bhyve.testhost import artifacts
from nova_bhyve.testhost.console import (
    largest_heartbeat_gap,
    parse_console,
    parse_tlog,
)
from nova_bhyve.testhost.memory import GuestMemory, copy_memory
from nova_bhyve.testhost.process import TestHostVM


def _say(msg):
    print(msg, flush=True)


def _show_heartbeats(vm, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        report = parse_console(vm.console_text())
        if report.heartbeats:
            hb = report.heartbeats[-1]
            _say(f"  {vm.name}: heartbeat {hb.seq:>7}  passes {hb.passes:>4}  "
                 f"self-check errors {hb.errors}")
        time.sleep(0.5)


def _warm_move(src, dst):
    """Pause, copy RAM and vCPU/device state, run on dst; return timings."""
    t0 = time.monotonic()
    src.client.pause()
    blob = src.client.save_state()
    with GuestMemory.from_client(src.client) as sm, \
            GuestMemory.from_client(dst.client) as dm:
        copied = copy_memory(sm, dm)
    dst.client.load_state(blob)
    src.stop()
    dst.client.resume()
    return time.monotonic() - t0, copied, len(blob)


def main(argv=None):
    """Entry point of ``nova-bhyve-demo``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mem", default="1G", help="guest RAM (default 1G)")
    parser.add_argument("--ws", default="256M",
                        help="stress working set (default 256M)")
    parser.add_argument("--pattern", default="touch", choices=["touch", "random"])
    args = parser.parse_args(argv)

    ok, why = artifacts.kvm_available()
    if not ok:
        _say(f"cannot run the demo: {why}")
        return 2
    base = tempfile.mkdtemp(prefix="nb-demo-")
    cmdline = f"mode=stress pattern={args.pattern} ws={args.ws}"
    src = dst = None
    try:
        _say(f"booting guest 'src' on the KVM test host: {args.mem} RAM, {cmdline}")
        src = TestHostVM.start("src", f"{base}/src", args.mem, cmdline=cmdline,
                               tlog=True)
        _show_heartbeats(src, 3)
        _say("pause / resume:")
        src.client.pause()
        frozen = parse_console(src.console_text()).last_seq
        time.sleep(0.5)
        _say(f"  paused at heartbeat {frozen}; 0.5 s later still "
             f"{parse_console(src.console_text()).last_seq}")
        src.client.resume()
        _show_heartbeats(src, 1)

        _say("starting 'dst' in incoming mode and moving the guest "
             "(warm: pause, copy, resume)")
        dst = TestHostVM.start("dst", f"{base}/dst", args.mem, incoming=True,
                               tlog=True)
        elapsed, copied, blob = _warm_move(src, dst)
        _say(f"  moved {copied / 2**20:.1f} MiB of RAM and a {blob} byte "
             f"vCPU/device state blob in {elapsed * 1e3:.1f} ms")
        _show_heartbeats(dst, 3)

        before = parse_console(src.console_text())
        after = parse_console(dst.console_text())
        # a line the guest was printing at the pause ends on the destination
        combined = parse_console(src.console_text() + dst.console_text())
        gap, seq = largest_heartbeat_gap(
            parse_tlog(src.tlog_path.read_text()) +
            parse_tlog(dst.tlog_path.read_text()))
        continuous = bool(after.heartbeats) and not combined.sequence_breaks()
        _say(f"source's last heartbeat {before.last_seq}, destination's last "
             f"{after.last_seq}: sequence "
             f"{'unbroken' if continuous else 'BROKEN'}")
        _say(f"guest-visible downtime (widest heartbeat gap, after seq {seq}): "
             f"{gap * 1e3:.1f} ms")
        _say(f"guest self-check errors: {after.errors}")
        return 0 if continuous and after.errors == 0 else 1
    finally:
        for vm in (src, dst):
            if vm is not None and vm.alive():
                vm.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
