"""A running migration's progress, written into Nova's objects.

The Migration's memory and disk byte counters (what ``GET
/servers/{id}/migrations/{id}`` shows) and the instance's ``progress``
percentage, from the engine's statistics (``policy.memory_progress`` and
``policy.disk_progress``).  Progress is advisory: a failed save is logged
and never fails the migration.
"""

from oslo_log import log as logging

from nova_bhyve.migration import policy

LOG = logging.getLogger(__name__)


def report(instance, migration, stats):
    """Write memory and disk totals into the Migration, and the instance
    progress."""
    total, processed, remaining = policy.memory_progress(stats)
    _set_bytes(migration, "memory", total, processed, remaining)
    if stats.disk_total:
        _set_bytes(migration, "disk", *policy.disk_progress(stats))
    _saved(migration, instance, "migration")
    _saved(instance, instance, "instance",
           progress=policy.percent_done(total, remaining))


def _set_bytes(migration, kind, total, processed, remaining):
    """Set the Migration's byte counters; 0 is stored as None.

    Nova's API schema for these fields is "null or at least 1": a 0 would
    make ``GET /servers/{id}/migrations`` fail response validation.
    """
    setattr(migration, f"{kind}_total", total or None)
    setattr(migration, f"{kind}_processed", processed or None)
    setattr(migration, f"{kind}_remaining", remaining or None)


def _saved(obj, instance, what, **fields):
    """Set ``fields`` on ``obj`` and save it; a failure is logged at debug
    level, never raised."""
    try:
        for name, value in fields.items():
            setattr(obj, name, value)
        obj.save()
    except Exception as exc:        # progress must never fail a migration
        LOG.debug("Could not save %s progress: %s", what, exc,
                  instance=instance)
