"""Start, watch and stop test-host VM processes (one process per VM)."""

import os
import pathlib
import signal
import subprocess

from nova_bhyve import polling
from nova_bhyve.testhost import artifacts
from nova_bhyve.testhost.client import ControlClient
from nova_bhyve.testhost.errors import TestHostError

# Exit statuses of the VM process, as bhyve(8) documents them.
EXIT_REBOOT = 0
EXIT_POWEROFF = 1
EXIT_HALT = 2
EXIT_TRIPLEFAULT = 3
EXIT_ERROR = 4


class TestHostVM:
    """One running nb-testhost process and its control connection."""

    __test__ = False  # not a pytest test class

    def __init__(self, name, rundir, popen):
        self.name = name
        self.rundir = pathlib.Path(rundir)
        self.popen = popen
        self._client = None

    # -- paths ------------------------------------------------------------
    @property
    def socket_path(self):
        """Path of the VM's control socket."""
        return self.rundir / "control.sock"

    @property
    def console_path(self):
        """Path of the COM1 console log."""
        return self.rundir / "console.log"

    @property
    def tlog_path(self):
        """Path of the timestamped console log (with ``tlog=True``)."""
        return self.rundir / "console.tlog"

    @property
    def pid(self):
        """The VM process id."""
        return self.popen.pid

    # -- lifecycle --------------------------------------------------------
    @classmethod
    def start(cls, name, rundir, mem, cpus=1, kernel=None, cmdline="",
              incoming=False, paused=False, tlog=False, disk=None,
              dirty_log_whole=False, flush_delay_ms=0, timeout=30.0):
        """Start a VM process and wait until its control socket answers.

        ``mem`` is a size string ("1G") or bytes.  Either boot ``kernel``
        (defaults to the bundled guest payload) or start ``incoming``.
        ``dirty_log_whole`` offers the engine only the whole get-and-clear
        dirty log, as bhyve's vmm port does (no peek, no ranges).
        ``flush_delay_ms`` holds each flush of ``disk`` that long, as a
        drive on slow storage.
        """
        rundir = pathlib.Path(rundir)
        rundir.mkdir(parents=True, exist_ok=True)
        argv = [str(artifacts.testhost_binary()), "--name", name,
                "--rundir", str(rundir), "--mem", str(mem),
                "--cpus", str(cpus)]
        if incoming:
            argv.append("--incoming")
        else:
            argv += ["--kernel", str(kernel or artifacts.guest_kernel()),
                     "--cmdline", cmdline]
            if paused:
                argv.append("--paused")
        if tlog:
            argv.append("--console-tlog")
        if disk is not None:
            argv += ["--disk", str(disk)]
        if dirty_log_whole:
            argv.append("--dirty-log-whole")
        if flush_delay_ms:
            argv += ["--flush-delay-ms", str(flush_delay_ms)]
        log = open(rundir / "testhost.log", "ab")
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log,
                                     start_new_session=True)
        finally:
            log.close()
        vm = cls(name, rundir, popen)
        vm._wait_ready(timeout)
        return vm

    def _wait_ready(self, timeout):
        if polling.poll(self._connect, timeout, 0.01):
            return
        self.kill()
        raise TestHostError("ETIMEDOUT", f"VM {self.name} did not open its "
                            f"control socket within {timeout} s")

    def _connect(self):
        """True once the control socket accepts; raises if the VM exited."""
        if self.popen.poll() is not None:
            raise TestHostError(
                "ECHILD", f"VM {self.name} exited with status "
                f"{self.popen.returncode} during start: {self.log_tail()}")
        if self.socket_path.exists():
            try:
                self._client = ControlClient(self.socket_path)
                return True
            except TestHostError:
                pass
        return False

    @property
    def client(self):
        """The VM's ControlClient."""
        if self._client is None:
            self._client = ControlClient(self.socket_path)
        return self._client

    def log_tail(self, nbytes=2000):
        """Return the end of the process's own log (stderr)."""
        try:
            data = (self.rundir / "testhost.log").read_bytes()
        except OSError:
            return ""
        return data[-nbytes:].decode("utf-8", "replace").strip()

    def console_text(self):
        """Return what the guest printed on COM1 so far."""
        try:
            return self.console_path.read_text("ascii", "replace")
        except FileNotFoundError:
            return ""

    def alive(self):
        """Return True while the process runs."""
        return self.popen.poll() is None

    def wait(self, timeout=None):
        """Wait for the process to end; return its exit status."""
        return self.popen.wait(timeout)

    def stop(self, timeout=10.0):
        """Shut the VM down (control socket, then SIGTERM, then SIGKILL)."""
        if self.alive():
            try:
                self.client.shutdown()
            except TestHostError:
                pass
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_client()
        return self.popen.wait()

    def kill(self):
        """SIGKILL the process (simulates a crashed host process)."""
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self._close_client()

    def _close_client(self):
        if self._client is not None:
            self._client.close()
            self._client = None
