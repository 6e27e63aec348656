"""The disk copy: both directions, sparseness, authentication, limits."""

import os
import socket
import struct

import pytest

from nova_bhyve.migration import diskcopy

SECRET = os.urandom(32)
MiB = 1 << 20


def _disk(path, size=8 * MiB, chunks=((0, b"boot"), (3 * MiB + 5, b"x" * 9000))):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in chunks:
            f.seek(off)
            f.write(data)
    return path


def _same(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def test_push_to_a_listener(tmp_path):
    src = _disk(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.write_bytes(b"stale content that must go" * 1000)
    listener = diskcopy.DiskListener(str(dst), SECRET, diskcopy.RECEIVE,
                                     "127.0.0.1", 10, max_size=16 * MiB)
    seen = []
    size = diskcopy.copy("127.0.0.1", listener.port, SECRET, str(src),
                         diskcopy.SEND, 10,
                         progress=lambda d, t: seen.append((d, t)))
    assert listener.wait(10)
    assert listener.result() == size == 8 * MiB
    assert _same(src, dst)
    assert seen[-1][0] == seen[-1][1] > 0
    # holes stay holes
    assert os.stat(dst).st_blocks * 512 < 2 * MiB


def test_pull_from_a_listener(tmp_path):
    src = _disk(tmp_path / "src", size=3 * MiB, chunks=((0, b"\1" * MiB),))
    dst = tmp_path / "dst"
    listener = diskcopy.DiskListener(str(src), SECRET, diskcopy.SEND,
                                     "127.0.0.1", 10)
    assert diskcopy.copy("127.0.0.1", listener.port, SECRET, str(dst),
                         diskcopy.RECEIVE, 10, max_size=3 * MiB) == 3 * MiB
    assert listener.wait(10) and listener.result() == 3 * MiB
    assert _same(src, dst)


def test_a_wrong_secret_is_refused_and_the_listener_waits(tmp_path):
    src = _disk(tmp_path / "src")
    dst = tmp_path / "dst"
    listener = diskcopy.DiskListener(str(dst), SECRET, diskcopy.RECEIVE,
                                     "127.0.0.1", 10)
    with pytest.raises(diskcopy.DiskCopyError, match="authentication"):
        diskcopy.copy("127.0.0.1", listener.port, os.urandom(32), str(src),
                      diskcopy.SEND, 5)
    assert not listener.finished
    diskcopy.copy("127.0.0.1", listener.port, SECRET, str(src),
                  diskcopy.SEND, 10)
    assert listener.wait(10) and listener.result() == 8 * MiB


def test_a_client_without_the_secret_learns_nothing(tmp_path):
    src = _disk(tmp_path / "src")
    listener = diskcopy.DiskListener(str(src), SECRET, diskcopy.SEND,
                                     "127.0.0.1", 5)
    with socket.create_connection(("127.0.0.1", listener.port)) as s:
        s.sendall(diskcopy.MAGIC + os.urandom(32))
        s.recv(64)                          # the listener's challenge
        s.sendall(os.urandom(32))           # a wrong proof
        s.settimeout(5)
        assert s.recv(65536) == b""         # dropped, no data
    listener.close()
    assert listener.wait(10)
    with pytest.raises(diskcopy.DiskCopyError):
        listener.result()


def test_the_size_limit_is_enforced(tmp_path):
    src = _disk(tmp_path / "src", size=8 * MiB)
    dst = tmp_path / "dst"
    listener = diskcopy.DiskListener(str(dst), SECRET, diskcopy.RECEIVE,
                                     "127.0.0.1", 10, max_size=2 * MiB)
    with pytest.raises(diskcopy.DiskCopyError, match="refused"):
        diskcopy.copy("127.0.0.1", listener.port, SECRET, str(src),
                      diskcopy.SEND, 10)
    assert listener.wait(10)
    with pytest.raises(diskcopy.DiskCopyError, match="beyond"):
        listener.result()


def test_a_tampered_frame_is_refused(tmp_path):
    """Flip one byte of the encrypted stream on its way."""
    src = _disk(tmp_path / "src")
    dst = tmp_path / "dst"
    listener = diskcopy.DiskListener(str(dst), SECRET, diskcopy.RECEIVE,
                                     "127.0.0.1", 10)
    real_send = diskcopy._Channel.send

    def corrupt(self, ftype, body=b""):
        data = self.aead.encrypt(self._nonce(self.out_dir, self.send_seq),
                                 bytes([ftype]) + body, None)
        self.send_seq += 1
        data = bytes([data[0] ^ 1]) + data[1:]
        self.sock.sendall(struct.pack("<I", len(data)) + data)

    diskcopy._Channel.send = corrupt
    try:
        with pytest.raises(diskcopy.DiskCopyError):
            diskcopy.copy("127.0.0.1", listener.port, SECRET, str(src),
                          diskcopy.SEND, 5)
    finally:
        diskcopy._Channel.send = real_send
    assert listener.wait(10)
    with pytest.raises(diskcopy.DiskCopyError, match="authentication"):
        listener.result()


def test_cancel_stops_a_send(tmp_path):
    src = _disk(tmp_path / "src")
    dst = tmp_path / "dst"
    listener = diskcopy.DiskListener(str(dst), SECRET, diskcopy.RECEIVE,
                                     "127.0.0.1", 10)
    with pytest.raises(diskcopy.DiskCopyError, match="cancelled"):
        diskcopy.copy("127.0.0.1", listener.port, SECRET, str(src),
                      diskcopy.SEND, 10, cancelled=lambda: True)
    assert listener.wait(10)
    with pytest.raises(diskcopy.DiskCopyError, match="gave up"):
        listener.result()


def test_nobody_connects(tmp_path):
    listener = diskcopy.DiskListener(str(tmp_path / "d"), SECRET,
                                     diskcopy.RECEIVE, "127.0.0.1", 0.3)
    assert listener.wait(10)
    with pytest.raises(diskcopy.DiskCopyError, match="no client"):
        listener.result()


def test_a_bad_listen_address_names_the_option(tmp_path):
    with pytest.raises(diskcopy.DiskCopyError,
                       match="live_migration_inbound_addr"):
        diskcopy.DiskListener(str(tmp_path / "d"), SECRET, diskcopy.RECEIVE,
                              "192.0.2.123", 1)
