"""Incoming migrations whose source went away without a word.

The destination prepares an incoming VM, its taps and a listener in
``pre_live_migration``.  Nova ends them with
``post_live_migration_at_destination`` or
``rollback_live_migration_at_destination``, and only the source's
nova-compute makes either call.  When that service stops mid-migration
neither comes: on restart Nova resets the instance (``task_state`` None,
``host`` unchanged) and marks the migration ``error``, and tells the
destination nothing.  Left alone, the incoming VM, its listener, its
files and Neutron's inactive port binding for this host stay, and the
binding makes every later live migration to this host fail ("No valid
host").

An incoming migration is an orphan when it was not handed over (the
engine never committed it) and Nova no longer moves the instance here:
the instance is gone, or its ``task_state`` is no longer ``migrating``
and its host is another one.  The check runs every few seconds; an
incoming migration that has stayed an orphan for
``[bhyve] live_migration_orphan_grace`` seconds is removed as a rollback
would remove it, its port bindings for this host are deleted, and the
migration's open ``bhyve_live_migration_*`` event is closed with the
reason.  The grace lets a rollback that is merely late (Nova resets the
task state just before it asks for the rollback) do the work itself.
"""

import time

import nova.conf
from nova.compute import task_states
from nova.network import neutron
from oslo_log import log as logging

from nova import context as nova_context
from nova import exception, objects
from nova_bhyve.migration import events

CONF = nova.conf.CONF
LOG = logging.getLogger(__name__)

EVENT_PREFIX = "bhyve_live_migration_"


def check_interval(grace):
    """Seconds between two looks for orphans (0: the reaper is off)."""
    if grace <= 0:
        return 0
    return max(1.0, min(15.0, grace / 4.0))


def lookup(context, uuid):
    """The instance as Nova sees it now, or None when it is gone."""
    try:
        return objects.Instance.get_by_uuid(context, uuid)
    except exception.InstanceNotFound:
        return None


def is_orphan(instance, host):
    """True when Nova no longer moves ``instance`` to ``host``."""
    if instance is None or instance.deleted:
        return True
    return (instance.host != host and
            instance.task_state != task_states.MIGRATING)


def reason(instance, host):
    """What happened, for the log and the migration's event."""
    if instance is None or instance.deleted:
        return (f"the instance was deleted during its migration to {host}; "
                f"{host} removed the incoming guest")
    return (f"the migration to {host} ended without a word from the source "
            f"(its nova-compute stopped or restarted mid-migration); {host} "
            f"removed the incoming guest, which stays on {instance.host}")


def release_port_bindings(context, instance, host):
    """Delete Neutron's inactive port bindings of ``instance`` for ``host``."""
    try:
        neutron.API().setup_networks_on_host(context, instance, host,
                                             teardown=True)
    except Exception as exc:    # the VM is gone; say what is left
        LOG.error("Could not delete the port bindings of this host (%s) "
                  "after removing an orphaned incoming guest: %s; a later "
                  "live migration here fails until they are removed "
                  "(openstack port show, binding:host_id)", host, exc,
                  instance=instance)


def close_events(context, instance, error):
    """Close the migration's open ``bhyve_live_migration_*`` events."""
    try:
        actions = objects.InstanceActionList.get_by_instance_uuid(
            context, instance.uuid, limit=1)
        if not actions:
            return
        open_events = [
            ev.event for ev in objects.InstanceActionEventList.get_by_action(
                context, actions[0].id)
            if ev.event.startswith(EVENT_PREFIX) and ev.finish_time is None]
    except Exception as exc:    # never fail a clean-up over its record
        LOG.warning("Cannot read the instance's actions: %s", exc,
                    instance=instance)
        return
    for name in open_events:
        events.finish(context, instance, name, error)


class OrphanWatch:
    """Find incoming migrations no rollback will end, and end them.

    ``incoming`` is the driver's dict {uuid: _Incoming} (whose
    ``handed_over()`` says whether the guest was committed) and ``lock``
    guards it; ``remove(uuid, incoming)`` tears one down (listeners, VM,
    taps, files) and is called with the entry already taken out.
    """

    def __init__(self, host_of, incoming, lock, remove, grace):
        self._host_of = host_of
        self._incoming = incoming
        self._lock = lock
        self._remove = remove
        self._grace = grace
        self._since = {}        # uuid -> monotonic time first seen orphaned

    def check(self, context=None, now=None):
        """One pass: remove what stayed orphaned for the grace period."""
        context = context or nova_context.get_admin_context()
        now = time.monotonic() if now is None else now
        host = self._host_of()
        with self._lock:
            pending = list(self._incoming.items())
        for uuid in set(self._since) - {u for u, _ in pending}:
            del self._since[uuid]
        for uuid, incoming in pending:
            if incoming.handed_over():
                self._since.pop(uuid, None)
                continue
            instance = lookup(context, uuid)
            if not is_orphan(instance, host):
                self._since.pop(uuid, None)
                continue
            first = self._since.setdefault(uuid, now)
            if now - first >= self._grace:
                self._reap(context, uuid, incoming, instance, host)

    def _reap(self, context, uuid, incoming, instance, host):
        with self._lock:
            if self._incoming.get(uuid) is not incoming:
                return          # a rollback or a new migration took it
            del self._incoming[uuid]
        self._since.pop(uuid, None)
        why = reason(instance, host)
        LOG.warning("Removing an orphaned incoming migration of %s: %s",
                    uuid, why)
        self._remove(uuid, incoming)
        if instance is not None and not instance.deleted:
            release_port_bindings(context, instance, host)
            close_events(context, instance, why)
