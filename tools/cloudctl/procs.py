"""Start, watch and stop the cloud's processes (one pid file and log each)."""

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from cloudctl import layout


class CloudError(Exception):
    """A step failed; the message names the service and its log."""


def log_path(name):
    return layout.LOGS / f"{name}.log"


def _pid_path(name):
    return layout.RUN / f"{name}.pid"


def pid_of(name):
    """Return the pid of service ``name`` if it runs, else None."""
    try:
        pid = int(_pid_path(name).read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def cmdlines():
    """Yield (pid, argv as bytes) of every process this machine runs."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                yield int(pid), f.read().split(b"\0")
        except OSError:
            continue


def tail(name, lines=25):
    """Return the last ``lines`` lines of service ``name``'s log."""
    try:
        with open(log_path(name), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def start(name, argv, env=None, cwd=None):
    """Start ``argv`` as service ``name`` unless it already runs."""
    if pid_of(name):
        return False
    layout.LOGS.mkdir(parents=True, exist_ok=True)
    layout.RUN.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, **(env or {}))
    with open(log_path(name), "ab") as log:
        log.write(f"\n==== starting {name} at {time.ctime()}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env,
                                cwd=cwd or layout.CLOUD_DIR,
                                start_new_session=True)
    _pid_path(name).write_text(str(proc.pid))
    return True


def wait_ready(name, check, timeout):
    """Poll ``check()`` until true; raise CloudError naming the log if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid_of(name) is None:
            raise CloudError(f"{name} exited while starting; its log is "
                             f"{log_path(name)}:\n{tail(name)}")
        if check():
            return
        time.sleep(0.5)
    raise CloudError(f"{name} did not come up within {timeout} s; its log is "
                     f"{log_path(name)}:\n{tail(name)}")


def stop(name, timeout=20):
    """Stop service ``name`` (its whole process group); True if it ran."""
    pid = pid_of(name)
    if pid is None:
        _pid_path(name).unlink(missing_ok=True)
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pid_of(name):
            time.sleep(0.2)
        if not pid_of(name):
            break
    _pid_path(name).unlink(missing_ok=True)
    return True


def http_answers(url):
    """Return a check that is true once ``url`` answers below HTTP 500."""
    def check():
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError as e:
            return e.code < 500
        except (OSError, ValueError):
            return False
    return check


def port_open(port, host="127.0.0.1"):
    """Return a check that is true once ``host:port`` accepts connections."""
    def check():
        with socket.socket() as s:
            s.settimeout(1)
            return s.connect_ex((host, port)) == 0
    return check


def run(argv, what, env=None, quiet=True):
    """Run a one-off command; raise CloudError with its output on failure."""
    proc = subprocess.run(argv, env=dict(os.environ, **(env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True)
    if proc.returncode != 0:
        out = "\n".join(proc.stdout.splitlines()[-30:])
        raise CloudError(f"{what} failed (exit {proc.returncode}):\n{out}")
    if not quiet:
        print(proc.stdout, end="")
    return proc.stdout
