"""nova-bhyve-migrate: how it reads the secret file and its options."""

import argparse

import pytest

from nova_bhyve.migration import cli


def test_the_secret_is_read_byte_for_byte(tmp_path):
    # a random secret may start or end with bytes that look like white space
    secret = b"\n\t " + bytes(range(32, 60)) + b"\r\x0b\x0c"
    path = tmp_path / "secret"
    path.write_bytes(secret)
    assert cli._read_secret(path) == secret


def test_a_short_secret_is_refused(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"x" * 15)
    with pytest.raises(SystemExit, match="at least 16 bytes"):
        cli._read_secret(path)


def test_channels_are_auto_or_a_count_of_1_to_16():
    assert cli._channels("auto") == "auto"
    assert [cli._channels(n) for n in ("1", "16")] == [1, 16]
    for bad in ("0", "17", "-1", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="1..16 or auto"):
            cli._channels(bad)
