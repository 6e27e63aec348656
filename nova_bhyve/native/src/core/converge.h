/*
 * Auto-converge's two decisions, apart from the source's state so that the
 * unit tests can drive them (source.c applies them through the vmm port):
 * whether a round stalled, and how hard to throttle the guest when it did.
 * Also where the wait after a round for the link to carry it ends, and
 * what the destination's pace adds to the pause estimate for each page
 * (here for the same reason: the unit tests' build has this file).
 *
 * A round stalls when the pause expected after it does not fit the limit
 * and it shrank the dirty set by less than a tenth, or at a pace that
 * would need more than NB_CONVERGE_ROUNDS rounds like it to make the pause
 * fit (pace^n x expected <= limit).  One such round is enough: a round
 * that resent the dirty set while the guest dirtied nearly as much again
 * says the next one will do the same.
 *
 * Only the part of the pause that rounds (and a throttle) shorten is
 * weighed, against what the final sync and the round trips leave of the
 * limit: where they leave nothing, no throttle makes the pause fit, and
 * no round stalls.
 */
#ifndef NB_CONVERGE_H
#define NB_CONVERGE_H

#include <stdint.h>

#define NB_CONVERGE_ROUNDS 8

/* Whether the round that left `dirty` pages (and blocks) of the `prev`
 * before it stalled, the shortenable part of the pause it leaves being
 * `expected_ms` against the `limit_ms` left for it (0 or less: none). */
int nb_round_stalled(double expected_ms, double limit_ms, uint64_t dirty,
                     uint64_t prev);
/* The throttle, in percent, under which the guest would dirty pages at
 * half the rate they go out (one every `page_ms`), from the rate it
 * dirtied them (`dirty_per_ms`) under the throttle `cur`; 0: none needed
 * or no estimate. */
uint32_t nb_converge_target(uint32_t cur, double page_ms, double dirty_per_ms);

/* The time, in ms, the destination took for each page (or block) beyond
 * what the source took to send it: it had `backlog` of them yet to apply
 * when a round had crossed the link, and said it had applied them
 * `lag_ms` later, `rtt_ms` of which the round's last bytes and its report
 * took on the way (the least round trip); 0 if that leaves nothing or
 * nothing was pending.  A backlog of several rounds gives a lower bound:
 * the destination had begun on it before. */
double nb_dest_excess_ms(double lag_ms, double rtt_ms, uint64_t backlog);

/*
 * The wait after a round (source.c's drain_round) ends once the page
 * connections hold fewer bytes than this: what a link of `bandwidth`
 * bytes a second carries in NB_DRAIN_POLL_MS (one look of the wait), at
 * least NB_DRAIN_FLOOR_PER_CHANNEL for each of `channels` and
 * NB_DRAIN_FLOOR (what a peer's delayed acknowledgements may leave
 * unacknowledged on a connection until their timer: a few segments, so
 * the wait does not end on that timer), at most
 * NB_DRAIN_CEILING, which an unmeasured link (0) gets.  The next round
 * queues behind what is left, and once the rest fits all of it crosses
 * the link before the pause, the guest dirtying the final round.
 */
/* How often that wait looks at what the connections hold, ms. */
#define NB_DRAIN_POLL_MS 2
#define NB_DRAIN_FLOOR (16u << 10)
#define NB_DRAIN_FLOOR_PER_CHANNEL (8u << 10)
#define NB_DRAIN_CEILING (64u << 10)
uint64_t nb_drain_threshold(double bandwidth, int channels);

#endif
