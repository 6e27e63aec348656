"""Waiting for a condition, shared by the pytest tests and the Nova scenarios."""

from nova_bhyve import polling


def wait_for(predicate, timeout=10.0, interval=0.01, what="condition"):
    """Poll ``predicate`` until it returns a true value; return that value.

    Raises AssertionError (a test failure) after ``timeout`` seconds.
    """
    value = polling.poll(predicate, timeout, interval)
    if not value:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    return value
