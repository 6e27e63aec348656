"""Small JSON files written atomically (temporary file, fsync, rename)."""

import json
import os
import secrets
import tempfile

from nova_bhyve import beneath


def write_json(path, data):
    """Atomically replace ``path`` with ``data`` as JSON."""
    write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def write_text(path, text):
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_at(dirfd, name, data):
    """Atomically replace ``name`` in directory ``dirfd`` with ``data``.

    The temporary file is made with O_EXCL and no link is followed.
    """
    if len(beneath.split_relative(name)) != 1:
        raise ValueError(f"{name!r} is not a file name")
    tmp = f".tmp-{secrets.token_hex(8)}"
    fd = beneath.open_beneath(dirfd, tmp, os.O_WRONLY | os.O_CREAT |
                              os.O_EXCL, 0o640)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except FileNotFoundError:
            pass
        raise


def read_json(path, default=None):
    """Return the JSON in ``path``, or ``default`` if it does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
