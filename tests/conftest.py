"""Suite-wide pytest hooks."""


def pytest_terminal_summary(terminalreporter):
    """End with one plain line: how many tests ran and how many were skipped.

    A skip needs a reason (e.g. no /dev/kvm on this machine); the distinct
    reasons are listed so that a partly skipped run is never mistaken for
    a full one.
    """
    stats = terminalreporter.stats
    ran = sum(len(stats.get(k, [])) for k in ("passed", "failed", "xfailed",
                                                "xpassed"))
    skipped = stats.get("skipped", [])
    errors = len(stats.get("error", []))
    terminalreporter.write_line(
        f"nova-bhyve tests: {ran} ran ({len(stats.get('passed', []))} passed, "
        f"{len(stats.get('failed', []))} failed, {errors} errors), "
        f"{len(skipped)} skipped")
    reasons = sorted({str(r.longrepr[2]) if isinstance(r.longrepr, tuple)
                      else str(r.longrepr) for r in skipped})
    for reason in reasons:
        terminalreporter.write_line(f"  skipped because: {reason}")
