"""Parse what the guest payload prints on COM1.

Line formats are specified in ``guest/README.md``: a ``NBGUEST`` banner,
``WS`` working-set ranges, with ``disk=1`` a ``DISK`` line, ``READY``, then
``HB <seq> <passes> <errors> [<disk passes>]`` heartbeats and ``FAIL ...``
lines for self-check failures.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """One heartbeat line."""

    seq: int
    passes: int
    errors: int
    disk_passes: int = None     # with disk=1: disk-writer passes completed


@dataclasses.dataclass
class ConsoleReport:
    """Everything the guest reported, in order."""

    banner: dict = dataclasses.field(default_factory=dict)
    ranges: list = dataclasses.field(default_factory=list)
    disk: dict = dataclasses.field(default_factory=dict)
    ready: bool = False
    heartbeats: list = dataclasses.field(default_factory=list)
    fails: list = dataclasses.field(default_factory=list)
    other: list = dataclasses.field(default_factory=list)

    @property
    def errors(self):
        """The guest's self-check error count (last heartbeat or FAIL lines)."""
        last = self.heartbeats[-1].errors if self.heartbeats else 0
        return max(last, len(self.fails))

    @property
    def last_seq(self):
        """Sequence number of the last heartbeat, 0 if none."""
        return self.heartbeats[-1].seq if self.heartbeats else 0

    def sequence_breaks(self):
        """Return (previous, next) pairs where seq did not increase by one."""
        breaks = []
        for prev, cur in zip(self.heartbeats, self.heartbeats[1:]):
            if cur.seq != prev.seq + 1:
                breaks.append((prev.seq, cur.seq))
        return breaks


def _is_heartbeat(words):
    """True for ``HB`` and 3 numbers, or 4 with the disk writer's passes."""
    return len(words) in (4, 5) and words[0] == "HB" and \
        all(w.isdigit() for w in words[1:])


def parse_console(text):
    """Parse console text into a ConsoleReport (a torn last line is ignored)."""
    report = ConsoleReport()
    lines = text.split("\n")
    for line in lines[:-1]:
        words = line.split()
        if not words:
            continue
        tag = words[0]
        if _is_heartbeat(words):
            report.heartbeats.append(Heartbeat(*(int(w) for w in words[1:])))
        elif tag == "FAIL":
            report.fails.append(line)
        elif tag == "NBGUEST":
            report.banner = dict(w.split("=", 1) for w in words[2:] if "=" in w)
        elif tag == "WS" and len(words) == 3:
            report.ranges.append((int(words[1], 16), int(words[2], 16)))
        elif tag == "DISK":
            report.disk = {k: int(v) for k, _, v in
                           (w.partition("=") for w in words[1:]) if v.isdigit()}
        elif tag == "READY":
            report.ready = True
        else:
            report.other.append(line)
    return report


def parse_tlog(text):
    """Parse a timestamped console log into (monotonic_ns, line) pairs."""
    entries = []
    for line in text.split("\n")[:-1]:
        stamp, _, rest = line.partition(" ")
        if stamp.isdigit():
            entries.append((int(stamp), rest))
    return entries


def timed_heartbeats(entries):
    """Return (monotonic_ns, Heartbeat) for the heartbeat lines among
    ``entries``, the (monotonic_ns, line) pairs of parse_tlog."""
    return [(ns, Heartbeat(*(int(w) for w in words[1:])))
            for ns, line in entries if _is_heartbeat(words := line.split())]


def largest_heartbeat_gap(entries, min_seq=0, max_seq=None):
    """Return (gap_seconds, seq_before) for the widest gap between heartbeats.

    ``entries`` are (monotonic_ns, line) pairs, possibly merged from the
    logs of a migration's source and destination; heartbeats numbered below
    ``min_seq`` (or above ``max_seq``, when given) are ignored.
    """
    beats = sorted((ns, hb.seq) for ns, hb in timed_heartbeats(entries)
                   if min_seq <= hb.seq and (max_seq is None or hb.seq <= max_seq))
    best = (0.0, 0)
    for (t0, s0), (t1, _s1) in zip(beats, beats[1:]):
        gap = (t1 - t0) / 1e9
        if gap > best[0]:
            best = (gap, s0)
    return best
