"""What a live migration carries in Nova's migrate_data, and its secret.

Nova's conductor deserializes the object the driver returns without
importing nova-bhyve, and ``ComputeManager._live_migration_cleanup_flags``
recognises only ``LibvirtLiveMigrateData``; so this driver uses that class
and nothing but its existing fields:

=========================  ====================  ==============================
field                      set by                content
=========================  ====================  ==============================
``filename``               destination check     shared-storage probe file
``image_type``             destination check     ``nova-bhyve:<backend>``
``is_shared_*``,           source check          as the libvirt driver sets them
``block_migration``
``target_connect_addr``    pre_live_migration    ``HOST:PORT`` of the memory
                                                 listener on the destination
``supported_perf_events``  all three             ``nbmig-<key>=<value>`` tags
=========================  ====================  ==============================

Tags: ``dst_dirty_log`` and ``mode`` (``live``/``warm``), ``src_key`` and
``dst_key`` (X25519 public keys, base64), ``disks`` (``name,…``: the disks
the destination's engine receives, in that order; absent when none move).

The per-migration secret never travels and is never logged.  The source
puts an ephemeral X25519 public key in the data during
``check_can_live_migrate_source`` and keeps the private half in memory; the
destination answers with its own public key from ``pre_live_migration``.
Each side derives the same secret with HKDF-SHA256 over the X25519 shared
value, salted with the instance UUID: the engine's, which authenticates
and encrypts the one session that moves memory and disks.  Nova logs
migrate_data at DEBUG ("pre_live_migration data is ...", "live_migration
data is ..."); those lines show the public keys, the address and the
port, from which the secret cannot be computed.

A cold migration or resize makes the same exchange (``new_key`` on the
source, ``answer`` on the destination) in the request and answer of the
compute-to-compute call that sets up its disk transfer (``cold.py``).
"""

import base64
import threading
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nova.objects import migrate_data as migrate_data_obj

TAG = "nbmig-"
IMAGE_TYPE_PREFIX = "nova-bhyve:"
# a source key nobody used within this time is forgotten
KEY_LIFETIME = 3600.0


class MigrateDataError(Exception):
    """The migrate_data lacks what this driver needs; the text says why."""


def new_data():
    """Return an empty LibvirtLiveMigrateData with this driver's tag list."""
    data = migrate_data_obj.LibvirtLiveMigrateData()
    data.supported_perf_events = []
    return data


def put(data, key, value):
    """Set tag ``key`` to ``value`` (replacing an earlier value)."""
    tags = [t for t in _tags(data) if not t.startswith(f"{TAG}{key}=")]
    tags.append(f"{TAG}{key}={value}")
    data.supported_perf_events = tags


def get(data, key, default=None):
    """Return tag ``key``, or ``default``."""
    prefix = f"{TAG}{key}="
    for tag in _tags(data):
        if tag.startswith(prefix):
            return tag[len(prefix):]
    return default


def require(data, key):
    """Return tag ``key``; raise MigrateDataError if it is missing."""
    value = get(data, key)
    if value is None:
        raise MigrateDataError(
            f"migrate_data lacks {key!r}: both hosts must run nova-bhyve "
            "with the same migration support (upgrade the older one)")
    return value


def _tags(data):
    if "supported_perf_events" not in data:
        return []
    return list(data.supported_perf_events or [])


def format_addr(host, port):
    """Return ``HOST:PORT`` (``[HOST]:PORT`` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_addr(text):
    """Inverse of format_addr; raise MigrateDataError on nonsense."""
    host, sep, port = (text or "").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise MigrateDataError(f"bad migration address {text!r} in "
                               "migrate_data.target_connect_addr")
    return host.strip("[]"), int(port)


# -- key agreement ----------------------------------------------------------
def _public_b64(private):
    raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _peer_key(text):
    try:
        raw = base64.b64decode(text, validate=True)
        return x25519.X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise MigrateDataError(f"bad migration key in migrate_data: {exc}") \
            from None


class Secrets:
    """The secret of one migration (never logged, no repr)."""

    __slots__ = ("memory",)

    def __init__(self, memory):
        self.memory = memory

    def __repr__(self):
        return "Secrets(<hidden>)"


def derive(private, peer_public_b64, instance_uuid):
    """Return the Secrets both sides compute from the key exchange."""
    shared = private.exchange(_peer_key(peer_public_b64))

    return Secrets(HKDF(algorithm=hashes.SHA256(), length=32,
                        salt=instance_uuid.encode(),
                        info=b"nova-bhyve live migration memory").derive(shared))


def new_key():
    """Return a fresh (X25519 private key, its public half in base64)."""
    private = x25519.X25519PrivateKey.generate()
    return private, _public_b64(private)


class KeyStore:
    """The source's private keys between its check and live_migration."""

    def __init__(self):
        self._keys = {}
        self._lock = threading.Lock()

    def new(self, instance_uuid):
        """Make a key pair for ``instance_uuid``; return the public half (b64)."""
        private = x25519.X25519PrivateKey.generate()
        now = time.monotonic()
        with self._lock:
            self._keys = {u: (k, t) for u, (k, t) in self._keys.items()
                          if now - t < KEY_LIFETIME}
            self._keys[instance_uuid] = (private, now)
        return _public_b64(private)

    def take(self, instance_uuid):
        """Remove and return the private key (None if there is none)."""
        with self._lock:
            entry = self._keys.pop(instance_uuid, None)
        return entry[0] if entry else None


def answer(peer_public_b64, instance_uuid):
    """Destination side: return (own public key b64, Secrets)."""
    private = x25519.X25519PrivateKey.generate()
    return _public_b64(private), derive(private, peer_public_b64, instance_uuid)
