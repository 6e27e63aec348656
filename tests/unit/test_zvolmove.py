"""A guest's zvols as stream disks (machine/zvolmove.py with the helper's
half, privsep_zfs.py, run in this process): the FIFOs, the order both
sides open them in, the zfs commands run and the verdicts, with a `zfs`
that stands in for FreeBSD's and the engine's part played by this test."""

import os
import stat

import pytest

from nova_bhyve import privsep, privsep_zfs
from nova_bhyve.machine import zvolmove

UUID = "7d1e0b7c-2f3a-4b5c-8d9e-0a1b2c3d4e5f"
TAG = "mig-0123456789ab"
SRC = "zroot/nova"

# a zfs(8) stand-in: logs its argv; `send` writes what the test put in
# $ZFAKE/<snapshot>, `receive` stores its input in $ZFAKE/recv-<n>;
# $ZFAKE/fail-<verb> makes that verb fail
FAKE_ZFS = r"""#!/bin/sh
echo "$*" >> "$ZFAKE/log"
verb=$1
if [ -e "$ZFAKE/fail-$verb" ]; then echo "cannot $verb: injected" >&2; exit 1; fi
case $verb in
snapshot) : ;;
send) eval "snap=\${$#}"; cat "$ZFAKE/$(echo "$snap" | tr / _)" ;;
receive) n=$(ls "$ZFAKE" | grep -c '^recv-'); cat > "$ZFAKE/recv-$n" ;;
get) if [ -e "$ZFAKE/volsize" ]; then cat "$ZFAKE/volsize"
     else cat "$ZFAKE"/recv-* | wc -c; fi ;;
destroy) : ;;
*) exit 2 ;;
esac
"""


@pytest.fixture
def host(tmp_path, monkeypatch):
    conf = privsep.CONF
    fake = tmp_path / "fake"
    fake.mkdir()
    zfs = tmp_path / "zfs"
    zfs.write_text(FAKE_ZFS)
    zfs.chmod(0o755)
    run = tmp_path / "run"
    (run / UUID).mkdir(parents=True)
    monkeypatch.setenv("ZFAKE", str(fake))
    monkeypatch.setattr(privsep.bhyve_pctxt, "client_mode", False)
    conf.set_override("zfs_path", str(zfs), group="bhyve")
    conf.set_override("runtime_path", str(run), group="bhyve")
    conf.set_override("zfs_dataset", SRC, group="bhyve")
    yield fake, run / UUID
    for opt in ("zfs_path", "runtime_path", "zfs_dataset"):
        conf.clear_override(opt, group="bhyve")


def _snapshot_data(fake, zvol, part, data):
    (fake / f"{zvol}@{TAG}-{part + 1}".replace("/", "_")).write_bytes(data)


def _copy(src_fd, dst_fd):
    """What the engine does with one part: all of it, then the end (a
    receiver gone: the engine fails, and closes both here)."""
    try:
        while chunk := os.read(src_fd, 1 << 16):
            os.write(dst_fd, chunk)
    except BrokenPipeError:
        pass
    os.close(dst_fd)
    os.close(src_fd)


def _read_all(fd):
    out = b""
    while chunk := os.read(fd, 4096):
        out += chunk
    return out.decode()


def _migrate_one_disk(host, notify=True, limits=None):
    """Source and destination halves, with the test as the engine."""
    fake, rundir = host
    zvol = f"{SRC}/{UUID}-disk0"
    full, increment = os.urandom(300_000), os.urandom(70_000)
    _snapshot_data(fake, zvol, 0, full)
    _snapshot_data(fake, zvol, 1, increment)
    out = zvolmove.ZvolStreams(str(rundir), UUID, TAG, {"disk": zvol}, "send")
    into = zvolmove.ZvolStreams(str(rundir), UUID, TAG,
                                {"disk": f"{SRC}/{UUID}-disk0"}, "receive",
                                limits)
    # two helpers on one machine: the destination's FIFOs must not be
    # the source's, so it gets a runtime directory of its own
    into.dir = str(rundir / "dst")
    into._fifo = lambda disk, which: os.path.join(into.dir, f"{disk}.{which}")
    (s,), (d,) = out.open(), _open_receive(into, rundir)
    _copy(s.first, d.first)
    if notify:
        os.write(s.notify, b"1")
    os.close(s.notify)
    _copy(s.final, d.final)
    return (out, into, _read_all(s.status), _read_all(d.status), full,
            increment)


def _open_receive(into, rundir):
    # the helper resolves FIFOs as <runtime>/<uuid>/zfs-<tag>/…; point the
    # receiving side's tag directory there through a second runtime root
    real = privsep_zfs._open_fifo

    def open_dst(uuid, tag, disk, which, reading):
        fd = os.open(os.path.join(into.dir, f"{disk}.{which}"),
                     (os.O_RDONLY if reading else os.O_WRONLY) | os.O_NONBLOCK)
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)
        return fd

    privsep_zfs._open_fifo = open_dst
    try:
        return into.open()
    finally:
        privsep_zfs._open_fifo = real


def _log(fake):
    return (fake / "log").read_text().splitlines()


def test_a_zvol_moves_whole_and_its_increment_after_the_pause(host):
    fake, rundir = host
    out, into, src_status, dst_status, full, increment = _migrate_one_disk(host)
    assert (src_status, dst_status) == ("ok", "ok")
    assert (fake / "recv-0").read_bytes() == full
    assert (fake / "recv-1").read_bytes() == increment
    zvol = f"{SRC}/{UUID}-disk0"
    log = _log(fake)
    ran = [f"snapshot {zvol}@{TAG}-1", f"send {zvol}@{TAG}-1",
           f"receive -o volmode=dev {zvol}", f"snapshot {zvol}@{TAG}-2",
           f"send -i @{TAG}-1 {zvol}@{TAG}-2", f"receive {zvol}"]
    assert sorted(log) == sorted(ran)
    # the processes of the two hosts interleave; each host's order holds
    assert [line for line in log if "receive" not in line] == ran[:2] + ran[3:5]
    assert log.index(ran[2]) < log.index(ran[5])
    out.finish(committed=True)
    into.finish(committed=True)
    assert _log(fake)[-4:] == [f"destroy -r {zvol}@{TAG}-1",
                               f"destroy -r {zvol}@{TAG}-2"] * 2
    assert not os.path.exists(out.dir) and not os.path.exists(into.dir)


def test_no_final_snapshot_unless_the_guest_was_paused(host):
    fake, _ = host
    out, into, src_status, dst_status, _, _ = _migrate_one_disk(host, notify=False)
    assert src_status == ("not sent: the migration ended before the guest "
                          "was paused")
    assert not any(line.startswith("snapshot") and line.endswith("-2")
                   for line in _log(fake))
    assert not any("send -i" in line for line in _log(fake))
    out.finish(committed=False)
    into.finish(committed=False)
    zvol = f"{SRC}/{UUID}-disk0"
    # the source keeps its zvol (its snapshots go), the destination's goes
    assert _log(fake)[-3:] == [f"destroy -r {zvol}@{TAG}-1",
                               f"destroy -r {zvol}@{TAG}-2",
                               f"destroy -r {zvol}"]


def test_a_failed_receive_is_the_destinations_verdict(host):
    fake, _ = host
    (fake / "fail-receive").touch()
    _out, _into, src_status, dst_status, _, _ = _migrate_one_disk(host)
    assert dst_status == "receive -o exited 1: cannot receive: injected"
    # the engine stopped reading once the receiver failed: the sender died
    # of its broken pipe, and its own verdict says so
    assert src_status.startswith(f"send {SRC}/{UUID}-disk0@{TAG}-")
    assert " exited " in src_status


@pytest.mark.parametrize("volsize, verdict", [
    (1 << 20, "ok"),
    ((1 << 20) + 512, f"the received zvol {SRC}/{UUID}-disk0 is 1049088 "
                      "bytes, more than the 1048576 its flavor allows"),
])
def test_a_received_zvol_larger_than_its_limit_fails_the_receive(
        host, volsize, verdict):
    fake, _ = host
    (fake / "volsize").write_text(f"{volsize}\n")
    _out, into, _src, dst_status, _, _ = _migrate_one_disk(
        host, limits={"disk": 1 << 20})
    assert dst_status == verdict
    zvol = f"{SRC}/{UUID}-disk0"
    gets = [line for line in _log(fake) if line.startswith("get")]
    # the full part may already set the volsize, so each part is checked
    # (a failed check ends the receive before the increment)
    assert gets == [f"get -Hp -o value volsize {zvol}"] * (2 if volsize <= 1 << 20
                                                           else 1)
    into.finish(committed=False)
    assert _log(fake)[-1] == f"destroy -r {zvol}"


def test_a_zvol_without_a_limit_is_not_measured(host):
    fake, _ = host
    _out, _into, _src, dst_status, _, _ = _migrate_one_disk(host)
    assert dst_status == "ok"
    assert not any(line.startswith("get") for line in _log(fake))


def test_the_helper_refuses_a_limit_that_is_not_a_size(host):
    with pytest.raises(privsep_zfs.PrivilegeError, match="max_bytes"):
        privsep_zfs.zvol_stream_open(UUID, TAG, "disk", "receive",
                                     f"{SRC}/{UUID}-disk0", max_bytes="1G")


def test_the_helper_refuses_what_is_not_its_fifo(host):
    _, rundir = host
    d = rundir / f"zfs-{TAG}"
    d.mkdir()
    (d / "disk.first").write_bytes(b"")         # a file, not a FIFO
    with pytest.raises(privsep.PrivilegeError, match="is not a FIFO|nobody"):
        privsep_zfs._open_fifo(UUID, TAG, "disk", "first", True)
    os.symlink("/etc/passwd", d / "disk.final")
    with pytest.raises((privsep.PrivilegeError, OSError)):
        privsep_zfs._open_fifo(UUID, TAG, "disk", "final", True)


@pytest.mark.parametrize("call", [
    lambda: privsep_zfs.zvol_stream_open(UUID, "mig-../../x", "disk", "send",
                                         f"{SRC}/{UUID}-disk0"),
    lambda: privsep_zfs.zvol_stream_open(UUID, TAG, "../disk", "send",
                                         f"{SRC}/{UUID}-disk0"),
    lambda: privsep_zfs.zvol_stream_open(UUID, TAG, "disk", "run", f"{SRC}/x"),
    lambda: privsep_zfs.zvol_stream_open(UUID, TAG, "disk", "send", "other/x"),
    lambda: privsep_zfs.zvol_stream_open("not-a-uuid", TAG, "disk", "send",
                                         f"{SRC}/x"),
    lambda: privsep_zfs.zvol_stream_start(UUID, TAG, "disk"),
])
def test_the_helper_checks_every_name_before_running_anything(host, call):
    fake, _ = host
    with pytest.raises(privsep.PrivilegeError):
        call()
    assert not (fake / "log").exists()


def test_tags_are_fresh_and_well_formed():
    tags = {zvolmove.new_tag() for _ in range(50)}
    assert len(tags) == 50
    assert all(privsep_zfs.check_tag(t) == t for t in tags)


def test_both_hosts_order_the_disks_alike():
    a = zvolmove.ordered({"swap": "p/s", "eph0": "p/e", "disk": "p/d"})
    assert list(a) == ["disk", "eph0", "swap"]
