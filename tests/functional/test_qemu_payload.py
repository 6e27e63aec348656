"""The guest payload boots under QEMU too (the comparison baseline)."""

import shutil
import subprocess
import tempfile

import pytest

from nova_bhyve.testhost import artifacts
from nova_bhyve.testhost.console import parse_console
from nova_bhyve.testhost.diskimage import sector_versions

from .conftest import needs_kvm, wait_for

QEMU = shutil.which("qemu-system-x86_64")

pytestmark = [
    needs_kvm,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
]


@pytest.mark.parametrize("cmdline,cpus", [
    ("mode=stress pattern=touch ws=8M", 1),
    ("mode=idle", 1),
    ("mode=stress pattern=tight ws=8M cpus=2", 2),   # a writer on each vCPU
])
def test_payload_boots_and_heartbeats_under_qemu(cmdline, cpus):
    work = tempfile.mkdtemp(prefix="nbq-")
    log = f"{work}/serial.log"
    # "-arch-capabilities": QEMU 7.2 cannot set that MSR on some newer
    # kernels' KVM and aborts; the payload does not need it
    proc = subprocess.Popen(
        [QEMU, "-machine", "q35,accel=kvm", "-cpu", "host,-arch-capabilities",
         "-m", "256M", "-smp", str(cpus), "-nodefaults", "-display", "none", "-serial",
         f"file:{log}", "-kernel", str(artifacts.guest_kernel()),
         "-append", cmdline],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)

    def text():
        try:
            with open(log, encoding="ascii", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    try:
        # the firmware takes several seconds before the kernel starts
        report = wait_for(
            lambda: (r := parse_console(text())).heartbeats and
            len(r.heartbeats) >= 100 and
            (cmdline == "mode=idle" or r.heartbeats[-1].passes >= 1) and r,
            timeout=90,
            what="100 heartbeats under QEMU")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    assert report.banner["mode"] == cmdline.split()[0].split("=")[1]
    assert report.ready and report.heartbeats[0].seq == 1
    assert report.sequence_breaks() == []
    assert report.errors == 0
    assert report.banner["cpus"] == str(cpus)


def test_disk_writer_self_checks_clean_under_qemu(tmp_path):
    """disk=1 on QEMU's IDE: i440FX ("pc"), whose PIIX IDE decodes the
    legacy ports (q35's AHCI does not); the same guest driver as on the
    test host, with QEMU's BSY phases."""
    disk, log = tmp_path / "disk.img", tmp_path / "serial.log"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    proc = subprocess.Popen(
        [QEMU, "-machine", "pc,accel=kvm", "-cpu", "host,-arch-capabilities",
         "-m", "256M", "-nodefaults", "-display", "none",
         "-serial", f"file:{log}", "-kernel", str(artifacts.guest_kernel()),
         "-append", "mode=stress pattern=touch ws=8M disk=1 disksize=32K",
         "-drive", f"file={disk},format=raw,if=ide,index=0,media=disk"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)

    def text():
        try:
            return log.read_text("ascii", "replace")
        except FileNotFoundError:
            return ""

    try:
        report = wait_for(
            lambda: (r := parse_console(text())).heartbeats and
            r.heartbeats[-1].disk_passes >= 3 and r,
            timeout=120, what="three disk-writer passes under QEMU")
    finally:
        proc.kill()
        proc.wait()
    assert report.banner["disk"] == "1"
    assert report.disk == {"sectors": 2048, "blocks": 8, "block": 4096}
    assert report.sequence_breaks() == []
    assert report.errors == 0 and report.fails == []
    versions = sector_versions(disk.read_bytes(), 8,
                               range(report.heartbeats[-1].disk_passes,
                                     report.heartbeats[-1].disk_passes + 3))
    assert None not in versions and min(versions) >= 3
