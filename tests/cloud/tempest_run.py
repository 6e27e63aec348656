"""Run tempest's compute tests against the cloud tools/cloud made.

    tools/cloud run python tests/cloud/tempest_run.py [--concurrency N]

Writes a tempest workspace under $NB_CLOUD_DIR/tempest with a generated
``etc/tempest.conf`` (two compute nodes; the features this driver offers
switched on, the rest off — doc/tempest.md says which and why), runs the
suites below with nothing excluded, and ends with one line of counts.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from cloudctl.layout import SCHEDULER_FILTERS  # noqa: E402

CLOUD_DIR = Path(os.environ.get("NB_CLOUD_DIR", "/var/lib/nova-bhyve-cloud"))
WORKSPACE = CLOUD_DIR / "tempest"
SUITES = [
    "tempest.api.compute.admin.test_live_migration",
    "tempest.api.compute.admin.test_live_migration_negative",
    "tempest.api.compute.admin.test_migrations",
    "tempest.api.compute.admin.test_servers_on_multinodes",
    "tempest.api.compute.servers.test_create_server",
    "tempest.api.compute.servers.test_server_actions",
]
# What this driver does (True) and does not (False) offer; doc/tempest.md.
FEATURES = {
    "live_migration": True,
    "live_migrate_back_and_forth": True,
    "block_migration_for_live_migration": True,
    "volume_backed_live_migration": False,
    "cold_migration": True,
    "resize": True,
    "pause": True,
    "suspend": True,
    "shelve": True,
    "shelve_migrate": False,
    "snapshot": True,
    "console_output": True,
    "rescue": False,
    "change_password": False,
    "interface_attach": False,
    "config_drive": False,
    "disk_config": False,
    "vnc_console": False,
    "spice_console": False,
    "serial_console": False,
    "attach_encrypted_volume": False,
    "volume_multiattach": False,
    "stable_rescue": False,
    "hostname_fqdn_sanitization": True,
}


def admin_password():
    return json.loads((CLOUD_DIR / "secrets.json").read_text())["admin"]


def render(sections):
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def tempest_conf():
    """Return tempest.conf for this cloud (resource ids from tools/cloud)."""
    ids = json.loads((CLOUD_DIR / "resources.json").read_text())
    return render({
        "DEFAULT": {"log_file": WORKSPACE / "tempest.log"},
        "auth": {"use_dynamic_credentials": True,
                 "create_isolated_networks": False,
                 "admin_username": "admin", "admin_password": admin_password(),
                 "admin_project_name": "admin",
                 "admin_domain_name": "Default",
                 "default_credentials_domain_name": "Default"},
        "identity": {"uri_v3": "http://127.0.0.1:5000/v3", "auth_version": "v3",
                     "region": "RegionOne"},
        "compute": {"image_ref": ids["images"]["nb-guest"],
                    "image_ref_alt": ids["images"]["nb-guest-alt"],
                    "flavor_ref": ids["flavors"]["m1.nano"],
                    "flavor_ref_alt": ids["flavors"]["m1.micro"],
                    "fixed_network_name": "private",
                    "min_compute_nodes": 2, "max_microversion": "latest",
                    "build_timeout": 180, "region": "RegionOne"},
        "compute-feature-enabled": {
            **FEATURES,
            # as the cloud's [filter_scheduler] enabled_filters
            "scheduler_enabled_filters": SCHEDULER_FILTERS,
            # Nova 34 enforces its new policy defaults, manager role included
            "nova_policy_roles": "admin,manager,member,reader,service"},
        "enforce_scope": {"nova": True},
        "network": {"project_networks_reachable": False,
                    "shared_physical_network": True},
        "network-feature-enabled": {"ipv6": False},
        "service_available": {"nova": True, "glance": True, "neutron": True,
                              "cinder": False, "swift": False},
        "validation": {"run_validation": False},
        "image": {"region": "RegionOne"},
    })


def prepare():
    if not (WORKSPACE / ".stestr.conf").exists():
        # the workspace registry lives in the cloud's folder too (tempest's
        # default, ~/.tempest, would outlive `tools/cloud clean`)
        proc = subprocess.run(
            ["tempest", "init", "--name", "nova-bhyve-cloud",
             "--workspace-path", str(CLOUD_DIR / "tempest-workspaces.yaml"),
             str(WORKSPACE)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"tempest init failed: {proc.stderr.strip()[-1500:]}")
    conf = WORKSPACE / "etc" / "tempest.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(tempest_conf())


COUNT_RE = re.compile(r"^ - (Passed|Skipped|Failed|Expected Fail|"
                      r"Unexpected Success): (\d+)", re.M)


# Why tempest skipped a test, in a few words (doc/tempest.md has the table).
SKIP_WHY = (
    ("unstable", "marked unstable by tempest"),
    ("bug", "skipped by tempest until a bug is fixed"),
    ("volume", "no volume service"),
    ("cinder", "no volume service"),
    ("validation", "need SSH into the guest"),
    ("ssh", "need SSH into the guest"),
    ("vtpm", "no vTPM"),
    ("barbican", "no vTPM"),
    ("console", "no remote console"),
    ("vnc", "no remote console"),
)


def skip_reasons(text):
    """'N reason, M reason' for the SKIPPED lines of a tempest log."""
    counts = {}
    for line in text.splitlines():
        if "... SKIPPED" not in line:
            continue
        why = line.split("... SKIPPED", 1)[1].lstrip(": ").strip()
        low = why.lower()
        short = next((s for k, s in SKIP_WHY if k in low), why[:60] or "no reason")
        counts[short] = counts.get(short, 0) + 1
    return ", ".join(f"{n} {why}" for why, n in
                     sorted(counts.items(), key=lambda kv: -kv[1]))


def run(concurrency):
    regex = "^(" + "|".join(re.escape(s) for s in SUITES) + r")\b"
    log = CLOUD_DIR / "logs" / "tempest-run.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(["tempest", "run", "--regex", regex,
                               "--concurrency", str(concurrency)],
                              cwd=WORKSPACE, stdout=out,
                              stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    text = log.read_text(errors="replace")
    counts = {k: int(v) for k, v in COUNT_RE.findall(text)}
    for line in text.splitlines():
        if "... SKIPPED" in line or "... FAILED" in line:
            print("tempest:", re.sub(r"^\{\d+\} ", "", line.strip()))
    failed = counts.get("Failed", 0) + counts.get("Unexpected Success", 0)
    passed = counts.get("Passed", 0) + counts.get("Expected Fail", 0)
    if proc.returncode and not failed:
        failed = 1  # tempest failed without counting (see its log)
        print(f"tempest exited {proc.returncode}; see {log}")
    print(f"tempest skipped: {skip_reasons(text) or 'none'}")
    print(f"tempest: {passed} passed, {failed} failed, "
          f"{counts.get('Skipped', 0)} skipped ({wall:.0f} s; log {log})",
          flush=True)
    return 1 if failed or not passed else 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    prepare()
    return run(args.concurrency)


if __name__ == "__main__":
    sys.exit(main())
