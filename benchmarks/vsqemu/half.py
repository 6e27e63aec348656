"""One half of a migration with this project's engine, in a process of its own.

    python -P half.py send|receive      (JSON lines on stdin and stdout)

Run under ``ip netns exec`` so that its TCP connections start or end in
that namespace.  ``receive`` reads its settings, starts listening and
prints ``{"port": N}``; ``send`` prints ``{"ready": true}`` once imported,
then reads its settings and starts at once.  Both print one final line
with the engine's statistics and the CPU time this process used from the
start of the migration to its end (all threads: the engine's are native),
then stay until stdin closes.  The receiving half frees its session
before it reports; the sending half frees its own (its delta cache) only
when the next line arrives, then prints ``{"close_cpu_s": S}``: that is
the source host's teardown, which the harness asks for once the
destination's heartbeats are judged.
The secret arrives on stdin, never on the command line.
"""

import json
import resource
import sys
import time

from nova_bhyve.native.engine import Migration, Mode, Result


def _cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _final(stats, cpu_s, wall_s):
    return {
        "result": stats.result.name.lower(), "error": stats.error,
        "total_ms": stats.total_ms, "downtime_ms": stats.downtime_ms,
        "expected_downtime_ms": getattr(stats, "expected_downtime_ms", None),
        "dest_excess_us": getattr(stats, "dest_excess_us", None),
        "pause_parts_ms": [getattr(stats, f"pause_{k}_ms", None)
                           for k in ("stop", "final", "verify", "commit")],
        "bandwidth": getattr(stats, "bandwidth", 0),
        "throttle": getattr(stats, "throttle", 0),
        "converge_steps": getattr(stats, "converge_steps", 0),
        "trim_steps": getattr(stats, "trim_steps", 0),
        "rtt_ms": getattr(stats, "rtt_ms", None),
        "bytes": stats.bytes_transferred, "pages_sent": stats.pages_sent,
        "pages_delta": stats.pages_delta, "pages_zero": stats.pages_zero,
        "pages_compressed": stats.pages_compressed,
        "pages_raw": stats.pages_raw,
        "catchup_ms": stats.catchup_ms,
        "round_start_ms": [r.start_ms for r in stats.rounds],
        "round_ms": [r.duration_ms for r in stats.rounds],
        "round_bytes": [r.bytes for r in stats.rounds],
        "round_dirty": [r.dirty for r in stats.rounds],
        # (an engine built before rounds carried it: 0)
        "round_expected_ms": [getattr(r, "expected_ms", 0) for r in stats.rounds],
        "round_blocks": [r.blocks for r in stats.rounds],
        # (an engine built before rounds carried it: 0)
        "round_throttle": [getattr(r, "throttle", 0) for r in stats.rounds],
        "disk_total": stats.disk_total, "disk_bytes": stats.disk_bytes,
        "disk_blocks": stats.disk_blocks,
        "cpu_s": cpu_s, "wall_s": wall_s,
    }


def receive(cfg):
    """Listen, receive one migration, report."""
    cpu0 = _cpu()
    mig = Migration.receive(vmm_target=cfg["vm"], secret=bytes.fromhex(cfg["secret"]),
                            host=cfg["host"], port=0,
                            timeout_ms=int(cfg["timeout_s"] * 1000),
                            encrypt=cfg.get("encrypt", True),
                            disks=cfg.get("disks", ()))
    _out({"port": mig.port})
    t0 = time.monotonic()
    mig.wait(cfg["timeout_s"] + 60)
    stats = mig.stats()
    mig.close()
    return _final(stats, _cpu() - cpu0, time.monotonic() - t0)


def send(cfg):
    """Send one migration; cancel it if it runs past the timeout."""
    cpu0, t0 = _cpu(), time.monotonic()
    # the engine's defaults, unless the caller names a setting
    extra = {k: cfg[k] for k in ("delta_cache", "compress") if k in cfg}
    mig = Migration.send(vmm_target=cfg["vm"], host=cfg["host"], port=cfg["port"],
                         secret=bytes.fromhex(cfg["secret"]), mode=Mode.LIVE,
                         channels=cfg["channels"],
                         max_downtime_ms=cfg["max_downtime_ms"], max_bandwidth=0,
                         verify=cfg["verify"], timeout_ms=30000,
                         encrypt=cfg.get("encrypt", True),
                         disks=cfg.get("disks", ()), **extra)
    dnf = not mig.wait(cfg["timeout_s"])
    if dnf:
        try:
            mig.cancel()
        except Exception:       # noqa: BLE001 - it may have just finished
            pass
        mig.wait(30)
    stats = mig.stats()
    out = _final(stats, _cpu() - cpu0, time.monotonic() - t0)
    out["dnf"] = dnf and stats.result != Result.COMPLETED
    return out, mig


def close_when_asked(mig):
    """Free the sending session when the next line arrives (or stdin
    closes); report its CPU if asked."""
    asked = sys.stdin.readline()
    cpu0 = _cpu()
    mig.close()
    if asked:
        _out({"close_cpu_s": _cpu() - cpu0})


def main(argv):
    """Run one half as told on stdin."""
    role = argv[0]
    if role == "send":
        _out({"ready": True})
    cfg = json.loads(sys.stdin.readline())
    if role == "send":
        out, mig = send(cfg)
        _out(out)
        close_when_asked(mig)
    else:
        _out(receive(cfg))
    sys.stdin.readline()    # stay (and keep the namespace's counters readable)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
