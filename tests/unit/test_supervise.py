"""The guest supervisor: restart on reboot (exit 0), record how it ended."""

import json
import os
import re
import subprocess
import sys

import pytest

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


# -- the supervisor may run as root in a directory nova-compute owns ----------
def _outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("root:secret\n")
    rundir = tmp_path / "run"
    rundir.mkdir()
    return rundir, outside


def _untouched(outside):
    assert (outside / "secret").read_text() == "root:secret\n"
    assert [p.name for p in outside.iterdir()] == ["secret"]


@pytest.mark.parametrize("name", ["process.log", "console.log"])
@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_planted_logs_are_refused(tmp_path, name, how):
    rundir, outside = _outside(tmp_path)
    if how == "symlink":
        (rundir / name).symlink_to(outside / "secret")
    else:
        os.link(outside / "secret", rundir / name)
    proc = _supervise(rundir, "echo written", "--stdout",
                      str(rundir / "console.log"))
    assert proc.returncode == 1
    assert "cannot start" in proc.stderr
    assert re.search("symbolic link|hard links", proc.stderr)
    assert read_json(rundir / "exit.json")["status"] == 127
    _untouched(outside)


def test_a_linked_run_directory_is_refused(tmp_path):
    rundir, outside = _outside(tmp_path)
    link = tmp_path / "linked"
    link.symlink_to(outside)
    proc = _supervise(link, "echo written", "--output-to-log")
    assert proc.returncode == 1
    assert "symbolic link" in proc.stderr
    _untouched(outside)


def test_state_files_replace_planted_links_without_following(tmp_path):
    rundir, outside = _outside(tmp_path)
    for name in ("exit.json", "child.pid", "supervisor.json"):
        (rundir / name).symlink_to(outside / "secret")
    proc = _supervise(rundir, "exit 3")
    assert proc.returncode == 0, proc.stderr
    assert read_json(rundir / "exit.json")["status"] == 3
    assert not (rundir / "exit.json").is_symlink()
    _untouched(outside)


def test_stdout_must_be_in_the_run_directory(tmp_path):
    rundir, outside = _outside(tmp_path)
    proc = _supervise(rundir, "echo x", "--stdout", str(outside / "secret"))
    assert proc.returncode == 2
    _untouched(outside)


def test_output_to_log_appends_the_supervisors_own_output(tmp_path):
    rundir, _ = _outside(tmp_path)
    (rundir / "process.log").write_text("before\n")
    proc = _supervise(rundir, "echo guest-out; echo guest-err >&2; exit 1",
                      "--output-to-log")
    assert proc.returncode == 0
    assert proc.stdout == proc.stderr == ""
    assert (rundir / "process.log").read_text().split() == [
        "before", "guest-out", "guest-err"]


def test_bhyve_files_are_checked_before_every_start(tmp_path):
    rundir, outside = _outside(tmp_path)
    uuid = "0c9d3f2e-6a1b-4c8d-9e7f-112233445566"
    (tmp_path / uuid).mkdir()
    (tmp_path / uuid / "nvram.fd").symlink_to(outside / "secret")
    paths = {"bhyve": "/bin/sh", "firmware": "/fw", "zvol_root": "/nonexist",
             "instances_path": str(tmp_path)}
    argv = ["/bin/sh", "-l", f"bootrom,/fw,{tmp_path}/{uuid}/nvram.fd", uuid]
    cmd = [sys.executable, "-m", "nova_bhyve.machine.supervise",
           "--foreground", "--rundir", str(rundir),
           "--check-bhyve-files", json.dumps(paths), "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "symbolic link" in proc.stderr
    _untouched(outside)


def test_a_link_planted_while_the_guest_runs_stops_the_reboot(tmp_path):
    rundir, outside = _outside(tmp_path)
    uuid = "0c9d3f2e-6a1b-4c8d-9e7f-112233445566"
    nvram = tmp_path / uuid / "nvram.fd"
    nvram.parent.mkdir()
    nvram.write_text("vars")
    paths = {"bhyve": "/bin/sh", "firmware": "/fw", "zvol_root": "/nonexist",
             "instances_path": str(tmp_path)}
    plant = f"rm {nvram}; ln -s {outside / 'secret'} {nvram}; exit 0"
    argv = ["/bin/sh", "-c", plant, "-l", f"bootrom,/fw,{nvram}", uuid]
    cmd = [sys.executable, "-m", "nova_bhyve.machine.supervise",
           "--foreground", "--rundir", str(rundir),
           "--check-bhyve-files", json.dumps(paths), "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "cannot restart" in proc.stderr and "symbolic link" in proc.stderr
    assert read_json(rundir / "exit.json") == {
        "status": 0, "signal": None, "reboots": 1}
    _untouched(outside)
