"""core/converge.c: when auto-converge calls a round stalled, and how hard
it then throttles the guest (no KVM)."""

import pytest

from .conftest import selftest_module

LIMIT = 300.0


def _stalled(expected, dirty, prev, limit=LIMIT):
    _, lib = selftest_module()
    return bool(lib.nb_selftest_round_stalled(expected, limit, dirty, prev))


def _target(cur, page_ms, dirty_per_ms):
    _, lib = selftest_module()
    return lib.nb_selftest_converge_target(cur, page_ms, dirty_per_ms)


@pytest.mark.parametrize("dirty,prev", [(16384, 16384), (16000, 16384),
                                        (20000, 16384), (5, 0)])
def test_a_round_that_does_not_shrink_the_rest_by_a_tenth_stalls(dirty, prev):
    """A rest of 8 s on a 300 ms limit; the round left as much (or more)."""
    assert _stalled(8000.0, dirty, prev)


@pytest.mark.parametrize("dirty,prev", [(16384, 16384), (16384, 1)])
def test_a_rest_that_fits_never_stalls(dirty, prev):
    """should_switch ends such rounds by itself: no throttle is needed."""
    assert not _stalled(LIMIT, dirty, prev)
    assert not _stalled(12.0, dirty, prev)


def test_a_slow_shrink_far_from_the_limit_stalls():
    """A quarter less a round, a rest 27 times the limit: eight more such
    rounds leave 0.75^8 = 10 % of it, still 2.7 times the limit."""
    assert _stalled(8000.0, 12288, 16384)


def test_the_same_shrink_near_the_limit_does_not():
    """A quarter less a round and a rest 3 times the limit: four more such
    rounds make it fit."""
    assert not _stalled(900.0, 12288, 16384)


def test_a_halving_converges_by_itself():
    """Half a round: eight rounds shrink the rest 256 times."""
    assert not _stalled(60000.0, 8192, 16384)
    assert _stalled(80000.0, 8192, 16384)


@pytest.mark.parametrize("left", [0.0, -20.0])
def test_nothing_stalls_where_the_round_trips_leave_nothing_of_the_limit(left):
    """switchover.c passes the part of the pause rounds shorten and what
    the final sync and the round trips leave of the limit: where they
    leave nothing, no throttle would make the pause fit."""
    assert not _stalled(8000.0, 16384, 16384, limit=left)
    assert _stalled(8000.0, 16384, 16384, limit=1.0)


def test_the_throttle_leaves_the_guest_half_the_rate_pages_go_out():
    """Pages go out at 1 per ms; the guest dirtied 2 per ms at full speed:
    it may run a quarter of the time."""
    assert _target(0, 1.0, 2.0) == 75
    # under 50 % it dirtied 1 per ms: it may run half of its half
    assert _target(50, 1.0, 1.0) == 75


def test_no_throttle_where_the_guest_already_dirties_slowly_enough():
    assert _target(0, 1.0, 0.25) == 0
    assert _target(0, 0.0, 2.0) == 0        # no estimate of the link yet
    assert _target(0, 1.0, 0.0) == 0
