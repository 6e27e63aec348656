"""Demo: boot a stress guest on the KVM test host and live-migrate it.

Run by ``tools/bootstrap demo``.  Prints the guest's heartbeats, then
live-migrates the running guest between two test-host processes with the
native engine over loopback, showing progress, and reports the downtime the
engine measured and the one the guest saw (the widest gap between its
heartbeats on the host clock).
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time

from nova_bhyve import polling
from nova_bhyve.migration.cli import progress_line
from nova_bhyve.native.engine import Migration, Mode, Result
from nova_bhyve.testhost import artifacts
from nova_bhyve.testhost.console import (
    largest_heartbeat_gap,
    parse_console,
    parse_tlog,
)
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


def _passed_once(vm):
    """The console report once the guest completed a pass, else None."""
    report = parse_console(vm.console_text())
    if report.heartbeats and report.heartbeats[-1].passes >= 1:
        return report
    return None


def _live_migrate(src, dst, max_downtime_ms):
    """Live-migrate src into incoming dst, printing progress; return stats."""
    secret = os.urandom(32)
    recv = Migration.receive(vmm_target=str(dst.socket_path), secret=secret)
    send = Migration.send(vmm_target=str(src.socket_path), host="127.0.0.1",
                          port=recv.port, secret=secret, mode=Mode.LIVE,
                          max_downtime_ms=max_downtime_ms)
    while not send.wait(0.1):
        _say("  " + progress_line(send.stats()))
    recv.wait(30)
    stats = send.stats(), recv.stats()
    send.close()
    recv.close()
    return stats


def main(argv=None):
    """Entry point of ``nova-bhyve-demo``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mem", default="1G", help="guest RAM (default 1G)")
    parser.add_argument("--ws", default="256M",
                        help="stress working set (default 256M)")
    parser.add_argument("--pattern", default="touch",
                        choices=["touch", "random", "tight", "fill"])
    parser.add_argument("--max-downtime-ms", type=int, default=50)
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
        _show_heartbeats(src, 2)
        # let the working set be written once
        r = polling.poll(lambda: _passed_once(src), math.inf, 0.2)
        _say(f"  working set written once (heartbeat {r.last_seq})")
        _say("pause / resume:")
        src.client.pause()
        frozen = parse_console(src.console_text()).last_seq
        time.sleep(0.5)
        _say(f"  paused at heartbeat {frozen}; 0.5 s later still "
             f"{parse_console(src.console_text()).last_seq}")
        src.client.resume()
        _show_heartbeats(src, 1)

        _say("starting 'dst' in incoming mode; live migration over loopback:")
        dst = TestHostVM.start("dst", f"{base}/dst", args.mem, incoming=True,
                               tlog=True)
        start_seq = parse_console(src.console_text()).last_seq
        s, d = _live_migrate(src, dst, args.max_downtime_ms)
        if s.result != Result.COMPLETED:
            _say(f"migration {s.result.name.lower()}: {s.error or d.error}")
            _say("the guest keeps running on the source")
            return 1
        src.stop()      # the source VM is gone; the guest lives on dst
        _say(f"  completed in {s.total_ms:.0f} ms over {len(s.rounds)} rounds, "
             f"{s.bytes_transferred / 2**20:.1f} MiB on the wire "
             f"({s.pages_delta} pages as deltas), digests "
             f"{'match' if s.digest == d.digest else 'DIFFER'}")
        _say(f"  downtime measured by the engine: {s.downtime_ms:.1f} ms")
        _show_heartbeats(dst, 2)

        before = parse_console(src.console_text())
        after = parse_console(dst.console_text())
        # a line the guest was printing at the pause ends on the destination
        combined = parse_console(src.console_text() + dst.console_text())
        gap, seq = largest_heartbeat_gap(
            parse_tlog(src.tlog_path.read_text()) +
            parse_tlog(dst.tlog_path.read_text()), min_seq=start_seq)
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
