"""Live migration side by side: this project's engine against QEMU 7.2.

    .venv/bin/python -P benchmarks/compare_qemu.py [--quick] [--repeat N]

Needs root, /dev/kvm, qemu-system-x86_64 and iproute2 (ip, tc).  The same
multiboot guest payload runs on the KVM test host and under QEMU; for each
workload both are booted once, their working set is written once, then
each is migrated again and again (every destination becomes the next
source), the two engines interleaved: over loopback (inside one network
namespace) and over a veth pair shaped to 1 Gbit/s between two namespaces
that this script creates and removes; with ``--links ...,wan``, also over
a 1 Gbit/s link with a round trip of ``--wan-rtt-ms`` (20) between them.
QEMU runs in its default configuration and in two tuned ones (unlimited
bandwidth + xbzrle, and + multifd).  A disk-writing guest moves its disk
too: QEMU with drive-mirror to an NBD export on the destination, then
migrate.
Results: benchmarks/results/results.json, results.md (medians and ratios
this project / QEMU), round_*.png, downtime_vs_size.png (plots need
matplotlib).  Method: benchmarks/README.md.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time

sys.path.append(str(pathlib.Path(__file__).resolve().parent))

from vsqemu import disk as vdisk  # noqa: E402
from vsqemu import qemu, report  # noqa: E402
from vsqemu.common import BenchError, wait_for  # noqa: E402
from vsqemu.netns import RATE, TBF, WAN_TBF, Net  # noqa: E402
from vsqemu.ours import ENGINE, OursChain  # noqa: E402
from vsqemu.qemu import CONFIGS, QemuChain  # noqa: E402

from nova_bhyve.testhost.artifacts import kvm_available  # noqa: E402
from nova_bhyve.testhost.console import parse_console  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ORDER = ("ours",) + tuple(CONFIGS)
LINKS = ("loopback", "1gbit")        # the matrix's; "wan" on request
ALL_LINKS = LINKS + ("wan",)


def _touch(pct, gib):
    mib = gib * 1024 * pct // 100
    return (f"touch {pct}% of {gib}G",
            {"mem": f"{gib}G", "cmdline": f"mode=stress pattern=touch ws={mib}M",
             "kind": "touch", "series": "touch" if pct == 5 else "", "gib": gib})


def _tight(pct, gib, cpus=1):
    mib = gib * 1024 * pct // 100
    return (f"tight {pct}% of {gib}G" + (f", {cpus} vCPUs" if cpus > 1 else ""),
            {"mem": f"{gib}G", "cmdline": f"mode=stress pattern=tight ws={mib}M"
             + (f" cpus={cpus}" if cpus > 1 else ""),
             "kind": "tight", "series": "", "gib": gib})


def _idle(gib):
    return (f"idle {gib}G", {"mem": f"{gib}G", "cmdline": "mode=idle",
                             "kind": "idle", "series": "idle", "gib": gib})


# Random full pages: the guest writes only a few dozen such pages per
# second here, so its working set is kept at 1 MiB (written once in ~9 s).
RANDOM = ("random 1M in 1G", {"mem": "1G", "cmdline":
                              "mode=stress pattern=random ws=1M",
                              "kind": "random", "series": "", "gib": 1})
# A guest writing its disk while its memory changes: the touch writer over
# 64 MiB of 1 GiB, the disk writer over the first 128 KiB (32 blocks; it
# writes only a few blocks a second here, so a pass takes a few seconds) of
# a 512 MiB disk that holds 192 MiB of random data, 128 MiB of text and a
# 192 MiB hole (vsqemu/disk.py).  QEMU moves the disk with drive-mirror to
# an NBD export (vsqemu/qemu_disk.py), this engine in its migration session.
DISK = ("disk 512M, touch 64M of 1G",
        {"mem": "1G", "cmdline": "mode=stress pattern=touch ws=64M disk=1 "
         "disksize=128K", "kind": "disk", "series": "", "gib": 1,
         "disk": {"size": "512M", "random": "192M", "text": "128M"}})
FULL = dict([_idle(1), _idle(4), _idle(8), _idle(16), _touch(5, 1),
             _touch(25, 1), _touch(50, 1), _touch(5, 4), _touch(5, 8),
             _touch(5, 16), _tight(25, 1), _tight(25, 1, cpus=2), RANDOM, DISK])
QUICK = dict([_idle(1), _touch(25, 1), _touch(5, 8), _tight(25, 1), DISK])


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _clock(t0):
    s = int(time.monotonic() - t0)
    return f"{s // 60:d}:{s % 60:02d}"


def _machine_busy_s():
    """CPU seconds the whole machine has been busy since boot (/proc/stat)."""
    first = pathlib.Path("/proc/stat").read_text().split("\n")[0]
    f = [int(x) for x in first.split()[1:9]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s():
    """CPU seconds of this process and its (reaped) children: VMs, QEMU, helpers."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def check_host():
    """Refuse early, with the reason, where the benchmark cannot run."""
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (network namespaces, tc)")
    ok, why = kvm_available()
    if not ok:
        problems.append(why)
    for tool in (qemu.QEMU, "ip", "tc"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (apt-get install qemu-system-x86 "
                            "iproute2)")
    if not pathlib.Path(qemu.QBOOT).is_file():
        problems.append(f"{qemu.QBOOT} missing (Debian package qemu-system-data)")
    if problems:
        raise SystemExit("cannot run: " + "; ".join(problems))


def fill(chain, spec, timeout=300):
    """Boot a chain's guest and wait until its working set is written once."""
    t0 = time.monotonic()
    chain.boot()

    def ready():
        r = parse_console(chain.console_text())
        if r.errors:
            raise BenchError(f"guest self-check failed: {r.fails[:1]}")
        if spec["kind"] == "idle":
            return len(r.heartbeats) >= 300
        if spec["kind"] == "disk":     # its disk written once as well
            return r.heartbeats and r.heartbeats[-1].passes >= 1 and \
                (r.heartbeats[-1].disk_passes or 0) >= 1
        return r.heartbeats and r.heartbeats[-1].passes >= 1
    wait_for(ready, timeout, "the working set to be written once", 0.2)
    return time.monotonic() - t0


def run_workload(name, spec, args, net, runs, t0, counter):
    """Both engines, every link, configuration and repeat for one workload."""
    base = tempfile.mkdtemp(prefix="nbcmp-")
    image = None
    if spec.get("disk"):
        image, d = f"{base}/image.img", spec["disk"]
        vdisk.make_image(image, vdisk.parse_size(d["size"]),
                         vdisk.region_bytes(spec["cmdline"]),
                         vdisk.parse_size(d["random"]), vdisk.parse_size(d["text"]))
    chains = {"ours": OursChain(f"{base}/t", net, spec["mem"], spec["cmdline"],
                                disk=image, dirty_log_whole=args.dirty_log_whole),
              "qemu": QemuChain(f"{base}/q", net, spec["mem"], spec["cmdline"],
                                disk=image)}
    for eng, ch in chains.items():
        ch.keep = RESULTS / "broken" / f"{report.slug(name)}-{eng}"
    fills, active, skip = {}, None, set()
    try:
        for eng, ch in chains.items():
            fills[eng] = fill(ch, spec)
            ch.pause()
            _log(f"  {name}: {eng} guest booted, working set written in "
                 f"{fills[eng]:.1f} s  [{_clock(t0)}]")
        for link in args.links:
            for rep in range(args.repeat):
                for cfg in ORDER:
                    counter[0] += 1
                    tag = (f"[{counter[0]}/{counter[1]}] {name} | {link} | {cfg} | "
                           f"repeat {rep + 1}/{args.repeat}")
                    if (link, cfg) in skip:
                        _log(f"{tag}: skipped (did not finish in repeat 1)")
                        continue
                    ch = chains["ours" if cfg == "ours" else "qemu"]
                    if active is not ch:
                        if active is not None:
                            active.pause()
                        ch.resume()
                        active = ch
                    time.sleep(args.settle)
                    load = os.getloadavg()[0]
                    try:
                        res = ch.migrate(link, cfg, args.timeout, args.downtime_ms)
                    except Exception as exc:  # noqa: BLE001 - reported, run goes on
                        res = {"status": "error", "note": str(exc)}
                        _log(f"{tag}: ERROR {exc}; rebooting the {ch.engine} guest")
                        ch.close()
                        fills[ch.engine + "_reboot"] = fill(ch, spec)
                    if res["status"] == "ok" and (not res.get("hb_continuous") or
                                                  res.get("guest_errors")):
                        res["status"] = "error"
                        res["note"] = "guest heartbeats broken or self-check errors"
                    res.update(workload=name, link=link, config=cfg, repeat=rep,
                               load1=load)
                    runs.append(res)
                    if res["status"] == "dnf" and rep == 0:
                        skip.add((link, cfg))
                    _log(f"{tag}: {_describe(res, args.timeout)}  [{_clock(t0)}]")
    finally:
        for ch in chains.values():
            ch.close()
        shutil.rmtree(base, ignore_errors=True)
    return fills


def _describe(res, timeout):
    if res["status"] == "dnf":
        return (f"did not finish in {timeout:.0f} s "
                f"({res.get('wire_bytes', 0) / 1e6:.0f} MB sent), cancelled")
    if res["status"] == "error" and "total_s" not in res:
        return f"error: {res.get('note')}"
    text = (f"total {res['total_s']:.2f} s, guest downtime "
            f"{res.get('guest_downtime_ms', float('nan')):.1f} ms, "
            f"{res['wire_bytes'] / 1e6:.0f} MB, {res['rounds']} rounds, "
            f"CPU {res['cpu_src_s']:.2f}/{res['cpu_dst_s']:.2f} s")
    if "disk_ok" in res:
        text += (f", disk {'ok' if res['disk_ok'] else 'CHECK FAILED'} "
                 f"({res['disk_note']})")
    return text if res["status"] == "ok" else f"ERROR ({res.get('note')}): {text}"


def _meta(args, workloads, started):
    return {
        "started": started, "host": platform.node(), "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                         / 2**30, 1),
        "qemu": qemu.qemu_version(), "quick": args.quick, "repeat": args.repeat,
        "timeout_s": args.timeout, "downtime_limit_ms": args.downtime_ms,
        "settle_s": args.settle, "links": list(args.links),
        "link_shaping": f"veth, tc {' '.join(TBF)} on both ends",
        "wan": (f"round trip {args.wan_rtt_ms} ms through TUN devices and a "
                f"forwarder (vsqemu/delayline.py), tc {' '.join(WAN_TBF)} on "
                "both devices") if "wan" in args.links else None,
        "engine_settings": ENGINE,
        "dirty_log": "whole" if args.dirty_log_whole else "ranged",
        "qemu_configs": {c: {"capabilities": caps, "parameters": params}
                         for c, (caps, params) in CONFIGS.items()},
        "workloads": workloads,
    }


def write_outputs(meta, runs, workloads, links, plots=True):
    """Write results.json, results.md and the plots; return the Markdown table."""
    RESULTS.mkdir(exist_ok=True)
    summary = report.summarize(runs)
    table = report.markdown(summary, list(workloads), links)
    (RESULTS / "results.json").write_text(json.dumps(
        {"meta": meta, "medians": summary, "runs": runs}, indent=1))
    notes = [
        f"Medians of {meta['repeat']} repeat(s); {meta['qemu']}; downtime limit "
        f"{meta['downtime_limit_ms']} ms for both; each migration cancelled after "
        f"{meta['timeout_s']:.0f} s (\"did not finish\").",
        "In QEMU rows, (r) = this project ÷ that QEMU configuration "
        "(below 1: this project needs less).",
        "(k/n) after an engine: only k of n runs finished with the guest's "
        "heartbeats intact; the medians are over those k.",
        "(disk check ✗ in k/n) after an engine: in k of its n finished runs "
        "the moved disk failed its check (benchmarks/README.md, \"Disk "
        "workload\"); their figures are in the medians.",
        f"1 Gbit/s link: {meta['link_shaping']}.",
    ]
    if meta.get("wan"):
        notes.append(f"wan link: 1 Gbit/s, {meta['wan']}.")
    if meta.get("dirty_log") == "whole":
        notes.append("This engine's VMs offered only the whole dirty log, read "
                     "and cleared at once, as bhyve's (--dirty-log-whole).")
    if "other_cpu_pct" in meta:
        notes.append(
            f"Run on {meta['cpus']} CPUs in {meta['wall_s'] / 60:.1f} min; work "
            f"outside this benchmark (other processes, kernel threads, interrupts) "
            f"took {meta['other_cpu_pct']}% of the machine meanwhile "
            f"({meta['busy_before_pct']}% just before the start).")
    md = (f"# Live migration: nova-bhyve against QEMU ({meta['started']})\n\n"
          + table + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
          + "\n## Targets (issue 12), this engine against the best QEMU\n\n"
          + report.targets(summary, list(workloads), links,
                           meta["downtime_limit_ms"]))
    for old in [*RESULTS.glob("round_*.png"), RESULTS / "downtime_vs_size.png"]:
        old.unlink(missing_ok=True)
    written = None
    if plots:
        sizes = {wl: spec["gib"] for wl, spec in workloads.items()}
        written = report.plots(summary, workloads, sizes, RESULTS)
        if written is None:
            _log("matplotlib is not installed: plots skipped "
                 "(.venv/bin/pip install '.[bench]')")
    if written:
        md += "\nPlots: " + ", ".join(f"[{p}]({p})" for p in written) + "\n"
    (RESULTS / "results.md").write_text(md)
    return table


def main(argv=None):
    """Run the comparison; print progress, then the Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 workloads, 1 repeat (about 2 minutes)")
    ap.add_argument("--repeat", type=int, help="repeats per case (3; quick: 1)")
    ap.add_argument("--timeout", type=float,
                    help="cancel a migration after this many seconds (60; quick: 30)")
    ap.add_argument("--downtime-ms", type=int, default=300,
                    help="downtime limit for both engines (QEMU's default, 300)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds the guest runs before each migration")
    ap.add_argument("--links", default=",".join(LINKS),
                    help="comma-separated subset of loopback,1gbit,wan")
    ap.add_argument("--wan-rtt-ms", type=float, default=20.0,
                    help="the wan link's round trip (20)")
    ap.add_argument("--only", help="run only workloads whose name contains this")
    ap.add_argument("--dirty-log-whole", action="store_true",
                    help="this engine's VMs offer only the whole dirty log, "
                         "read and cleared at once, as bhyve's: the engine's "
                         "path for bhyve (the test host's --dirty-log-whole)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--from-json", metavar="FILE",
                    help="run nothing: render results.md (and the plots) "
                         "again from a results.json")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(pathlib.Path(args.from_json).read_text())
        meta = saved["meta"]
        print(write_outputs(meta, saved["runs"], meta["workloads"], meta["links"],
                            plots=not args.no_plots))
        return 0
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.timeout = args.timeout or (30.0 if args.quick else 60.0)
    args.links = [x for x in args.links.split(",") if x]
    if not set(args.links) <= set(ALL_LINKS):
        ap.error(f"--links: choose from {', '.join(ALL_LINKS)}")
    workloads = QUICK if args.quick else FULL
    if args.only:
        workloads = {k: v for k, v in workloads.items() if args.only in k}
    check_host()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    meta = _meta(args, workloads, started)
    shutil.rmtree(RESULTS / "broken", ignore_errors=True)
    b0 = _machine_busy_s()
    time.sleep(1)
    meta["busy_before_pct"] = round((_machine_busy_s() - b0) * 100 / os.cpu_count())
    if meta["busy_before_pct"] > 20:
        _log(f"warning: the machine was {meta['busy_before_pct']}% busy before "
             "the start: other work disturbs these timings")
    busy0, own0 = _machine_busy_s(), _own_cpu_s()
    t0 = time.monotonic()
    runs, counter = [], [0, len(workloads) * len(args.links) * args.repeat * len(ORDER)]
    _log(f"{len(workloads)} workloads x {len(args.links)} links x {len(ORDER)} "
         f"engine configurations x {args.repeat} repeat(s); {meta['qemu']}; "
         f"link {RATE}; load average {os.getloadavg()[0]:.1f}")
    interrupted = False
    try:
        with Net(args.wan_rtt_ms if "wan" in args.links else None) as net:
            for name, spec in workloads.items():
                _log(f"{name} ({spec['mem']}, {spec['cmdline']})")
                try:
                    spec["fill_s"] = run_workload(name, spec, args, net, runs,
                                                  t0, counter)
                except Exception as exc:  # noqa: BLE001 - next workload
                    _log(f"  {name}: abandoned: {exc}")
                    spec["error"] = str(exc)
    except KeyboardInterrupt:
        interrupted = True
        _log("interrupted: writing what was measured so far")
    meta["wall_s"] = round(time.monotonic() - t0, 1)
    other = max(0.0, (_machine_busy_s() - busy0) - (_own_cpu_s() - own0))
    meta["other_cpu_s"] = round(other, 1)
    meta["other_cpu_pct"] = round(other * 100 / (meta["wall_s"] * os.cpu_count()))
    meta["interrupted"] = interrupted
    table = write_outputs(meta, runs, workloads, args.links, not args.no_plots)
    print(table)
    _log(f"wall time {_clock(t0)}; results in {RESULTS}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
