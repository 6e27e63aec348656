"""The openstack CLI (and novaclient) move guests on the cloud tools/cloud made.

Run with the cloud's Python after ``tools/cloud up``:

    tools/cloud run python tests/cloud/cli_scenario.py

Each step prints one line; each checks, on the hosts, that the guest runs
where the API says and nowhere else, with its heartbeats advancing and its
self-check clean (tests/cloud/guests.py).  Exit status 1 on the first
failure.  Servers it made are deleted at the end, even after a failure.
"""

import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from tests.cloud import guests  # noqa: E402
from tests.cloud.guests import GuestCheckFailed, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HOST_ADDR = {"host1": "127.0.0.2", "host2": "127.0.0.3"}  # tools/cloudctl/layout
# Over either link, round 0 of the stress guest's 256 MiB working set lasts
# 20 s or more once the guest has written all of it (guests.wait_full_pass:
# a copy started sooner, on a loaded host, ended in 13 s), so the abort and
# the force arrive while it still runs (over 256 Mbit/s the engine
# converged by itself before a force could land).
# A forced switch-over pauses the guest while the rest crosses the link.
SLOW_LINK = "48mbit"
FORCE_LINK = "96mbit"
PREFIX = "nb-cli-"


class Cli:
    """The real clients, as an operator types them."""

    def __init__(self):
        self.calls = 0

    def _run(self, argv, check=True, env=None):
        self.calls += 1
        proc = subprocess.run(argv, capture_output=True, text=True,
                              env=dict(os.environ, **(env or {})))
        if check and proc.returncode:
            raise GuestCheckFailed(f"`{' '.join(argv)}` failed: "
                                   f"{proc.stderr.strip()[-1500:]}")
        return proc

    def os(self, *args, mv="2.latest", fmt=True):
        argv = ["openstack", "--os-compute-api-version", mv, *args]
        if fmt:
            argv += ["-f", "json"]
        out = self._run(argv).stdout
        return json.loads(out) if fmt and out.strip() else out

    def nova(self, *args):
        """python-novaclient, which reads OS_* variables, not clouds.yaml."""
        import openstack.config
        cloud = openstack.config.OpenStackConfig().get_one()
        auth = cloud.config["auth"]
        env = {"OS_AUTH_URL": auth["auth_url"],
               "OS_USERNAME": auth["username"],
               "OS_PASSWORD": auth["password"],
               "OS_PROJECT_NAME": auth["project_name"],
               "OS_USER_DOMAIN_NAME": auth["user_domain_name"],
               "OS_PROJECT_DOMAIN_NAME": auth["project_domain_name"],
               "OS_REGION_NAME": cloud.config["region_name"]}
        return self._run(["nova", *args], env=env).stdout


cli = Cli()


def show(server):
    return cli.os("server", "show", server)


def host_of(server):
    return show(server)["OS-EXT-SRV-ATTR:host"]


def other(host):
    return "host2" if host == "host1" else "host1"


def wait_server(server, status, host=None, timeout=180):
    def ready():
        s = show(server)
        if s["status"] == "ERROR":
            raise GuestCheckFailed(f"{server} went to ERROR: {s.get('fault')}")
        return (s["status"] == status and s.get("OS-EXT-STS:task_state") is None
                and (host is None or s["OS-EXT-SRV-ATTR:host"] == host)) and s
    return wait_for(ready, timeout, f"{server} to be {status}"
                    + (f" on {host}" if host else ""), interval=1)


def migrations(server):
    return cli.os("server", "migration", "list", "--server", server)


def create(name, image="nb-guest", flavor="m1.nano", host=None):
    args = ["server", "create", "--image", image, "--flavor", flavor,
            "--network", "private", "--wait", PREFIX + name]
    if host:
        args[2:2] = ["--host", host]
    server = cli.os(*args)
    guests.check_runs_only_on(server["id"], server["OS-EXT-SRV-ATTR:host"])
    return server["id"]


def live_migrate(uuid, dst=None):
    """Live-migrate and check the guest continued on the new host."""
    src = host_of(uuid)
    follower = guests.ConsoleFollower(src, uuid)
    follower.start()
    args = ["server", "migrate", "--live-migration", "--wait", uuid]
    if dst:
        args[3:3] = ["--host", dst]
    cli.os(*args, fmt=False)
    s = wait_server(uuid, "ACTIVE")
    new = s["OS-EXT-SRV-ATTR:host"]
    if new == src or (dst and new != dst):
        raise GuestCheckFailed(f"{uuid} is on {new} after moving from {src}")
    last, first = guests.check_continued(follower, new, uuid)
    mig = migrations(uuid)[0]
    if mig["Status"] != "completed":
        raise GuestCheckFailed(f"migration record says {mig['Status']}")
    return f"{src} -> {new}, heartbeats {last} -> {first}"


def switchover_record(uuid):
    """What Nova recorded of the server's last live migration.

    The migration record's status and its creation-to-update span, and the
    ``bhyve_switchover`` instance action event the driver adds (measured
    downtime, total time, bytes, rounds: nova_bhyve/migration/events.py).
    """
    actions = [a for a in cli.os("server", "event", "list", uuid)
               if a["Action"] == "live-migration"]
    if not actions:
        raise GuestCheckFailed(f"no live-migration action for {uuid}")
    req = actions[0]["Request ID"]
    events = cli.os("server", "event", "show", uuid, req)["events"]
    names = [e["event"] for e in events]
    figures = [n for n in names if n.startswith("bhyve_switchover")]
    if not figures:
        raise GuestCheckFailed(f"no bhyve_switchover event in {names}")
    mig = next(m for m in migrations(uuid) if m["Type"] == "live-migration")
    span = (datetime.datetime.fromisoformat(mig["Updated At"]) -
            datetime.datetime.fromisoformat(mig["Created At"])).total_seconds()
    return (f"migration {mig['Id']} {mig['Status']} in {span:.0f} s "
            f"(record created -> updated), event {figures[0]!r}")


class Link:
    """tc on lo: traffic to one host's migration address crawls."""

    def __init__(self, host, rate):
        self.addr, self.rate = HOST_ADDR[host], rate

    def __enter__(self):
        # htb: everything else keeps a class that never limits it
        for cmd in (["qdisc", "add", "dev", "lo", "root", "handle", "1:",
                     "htb", "default", "10"],
                    ["class", "add", "dev", "lo", "parent", "1:", "classid",
                     "1:10", "htb", "rate", "100gbit", "burst", "4mb"],
                    ["class", "add", "dev", "lo", "parent", "1:", "classid",
                     "1:30", "htb", "rate", self.rate, "ceil", self.rate],
                    ["filter", "add", "dev", "lo", "parent", "1:", "protocol",
                     "ip", "prio", "1", "u32", "match", "ip", "dst",
                     f"{self.addr}/32", "flowid", "1:30"]):
            proc = subprocess.run(["tc", *cmd], capture_output=True, text=True)
            if proc.returncode:
                self.__exit__()
                raise GuestCheckFailed(f"tc {' '.join(cmd)}: {proc.stderr}")
        return self

    def __exit__(self, *exc):
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"],
                       capture_output=True)


def start_slow_migration(uuid):
    """Start a live migration of a stress guest; wait until it runs."""
    cli.os("server", "migrate", "--live-migration", uuid, fmt=False)
    return wait_for(lambda: next((m for m in migrations(uuid)
                                  if m["Status"] == "running"), None),
                    120, "the migration to run", interval=0.5)


def progress_moves(uuid, mig_uuid):
    """memory_* in `migration show` change while the migration runs."""
    seen = []
    def changed():
        # by UUID: OSC 10.5 passes a numeric id to the SDK in the wrong place
        m = cli.os("server", "migration", "show", uuid, mig_uuid)
        seen.append((m["Memory Total Bytes"], m["Memory Processed Bytes"],
                     m["Memory Remaining Bytes"]))
        values = {s for s in seen if s[0]}
        return len(values) >= 2 and seen
    wait_for(changed, 120, "memory_processed/remaining to change", interval=1)
    first, last = seen[0], seen[-1]
    return (f"total {last[0]} B, processed {first[1]} -> {last[1]} B, "
            f"remaining {first[2]} -> {last[2]} B")


# -- the steps --------------------------------------------------------------
def step_live_named_and_back(ctx):
    uuid = ctx["idle"] = create("idle")
    there = live_migrate(uuid, "host2" if host_of(uuid) == "host1" else "host1")
    record = switchover_record(uuid)
    back = live_migrate(uuid)
    return f"--host: {there}, {record}; scheduler-chosen: {back}"


def step_progress_and_abort(ctx):
    uuid = ctx["stress"] = create("stress", image="nb-stress", flavor="m1.stress")
    src = host_of(uuid)
    guests.wait_full_pass(uuid, src)
    with Link(other(src), SLOW_LINK):
        mig = start_slow_migration(uuid)
        listed = f"{mig['Type']} {mig['Status']} {mig['Source Compute']} -> " \
                 f"{mig['Dest Compute']}"
        seen = progress_moves(uuid, mig["UUID"])
        cli.os("server", "migration", "abort", uuid, str(mig["Id"]), fmt=False)
        wait_for(lambda: migrations(uuid)[0]["Status"] == "cancelled", 120,
                 "the migration to be cancelled", interval=1)
    wait_server(uuid, "ACTIVE", host=src)
    guests.check_runs_only_on(uuid, src)
    # OSC's `migration list` has no memory columns; `show` has them
    return (f"list: {listed}; show: {seen}; abort: "
            f"cancelled, ACTIVE on {src}")


def step_force_complete(ctx):
    uuid = ctx["stress"]
    src = host_of(uuid)
    follower = guests.ConsoleFollower(src, uuid)
    follower.start()
    with Link(other(src), FORCE_LINK):
        mig = start_slow_migration(uuid)
        cli.os("server", "migration", "force", "complete", uuid,
               str(mig["Id"]), fmt=False)
        wait_for(lambda: migrations(uuid)[0]["Status"] in
                 ("completed", "error", "failed", "cancelled"), 300,
                 "the forced migration to end", interval=1)
    status = migrations(uuid)[0]["Status"]
    if status != "completed":
        raise GuestCheckFailed(f"forced migration ended {status}")
    s = wait_server(uuid, "ACTIVE", host=other(src))
    last, first = guests.check_continued(follower, s["OS-EXT-SRV-ATTR:host"], uuid)
    return (f"{src} -> {other(src)} completed, heartbeats {last} -> {first}, "
            f"{switchover_record(uuid)}")


def step_cold_migrate_confirm(ctx):
    uuid = ctx["idle"]
    src = host_of(uuid)
    cli.os("server", "migrate", "--wait", uuid, fmt=False)
    wait_server(uuid, "VERIFY_RESIZE", host=other(src))
    cli.os("server", "resize", "confirm", uuid, fmt=False)
    wait_server(uuid, "ACTIVE", host=other(src))
    guests.check_runs_only_on(uuid, other(src))
    return f"{src} -> {other(src)}, confirmed"


def step_resize_revert(ctx):
    uuid = ctx["idle"]
    src = host_of(uuid)
    cli.os("server", "resize", "--flavor", "m1.micro", "--wait", uuid, fmt=False)
    s = wait_server(uuid, "VERIFY_RESIZE")
    moved_to = s["OS-EXT-SRV-ATTR:host"]
    cli.os("server", "resize", "revert", uuid, fmt=False)
    s = wait_server(uuid, "ACTIVE", host=src)
    if s["flavor"]["name"] != "m1.nano":
        raise GuestCheckFailed(f"flavor after revert: {s['flavor']}")
    guests.check_runs_only_on(uuid, src)
    return f"resized on {moved_to} to m1.micro, reverted to m1.nano on {src}"


def _cloud(*args):
    subprocess.run([str(ROOT / "tools/cloud"), *args], check=True,
                   capture_output=True)


def step_evacuate(ctx):
    uuid = ctx["idle"]
    if host_of(uuid) != "host1":
        live_migrate(uuid, "host1")
    src = "host1"
    service = f"nova-compute-{src}"
    _cloud("service", "stop", service)
    try:
        cli.os("compute", "service", "set", "--down", src, "nova-compute",
               fmt=False)
        cli.os("server", "evacuate", uuid, mv="2.94")
        wait_server(uuid, "ACTIVE", host=other(src), timeout=300)
        running = guests.hosts_running(uuid)
        if running != {src, other(src)}:
            raise GuestCheckFailed(f"while {src} is down the guest runs on "
                                   f"{sorted(running)}, expected both")
    finally:
        _cloud("service", "start", service)
    wait_for(lambda: guests.hosts_running(uuid) == {other(src)}, 180,
             f"{src} to destroy its stale guest on restart")
    # Nova refuses to force a host up while its evacuation record is still
    # "done": the restarted compute marks it completed after the destroy
    try:
        wait_for(lambda: all(m["Status"] == "completed"
                             for m in migrations(uuid)
                             if m["Type"] == "evacuation"), 120,
                 f"{src} to complete the evacuation record on restart")
    finally:
        # whatever happened, the later steps and tempest need both hosts
        cli.os("compute", "service", "set", "--up", src, "nova-compute",
               fmt=False)
    wait_for(lambda: any(s["State"] == "up" for s in cli.os(
        "compute", "service", "list", "--host", src, "--service",
        "nova-compute")), 120, f"{src} to report up")
    guests.check_runs_only_on(uuid, other(src))
    return f"{src} down -> rebuilt on {other(src)}; stale guest destroyed on {src}"


def step_host_evacuate_live(ctx):
    ctx["hel"] = [create(f"hel{i}", host="host1") for i in (1, 2)]
    on_host1 = [s["ID"] for s in cli.os("server", "list", "--all-projects",
                                         "--host", "host1")]
    followers = {u: guests.ConsoleFollower("host1", u) for u in on_host1}
    for f in followers.values():
        f.start()
    cli.nova("host-evacuate-live", "host1")
    for uuid in on_host1:
        wait_server(uuid, "ACTIVE", host="host2", timeout=300)
        guests.check_continued(followers[uuid], "host2", uuid)
    left = cli.os("server", "list", "--all-projects", "--host", "host1")
    if left:
        raise GuestCheckFailed(f"still on host1: {[s['Name'] for s in left]}")
    return (f"{len(on_host1)} servers host1 -> host2 (scheduler-chosen), "
            "each continuing its heartbeats")


def cleanup(ctx):
    """Delete what this scenario made; check nothing is left on the hosts."""
    servers = [s["ID"] for s in cli.os("server", "list", "--all-projects")
               if s["Name"].startswith(PREFIX)]
    for uuid in servers:
        cli.os("server", "delete", "--wait", uuid, fmt=False)
    for uuid in servers:
        wait_for(lambda u=uuid: not guests.hosts_running(u), 60,
                 f"guest {uuid} to end")
        for host in guests.HOSTS:
            for path in (guests.rundir(host, uuid), guests.instdir(host, uuid)):
                if path.exists():
                    raise GuestCheckFailed(f"{path} left behind")
    return f"{len(servers)} servers deleted, no guest process or file left"


STEPS = [
    ("live migrate to --host, then back to a scheduler-chosen host",
     step_live_named_and_back),
    ("stress guest over a slow link: progress in migration list/show, then "
     "abort", step_progress_and_abort),
    ("stress guest over a slow link: force complete", step_force_complete),
    ("cold migrate + resize confirm", step_cold_migrate_confirm),
    ("resize + resize revert", step_resize_revert),
    ("evacuate from a downed compute; stale guest destroyed on restart",
     step_evacuate),
    ("nova host-evacuate-live host1", step_host_evacuate_live),
]


def main():
    ctx, failed = {}, 0
    t_all = time.monotonic()
    try:
        for n, (title, fn) in enumerate(STEPS, 1):
            t0 = time.monotonic()
            try:
                detail = fn(ctx)
            except Exception as e:  # noqa: BLE001 - report any failure, then clean
                if not isinstance(e, GuestCheckFailed):
                    traceback.print_exc()
                print(f"cli step {n}: {title}: FAILED ({time.monotonic() - t0:.1f} s)"
                      f": {e}", flush=True)
                failed = 1
                break
            print(f"cli step {n}: {title}: ok ({time.monotonic() - t0:.1f} s): "
                  f"{detail}", flush=True)
    finally:
        try:
            print(f"cli cleanup: {cleanup(ctx)}", flush=True)
        except GuestCheckFailed as e:
            print(f"cli cleanup: FAILED: {e}", flush=True)
            failed = 1
    passed = n - failed if not failed else n - 1
    print(f"cli scenario: {passed} passed, {failed} failed "
          f"({len(STEPS)} steps, {cli.calls} client calls, "
          f"{time.monotonic() - t_all:.0f} s)", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
