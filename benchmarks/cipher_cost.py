"""What sealing the page channels costs: the same migrations with and without.

    .venv/bin/python -P benchmarks/cipher_cost.py [--repeat 5] [--links loopback,1gbit]

Needs root, /dev/kvm and iproute2.  One guest (1 GiB, a 512 MiB working
set written in full, then paused so that every migration sends the same
pages once) is migrated again and again, alternating AES-256-GCM page
channels (the default) and ``encrypt=False`` (both halves; only for this
measurement), over loopback and over a veth pair shaped to 1 Gbit/s.
Pages go raw (``compress="off"``): this measures the cipher, not what
compression would save.  Prints, per link and mode, the medians of the
page throughput of round 0 (its bytes over its duration), the total time
and the CPU time of both engine processes, and the ratio encrypted /
plaintext.
"""

import argparse
import pathlib
import statistics
import sys
import tempfile

sys.path.append(str(pathlib.Path(__file__).resolve().parent))

from vsqemu.common import BenchError  # noqa: E402
from vsqemu.netns import Net  # noqa: E402
from vsqemu.ours import OursChain  # noqa: E402

from nova_bhyve.polling import poll  # noqa: E402
from nova_bhyve.testhost.console import parse_console  # noqa: E402

MODES = (("encrypted", True), ("plaintext", False))


def _ready(chain):
    r = parse_console(chain.console_text())
    return bool(r.heartbeats) and r.heartbeats[-1].passes >= 1


def measure(chain, link, encrypt, timeout):
    """One migration of the paused guest; returns (MB/s, total s, CPU s)."""
    chain.pause()
    # raw pages: the cipher's cost, not the encoder's choices
    res = chain.migrate(link, None, timeout, 300, encrypt=encrypt,
                        compress="off")
    if res["status"] != "ok":
        raise BenchError(f"migration failed: {res.get('note')}")
    rate = res["round_bytes"][0] / res["round_ms"][0] / 1e3
    return rate, res["total_s"], res["cpu_src_s"] + res["cpu_dst_s"]


def run(links, repeat, timeout):
    """Alternate the modes ``repeat`` times per link; return the samples."""
    samples = {(link, name): [] for link in links for name, _ in MODES}
    with Net() as net:
        chain = OursChain(tempfile.mkdtemp(prefix="nbc-"), net, "1G",
                          "mode=stress pattern=touch ws=512M")
        try:
            chain.boot()
            if not poll(lambda: _ready(chain), 120, 0.1):
                raise BenchError("the working set was not written within 120 s")
            for i in range(repeat):
                for link in links:
                    for name, encrypt in (MODES if i % 2 == 0 else MODES[::-1]):
                        samples[link, name].append(
                            measure(chain, link, encrypt, timeout))
                        print(f"  {link} {name} #{i + 1}: "
                              f"{samples[link, name][-1][0]:.0f} MB/s",
                              file=sys.stderr, flush=True)
        finally:
            chain.close()
    return samples


def report(samples, links):
    """Print medians and the encrypted / plaintext ratios."""
    print("| link | mode | round 0 MB/s | total s | CPU s (both ends) |")
    print("|---|---|---|---|---|")
    for link in links:
        med = {}
        for name, _ in MODES:
            s = samples[link, name]
            med[name] = [statistics.median(x[k] for x in s) for k in range(3)]
            rate, total, cpu = med[name]
            print(f"| {link} | {name} | {rate:.0f} | {total:.2f} | {cpu:.2f} |")
        e, p = med["encrypted"], med["plaintext"]
        print(f"| {link} | encrypted / plaintext | {e[0] / p[0]:.2f} | "
              f"{e[1] / p[1]:.2f} | {e[2] / p[2]:.2f} |")


def main(argv=None):
    """Run and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--links", default="loopback,1gbit")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args(argv)
    links = args.links.split(",")
    report(run(links, args.repeat, args.timeout), links)
    return 0


if __name__ == "__main__":
    sys.exit(main())
