"""Live-migration policy: downtime steps, completion timeout, progress.

Pure functions of the ``[bhyve] live_migration_*`` options and the engine's
statistics, with the libvirt driver's semantics where an option mirrors
one of ``[libvirt]``.
"""

from nova_bhyve.native.engine import ErrorKind, Result

GiB = 1 << 30
MiB = 1 << 20
MIN_DATA_GB = 2           # as libvirt: small guests count as 2 GiB
DISK_BLOCK = 4096         # the engine's disk block (PROTOCOL.md, "Disk records")


def data_gb(memory_mb, disk_bytes=()):
    """GiB a migration moves, for the step and timeout scaling (libvirt's rule).

    Memory counts at least 2 GiB, and so does each copied disk.
    """
    total = max(MIN_DATA_GB, memory_mb / 1024)
    for size in disk_bytes:
        total += max(MIN_DATA_GB, size / GiB)
    return total


def downtime_steps(conf, gb):
    """Return [(seconds, max downtime ms)]: the allowed downtime over time."""
    downtime = conf.live_migration_downtime
    steps = conf.live_migration_downtime_steps
    delay = int(conf.live_migration_downtime_delay * gb)
    base = downtime / steps
    offset = (downtime - base) / steps
    return [(delay * i, int(base + offset * i)) for i in range(steps + 1)]


def downtime_at(steps, elapsed):
    """Return the downtime allowed ``elapsed`` seconds into the migration."""
    allowed = steps[0][1]
    for when, value in steps:
        if elapsed >= when:
            allowed = value
    return allowed


def round_trips_exceed_limit(stats):
    """Whether a switch-over's two control round trips alone reach the
    downtime allowed now (no round and no throttle shortens them)."""
    return 2 * stats.rtt_ms >= stats.max_downtime_ms


def completion_timeout(conf, gb):
    """Return the completion timeout in seconds (0: none)."""
    return int(conf.live_migration_completion_timeout * gb)


def memory_progress(stats):
    """Return (total, processed, remaining) bytes of guest memory."""
    total = stats.mem_total
    if stats.round == 0:
        remaining = max(0, total - stats.bytes_transferred)
    else:
        remaining = min(total, stats.bytes_remaining)
    if stats.finished and stats.committed:
        remaining = 0
    return total, stats.bytes_transferred, remaining


def disk_progress(stats):
    """Return (total, processed, remaining) bytes of the disks moved.

    Processed counts every block sent, a block the guest rewrote once per
    copy; remaining is what round 0 has not read yet, then the blocks
    pending at the last sync.
    """
    total = stats.disk_total
    processed = stats.disk_blocks * DISK_BLOCK
    if stats.finished and stats.committed:
        remaining = 0
    elif stats.round == 0:
        remaining = max(0, total - processed)
    else:
        remaining = min(total, stats.dirty_blocks * DISK_BLOCK)
    return total, processed, remaining


def percent_done(total, remaining):
    """Return the instance progress (0..100) for memory left to copy."""
    if total <= 0:
        return 0
    return max(0, min(100, 100 - round(remaining * 100 / total)))


def summary(stats, throttle_peak=0):
    """Return the one-line account of a finished migration.

    The downtime is the engine's measure: from pausing the guest on the
    source until the destination reports it running (never shown below 0);
    ``predicted`` the pause the engine expected when it chose to switch;
    ``disk_bytes`` and ``disk_blocks`` what the disks cost on the wire
    (0 when none moved: a shared instances path); ``pause`` the
    downtime's parts: stopping the guest, the final round, the
    destination's verification, the commit.
    """
    return (f"mode={stats.mode.name.lower()} "
            f"downtime={max(0.0, stats.downtime_ms):.1f}ms "
            f"total={stats.total_ms:.0f}ms "
            f"bytes={stats.bytes_transferred} "
            f"rounds={len(stats.rounds)} "
            f"throttle={throttle_peak}% "
            f"predicted={max(0.0, stats.expected_downtime_ms):.1f}ms "
            f"pause={pause_parts(stats)} "
            f"disk_bytes={stats.disk_bytes} disk_blocks={stats.disk_blocks}")


def pause_parts(stats):
    """Return the measured pause's parts as 'stop/final/verify/commit' ms."""
    parts = (stats.pause_stop_ms, stats.pause_final_ms,
             stats.pause_verify_ms, stats.pause_commit_ms)
    return "/".join(f"{max(0.0, p):.1f}" for p in parts) + "ms"


def round_lines(stats):
    """Return one line per round, then the pages by encoding, for the log.

    Each line gives the dirty pages counted before the round and the
    pause that count predicted.  The last round is the one the guest was
    paused for: its duration is the source's part of the pause, its
    prediction the one the switch-over was made on.
    """
    lines = [f"round {i}: {r.duration_ms:.0f}ms pages={r.pages} "
             f"bytes={r.bytes} dirty={r.dirty} "
             f"expected={r.expected_ms:.1f}ms throttle={r.throttle}% "
             f"log_reads={r.log_reads}"
             for i, r in enumerate(stats.rounds)]
    lines.append(f"pages: zero={stats.pages_zero} delta={stats.pages_delta} "
                 f"compressed={stats.pages_compressed} raw={stats.pages_raw} "
                 f"delta_cache={stats.delta_cache_bytes // MiB}MiB "
                 f"rtt={stats.rtt_ms:.2f}ms channels={stats.channels} "
                 f"bandwidth={_bandwidth(stats.bandwidth)}")
    return lines


def _bandwidth(bps):
    """The link's measured bandwidth for the log (0: no round timed it)."""
    return f"{bps / MiB:.1f}MiB/s" if bps else "unmeasured"


def outcome(stats, aborted):
    """What the engine's end means for Nova, from its final stats.

    ``completed``: post-migration runs.  ``handed_over``: the source
    passed COMMIT, so the destination owns the guest whatever broke after
    (post-migration runs there).  ``cancelled``: the driver aborted (on
    request or at the completion timeout) and the guest stays here.
    ``failed``: any other error kind; the guest stays here.
    """
    if stats is not None and stats.result == Result.COMPLETED:
        return "completed"
    if stats is not None and stats.committed:
        return "handed_over"
    if aborted:
        return "cancelled"
    return "failed"


def failure_kind(stats):
    """The engine's error kind for a migration that did not complete."""
    if stats is None or stats.result == Result.COMPLETED:
        return ErrorKind.NONE
    return stats.error_kind
