"""QEMU side: boot the guest payload under QEMU and migrate it over QMP."""

import json
import pathlib
import select
import shutil
import socket
import subprocess
import sys
import time

from nova_bhyve import polling
from nova_bhyve.testhost import artifacts
from vsqemu import disk as vdisk
from vsqemu import qemu_disk
from vsqemu.common import (
    BenchError,
    cpu_outside_guest,
    guest_cpus,
    iface_bytes,
    judge,
    last_seq,
    read_tlog,
    vmm_cpu,
    wait_for,
)

QEMU = "qemu-system-x86_64"
QBOOT = "/usr/share/qemu/qboot.rom"
_READER = pathlib.Path(__file__).resolve().parent / "tlog_reader.py"
UNLIMITED = 100 << 30      # bytes/s: "max-bandwidth" has no "unlimited" value

CAPABILITIES = ("xbzrle", "multifd", "auto-converge", "events")
# QEMU 7.2's defaults (xbzrle cache 64 MiB; the tuned configurations size it
# to the working set, below).
DEFAULT_PARAMS = {"max-bandwidth": 128 << 20, "multifd-channels": 2,
                  "xbzrle-cache-size": 64 << 20}
# QEMU configurations (capabilities, parameters), the same on both links.
# "default" changes nothing but the downtime limit (whose default, 300 ms,
# is also the comparison's unless --downtime-ms says otherwise), so it keeps
# the 128 MiB/s bandwidth cap.  The tuned ones lift the cap and add xbzrle,
# then multifd (2 channels) as well: in QEMU 7.2 a multifd migration sends
# every page through the multifd threads, which bypass xbzrle, so the two
# tuned configurations differ in more than the channel count.
_TUNED = {"max-bandwidth": UNLIMITED}


def xbzrle_cache_for(cmdline):
    """The xbzrle cache a user tuning QEMU would give this guest: the
    working set (``ws=`` of the payload's command line) rounded up to a
    power of two, at least QEMU's default 64 MiB."""
    size = DEFAULT_PARAMS["xbzrle-cache-size"]
    for tok in cmdline.split():
        if tok.startswith("ws=") and tok[3:-1].isdigit():
            ws = int(tok[3:-1]) << {"K": 10, "M": 20, "G": 30}.get(tok[-1], 0)
            while size < ws:
                size <<= 1
    return size
CONFIGS = {
    "qemu-default": ([], {}),
    "qemu-xbzrle": (["xbzrle"], _TUNED),
    "qemu-multifd": (["xbzrle", "multifd"], dict(_TUNED, **{"multifd-channels": 2})),
}


def qemu_version():
    """Return QEMU's version line."""
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True,
                         check=True).stdout
    return out.splitlines()[0]


class QMP:
    """A minimal QMP client on a unix socket."""

    def __init__(self, path, timeout=20.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.events = []                # events seen while waiting for replies
        wait_for(lambda: self._try_connect(path), timeout, f"QMP at {path}")
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self._read()                                    # greeting
        self.cmd("qmp_capabilities")

    def _try_connect(self, path):
        try:
            self.sock.connect(str(path))
            return True
        except OSError:
            return False

    def _read(self):
        line = self.file.readline()
        if not line:
            raise BenchError("QEMU closed its QMP socket")
        return json.loads(line)

    def cmd(self, name, args=None):
        """Execute one command; return its "return" value."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise BenchError(f"QMP {name}: {reply['error'].get('desc')}")
            return reply.get("return")

    def close(self):
        """Close the connection."""
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class QemuVM:
    """One QEMU process running (or waiting to receive) the guest payload."""

    def __init__(self, name, rundir, ns, popen, reader):
        self.name, self.rundir, self.ns = name, pathlib.Path(rundir), ns
        self.popen, self.reader, self.qmp = popen, reader, None

    @property
    def pid(self):
        """The QEMU process id (``ip netns exec`` execs QEMU in place)."""
        return self.popen.pid

    @property
    def console_path(self):
        """Raw COM1 bytes."""
        return self.rundir / "console.log"

    @property
    def tlog_path(self):
        """COM1 lines stamped on arrival."""
        return self.rundir / "console.tlog"

    @classmethod
    def start(cls, name, rundir, mem, cmdline, ns, incoming=False, disk=None):
        """Start QEMU in namespace ``ns``; the guest runs once the console is read.

        With a ``disk`` (a raw file): the i440FX machine with the disk on
        its IDE, and an incoming QEMU keeps the guest paused after the
        migration (``-S``, qemu_disk's flow)."""
        rundir = pathlib.Path(rundir)
        rundir.mkdir(parents=True)
        con, qmp = rundir / "con", rundir / "qmp.sock"
        vm = cls(name, rundir, ns, None, None)
        try:
            # the console reader creates and opens the pipes before QEMU does
            vm.reader = subprocess.Popen(
                [sys.executable, "-P", str(_READER), str(con),
                 str(vm.console_path), str(vm.tlog_path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                start_new_session=True)
            ready, _, _ = select.select([vm.reader.stdout], [], [], 20)
            if not ready or vm.reader.stdout.readline().strip() != b"ready":
                raise BenchError(f"console reader of {name} did not start")
            argv = (["ip", "netns", "exec", ns] if ns else []) + [
                QEMU, "-name", f"{name},debug-threads=on",
                "-machine", ("pc" if disk else "q35") + ",accel=kvm",
                "-cpu", "host,-arch-capabilities",
                "-m", str(mem), "-smp", str(guest_cpus(cmdline)),
                "-nodefaults", "-display", "none",
                "-bios", QBOOT, "-kernel", str(artifacts.guest_kernel()),
                "-append", cmdline,
                "-qmp", f"unix:{qmp},server=on,wait=off",
                "-chardev", f"pipe,id=con,path={con}", "-serial", "chardev:con",
            ] + (qemu_disk.drive_args(disk) if disk else []) + (
                ["-incoming", "defer"] if incoming else []) + (
                ["-S"] if disk or not incoming else [])
            with open(rundir / "qemu.log", "wb") as log:
                vm.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            wait_for(lambda: qmp.exists() or vm.popen.poll() is not None, 20,
                     f"QEMU {name} to start")
            if vm.popen.poll() is not None:
                raise BenchError(f"QEMU {name} exited: {vm.log_tail()}")
            vm.qmp = QMP(qmp)
            if not incoming:
                vm.qmp.cmd("cont")
        except BaseException:
            vm.kill()
            raise
        return vm

    def log_tail(self, n=800):
        """The end of QEMU's own output."""
        try:
            return (self.rundir / "qemu.log").read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def pause(self):
        """Stop the vCPUs (QMP ``stop``)."""
        self.qmp.cmd("stop")

    def resume(self):
        """Run the vCPUs again (QMP ``cont``)."""
        self.qmp.cmd("cont")

    def alive(self):
        """True while QEMU runs."""
        return self.popen is not None and self.popen.poll() is None

    def kill(self):
        """End QEMU and its console reader."""
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.kill()
            self.popen.wait()
        if self.reader is not None:
            try:
                self.reader.wait(5)
            except subprocess.TimeoutExpired:
                self.reader.kill()
                self.reader.wait()
            self.reader.stdout.close()
            self.reader = None


class QemuChain:
    """One guest under QEMU, migrated again and again (each target becomes
    the next source), so it is booted and its working set written once."""

    engine = "qemu"

    def __init__(self, base, net, mem, cmdline, disk=None):
        self.base, self.net, self.mem, self.cmdline = base, net, mem, cmdline
        self.count = 0
        self.vm = None
        self.keep = None        # where to copy consoles whose heartbeats broke
        self.disk = disk        # the image the first guest boots with

    def _new(self, ns, incoming):
        self.count += 1
        name = f"q{self.count}"
        disk = None
        if self.disk:
            pathlib.Path(self.base).mkdir(parents=True, exist_ok=True)
            disk = f"{self.base}/{name}.img"
            if incoming:
                with open(disk, "wb") as f:
                    f.truncate(pathlib.Path(self.disk).stat().st_size)
            else:
                vdisk.copy_sparse(self.disk, disk)
        vm = QemuVM.start(name, f"{self.base}/{name}", self.mem, self.cmdline,
                          ns, incoming=incoming, disk=disk)
        vm.disk_path = disk
        return vm

    def boot(self):
        """Boot the guest in the first namespace."""
        self.vm = self._new(self.net.ns_a, incoming=False)

    def console_text(self):
        """What the guest printed on its current host."""
        try:
            return self.vm.console_path.read_text("ascii", "replace")
        except FileNotFoundError:
            return ""

    def pause(self):
        """Stop the guest while the other engine runs."""
        self.vm.pause()

    def resume(self):
        """Let the guest run again."""
        self.vm.resume()

    def migrate(self, link, config, timeout, downtime_ms):
        """Migrate to a fresh QEMU over ``link``; return the measurements."""
        src = self.vm
        dst_ns, addr, ifname = self.net.route(link, src.ns)
        caps, params = CONFIGS[config]
        params = dict(DEFAULT_PARAMS, **params, **{"downtime-limit": downtime_ms})
        if "xbzrle" in caps:    # tuned as a user would: the working set fits
            params["xbzrle-cache-size"] = xbzrle_cache_for(self.cmdline)
        dst = self._new(dst_ns, incoming=True)
        try:
            res = self._migrate(src, dst, addr, ifname, caps, params, timeout)
        except BaseException:
            self._drop(dst)
            raise
        if res["status"] == "ok":
            self.vm = dst
            res.update(judge(src, dst, res.pop("start_seq"),
                             self.keep and f"{self.keep}/{dst.name}"))
            src.kill()
            if self.disk:
                res.update(vdisk.verify_moved(
                    _text(src.console_path), lambda: _text(dst.console_path),
                    dst.pause, dst.resume, src.disk_path, dst.disk_path,
                    vdisk.region_bytes(self.cmdline)))
                pathlib.Path(src.disk_path).unlink()
        else:
            self._drop(dst)
            res.pop("start_seq")
        return res

    @staticmethod
    def _drop(vm):
        vm.kill()
        if vm.disk_path:
            pathlib.Path(vm.disk_path).unlink(missing_ok=True)

    def _migrate(self, src, dst, addr, ifname, caps, params, timeout):
        # a QEMU that was a destination keeps what it was told then: set all
        # "events" only adds MIGRATION_PASS events, stamped at every dirty sync
        capl = [{"capability": c, "state": c in caps or c == "events"}
                for c in CAPABILITIES]
        for vm in (src, dst):
            vm.qmp.cmd("migrate-set-capabilities", {"capabilities": capl})
            vm.qmp.cmd("migrate-set-parameters", params)
        dst.qmp.cmd("migrate-incoming", {"uri": f"tcp:{addr}:0"})
        port = dst.qmp.cmd("query-migrate")["socket-address"][0]["port"]
        beats = read_tlog(src.tlog_path)
        start_seq = last_seq(beats) + 1
        cpu0 = vmm_cpu(src.pid), vmm_cpu(dst.pid)
        wire0 = iface_bytes(dst.ns, ifname)
        src.qmp.events.clear()
        t0, real0 = time.monotonic(), time.time()
        mirror = qemu_disk.Mirror(src, dst, addr) if self.disk else None
        if mirror and not mirror.start(timeout):
            return {"status": "dnf", "start_seq": start_seq,
                    "wire_bytes": iface_bytes(dst.ns, ifname) - wire0,
                    "note": "drive-mirror not READY in time"}
        mirror_wire = iface_bytes(dst.ns, ifname) - wire0
        t_mig, real0 = time.monotonic(), time.time()
        src.qmp.cmd("migrate", {"uri": f"tcp:{addr}:{port}"})
        samples, info, cancelled = [], {}, False
        while True:
            info = src.qmp.cmd("query-migrate")
            ram = info.get("ram", {})
            status = info.get("status")
            # QEMU's own clock (total-time so far), the one its final total uses
            samples.append((info.get("total-time", 0) / 1e3, time.time() - real0,
                            ram.get("transferred", 0)))
            if status in ("completed", "failed", "cancelled"):
                break
            if not cancelled and time.monotonic() - t_mig > timeout:
                src.qmp.cmd("migrate_cancel")
                cancelled = True
            if cancelled and time.monotonic() - t_mig > timeout + 20:
                raise BenchError("QEMU did not cancel its migration")
            time.sleep(0.01)
        wall = time.monotonic() - t_mig
        # "completed" shows a moment before total-time and downtime are set
        if status == "completed" and not info.get("total-time"):
            info = polling.poll(lambda: _with_total_time(src), 1.0, 0.01) or \
                src.qmp.cmd("query-migrate")
        if mirror and status == "completed":
            t_end = time.monotonic()
            mirror.finish()
            finish_s = time.monotonic() - t_end
        elif mirror:
            mirror.abort()
        if status == "completed":
            if not dst.alive():
                raise BenchError(f"QEMU destination died: {dst.log_tail(300)}")
            wait_for(lambda: dst.qmp.cmd("query-status")["status"] == "running",
                     20, "the QEMU destination to run the guest")
        cpu1 = vmm_cpu(src.pid), vmm_cpu(dst.pid)
        wire1 = iface_bytes(dst.ns, ifname)
        ram = info.get("ram", {})
        res = {
            "status": {"completed": "ok", "cancelled": "dnf"}.get(status, "error"),
            "start_seq": start_seq,
            "total_s": (info.get("total-time") or wall * 1e3) / 1e3,
            "wall_s": wall,
            "reported_downtime_ms": info.get("downtime"),
            "wire_bytes": wire1 - wire0,
            "payload_bytes": ram.get("transferred", 0),
            "dirty_syncs": ram.get("dirty-sync-count", 0),
            "cpu_src_s": cpu_outside_guest(cpu0[0], cpu1[0]),
            "cpu_dst_s": cpu_outside_guest(cpu0[1], cpu1[1]),
            "xbzrle": info.get("xbzrle-cache"),
        }
        if status == "failed":
            res["note"] = f"{info.get('error-desc', 'failed')}; {dst.log_tail(300)}"
        syncs = [e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                 - real0 for e in src.qmp.events if e["event"] == "MIGRATION_PASS"]
        res.update(_rounds(samples, syncs, res["total_s"], info.get("downtime") or 0,
                           ram.get("transferred", 0)))
        if mirror:
            # from the mirror's start to the guest running on the destination;
            # the mirror up to READY counts as a round of its own (round 0)
            res["total_s"] = time.monotonic() - t0 if status == "completed" \
                else res["total_s"] + mirror.ready_s
            res["round_ms"] = [round(mirror.ready_s * 1e3, 2)] + res["round_ms"]
            res["round_bytes"] = [mirror_wire] + res["round_bytes"]
            res.update(disk_allocated_bytes=vdisk.allocated(src.disk_path),
                       mirror_ready_s=mirror.ready_s, mirror_wire_bytes=mirror_wire,
                       ram_total_s=wall)
            if status == "completed":
                res["disk_finish_s"] = finish_s
        res["rounds"] = len(res["round_ms"])
        return res

    def close(self):
        """Stop the guest and remove its files."""
        if self.vm is not None:
            self.vm.kill()
            self.vm = None
        shutil.rmtree(self.base, ignore_errors=True)




def _text(path):
    try:
        return pathlib.Path(path).read_text("ascii", "replace")
    except FileNotFoundError:
        return ""


def _with_total_time(vm):
    """QEMU's query-migrate once it carries total-time, else None."""
    info = vm.qmp.cmd("query-migrate")
    return info if info.get("total-time") else None


def _rounds(samples, syncs, total_s, downtime_ms, final_bytes):
    """Rounds that sent pages, from QEMU's dirty-sync events and byte samples.

    A round starts at each dirty sync (MIGRATION_PASS event) before the
    guest stopped, at total time - downtime; the sync that decided to stop
    (right before it) and the one after it feed the last round, as in this
    project's engine.  Bytes per round come from ``query-migrate`` samples
    (10 ms apart), interpolated.
    """
    # event stamps are wall-clock; shift them onto QEMU's total-time clock
    shift = min((real - qt for qt, real, _ in samples if qt), default=0.0)
    stop = total_s - downtime_ms / 1e3
    starts = [t - shift for t in syncs if t - shift < stop]
    if len(starts) > 1 and stop - starts[-1] < 0.01:
        starts.pop()                    # the sync that decided to stop
    bounds = [0.0] + starts[1:] + [stop, total_s] if starts else [stop, total_s]
    points = [(0.0, 0)] + [(qt, sent) for qt, _, sent in samples if qt] + \
        [(total_s, final_bytes)]

    def sent_at(t):
        for (t0, b0), (t1, b1) in zip(points, points[1:]):
            if t0 <= t <= t1:
                return b0 + (b1 - b0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1)
        return final_bytes
    sent = [sent_at(t) for t in bounds]
    return {"round_ms": [round((b - a) * 1e3, 2) for a, b in zip(bounds, bounds[1:])],
            "round_bytes": [int(max(0, b - a)) for a, b in zip(sent, sent[1:])]}
