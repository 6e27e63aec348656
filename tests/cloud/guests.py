"""What the guests themselves say, read on the hosts of the cloud.

A test-host guest runs as an ``nb-testhost`` process whose ``--rundir`` is
``<[bhyve] runtime_path>/<uuid>`` (``data/<host>/run/<uuid>``; its disks
are in ``<instances_path>/<uuid>``); its console (``console.log`` in the
run directory) carries
the payload's heartbeats and self-check (nova_bhyve/testhost/guest/README.md).
"""

import os
import threading
import time
from pathlib import Path

from cloudctl import procs

from nova_bhyve import polling
from nova_bhyve.testhost.console import parse_console

CLOUD_DIR = Path(os.environ.get("NB_CLOUD_DIR", "/var/lib/nova-bhyve-cloud"))
HOSTS = ("host1", "host2")


class GuestCheckFailed(AssertionError):
    """A guest is missing, runs twice, stalled or reported a self-check error."""


def rundir(host, uuid):
    """The guest's runtime directory on ``host`` ([bhyve] runtime_path)."""
    return CLOUD_DIR / "data" / host / "run" / uuid


def instdir(host, uuid):
    """The guest's instance directory (disks) on ``host`` (instances_path)."""
    return CLOUD_DIR / "data" / host / "instances" / uuid


def console_text(host, uuid):
    try:
        return (rundir(host, uuid) / "console.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def since_last_boot(text):
    """The part of a console after the guest's last boot banner.

    A revert, reboot or power-on boots the payload anew in the same
    console.log, and its heartbeats start again from 1.
    """
    banner = text.rfind("NBGUEST ")
    return text[text.rfind("\n", 0, banner) + 1:] if banner > 0 else text


def current_boot(host, uuid):
    """The console of the guest on ``host`` since it last booted."""
    return since_last_boot(console_text(host, uuid))


def hosts_running(uuid):
    """Return the hosts on which an nb-testhost process of ``uuid`` runs."""
    found = set()
    wanted = {str(rundir(h, uuid)).encode(): h for h in HOSTS}
    for _pid, argv in procs.cmdlines():
        if not argv or not argv[0].endswith(b"nb-testhost"):
            continue
        for arg in argv:
            if arg in wanted:
                found.add(wanted[arg])
    return found


def wait_for(predicate, timeout, what, interval=0.2):
    """Poll ``predicate`` until true, or raise GuestCheckFailed naming ``what``."""
    value = polling.poll(predicate, timeout, interval)
    if not value:
        raise GuestCheckFailed(f"timed out after {timeout} s waiting for {what}")
    return value


def check_runs_only_on(uuid, host, beats=200):
    """The guest runs on ``host`` alone; heartbeats advance; self-check clean."""
    running = hosts_running(uuid)
    if running != {host}:
        raise GuestCheckFailed(f"guest {uuid} runs on {sorted(running) or 'no host'}"
                               f", the API says {host}")
    start = parse_console(current_boot(host, uuid)).last_seq
    wait_for(lambda: parse_console(current_boot(host, uuid)).last_seq
             >= start + beats, 30, f"{beats} heartbeats of {uuid} on {host}")
    report = parse_console(current_boot(host, uuid))
    if report.errors or report.fails:
        raise GuestCheckFailed(f"guest {uuid} on {host} reports self-check "
                               f"errors: {report.fails[:3]}")
    if report.sequence_breaks():
        raise GuestCheckFailed(f"guest {uuid} on {host}: heartbeat sequence "
                               f"broken at {report.sequence_breaks()[:3]}")
    return report


def wait_full_pass(uuid, host, timeout=300):
    """Wait until the guest has written its whole working set once.

    A stress guest that has not finished its first pass still has zero
    pages, which the engine does not send: a copy started earlier is
    shorter than the link and the working set make it look.
    """
    def done():
        beats = parse_console(current_boot(host, uuid)).heartbeats
        return bool(beats) and beats[-1].passes >= 1
    wait_for(done, timeout, f"a full pass of {uuid}'s working set on {host}",
             interval=1)


class ConsoleFollower(threading.Thread):
    """Keeps the whole console of a guest on its source host while it moves.

    Nova removes the source's files after a live migration; this follower
    reads until then, and notes whether its last read came after the
    source's VM had ended (so that nothing the guest printed there is lost).
    """

    def __init__(self, host, uuid):
        super().__init__(daemon=True)
        self.host, self.uuid = host, uuid
        self.text = b""
        self.complete = False
        self._halt = threading.Event()

    def run(self):
        path = rundir(self.host, self.uuid) / "console.log"
        while not self._halt.is_set():
            vm_gone = self.host not in hosts_running(self.uuid)
            try:
                with open(path, "rb") as f:
                    f.seek(len(self.text))
                    self.text += f.read()
            except FileNotFoundError:
                return
            if vm_gone:
                self.complete = True
            time.sleep(0.02)

    def stop(self):
        self._halt.set()
        self.join(5)


def check_continued(follower, dst, uuid):
    """The guest went on at ``dst`` right where it stopped at the source."""
    follower.stop()
    report = check_runs_only_on(uuid, dst)
    if report.banner:
        raise GuestCheckFailed(f"guest {uuid} booted anew on {dst}")
    if not follower.complete:
        raise GuestCheckFailed(f"the source console of {uuid} vanished before "
                               "its VM ended: cannot check continuity")
    src_text = since_last_boot(follower.text.decode(errors="replace"))
    combined = parse_console(src_text + console_text(dst, uuid))
    if combined.sequence_breaks():
        raise GuestCheckFailed(f"guest {uuid}: heartbeats broken across the "
                               f"move at {combined.sequence_breaks()[:3]}")
    return parse_console(src_text).last_seq, report.heartbeats[0].seq
