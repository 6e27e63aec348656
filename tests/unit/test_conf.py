"""[bhyve] options: registration, platform default, generated sample."""

import pathlib

import pytest
from oslo_config import cfg, generator

import nova_bhyve.conf as bhyve_conf

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_options_are_listed_for_the_generator():
    (group, opts), = bhyve_conf.list_opts()
    assert group.name == "bhyve"
    names = {opt.name for opt in opts}
    assert {"backend", "bhyve_path", "zfs_dataset", "uefi_firmware",
            "uefi_vars_template", "testhost_default_cmdline",
            "state_poll_interval", "soft_reboot_timeout"} <= names


def test_defaults():
    conf = cfg.ConfigOpts()
    bhyve_conf.register_opts(conf)
    conf([])
    assert conf.bhyve.backend == "auto"
    assert conf.bhyve.testhost_default_cmdline == "mode=idle"
    assert conf.bhyve.bhyve_path == "/usr/sbin/bhyve"
    assert conf.bhyve.zfs_dataset is None


def test_backend_default_follows_the_platform(monkeypatch):
    monkeypatch.setattr(bhyve_conf.sys, "platform", "freebsd15")
    assert bhyve_conf.default_backend() == "bhyve"
    monkeypatch.setattr(bhyve_conf.sys, "platform", "linux")
    assert bhyve_conf.default_backend() == "testhost"


def test_backend_choice_is_checked():
    conf = cfg.ConfigOpts()
    bhyve_conf.register_opts(conf)
    conf([])
    with pytest.raises(ValueError, match="qemu"):
        conf.set_override("backend", "qemu", group="bhyve")


@pytest.mark.parametrize("generator_conf,sample", [
    ("nova-bhyve-config-generator.conf", "nova-bhyve.conf.sample"),
    ("nova-bhyve-ml2-config-generator.conf", "ml2_conf_bhyve.ini.sample"),
])
def test_committed_sample_is_current(tmp_path, generator_conf, sample):
    """The samples in etc/ are what oslo-config-generator makes now."""
    conf = cfg.ConfigOpts()
    generator.register_cli_opts(conf)
    out = tmp_path / "sample.conf"
    conf(["--config-file", str(ROOT / "etc" / generator_conf),
          "--output-file", str(out)])
    generator.generate(conf)
    committed = (ROOT / "etc" / sample).read_text()
    assert out.read_text() == committed, (
        "regenerate the samples: tox -e genconfig")


def test_ml2_options_and_their_sample():
    """[ml2_bhyve] defaults bind nothing; its sample is current."""
    conf = cfg.ConfigOpts()
    bhyve_conf.register_ml2_opts(conf)
    conf([])
    assert conf.ml2_bhyve.hosts == []
    assert conf.ml2_bhyve.bridge_mappings == {}
