"""Copy a disk file between hosts over TCP: authenticated, encrypted, sparse.

Instance disks (root, swap, ephemerals) move this way, one connection
each: the source pushes them to the destination's listeners before a live
migration copies memory; in a cold migration the source listens and the
destination pulls.  One side listens
(``DiskListener``), the other connects (``copy``); either may send.

Wire format (integers little endian)::

  connector -> listener   b"NBDISK\\0\\1", 32-byte nonce_c
  listener -> connector   32-byte nonce_l,
                          HMAC-SHA256(S, "nbdisk-l" || nonce_c || nonce_l)
  connector -> listener   HMAC-SHA256(S, "nbdisk-c" || nonce_l || nonce_c)
  then frames: u32 length L, L bytes of ChaCha20-Poly1305(K, nonce, plain)
  with K = HMAC-SHA256(S, "nbdisk-key" || nonce_c || nonce_l), the nonce a
  direction byte and a per-direction frame counter, and plain one type
  byte and a body: DATA (1) u64 offset + bytes; END (2) u64 file size;
  DONE (3) the receiver has the whole file on stable storage; ERROR (4)
  text.

Both ends prove they hold the secret S before anything else is read; a
listener drops connections that fail and waits for the next (at most 8).
Holes and all-zero chunks are not sent.  The receiver writes only below
``max_size``.
"""

import hashlib
import hmac
import os
import socket
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

MAGIC = b"NBDISK\x00\x01"
CHUNK = 1 << 20
MAX_FRAME = CHUNK + 64
MAX_BAD_CONNECTIONS = 8
DATA, END, DONE, ERROR = 1, 2, 3, 4
SEND, RECEIVE = "send", "receive"


class DiskCopyError(Exception):
    """A disk copy failed; the text says where and why."""


def _mac(secret, label, *parts):
    return hmac.new(secret, label + b"".join(parts), hashlib.sha256).digest()


def disk_secret(secret, name):
    """Return the secret of one disk's copy (its listener serves no other)."""
    return _mac(secret, b"nbdisk-name", name.encode())


class _Channel:
    """One authenticated connection."""

    def __init__(self, sock, key, outbound):
        self.sock = sock
        self.aead = ChaCha20Poly1305(key)
        self.out_dir = outbound
        self.send_seq = 0
        self.recv_seq = 0

    def _nonce(self, direction, seq):
        return bytes([direction]) + b"\0\0\0" + struct.pack("<Q", seq)

    def send(self, ftype, body=b""):
        """Encrypt and send one frame."""
        data = self.aead.encrypt(self._nonce(self.out_dir, self.send_seq),
                                 bytes([ftype]) + body, None)
        self.send_seq += 1
        self.sock.sendall(struct.pack("<I", len(data)) + data)

    def recv(self):
        """Receive, authenticate and decrypt one frame: (type, body)."""
        (length,) = struct.unpack("<I", _exact(self.sock, 4))
        if not 17 <= length <= MAX_FRAME:
            raise DiskCopyError(f"frame of {length} bytes refused")
        data = _exact(self.sock, length)
        try:
            plain = self.aead.decrypt(
                self._nonce(1 - self.out_dir, self.recv_seq), data, None)
        except InvalidTag:
            raise DiskCopyError("a frame failed authentication (corrupted "
                                "or forged data)") from None
        self.recv_seq += 1
        return plain[0], plain[1:]


def _exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise DiskCopyError("the peer closed the connection")
        out += chunk
    return bytes(out)


def _handshake_connector(sock, secret):
    nonce_c = os.urandom(32)
    sock.sendall(MAGIC + nonce_c)
    reply = _exact(sock, 64)
    nonce_l, proof_l = reply[:32], reply[32:]
    if not hmac.compare_digest(proof_l, _mac(secret, b"nbdisk-l", nonce_c,
                                             nonce_l)):
        raise DiskCopyError("the listener failed authentication: it does not "
                            "hold this migration's secret")
    sock.sendall(_mac(secret, b"nbdisk-c", nonce_l, nonce_c))
    return _Channel(sock, _mac(secret, b"nbdisk-key", nonce_c, nonce_l), 0)


def _handshake_listener(sock, secret):
    hello = _exact(sock, 40)
    if hello[:8] != MAGIC:
        raise DiskCopyError("not a nova-bhyve disk copy client")
    nonce_c, nonce_l = hello[8:], os.urandom(32)
    sock.sendall(nonce_l + _mac(secret, b"nbdisk-l", nonce_c, nonce_l))
    if not hmac.compare_digest(_exact(sock, 32),
                               _mac(secret, b"nbdisk-c", nonce_l, nonce_c)):
        raise DiskCopyError("a client failed authentication")
    return _Channel(sock, _mac(secret, b"nbdisk-key", nonce_c, nonce_l), 1)


def data_extents(fd, size):
    """Yield (offset, length) of the regions of ``fd`` that hold data."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        if start >= size:
            return
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, stop - start
        pos = stop


def _send_file(ch, path, progress, cancelled):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        total = sum(length for _off, length in data_extents(fd, size))
        done = 0
        for off, length in data_extents(fd, size):
            end = off + length
            while off < end:
                if cancelled is not None and cancelled():
                    ch.send(ERROR, b"cancelled by the sender")
                    raise DiskCopyError("cancelled")
                chunk = os.pread(fd, min(CHUNK, end - off), off)
                if not chunk:
                    raise DiskCopyError(f"{path} shrank while being copied")
                if chunk.count(0) != len(chunk):
                    ch.send(DATA, struct.pack("<Q", off) + chunk)
                off += len(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    finally:
        os.close(fd)
    ch.send(END, struct.pack("<Q", size))
    ftype, body = ch.recv()
    if ftype == ERROR:
        raise DiskCopyError("the receiver refused the disk: "
                            + body.decode(errors="replace"))
    if ftype != DONE:
        raise DiskCopyError(f"unexpected frame type {ftype} after END")
    return size


def _recv_file(ch, path, max_size):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, 0)
        while True:
            ftype, body = ch.recv()
            if ftype == DATA:
                (off,) = struct.unpack_from("<Q", body)
                data = memoryview(body)[8:]
                if max_size is not None and off + len(data) > max_size:
                    ch.send(ERROR, b"data beyond the disk size limit")
                    raise DiskCopyError(f"the sender wrote beyond {max_size} "
                                        "bytes: refused")
                os.pwrite(fd, data, off)
            elif ftype == END:
                (size,) = struct.unpack("<Q", body)
                if max_size is not None and size > max_size:
                    ch.send(ERROR, b"disk larger than the limit")
                    raise DiskCopyError(f"the disk is {size} bytes, more than "
                                        f"the {max_size} allowed here")
                os.ftruncate(fd, size)
                os.fsync(fd)
                ch.send(DONE)
                return size
            elif ftype == ERROR:
                raise DiskCopyError("the sender gave up: "
                                    + body.decode(errors="replace"))
            else:
                raise DiskCopyError(f"unexpected frame type {ftype}")
    finally:
        os.close(fd)


def _transfer(ch, role, path, max_size, progress, cancelled):
    if role == SEND:
        return _send_file(ch, path, progress, cancelled)
    return _recv_file(ch, path, max_size)


class DiskListener:
    """Listens for one authenticated peer and sends or receives ``path``."""

    def __init__(self, path, secret, role, host, timeout, max_size=None):
        if role not in (SEND, RECEIVE):
            raise ValueError(f"role must be {SEND!r} or {RECEIVE!r}")
        self.path, self.role, self.max_size = path, role, max_size
        self._secret = secret
        self.timeout = timeout
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._srv = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._srv.bind((host, 0))
            self._srv.listen(MAX_BAD_CONNECTIONS)
        except OSError as exc:
            self._srv.close()
            raise DiskCopyError(f"cannot listen on {host}: {exc}; check "
                                "[bhyve] live_migration_inbound_addr") from exc
        self._srv.settimeout(timeout)
        self.port = self._srv.getsockname()[1]
        self._conn = None
        self._closed = False
        self.bytes = None
        self.error = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name="bhyve-disk-copy")
        self._thread.start()

    def _serve(self):
        try:
            self.bytes = self._serve_one()
        except (OSError, DiskCopyError, struct.error) as exc:
            self.error = ("closed before the copy ended" if self._closed
                          else str(exc) or type(exc).__name__)
        finally:
            self._srv.close()
            if self._conn is not None:
                self._conn.close()
            self._done.set()

    def _serve_one(self):
        last = "no client connected"
        for _attempt in range(MAX_BAD_CONNECTIONS):
            try:
                conn, _addr = self._srv.accept()
            except socket.timeout:
                raise DiskCopyError(f"{last} within {self.timeout} s") \
                    from None
            conn.settimeout(self.timeout)
            self._conn = conn
            try:
                ch = _handshake_listener(conn, self._secret)
            except (OSError, DiskCopyError, struct.error) as exc:
                last = f"rejected a client ({exc})"
                conn.close()
                self._conn = None
                continue
            return _transfer(ch, self.role, self.path, self.max_size, None,
                             None)
        raise DiskCopyError(f"gave up after {MAX_BAD_CONNECTIONS} rejected "
                            f"clients; last: {last}")

    @property
    def finished(self):
        """True once the copy succeeded or failed."""
        return self._done.is_set()

    def wait(self, timeout=None):
        """Wait for the end; return True if it ended."""
        return self._done.wait(timeout)

    def result(self):
        """Return the disk size copied; raise DiskCopyError if it failed."""
        if not self._done.is_set():
            raise DiskCopyError("the disk copy has not finished")
        if self.error is not None:
            raise DiskCopyError(self.error)
        return self.bytes

    def close(self):
        """Stop listening and break an unfinished copy."""
        self._closed = True
        for sock in (self._srv, self._conn):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._srv.close()


def copy(host, port, secret, path, role, timeout, max_size=None,
         progress=None, cancelled=None):
    """Connect to a DiskListener and send or receive ``path``; return its size.

    ``progress(done, total)`` is called as data is sent; ``cancelled()``
    returning True stops a send.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            ch = _handshake_connector(sock, secret)
            return _transfer(ch, role, path, max_size, progress, cancelled)
    except OSError as exc:
        raise DiskCopyError(f"disk copy with {host}:{port} failed: "
                            f"{exc}") from exc
