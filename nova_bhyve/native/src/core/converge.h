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
 * up to it; when the last round drained had crossed the link and what
 * the destination then had yet to apply.  When the APPLIED covering that
 * round comes, the time per page the destination took beyond the
 * source's is timed on it, and kept until another round is timed: the
 * pause estimate prices it.  The throttle's decisions weigh the lesser
 * of the last two rounds timed (steady_ms): one late APPLIED may be the
 * scheduler's (on a busy host one came 95 ms late, 0.37 ms a page of a
 * 259-page round), no reason to slow the guest.  That holds until
 * NB_PACE_LONE_ROUNDS rounds have drained after the one timed last (one
 * or two counts, as its APPLIED came before the count after it or
 * later); once they have with no timing to confirm or refute it (rounds
 * too small, an APPLIED found waiting within a round trip, a backlog
 * beyond the totals kept, or each round drained before the APPLIED of
 * the one before came), the pace timed last stands whole for the
 * throttle too.  Not
 * timed: fewer than NB_PACE_MIN_UNITS pending (a few ms of the
 * scheduler's would read as a slow destination); a backlog older than
 * the NB_PACE_ROUNDS running totals kept; an APPLIED whose arrival is
 * known only to be no later than the round's crossing and a round trip
 * (found waiting: it says nothing of a lag).
 */
#define NB_PACE_ROUNDS 1024
#define NB_PACE_MIN_UNITS 256
#define NB_PACE_LONE_ROUNDS 2

struct nb_dest_pace {
    uint64_t sent[NB_PACE_ROUNDS];  /* pages and blocks sent up to round r,
                                     * at [r % NB_PACE_ROUNDS] */
    uint32_t pending_round;     /* the round drained, to time (+1; 0: none) */
    uint32_t drained_round;     /* the last round drained (+1) */
    double t_crossed;           /* when it had crossed the link */
    uint64_t backlog;           /* pages and blocks sent, not yet applied
                                 * when its drain ended */
    double t_quiet;             /* when the control channel last read
                                 * empty (or a frame came, in order) */
    uint32_t excess_round;      /* the round excess_ms was timed on (+1) */
    double excess_ms;           /* per page or block, the destination's time
                                 * beyond the source's (0: kept up, or none
                                 * timed since round 0) */
    double steady_ms;           /* the lesser of that and the round timed
                                 * before it (0 where either was, or fewer
                                 * than two were timed since round 0) */
};

/* The time, in ms, the destination took for each page (or block) beyond
 * what the source took to send it: it had `backlog` of them yet to apply
 * when a round had been drained, and said it had applied them `lag_ms`
 * after that round had crossed the link, `rtt_ms` of which the round's
 * last bytes and its report took on the way (the least round trip); 0 if
 * that leaves nothing or nothing was pending.  A backlog of several
 * rounds gives a lower bound: the destination had begun on it before. */
double nb_dest_excess_ms(double lag_ms, double rtt_ms, uint64_t backlog);
/* Add round `round`'s `units` pages and blocks to the running total.
 * Round 0's pace holds only until round 1 is sent: the destination's
 * first writes to its memory are its slowest. */
void nb_pace_sent(struct nb_dest_pace *p, uint32_t round, uint64_t units);
/* Round `round`'s drain ended with `applied` rounds applied (the last
 * APPLIED round + 1); it will have crossed the link at `t_crossed`.  If
 * the destination had applied it already, and it held at least
 * NB_PACE_MIN_UNITS, its pace is 0 (it kept up). */
void nb_pace_drained(struct nb_dest_pace *p, uint32_t round, uint32_t applied,
                     double t_crossed);
/* APPLIED advanced to `applied` rounds, read at `now` by a poll that
 * waited for it (`waited`; it came at `now`) or found it there (it came
 * after the channel last read empty, or after the frame read before it).
 * Times the pace on the round drained if this covers it; 1 if it did.
 * A pending round 0 is dropped once round 1 is sent (nb_pace_sent). */
int nb_pace_applied(struct nb_dest_pace *p, uint32_t applied, int waited,
                    double now, double rtt_ms);
/* The pace the throttle's decisions weigh: steady_ms, or excess_ms once
 * NB_PACE_LONE_ROUNDS rounds drained after the round it was timed on. */
double nb_pace_throttle_ms(const struct nb_dest_pace *p);

/*
 * Once the rest fits the limit, the switch-over policy (switchover.c's
 * nb_src_should_switch) runs at most NB_EXTRA_ROUNDS more rounds, each
 * only while it promises a smaller rest.  When it then waits for the
 * destination to apply the last round before the pause (source.c's
 * wait_applied), the guest runs on and dirties pages no round has sent,
 * as many as that wait lets it.  If the count after the wait more than
 * doubles the one before it, and a count had been taken against the
 * extra rounds since the rest fitted or the last restart, they start
 * again, at most NB_CATCHUP_RESTARTS times in a migration: on a
 * destination that lags, the rounds after a restart leave it another
 * backlog, and the next wait another count.
 */
#define NB_EXTRA_ROUNDS 8
#define NB_CATCHUP_RESTARTS 2

struct nb_fit {
    int rounds;         /* counts that found the rest fitting, since the
                         * rest first fitted or the last restart */
    int restarts;       /* restarts after a wait for the destination */
    int waited;         /* the source waited for the destination since
                         * the last count */
};

/* The source waited for the destination after a count. */
void nb_fit_caught_up(struct nb_fit *f);
/* A count found `dirty` pages and blocks, the one before it `before`:
 * restart the extra rounds if it follows a wait and more than doubles
 * that (see above). */
void nb_fit_counted(struct nb_fit *f, uint64_t dirty, uint64_t before);
/* That count found the rest fitting: 1 if another round may still run. */
int nb_fit_round_left(struct nb_fit *f);

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
