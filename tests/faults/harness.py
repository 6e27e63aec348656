"""One guest moved between two network-namespace "hosts", with faults.

The source half runs in this process (its threads and sockets in the
source host's namespace), the destination half is ``nova-bhyve-migrate
receive`` in the other namespace, behind a frame-aware FaultyProxy on the
destination host.  A hop migrates the guest once, optionally injecting a
fault when the source reports a phase, then checks the invariants and
removes what the losing side leaves, as the driver does.
"""

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import time

from benchmarks.vsqemu import netns
from nova_bhyve.native.engine import Migration, MigrationError, Phase, Result
from tests.functional.migration_helpers import (
    TO_DEST,
    TO_SOURCE,
    FaultyProxy,
    assert_guest_continued,
    assert_guest_kept_running,
    crc32c,
    receiver_with_secret,
    stress_ready,
    wait_phase,
    wait_result,
)
from tests.functional.polling import wait_for

MiB = 1 << 20
STRESS = "mode=stress pattern=touch ws=16M"
TIMEOUT_S = 4           # both halves: a silent peer is given up after this
READY, COMMIT = 11, 12  # frame types (PROTOCOL.md)
PHASES = ("precopy", "iterate", "switchover", "verify", "commit")
FAULTS = ("kill_dest", "cancel", "link_cut", "flip", "inject", "stall",
          "abort", "force")


@dataclasses.dataclass
class Hop:
    """What one migration (with or without a fault) did."""

    fault: str = None
    phase: str = None
    fired_in: str = ""
    missed: bool = False    # the fault fired in another phase, or never
    moved: bool = False
    src_result: str = ""
    src_error: str = ""
    dst_report: str = ""
    note: str = ""
    seconds: float = 0.0
    failures: list = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        return not self.failures


def _socket_fds():
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                fds.add(fd)
        except OSError:
            pass
    return fds


_HELD_OPEN = ("LISTEN", "ESTAB", "CLOSE-WAIT", "SYN-SENT", "SYN-RECV")


def _tcp_sockets(ns):
    """TCP sockets in namespace ``ns`` that some process still holds open
    (orphans finishing their close, FIN-WAIT or TIME-WAIT, belong to none)."""
    out = subprocess.run(["ss", "-N", ns, "-Htan"], capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith(_HELD_OPEN)]


def _processes_under(path):
    """Pids whose command line mentions ``path``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmd:
            pids.append(int(pid))
    return pids


class Hosts:
    """Two namespaces joined by a veth pair and the guest moving between them."""

    def __init__(self, net, vms):
        self.net, self.vms = net, vms
        self.here = net.ns_a
        self.count = 0
        self.guest = None

    def _vm(self, ns, incoming):
        self.count += 1
        name = ("a" if ns == self.net.ns_a else "b") + str(self.count)
        return self.vms.start(name, mem="256M", incoming=incoming,
                              cmdline="" if incoming else STRESS)

    def boot(self):
        """Boot the stress guest on host a."""
        self.guest = self._vm(self.here, incoming=False)
        stress_ready(self.guest)

    def hop(self, fault=None, phase=None):
        """Migrate the guest to the other host; return the Hop."""
        run = _Run(self, fault, phase)
        t0 = time.monotonic()
        try:
            run.start()
            run.inject()
            run.finish()
        except AssertionError as exc:
            run.hop.failures.append(str(exc))
        finally:
            run.cleanup()
        run.hop.seconds = time.monotonic() - t0
        if not run.hop.ok:
            self._replace(run)
        return run.hop

    def _replace(self, run):
        """After a failed hop, start over with a fresh guest, so that one
        cell's failure (a guest paused everywhere) does not spill into the next."""
        for vm in (run.src, run.dst):
            if vm is not None and vm.alive():
                vm.kill()
            if vm is not None:
                shutil.rmtree(vm.rundir, ignore_errors=True)
        self.here = self.net.ns_a
        self.boot()


# ---- how each phase is reached ----

# polled phases: send() parameters that make the phase last (raw pages,
# no throttle: the engine's defaults would shorten them)
_RAW = dict(compress="off", auto_converge=False)
_STRETCH = {
    "precopy": dict(max_bandwidth=8 * MiB, **_RAW),
    "iterate": dict(max_bandwidth=32 * MiB, max_downtime_ms=1, **_RAW),
    "switchover": dict(max_downtime_ms=1, delta_cache=0, **_RAW),
}
# short phases: the frame held at the proxy while the fault fires
_HELD = {"verify": (TO_SOURCE, READY), "commit": (TO_DEST, COMMIT)}


def expected_moved(fault, phase):
    """Where the guest should end.  No fault and force-complete move it.
    With COMMIT held at the proxy: a cancel is too late and a cut link only
    loses the destination's RUNNING, so it moves; a destination killed
    after its READY leaves the outcome unknown to the source, and the
    control plane resumes the verified copy there (_settle_unknown); a
    destination that refuses the altered COMMIT or cancels says so, and the
    source takes the guest back.  Every other fault leaves it on the source."""
    if fault in (None, "force"):
        return True
    if fault == "kill_dest" and phase in ("verify", "commit"):
        return True     # settled by the control plane (_settle_unknown)
    if fault == "stall" and phase == "commit":
        return None     # REFUSE heard (stays) or not, then settled (moves)
    return phase == "commit" and fault in ("cancel", "link_cut")


def flip(frame):
    """The frame with one byte of its sealed body (or tag) flipped."""
    body = len(frame) - 16
    data = bytearray(frame)
    data[16 + body // 2] ^= 0x01
    return bytes(data)


def forged(frame):
    """A well-formed frame with a valid CRC and a forged tag, sent in
    ``frame``'s place in the sequence, then ``frame`` itself."""
    payload = os.urandom(32)
    hdr = bytes([frame[0], 1]) + frame[2:8] + len(payload).to_bytes(4, "little")
    return hdr + crc32c(hdr).to_bytes(4, "little") + payload + \
        os.urandom(16) + frame


class _Run:
    """One hop's moving parts."""

    def __init__(self, hosts, fault, phase):
        self.hosts, self.net = hosts, hosts.net
        self.hop = Hop(fault, phase)
        self.src = hosts.guest
        self.src_ns = hosts.here
        self.dst_ns = self.net.other(self.src_ns)
        self.dst = self.proc = self.proxy = self.send = None
        self.link_down = False

    def start(self):
        self.dst = self.hosts._vm(self.dst_ns, incoming=True)
        self.src.client.status(), self.dst.client.status()
        self.fds = _socket_fds()    # with both VMs' control connections
        self.proc, port, secret = receiver_with_secret(
            self.dst, netns=self.dst_ns, timeout=TIMEOUT_S)
        with netns.entered(self.dst_ns):
            self.proxy = FaultyProxy(port, frames=True,
                                     host=self.net.addr[self.dst_ns])
        if self.hop.phase in _HELD:
            way, mtype = _HELD[self.hop.phase]
            self.proxy.on_frame(0, way, mtype, self._held)
        with netns.entered(self.src_ns):
            self.send = Migration.send(
                vmm_target=str(self.src.socket_path),
                host=self.net.addr[self.dst_ns], port=self.proxy.port,
                secret=secret, timeout_ms=TIMEOUT_S * 1000,
                **_STRETCH.get(self.hop.phase, {}))

    # -- the fault --

    def inject(self):
        phase = self.hop.phase
        if phase is None or phase in _HELD:
            return
        wanted = Phase[phase.upper()]
        try:
            if phase == "switchover":
                wait_phase(self.send, [Phase.ITERATE])
                self.send.set_param("max_bandwidth", 1 * MiB)
                self.send.set_param("max_downtime_ms", 600000)
            wait_phase(self.send, [wanted])
        except AssertionError as exc:   # ended first: no fault, still checked
            self.hop.note = f"trigger missed: {exc}"
            return
        if phase == "precopy":
            wait_for(lambda: self.send.stats().bytes_transferred > 2 * MiB,
                     timeout=20, what="pages on the wire")
        if self.hop.fault in ("flip", "inject"):
            self.proxy.on_frame(1, TO_DEST, None, self._alter)
            return
        self.hop.fired_in = self.send.stats().phase.name.lower()
        self._fire()

    def _alter(self, frame):
        self.hop.fired_in = self.send.stats().phase.name.lower()
        return flip(frame) if self.hop.fault == "flip" else forged(frame)

    def _held(self, frame):
        """The held frame's action: fire in the source's phase, then forward."""
        wanted = Phase[self.hop.phase.upper()]
        try:
            wait_for(lambda: self.send.stats().phase == wanted, timeout=5,
                     what=f"the source in {wanted.name}")
        except AssertionError as exc:
            self.hop.note = str(exc)
        self.hop.fired_in = self.send.stats().phase.name.lower()
        if self.hop.fault in ("flip", "inject"):
            return self._alter(frame)
        self._fire()
        return b"" if self.hop.fault == "stall" else frame

    def _fire(self):
        fault = self.hop.fault
        if fault in ("kill_dest", "abort"):
            sig = signal.SIGKILL if fault == "kill_dest" else signal.SIGTERM
            os.kill(self.proc.pid, sig)
            try:        # the destination has ended before anything goes on
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        elif fault == "cancel":
            try:
                self.send.cancel()
            except MigrationError as exc:
                self.hop.note = f"cancel refused ({exc.kind.name}): {exc}"
        elif fault == "link_cut":
            self.net.link(self.src_ns, up=False)
            self.link_down = True
        elif fault == "stall":
            self.proxy.stall()
        elif fault == "force":
            self.send.force_complete()
            self.send.set_param("max_bandwidth", 0)
            self.send.set_param("max_downtime_ms", 300)

    # -- the outcome --

    def finish(self):
        s = wait_result(self.send, timeout=60)
        self.hop.src_result = s.result.name.lower()
        self.hop.src_error = f"{s.error_kind.name}: {s.error}" if s.error else ""
        try:
            out, _ = self.proc.communicate(timeout=TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the destination engine did not end") from None
        self.hop.dst_report = "".join(
            ln for ln in out.splitlines(True) if ln.startswith("result:")).strip()
        if self.hop.fault is not None and self.hop.fired_in != self.hop.phase:
            # a trigger missed its phase: the invariants are checked all the
            # same, against the phase the fault did fire in (or no fault)
            self.hop.missed = True
            self.hop.note = self.hop.note or \
                f"trigger missed: fired in {self.hop.fired_in or 'no phase'}"
        self._check_hosts(s)
        self._check_error(s)

    def _settle_unknown(self, s):
        """A source that sent COMMIT and then heard neither RUNNING nor a
        refusal cannot know whether the destination runs the guest; the
        control plane settles it as the Nova driver does (live.py, "handed
        over"): the destination's VM, paused with the state it verified
        before its READY, is resumed there (post_live_migration_at_
        destination); without one the source resumes its own copy, which it
        keeps intact until then."""
        if s.guest_runs_here or not s.committed:
            return
        state = self.dst.client.status()["state"] if self.dst.alive() else "gone"
        if state == "running":
            return
        if state == "paused":
            self.dst.client.resume()
            self.hop.note = "settled by the control plane: the destination's " \
                "verified copy resumed"
        else:
            self.src.client.resume()
            self.hop.note = "settled by the control plane: the source resumed"

    def _check_hosts(self, s):
        self._settle_unknown(s)
        states = [vm.client.status()["state"] if vm.alive() else "gone"
                  for vm in (self.src, self.dst)]
        running = states.count("running")
        assert running == 1, f"guest running on {running} hosts " \
            f"(source {states[0]}, destination {states[1]})"
        self.hop.moved = states[1] == "running"
        want = expected_moved(self.hop.fault if self.hop.fired_in else None,
                              self.hop.fired_in or None)
        if self.hop.fault in ("cancel", "abort") and s.result == Result.COMPLETED:
            want = True     # asked after the commit point: refused, too late
            self.hop.note = self.hop.note or "too late: after the commit point"
        assert want is None or self.hop.moved == want, \
            f"guest {'moved' if self.hop.moved else 'stayed'}, expected " \
            f"{'moved' if want else 'stayed'}"
        if self.hop.moved:
            assert not s.guest_runs_here
            assert_guest_continued(self.src, self.dst)
        else:
            # the engine's own word, unless the control plane settled it
            assert self.hop.note.startswith("settled") or (
                s.guest_runs_here and not s.committed)
            assert_guest_kept_running(self.src, self.dst)

    def _check_error(self, s):
        fault = self.hop.fault if self.hop.fired_in else None
        if fault is None or (self.hop.moved and s.result == Result.COMPLETED):
            assert s.result == Result.COMPLETED, s.error
            return
        words = CAUSE.get((fault, self.hop.fired_in)) or CAUSE[fault]
        text = f"{s.error_kind.name} {s.error}".lower()
        assert any(w in text for w in words), \
            f"error does not name the cause ({'|'.join(words)}): {self.hop.src_error}"

    def cleanup(self):
        if self.send is not None:
            self.send.wait(30)
            self.send.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proxy is not None:
            self.proxy.close()
        if self.link_down:
            self.net.link(self.src_ns, up=True)
        winner, loser = (self.dst, self.src) if self.hop.moved else (self.src, self.dst)
        if loser is not None:
            self._remove(loser, gently=self.hop.moved)
        if self.hop.moved:
            self.hosts.guest, self.hosts.here = winner, self.dst_ns
        try:
            self._check_left_behind()
        except AssertionError as exc:
            self.hop.failures.append(str(exc))

    def _remove(self, vm, gently):
        """What the driver does with the side that lost the guest."""
        if gently:
            vm.stop()
        elif vm.alive():
            vm.kill()
        shutil.rmtree(vm.rundir)

    def _check_left_behind(self):
        loser = self.src if self.hop.moved else self.dst
        if loser is None:
            return
        assert not _processes_under(loser.rundir), "a VM process was left behind"
        assert not os.path.exists(loser.rundir)
        left = []
        for _ in range(50):
            left = _tcp_sockets(self.net.ns_a) + _tcp_sockets(self.net.ns_b)
            if not left:
                break
            time.sleep(0.1)
        assert not left, f"TCP sockets or listeners left: {left}"
        left = _socket_fds() - self.fds
        assert not left, f"{len(left)} socket(s) left open in the source's process"


# words the source's error must contain (lower case), per fault (or cell)
CAUSE = {
    "kill_dest": ("peer_gone", "closed", "reset"),
    "cancel": ("cancel",),
    "link_cut": ("timeout", "timed out"),
    "flip": ("corrupt", "authentic", "tag"),
    "inject": ("corrupt", "authentic", "tag"),
    "stall": ("timeout", "timed out", "went silent"),
    "abort": ("abort",),
    "force": ("force",),
}
