"""Medians, the Markdown table and the plots of benchmarks/compare_qemu.py."""

import statistics

CONFIG_LABEL = {"ours": "**nova-bhyve**", "qemu-default": "QEMU default",
                "qemu-xbzrle": "QEMU xbzrle", "qemu-multifd": "QEMU multifd"}
NAMES = {"ours": "nova-bhyve", "qemu-default": "QEMU default",
         "qemu-xbzrle": "QEMU unlimited + xbzrle",
         "qemu-multifd": "QEMU unlimited + xbzrle + multifd"}
COLORS = {"ours": "tab:blue", "qemu-default": "tab:gray",
          "qemu-xbzrle": "tab:orange", "qemu-multifd": "tab:red"}
METRICS = ("total_s", "guest_downtime_ms", "wire_bytes", "rounds", "cpu_src_s",
           "cpu_dst_s")
EXTRA = ("reported_downtime_ms", "predicted_downtime_ms", "payload_bytes")


def summarize(runs):
    """Group runs by (workload, link, config); return a list of medians."""
    groups = {}
    for r in runs:
        groups.setdefault((r["workload"], r["link"], r["config"]), []).append(r)
    out = []
    for (wl, link, cfg), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        row = {"workload": wl, "link": link, "config": cfg, "runs": len(rs),
               "ok": len(ok), "dnf": sum(r["status"] == "dnf" for r in rs),
               "errors": sum(r["status"] == "error" for r in rs),
               # disk workloads: runs whose moved disk failed its check
               # (vsqemu/disk.py); their figures count, the row is marked
               "disk_fail": sum(r.get("disk_ok") is False for r in ok),
               # runs whose widest heartbeat gap was the switch-over's
               # (else the guest stalled during pre-copy or just after)
               "gap_at_switch": sum(bool(r.get("gap_at_switchover")) for r in ok)}
        for m in METRICS + EXTRA:
            vals = [r[m] for r in ok if r.get(m) is not None]
            row[m] = statistics.median(vals) if vals else None
        if ok:
            # the run whose total time is the median one, for the round plots
            ok.sort(key=lambda r: r["total_s"])
            rep = ok[(len(ok) - 1) // 2]
            row["round_ms"], row["round_bytes"] = rep["round_ms"], rep["round_bytes"]
        out.append(row)
    return out


def _fmt(metric, v):
    if v is None:
        return "—"
    if metric == "total_s":
        return f"{v:.2f}"
    if metric.endswith("_ms"):
        return f"{v:.1f}"
    if metric == "wire_bytes":
        return f"{v / 1e6:.0f}" if v >= 1e7 else f"{v / 1e6:.1f}"
    if metric == "rounds":
        return f"{v:g}"
    return f"{v:.2f}"


def _cell(metric, row, ours):
    if row["ok"] == 0:
        if row["dnf"]:
            return "did not finish"
        return "error"
    text = _fmt(metric, row[metric])
    if ours is not None and row["config"] != "ours":
        a, b = (ours or {}).get(metric), row[metric]
        if ours.get("ok") and a is not None and b:
            text += f" ({a / b:.2f})"
        elif ours.get("ok") and a is not None and b == 0:
            text += " (—)"
    return text


def _pause(row):
    """This engine's predicted and measured pause (QEMU rows: —)."""
    p, m = row.get("predicted_downtime_ms"), row.get("reported_downtime_ms")
    if row["config"] != "ours" or p is None or m is None:
        return "—"
    return f"{p:.1f} / {m:.1f}"


def markdown(summary, workloads, links):
    """Render the medians as one Markdown table."""
    head = ("| workload | link | engine | total s | guest downtime ms | "
            "on the wire MB | rounds | CPU source s | CPU destination s | "
            "pause predicted / engine-measured ms |")
    lines = [head, "|" + "---|" * 10]
    index = {(r["workload"], r["link"], r["config"]): r for r in summary}
    for wl in workloads:
        for link in links:
            ours = index.get((wl, link, "ours"))
            first = True
            for cfg in CONFIG_LABEL:
                row = index.get((wl, link, cfg))
                if row is None:
                    continue
                cells = [_cell(m, row, ours) for m in METRICS] + [_pause(row)]
                n = f" ({row['ok']}/{row['runs']})" if row["ok"] < row["runs"] else ""
                if row.get("disk_fail"):
                    n += f" (disk check ✗ in {row['disk_fail']}/{row['ok']})"
                lines.append(f"| {wl if first else ''} | {link if first else ''} | "
                             f"{CONFIG_LABEL[cfg]}{n} | " + " | ".join(cells) + " |")
                first = False
    return "\n".join(lines) + "\n"


def _ratio_mark(ours, best, limit):
    if best is None:
        return "— (no QEMU finished) ✓"
    if not best:
        return "—"
    r = ours / best
    return f"{r:.2f} {'✓' if r <= limit else '✗'}"


def targets(summary, workloads, links, downtime_limit_ms):
    """Issue 12's targets for every row, met (✓) or missed (✗): this
    engine's defaults finish within the downtime limit; total time and
    guest downtime at most half the best QEMU configuration's, bytes at
    most the fewest QEMU sent; idle guests at most 5 ms of downtime.  The
    last column, not a target, says in how many of this engine's runs the
    widest gap was the switch-over's, not a stall before or after it."""
    lines = ["| workload | link | finished within the limit | total ÷ best QEMU "
             "(≤ 0.5) | downtime ÷ best QEMU (≤ 0.5) | bytes ÷ fewest QEMU (≤ 1) "
             "| idle: downtime ≤ 5 ms | widest gap at the switch-over |",
             "|" + "---|" * 8]
    index = {(r["workload"], r["link"], r["config"]): r for r in summary}
    for wl in workloads:
        for link in links:
            ours = index.get((wl, link, "ours"))
            if ours is None:
                continue
            qemus = [index[(wl, link, c)] for c in CONFIG_LABEL
                     if c != "ours" and (wl, link, c) in index
                     and index[(wl, link, c)]["ok"]]
            done = ours["ok"] == ours["runs"] and ours["ok"] > 0 and \
                ours["guest_downtime_ms"] <= downtime_limit_ms and \
                not ours.get("disk_fail")
            cells = [f"{ours['ok']}/{ours['runs']} {'✓' if done else '✗'}"]
            for m, pick, limit in (("total_s", min, 0.5),
                                   ("guest_downtime_ms", min, 0.5),
                                   ("wire_bytes", min, 1.0)):
                best = pick((q[m] for q in qemus), default=None)
                cells.append(_ratio_mark(ours[m], best, limit) if ours["ok"]
                             else "✗")
            idle = "—"
            if wl.startswith("idle") and ours["ok"]:
                d = ours["guest_downtime_ms"]
                idle = f"{d:.1f} {'✓' if d <= 5.0 else '✗'}"
            cells.append(idle)
            cells.append(f"{ours['gap_at_switch']}/{ours['ok']}"
                         if ours["ok"] else "—")
            lines.append(f"| {wl} | {link} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(summary, workloads, sizes, outdir):
    """Write round_*.png and downtime_vs_size.png; return the files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    index = {(r["workload"], r["link"], r["config"]): r for r in summary}
    colors, names = COLORS, NAMES
    written = []
    links = sorted({r["link"] for r in summary}, key=["loopback", "1gbit", "wan"].index)
    for wl, spec in workloads.items():
        if spec["kind"] == "idle":
            continue
        for link in links:
            rows = [index.get((wl, link, c)) for c in colors]
            rows = [r for r in rows if r and r.get("round_ms")]
            if not rows:
                continue
            fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
            width = 0.8 / len(rows)
            for k, r in enumerate(rows):
                xs = [i + (k - (len(rows) - 1) / 2) * width
                      for i in range(len(r["round_ms"]))]
                kw = {"width": width, "color": colors[r["config"]],
                      "label": names[r["config"]]}
                ax1.bar(xs, r["round_ms"], **kw)
                ax2.bar(xs, [b / 1e6 for b in r["round_bytes"]], **kw)
            ax1.set_yscale("log")
            ax2.set_yscale("log")
            ax2.set_xticks(range(max(len(r["round_ms"]) for r in rows)))
            ax1.set_ylabel("round duration (ms)")
            ax2.set_ylabel("sent in round (MB)")
            ax2.set_xlabel("round (0 = first full copy; last = guest stopped)")
            ax1.set_title(f"{wl}, {link}: pre-copy rounds (median run)")
            ax1.legend()
            fig.tight_layout()
            path = outdir / f"round_{slug(wl)}_{link}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path.name)
    fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4),
                             squeeze=False)
    for ax, link in zip(axes[0], links):
        for series, marker, style in (("idle", "o", "-"), ("touch", "s", "--")):
            for cfg in colors:
                pts = []
                for wl, spec in workloads.items():
                    if spec["series"] != series:
                        continue
                    r = index.get((wl, link, cfg))
                    if r and r["guest_downtime_ms"] is not None:
                        pts.append((sizes[wl], r["guest_downtime_ms"]))
                if pts:
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                            marker=marker, color=colors[cfg],
                            label=f"{names[cfg]}, {series}")
        ax.set_title(f"guest-visible downtime, {link}")
        ax.set_xlabel("guest RAM (GiB)")
        ax.set_ylabel("largest heartbeat gap (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(outdir / "downtime_vs_size.png", dpi=110)
    plt.close(fig)
    written.append("downtime_vs_size.png")
    return written


def slug(name):
    """A file-name-safe form of a workload name."""
    name = name.replace("%", "pct")
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")
