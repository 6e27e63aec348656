"""Keystone catalog, flavors, images and the network (run in the cloud's venv).

    python seed.py identity PASSWORDS_JSON
    python seed.py wait-services TIMEOUT
    python seed.py resources

Credentials come from clouds.yaml (OS_CLIENT_CONFIG_FILE, OS_CLOUD).
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import openstack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cloudctl.layout import REGION, url  # noqa: E402

ENDPOINTS = {
    # service name: (type, description, url)
    "nova": ("compute", "Compute", url("nova", "/v2.1")),
    "glance": ("image", "Image", url("glance")),
    "placement": ("placement", "Placement", url("placement")),
    "neutron": ("network", "Networking", url("neutron")),
}
# name: (vcpus, MiB, root GB)
FLAVORS = {"m1.nano": (1, 128, 1), "m1.micro": (1, 192, 1),
           "m1.stress": (1, 1024, 1)}
# name: guest payload command line (image property bhyve_testhost_cmdline)
IMAGES = {"nb-guest": "mode=idle", "nb-guest-alt": "mode=idle",
          "nb-stress": "mode=stress pattern=touch ws=256M"}
IMAGE_BYTES = 1 << 20
NETWORK, SUBNET, CIDR = "private", "private-subnet", "192.0.2.0/24"


def conn():
    return openstack.connect()


def identity(passwords_file):
    """Service project, users with admin and service roles, catalog."""
    c = conn()
    with open(passwords_file) as f:
        pw = json.load(f)
    project = (c.identity.find_project("service", domain_id="default") or
               c.identity.create_project(name="service", domain_id="default"))
    roles = {}
    for name in ("admin", "service"):
        roles[name] = (c.identity.find_role(name) or
                       c.identity.create_role(name=name))
    for user_name in ENDPOINTS:
        user = c.identity.find_user(user_name, domain_id="default")
        if user is None:
            user = c.identity.create_user(name=user_name, domain_id="default",
                                          password=pw[user_name])
        else:
            c.identity.update_user(user, password=pw[user_name])
        for role in roles.values():
            c.identity.assign_project_role_to_user(project, user, role)
    for name, (stype, desc, endpoint) in ENDPOINTS.items():
        service = c.identity.find_service(name)
        if service is None:
            service = c.identity.create_service(name=name, type=stype,
                                                description=desc)
        have = {e.interface for e in c.identity.endpoints(service_id=service.id)}
        for interface in ("public", "internal", "admin"):
            if interface not in have:
                c.identity.create_endpoint(service_id=service.id, url=endpoint,
                                           interface=interface,
                                           region_id=REGION)


def wait_services(timeout):
    """Wait until conductor, scheduler and every compute report up."""
    want = {("nova-conductor", None), ("nova-scheduler", None)}
    hosts = os.environ["NB_CLOUD_COMPUTES"].split(",")
    want |= {("nova-compute", h) for h in hosts}
    deadline = time.monotonic() + timeout
    missing = want
    while time.monotonic() < deadline:
        try:
            up = {(s.binary, s.host) for s in conn().compute.services()
                  if s.state == "up" and s.status == "enabled"}
        except openstack.exceptions.SDKException:
            up = set()
        up |= {(b, None) for b, _h in up}
        missing = want - up
        if not missing:
            return
        time.sleep(2)
    names = sorted(f"{b}-{h}" if h else b for b, h in missing)
    print(" ".join(names))
    sys.exit(3)


def resources():
    """Flavors, images, a shared tenant network; print their ids as JSON."""
    c = conn()
    out = {"flavors": {}, "images": {}}
    for name, (vcpus, ram, disk) in FLAVORS.items():
        flavor = c.compute.find_flavor(name) or c.compute.create_flavor(
            name=name, vcpus=vcpus, ram=ram, disk=disk, is_public=True)
        out["flavors"][name] = flavor.id
    for name, cmdline in IMAGES.items():
        image = c.image.find_image(name)
        if image is None:
            with tempfile.NamedTemporaryFile() as f:
                f.truncate(IMAGE_BYTES)
                f.flush()
                image = c.image.create_image(
                    name=name, filename=f.name, disk_format="raw",
                    container_format="bare", visibility="public", wait=True,
                    bhyve_testhost_cmdline=cmdline)
        out["images"][name] = image.id
    net = c.network.find_network(NETWORK)
    if net is None:
        net = c.network.create_network(name=NETWORK, shared=True)
    if c.network.find_subnet(SUBNET) is None:
        c.network.create_subnet(name=SUBNET, network_id=net.id,
                                ip_version=4, cidr=CIDR, enable_dhcp=False)
    out["network"] = net.id
    print(json.dumps(out))


def main():
    cmd = sys.argv[1]
    if cmd == "identity":
        identity(sys.argv[2])
    elif cmd == "wait-services":
        wait_services(float(sys.argv[2]))
    elif cmd == "resources":
        resources()
    else:
        sys.exit(f"seed: unknown command {cmd}")


if __name__ == "__main__":
    main()
