"""tools/cloud's commands: up, stop, clean, status, env, run."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from cloudctl import configs, layout, procs, services
from cloudctl.services import say


def _client_env():
    return {"OS_CLIENT_CONFIG_FILE": str(layout.CLOUDS_YAML),
            "OS_CLOUD": layout.CLOUD_NAME,
            "PATH": f"{services.BIN}:{os.environ.get('PATH', '')}"}


def write_clouds_yaml(s):
    text = (f"clouds:\n  {layout.CLOUD_NAME}:\n    auth:\n"
            f"      auth_url: {layout.url('keystone', '/v3')}\n"
            "      username: admin\n"
            f"      password: \"{s['admin']}\"\n"
            "      project_name: admin\n"
            "      user_domain_name: Default\n"
            "      project_domain_name: Default\n"
            f"    region_name: {layout.REGION}\n"
            "    identity_api_version: 3\n")
    fd = os.open(layout.CLOUDS_YAML, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def seed(*args, timeout=None):
    """Run tools/cloudctl/seed.py in the cloud's venv; return its stdout."""
    script = layout.ROOT / "tools/cloudctl/seed.py"
    env = dict(os.environ, **_client_env(),
               NB_CLOUD_COMPUTES=",".join(layout.COMPUTES))
    proc = subprocess.run([str(services.BIN / "python"), str(script), *args],
                          env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc


def _seed_or_fail(*args):
    proc = seed(*args)
    if proc.returncode:
        tail = "\n".join(proc.stderr.splitlines()[-20:])
        raise procs.CloudError(f"seeding ({args[0]}) failed:\n{tail}")
    return proc.stdout


def wait_nova_services(timeout=300):
    proc = seed("wait-services", str(timeout))
    if proc.returncode == 3:
        names = proc.stdout.split()
        logs = ", ".join(str(procs.log_path(n)) for n in names)
        details = "\n".join(f"--- {n}:\n{procs.tail(n, 15)}" for n in names)
        raise procs.CloudError(f"{' '.join(names)} did not report up within "
                               f"{timeout} s; see {logs}\n{details}")
    if proc.returncode:
        raise procs.CloudError(f"waiting for nova services failed:\n"
                               f"{proc.stderr[-2000:]}")


def up(args):
    """Install what is missing and start everything, in order."""
    t0 = time.monotonic()
    services.install_venv()
    s = layout.load_secrets()
    configs.write_all(s)
    write_clouds_yaml(s)
    steps = [("MariaDB", lambda: services.mariadb_up(s)),
             ("RabbitMQ", lambda: services.rabbitmq_up(s)),
             ("Keystone", lambda: services.keystone_up(s)),
             ("Keystone catalog and service users",
              lambda: _seed_or_fail("identity", str(layout.secret_file()))),
             ("Glance", services.glance_up),
             ("Placement", services.placement_up),
             ("Neutron", services.neutron_up),
             ("Nova API, conductor, scheduler and computes "
              f"{', '.join(layout.COMPUTES)}", services.nova_up),
             ("Nova services reporting up", wait_nova_services),
             ("computes mapped to cell1", services.discover_hosts)]
    for what, step in steps:
        say(what)
        step()
    say("flavors, images and the shared network")
    ids = json.loads(_seed_or_fail("resources"))
    (layout.CLOUD_DIR / "resources.json").write_text(json.dumps(ids, indent=1))
    say(f"up in {time.monotonic() - t0:.0f} s; logs in {layout.LOGS}; "
        f"`tools/cloud run openstack server list` or `eval $(tools/cloud env)`")


def stop(args):
    """Stop the services, then the guests the computes left running."""
    for name in reversed(services.ORDER):
        if procs.stop(name):
            say(f"stopped {name}")
    stop_guests()
    if services.rabbitmq_installed():   # not yet, on a machine never set up
        services.rabbitmqctl("stop")    # a node started before pid tracking


def stop_guests():
    """End test-host guests whose files lie under the cloud's folder."""
    marker = str(layout.DATA).encode()
    for pid, argv in procs.cmdlines():
        if pid != os.getpid() and any(marker in part for part in argv):
            try:
                os.kill(pid, signal.SIGKILL)
                say(f"killed guest process {pid} "
                    f"({os.path.basename(argv[0].decode())})")
            except ProcessLookupError:
                pass


def clean(args):
    """Stop everything and remove all tools/cloud made."""
    stop(args)
    for ns in (f"nb-{host}" for host in layout.COMPUTES):
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"],
                   capture_output=True)
    if layout.CLOUD_DIR.exists():
        shutil.rmtree(layout.CLOUD_DIR)
        say(f"removed {layout.CLOUD_DIR}")


def status(args):
    for name in services.ORDER:
        pid = procs.pid_of(name)
        state = f"running (pid {pid})" if pid else "stopped"
        print(f"{name:28} {state:22} {procs.log_path(name)}")


def service(args):
    """Stop or start one service (``tools/cloud service stop nova-compute-host1``)."""
    if args.name not in services.ORDER:
        sys.exit(f"tools/cloud: no service {args.name!r}; one of: "
                 f"{', '.join(services.ORDER)}")
    if args.action == "stop":
        procs.stop(args.name)
    else:
        if args.name not in services.DAEMONS:
            sys.exit("tools/cloud: only these restart alone: "
                     f"{', '.join(services.DAEMONS)}")
        procs.start(args.name, services.DAEMONS[args.name])
    say(f"{args.action} {args.name}: done")


def env(args):
    for key, value in _client_env().items():
        print(f"export {key}={value}")


def run(args):
    os.execvpe(args.cmd[0], args.cmd, dict(os.environ, **_client_env()))


def main():
    parser = argparse.ArgumentParser(prog="tools/cloud")
    sub = parser.add_subparsers(dest="command")
    for name, fn in (("up", up), ("stop", stop), ("clean", clean),
                     ("status", status), ("env", env)):
        sub.add_parser(name, help=fn.__doc__).set_defaults(fn=fn)
    svc = sub.add_parser("service", help=service.__doc__)
    svc.add_argument("action", choices=("stop", "start"))
    svc.add_argument("name")
    svc.set_defaults(fn=service)
    run_p = sub.add_parser("run", help="run a command against the cloud")
    run_p.add_argument("cmd", nargs=argparse.REMAINDER)
    run_p.set_defaults(fn=run)
    args = parser.parse_args()
    fn = getattr(args, "fn", up)
    if os.geteuid() != 0 and fn in (up, stop, clean, service):
        sys.exit("tools/cloud: run as root (it starts services and guests)")
    try:
        fn(args)
    except procs.CloudError as e:
        sys.exit(f"tools/cloud: {e}")


if __name__ == "__main__":
    main()
