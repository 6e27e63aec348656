"""The fault matrix and the soak (issue 11); doc/faults.md.

    .venv/bin/python -P tests/faults/matrix.py matrix [--faults F,..] [--phases P,..]
    .venv/bin/python -P tests/faults/matrix.py soak [--hops 100] [--every 3]

(-P: the installed nova_bhyve, with its compiled engine, not the source
tree's; the repository root is appended to the import path below.)

Needs root (network namespaces) and /dev/kvm.  Prints one line per hop
and a summary; ``--json FILE`` keeps every hop.
"""

import argparse
import dataclasses
import itertools
import json
import pathlib
import signal
import statistics
import sys

sys.path.append(str(pathlib.Path(__file__).resolve().parents[2]))

from benchmarks.vsqemu import netns  # noqa: E402
from tests.faults.harness import FAULTS, PHASES, Hosts  # noqa: E402
from tests.functional.conftest import VMFactory  # noqa: E402


def _line(i, hop):
    what = f"{hop.fault} @ {hop.phase}" if hop.fault else "clean"
    where = "moved" if hop.moved else "stayed"
    head = f"{i:3} {what:<24} {'ok ' if hop.ok else 'FAIL'} {where:<6} " \
        f"{hop.seconds:5.1f} s  {hop.src_error or hop.src_result}"
    extra = [f"    destination: {hop.dst_report}"] if hop.dst_report else []
    extra += [f"    note: {hop.note}"] if hop.note else []
    extra += [f"    ! {f}" for f in hop.failures]
    return "\n".join([head] + extra)


def run(cells, out=sys.stdout):
    """Run ``cells`` ((fault, phase) or (None, None)) as hops of one guest."""
    hops = []
    vms = VMFactory()
    try:
        with netns.Net() as net:
            hosts = Hosts(net, vms)
            hosts.boot()
            for i, (fault, phase) in enumerate(cells, 1):
                hop = hosts.hop(fault, phase)
                hops.append(hop)
                print(_line(i, hop), file=out, flush=True)
    finally:
        vms.cleanup()
    return hops


def matrix_table(hops, faults, phases):
    """Markdown: one row per fault, one column per phase."""
    cell = {(h.fault, h.phase): h for h in hops}
    rows = ["| fault | " + " | ".join(phases) + " |",
            "|---|" + "---|" * len(phases)]
    for f in faults:
        marks = []
        for p in phases:
            h = cell.get((f, p))
            marks.append("" if h is None else
                         ("ok" if h.ok else "**FAIL**") +
                         (" (moved" if h.moved else " (stayed") +
                         (f"; fired in {h.fired_in or 'none'})" if h.missed
                          else ")"))
        rows.append(f"| {f} | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def soak_cells(hops, every):
    """``hops`` migrations, a matrix cell at every ``every``-th one."""
    faults = itertools.cycle(itertools.product(FAULTS, PHASES))
    return [next(faults) if i % every == 0 else (None, None)
            for i in range(1, hops + 1)]


def summary(hops):
    """The soak's figures."""
    clean = [h.seconds for h in hops if h.fault is None]
    failed = [h for h in hops if not h.ok]
    missed = sum(h.missed for h in hops)
    moved = sum(h.moved for h in hops)
    return (f"{len(hops)} hops ({len(hops) - len(clean)} with a fault, "
            f"{missed} of those missed their phase), "
            f"{moved} moved the guest, {len(failed)} failed an invariant; "
            f"clean hop median {statistics.median(clean):.2f} s, "
            f"max {max(clean):.2f} s; total {sum(h.seconds for h in hops):.0f} s"
            if clean else f"{len(hops)} hops, {len(failed)} failed")


def main(argv=None):
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["matrix", "soak"])
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--hops", type=int, default=100)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the namespaces and VMs are removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    faults, phases = args.faults.split(","), args.phases.split(",")
    if args.what == "matrix":
        cells = list(itertools.product(faults, phases))
    else:
        cells = soak_cells(args.hops, args.every)
    hops = run(cells)
    if args.what == "matrix":
        print(matrix_table(hops, faults, phases))
    print(summary(hops))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(h) for h in hops], f, indent=1)
    return 0 if all(h.ok for h in hops) else 1


if __name__ == "__main__":
    sys.exit(main())
