"""Waiting for a condition, shared by the pytest tests and the Nova scenarios."""

import time


def wait_for(predicate, timeout=10.0, interval=0.01, what="condition"):
    """Poll ``predicate`` until it returns a true value; return that value.

    Raises AssertionError (a test failure) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
