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


def _threshold(bandwidth, channels=1):
    _, lib = selftest_module()
    return lib.nb_selftest_drain_threshold(bandwidth, channels)


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, float("nan"), 32.768e6,
                                       33e6, 119e6, 1.25e9, float("inf")])
def test_a_fast_or_unmeasured_link_is_drained_below_64_kib(bandwidth):
    """From 32.768 MB/s up, 2 ms of the link carry 64 KiB or more: the
    wait after a round ends below 64 KiB, as it does where no round or
    drain has timed the link yet (0), and for any bandwidth that is not a
    positive number."""
    assert _threshold(bandwidth) == 64 << 10


@pytest.mark.parametrize("bandwidth,below", [(12.5e6, 25000), (32e6, 64000)])
def test_a_slower_link_is_drained_below_what_it_carries_in_2_ms(bandwidth,
                                                                below):
    """100 Mbit/s (12.5 MB/s) carries 25 KB in 2 ms, 32 MB/s 64,000 bytes."""
    assert _threshold(bandwidth) == below


@pytest.mark.parametrize("bandwidth", [8.0e6, 1.25e6, 125e3])
def test_a_slow_link_is_drained_below_16_kib(bandwidth):
    """10 Mbit/s carries 2.5 KB in 2 ms, less than delayed
    acknowledgements can leave unacknowledged: the floor is 16 KiB (13 ms
    of that link, where 64 KiB took 52)."""
    assert _threshold(bandwidth) == 16 << 10
    assert _threshold(bandwidth, channels=2) == 16 << 10


@pytest.mark.parametrize("channels,below", [(0, 16 << 10), (3, 24 << 10),
                                            (4, 32 << 10), (8, 64 << 10),
                                            (16, 64 << 10)])
def test_the_floor_is_8_kib_a_page_connection_from_three_on(channels, below):
    """A delayed acknowledgement can leave a segment unacknowledged on each
    connection: from three on the floor is 8 KiB each, at most 64 KiB."""
    assert _threshold(1.25e6, channels) == below
    assert _threshold(12.5e6, channels) == max(below, 25000)


def _excess(lag_ms, rtt_ms, backlog):
    _, lib = selftest_module()
    return lib.nb_selftest_dest_excess_ms(lag_ms, rtt_ms, backlog)


def test_a_destination_behind_the_link_costs_its_lag_per_page_pending():
    """13,746 pages pending when the round had crossed the link, APPLIED
    181 ms later over a 0.2 ms round trip: 13.2 us a page beyond the
    source's (the case seen with a 2-vCPU guest rewriting 3000 MiB)."""
    assert _excess(181.0, 0.2, 13746) == pytest.approx(180.8 / 13746)


@pytest.mark.parametrize("lag_ms", [0.0, 0.2, -3.0])
def test_a_destination_that_kept_up_costs_nothing_more(lag_ms):
    """APPLIED within the round trip says the destination applied pages
    as fast as they came; below 0 (an APPLIED known only to have come
    after a moment before the round crossed the link) is no lag either."""
    assert _excess(lag_ms, 0.2, 4096) == 0


def test_nothing_pending_times_nothing():
    """It had applied every round before this one crossed the link."""
    assert _excess(50.0, 0.2, 0) == 0


class _Pace:
    """A struct nb_dest_pace driven through core/converge.c's functions."""

    def __init__(self):
        self.ffi, self.lib = selftest_module()
        self.p = self.ffi.gc(self.lib.nb_selftest_pace_new(),
                             self.lib.nb_selftest_pace_free)
        self.rounds = 0

    def sent(self, *units):
        for n in units:
            self.lib.nb_selftest_pace_sent(self.p, self.rounds, n)
            self.rounds += 1

    def drained(self, rnd, applied, t):
        self.lib.nb_selftest_pace_drained(self.p, rnd, applied, t)

    def applied(self, applied, now, waited=True, rtt=0.2):
        """An APPLIED read at ``now`` by a poll that waited for it or not."""
        return self.lib.nb_selftest_pace_applied(self.p, applied, waited, now, rtt)

    def quiet(self, t):
        self.lib.nb_selftest_pace_quiet(self.p, t)

    @property
    def excess(self):
        return self.lib.nb_selftest_pace_excess_ms(self.p)

    @property
    def steady(self):
        """The pace the throttle weighs: the lesser of the last two rounds
        timed, until two more rounds drained untimed."""
        return self.lib.nb_selftest_pace_throttle_ms(self.p)

    @property
    def backlog(self):
        return self.lib.nb_selftest_pace_backlog(self.p)


def _timed_once(excess_ms=0.01):
    """Round 1 (1000 pages) crossed at 0 ms, applied at 10 ms + the rtt."""
    pace = _Pace()
    pace.sent(0, 1000)
    pace.drained(1, 1, 0.0)
    pace.applied(2, 1000 * excess_ms + 0.2)
    assert pace.excess == pytest.approx(excess_ms)
    return pace


def _time_round(pace, rnd, t, excess_ms):
    """Round ``rnd`` (1000 pages) crossed at ``t``, applied on its own,
    ``excess_ms`` a page late."""
    pace.sent(1000)
    pace.drained(rnd, rnd, t)
    assert pace.applied(rnd + 1, t + 1000 * excess_ms + 0.2) == 1


def _skip_round(pace, rnd, t):
    """Round ``rnd`` too small to time."""
    pace.sent(100)
    pace.drained(rnd, rnd, t)


def test_one_round_timed_alone_is_priced_but_not_steady():
    """One late APPLIED may be the scheduler's: the estimate prices it,
    but no throttle is raised for it until a second round shows it."""
    pace = _timed_once()
    assert pace.steady == 0


@pytest.mark.parametrize("late", [0.37, 0.005])
def test_the_steady_pace_is_the_lesser_of_the_last_two_rounds_timed(late):
    pace = _timed_once(0.01)
    _time_round(pace, 2, 20.0, late)
    assert pace.excess == pytest.approx(late)
    assert pace.steady == pytest.approx(min(late, 0.01))
    _time_round(pace, 3, 60.0 + 1000 * late, late)
    assert pace.steady == pytest.approx(late)


@pytest.mark.parametrize("why", ["small, applied", "small backlog",
                                 "applied within a round trip",
                                 "drained before the last one's APPLIED came"])
def test_a_lone_pace_stands_whole_once_two_rounds_drained_untimed(why):
    """No timing came to confirm or refute one late APPLIED: after the
    round drained next the throttle still leaves it out, after the one
    after that it weighs it whole, as the estimate does."""
    pace = _timed_once(0.37)
    for rnd, t in ((2, 400.0), (3, 800.0)):
        assert pace.steady == 0
        if why == "small, applied":
            pace.sent(100)
            pace.drained(rnd, rnd + 1, t)
        elif why == "small backlog":
            _skip_round(pace, rnd, t)
        elif why == "applied within a round trip":
            pace.sent(1000)
            pace.quiet(t + 0.1)
            pace.drained(rnd, rnd, t)
            assert pace.applied(rnd + 1, t + 5.0, waited=False) == 0
        else:
            pace.sent(1000)
            pace.drained(rnd, 2, t)     # round 2's APPLIED never came
    assert pace.steady == pytest.approx(0.37) == pace.excess


def test_each_timing_starts_the_window_again():
    """Rounds 1 and 2 timed at 0.01 and 0.37 ms a page: the throttle
    weighs 0.01.  Round 3 untimed; round 4 timed at 0.5 (the lesser of
    the last two: 0.37), round 5 untimed: still 0.37; round 6 untimed
    too: 0.5, as the estimate."""
    pace = _timed_once(0.01)
    _time_round(pace, 2, 100.0, 0.37)
    assert pace.steady == pytest.approx(0.01)
    _skip_round(pace, 3, 1000.0)
    assert pace.steady == pytest.approx(0.01)
    _time_round(pace, 4, 2000.0, 0.5)
    _skip_round(pace, 5, 3000.0)
    assert pace.steady == pytest.approx(0.37)
    _skip_round(pace, 6, 4000.0)
    assert pace.steady == pytest.approx(0.5) == pace.excess


def test_the_pace_is_timed_over_every_round_the_destination_had_pending():
    """Rounds 1 and 2 (300 and 500 pages) were pending when round 2 had
    crossed the link at 100 ms; the APPLIED covering them came at 108.2
    ms (one for round 1 alone, earlier, times nothing)."""
    pace = _Pace()
    pace.sent(100000, 300, 500)
    pace.drained(2, 1, 100.0)
    assert pace.backlog == 800
    assert pace.applied(2, 104.0) == 0
    assert pace.applied(3, 108.2) == 1
    assert pace.excess == pytest.approx(8.0 / 800)


def test_an_applied_found_waiting_dates_from_when_the_channel_last_read_empty():
    """A lower bound: the destination applied the round at least 10 ms
    after it had crossed the link."""
    pace = _Pace()
    pace.sent(0, 1000)
    pace.drained(1, 1, 50.0)
    pace.quiet(60.2)
    assert pace.applied(2, 90.0, waited=False) == 1
    assert pace.excess == pytest.approx(10.0 / 1000)


@pytest.mark.parametrize("quiet", [19.9, 20.1])
def test_an_applied_found_waiting_within_a_round_trip_of_the_crossing_times_nothing(
        quiet):
    """It may have come while the source counted the dirty pages: the
    destination lagged by at most that long, or not at all, and the pace
    timed before stays."""
    pace = _timed_once()
    pace.sent(1000)
    pace.quiet(quiet)
    pace.drained(2, 2, 20.0)
    assert pace.applied(3, 21.5, waited=False) == 0
    assert pace.excess == pytest.approx(0.01)


def test_a_frame_read_after_a_woken_polls_came_no_earlier_than_its_first():
    """Frames come in order: an APPLIED read right after one the poll
    woke for at 30 ms came at 30 ms at the earliest."""
    pace = _Pace()
    pace.sent(0, 1000, 1000)
    pace.quiet(0.0)
    pace.drained(2, 1, 20.0)
    assert pace.applied(2, 30.0) == 0       # round 1 only
    assert pace.applied(3, 30.0, waited=False) == 1
    assert pace.excess == pytest.approx(9.8 / 2000)


def test_a_small_round_keeps_the_pace_timed_before():
    """Fewer than 256 pages pending, or applied before the drain ended: a
    few ms of the scheduler's would read as a slow destination, or as
    one that kept up."""
    pace = _timed_once()
    pace.sent(10)
    pace.drained(2, 2, 20.0)
    assert pace.applied(3, 25.2) == 0
    pace.sent(10)
    pace.drained(3, 4, 30.0)
    assert pace.excess == pytest.approx(0.01)


def _timed_twice():
    """Rounds 1 and 2 timed at 0.01 and 0.02 ms a page: steady 0.01."""
    pace = _timed_once(0.01)
    _time_round(pace, 2, 20.0, 0.02)
    assert (pace.excess, pace.steady) == pytest.approx((0.02, 0.01))
    return pace


def test_a_destination_that_kept_up_resets_the_pace():
    """A round applied before its drain ended; a round whose APPLIED came
    within the round trip."""
    pace = _timed_twice()
    pace.sent(1000)
    pace.drained(3, 4, 60.0)
    assert pace.excess == pace.steady == 0
    pace = _timed_once()
    pace.sent(1000)
    pace.drained(2, 2, 20.0)
    assert pace.applied(3, 20.1) == 1 and pace.excess == 0


def test_a_pace_holds_while_the_next_rounds_are_sent():
    pace = _timed_once()
    pace.sent(1000, 1000)
    assert pace.excess == pytest.approx(0.01)


def test_round_0s_pace_holds_only_until_round_1_is_sent():
    """The destination's first writes to its memory are its slowest: the
    steady pace needs two rounds after it."""
    pace = _Pace()
    pace.sent(65536)
    pace.drained(0, 0, 0.0)
    pace.applied(1, 131.272)
    assert pace.excess == pytest.approx(131.072 / 65536)
    pace.sent(1000)
    assert pace.excess == 0
    pace.drained(1, 1, 200.0)
    assert pace.applied(2, 210.2) == 1
    assert pace.excess == pytest.approx(0.01)
    assert pace.steady == 0         # round 0 corroborates nothing


def test_round_0s_applied_after_round_1_was_sent_times_nothing():
    pace = _Pace()
    pace.sent(65536)
    pace.drained(0, 0, 0.0)
    pace.sent(300)
    assert pace.applied(1, 131.272) == 0 and pace.excess == 0


@pytest.mark.parametrize("applied,timed", [(77, True), (76, False)])
def test_a_destination_further_behind_than_the_totals_kept_is_not_timed(
        applied, timed):
    """1100 rounds of 300 pages, round 1099 drained: 1023 rounds pending
    (applied 77) are the most whose totals are kept; with one more, the
    pace timed before stays, and, rounds having drained since untimed,
    the throttle weighs it whole."""
    pace = _Pace()
    pace.sent(*[300] * 1100)
    pace.drained(5, 5, 0.0)
    pace.applied(6, 3.2)
    before = pace.excess
    pace.drained(1099, applied, 100.0)
    assert pace.applied(1100, 500.0) == int(timed)
    if timed:
        assert pace.backlog == 1023 * 300
        assert pace.excess == pytest.approx(399.8 / (1023 * 300))
    else:
        assert pace.excess == before
        assert before > 0 and pace.steady == pytest.approx(before)


class _Fit:
    """A struct nb_fit driven through core/converge.c's functions."""

    def __init__(self):
        self.ffi, self.lib = selftest_module()
        self.f = self.ffi.gc(self.lib.nb_selftest_fit_new(),
                             self.lib.nb_selftest_fit_free)
        self.last = 0

    def counted(self, dirty):
        """A count of ``dirty`` pages, weighed against the one before."""
        self.lib.nb_selftest_fit_counted(self.f, dirty, self.last)
        self.last = dirty

    def rounds_left(self, dirty=100, then=None):
        """Count ``dirty`` pages, then ``then`` (or ``dirty`` again) until
        no round is left, all fitting: how many of those counts still get
        a round."""
        self.counted(dirty)
        n = 0
        while self.lib.nb_selftest_fit_round_left(self.f):
            n += 1
            assert n < 100
            self.counted(dirty if then is None else then)
        return n

    def caught_up(self):
        """The source waited for the destination after the last count."""
        self.lib.nb_selftest_fit_caught_up(self.f)


def test_eight_rounds_at_most_once_the_rest_fits():
    assert _Fit().rounds_left() == 8


def test_a_wait_the_guest_dirtied_much_during_starts_the_extra_rounds_again():
    """The 2-vCPU tight row over 1 Gbit/s: eight rounds had shrunk the rest
    to 12 pages; the source then waited 95 ms for the destination, the
    guest dirtied 12,581 pages meanwhile, and with no round left they all
    went in the pause (26.7 ms, where that row's other runs paused 1.1
    and 1.2 ms)."""
    fit = _Fit()
    assert fit.rounds_left(12) == 8
    fit.caught_up()
    assert fit.rounds_left(12581) == 8


@pytest.mark.parametrize("after", [12, 24])
def test_a_count_after_a_wait_at_most_twice_the_one_before_gets_no_round(after):
    """Where the wait let the guest dirty little, no round would shrink it:
    the source switches over rather than wait again."""
    fit = _Fit()
    fit.rounds_left(12)
    fit.caught_up()
    assert fit.rounds_left(after) == 0


def test_the_extra_rounds_start_again_twice_at_most():
    """A lagging destination: the rounds after a restart leave it another
    backlog, the next wait another count (the runs on the test host:
    11,763 then 6,415 pages)."""
    fit = _Fit()
    fit.rounds_left(12)
    fit.caught_up()
    assert fit.rounds_left(11763, then=16) == 8
    fit.caught_up()
    assert fit.rounds_left(6415, then=16) == 8
    fit.caught_up()
    assert fit.rounds_left(6415) == 0


def test_a_wait_before_any_round_was_counted_restarts_nothing():
    """A wait on an estimate under 5 ms plus two round trips comes before
    any extra round was counted: it restarts nothing, and leaves both
    restarts to later waits."""
    fit = _Fit()
    fit.counted(10)
    fit.caught_up()
    assert fit.rounds_left(5000, then=12) == 8
    for _ in range(2):
        fit.caught_up()
        assert fit.rounds_left(6000, then=12) == 8


def test_a_wait_counts_only_for_the_count_right_after_it():
    """Only the count right after a wait is weighed against the one the
    wait followed; a later count, however much larger, is a round's."""
    fit = _Fit()
    fit.rounds_left(12)
    fit.caught_up()
    fit.counted(20)
    assert fit.rounds_left(5000) == 0
