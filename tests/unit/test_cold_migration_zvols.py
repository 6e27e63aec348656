"""Cold migration and resize of a bhyve guest, whose disks are zvols: the
source driver's ``migrate_disk_and_power_off`` and the destination's
listener (migration/cold.py) on real bhyve backends, the privileged
helper's zfs half (privsep_zfs.py) run in this process around a stand-in
for zfs(8) that keeps each dataset as a file, and the real engine between
them in cold mode (vmm port ``none``; no VM runs).

One process stands in for two hosts: the datasets differ (``zroot/src``,
``zroot/dst``) and the stand-in RPC switches ``[bhyve] runtime_path``
(where the helper finds the FIFOs) to the destination's while it answers.
"""

import json
import os
import types
from unittest import mock

import pytest

from nova import exception
from nova_bhyve import privsep
from nova_bhyve.machine import bhyve
from nova_bhyve.migration import cold

from .test_cold_migration_driver import UUID, _flavor, _instance

CONF = privsep.CONF
MiB = 1 << 20

# a zfs(8) stand-in: each dataset or snapshot is the file $ZFAKE/<name, / as _>;
# `snapshot` copies the volume, `send` writes the snapshot (`-i`: a header
# and what changed since the first snapshot, nothing if the guest wrote
# nothing), `receive` writes the volume (part 1: beside it, `.increment`),
# `create -V`, `set volsize=` and `get volsize` size it, `list` names them;
# $ZFAKE/fail-<verb> makes that verb fail
COLD_ZFS = r"""#!/bin/sh
echo "$*" >> "$ZFAKE/log"
verb=$1
if [ -e "$ZFAKE/fail-$verb" ]; then echo "cannot $verb: injected" >&2; exit 1; fi
f() { echo "$ZFAKE/$(echo "$1" | tr / _)"; }
eval "last=\${$#}"
case $verb in
snapshot) cp "$(f "${last%@*}")" "$(f "$last")" ;;
send) if [ "$2" = -i ]; then
        echo "increment $3 to $last"
        cmp -s "$(f "${last%@*}$3")" "$(f "$last")" || cat "$(f "$last")"
      else cat "$(f "$last")"; fi ;;
receive) if [ "$2" = -o ]; then cat > "$(f "$last")"
         else cat > "$(f "$last").increment"; fi ;;
destroy) rm -f "$(f "$last")" "$(f "$last").increment" ;;
create) truncate -s "$5" "$(f "$last")" ;;
set) truncate -s "${2#volsize=}" "$(f "$last")" ;;
get) stat -c %s "$(f "$last")" ;;
list) ls "$ZFAKE" | grep "^$(echo "$last" | tr / _)_" | grep -v '[@.]' | tr _ / ;;
*) exit 2 ;;
esac
"""


class SwitchingRPC:
    """Nova's compute RPC to the destination driver; while the destination
    answers, the helper resolves FIFOs beneath its runtime path."""

    def __init__(self, dst, runs):
        self.dst, self.runs, self.requests = dst, runs, []

    def check_instance_shared_storage(self, ctxt, data, instance=None,
                                      host=None):
        self.requests.append(json.loads(json.dumps(data)))
        CONF.set_override("runtime_path", self.runs["dst"], group="bhyve")
        try:
            answer = self.dst.check_instance_shared_storage_remote(ctxt, data)
        finally:
            CONF.set_override("runtime_path", self.runs["src"], group="bhyve")
        return json.loads(json.dumps(answer))


def _zvol(host, name="disk0"):
    return f"zroot/{host}/{UUID}-{name}"


@pytest.fixture
def hosts(make_driver, tmp_path, monkeypatch):
    """(source, destination) drivers on bhyve backends and the fake's dir."""
    fake = tmp_path / "fake"
    fake.mkdir()
    zfs = tmp_path / "zfs"
    zfs.write_text(COLD_ZFS)
    zfs.chmod(0o755)
    template = tmp_path / "VARS.fd"
    template.write_bytes(b"VARS")
    monkeypatch.setenv("ZFAKE", str(fake))
    monkeypatch.setattr(privsep.bhyve_pctxt, "client_mode", False)
    runs = {h: str(tmp_path / f"run-{h}") for h in ("src", "dst")}
    drivers = {h: make_driver() for h in ("src", "dst")}
    for opt, value in (("zfs_path", str(zfs)), ("zfs_dataset", "zroot"),
                       ("uefi_vars_template", str(template))):
        CONF.set_override(opt, value, group="bhyve")
    for host, drv in drivers.items():
        drv.backend = bhyve.BhyveBackend(CONF, str(tmp_path / host), runs[host])
        drv.backend.dataset = f"zroot/{host}"
        os.makedirs(drv.backend.instances_path)
        drv.power_off, drv.power_on = mock.Mock(), mock.Mock()
    src, dst = drivers["src"], drivers["dst"]
    CONF.set_override("runtime_path", runs["src"], group="bhyve")
    src._compute_rpc = SwitchingRPC(dst, runs)
    # the source guest: root and ephemeral zvols, its UEFI variables
    (fake / _zvol("src").replace("/", "_")).write_bytes(os.urandom(3 * MiB))
    (fake / _zvol("src", "eph0").replace("/", "_")).write_bytes(
        os.urandom(MiB) + bytes(MiB))
    folder = tmp_path / "src" / UUID
    folder.mkdir()
    (folder / "nvram.fd").write_bytes(b"boot order" + os.urandom(8182))
    monkeypatch.setattr(src.backend, "disk_paths", lambda uuid: {
        n: f"/dev/zvol/{_zvol('src', z)}"
        for n, z in (("disk", "disk0"), ("eph0", "eph0"))})
    monkeypatch.setattr(cold.ColdMigrationMixin, "_move", staticmethod(
        lambda ctx, inst: types.SimpleNamespace(source_compute="src",
                                                dest_compute="dst")))
    monkeypatch.setattr(cold, "inbound_addr", lambda: "127.0.0.1")
    monkeypatch.setattr(cold, "events", mock.Mock())
    real_exists = os.path.exists        # a zvol's device node: the fake's file
    monkeypatch.setattr(bhyve.os.path, "exists", lambda p: real_exists(
        fake / p[len("/dev/zvol/"):].replace("/", "_"))
        if p.startswith("/dev/zvol/") else real_exists(p))
    yield src, dst, fake
    for uuid in list(dst._received_disks):
        dst._drop_received(uuid)
    for opt in ("zfs_path", "zfs_dataset", "uefi_vars_template"):
        CONF.clear_override(opt, group="bhyve")


def _file(fake, name):
    path = fake / name.replace("/", "_")
    return path.read_bytes() if path.exists() else None


def _log(fake):
    return (fake / "log").read_text().splitlines()


def _migrate(src, flavor=None):
    return src.migrate_disk_and_power_off(
        "ctx", _instance(flavor=_flavor(ephemeral_gb=1)), "192.0.2.9",
        flavor or _flavor(root_gb=2, ephemeral_gb=1), [], None, 30, 5)


def test_the_zvols_and_the_uefi_variables_move_and_no_snapshot_stays(
        hosts, tmp_path):
    src, dst, fake = hosts
    before = {z: _file(fake, _zvol("src", z)) for z in ("disk0", "eph0")}
    nvram = (tmp_path / "src" / UUID / "nvram.fd").read_bytes()
    info = json.loads(_migrate(src))
    assert info == {"version": 2, "shared": False, "disks": ["disk", "eph0"]}
    src.power_off.assert_called_once()
    src.power_on.assert_not_called()
    dst._take_received(UUID)        # the destination's verdict, cleaned up
    for z in ("disk0", "eph0"):     # bytes identical; nothing changed since
        assert _file(fake, _zvol("dst", z)) == before[z]
        assert _file(fake, _zvol("src", z)) == before[z]
        tag = src._compute_rpc.requests[0][cold.REQUEST_KEY]["tag"]
        assert f"receive {_zvol('dst', z)}" in _log(fake)
        assert f"send -i @{tag}-1 {_zvol('src', z)}@{tag}-2" in _log(fake)
    assert (tmp_path / "dst" / UUID / "nvram.fd").read_bytes() == nvram
    # the request names disks and a snapshot tag, no secret and no path
    request = src._compute_rpc.requests[0][cold.REQUEST_KEY]
    assert request["streams"] == ["disk", "eph0"]
    assert request["files"] == ["nvram.fd"]
    assert sorted(request) == ["files", "src_key", "streams", "tag", "uuid"]
    # each host's snapshots went; no zvol was destroyed
    left = sorted(os.listdir(fake))
    assert not [n for n in left if "@" in n], left
    assert not [line for line in _log(fake)
                if line.startswith("destroy") and "@" not in line]
    assert not os.listdir(tmp_path / "run-src" / UUID)    # FIFOs gone


def test_a_failing_zfs_receive_keeps_the_source_and_leaves_nothing_there(
        hosts, tmp_path):
    src, dst, fake = hosts
    (fake / "fail-receive").touch()
    before = {z: _file(fake, _zvol("src", z)) for z in ("disk0", "eph0")}
    with pytest.raises(exception.InstanceFaultRollback) as err:
        _migrate(src)
    assert "receive -o exited 1: cannot receive: injected" in str(
        err.value.inner_exception)
    src.power_on.assert_called_once()       # the guest runs here again
    for z in ("disk0", "eph0"):
        assert _file(fake, _zvol("src", z)) == before[z]
        assert _file(fake, _zvol("dst", z)) is None
        assert f"destroy -r {_zvol('dst', z)}" in _log(fake)
        assert f"destroy -r {_zvol('src', z)}" not in _log(fake)
    assert (tmp_path / "src" / UUID / "nvram.fd").exists()
    receiving = dst._received_disks[UUID]
    assert receiving.result(timeout=30) is not None
    assert not (tmp_path / "dst" / UUID).exists()
    assert not (tmp_path / "run-dst" / UUID).exists()
    assert not [n for n in os.listdir(fake) if "@" in n]


def test_the_resized_guest_is_recorded_over_its_received_zvols_grown(hosts):
    src, dst, fake = hosts
    root = _file(fake, _zvol("src"))
    new = _instance(flavor=_flavor(root_gb=2, ephemeral_gb=1, swap=64))
    info = _migrate(src, new.flavor)
    dst.finish_migration("ctx", None, new, info, [], None, True, {},
                         power_on=False)
    # the received root zvol is kept and grown, its data first; the swap
    # disk the new flavor adds is made blank at its size
    with open(fake / _zvol("dst").replace("/", "_"), "rb") as f:
        assert f.read(len(root)) == root
        assert os.fstat(f.fileno()).st_size == 2 << 30
    log = _log(fake)
    assert f"set volsize=2G {_zvol('dst')}" in log
    assert f"set volsize=1G {_zvol('dst', 'eph0')}" in log
    assert not [line for line in log if line.startswith("create") and
                "swap" not in line]
    assert [(d.name, d.path) for d in dst.backend.recorded_spec(UUID).disks][
        :2] == [("disk", f"/dev/zvol/{_zvol('dst')}"),
                ("swap", f"/dev/zvol/{_zvol('dst', 'swap')}")]


def test_received_zvols_bigger_than_the_new_flavor_are_refused(hosts):
    src, dst, fake = hosts
    info = _migrate(src)
    # the source's eph0 is 2 MiB; an instance whose flavor has no
    # ephemeral disk cannot have it
    with pytest.raises(exception.MigrationError) as err:
        dst.finish_migration("ctx", None, _instance(), info, [], None, False,
                             {}, power_on=False)
    assert ("the source's disks do not fit the flavor: disk eph0 is 2097152 "
            "bytes, more than the flavor's ephemeral_gb 0 GiB" in str(err.value))
    for z in ("disk0", "eph0"):             # the received zvols are gone
        assert _file(fake, _zvol("dst", z)) is None
        assert _file(fake, _zvol("src", z)) is not None


def test_a_destination_with_the_zvols_already_refuses_and_keeps_them(hosts):
    src, dst, fake = hosts
    (fake / _zvol("dst").replace("/", "_")).write_bytes(b"stale")
    with pytest.raises(exception.InstanceFaultRollback) as err:
        _migrate(src)
    assert f"zvol {_zvol('dst')} exists on this host already" in str(
        err.value.inner_exception)
    assert not (fake / "log").exists()      # no zfs command ran anywhere
    assert _file(fake, _zvol("dst")) == b"stale"


def test_over_a_shared_instances_path_a_zvol_guest_is_refused(hosts):
    src, dst, fake = hosts
    dst.backend.instances_path = src.backend.instances_path
    with pytest.raises(exception.InstanceFaultRollback) as err:
        _migrate(src)
    assert "over a shared instances path" in str(err.value.inner_exception)
    assert not (fake / "log").exists()      # no snapshot was taken


def test_a_failing_snapshot_on_the_source_starts_the_guest_again(hosts):
    src, dst, fake = hosts
    (fake / "fail-snapshot").touch()
    before = _file(fake, _zvol("src"))
    with pytest.raises(exception.InstanceFaultRollback) as err:
        _migrate(src)
    assert "cannot start the zfs send of the zvols" in str(
        err.value.inner_exception)
    src.power_on.assert_called_once()
    tag = src._compute_rpc.requests[0][cold.REQUEST_KEY]["tag"]
    assert f"destroy -r {_zvol('src')}@{tag}-1" in _log(fake)
    assert _file(fake, _zvol("src")) == before
    # the destination's listener ends (here: cancelled) and keeps nothing
    receiving = dst._drop_received(UUID)
    assert receiving.result(timeout=30) is not None
    assert _file(fake, _zvol("dst")) is None
