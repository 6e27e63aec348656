"""A nova-compute restarted in the middle of a live migration (fault matrix).

Run with the cloud's Python after ``tools/cloud up``:

    tools/cloud run python tests/cloud/compute_restart.py [source|destination]

Two variants, each on its own stress guest booted on host1 and
live-migrated to host2 (``openstack server migrate --live-migration
--host host2``) over a slowed link so that the memory copy is still
running when a compute is restarted (``tools/cloud service stop``, then
``start``): the source's nova-compute (host1) in one, the destination's
(host2) in the other.  Afterwards, once the server has left MIGRATING,
each check prints one line:

- the server's status is ACTIVE;
- ``server show``'s host is the host the guest really runs on;
- exactly one nb-testhost process of the instance exists on the machine;
- its heartbeats advance and its self-check is clean (no FAIL);
- nothing is left on the other host: no VM process, no listener on its
  migration address, no instance or runtime directory (and, after the
  delete, no tap device of its ports);
- the migration record ended (status and the driver's event, whose
  details must name the cause);
- one more live migration of the server completes;
- once the server is deleted nothing of it is left on either host (if
  something is, restarting that host's nova-compute must reap it).

Exit status 0 only if every check of every variant passed.  Servers it
made are deleted at the end.
"""

import datetime
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from nova_bhyve.testhost.console import parse_console  # noqa: E402
from tests.cloud import guests  # noqa: E402
from tests.cloud.cli_scenario import (  # noqa: E402
    HOST_ADDR,
    SLOW_LINK,
    Link,
    cli,
    create,
    live_migrate,
    migrations,
    show,
)
from tests.cloud.guests import GuestCheckFailed, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "nb-cli-restart-"
SRC, DST = "host1", "host2"
SETTLE_TIMEOUT = 300        # the server leaving MIGRATING after the restart
ORPHAN_WAIT = 120           # orphan grace (60 s) + check interval + margin


class Results:
    """Pass/fail lines of one run."""

    def __init__(self):
        self.failed = 0
        self.passed = 0

    def check(self, variant, what, ok, detail):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        print(f"  [{variant}] {'PASS' if ok else 'FAIL'} {what}: {detail}",
              flush=True)
        return ok


results = Results()


def now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")


def cloud(*args):
    """tools/cloud ARGS; return how long it took (s)."""
    t0 = time.monotonic()
    subprocess.run([str(ROOT / "tools/cloud"), *args], check=True,
                   capture_output=True)
    return time.monotonic() - t0


# -- what runs on the machine -------------------------------------------------
def vm_processes(uuid):
    """[(pid, host)] of every nb-testhost process whose argv names ``uuid``."""
    from cloudctl import procs
    found = []
    for pid, argv in procs.cmdlines():
        if not argv or not argv[0].endswith(b"nb-testhost"):
            continue
        if any(uuid.encode() in arg for arg in argv):
            host = next((h for h in guests.HOSTS if
                         str(guests.rundir(h, uuid)).encode() in argv), "?")
            found.append((pid, host))
    return found


def listeners(host):
    """Listening TCP sockets on ``host``'s migration address (ss lines)."""
    out = subprocess.run(["ss", "-Hltnp", "src", HOST_ADDR[host]],
                         capture_output=True, text=True).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def files_of(host, uuid):
    """The instance and runtime directories of ``uuid`` on ``host``."""
    return [str(p) for p in (guests.rundir(host, uuid),
                             guests.instdir(host, uuid)) if p.exists()]


# -- what Nova says -----------------------------------------------------------
def wait_copying(uuid):
    """Wait until the migration runs and the engine reported memory copied."""
    def copying():
        mig = next((m for m in migrations(uuid)
                    if m["Type"] == "live-migration"), None)
        if mig is None or mig["Status"] != "running":
            return None
        m = cli.os("server", "migration", "show", uuid, mig["UUID"])
        return m["Memory Processed Bytes"] and (mig, m)
    return wait_for(copying, 180, "the engine to report memory copied",
                    interval=1)


def wait_settled(uuid):
    """Wait until the server has no task state (left MIGRATING)."""
    def settled():
        s = show(uuid)
        return s.get("OS-EXT-STS:task_state") is None and s
    return wait_for(settled, SETTLE_TIMEOUT, f"{uuid} to leave MIGRATING",
                    interval=2)


def migration_events(uuid):
    """The events of the server's last live-migration action."""
    actions = [a for a in cli.os("server", "event", "list", uuid)
               if a["Action"] == "live-migration"]
    if not actions:
        return []
    return cli.os("server", "event", "show", uuid,
                  actions[0]["Request ID"])["events"]


def describe_events(events):
    parts = []
    for e in events:
        why = e.get("details") or ""
        if not why and e.get("traceback"):
            why = e["traceback"].strip().splitlines()[-1]
        parts.append(f"{e['event']}@{e.get('host')}={e.get('result')}"
                     + (f" ({why[:300]})" if why else ""))
    return "; ".join(parts)


# -- one variant --------------------------------------------------------------
def restart_mid_migration(variant, restarted):
    """Boot on SRC, migrate to DST, restart ``restarted``'s compute mid-copy."""
    uuid = create(f"{variant}", image="nb-stress", flavor="m1.stress",
                  host=SRC)
    print(f"  [{variant}] {now()} server {uuid} ACTIVE on {SRC}", flush=True)
    guests.wait_full_pass(uuid, SRC)
    service = f"nova-compute-{restarted}"
    with Link(DST, SLOW_LINK):
        cli.os("server", "migrate", "--live-migration", "--host", DST, uuid,
               fmt=False)
        mig, progress = wait_copying(uuid)
        print(f"  [{variant}] {now()} migration {mig['Id']} {mig['Status']} "
              f"{mig['Source Compute']} -> {mig['Dest Compute']}, memory "
              f"processed {progress['Memory Processed Bytes']} of "
              f"{progress['Memory Total Bytes']} B", flush=True)
        took = cloud("service", "stop", service)
        print(f"  [{variant}] {now()} {service} stopped ({took:.1f} s); "
              f"VM processes: {vm_processes(uuid)}", flush=True)
        took = cloud("service", "start", service)
        print(f"  [{variant}] {now()} {service} started ({took:.1f} s)",
              flush=True)
        s = wait_settled(uuid)
    print(f"  [{variant}] {now()} server {s['status']} task_state "
          f"{s.get('OS-EXT-STS:task_state')} host {s['OS-EXT-SRV-ATTR:host']}",
          flush=True)
    return uuid, mig


def heartbeats(host, uuid, beats=200):
    """(ok, detail): the console on ``host`` advances, with no FAIL line.

    Judged on its own, whether or not another copy of the guest exists.
    """
    def report():
        return parse_console(guests.current_boot(host, uuid))
    start = report().last_seq
    try:
        wait_for(lambda: report().last_seq >= start + beats, 30,
                 f"{beats} heartbeats of {uuid} on {host}")
    except GuestCheckFailed as e:
        return False, str(e)
    r = report()
    if r.errors or r.fails or r.sequence_breaks():
        return False, (f"FAIL lines {r.fails[:3]}, errors {r.errors}, "
                       f"sequence breaks {r.sequence_breaks()[:3]}")
    return True, (f"heartbeats {start} -> {r.last_seq} on {host}, no FAIL, "
                  "sequence unbroken")


def check_outcome(variant, uuid, mig):
    """Every invariant of the fault matrix, one line each."""
    s = show(uuid)
    results.check(variant, "server status ACTIVE", s["status"] == "ACTIVE",
                  f"{s['status']} (fault: {s.get('fault')})"
                  if s["status"] != "ACTIVE" else "ACTIVE")
    api_host = s["OS-EXT-SRV-ATTR:host"]
    other = DST if api_host == SRC else SRC
    # first what the other host keeps: an orphaned incoming guest goes only
    # after the destination's grace period
    left, waited = wait_other_clean(other, uuid)
    results.check(variant, f"nothing left on {other}",
                  not any(left.values()),
                  f"{left}" if any(left.values()) else
                  f"clean {waited:.0f} s after the server settled")
    procs = vm_processes(uuid)
    running = guests.hosts_running(uuid)
    results.check(variant, "API host is where the guest runs",
                  running == {api_host},
                  f"API says {api_host}, guest runs on {sorted(running)}")
    results.check(variant, "exactly one VM process", len(procs) == 1,
                  f"{procs}")
    ok, detail = heartbeats(api_host, uuid)
    results.check(variant, "heartbeats advance, self-check clean", ok, detail)
    record = next(m for m in migrations(uuid) if m["Id"] == mig["Id"])
    events = migration_events(uuid)
    results.check(variant, "migration record ended",
                  record["Status"] in ("error", "failed", "cancelled",
                                       "completed"),
                  f"migration {record['Id']} {record['Status']}; events: "
                  f"{describe_events(events)}")
    failed = [e for e in events if e.get("result") == "Error"]
    if record["Status"] != "completed":
        results.check(variant, "an error event names the cause",
                      any((e.get("details") or e.get("traceback"))
                          for e in failed),
                      describe_events(failed) or "no event with an error")
    try:
        detail = live_migrate(uuid)
        results.check(variant, "another live migration", True, detail)
    except GuestCheckFailed as e:
        results.check(variant, "another live migration", False, str(e))


def leftovers(other, uuid):
    """What of the instance is on ``other``: VM processes, listeners, files."""
    return {"VM processes": [p for p in vm_processes(uuid) if p[1] == other],
            "listeners": listeners(other),
            "files": files_of(other, uuid)}


def wait_other_clean(other, uuid):
    """({what: left}, seconds waited) once ``other`` is clean or time is up.

    A destination whose source's compute restarted hears of no rollback:
    its orphan watch removes the incoming guest after
    ``[bhyve] live_migration_orphan_grace`` (60 s, checked every 15 s).
    """
    t0 = time.monotonic()
    while True:
        left = leftovers(other, uuid)
        waited = time.monotonic() - t0
        if not any(left.values()) or waited > ORPHAN_WAIT:
            return left, waited
        time.sleep(3)


VARIANTS = {
    "source": SRC,
    "destination": DST,
}


def taps(host):
    """Tap devices in ``host``'s network namespace (nb-<host>)."""
    out = subprocess.run(["ip", "netns", "exec", f"nb-{host}", "ip", "-br",
                          "link"], capture_output=True, text=True).stdout
    return {line.split()[0].split("@")[0] for line in out.splitlines()
            if line.startswith("tap")}


def tap_names(uuid):
    """The tap devices of the server's ports ("tap" + 11 characters)."""
    return {"tap" + p["ID"][:11]
            for p in cli.os("port", "list", "--server", uuid)}


def left_behind(uuid, its_taps=()):
    """{host: [what]} of ``uuid`` still on the machine."""
    left = {}
    for host in guests.HOSTS:
        what = [f"VM pid {pid}" for pid, h in vm_processes(uuid) if h == host]
        what += files_of(host, uuid)
        what += sorted(taps(host) & set(its_taps))
        if what:
            left[host] = what
    return left


def delete_and_check(variant, uuid):
    """Delete the server; check nothing is left; else restart to reap it.

    A nova-compute reaps, when it starts, any guest still waiting for an
    incoming migration (LiveMigrationMixin._reap_incoming): the restart is
    the operator's way out, checked here too.
    """
    its_taps = tap_names(uuid)
    cli.os("server", "delete", "--wait", uuid, fmt=False)
    left = {}
    try:
        wait_for(lambda: not left_behind(uuid, its_taps), 60,
                 f"{uuid} to be removed")
    except GuestCheckFailed:
        left = left_behind(uuid, its_taps)
    results.check(variant, "server deleted, nothing left", not left,
                  f"left: {left}" if left else "no process or file")
    for host in left:
        took = cloud("service", "stop", f"nova-compute-{host}")
        cloud("service", "start", f"nova-compute-{host}")
        try:
            wait_for(lambda h=host: h not in left_behind(uuid, its_taps), 120,
                     f"nova-compute-{host} to reap {uuid}")
            reaped = True
        except GuestCheckFailed:
            reaped = False
        results.check(variant, f"restarting nova-compute-{host} reaps it",
                      reaped, f"stop took {took:.1f} s; left now: "
                      f"{left_behind(uuid, its_taps).get(host, [])}")


def cleanup():
    """Delete any server of this test still there (after an exception)."""
    servers = [s["ID"] for s in cli.os("server", "list", "--all-projects")
               if s["Name"].startswith(PREFIX)]
    for uuid in servers:
        cli.os("server", "delete", "--wait", uuid, fmt=False)
    return servers


def main(argv):
    import tests.cloud.cli_scenario as scenario
    scenario.PREFIX = PREFIX
    names = argv or list(VARIANTS)
    t_all = time.monotonic()
    try:
        for name in names:
            print(f"restart {name} compute mid-migration ({now()}):", flush=True)
            t0 = time.monotonic()
            try:
                uuid, mig = restart_mid_migration(name, VARIANTS[name])
                check_outcome(name, uuid, mig)
                delete_and_check(name, uuid)
            except Exception as e:  # noqa: BLE001 - report, go on, clean up
                results.check(name, "scenario ran", False,
                              f"{type(e).__name__}: {e}")
            print(f"  [{name}] {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        left = cleanup()
        if left:
            print(f"cleanup: deleted {left}", flush=True)
    print(f"compute restart: {results.passed} checks passed, "
          f"{results.failed} failed ({time.monotonic() - t_all:.0f} s)",
          flush=True)
    return 1 if results.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
