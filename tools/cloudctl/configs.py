"""The services' configuration files, written under ETC (mode 0600)."""

import os
import shutil

from cloudctl import layout
from cloudctl.layout import DATA, ETC, url

# The ML2 mechanism driver this package ships (nova_bhyve/neutron).
MECHANISM_DRIVERS = "bhyve"


def render(sections):
    """Return ini text for ``{section: {key: value}}``."""
    out = []
    for section, values in sections.items():
        out.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                value = str(value).lower()
            out.append(f"{key} = {value}")
        out.append("")
    return "\n".join(out)


def write(relpath, sections):
    """Write ``sections`` to ETC/relpath readable by root only."""
    path = ETC / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(render(sections))
    return path


def _auth(user, pw):
    return {"auth_type": "password", "auth_url": url("keystone"),
            "project_domain_name": "Default", "user_domain_name": "Default",
            "project_name": "service", "username": user, "password": pw,
            "region_name": layout.REGION}


def _authtoken(user, pw):
    values = _auth(user, pw)
    del values["region_name"]
    values["www_authenticate_uri"] = url("keystone")
    values["service_token_roles_required"] = True
    return values


def _common(service):
    return {"oslo_concurrency": {"lock_path": DATA / service / "lock"},
            "oslo_messaging_notifications": {"driver": "noop"}}


def _copy_paste_ini(service, name):
    src = layout.VENV / "etc" / service / name
    dst = ETC / service / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def keystone(s):
    keys = DATA / "keystone"
    write("keystone/keystone.conf", {
        "DEFAULT": {"debug": False},
        "database": {"connection": layout.db_url("keystone", s["db"])},
        "token": {"provider": "fernet"},
        "fernet_tokens": {"key_repository": keys / "fernet-keys"},
        "fernet_receipts": {"key_repository": keys / "fernet-keys"},
        "credential": {"key_repository": keys / "credential-keys"},
        **_common("keystone"),
    })


def glance(s):
    store = DATA / "glance"
    write("glance/glance-api.conf", {
        "DEFAULT": {"enabled_backends": "file:file",
                    "worker_self_reference_url": url("glance"),
                    "transport_url": layout.transport_url(s["rabbit"])},
        "glance_store": {"default_backend": "file"},
        "file": {"filesystem_store_datadir": store / "images"},
        "os_glance_staging_store": {"filesystem_store_datadir": store / "staging"},
        "os_glance_tasks_store": {"filesystem_store_datadir": store / "tasks"},
        "database": {"connection": layout.db_url("glance", s["db"])},
        "keystone_authtoken": _authtoken("glance", s["glance"]),
        "paste_deploy": {"flavor": "keystone",
                         "config_file": ETC / "glance/glance-api-paste.ini"},
        **_common("glance"),
    })
    _copy_paste_ini("glance", "glance-api-paste.ini")


def placement(s):
    write("placement/placement.conf", {
        "placement_database": {"connection": layout.db_url("placement", s["db"])},
        "api": {"auth_strategy": "keystone"},
        "keystone_authtoken": _authtoken("placement", s["placement"]),
        **_common("placement"),
    })


def neutron(s):
    write("neutron/neutron.conf", {
        "DEFAULT": {"core_plugin": "ml2", "service_plugins": "",
                    "auth_strategy": "keystone",
                    "transport_url": layout.transport_url(s["rabbit"]),
                    "rpc_workers": 0, "rpc_state_report_workers": 0,
                    "api_workers": 1,
                    "enable_traditional_dhcp": False,
                    "notify_nova_on_port_status_changes": True,
                    "notify_nova_on_port_data_changes": True,
                    "api_paste_config": ETC / "neutron/api-paste.ini",
                    "state_path": DATA / "neutron"},
        "database": {"connection": layout.db_url("neutron", s["db"])},
        "keystone_authtoken": _authtoken("neutron", s["neutron"]),
        "nova": _auth("nova", s["nova"]),
        **_common("neutron"),
    })
    write("neutron/plugins/ml2/ml2_conf.ini", {
        "ml2": {"type_drivers": "local,flat",
                "tenant_network_types": "local",
                "mechanism_drivers": MECHANISM_DRIVERS,
                "extension_drivers": "port_security"},
        "ml2_type_flat": {"flat_networks": "*"},
        # the hosts whose ports the bhyve mechanism driver binds
        "ml2_bhyve": {"hosts": ",".join(layout.COMPUTES)},
    })
    _copy_paste_ini("neutron", "api-paste.ini")


def nova(s):
    write("nova/nova.conf", {
        "DEFAULT": {"transport_url": layout.transport_url(s["rabbit"]),
                    "my_ip": layout.HOST_IP, "state_path": DATA / "nova",
                    "debug": False},
        "api": {"auth_strategy": "keystone"},
        "wsgi": {"api_paste_config": ETC / "nova/api-paste.ini"},
        "keystone_authtoken": _authtoken("nova", s["nova"]),
        "placement": _auth("placement", s["placement"]),
        "neutron": _auth("neutron", s["neutron"]),
        "service_user": {**_auth("nova", s["nova"]),
                         "send_service_user_token": True},
        "scheduler": {"discover_hosts_in_cells_interval": -1, "workers": 1},
        "conductor": {"workers": 1},
        "filter_scheduler": {"enabled_filters": layout.SCHEDULER_FILTERS},
        "vnc": {"enabled": False},
        **_common("nova"),
    })
    # Only the API, conductor, scheduler and nova-manage read the databases;
    # a compute reaches them through the conductor, as in any deployment.
    write("nova/nova-db.conf", {
        "api_database": {"connection": layout.db_url("nova_api", s["db"])},
        "database": {"connection": layout.db_url("nova", s["db"])},
    })
    _copy_paste_ini("nova", "api-paste.ini")
    for host, facts in layout.COMPUTES.items():
        write(f"nova/nova-{host}.conf", compute_overlay(host, facts))


def compute_overlay(host, facts):
    """Return the per-compute settings layered over nova.conf."""
    base = DATA / host
    return {
        "DEFAULT": {"host": host, "compute_driver": "bhyve.BhyveDriver",
                    "state_path": base, "instances_path": base / "instances",
                    "concurrency_backend": facts["concurrency"],
                    # both computes share 2 CPUs: Nova's 4.0 leaves 8 guest
                    # vCPUs a compute, which tempest's two workers fill
                    # (a resize holds room on both): once a test found no
                    # room beside its first server (doc/cloud.md)
                    "cpu_allocation_ratio": 16.0,
                    "debug": True},
        "oslo_concurrency": {"lock_path": base / "lock"},
        "bhyve": {"live_migration_inbound_addr": facts["inbound_addr"],
                  # this compute's own guest records, sockets and logs:
                  # one per compute, short (unix socket paths below it)
                  "runtime_path": base / "run",
                  # two computes share this kernel: one namespace each for
                  # their taps and bridges (doc/networking.md)
                  "testhost_netns": f"nb-{host}",  # tools/cloud clean removes it
                  # the stress image's pages are one byte over zeros: zstd
                  # would shrink them 200-fold and end in a second the
                  # copies the scenarios abort, force and restart computes
                  # in (doc/cloud.md); every other setting is the default
                  "live_migration_compression": "off"},
        # nova-compute runs as root: start the privileged helper directly,
        # reading the same files as the compute (doc/networking.md)
        "nova_bhyve_privileged": {"helper_command": " ".join(
            [str(layout.VENV / "bin/privsep-helper"), *compute_argv(host)])},
    }


def compute_argv(host):
    """Return the config-file arguments of compute ``host``."""
    return ["--config-file", str(ETC / "nova/nova.conf"),
            "--config-file", str(ETC / f"nova/nova-{host}.conf")]


def write_all(s):
    """Write every service's configuration."""
    for writer in (keystone, glance, placement, neutron, nova):
        writer(s)
