"""Downtime steps, timeouts, progress and pre-checks."""

import dataclasses
import types

import pytest
from oslo_serialization import jsonutils

from nova import exception
from nova_bhyve.machine.base import HostFacts
from nova_bhyve.migration import checks, policy
from nova_bhyve.native.engine import RoundStats

GiB = 1 << 30


def _conf(**kw):
    base = dict(live_migration_downtime=500, live_migration_downtime_steps=10,
                live_migration_downtime_delay=75,
                live_migration_completion_timeout=800)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_data_gb_counts_small_guests_and_disks_as_two():
    assert policy.data_gb(128) == 2
    assert policy.data_gb(8192) == 8
    assert policy.data_gb(128, [64 << 10]) == 4
    assert policy.data_gb(4096, [10 * GiB]) == 14


def test_downtime_steps_follow_the_libvirt_formula():
    # the example of nova's libvirt driver: 10 steps, 30 s, 3 GiB, 400 ms
    steps = policy.downtime_steps(_conf(live_migration_downtime=400,
                                        live_migration_downtime_delay=30), 3)
    assert steps[0] == (0, 40)
    assert steps[1] == (90, 76)
    assert steps[-1] == (900, 400)
    assert len(steps) == 11
    assert policy.downtime_at(steps, 0) == 40
    assert policy.downtime_at(steps, 89.9) == 40
    assert policy.downtime_at(steps, 90) == 76
    assert policy.downtime_at(steps, 10_000) == 400


def test_completion_timeout_scales_and_can_be_off():
    assert policy.completion_timeout(_conf(), 2) == 1600
    assert policy.completion_timeout(
        _conf(live_migration_completion_timeout=0), 2) == 0


@dataclasses.dataclass
class _Stats:
    round: int = 0
    expected_downtime_ms: float = 0
    max_downtime_ms: int = 100
    mem_total: int = 128 << 20
    bytes_transferred: int = 0
    bytes_remaining: int = 0
    finished: bool = False
    committed: bool = False
    disk_total: int = 0
    disk_blocks: int = 0
    dirty_blocks: int = 0


def test_disk_progress_from_the_engines_blocks():
    # round 0 reads the data blocks; then what the last sync left pending
    s = _Stats(round=0, disk_total=64 << 20, disk_blocks=1024)
    assert policy.disk_progress(s) == (64 << 20, 4 << 20, 60 << 20)
    s = _Stats(round=2, disk_total=64 << 20, disk_blocks=4000, dirty_blocks=3)
    assert policy.disk_progress(s) == (64 << 20, 4000 * 4096, 3 * 4096)
    s = _Stats(round=3, disk_total=64 << 20, disk_blocks=4003, dirty_blocks=3,
               finished=True, committed=True)
    assert policy.disk_progress(s)[2] == 0


def test_progress_reporting():
    s = _Stats(round=0, bytes_transferred=32 << 20)
    assert policy.memory_progress(s) == (128 << 20, 32 << 20, 96 << 20)
    s = _Stats(round=3, bytes_transferred=200 << 20, bytes_remaining=4 << 20)
    total, _done, left = policy.memory_progress(s)
    assert policy.percent_done(total, left) == 97
    s = _Stats(round=5, bytes_remaining=4 << 20, finished=True, committed=True)
    assert policy.memory_progress(s)[2] == 0
    assert policy.percent_done(0, 0) == 0


def test_round_lines_give_each_round_then_the_encodings():
    rounds = (RoundStats(0, 900.5, 65537, 70_000_000, 0, log_reads=3),
              RoundStats(901, 12.2, 4000, 90_000, 4000, throttle=20,
                         expected_ms=4.3))
    s = types.SimpleNamespace(
        rounds=rounds, pages_zero=10, pages_delta=3990, pages_compressed=0,
        pages_raw=65537, delta_cache_bytes=256 << 20, rtt_ms=0.25,
        bandwidth=12.5 * (1 << 20), channels=2)
    assert policy.round_lines(s) == [
        "round 0: 900ms pages=65537 bytes=70000000 dirty=0 expected=0.0ms "
        "throttle=0% log_reads=3",
        "round 1: 12ms pages=4000 bytes=90000 dirty=4000 expected=4.3ms "
        "throttle=20% log_reads=0",
        "pages: zero=10 delta=3990 compressed=0 raw=65537 delta_cache=256MiB "
        "rtt=0.25ms channels=2 bandwidth=12.5MiB/s"]


def test_round_lines_say_when_no_round_timed_the_link():
    s = types.SimpleNamespace(
        rounds=(), pages_zero=0, pages_delta=0, pages_compressed=0,
        pages_raw=3, delta_cache_bytes=0, rtt_ms=0.25, bandwidth=0.0,
        channels=1)
    assert policy.round_lines(s)[-1].endswith("bandwidth=unmeasured")


def test_round_trips_exceed_the_limit_from_twice_the_round_trip_on():
    def stats(rtt, limit):
        return types.SimpleNamespace(rtt_ms=rtt, max_downtime_ms=limit)
    assert not policy.round_trips_exceed_limit(stats(0.3, 300))
    assert not policy.round_trips_exceed_limit(stats(149.9, 300))
    assert policy.round_trips_exceed_limit(stats(150.0, 300))
    assert policy.round_trips_exceed_limit(stats(40.0, 50))


# -- checks -----------------------------------------------------------------
def _info(**cpu):
    base = {"arch": "x86_64", "vendor": "GenuineIntel", "page_size": 4096}
    base.update(cpu)
    return {"hypervisor_type": "bhyve", "hypervisor_version": 2,
            "cpu_info": jsonutils.dumps(base)}


def test_hypervisor_checks():
    checks.check_hypervisors(_info(), _info())
    older = dict(_info(), hypervisor_version=1)
    with pytest.raises(exception.MigrationPreCheckError, match="older"):
        checks.check_hypervisors(_info(), older)
    other = dict(_info(), hypervisor_type="QEMU")
    with pytest.raises(exception.MigrationPreCheckError, match="same"):
        checks.check_hypervisors(other, _info())


@pytest.mark.parametrize("field,value,words", [
    ("vendor", "AuthenticAMD", "CPU vendor"),
    ("arch", "aarch64", "architecture"),
    ("page_size", 16384, "page size"),
])
def test_cpu_checks(field, value, words):
    checks.check_cpus(_info(), _info())
    with pytest.raises(exception.MigrationPreCheckError, match=words):
        checks.check_cpus(_info(), _info(**{field: value}))


def test_unknown_cpu_facts_are_not_held_against_a_host():
    checks.check_cpus(_info(vendor=""), _info(vendor="AuthenticAMD"))
    checks.check_cpus({"cpu_info": "not json"}, _info())


def test_free_memory_check_names_the_numbers():
    facts = HostFacts(vcpus=2, memory_mb=4096, memory_mb_used=4000,
                      disk_gb=10, disk_gb_used=1, hypervisor_type="bhyve",
                      hypervisor_version=1, arch="x86_64", cpu_model="x")
    checks.check_free_memory(facts, 96)
    with pytest.raises(exception.MigrationPreCheckError,
                       match="96 MiB of memory free and the guest needs 128"):
        checks.check_free_memory(facts, 128)


def test_disk_check(tmp_path):
    disk = tmp_path / "disk"
    with open(disk, "wb") as f:
        f.truncate(2 * GiB)
        f.write(b"x" * 4096)
    info = checks.disk_info(str(disk))
    assert info["virt_disk_size"] == 2 * GiB and info["disk_size"] < GiB
    checks.check_disk(None, [info], False)
    checks.check_disk(2048, [info], False)
    checks.check_disk(1, [info], True)          # allocated size only
    with pytest.raises(exception.MigrationPreCheckError, match="2048 MiB"):
        checks.check_disk(1000, [info], False)


def test_shared_storage_probe(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    name = checks.create_probe(str(a))
    assert checks.probe_exists(str(a), name)
    assert not checks.probe_exists(str(b), name)
    assert not checks.probe_exists(str(a), "../etc/passwd")
    checks.remove_probe(str(a), name)
    assert not checks.probe_exists(str(a), name)
    checks.remove_probe(str(a), name)           # twice is fine


def test_mode_choice():
    assert checks.choose_mode(True, True, "refuse") == "live"
    assert checks.choose_mode(True, False, "warm") == "warm"
    with pytest.raises(exception.MigrationPreCheckError,
                       match="the destination cannot track"):
        checks.choose_mode(True, False, "refuse")
    with pytest.raises(exception.MigrationPreCheckError,
                       match="the source and the destination"):
        checks.choose_mode(False, False, "refuse")
