"""Read a QEMU serial console pipe and timestamp it like the test host.

    python -P tlog_reader.py PIPE RAWLOG TLOG

For ``-chardev pipe,path=PIPE``: creates the FIFOs PIPE.out (QEMU writes
the guest's COM1 output there) and PIPE.in (QEMU's serial input, never
written), opens both, prints ``ready``, then appends every byte to RAWLOG
and every complete line to TLOG as ``<CLOCK_MONOTONIC ns> <line>`` (the
test host's ``console.tlog`` format), stamped when the line's newline
arrived.  Exits once QEMU has closed the pipe.

A pipe (enlarged to 1 MiB) rather than a socket: QEMU writes the console
one byte per guest OUT, and a unix socket charges each such byte a whole
buffer, so a reader kept off the CPU for a few milliseconds would make
QEMU's 16550 drop bytes.  Reads are spaced by at least 0.5 ms so that this
process does not wake for every byte; it runs at nice -10 so that its
stamps stay close to the arrival times on a busy machine.
"""

import fcntl
import os
import select
import sys
import time


def main(argv):
    """Create and open the FIFOs, then copy and stamp until QEMU closes them."""
    path, rawlog, tlog = argv
    for suffix in (".in", ".out"):
        os.mkfifo(path + suffix, 0o600)
    # O_RDWR opens a FIFO without waiting for the other end (Linux)
    keep_in = os.open(path + ".in", os.O_RDWR)
    fd = os.open(path + ".out", os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    try:
        os.nice(-10)
    except OSError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    raw_fd, t_fd = os.open(rawlog, flags, 0o644), os.open(tlog, flags, 0o644)
    print("ready", flush=True)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    line = b""
    while True:
        events = poller.poll()
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            data = None
        if not data:
            # no writer yet: no POLLHUP; once QEMU has gone: POLLHUP and EOF
            if data == b"" and any(ev & select.POLLHUP for _, ev in events):
                break
            time.sleep(0.0005)
            continue
        ns = time.monotonic_ns()
        os.write(raw_fd, data)
        *done, line = (line + data).split(b"\n")
        if done:
            os.write(t_fd, b"".join(b"%d %s\n" % (ns, text[:300]) for text in done))
        time.sleep(0.0005)
    os.close(keep_in)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
