"""The libFuzzer targets' smoke run: every target builds, runs and finds nothing.

``tools/fuzz smoke`` runs each target for a few seconds from its seed
corpus (doc/fuzzing.md); this test fails on any crash, leak or sanitizer
report, and on a target that executed no input.
"""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FUZZ = ROOT / "tools" / "fuzz"
SECONDS_PER_TARGET = 10
CC = os.environ.get("CC", "clang")

pytestmark = pytest.mark.skipif(
    shutil.which(CC) is None,
    reason=f"{CC} is not installed (tools/bootstrap test installs clang): "
           "the fuzz targets need libFuzzer")

ROW = re.compile(r"^(\w+)\s+(\d+)\s+(\S+)\s+(ok|FAILED.*)$")


def fuzz(*args, timeout):
    return subprocess.run([str(FUZZ), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_fuzz_targets_smoke():
    build = fuzz("build", timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    targets = fuzz("list", timeout=60).stdout.split()
    assert len(targets) >= 10, targets

    smoke = fuzz("smoke", str(SECONDS_PER_TARGET),
                 timeout=len(targets) * (SECONDS_PER_TARGET + 30))
    rows = {m.group(1): (int(m.group(2)), m.group(4))
            for m in map(ROW.match, smoke.stdout.splitlines()) if m}
    assert sorted(rows) == sorted(targets), smoke.stdout
    failed = {t: r for t, r in rows.items() if r[1] != "ok" or r[0] == 0}
    assert not failed, smoke.stdout + smoke.stderr[-4000:]
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr[-4000:]
