"""``nova-bhyve-migrate send`` and ``receive``, both as processes, moving a
running test-host guest, with the source's report read back."""

import re
import subprocess
import sys

from .conftest import needs_kvm
from .migration_helpers import (
    assert_guest_continued,
    receiver_with_secret,
    secret_file_in,
    stress_ready,
)

pytestmark = needs_kvm

_ROUND = re.compile(r"^round (\d+): \d+ms pages=(\d+) bytes=\d+ dirty=(\d+) "
                    r"expected=([\d.]+)ms throttle=(\d+)% log_reads=\d+$")


def _send(src, port, secret, *extra):
    """Run ``nova-bhyve-migrate send`` from ``src``; return its output."""
    with secret_file_in(src, secret) as path:
        done = subprocess.run(
            [sys.executable, "-P", "-m", "nova_bhyve.migration.cli", "send",
             "--vm", str(src.socket_path), "--to", f"127.0.0.1:{port}",
             "--secret-file", str(path), *extra],
            stdout=subprocess.PIPE, text=True, timeout=180)
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_send_reports_each_round_and_the_pause_it_predicted(vms):
    """A guest rewriting 32 MiB moves from one command to the other; with
    ``--rounds`` the source's report goes on with one line per round,
    numbered in order, the first predicting nothing and the last (the
    round the guest was paused for) the pause the report predicted."""
    src = vms.start("src", mem="256M", cmdline="mode=stress pattern=touch ws=32M")
    dst = vms.start("dst", mem="256M", incoming=True)
    stress_ready(src)
    proc, port, secret = receiver_with_secret(dst)
    out = _send(src, port, secret, "--rounds", "--max-downtime-ms", "100")
    assert proc.wait(60) == 0
    assert "result: completed" in proc.stdout.read()

    assert out.splitlines()[-1].startswith("wall time "), out
    count = int(re.search(r", (\d+) rounds over ", out).group(1))
    predicted = re.search(r"^predicted downtime ([\d.]+) ms", out, re.M).group(1)
    rounds = [_ROUND.match(line) for line in out.splitlines()
              if line.startswith("round ")]
    assert count >= 2 and len(rounds) == count and all(rounds), out
    assert [int(r.group(1)) for r in rounds] == list(range(count))
    assert rounds[0].group(3, 4) == ("0", "0.0") and int(rounds[0].group(2)) > 0
    assert rounds[-1].group(4) == predicted, out
    assert re.search(r"^pages: zero=\d+ delta=\d+ ", out, re.M), out

    assert src.client.status()["state"] == "paused"
    assert dst.client.status()["state"] == "running"
    assert src.stop() == 1
    assert_guest_continued(src, dst)
