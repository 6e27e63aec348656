"""Benchmark: live-migrate guest payloads between two test-host VMs.

    .venv/bin/python -P benchmarks/migrate_bench.py [--repeat 3] [--quick]
        [--only NAME] [--max-bandwidth-mib N] [--delta-cache-mib MIB]
        [--max-downtime-ms MS]
        [--workload NAME=MEM,CPUS,CMDLINE ...] [--warmup-s S]

For each workload, boots a source VM, lets the stress working set be
written once in full, starts an incoming destination VM, migrates over
loopback with the native engine and prints total time, the engine's
measured downtime, the guest-visible downtime (widest heartbeat gap on the
host clock across the switch-over), bytes on the wire, rounds and the
highest throttle auto-converge applied.  The engine runs with its own
defaults unless an option says otherwise.  Medians over the repeats;
results also go to benchmarks/results/engine.json.
"""

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

from nova_bhyve import polling
from nova_bhyve.native.engine import Migration, Mode, Result
from nova_bhyve.testhost.console import (
    largest_heartbeat_gap,
    parse_console,
    parse_tlog,
)
from nova_bhyve.testhost.process import TestHostVM

WORKLOADS = {
    "idle-1G": ("1G", 1, "mode=idle"),
    "touch-256M-in-1G": ("1G", 1, "mode=stress pattern=touch ws=256M"),
    # whole pages of fresh data: nothing shrinks them; over a capped link
    # (--max-bandwidth-mib 2) only auto-converge makes it finish
    "fill-16M-in-512M": ("512M", 1, "mode=stress pattern=fill ws=16M"),
}


def parse_workload(text):
    """``NAME=MEM,CPUS,CMDLINE`` (the guest payload's command line) to
    ``(name, (mem, cpus, cmdline))``."""
    name, sep, rest = text.partition("=")
    parts = rest.split(",", 2)
    if not sep or not name or len(parts) != 3 or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=MEM,CPUS,CMDLINE, e.g. "
            "tight-1000M=1G,2,mode=stress pattern=tight ws=1000M cpus=2")
    return name, (parts[0], int(parts[1]), parts[2])


def _wait(pred, timeout, what):
    if not polling.poll(pred, timeout):
        raise RuntimeError(f"timed out waiting for {what}")


def _warm_up(src, cmdline, warmup_s):
    """Wait until a stress guest has written its working set once (or,
    with ``warmup_s``, for that many seconds), an idle one has run."""
    if warmup_s:
        time.sleep(warmup_s)
        return

    def ready():
        r = parse_console(src.console_text())
        if "stress" in cmdline:
            return r.heartbeats and r.heartbeats[-1].passes >= 1
        return len(r.heartbeats) > 500
    _wait(ready, 120, "the working set to be written once (or give --warmup-s)")


def run_once(base, mem, cpus, cmdline, engine_opts, warmup_s=0):
    """One migration; returns a dict of measurements."""
    shutil.rmtree(base, ignore_errors=True)
    src = TestHostVM.start("src", f"{base}/src", mem, cpus=cpus,
                           cmdline=cmdline, tlog=True)
    dst = None
    try:
        _warm_up(src, cmdline, warmup_s)
        dst = TestHostVM.start("dst", f"{base}/dst", mem, cpus=cpus,
                               incoming=True, tlog=True)
        start_seq = parse_console(src.console_text()).last_seq
        secret = os.urandom(32)
        recv = Migration.receive(vmm_target=str(dst.socket_path), secret=secret)
        send = Migration.send(vmm_target=str(src.socket_path), host="127.0.0.1",
                              port=recv.port, secret=secret, **engine_opts)
        send.wait()
        recv.wait(30)
        s, d = send.stats(), recv.stats()
        send.close()
        recv.close()
        if s.result != Result.COMPLETED:
            raise RuntimeError(f"migration failed: {s.error} / {d.error}")
        src.stop()
        time.sleep(0.5)
        gap, _ = largest_heartbeat_gap(parse_tlog(src.tlog_path.read_text()) +
                                       parse_tlog(dst.tlog_path.read_text()),
                                       min_seq=start_seq)
        combined = parse_console(src.console_text() + dst.console_text())
        if combined.sequence_breaks() or combined.errors:
            raise RuntimeError("guest self-check or heartbeat sequence broken")
        return {
            "total_ms": s.total_ms,
            "engine_downtime_ms": s.downtime_ms,
            "predicted_downtime_ms": s.expected_downtime_ms,
            "dest_excess_us": s.dest_excess_us,
            "pause_parts_ms": [s.pause_stop_ms, s.pause_final_ms,
                               s.pause_verify_ms, s.pause_commit_ms],
            "catchup_ms": s.catchup_ms,
            "guest_downtime_ms": gap * 1e3,
            "bytes": s.bytes_transferred,
            "rounds": len(s.rounds),
            "pages_delta": s.pages_delta,
            "throttle": s.throttle,
            "converge_steps": s.converge_steps,
            "round_throttle": [r.throttle for r in s.rounds],
            "round_ms": [r.duration_ms for r in s.rounds],
            "round_bytes": [r.bytes for r in s.rounds],
            "round_pages": [r.pages for r in s.rounds],
            "round_dirty": [r.dirty for r in s.rounds],
            "round_expected_ms": [r.expected_ms for r in s.rounds],
            # the settings the engine ran with, defaults included
            "max_downtime_ms": s.max_downtime_ms,
            "delta_cache_bytes": s.delta_cache_bytes,
        }
    finally:
        for vm in (src, dst):
            if vm is not None and vm.alive():
                vm.kill()


def main(argv=None):
    """Run the benchmark and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat each")
    ap.add_argument("--channels", default="auto",
                    type=lambda v: v if v == "auto" else int(v),
                    help='1..16, or "auto" (the engine\'s default)')
    ap.add_argument("--max-downtime-ms", type=int,
                    help="the downtime limit (default: the engine's)")
    ap.add_argument("--delta-cache-mib",
                    help='MiB, or "auto" (default: the engine\'s, sized from '
                         'the guest and the host\'s free memory)')
    ap.add_argument("--max-bandwidth-mib", type=int, default=0,
                    help="cap the link at this many MiB/s (0: no cap)")
    ap.add_argument("--only", default="",
                    help="run only workloads whose name contains this")
    ap.add_argument("--verify", default="incremental",
                    choices=["incremental", "full"])
    ap.add_argument("--workload", action="append", type=parse_workload,
                    default=[], metavar="NAME=MEM,CPUS,CMDLINE",
                    help="run this guest instead of the built-in workloads "
                         "(repeatable)")
    ap.add_argument("--warmup-s", type=float, default=0,
                    help="let the guest run this long before migrating, "
                         "instead of waiting for one pass over its set")
    args = ap.parse_args(argv)
    workloads = dict(args.workload) or WORKLOADS
    repeat = 1 if args.quick else args.repeat
    opts = dict(mode=Mode.LIVE, channels=args.channels,
                max_bandwidth=args.max_bandwidth_mib << 20, verify=args.verify)
    # options not given stay the engine's defaults
    if args.max_downtime_ms is not None:
        opts["max_downtime_ms"] = args.max_downtime_ms
    if args.delta_cache_mib is not None:
        opts["delta_cache"] = ("auto" if args.delta_cache_mib == "auto"
                               else int(args.delta_cache_mib) << 20)
    base = tempfile.mkdtemp(prefix="nbb-")
    results = {"engine_options": {k: str(v) for k, v in opts.items()}, "runs": {}}
    print(f"{'workload':<18} {'total ms':>9} {'downtime ms':>12} "
          f"{'guest gap ms':>13} {'MB on wire':>11} {'rounds':>7} "
          f"{'throttle %':>10}")
    try:
        for name, (mem, cpus, cmdline) in workloads.items():
            if args.only not in name:
                continue
            runs = []
            for i in range(repeat):
                runs.append(run_once(f"{base}/{name}-{i}", mem, cpus, cmdline,
                                     opts, args.warmup_s))
                print(f"  {name} run {i + 1}: total {runs[-1]['total_ms']:.0f} ms, "
                      f"guest gap {runs[-1]['guest_downtime_ms']:.1f} ms, "
                      f"throttle by round {runs[-1]['round_throttle']}",
                      file=sys.stderr, flush=True)
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("total_ms", "engine_downtime_ms", "guest_downtime_ms",
                             "bytes", "rounds", "throttle")}
            results["runs"][name] = {"median": med, "runs": runs}
            print(f"{name:<18} {med['total_ms']:9.0f} "
                  f"{med['engine_downtime_ms']:12.1f} "
                  f"{med['guest_downtime_ms']:13.1f} {med['bytes'] / 1e6:11.1f} "
                  f"{med['rounds']:7.0f} {med['throttle']:10.0f}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = pathlib.Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / "engine.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
