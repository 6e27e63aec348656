"""Small JSON files written atomically (temporary file, fsync, rename)."""

import json
import os
import tempfile


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


def read_json(path, default=None):
    """Return the JSON in ``path``, or ``default`` if it does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
