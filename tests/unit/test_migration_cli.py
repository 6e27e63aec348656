"""nova-bhyve-migrate: how it reads the secret file."""

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
