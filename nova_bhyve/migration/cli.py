"""nova-bhyve-migrate: move a VM between two hosts outside Nova (debugging).

Run the receiving half on the destination host first, then the sending
half on the source host, with the same secret file on both:

  nova-bhyve-migrate receive --vm DEST_SOCKET --listen 0.0.0.0:4444 \\
      --secret-file /path/secret
  nova-bhyve-migrate send --vm SRC_SOCKET --to dest-host:4444 \\
      --secret-file /path/secret [--mode live|warm|cold]

``--vm`` is the test host's control socket; with ``--vmm bhyve`` it is the
bhyve VM name and with ``--vmm checkpoint`` a checkpoint base path (cold
mode).  The secret is read from a file (never from the command line, where
other users could see it), byte for byte (nothing is stripped), and must
hold at least 16 bytes: for example ``head -c 32 /dev/urandom > secret``.
"""

import argparse
import pathlib
import signal
import sys
import time

from nova_bhyve.migration import policy
from nova_bhyve.native.engine import (
    Migration,
    MigrationError,
    Mode,
    Phase,
    Result,
    VmmKind,
)

_VMM = {"testhost": VmmKind.TESTHOST, "bhyve": VmmKind.BHYVE,
        "checkpoint": VmmKind.CHECKPOINT}


def _channels(text):
    """``--channels``: "auto" or a count of 1..16."""
    if text == "auto":
        return text
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise argparse.ArgumentTypeError(f"expected 1..16 or auto, not {text!r}")
    return int(text)


def _split_hostport(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _read_secret(path):
    # the file's exact bytes: a random secret may begin or end with bytes
    # that look like white space, and stripping them breaks authentication
    data = pathlib.Path(path).read_bytes()
    if len(data) < 16:
        raise SystemExit(f"{path}: the secret must be at least 16 bytes")
    return data


def progress_line(stats, width=30):
    """Render one progress line for a MigrationStats snapshot."""
    total = max(stats.mem_total, 1)
    done = min(1.0, stats.bytes_transferred / total) if stats.round == 0 else \
        max(0.0, 1.0 - stats.bytes_remaining / total)
    filled = int(done * width)
    bar = "#" * filled + "-" * (width - filled)
    return (f"[{bar}] {stats.phase.name.lower():<10} round {stats.round:<3} "
            f"sent {stats.bytes_transferred / 2**20:8.1f} MiB  "
            f"dirty {stats.dirty_pages:>7} pages  "
            f"expected downtime {stats.expected_downtime_ms:7.1f} ms "
            f"of {stats.max_downtime_ms} allowed")


def round_trips_exceed_limit(stats):
    """Whether the switch-over's two control round trips alone exceed the
    downtime limit, once rounds run (this command never raises it)."""
    return (stats.phase == Phase.ITERATE and stats.round >= 1 and
            policy.round_trips_exceed_limit(stats))


def _watch(mig, out, interval=0.2):
    tty = out.isatty()
    cancelled = False
    while not mig.wait(interval):
        stats = mig.stats()
        if not cancelled and round_trips_exceed_limit(stats):
            cancelled = True
            out.write(f"\nerror: a switch-over holds two control round trips "
                      f"of {stats.rtt_ms:.1f} ms, more than --max-downtime-ms "
                      f"{stats.max_downtime_ms}: cancelling (the guest keeps "
                      f"running here)\n")
            try:
                mig.cancel()
            except MigrationError:
                pass        # it switched over meanwhile
        line = progress_line(stats)
        out.write(("\r" + line) if tty else line + "\n")
        out.flush()
    if tty:
        out.write("\n")
    return mig.stats()


def _receive(mig):
    """Wait for the end; SIGTERM or SIGINT cancel the session, so the
    source hears ABORT (a wait blocked in the engine would defer them)."""
    asked = []
    handler = lambda signum, frame: asked.append(signum)  # noqa: E731
    old = {sig: signal.signal(sig, handler)
           for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not mig.wait(0.1):
            if asked:
                asked.clear()
                try:
                    mig.cancel()
                except MigrationError:
                    pass        # too late: the guest runs here now
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return mig.stats()


def _report(stats, out, rounds=False):
    out.write(f"result: {stats.result.name.lower()}"
              + (f" ({stats.error})" if stats.error else "") + "\n")
    if stats.result == Result.COMPLETED:
        out.write(f"total {stats.total_ms:.1f} ms, "
                  f"downtime {stats.downtime_ms:.1f} ms, "
                  f"{stats.bytes_transferred} bytes on the wire, "
                  f"{len(stats.rounds)} rounds over {stats.channels} page "
                  f"channel{'s' if stats.channels != 1 else ''}, "
                  f"digest {stats.digest:016x}\n")
        if stats.disk_total:
            out.write(f"disks {stats.disk_total} bytes: {stats.disk_blocks} "
                      f"blocks in {stats.disk_bytes} bytes on the wire, "
                      f"digest {stats.disk_digest:016x}\n")
        if stats.is_source:
            out.write(f"downtime in parts: stop/final round/verify/commit "
                      f"{policy.pause_parts(stats)}\n")
            out.write(f"predicted downtime {stats.expected_downtime_ms:.1f} ms "
                      f"(the destination {stats.dest_excess_us:.1f} us a page "
                      f"slower than the source; "
                      f"after {stats.catchup_ms:.1f} ms waiting for the link "
                      f"and the destination to catch up); pages zero/delta/zstd/raw "
                      f"{stats.pages_zero}/"
                      f"{stats.pages_delta}/{stats.pages_compressed}/"
                      f"{stats.pages_raw}; delta cache "
                      f"{stats.delta_cache_bytes >> 20} MiB; throttle "
                      f"{stats.throttle}%\n")
    if rounds and stats.is_source:
        out.writelines(line + "\n" for line in policy.round_lines(stats))


def main(argv=None, out=sys.stdout):
    """Entry point of ``nova-bhyve-migrate``."""
    ap = argparse.ArgumentParser(prog="nova-bhyve-migrate",
                                 description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("send", "receive"):
        p = sub.add_parser(name)
        p.add_argument("--vm", required=True)
        p.add_argument("--vmm", choices=sorted(_VMM), default="testhost")
        p.add_argument("--secret-file", required=True)
        p.add_argument("--timeout", type=float, default=30.0,
                       help="connect/idle timeout in seconds")
        p.add_argument("--disk", action="append", default=[], metavar="PATH",
                       help="a disk file moved with the memory (repeat for "
                            "each, in the VM's order); receive: the file to "
                            "write it to (created or truncated)")
    snd, rcv = sub.choices["send"], sub.choices["receive"]
    snd.add_argument("--to", required=True, metavar="HOST:PORT")
    snd.add_argument("--mode", choices=["live", "warm", "cold"], default="live")
    snd.add_argument("--channels", type=_channels, default="auto",
                     help="page connections, 1..16; auto (default): one "
                          "per CPU of this host the guest's vCPUs leave "
                          "free, 1 to 2")
    snd.add_argument("--compress", choices=["auto", "on", "off"], default="auto",
                     help="sparse pages' first copies as their non-zero "
                          "bytes, zstd for other pages not sent as zeros or "
                          "deltas (auto: while the link is the bottleneck); "
                          "off: neither")
    snd.add_argument("--delta-cache-mib", type=int, default=-1,
                     help="delta cache in MiB; -1 (default): sized from the "
                          "guest and this host's free memory; 0: no deltas")
    snd.add_argument("--no-auto-converge", action="store_true",
                     help="never throttle the guest's vCPUs (to converge, "
                          "or to shorten a long pause)")
    snd.add_argument("--max-downtime-ms", type=int, default=300)
    snd.add_argument("--bandwidth-mib", type=int, default=0,
                     help="cap in MiB/s (0 = unlimited)")
    snd.add_argument("--verify", choices=["incremental", "full"],
                     default="incremental")
    snd.add_argument("--rounds", action="store_true",
                     help="after the report, one line per round (its time, "
                          "pages, bytes, the dirty pages counted before it, "
                          "the pause predicted before it, the throttle) and "
                          "the pages by encoding")
    rcv.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    args = ap.parse_args(argv)
    secret = _read_secret(args.secret_file)
    try:
        if args.cmd == "receive":
            host, port = _split_hostport(args.listen)
            mig = Migration.receive(vmm_target=args.vm, secret=secret, host=host,
                                    port=port, vmm_kind=_VMM[args.vmm],
                                    timeout_ms=int(args.timeout * 1000),
                                    disks=args.disk)
            out.write(f"listening on {host}:{mig.port}\n")
            out.flush()
        else:
            host, port = _split_hostport(args.to)
            mig = Migration.send(
                vmm_target=args.vm, host=host, port=port, secret=secret,
                mode=Mode[args.mode.upper()], vmm_kind=_VMM[args.vmm],
                channels=args.channels, compress=args.compress,
                delta_cache=("auto" if args.delta_cache_mib < 0
                             else args.delta_cache_mib << 20),
                auto_converge=not args.no_auto_converge,
                max_downtime_ms=args.max_downtime_ms,
                max_bandwidth=args.bandwidth_mib << 20, verify=args.verify,
                timeout_ms=int(args.timeout * 1000), disks=args.disk)
    except MigrationError as exc:
        out.write(f"error: {exc}\n")
        return 2
    t0 = time.monotonic()
    stats = _watch(mig, out) if args.cmd == "send" else _receive(mig)
    _report(stats, out, rounds=getattr(args, "rounds", False))
    out.write(f"wall time {time.monotonic() - t0:.2f} s\n")
    mig.close()
    return 0 if stats.result == Result.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
