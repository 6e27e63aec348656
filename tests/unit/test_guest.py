"""Which swap and ephemeral disks an instance gets (guest.extra_disks)."""

import types

from nova_bhyve import guest


def _instance(swap=0, ephemeral_gb=0):
    flavor = types.SimpleNamespace(vcpus=1, memory_mb=128, root_gb=1,
                                   swap=swap, ephemeral_gb=ephemeral_gb)
    return types.SimpleNamespace(uuid="u", flavor=flavor, system_metadata={})


def _disks(instance, bdi=None):
    return [(d.name, d.size_mb) for d in guest.extra_disks(instance, bdi)]


def test_a_flavor_without_extras_has_none():
    assert _disks(_instance()) == []
    assert _disks(_instance(), {"swap": None, "ephemerals": []}) == []


def test_without_mappings_the_flavor_decides():
    assert _disks(_instance(swap=256, ephemeral_gb=3)) == [
        ("swap", 256), ("eph0", 3072)]


def test_mappings_as_nova_passes_them_win_over_the_flavor():
    bdi = {"swap": {"device_name": "/dev/vdd", "swap_size": 128},
           "ephemerals": [{"device_name": "/dev/vdb", "size": 1, "num": 0},
                          {"device_name": "/dev/vdc", "size": 2, "num": 1}]}
    assert _disks(_instance(swap=256, ephemeral_gb=3), bdi) == [
        ("swap", 128), ("eph0", 1024), ("eph1", 2048)]
    assert guest.ephemeral_gb(_instance(ephemeral_gb=3), bdi) == 3


def test_a_swap_mapping_without_a_device_falls_back_to_the_flavor():
    bdi = {"swap": {"device_name": None, "swap_size": 0}}
    assert _disks(_instance(swap=64), bdi) == [("swap", 64)]


def test_build_spec_lists_the_extras_without_paths():
    conf = types.SimpleNamespace(
        bhyve=types.SimpleNamespace(testhost_default_cmdline="mode=idle"),
        vnc=types.SimpleNamespace(enabled=False))
    spec = guest.build_spec(_instance(swap=32, ephemeral_gb=1), [], conf)
    assert [(d.name, d.path, d.boot) for d in spec.disks] == [
        ("swap", "", False), ("eph0", "", False)]
