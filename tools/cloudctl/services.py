"""Bring each service up in order: install, database, configuration, start."""

import hashlib
import os
import shutil
import subprocess
import sys

from cloudctl import configs, layout, procs
from cloudctl.layout import DATA, ETC, PORTS, VENV

BIN = VENV / "bin"
MYSQL_DIR = DATA / "mysql"
MYSQL_SOCK = MYSQL_DIR / "mysqld.sock"
RABBIT_DIR = DATA / "rabbitmq"
RABBIT_BIN = "/usr/lib/rabbitmq/bin"
WSGI_APPS = {
    # name: (port key, module, config env, extra uwsgi flags)
    "keystone": ("keystone", "keystone.wsgi.api:application",
                 {"OS_KEYSTONE_CONFIG_DIR": ETC / "keystone",
                  "OS_KEYSTONE_CONFIG_FILES": "keystone.conf"}, []),
    "glance-api": ("glance", "glance.wsgi.api:application",
                   {"OS_GLANCE_CONFIG_DIR": ETC / "glance"},
                   # glanceclient (Nova's snapshots) sends 1 MiB chunks:
                   # uWSGI's own limit per chunk is 1 MB
                   ["--http-chunked-input", "--http-raw-body",
                    "--http-auto-chunked", "--chunked-input-limit", "16777216",
                    "--chunked-input-timeout", "300"]),
    "placement-api": ("placement", "placement.wsgi.api:application",
                      {"OS_PLACEMENT_CONFIG_DIR": ETC / "placement"}, []),
    "neutron-api": ("neutron", "neutron.wsgi.api:application",
                    {"OS_NEUTRON_CONFIG_DIR": ETC / "neutron"}, []),
    "nova-api": ("nova", "nova.wsgi.osapi_compute:application",
                 {"OS_NOVA_CONFIG_DIR": ETC / "nova",
                  "OS_NOVA_CONFIG_FILES": "api-paste.ini;nova.conf;nova-db.conf"},
                 []),
}
NEUTRON_CONF = ["--config-file", str(ETC / "neutron/neutron.conf"),
                "--config-file", str(ETC / "neutron/plugins/ml2/ml2_conf.ini")]
NOVA_CONF = ["--config-file", str(ETC / "nova/nova.conf"),
             "--config-file", str(ETC / "nova/nova-db.conf")]
DAEMONS = {
    "neutron-periodic-workers": [str(BIN / "neutron-periodic-workers"),
                                 *NEUTRON_CONF],
    "nova-conductor": [str(BIN / "nova-conductor"), *NOVA_CONF],
    "nova-scheduler": [str(BIN / "nova-scheduler"), *NOVA_CONF],
    **{f"nova-compute-{h}": [str(BIN / "nova-compute"), *configs.compute_argv(h)]
       for h in layout.COMPUTES},
}
# Every service, in start order (stop runs it backwards).
ORDER = ["mariadb", "rabbitmq", "keystone", "glance-api", "placement-api",
         "neutron-api", "neutron-periodic-workers", "nova-api",
         "nova-conductor", "nova-scheduler",
         *(f"nova-compute-{h}" for h in layout.COMPUTES)]


def say(msg):
    print(f"cloud: {msg}", flush=True)


def manage(argv, what):
    """Run one of the services' management commands from the venv."""
    return procs.run([str(BIN / argv[0]), *argv[1:]], what)


# -- installation ---------------------------------------------------------
def install_venv():
    """Create the cloud's virtualenv; install the services and this package."""
    req = layout.ROOT / "tools/cloudctl/requirements.txt"
    if not (BIN / "python").exists():
        say(f"creating {VENV}")
        procs.run([sys.executable, "-m", "venv", str(VENV)], "python3 -m venv")
    digest = hashlib.sha256(req.read_bytes()).hexdigest()[:16]
    stamp = VENV / f".requirements-{digest}"
    if not stamp.exists():
        say("installing keystone, glance, placement, neutron, nova 34, "
            "uwsgi, the clients and tempest (pip)")
        procs.run([str(BIN / "pip"), "install", "-q", "-r", str(req)],
                  "pip install of the services")
        for old in VENV.glob(".requirements-*"):
            old.unlink()
        stamp.touch()
    say("installing nova-bhyve-live into the cloud (native parts compiled)")
    procs.run([str(BIN / "pip"), "install", "-q", str(layout.ROOT)],
              "pip install of nova-bhyve-live")


# -- MariaDB and RabbitMQ -------------------------------------------------
def mariadb_up(s):
    """Start the cloud's own MariaDB server; create databases and users."""
    if not (MYSQL_DIR / "mysql").exists():
        MYSQL_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MYSQL_DIR, "mysql", "mysql")
        procs.run(["mariadb-install-db", "--user=mysql",
                   f"--datadir={MYSQL_DIR}", "--skip-test-db",
                   "--auth-root-authentication-method=socket"],
                  "mariadb-install-db")
    procs.start("mariadb", [
        "/usr/sbin/mariadbd", "--no-defaults", "--user=mysql",
        f"--datadir={MYSQL_DIR}", f"--socket={MYSQL_SOCK}",
        f"--port={PORTS['mariadb']}", f"--bind-address={layout.HOST_IP}",
        f"--pid-file={MYSQL_DIR / 'mariadbd.pid'}", "--max-connections=1000",
        "--innodb-buffer-pool-size=256M", "--skip-name-resolve",
        "--character-set-server=utf8mb4", "--collation-server=utf8mb4_general_ci"])
    procs.wait_ready("mariadb", procs.port_open(PORTS["mariadb"]), 60)
    sql = []
    for db, user in layout.DB_USERS.items():
        pw = s["db"]
        sql += [f"CREATE DATABASE IF NOT EXISTS {db} CHARACTER SET utf8mb4;",
                f"CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{pw}';",
                f"ALTER USER '{user}'@'%' IDENTIFIED BY '{pw}';",
                f"GRANT ALL PRIVILEGES ON {db}.* TO '{user}'@'%';"]
    _mysql("\n".join(sql))


def _mysql(sql):
    # The statements go through stdin so that no password shows in ps.
    proc = subprocess.run(["mariadb", f"--socket={MYSQL_SOCK}", "-u", "root"],
                          input=sql, text=True, capture_output=True)
    if proc.returncode:
        raise procs.CloudError(f"mariadb: {proc.stderr.strip()} (log: "
                               f"{procs.log_path('mariadb')})")


def rabbit_env():
    """Return the environment of the cloud's own RabbitMQ node."""
    return {"HOME": str(RABBIT_DIR), "RABBITMQ_NODENAME": "nbcloud@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": layout.HOST_IP,
            "RABBITMQ_NODE_PORT": str(PORTS["rabbitmq"]),
            "RABBITMQ_DIST_PORT": str(PORTS["rabbitmq-dist"]),
            "RABBITMQ_MNESIA_BASE": str(RABBIT_DIR / "mnesia"),
            "RABBITMQ_LOG_BASE": str(layout.LOGS / "rabbitmq"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_PID_FILE": str(RABBIT_DIR / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(RABBIT_DIR / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(RABBIT_DIR / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(RABBIT_DIR / "advanced.config")}


def rabbitmq_installed():
    """Whether the Debian package's RabbitMQ is on this machine."""
    return os.path.exists(f"{RABBIT_BIN}/rabbitmqctl")


def rabbitmqctl(*args, stdin=None):
    """Run rabbitmqctl against the cloud's own node."""
    return subprocess.run([f"{RABBIT_BIN}/rabbitmqctl", *args], input=stdin,
                          env=dict(os.environ, **rabbit_env()), text=True,
                          capture_output=True)


def rabbitmq_up(s):
    """Start the cloud's own RabbitMQ node and its `openstack` user."""
    RABBIT_DIR.mkdir(parents=True, exist_ok=True)
    plugins = RABBIT_DIR / "enabled_plugins"
    if not plugins.exists():
        plugins.write_text("[].\n")
    procs.start("rabbitmq", [f"{RABBIT_BIN}/rabbitmq-server"], env=rabbit_env())
    procs.wait_ready("rabbitmq",
                     lambda: rabbitmqctl("await_startup", "--timeout", "2")
                     .returncode == 0, 120)
    users = rabbitmqctl("list_users", "--silent").stdout.split()
    verb = "change_password" if "openstack" in users else "add_user"
    for args, stdin in (((verb, "openstack"), s["rabbit"] + "\n"),
                        (("set_permissions", "-p", "/", "openstack",
                          ".*", ".*", ".*"), None)):
        proc = rabbitmqctl(*args, stdin=stdin)
        if proc.returncode:
            raise procs.CloudError(f"rabbitmqctl {args[0]}: "
                                   f"{proc.stderr.strip()}")


# -- the OpenStack services -----------------------------------------------
def uwsgi_up(name):
    """Start API ``name`` under uWSGI and wait until it answers."""
    port_key, module, env, extra = WSGI_APPS[name]
    argv = [str(BIN / "uwsgi"), "--master", "--enable-threads", "--lazy-apps",
            "--processes", "2", "--threads", "4", "--die-on-term",
            "--need-app", "--buffer-size", "65535", "--home", str(VENV),
            # one request per connection: a pooled idle connection would
            # otherwise hold a worker thread, or be reset under the client
            "--add-header", "Connection: close",
            "--http-socket", f"{layout.HOST_IP}:{PORTS[port_key]}",
            "--module", module, *extra]
    procs.start(name, argv, env={k: str(v) for k, v in env.items()})
    procs.wait_ready(name, procs.http_answers(layout.url(port_key, "/")), 180)


def keystone_up(s):
    """Keys, schema and bootstrap of Keystone; then its API."""
    conf = ["--config-file", str(ETC / "keystone/keystone.conf")]
    for kind, sub in (("fernet_setup", "fernet-keys"),
                      ("credential_setup", "credential-keys")):
        if not (DATA / "keystone" / sub / "0").exists():
            (DATA / "keystone").mkdir(parents=True, exist_ok=True)
            manage(["keystone-manage", *conf, kind, "--keystone-user", "root",
                    "--keystone-group", "root"], f"keystone-manage {kind}")
    manage(["keystone-manage", *conf, "db_sync"], "keystone-manage db_sync")
    procs.run([str(BIN / "keystone-manage"), *conf, "bootstrap",
               "--bootstrap-username", "admin",
               "--bootstrap-project-name", "admin",
               "--bootstrap-role-name", "admin",
               "--bootstrap-service-name", "keystone",
               "--bootstrap-region-id", layout.REGION,
               "--bootstrap-admin-url", layout.url("keystone", "/v3"),
               "--bootstrap-public-url", layout.url("keystone", "/v3"),
               "--bootstrap-internal-url", layout.url("keystone", "/v3")],
              "keystone-manage bootstrap",
              env={"OS_BOOTSTRAP_PASSWORD": s["admin"]})
    uwsgi_up("keystone")


def glance_up():
    for sub in ("images", "staging", "tasks", "lock"):
        (DATA / "glance" / sub).mkdir(parents=True, exist_ok=True)
    manage(["glance-manage", "--config-file",
            str(ETC / "glance/glance-api.conf"), "db_sync"], "glance-manage db_sync")
    uwsgi_up("glance-api")


def placement_up():
    manage(["placement-manage", "--config-file",
            str(ETC / "placement/placement.conf"), "db", "sync"],
           "placement-manage db sync")
    uwsgi_up("placement-api")


def neutron_up():
    (DATA / "neutron/lock").mkdir(parents=True, exist_ok=True)
    manage(["neutron-db-manage", *NEUTRON_CONF, "upgrade", "heads"],
           "neutron-db-manage upgrade heads")
    uwsgi_up("neutron-api")
    procs.start("neutron-periodic-workers", DAEMONS["neutron-periodic-workers"])


def nova_db():
    """Nova's API and cell databases, cell0 and cell1."""
    manage(["nova-manage", *NOVA_CONF, "api_db", "sync"], "nova-manage api_db sync")
    manage(["nova-manage", *NOVA_CONF, "cell_v2", "map_cell0"],
           "nova-manage cell_v2 map_cell0")
    cells = manage(["nova-manage", *NOVA_CONF, "cell_v2", "list_cells"],
                   "nova-manage cell_v2 list_cells")
    if " cell1 " not in cells:
        manage(["nova-manage", *NOVA_CONF, "cell_v2", "create_cell",
                "--name", "cell1"], "nova-manage cell_v2 create_cell")
    manage(["nova-manage", *NOVA_CONF, "db", "sync"], "nova-manage db sync")


def nova_up():
    """Nova's databases, API, conductor, scheduler and the two computes."""
    (DATA / "nova/lock").mkdir(parents=True, exist_ok=True)
    for host in layout.COMPUTES:
        for sub in ("instances", "lock"):
            (DATA / host / sub).mkdir(parents=True, exist_ok=True)
    nova_db()
    uwsgi_up("nova-api")
    for name in ("nova-conductor", "nova-scheduler",
                 *(f"nova-compute-{h}" for h in layout.COMPUTES)):
        procs.start(name, DAEMONS[name])


def discover_hosts():
    manage(["nova-manage", *NOVA_CONF, "cell_v2", "discover_hosts"],
           "nova-manage cell_v2 discover_hosts")
