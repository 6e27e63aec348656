"""migrate_data tags, addresses and the key agreement."""

import pytest
from nova.objects import base as obj_base
from nova.objects import migrate_data as migrate_data_obj

from nova_bhyve.migration import data as mdata

UUID = "3b0f6c9e-8d2a-4f1b-9c3e-5a6b7c8d9e0f"


def test_tags_round_trip_and_replace():
    data = mdata.new_data()
    mdata.put(data, "mode", "live")
    mdata.put(data, "disk_port", 4242)
    mdata.put(data, "mode", "warm")
    assert mdata.get(data, "mode") == "warm"
    assert mdata.get(data, "disk_port") == "4242"
    assert mdata.get(data, "missing", "x") == "x"
    assert sorted(data.supported_perf_events) == ["nbmig-disk_port=4242",
                                                  "nbmig-mode=warm"]
    with pytest.raises(mdata.MigrateDataError, match="both hosts"):
        mdata.require(data, "src_key")


def test_data_survives_nova_serialization():
    """What the conductor sees: a plain LibvirtLiveMigrateData."""
    data = mdata.new_data()
    data.target_connect_addr = mdata.format_addr("192.0.2.7", 40000)
    mdata.put(data, "src_key", "abc=")
    data.is_shared_instance_path = False
    data.is_shared_block_storage = False
    prim = data.obj_to_primitive()
    assert prim["nova_object.name"] == "LibvirtLiveMigrateData"
    back = obj_base.NovaObject.obj_from_primitive(prim)
    assert isinstance(back, migrate_data_obj.LibvirtLiveMigrateData)
    assert mdata.get(back, "src_key") == "abc="
    assert mdata.parse_addr(back.target_connect_addr) == ("192.0.2.7", 40000)


@pytest.mark.parametrize("host,port,text", [
    ("10.0.0.1", 5, "10.0.0.1:5"),
    ("fd00::1", 49152, "[fd00::1]:49152"),
])
def test_addresses(host, port, text):
    assert mdata.format_addr(host, port) == text
    assert mdata.parse_addr(text) == (host, port)


@pytest.mark.parametrize("bad", ["", "host", "host:", ":80", "h:x"])
def test_bad_addresses_are_refused(bad):
    with pytest.raises(mdata.MigrateDataError):
        mdata.parse_addr(bad)


def test_both_sides_derive_the_same_secret():
    keys = mdata.KeyStore()
    src_pub = keys.new(UUID)
    dst_pub, dst_secrets = mdata.answer(src_pub, UUID)
    src_secrets = mdata.derive(keys.take(UUID), dst_pub, UUID)
    assert src_secrets.memory == dst_secrets.memory
    assert len(src_secrets.memory) == 32
    assert keys.take(UUID) is None              # used once
    # nothing secret in what gets logged
    assert "hidden" in repr(src_secrets)
    assert src_secrets.memory.hex() not in repr(src_secrets)


def test_secrets_are_bound_to_the_instance():
    keys = mdata.KeyStore()
    src_pub = keys.new(UUID)
    dst_pub, dst_secrets = mdata.answer(src_pub, UUID)
    other = mdata.derive(keys.take(UUID), dst_pub, "another-instance")
    assert other.memory != dst_secrets.memory


def test_old_keys_expire(monkeypatch):
    keys = mdata.KeyStore()
    keys.new("old")
    clock = mdata.time.monotonic() + mdata.KEY_LIFETIME + 1
    monkeypatch.setattr(mdata.time, "monotonic", lambda: clock)
    keys.new("new")
    assert keys.take("old") is None
    assert keys.take("new") is not None


def test_a_bad_peer_key_is_a_clear_error():
    with pytest.raises(mdata.MigrateDataError, match="bad migration key"):
        mdata.answer("not base64!", UUID)
