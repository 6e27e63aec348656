"""Threads that work under nova's threading and eventlet modes alike.

Nothing here imports eventlet at module level: in threading mode nova
forbids the import.  Under eventlet, ``threading`` is monkey patched, so a
``threading.Thread`` is a green thread; long blocking file copies go to
eventlet's native thread pool so they do not stall the hub.
"""

import threading

from oslo_log import log as logging

from nova import utils

LOG = logging.getLogger(__name__)


def offload(func, *args, **kwargs):
    """Run a blocking call; in eventlet mode, in a native worker thread."""
    if utils.concurrency_mode_threading():
        return func(*args, **kwargs)
    return utils.get_eventlet().tpool.execute(func, *args, **kwargs)


class PeriodicThread:
    """A daemon thread calling ``func`` every ``interval`` s until stopped."""

    def __init__(self, name, interval, func):
        self.name = name
        self.interval = interval
        self.func = func
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        """Start the loop (no-op when the interval is 0 or it runs already)."""
        if self.interval <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name,
                                        daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.func()
            except Exception:
                LOG.exception("%s: periodic check failed", self.name)

    def stop(self, timeout=10.0):
        """Ask the loop to end and wait for it."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._thread = None
