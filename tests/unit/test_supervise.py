"""The guest supervisor: restart on reboot (exit 0), record how it ended."""

import json
import subprocess
import sys

from nova_bhyve.machine.statefile import read_json


def _supervise(rundir, script, *extra):
    cmd = [sys.executable, "-m", "nova_bhyve.machine.supervise",
           "--foreground", "--rundir", str(rundir), *extra,
           "--", "/bin/sh", "-c", script]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_reboot_exit_restarts_with_the_reboot_argv(tmp_path):
    # first run "reboots" (exit 0); the restart runs the reboot argv
    counter = tmp_path / "runs"
    reboot = ["/bin/sh", "-c", f"echo again >> {counter}; exit 1"]
    proc = _supervise(tmp_path, f"echo first >> {counter}; exit 0",
                      "--reboot-argv", json.dumps(reboot),
                      "--before-restart",
                      json.dumps(["/bin/sh", "-c", f"echo hook >> {counter}"]))
    assert proc.returncode == 0, proc.stderr
    assert counter.read_text().split() == ["first", "hook", "again"]
    assert read_json(tmp_path / "exit.json") == {
        "status": 1, "signal": None, "reboots": 1}
    assert read_json(tmp_path / "child.pid")["pid"] > 0


def test_signal_and_stdout_are_recorded(tmp_path):
    proc = _supervise(tmp_path, "echo console-line; kill -9 $$",
                      "--stdout", str(tmp_path / "console.log"))
    assert proc.returncode == 0, proc.stderr
    assert read_json(tmp_path / "exit.json")["signal"] == 9
    assert (tmp_path / "console.log").read_text() == "console-line\n"


def test_a_reboot_loop_gives_up(tmp_path):
    proc = _supervise(tmp_path, "exit 0")
    assert proc.returncode == 0
    ended = read_json(tmp_path / "exit.json")
    assert ended["status"] == 0 and ended["reboots"] == 10


def test_detached_start_reports_a_missing_program(tmp_path):
    cmd = [sys.executable, "-m", "nova_bhyve.machine.supervise",
           "--rundir", str(tmp_path), "--", str(tmp_path / "no-such-binary")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot start" in proc.stderr
    assert read_json(tmp_path / "exit.json")["status"] == 127
