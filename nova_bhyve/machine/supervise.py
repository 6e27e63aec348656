"""Supervise one guest process, as daemon(8) does for bhyve.

Run as ``python -m nova_bhyve.machine.supervise --rundir DIR [options] --
ARGV...``.  It detaches (double fork, new session), starts ARGV and records
in DIR:

- ``supervisor.json``: the supervisor's pid and start time;
- ``child.pid``: the pid of the current guest process;
- ``process.log``: the guest process's standard error (and output,
  unless ``--stdout`` names another file);
- ``exit.json``: how the guest process finally ended (``status`` or
  ``signal``) and how many guest reboots were restarted.

It may run as root (under daemon(8) on FreeBSD) in a directory the
unprivileged nova-compute owns: DIR is opened once (its last component
must not be a symbolic link) and every file in it is opened relative to
that descriptor with no link followed (``nova_bhyve.beneath``); the logs
must be regular files with a single link.  ``--stdout`` names a file in
DIR.  ``--output-to-log`` sends the supervisor's own output to
``process.log`` too (what daemon(8) -o did, without following links).
``--check-bhyve-files PATHS`` (JSON of ``argv.BhyvePaths``) checks the
files of a bhyve command line (``argv.check_guest_files``) before every
start, reboots included.

A guest that exits with status 0 (it rebooted, in bhyve(8) terms) is
started again with ``--reboot-argv`` (default: ARGV) after running
``--before-restart`` (for bhyve: destroy the old VM); any other ending is
final.  SIGTERM to the supervisor is passed on to the guest process and
ends supervision.  The launching process exits once the guest process has
started, with status 0, or 1 and the reason on stderr.
"""

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time

from nova_bhyve import beneath
from nova_bhyve.machine import argv as bhyve_argv
from nova_bhyve.machine.statefile import write_json_at

# what `python -m` runs: launchers start it by this name, and the driver
# tells a live supervisor by it (supervised.supervises)
MODULE = "nova_bhyve.machine.supervise"
# a guest that reboots more often than this is in a loop: give up
MAX_REBOOTS = 10
REBOOT_WINDOW = 60.0


def _parse(argv):
    parser = argparse.ArgumentParser(prog="nova-bhyve-supervise")
    parser.add_argument("--rundir", required=True)
    parser.add_argument("--reboot-argv", help="JSON list")
    parser.add_argument("--before-restart", help="JSON list")
    parser.add_argument("--stdout", help="file for the guest's standard "
                        "output (default: process.log)")
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("--check-bhyve-files", help="JSON BhyvePaths")
    parser.add_argument("--output-to-log", action="store_true",
                        help="send the supervisor's own output to "
                        "process.log")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    if not args.argv:
        parser.error("no command to supervise")
    if args.stdout and os.path.dirname(args.stdout) not in (
            "", os.path.normpath(args.rundir)):
        parser.error("--stdout must name a file in --rundir")
    return args


class Supervisor:
    """The restart loop (runs in the detached process)."""

    def __init__(self, args, dirfd, report_fd=None):
        self.rundir = args.rundir
        self.dirfd = dirfd
        self.argv = args.argv
        self.reboot_argv = (json.loads(args.reboot_argv)
                            if args.reboot_argv else args.argv)
        self.before_restart = (json.loads(args.before_restart)
                               if args.before_restart else None)
        self.bhyve_paths = (
            bhyve_argv.BhyvePaths(**json.loads(args.check_bhyve_files))
            if args.check_bhyve_files else None)
        self.stdout = os.path.basename(args.stdout) if args.stdout else None
        self.report_fd = report_fd
        self.child = None
        self.stopping = False

    def _write(self, name, data):
        write_json_at(self.dirfd, name, data)

    def open_log(self, name):
        """Open a log in the run directory for appending (no link followed)."""
        return beneath.open_regular(self.dirfd, name, os.O_WRONLY |
                                    os.O_APPEND | os.O_CREAT, 0o640)

    def _on_term(self, signum, _frame):
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def _report(self, text):
        if self.report_fd is None and text != "ok":    # --foreground
            sys.stderr.write(text + "\n")
        if self.report_fd is not None:
            os.write(self.report_fd, text.encode() + b"\n")
            os.close(self.report_fd)
            self.report_fd = None

    def _spawn(self, argv):
        if self.bhyve_paths is not None:
            try:
                bhyve_argv.check_guest_files(argv, self.bhyve_paths)
            except bhyve_argv.ArgvError as exc:
                raise beneath.UnsafePathError(errno.EPERM, str(exc)) from exc
        log = self.open_log("process.log")
        try:
            out = self.open_log(self.stdout) if self.stdout else log
            try:
                self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=log)
            finally:
                if out != log:
                    os.close(out)
        finally:
            os.close(log)
        self._write("child.pid", {"pid": self.child.pid})

    def run(self):
        """Start the guest process, restart it on reboot; return when final."""
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self._write("supervisor.json",
                   {"pid": os.getpid(), "started": time.time()})
        try:
            self._spawn(self.argv)
        except OSError as exc:
            self._report(f"cannot start {self.argv[0]}: {exc}")
            self._write("exit.json", {"status": 127,
                                                 "signal": None, "reboots": 0})
            return 1
        self._report("ok")
        reboots = []
        while True:
            rc = self.child.wait()
            if rc == 0 and not self.stopping:
                now = time.monotonic()
                reboots = [t for t in reboots if now - t < REBOOT_WINDOW]
                if len(reboots) < MAX_REBOOTS:
                    reboots.append(now)
                    if self.before_restart:
                        subprocess.call(self.before_restart,
                                        stdin=subprocess.DEVNULL)
                    try:
                        self._spawn(self.reboot_argv)
                        continue
                    except OSError as exc:
                        sys.stderr.write(f"cannot restart: {exc}\n")
            self._write("exit.json", {
                "status": rc if rc >= 0 else None,
                "signal": -rc if rc < 0 else None,
                "reboots": len(reboots)})
            return 0


def main(argv=None):
    """Entry point; see the module docstring."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        dirfd = beneath.open_dir_nofollow(args.rundir)
        supervisor = Supervisor(args, dirfd)
        if args.output_to_log:
            log = supervisor.open_log("process.log")
            for fd in (1, 2):
                os.dup2(log, fd)
            os.close(log)
    except OSError as exc:
        sys.stderr.write(f"cannot use {args.rundir}: {exc}\n")
        return 1
    if args.foreground:
        return supervisor.run()
    rfd, wfd = os.pipe()
    first = os.fork()
    if first:
        os.close(wfd)
        with os.fdopen(rfd) as r:
            answer = r.read().strip()
        os.waitpid(first, 0)
        if answer == "ok":
            return 0
        sys.stderr.write((answer or "supervisor died during start") + "\n")
        return 1
    # intermediate: new session, fork the supervisor, leave
    os.close(rfd)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0,) if args.output_to_log else (0, 1, 2):
        os.dup2(devnull, fd)
    code = 1
    try:
        supervisor.report_fd = wfd
        code = supervisor.run()
    finally:
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
