"""Helpers for migration tests: run both halves, inject network faults."""

import contextlib
import hashlib
import hmac
import math
import os
import pathlib
import queue
import socket
import struct
import subprocess
import sys
import threading
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nova_bhyve import polling
from nova_bhyve.native.engine import Migration, Phase, Result
from nova_bhyve.testhost.console import parse_console

from .conftest import wait_for


def new_secret():
    """A fresh per-migration secret."""
    return os.urandom(32)


def stress_ready(vm, passes=1, timeout=60):
    """Wait until the guest has completed ``passes`` full passes."""
    def ok():
        r = parse_console(vm.console_text())
        return r.heartbeats and r.heartbeats[-1].passes >= passes
    wait_for(ok, timeout=timeout, what=f"{passes} pass(es) on {vm.name}")


def start_receive(dst, secret, **kw):
    """Start the destination half for test-host VM ``dst``."""
    kw.setdefault("timeout_ms", 20000)
    return Migration.receive(vmm_target=str(dst.socket_path), secret=secret, **kw)


def start_send(src, port, secret, **kw):
    """Start the source half for test-host VM ``src`` towards 127.0.0.1:port."""
    kw.setdefault("timeout_ms", 20000)
    return Migration.send(vmm_target=str(src.socket_path), host="127.0.0.1",
                          port=port, secret=secret, **kw)


def migrate(src, dst, **kw):
    """Run a whole migration; returns (source stats, destination stats)."""
    secret = kw.pop("secret", None) or new_secret()
    recv = start_receive(dst, secret, timeout_ms=kw.get("timeout_ms", 20000))
    send = start_send(src, recv.port, secret, **kw)
    try:
        assert send.wait(120), "source half did not finish"
        assert recv.wait(30), "destination half did not finish"
        return send.stats(), recv.stats()
    finally:
        send.close()
        recv.close()


def receiver_process(secret_file, dst, listen="127.0.0.1:0", netns=None,
                     timeout=None, extra=()):
    """``nova-bhyve-migrate receive`` into test-host VM ``dst`` in a process
    of its own (in network namespace ``netns``, with more arguments
    ``extra``); return (process, port)."""
    cmd = [sys.executable, "-P", "-m", "nova_bhyve.migration.cli", "receive",
           "--vm", str(dst.socket_path), "--secret-file", str(secret_file),
           "--listen", listen, *extra]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, int(line.rsplit(":", 1)[1])


@contextlib.contextmanager
def secret_file_in(vm, secret):
    """``secret`` in a file in test-host VM ``vm``'s run directory for a
    ``nova-bhyve-migrate`` process to read; yield its path, then remove it."""
    path = pathlib.Path(vm.rundir) / "secret"
    path.write_bytes(secret)
    try:
        yield path
    finally:
        path.unlink()


def receiver_with_secret(dst, **kwargs):
    """``receiver_process`` (``kwargs`` its) with a new secret, which it
    reads from a file in ``dst``'s run directory, removed once the process
    has read it; return (process, port, secret)."""
    secret = new_secret()
    with secret_file_in(dst, secret) as path:
        proc, port = receiver_process(path, dst, **kwargs)
    return proc, port, secret


def wait_phase(mig, phases, timeout=60):
    """Wait until the migration is in one of ``phases``; return the stats."""
    def ok():
        s = mig.stats()
        if s.phase in phases:
            return s
        if s.result != Result.RUNNING:
            raise AssertionError(f"migration ended ({s.result.name}: {s.error}) "
                                 f"before reaching {[p.name for p in phases]}")
        return None
    return wait_for(ok, timeout=timeout, interval=0.001,
                    what=f"phase {[p.name for p in phases]}")


def assert_guest_continued(src, dst, more_passes=1, timeout=60):
    """The guest runs on dst, continuing src's heartbeats with no error."""
    before = parse_console(src.console_text())
    def ok():
        r = parse_console(dst.console_text())
        return r.heartbeats and \
            r.heartbeats[-1].passes >= before.heartbeats[-1].passes + more_passes
    wait_for(ok, timeout=timeout,
             what="the guest to make progress on the destination")
    after = parse_console(dst.console_text())
    combined = parse_console(src.console_text() + dst.console_text())
    assert after.banner == {}, "the destination booted the guest anew"
    assert combined.sequence_breaks() == []
    assert after.last_seq > before.last_seq
    assert after.errors == 0 and after.fails == [], after.fails
    return after


def assert_guest_kept_running(src, dst=None, beats=50):
    """The guest still runs on src with its self-check intact; dst never ran."""
    assert src.client.status()["state"] == "running"
    now = parse_console(src.console_text()).last_seq
    wait_for(lambda: parse_console(src.console_text()).last_seq > now + beats,
             timeout=30, what="heartbeats on the source")
    report = parse_console(src.console_text())
    assert report.sequence_breaks() == []
    assert report.errors == 0, report.fails
    if dst is not None:
        assert dst.console_text() == "", "the guest ran on the destination"
        if dst.alive():
            assert dst.client.status()["state"] in ("incoming", "paused")


class FaultyProxy:
    """A TCP forwarder between the two halves that can cut or corrupt.

    ``corrupt_at``: flip one byte at this offset of the source-to-destination
    bytes of the first page connection (connection index 1).
    ``join_delay``: hold every connection after the first (the page
    channels) this many seconds before connecting it through, buffering
    what the source sends on it meanwhile, as a busy destination that is
    slow to accept does.
    ``frames``: forward whole frames (PROTOCOL.md), so that ``on_frame``
    can hold, alter or drop one.  ``host``: where to listen.
    ``control_latency``: deliver what the control connection (the first)
    carries this many seconds late, each way, in order, as a long link
    would: its round trips take twice that.
    ``page_rate``: carry what the source sends on the page connections at
    this many bytes a second, as a slow link would; the proxy takes in
    only a small window ahead of that, so the rest waits unacknowledged
    in the source's socket, as on such a link.
    ``apply_rate``: take in at once what the source sends on the page
    connections (its sockets drain as on a fast link) but hand it to the
    destination at this many bytes a second, as a destination that applies
    pages more slowly than the link brings them would take it.
    """

    def __init__(self, target_port, corrupt_at=None, record=False,
                 join_delay=0.0, frames=False, host="127.0.0.1",
                 target_host="127.0.0.1", control_latency=0.0, page_rate=0,
                 apply_rate=0):
        self.target = (target_host, target_port)
        self.control_latency = control_latency
        self.page_rate = page_rate
        self.apply_rate = apply_rate
        self.frames = frames
        self.hooks = []             # [connection, direction, type, action]
        self.stall_all = False
        self.join_delay = join_delay
        self.corrupt_at = corrupt_at
        self.record = record
        self.recorded = []
        self.conns = []
        self.lock = threading.Lock()
        self.srv = socket.socket()
        if page_rate:       # accepted connections inherit the small window
            self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.srv.bind((host, 0))
        self.srv.listen(32)
        self.port = self.srv.getsockname()[1]
        self.closed = False
        self.stalled = set()        # connection indices no longer forwarded
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        index = 0
        while not self.closed:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            with self.lock:
                buf = bytearray() if self.record else None
                self.recorded.append(buf)
            threading.Thread(target=self._connect, args=(a, buf, index),
                             daemon=True).start()
            index += 1

    def _connect(self, a, buf, index):
        early = self._hold(a) if index and self.join_delay else b""
        try:
            b = socket.create_connection(self.target)
            b.sendall(early)
        except OSError:
            a.close()
            return
        for sock in (a, b):     # no Nagle delay the halves do not have
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.conns += [a, b]
        if buf is not None:
            buf += early
        corrupt = self.corrupt_at if index == 1 else None
        threading.Thread(target=self._pump, args=(a, b, corrupt, buf, index,
                                                  TO_DEST), daemon=True).start()
        threading.Thread(target=self._pump, args=(b, a, None, None, index,
                                                  TO_SOURCE), daemon=True).start()

    def _hold(self, a):
        """Read what the source sends for ``join_delay`` seconds."""
        held = bytearray()
        end = time.monotonic() + self.join_delay
        while (left := end - time.monotonic()) > 0:
            a.settimeout(left)
            try:
                data = a.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            held += data
        a.settimeout(None)
        return bytes(held)

    def _pump(self, a, b, corrupt, buf, index, direction):
        seen = 0
        pending = bytearray()
        late = None
        paced = bool(self.page_rate and index and direction == TO_DEST)
        size = max(4096, int(self.page_rate) // 100) if paced else 65536
        due = 0.0
        slow_dest = bool(self.apply_rate and index and direction == TO_DEST)
        if (index == 0 and self.control_latency) or slow_dest:
            late = queue.Queue()
            threading.Thread(target=self._deliver_late, args=(late, a, b),
                             daemon=True).start()
        try:
            while True:
                # hold the bytes, keep the connection open
                polling.poll(lambda: not self._stalled(index) or self.closed,
                             math.inf, 0.05)
                data = a.recv(size)
                if not data:
                    break
                if paced:           # the link carries it at page_rate
                    due = max(due, time.monotonic()) + len(data) / self.page_rate
                    time.sleep(max(0.0, due - time.monotonic()))
                if corrupt is not None and seen <= corrupt < seen + len(data):
                    data = bytearray(data)
                    data[corrupt - seen] ^= 0x5a
                    data = bytes(data)
                seen += len(data)
                if buf is not None:
                    buf += data
                if self.frames:
                    pending += data
                    data = self._whole_frames(pending, index, direction)
                if slow_dest:       # handed on at apply_rate
                    due = max(due, time.monotonic()) + len(data) / self.apply_rate
                    late.put((due, data))
                elif late is not None:
                    late.put((time.monotonic() + self.control_latency, data))
                else:
                    b.sendall(data)
        except OSError:
            pass
        if late is not None:
            late.put(None)
            return
        self._shut(a, b)

    def _deliver_late(self, late, a, b):
        """Send each chunk of ``late`` to ``b`` once its time has come."""
        try:
            while (item := late.get()) is not None:
                time.sleep(max(0.0, item[0] - time.monotonic()))
                b.sendall(item[1])
        except OSError:
            pass
        self._shut(a, b)

    @staticmethod
    def _shut(a, b):
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _stalled(self, index):
        return self.stall_all or index in self.stalled

    def _whole_frames(self, pending, index, direction):
        """Take the complete frames off ``pending``; return what to forward."""
        out = bytearray()
        while len(pending) >= 16:
            size = 16 + int.from_bytes(pending[8:12], "little") + \
                (16 if pending[1] & 1 else 0)
            if len(pending) < size:
                break
            frame = bytes(pending[:size])
            del pending[:size]
            out += self._frame_hook(index, direction, frame)
        return bytes(out)

    def _frame_hook(self, index, direction, frame):
        with self.lock:
            for hook in self.hooks:
                conn, way, mtype, action = hook
                if (conn, way) == (index, direction) and \
                        mtype in (None, frame[0]):
                    self.hooks.remove(hook)
                    break
            else:
                return frame
        return action(frame)

    def on_frame(self, index, direction, mtype, action):
        """Pass the next frame of type ``mtype`` (None: any) on connection
        ``index`` going ``direction`` (TO_DEST, TO_SOURCE) to ``action``,
        which returns the bytes to forward instead (it may block: the
        connection waits).  Needs ``frames=True``."""
        with self.lock:
            self.hooks.append([index, direction, mtype, action])

    def cut(self, index=None):
        """Break every forwarded connection now (or only number ``index``)."""
        with self.lock:
            conns = self.conns if index is None else self.conns[2 * index:2 * index + 2]
            for s in conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stall(self, index=None):
        """Stop forwarding connection ``index`` (None: all) without closing it."""
        if index is None:
            self.stall_all = True
        else:
            self.stalled.add(index)

    def close(self):
        """Stop accepting, break everything and close the sockets."""
        self.closed = True
        try:
            self.srv.shutdown(socket.SHUT_RDWR)    # wakes the blocked accept
        except OSError:
            pass
        self.srv.close()
        self.cut()
        with self.lock:
            for s in self.conns:
                s.close()


# ---- a minimal independent implementation of the protocol's framing ----

def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (0x82F63B78 ^ (c >> 1)) if c & 1 else c >> 1
        table.append(c)
    return table


_T = _crc32c_table()


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli), as PROTOCOL.md specifies."""
    c = crc ^ 0xFFFFFFFF
    for byte in data:
        c = _T[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


MAGIC = b"NBMIG\x00\x00\x01"
VERSION = 4
TO_DEST, TO_SOURCE = 0, 1


def direction_key(session_key, channel, direction):
    """The AES-256-GCM key of one connection and direction (PROTOCOL.md)."""
    info = (b"nbmig-aead" + MAGIC + struct.pack("<HH", VERSION, channel)
            + bytes([direction]))
    return hmac.new(session_key, info, hashlib.sha256).digest()


def _nonce(seq):
    return struct.pack("<I", seq) + bytes(8)


class RawSource:
    """Speaks the source side of the protocol by hand (PROTOCOL.md)."""

    def __init__(self, port, secret, channel=0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.secret = secret
        self.channel = channel
        self.seq = 0
        self.rseq = 0
        self.key = None             # the session key, after the handshake
        self.tx = self.rx = None    # AESGCM per direction, once sealed

    def seal(self, session_key):
        """Seal every later frame on this connection."""
        self.tx = AESGCM(direction_key(session_key, self.channel, TO_DEST))
        self.rx = AESGCM(direction_key(session_key, self.channel, TO_SOURCE))

    def send(self, mtype, payload, length=None, seq=None, sealed=None, channel=None):
        """Send a frame; ``length``/``seq``/``sealed`` override what is due."""
        sealed = self.tx is not None if sealed is None else sealed
        seq = self.seq if seq is None else seq
        hdr = struct.pack("<BBHII", mtype, 1 if sealed else 0,
                          self.channel if channel is None else channel, seq,
                          len(payload) if length is None else length)
        if sealed:
            body = self.tx.encrypt(_nonce(seq), payload, hdr)
            crc = crc32c(hdr)
        else:
            body = payload
            crc = crc32c(hdr + payload)
        self.sock.sendall(hdr + struct.pack("<I", crc) + body)
        self.seq += 1

    def recv(self):
        """Receive one frame: (type, payload)."""
        hdr = self._exact(16)
        mtype, flags, _chan, seq, length, _crc = struct.unpack("<BBHIII", hdr)
        body = self._exact(length + (16 if flags & 1 else 0))
        if flags & 1:
            body = self.rx.decrypt(_nonce(seq), body, hdr[:12])
        self.rseq += 1
        return mtype, body

    def _exact(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def handshake(self):
        """HELLO / CHALLENGE / AUTH, then seal the control connection."""
        ns = os.urandom(32)
        self.send(1, MAGIC + struct.pack("<HHI", VERSION, VERSION, 0) + ns)
        mtype, payload = self.recv()
        assert mtype == 2, (mtype, payload)
        nd = payload[12:44]
        want = hmac.new(self.secret, b"nbmig-dst" + ns + nd, hashlib.sha256).digest()
        assert hmac.compare_digest(want, payload[44:76]), "destination proof"
        proof = hmac.new(self.secret, b"nbmig-src" + nd + ns, hashlib.sha256).digest()
        self.send(3, proof)
        self.key = hmac.new(self.secret, b"nbmig-key" + ns + nd,
                            hashlib.sha256).digest()
        self.seal(self.key)

    def join(self, port, channel):
        """Open page channel ``channel`` of this session (JOIN, unsealed)."""
        page = RawSource(port, self.secret, channel)
        sid = hmac.new(self.key, b"nbmig-sid", hashlib.sha256).digest()[:16]
        idx = struct.pack("<H", channel)
        token = hmac.new(self.key, b"nbmig-join" + sid + idx,
                         hashlib.sha256).digest()
        page.send(4, MAGIC + sid + idx + b"\0\0" + token)
        page.seal(self.key)
        return page

    def close(self):
        """Close the connection."""
        self.sock.close()


def preamble_for(vm, channels=1, extra=()):
    """A source's preamble for a guest of test-host VM ``vm``'s shape."""
    vendor = "unknown"
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            vendor = line.split(":", 1)[1].strip()
            break
    st = vm.client.status()
    lines = [f"protocol={VERSION}", "mode=live", "arch=x86_64", "page_size=4096",
             f"cpu_vendor={vendor}", f"ncpus={st['cpus']}",
             "state_format=nbvmstat/1", f"memory={st['mem']}", "segments=1",
             f"segment.0=0:{st['lowmem']:x}", f"channels={channels}",
             "verify=incremental", "cipher=aes-256-gcm", *extra]
    return ("\n".join(lines) + "\n").encode()


def wait_result(mig, timeout=30):
    """Wait for a migration half to end; return its stats."""
    if not mig.wait(timeout):
        st = mig.stats()
        raise AssertionError(f"migration did not end in {timeout} s: phase "
                             f"{st.phase.name}, round {st.round}, "
                             f"error {st.error!r}")
    return mig.stats()


def wait_both(send, recv, *others, timeout=60):
    """Wait for both halves, then close them and ``others`` (proxies)
    whatever happened; return (source stats, destination stats)."""
    try:
        return wait_result(send, timeout), wait_result(recv, timeout)
    finally:
        for x in (send, recv) + others:
            x.close()


def settle(seconds=0.3):
    """Give the guest a moment (heartbeats are 1 ms apart)."""
    time.sleep(seconds)


__all__ = ["Phase", "Result"]
