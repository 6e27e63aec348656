"""Instance action events: where an operator sees how a guest was moved.

Nova wraps each move in an instance action (``live-migration``,
``migrate``, ...), listed by ``GET /servers/{id}/os-instance-actions/{req}``
with its events.  The driver adds its own events to that action:

- ``bhyve_live_migration_<mode>`` (``live`` or ``warm``): the engine run;
  an error result carries the reason in the event's details;
- ``bhyve_switchover mode=.. downtime=..ms total=..ms bytes=.. rounds=..
  throttle=..% predicted=..ms disk_bytes=.. disk_blocks=..``: the measured
  figures of a completed live migration (its disks moved in the same
  engine session: their bytes on the wire and blocks sent), and the pause
  the engine predicted when it switched over;
- ``bhyve_disk_copy bytes=.. wire=.. seconds=..``: a cold migration's disk
  copy (the disks' bytes, then those on the wire).

Event names are unique within an action, so figures go into the name.
Failing to record an event never fails the migration.
"""

from oslo_log import log as logging

from nova import objects

LOG = logging.getLogger(__name__)


def start(context, instance, host, name):
    """Open event ``name`` in the instance's current action."""
    try:
        objects.InstanceActionEvent.event_start(
            context, instance.uuid, name, want_result=False, host=host)
        return True
    except Exception as exc:    # never fail a migration over its record
        LOG.warning("Cannot record instance action event %s: %s", name, exc,
                    instance=instance)
        return False


def finish(context, instance, name, error=None):
    """Close event ``name``: Success, or Error with ``error`` as its details."""
    try:
        objects.InstanceActionEvent.event_finish_with_failure(
            context, instance.uuid, name,
            exc_val=None if error is None else str(error),
            exc_tb=None if error is None else f"nova-bhyve: {error}",
            want_result=False)
    except Exception as exc:    # never fail a migration over its record
        LOG.warning("Cannot finish instance action event %s: %s", name, exc,
                    instance=instance)


def record(context, instance, host, name):
    """Add an event that starts and ends now (a named fact)."""
    if start(context, instance, host, name):
        finish(context, instance, name)
