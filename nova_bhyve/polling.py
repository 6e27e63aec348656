"""Waiting for a condition: the one polling loop of the package and its tests."""

import time


def poll(predicate, timeout, interval=0.02):
    """Call ``predicate`` until it returns a true value or ``timeout`` seconds
    have passed; return its last value (false on a timeout).

    ``predicate`` may raise to end the wait early; ``timeout`` may be
    ``math.inf``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)
