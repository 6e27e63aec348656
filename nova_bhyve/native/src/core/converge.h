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

/*
 * The destination's pace, which the pause estimate prices (PROTOCOL.md,
 * "Rounds and switch-over"): for each round, the pages and blocks sent
 * up to it; when the last round had crossed the link and what the
 * destination then had yet to apply; when its APPLIED came.  The time
 * per page the destination took beyond the source's is timed on rounds
 * with at least NB_PACE_MIN_UNITS pending (on fewer, a few ms of the
 * scheduler's would read as a slow destination) and kept until another
 * round is timed; the running totals of NB_PACE_ROUNDS rounds are kept
 * (a destination further behind is not timed).
 */
#define NB_PACE_ROUNDS 1024
#define NB_PACE_MIN_UNITS 256

struct nb_dest_pace {
    uint64_t sent[NB_PACE_ROUNDS];  /* pages and blocks sent up to round r,
                                     * at [r % NB_PACE_ROUNDS] */
    uint32_t drained_round;     /* the round whose drain last ended (+1) */
    double t_crossed;           /* when that round had crossed the link */
    int backlog_known;          /* whether backlog could be counted */
    uint64_t backlog;           /* pages and blocks sent, not yet applied
                                 * when that drain ended */
    double t_applied;           /* when APPLIED last advanced, at the earliest */
    double t_quiet;             /* when the control channel last read empty */
    uint32_t seen_round;        /* the round last looked at (+1; 0: none) */
    uint32_t excess_round;      /* the round excess_ms was timed on (+1) */
    double excess_ms;           /* per page or block, the destination's time
                                 * beyond the source's (0: kept up, or none
                                 * timed since round 0) */
};

/* The time, in ms, the destination took for each page (or block) beyond
 * what the source took to send it: it had `backlog` of them yet to apply
 * when a round had been drained, and said it had applied them `lag_ms`
 * after that round had crossed the link, `rtt_ms` of which the round's
 * last bytes and its report took on the way (the least round trip); 0 if
 * that leaves nothing or nothing was pending.  A backlog of several
 * rounds gives a lower bound: the destination had begun on it before. */
double nb_dest_excess_ms(double lag_ms, double rtt_ms, uint64_t backlog);
/* Add round `round`'s `units` pages and blocks to the running total. */
void nb_pace_sent(struct nb_dest_pace *p, uint32_t round, uint64_t units);
/* Round `round`'s drain ended with `applied` rounds applied (the last
 * APPLIED round + 1); it will have crossed the link at `t_crossed`. */
void nb_pace_drained(struct nb_dest_pace *p, uint32_t round, uint32_t applied,
                     double t_crossed);
/* APPLIED advanced, read at `now`: it came then if the poll that read it
 * had waited for it (`waited`), else at the earliest when the control
 * channel last read empty. */
void nb_pace_applied(struct nb_dest_pace *p, int waited, double now);
/* At a count in round `round`, `applied` rounds applied: look at the
 * round once it is applied, and time the pace on it (nb_dest_excess_ms)
 * if enough was pending; none pending resets the excess to 0 (the
 * destination kept up).  Round 0's excess holds only until round 1 runs:
 * the destination's first writes to its memory are its slowest.
 * Returns 1 if the excess was timed or reset. */
int nb_pace_time(struct nb_dest_pace *p, uint32_t round, uint32_t applied,
                 double rtt_ms);

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
