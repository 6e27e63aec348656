"""The ``[bhyve]`` configuration options of the nova-bhyve compute driver."""

import sys

from oslo_config import cfg

GROUP = cfg.OptGroup(
    "bhyve",
    title="bhyve compute driver",
    help="Options of the nova-bhyve compute driver "
         "(``[DEFAULT] compute_driver = bhyve.BhyveDriver``).")

DEFAULT_TESTHOST_CMDLINE = "mode=idle"

common_opts = [
    cfg.StrOpt(
        "backend", default="auto", choices=[
            ("auto", "bhyve on FreeBSD, the KVM test host elsewhere"),
            ("bhyve", "FreeBSD bhyve(8)"),
            ("testhost", "the KVM test host (Linux development and CI)"),
        ],
        help="Which machine layer runs the guests."),
    cfg.FloatOpt(
        "state_poll_interval", default=2.0, min=0,
        help="Seconds between checks of every guest's state; a guest that "
             "stops, crashes or restarts on its own is reported to the "
             "compute manager as a lifecycle event. 0 disables the check "
             "(nova's periodic power-state sync still runs)."),
    cfg.IntOpt(
        "soft_reboot_timeout", default=120, min=1,
        help="Seconds a soft reboot waits for the guest to power itself off "
             "(ACPI power button) before it falls back to a hard reboot."),
    cfg.StrOpt(
        "runtime_path", default="$state_path/bhyve-runtime",
        help="Directory of this host's own files about its guests, one "
             "subdirectory per instance: the machine record (spec and "
             "power intent), the supervisor's pid and exit files, the "
             "process and console logs and the guest's control socket. "
             "Instance disks (and a suspended guest's checkpoint) stay "
             "under ``[DEFAULT] instances_path``, which may be shared "
             "between hosts (NFS), as with the libvirt driver; this "
             "directory must not be: it has to be local to the host, "
             "persist across reboots (the records tell which guests to "
             "restart) and differ for every nova-compute, including two on "
             "one machine. It must not lie inside ``instances_path``. "
             "Created with mode 0750 when missing; it must not be a "
             "symbolic link. nova-compute writes a ``host`` file in it and "
             "refuses to start when another host's name is there. Unix "
             "socket paths below it must fit in 107 bytes, so keep it "
             "short (at most about 55 characters)."),
    cfg.IntOpt(
        "console_log_max_bytes", default=100 * 1024, min=1024,
        help="How many bytes from the end of the console log the console "
             "output API returns."),
]

bhyve_opts = [
    cfg.StrOpt("bhyve_path", default="/usr/sbin/bhyve",
               help="The bhyve(8) binary; the only program the privileged "
                    "helper starts a guest with."),
    cfg.StrOpt("bhyvectl_path", default="/usr/sbin/bhyvectl",
               help="The bhyvectl(8) binary."),
    cfg.StrOpt("daemon_path", default="/usr/sbin/daemon",
               help="The daemon(8) binary that supervises each guest."),
    cfg.StrOpt("ifconfig_path", default="/sbin/ifconfig",
               help="The ifconfig(8) binary (tap and bridge plumbing)."),
    cfg.StrOpt("zfs_path", default="/sbin/zfs", help="The zfs(8) binary."),
    cfg.StrOpt(
        "zfs_dataset",
        help="ZFS dataset under which instance disks are created as zvols "
             "and cached Glance images kept as snapshots, for example "
             "``zroot/nova``. Required by the bhyve backend with "
             "``disk_layout = zvol``."),
    cfg.StrOpt(
        "disk_layout", default="zvol", choices=[
            ("zvol", "root, swap and ephemeral disks are ZFS zvols under "
                     "``zfs_dataset``, local to this host"),
            ("file", "root, swap and ephemeral disks are raw files in "
                     "``<instances_path>/<uuid>/``"),
        ],
        help="Where the bhyve backend keeps instance disks. ``zvol``: each "
             "disk is a zvol under ``zfs_dataset`` (root disks cloned from "
             "cached image snapshots); zvols are local to this host's pool "
             "even when ``[DEFAULT] instances_path`` is shared, so a live "
             "migration always copies them (zfs send and receive inside the "
             "migration session), as do a cold migration and a resize, "
             "which are refused over a shared instances path. ``file``: "
             "each disk is a sparse raw file in the instance directory "
             "(``disk``, made from the Glance image cached in "
             "``<instances_path>/_base`` and grown to the flavor's root_gb; "
             "``disk.swap``, ``disk.eph0``...), the layout for an "
             "``instances_path`` shared between hosts (NFS), as the libvirt "
             "driver uses one: a live migration then moves only memory and "
             "device state. bhyve keeps no log of the blocks a running guest "
             "writes, so with ``file`` a live migration between hosts that "
             "do not share ``instances_path`` is refused; a cold migration "
             "or resize copies the files (with ``nvram.fd``) between such "
             "hosts and uses them in place on a shared path. All hosts a "
             "guest may move between must use the same layout; changing it "
             "does not convert the "
             "disks of existing instances."),
    cfg.StrOpt(
        "uefi_firmware",
        default="/usr/local/share/uefi-firmware/BHYVE_UEFI_CODE.fd",
        help="UEFI firmware code (package edk2-bhyve)."),
    cfg.StrOpt(
        "uefi_vars_template",
        default="/usr/local/share/uefi-firmware/BHYVE_UEFI_VARS.fd",
        help="UEFI variable store template copied to each instance as its "
             "own NVRAM file."),
    cfg.BoolOpt("wire_guest_memory", default=False,
                help="Wire guest memory (bhyve -S); required for PCI "
                     "passthrough and by some live-migration modes."),
    cfg.BoolOpt("vnc_wait", default=False,
                help="Hold the guest until a VNC client connects (the "
                     "``wait`` flag of bhyve's fbuf device)."),
]

testhost_opts = [
    cfg.StrOpt(
        "testhost_default_cmdline", default=DEFAULT_TESTHOST_CMDLINE,
        help="Command line of the test-host guest payload when the image "
             "has no ``bhyve_testhost_cmdline`` property, for example "
             "``mode=stress pattern=touch ws=64M``."),
    cfg.StrOpt(
        "testhost_binary",
        help="Path of nb-testhost; defaults to the binary built into this "
             "package."),
    cfg.StrOpt(
        "testhost_guest_kernel",
        help="Path of the guest payload; defaults to the guest.elf built "
             "into this package."),
    cfg.StrOpt(
        "testhost_netns", default="",
        help="Linux network namespace that holds this compute's tap devices "
             "and bridges, created on demand (``ip netns add``); empty keeps "
             "them in the namespace of the privileged helper. Give each "
             "test-host compute on one machine its own namespace (for "
             "example ``nb-host1`` and ``nb-host2``): during a live "
             "migration between two of them the destination creates the "
             "guest's tap under the same name the source still holds. The "
             "nova-compute process itself stays where it is. Letters, "
             "digits, ``.``, ``_`` and ``-``; at most 32 characters."),
    cfg.StrOpt(
        "ip_path", default="/sbin/ip",
        help="The ip(8) binary of iproute2 (tap and bridge plumbing of the "
             "test host on Linux)."),
]

migration_opts = [
    cfg.StrOpt(
        "live_migration_inbound_addr",
        help="Address this host listens on for incoming migrations (the "
             "guest's memory and disk during a live migration, the disk "
             "during a cold migration from this host) and tells the other "
             "host to connect to. Default: ``[DEFAULT] my_ip``. Every byte of "
             "guest memory, vCPU state and disk is encrypted and "
             "authenticated with a per-migration key (doc/migration.md); "
             "an address on a dedicated migration network still keeps the "
             "copy off the guests' own links."),
    cfg.IntOpt(
        "live_migration_orphan_grace", default=60, min=0,
        help="Seconds an incoming live migration may stay orphaned before "
             "this host removes it. Orphaned: the engine never handed the "
             "guest over, and Nova no longer moves the instance here (it "
             "was deleted, or its task state is no longer ``migrating`` "
             "and its host is another one), which happens when the "
             "source's nova-compute stops mid-migration and so never asks "
             "for the rollback. The incoming VM, its listener, taps and "
             "files go, the instance's port bindings for this host are "
             "deleted (else later live migrations here fail with \"No "
             "valid host\") and the migration's event is closed with the "
             "reason. Checked every grace/4 seconds (1 to 15). 0 disables "
             "the check: then only a restart of this nova-compute removes "
             "them, and the port bindings stay."),
    cfg.IntOpt(
        "live_migration_listen_timeout", default=600, min=10,
        help="Seconds the destination's listener waits for the source to "
             "connect, and for a stalled source to continue. Must exceed "
             "``[DEFAULT] vif_plugging_timeout``: the source may wait that "
             "long for network events before it starts sending."),
    cfg.IntOpt(
        "live_migration_downtime", default=500, min=10,
        help="Largest pause of the guest, in milliseconds, that the final "
             "switch-over may cause; reached in steps (below). Same meaning "
             "as ``[libvirt] live_migration_downtime``."),
    cfg.IntOpt(
        "live_migration_downtime_steps", default=10, min=3,
        help="Number of increments to reach the maximum downtime."),
    cfg.IntOpt(
        "live_migration_downtime_delay", default=75, min=3,
        help="Seconds per GiB of guest data (at least 2 GiB) between "
             "downtime increments."),
    cfg.IntOpt(
        "live_migration_completion_timeout", default=800, min=0,
        help="Seconds per GiB of guest data (at least 2 GiB for memory, plus "
             "at least 2 GiB per copied disk) a live migration may take "
             "before ``live_migration_timeout_action`` is taken. "
             "0 disables the timeout."),
    cfg.StrOpt(
        "live_migration_timeout_action", default="abort", choices=[
            ("abort", "cancel the migration; the guest keeps running on "
                      "the source and the migration is marked cancelled, "
                      "as the libvirt driver marks it"),
            ("force_complete", "switch over now, pausing the guest for as "
                               "long as the remaining memory takes"),
        ],
        help="What to do when a live migration exceeds its completion "
             "timeout."),
    cfg.IntOpt(
        "live_migration_bandwidth", default=0, min=0,
        help="Bandwidth cap of a live migration's memory copy in MiB/s; "
             "0 means unlimited."),
    cfg.IntOpt(
        "live_migration_parallel_connections", default=0, min=0, max=16,
        help="TCP connections that carry guest memory (the engine's "
             "channels), each a thread on both hosts.  0 (the default) "
             "chooses per migration: one per CPU of the source host that "
             "the guest's vCPUs leave free while it runs, at least 1 and "
             "at most 2, so that on a host with few CPUs the copy does not "
             "take the guest's CPU time.  Cold migration and resize, whose "
             "guest is stopped, count every CPU."),
    cfg.StrOpt(
        "live_migration_compression", default="auto", choices=[
            ("auto", "send a sparse page's first copy as its few non-zero "
                     "bytes, and compress (zstd) other pages while the link "
                     "is the bottleneck: the engine measures, per "
                     "connection, how fast the link carries pages and how "
                     "fast and how well zstd shrinks them, and compresses "
                     "when that saves time"),
            ("on", "as auto, but always compress; trades CPU for bandwidth"),
            ("off", "never compress: every page that holds data goes whole, "
                    "or as a delta against the delta cache"),
        ],
        help="Encoding of memory pages that are not sent as zero pages or "
             "as deltas against the delta cache."),
    cfg.IntOpt(
        "live_migration_delta_cache", default=-1, min=-1,
        help="MiB of memory per migration remembering what was last sent of "
             "each page, so that a page dirtied again is sent as a delta. "
             "-1 (default): as much as the guest has memory, at most a "
             "quarter of the memory free on the source host when the "
             "migration starts (only pages cached cost memory); 0 disables "
             "delta encoding."),
    cfg.StrOpt(
        "live_migration_verify", default="incremental", choices=[
            ("incremental", "digest of what was sent and applied"),
            ("full", "both hosts re-read all guest memory during the "
                     "switch-over; catches pages a dirty log missed, "
                     "lengthens the downtime"),
        ],
        help="How the hosts check that the destination's memory equals the "
             "source's before the guest moves."),
    cfg.BoolOpt(
        "live_migration_permit_auto_converge", default=False,
        help="Let the engine slow the guest's vCPUs down when it dirties "
             "memory faster than the link can copy it, so that the "
             "migration can finish: when the rest does not fit the downtime "
             "and a round shrank the dirty set by less than a tenth, or so "
             "slowly that eight more such rounds would not make it fit, "
             "at most every 0.5 s, up to 99%: 20%, then 10 points more, or "
             "at once to where the guest would dirty pages at half the rate "
             "the link sends them, where the measured rates say that is "
             "higher; and "
             "when the rest fits but the pause would still be over 20 ms "
             "and rounds no longer shorten it, a step a round up to the "
             "highest throttle under which the vCPUs sleep no more than "
             "about 10 ms at a time (90% on the Linux test host; none with "
             "bhyve, whose rctl limit stops the whole process from one pass "
             "of the kernel's accounting to a later one, a second apart), "
             "while each step shortens it by a tenth. As "
             "``[libvirt] live_migration_permit_auto_converge``, off by "
             "default; the migration's ``bhyve_switchover`` event gives the "
             "highest throttle applied."),
    cfg.FloatOpt(
        "live_migration_monitor_interval", default=5.0, min=0.1,
        help="Seconds between updates of the migration's memory totals and "
             "the instance's progress."),
    cfg.StrOpt(
        "live_migration_dirty_log", default="auto", choices=[
            ("auto", "as the backend reports: the KVM test host has one, "
                     "stock FreeBSD vmm(4) has none"),
            ("yes", "this host's vmm(4) tracks dirty pages (a kernel with "
                    "the migration patches)"),
            ("no", "treat this host as having no dirty-page log"),
        ],
        help="Whether this host can track the pages a running guest "
             "writes, which live (pre-copy) migration needs on both hosts."),
    cfg.StrOpt(
        "live_migration_without_dirty_log", default="warm", choices=[
            ("warm", "pause the guest, copy all of its memory, resume it on "
                     "the destination (downtime grows with memory size)"),
            ("refuse", "refuse the migration"),
        ],
        help="What a live migration does when either host has no dirty-page "
             "log."),
    cfg.IntOpt(
        "disk_transfer_timeout", default=600, min=10,
        help="Seconds a cold migration's or resize's destination waits "
             "for the source to connect and send the instance's disks, and "
             "the longest silence either side tolerates while they move "
             "(the engine's timeout). A live block migration copies disks "
             "under this limit too."),
]


ML2_GROUP = cfg.OptGroup(
    "ml2_bhyve",
    title="ML2 mechanism driver for bhyve hosts",
    help="Options of the ``bhyve`` ML2 mechanism driver, read by "
         "neutron-server (for example in ``ml2_conf.ini``).")

ml2_opts = [
    cfg.ListOpt(
        "hosts", default=[],
        help="Hosts (nova-compute ``[DEFAULT] host`` names) whose ports this "
             "driver binds: there no Neutron L2 agent runs and nova-bhyve "
             "plugs the tap devices itself. ``*`` means every host. The "
             "default, empty, binds no port: list the bhyve hosts, so that "
             "ports of hosts served by other mechanism drivers are left to "
             "them."),
    cfg.DictOpt(
        "bridge_mappings", default={},
        help="Bridges of physical networks, ``physnet:bridge,...``, for "
             "ports on ``flat`` networks: the tap joins that bridge, which "
             "the operator connects to the physical network (an if_bridge "
             "with the uplink as a member on FreeBSD). Ports on ``local`` "
             "networks need no mapping: each network gets a bridge of its "
             "own on every host, ``nbr`` followed by the first 11 hex digits "
             "of the network's UUID, created when its first port is "
             "plugged."),
]


def register_ml2_opts(conf):
    """Register the ``[ml2_bhyve]`` options on ``conf`` (neutron-server)."""
    conf.register_group(ML2_GROUP)
    conf.register_opts(ml2_opts, group=ML2_GROUP)


def list_ml2_opts():
    """Options for oslo-config-generator (entry point ``nova_bhyve.ml2``)."""
    return [(ML2_GROUP, ml2_opts)]


def default_backend():
    """Return the backend ``auto`` resolves to on this platform."""
    return "bhyve" if sys.platform.startswith("freebsd") else "testhost"


def register_opts(conf):
    """Register the ``[bhyve]`` options on ``conf``."""
    conf.register_group(GROUP)
    conf.register_opts(common_opts + bhyve_opts + testhost_opts +
                       migration_opts, group=GROUP)


def list_opts():
    """Options for oslo-config-generator (entry point ``nova_bhyve``)."""
    return [(GROUP, common_opts + bhyve_opts + testhost_opts + migration_opts)]


CONF = cfg.CONF
register_opts(CONF)
