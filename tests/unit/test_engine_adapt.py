"""core/adapt.c: when compress=auto compresses (no KVM)."""

import pytest

from .conftest import selftest_module

MB = 1e6
OFF, ON, AUTO = 0, 1, 2
PAGES = 64 * 200


def _run(mode, link, zstd=1000 * MB, ratio=0.05, burst=0):
    ffi, lib = selftest_module()
    active = ffi.new("int *")
    tried = lib.nb_selftest_adapt(mode, link, zstd, ratio, PAGES, burst, active)
    return tried, bool(active[0])


@pytest.mark.parametrize("link", [1 * MB, 62.5 * MB, 125 * MB, 500 * MB])
def test_auto_compresses_when_the_link_is_the_bottleneck(link):
    """1 Gbit/s shared by two channels, or slower: zstd keeps 95 % of a
    page off the wire faster than the link could carry it."""
    tried, active = _run(AUTO, link)
    assert active
    assert tried > PAGES * 0.9


@pytest.mark.parametrize("burst", [2, 5, 8])
def test_a_socket_buffer_that_drains_in_bursts_is_still_the_link(burst):
    """1 Gbit/s through a large socket buffer: most frames leave at memory
    speed, every burst-th waits for the buffer; the link is their mean."""
    tried, active = _run(AUTO, 125 * MB, burst=burst)
    assert active
    assert tried > PAGES * 0.9


@pytest.mark.parametrize("burst", [0, 8])
def test_a_fast_link_stays_raw_in_bursts_too(burst):
    tried, active = _run(AUTO, 5000 * MB, burst=burst)
    assert not active
    assert PAGES // 32 - 1 <= tried <= PAGES // 32


@pytest.mark.parametrize("link,zstd,ratio", [
    (5000 * MB, 1000 * MB, 0.05),   # loopback: sending beats compressing
    (400 * MB, 500 * MB, 0.5),      # zstd saves 250 MB/s, the link moves 400
    (100 * MB, 1000 * MB, 1.0),     # incompressible pages
])
def test_auto_does_not_compress_when_it_does_not_pay(link, zstd, ratio):
    """Only probes: one data page in 32, to keep the estimates current."""
    tried, active = _run(AUTO, link, zstd, ratio)
    assert not active
    assert PAGES // 32 - 1 <= tried <= PAGES // 32


def test_on_and_off_do_as_told():
    """The explicit settings ignore the link."""
    assert _run(ON, 5000 * MB) == (PAGES, True)
    assert _run(OFF, 1 * MB) == (0, False)
