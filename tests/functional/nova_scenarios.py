"""What the Nova scenario scripts share: mode, shim, runner, launcher.

Nova picks its concurrency mode (native threads or eventlet monkey
patching) once per process, when ``nova.tests`` is first imported.  So the
scenario scripts (``nova_*_scenarios.py``) run in a fresh interpreter per
mode, launched by their pytest wrappers (``test_*_nova.py``) through
``run_scenarios``.  A script calls ``select_mode`` before its first nova
import, ``install_shim`` after it, and ends with ``main``; its test
classes derive from ``nova_scenario_base.BhyveScenarioTest``, imported
after ``select_mode``.  This module imports no nova code itself.
"""

import json
import os
import subprocess
import sys
import types
import unittest

RESULTS = "NOVA-BHYVE-RESULTS "
FAILURES = "NOVA-BHYVE-FAILURES "
# API access lines: they would crowd the failures out of a stderr tail
NOISE = "[nova.api.openstack.requestlog]"


def select_mode():
    """Read NOVA_BHYVE_CONCURRENCY and set nova's switch; return the mode."""
    mode = os.environ.get("NOVA_BHYVE_CONCURRENCY", "threading")
    if mode not in ("threading", "eventlet"):
        sys.exit(f"NOVA_BHYVE_CONCURRENCY={mode!r}: use threading or eventlet")
    # read by nova.monkey_patch when nova.tests is imported
    os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = (
        "1" if mode == "threading" else "0")
    return mode


def install_shim(driver_module):
    """Make ``bhyve.BhyveDriver`` loadable from a source checkout too.

    The wheel installs nova/virt/bhyve/__init__.py; a checkout does not.
    """
    try:
        import nova.virt.bhyve  # noqa: F401
    except ImportError:
        sys.modules["nova.virt.bhyve"] = types.SimpleNamespace(
            BhyveDriver=driver_module.BhyveDriver)


def _flatten(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _flatten(item)
        else:
            yield item


def main(module_name, classes, names):
    """Run the named tests (default: all of ``classes``); print a JSON line."""
    loader = unittest.TestLoader()
    module = sys.modules[module_name]
    if names:
        suite = loader.loadTestsFromNames(names, module)
    else:
        suite = unittest.TestSuite(loader.loadTestsFromTestCase(cls)
                                   for cls in classes)
    ids = [test.id().rsplit(".", 1)[-1] for test in _flatten(suite)]
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    outcome = dict.fromkeys(ids, "ok")
    details = {}
    for kind, entries in (("FAIL", result.failures), ("ERROR", result.errors),
                          ("skipped", result.skipped)):
        for test, detail in entries:
            name = test.id().rsplit(".", 1)[-1]
            outcome[name] = kind
            if kind != "skipped":
                details[name] = detail
    print(FAILURES + json.dumps(details), flush=True)
    print(RESULTS + json.dumps(outcome), flush=True)
    return 0 if result.wasSuccessful() and result.testsRun else 1


def _traceback_first(detail, log_tail=8000):
    """Put a failure's traceback before the log testtools printed ahead of it.

    A CI summary shows the head of a failure; the log would crowd it out.
    """
    # the first traceback after testtools' attachments ({{{ ... }}}): a
    # chained exception's first is its cause
    at = detail.find("Traceback (most recent call last)",
                     detail.rfind("}}}") + 1)
    if at <= 0:
        return detail
    return (f"{detail[at:]}\n--- its log, last {log_tail} characters\n"
            f"{detail[:at][-log_tail:]}")


def run_scenarios(script, mode, names=(), timeout=900):
    """Run ``script`` in a fresh interpreter in ``mode``; return its results.

    Returns (outcome by test name, stdout lines).  Raises AssertionError,
    with the script's stderr, when it printed no results or failed.
    """
    env = dict(os.environ, NOVA_BHYVE_CONCURRENCY=mode)
    env.pop("OS_NOVA_DISABLE_EVENTLET_PATCHING", None)
    proc = subprocess.run([sys.executable, str(script), *names], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = proc.stdout.splitlines()
    stderr = "\n".join(ln for ln in proc.stderr.splitlines()
                       if NOISE not in ln)[-20000:]
    summary = [ln for ln in lines if ln.startswith(RESULTS)]
    assert summary, f"{mode} mode: no results\n{stderr}"
    results = json.loads(summary[-1][len(RESULTS):])
    failed = [ln for ln in lines if ln.startswith(FAILURES)]
    details = json.loads(failed[-1][len(FAILURES):]) if failed else {}
    report = "".join(f"\n--- {name}\n{_traceback_first(text)}"
                     for name, text in details.items())
    assert proc.returncode == 0, (
        f"{mode} mode: {results}{report}\n--- stderr, API access lines "
        f"left out\n{stderr}")
    return results, lines
