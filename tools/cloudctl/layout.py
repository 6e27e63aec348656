"""Where the cloud lives: folders, ports, hosts and generated secrets."""

import json
import os
import secrets
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLOUD_DIR = Path(os.environ.get("NB_CLOUD_DIR", "/var/lib/nova-bhyve-cloud"))
VENV = CLOUD_DIR / "venv"
LOGS = CLOUD_DIR / "logs"
ETC = CLOUD_DIR / "etc"
RUN = CLOUD_DIR / "run"
DATA = CLOUD_DIR / "data"
CLOUDS_YAML = CLOUD_DIR / "clouds.yaml"
CLOUD_NAME = "nova-bhyve"
REGION = "RegionOne"

HOST_IP = "127.0.0.1"
PORTS = {
    "keystone": 5000,
    "glance": 9292,
    "placement": 8778,
    "neutron": 9696,
    "nova": 8774,
    "mariadb": 3307,
    "rabbitmq": 5673,
    "rabbitmq-dist": 25673,
}
# The two computes, and the address each one's migration listener binds.
# Both are loopback addresses of this machine, distinct from each other and
# from the services' 127.0.0.1, so that a test can slow the link into one
# host alone (tc on lo, filtered by destination address).
COMPUTES = {
    "host1": {"inbound_addr": "127.0.0.2", "concurrency": "threading"},
    "host2": {"inbound_addr": "127.0.0.3", "concurrency": "eventlet"},
}
# Nova's scheduler filters here (tempest is told the same list).
SCHEDULER_FILTERS = ("ComputeFilter,ComputeCapabilitiesFilter,"
                     "ImagePropertiesFilter,ServerGroupAntiAffinityFilter,"
                     "ServerGroupAffinityFilter,SameHostFilter,"
                     "DifferentHostFilter")
SERVICE_USERS = ("nova", "glance", "placement", "neutron")


def url(service, path=""):
    """Return the http URL of ``service``'s API on this machine."""
    return f"http://{HOST_IP}:{PORTS[service]}{path}"


def secret_file():
    return CLOUD_DIR / "secrets.json"


def load_secrets():
    """Return the cloud's passwords, generating them on first use (0600 file)."""
    path = secret_file()
    if path.exists():
        return json.loads(path.read_text())
    names = ("admin", "db", "rabbit") + SERVICE_USERS
    values = {name: secrets.token_hex(16) for name in names}
    CLOUD_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    return values


# Database user of each database (nova's three share one user).
DB_USERS = {"keystone": "keystone", "glance": "glance",
            "placement": "placement", "neutron": "neutron",
            "nova_api": "nova", "nova": "nova", "nova_cell0": "nova"}


def db_url(name, pw):
    """Return the oslo.db URL of database ``name``."""
    return (f"mysql+pymysql://{DB_USERS[name]}:{pw}@{HOST_IP}:"
            f"{PORTS['mariadb']}/{name}?charset=utf8")


def transport_url(pw):
    """Return the oslo.messaging URL of the cloud's RabbitMQ."""
    return f"rabbit://openstack:{pw}@{HOST_IP}:{PORTS['rabbitmq']}/"
