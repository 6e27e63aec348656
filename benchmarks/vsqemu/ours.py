"""This project's side: test-host VMs migrated by the native engine."""

import json
import os
import pathlib
import select
import shutil
import subprocess
import sys

from nova_bhyve.testhost.process import TestHostVM
from vsqemu import disk as vdisk
from vsqemu.common import (
    BenchError,
    cpu_outside_guest,
    guest_cpus,
    iface_bytes,
    judge,
    last_seq,
    read_tlog,
    vmm_cpu,
)

_HALF = pathlib.Path(__file__).resolve().parent / "half.py"

# The engine's settings: its defaults, those of `nova-bhyve-migrate send`
# (page channels, compression and delta cache as the engine chooses them,
# incremental verification, no bandwidth cap); only the downtime limit is
# the comparison's common one.
ENGINE = {"channels": "auto", "verify": "incremental"}


class _Half:
    """A half.py process in a network namespace, spoken to in JSON lines."""

    def __init__(self, ns, role):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-P", str(_HALF), role],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            start_new_session=True)

    @property
    def pid(self):
        """Process id (``ip netns exec`` execs Python in place)."""
        return self.proc.pid

    def send(self, obj):
        """Write one JSON line."""
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout):
        """Read one JSON line within ``timeout`` seconds."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise BenchError(f"engine half {self.proc.args[-1]} gave no answer "
                             f"(exit status {self.proc.poll()})")
        return json.loads(line)

    def close(self):
        """Let the process end (closing its stdin), or end it."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class OursChain:
    """One guest on the KVM test host, migrated again and again with the
    engine (each target becomes the next source)."""

    engine = "ours"

    def __init__(self, base, net, mem, cmdline, disk=None, dirty_log_whole=False):
        self.base, self.net, self.mem, self.cmdline = base, net, mem, cmdline
        # every VM of the chain offers only the whole dirty log (bhyve's),
        # the incoming ones too: each becomes the next source
        self.dirty_log_whole = dirty_log_whole
        self.count = 0
        self.vm = None
        self.keep = None        # where to copy consoles whose heartbeats broke
        # disk workloads: the image the first guest boots with (a copy the
        # chain owns); every destination gets an empty file beside it
        self.disk = disk

    def _new(self, incoming):
        self.count += 1
        name = f"t{self.count}"
        disk = None
        if self.disk:
            os.makedirs(self.base, exist_ok=True)
            disk = f"{self.base}/{name}.img"
            if incoming:
                with open(disk, "wb") as f:
                    f.truncate(os.path.getsize(self.disk))
            else:
                vdisk.copy_sparse(self.disk, disk)
        vm = TestHostVM.start(name, f"{self.base}/{name}", self.mem,
                              cpus=guest_cpus(self.cmdline),
                              cmdline=self.cmdline, incoming=incoming,
                              tlog=True, disk=disk,
                              dirty_log_whole=self.dirty_log_whole)
        vm.disk_path = disk
        return vm

    def boot(self):
        """Boot the guest."""
        self.vm = self._new(incoming=False)

    def console_text(self):
        """What the guest printed on its current host."""
        return self.vm.console_text()

    def pause(self):
        """Stop the guest while the other engine runs."""
        self.vm.client.pause()

    def resume(self):
        """Let the guest run again."""
        self.vm.client.resume()

    def migrate(self, link, config, timeout, downtime_ms, encrypt=True,
                **engine):
        """Migrate to a fresh test-host VM over ``link``; return the measurements.

        ``encrypt=False`` (both halves) only measures what the cipher costs;
        ``engine`` overrides the engine's defaults (``compress``, ``delta_cache``).
        """
        src = self.vm
        src_ns = self.net.ns_a
        dst_ns, addr, ifname = self.net.route(link, src_ns)
        dst = self._new(incoming=True)
        halves = []
        try:
            secret = os.urandom(32).hex()
            disks = ([src.disk_path], [dst.disk_path]) if self.disk else ([], [])
            recv = _Half(dst_ns, "receive")
            halves.append(recv)
            recv.send({"vm": str(dst.socket_path), "secret": secret, "host": addr,
                       "timeout_s": timeout, "encrypt": encrypt,
                       "disks": disks[1]})
            port = recv.read(30)["port"]
            send = _Half(src_ns, "send")
            halves.append(send)
            send.read(30)                                   # ready
            start_seq = last_seq(read_tlog(src.tlog_path)) + 1
            cpu0 = vmm_cpu(src.pid), vmm_cpu(dst.pid)
            wire0 = iface_bytes(dst_ns, ifname)
            send.send(dict(ENGINE, **engine, vm=str(src.socket_path), host=addr,
                           port=port,
                           secret=secret, max_downtime_ms=downtime_ms,
                           timeout_s=timeout, encrypt=encrypt, disks=disks[0]))
            s = send.read(timeout + 60)
            r = recv.read(90)
            wire1 = iface_bytes(dst_ns, ifname)
            cpu1 = vmm_cpu(src.pid), vmm_cpu(dst.pid)
        except BaseException:
            for h in halves:
                h.proc.kill()
                h.close()
            dst.kill()
            if dst.disk_path:
                os.unlink(dst.disk_path)
            raise
        try:
            return self._settle(src, dst, s, r, wire1 - wire0, cpu0, cpu1,
                                start_seq, send)
        finally:
            for h in halves:
                h.close()

    def _settle(self, src, dst, s, r, wire, cpu0, cpu1, start_seq, send):
        """The measurements of one migration; judge the guest's heartbeats,
        then free the sending session and stop the source (their teardown
        is the source host's work, which on one machine would take the
        destination guest's CPU); the freeing's CPU counts as the source's."""
        ok = s["result"] == "completed"
        res = {
            "status": "ok" if ok else "dnf" if s.get("dnf") else "error",
            "total_s": s["total_ms"] / 1e3,
            "reported_downtime_ms": s["downtime_ms"],
            "predicted_downtime_ms": s.get("expected_downtime_ms"),
            "dest_excess_us": s.get("dest_excess_us"),
            "pause_parts_ms": s.get("pause_parts_ms"),
            "wire_bytes": wire,
            "payload_bytes": s["bytes"],
            "rounds": len(s["round_ms"]),
            "cpu_src_s": s["cpu_s"] + cpu_outside_guest(cpu0[0], cpu1[0]),
            "cpu_dst_s": r["cpu_s"] + cpu_outside_guest(cpu0[1], cpu1[1]),
            "round_ms": s["round_ms"], "round_bytes": s["round_bytes"],
            "round_dirty": s["round_dirty"],
            "round_expected_ms": s["round_expected_ms"],
            "round_throttle": s["round_throttle"],
            "pages_delta": s["pages_delta"],
            "pages_compressed": s["pages_compressed"],
            "pages_raw": s["pages_raw"],
            "throttle": s["throttle"],
            "bandwidth": s["bandwidth"],
            "converge_steps": s.get("converge_steps"),
            "trim_steps": s.get("trim_steps"),
            "rtt_ms": s.get("rtt_ms"),
            "catchup_ms": s["catchup_ms"],
            "round_start_ms": s["round_start_ms"],
        }
        if self.disk:
            res.update(disk_allocated_bytes=vdisk.allocated(src.disk_path),
                       disk_payload_bytes=s["disk_bytes"],
                       disk_blocks=s["disk_blocks"], round_blocks=s["round_blocks"])
        if not ok:
            res["note"] = s["error"] or r["error"]
            dst.kill()
            if dst.disk_path:
                os.unlink(dst.disk_path)
            return res
        self.vm = dst
        res.update(judge(src, dst, start_seq, self.keep and f"{self.keep}/{dst.name}"))
        send.send({"close": True})
        res["cpu_src_s"] += send.read(30)["close_cpu_s"]
        src.stop()
        if self.disk:
            res.update(vdisk.verify_moved(
                src.console_text(), dst.console_text, dst.client.pause,
                dst.client.resume, src.disk_path, dst.disk_path,
                vdisk.region_bytes(self.cmdline)))
            os.unlink(src.disk_path)
        return res

    def close(self):
        """Stop the guest and remove its files."""
        if self.vm is not None and self.vm.alive():
            self.vm.kill()
        self.vm = None
        shutil.rmtree(self.base, ignore_errors=True)
